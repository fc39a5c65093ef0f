"""Values the program hands to a domain's own parser, checked with that parser before the program runs.

Without these checks such a value reaches its parser only inside ``pulumi up`` (or the offline
plan's program run): a VMM port is parsed when the VM resource is built, an image reference when
the compose is rendered, a dstack release when app-compose.json is written, another stack's file
when the images stack collects what to build. A mistake then ends the run as "the program failed"
(exit 3) with a message that names no key. Here the same parsers run first, each problem names its
key, and the plan exits 2. Repository files the config points at are checked too: confined to the
checkout (symlinks included), bounded in size (the input hash reads every byte), and with every
base image a build starts from pinned by digest.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Iterator

from fleet.apps import compose as fc
from fleet.apps.imageref import DigestKind, InvalidImageReference, parse_image_ref, unpinned_reason
from fleet.apps.plans import Container, app_container_keys, plan_app
from fleet.apps.vmm import VmmError, parse_port
from fleet.config import stackfile
from fleet.config.problems import ConfigError, Problem
from fleet.config.schema import NAMESPACE, StackConfig
from fleet.images import mkosibuild

# The input hash of a built container reads every file of its directory: keep that a build input,
# not a copy of the repository (or of whatever a symlink points at).
MAX_TREE_FILES = 20_000
MAX_TREE_BYTES = 512 * 1024 * 1024
PLACEHOLDER_DIGEST = "sha256:" + "0" * 64  # stands in for a pending build while a compose is rehearsed


def problems(config: StackConfig, root: Path | None) -> list[Problem]:
    out: list[tuple[str, str]] = []
    out += _app_problems(config, root)
    out += _container_problems(config)
    if root is not None:
        out += _build_for_problems(config, root)
        out += _repository_problems(config, root)
    return [Problem(config.source, f"{NAMESPACE}:{path}", message) for path, message in out]


# ---- apps -------------------------------------------------------------------------------------------

# Where a problem of fleet.apps.compose (its field names) lives in an app's configuration.
_APP_FIELDS = {
    "dstack_version": "dstackVersion", "key_provider": "keyProvider", "key_provider_id": "kms.keyProviderId",
    "gateway_enabled": "settings.gatewayEnabled", "public_logs": "settings.publicLogs",
    "public_sysinfo": "settings.publicSysinfo", "public_tcbinfo": "settings.publicTcbinfo",
    "no_instance_id": "settings.noInstanceId", "secure_time": "settings.secureTime",
    "storage_fs": "settings.storageFs", "allowed_envs": "settings.allowedEnvs",
}
_SERVICE_FIELDS = {"working_dir": "workingDir", "security_opt": "securityOpt", "read_only": "readOnly"}


def _app_problems(config: StackConfig, root: Path | None) -> Iterator[tuple[str, str]]:
    releases = set(fc.KNOWN_DSTACK_RELEASES) | set(fc.DSTACK_OS_COMPOSE_RELEASES)
    for i, app in enumerate(config.fleet.apps):
        at = f"apps[{i}]"
        known = app.dstack_version in releases
        if not known:
            yield (f"{at}.dstackVersion", f"{app.dstack_version!r} is not a dstack release whose app-compose format "
                   f"is known; use one of {', '.join(sorted(releases, key=_version_key))}")
        if app.vmm is not None:
            for j, port in enumerate(app.vmm.ports):
                try:
                    parse_port(port)  # vmm-cli.py's parse_port_mapping, as fleet.apps.vmm reads it
                except VmmError as exc:
                    yield (f"{at}.vmm.ports[{j}]", str(exc))
        if known and root is not None:
            yield from _rehearse_app(config, root, at, app)


def _version_key(version: str) -> tuple:
    return tuple(int(p) if p.isdigit() else -1 for p in re.split(r"[.]", version))


def _rehearse_app(config: StackConfig, root: Path, at: str, app) -> Iterator[tuple[str, str]]:
    """Plan the app as the program will (``fleet.apps.plans.plan_app``: compose, app-compose.json for
    its dstack version), with a stand-in digest for every container, so its checks run even while
    images are pending, and map what they find to the app's keys."""
    containers = {}
    for key, source in config.fleet.containers.items():
        repository = source.external.image if source.external else "registry.invalid/build"
        try:
            ref = parse_image_ref(f"{repository}@{PLACEHOLDER_DIGEST}")
        except InvalidImageReference:
            return  # reported for the container itself
        containers[key] = Container(key, "external" if source.external else "built", ref, DigestKind.MANIFEST,
                                    repository=repository)
    if any(key not in containers for key in app_container_keys(app)):
        return  # reported by fleet.apps.plans.app_problems
    if app.compose_file:
        path = _inside(root, app.compose_file)
        if path is None or not path.is_file():
            return  # reported by fleet.apps.plans.app_problems
    try:
        plan_app(app, config.stack, containers, root)
    except (OSError, UnicodeDecodeError):
        return  # an unreadable compose file: reported by fleet.apps.plans.app_problems
    except fc.ComposeError as exc:
        index = {s.name: j for j, s in enumerate(app.services)}
        for where, message in exc.problems:
            yield _app_path(at, app, index, where, message)


def _app_path(at: str, app, index: dict[str, int], where: str, message: str) -> tuple[str, str]:
    """A problem of the compose module (``where`` in its field names) as (config key, message)."""
    head, _, rest = where.partition(".")
    if head == "docker_compose_file":
        head, _, rest = rest.partition(".")
    if head == "services" and rest and app.services:
        name, _, field = rest.partition(".")
        if name in index:
            path = f"{at}.services[{index[name]}]"
            if field:
                key, bracket, tail = field.partition("[")
                path += "." + _SERVICE_FIELDS.get(key, key) + (bracket + tail if bracket else "")
            return path, message
    if where in _APP_FIELDS:
        return f"{at}.{_APP_FIELDS[where]}", message
    return at, f"{where}: {message}" if where else message


# ---- containers -------------------------------------------------------------------------------------

def _container_problems(config: StackConfig) -> Iterator[tuple[str, str]]:
    for key, source in sorted(config.fleet.containers.items()):
        if source.external is not None:
            try:
                parse_image_ref(f"{source.external.image}@{source.external.digest}")
            except InvalidImageReference as exc:
                yield (f"containers.{key}.external.image", str(exc))


# ---- the images stack's env stacks ------------------------------------------------------------------

def _build_for_problems(config: StackConfig, root: Path) -> Iterator[tuple[str, str]]:
    for i, stack in enumerate(config.fleet.build_for):
        at = f"buildFor[{i}]"
        if stack == config.stack:
            yield (at, "names this stack itself; list the env stacks whose images it builds")
            continue
        try:
            other = stackfile.read(root, stack)
        except ConfigError as exc:
            yield (at, f"stack {stack!r}: {exc.lines()[0]}")
            continue
        role = other.config.get(f"{NAMESPACE}:role")
        if role != "env":
            yield (at, f"stack {stack!r} has role {role!r}; the images stack builds for env stacks only")


# ---- repository files -------------------------------------------------------------------------------

def _inside(root: Path, relative: str) -> Path | None:
    """``root/relative`` with every symlink resolved, or None when that leaves the repository."""
    try:
        path = (root / relative).resolve()
    except (OSError, RuntimeError):
        return None
    return path if path.is_relative_to(root.resolve()) else None


def _tree_problem(root: Path, directory: Path) -> str | None:
    """A tree the input hash reads whole: no symlink out of the repository, bounded size."""
    resolved_root = root.resolve()
    files = size = 0
    for top, dirs, names in os.walk(directory, followlinks=False):
        for name in dirs + names:
            path = Path(top) / name
            try:
                info = path.lstat()
            except OSError:
                continue
            if stat.S_ISLNK(info.st_mode):
                try:
                    target = path.resolve()
                except (OSError, RuntimeError):
                    target = None
                if target is None or not target.is_relative_to(resolved_root):
                    return (f"{path.relative_to(directory).as_posix()} is a symlink out of the repository; the "
                            "build would read files that are not reviewed here")
            elif stat.S_ISREG(info.st_mode):
                files += 1
                size += info.st_size
        if files > MAX_TREE_FILES or size > MAX_TREE_BYTES:
            return (f"holds more than {MAX_TREE_FILES} files or {MAX_TREE_BYTES >> 20} MiB; a build directory "
                    "is hashed whole, so keep only the build's inputs in it")
    return None


def _repository_problems(config: StackConfig, root: Path) -> Iterator[tuple[str, str]]:
    for key, source in sorted(config.fleet.containers.items()):
        at = f"containers.{key}"
        if source.docker is not None:
            yield from _docker_problems(root, f"{at}.docker", source.docker)
        if source.mkosi is not None:
            directory = _inside(root, source.mkosi.directory)
            if directory is None:
                yield (f"{at}.mkosi.directory", f"{source.mkosi.directory!r} leaves the repository (through a "
                       "symlink); give a directory inside it")
            elif directory.is_dir():
                problem = _tree_problem(root, directory)
                if problem:
                    yield (f"{at}.mkosi.directory", f"{source.mkosi.directory}: {problem}")
                for problem in mirror_problems(directory, source.mkosi.directory):
                    yield (f"{at}.mkosi.directory", problem)


def _docker_problems(root: Path, at: str, docker) -> Iterator[tuple[str, str]]:
    context = _inside(root, docker.context)
    if context is None:
        yield (f"{at}.context", f"{docker.context!r} leaves the repository (through a symlink)")
        return
    if not context.is_dir():
        yield (f"{at}.context", f"{docker.context}: no such directory in the repository")
        return
    problem = _tree_problem(root, context)
    if problem:
        yield (f"{at}.context", f"{docker.context}: {problem}")
        return
    dockerfile = _inside(root, f"{docker.context}/{docker.dockerfile}")
    if dockerfile is None or not dockerfile.is_relative_to(context) or not dockerfile.is_file():
        yield (f"{at}.dockerfile", f"{docker.dockerfile!r} is not a file in the context {docker.context}")
        return
    try:
        text = dockerfile.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        yield (f"{at}.dockerfile", f"{docker.dockerfile} cannot be read as UTF-8 text ({exc})")
        return
    stages, problems = dockerfile_bases(text, dict(docker.args))
    for problem in problems:
        yield (f"{at}.dockerfile", f"{docker.dockerfile}: {problem}")
    if docker.target is not None and docker.target not in stages:
        yield (f"{at}.target", f"{docker.target!r} is not a stage of {docker.dockerfile}; stages: "
               f"{', '.join(stages) or '(none named)'}")


# ---- Dockerfile base images ---------------------------------------------------------------------------

_VARIABLE = re.compile(r"\$(?:\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?P<modifier>:[-+][^}]*)?\}|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))")


def _instructions(text: str) -> Iterator[tuple[int, str, str]]:
    """(line, INSTRUCTION, arguments) with line continuations joined and comments dropped, as
    BuildKit's Dockerfile parser reads them (the ``# escape=`` directive included)."""
    escape = "\\"
    lines = text.splitlines()
    for line in lines:  # parser directives come first, before any instruction or comment
        match = re.fullmatch(r"#\s*(\w+)\s*=\s*(\S+)\s*", line)
        if not match:
            break
        if match.group(1).lower() == "escape" and match.group(2) in ("\\", "`"):
            escape = match.group(2)
    buffer, start = "", 0
    for number, line in enumerate(lines, start=1):
        stripped = line.strip()
        if not buffer and (not stripped or stripped.startswith("#")):
            continue
        if buffer and stripped.startswith("#"):
            continue  # comment lines inside a continued instruction are dropped
        if not buffer:
            start = number
        if line.rstrip().endswith(escape):
            buffer += line.rstrip()[:-1] + " "
            continue
        buffer += line
        word, _, rest = buffer.strip().partition(" ")
        yield start, word.upper(), rest.strip()
        buffer = ""
    if buffer.strip():
        word, _, rest = buffer.strip().partition(" ")
        yield start, word.upper(), rest.strip()


def _expand(value: str, variables: dict[str, str | None]) -> tuple[str, list[str]]:
    missing: list[str] = []

    def substitute(match: re.Match[str]) -> str:
        name = match.group("braced") or match.group("bare")
        modifier = match.group("modifier") or ""
        current = variables.get(name)
        if modifier.startswith(":-"):
            return current if current else modifier[2:]
        if modifier.startswith(":+"):
            return modifier[2:] if current else ""
        if current is None:
            missing.append(name)
            return ""
        return current

    return _VARIABLE.sub(substitute, value), missing


def dockerfile_bases(text: str, args: dict[str, str]) -> tuple[list[str], list[str]]:
    """The stage names of a Dockerfile and one problem per base image that is not pinned by digest
    (``FROM`` after substituting build args; ``scratch`` and earlier stages need no pin)."""
    variables: dict[str, str | None] = {}
    stages: list[str] = []
    problems: list[str] = []
    seen_from = False
    for line, instruction, rest in _instructions(text):
        if instruction == "ARG" and not seen_from:
            for item in rest.split():
                name, sep, default = item.partition("=")
                variables[name] = args.get(name, default.strip('"\'') if sep else None)
        elif instruction == "FROM":
            seen_from = True
            words = [w for w in rest.split() if not w.startswith("--")]
            if not words:
                problems.append(f"line {line}: FROM names no image")
                continue
            image, missing = _expand(words[0], variables)
            alias = words[2].lower() if len(words) >= 3 and words[1].lower() == "as" else None
            if missing:
                problems.append(f"line {line}: FROM {words[0]} uses build arg(s) {', '.join(missing)} with no value; "
                                "give them a default or set them under args")
            elif image != "scratch" and image.lower() not in stages:
                reason = unpinned_reason(image) if image else "is empty"
                if reason:
                    problems.append(f"line {line}: base image {image!r} {reason}; pin it by digest "
                                    "(name@sha256:...) so the build is reproducible")
            if alias:
                stages.append(alias)
    return stages, problems


# ---- mkosi mirrors ----------------------------------------------------------------------------------
# A mirror is pinned when it serves one dated snapshot of the archive. mkosi 25.3 has no snapshot
# setting of its own (systemd/mkosi 54c625c380ef5500f17460981a3c67b109b6a847, mkosi/config.py:
# Mirror= and LocalMirror= in [Distribution]) and defaults to each distribution's moving mirror.
PINNED_MIRRORS = (
    re.compile(r"https?://snapshot\.debian\.org/archive/[a-z0-9-]+/[0-9]{8}T[0-9]{6}Z/?"),
    re.compile(r"https?://snapshot\.ubuntu\.com/ubuntu/[0-9]{8}T[0-9]{6}Z/?"),
    re.compile(r"https?://archive\.archlinux\.org/repos/[0-9]{4}/[0-9]{2}/[0-9]{2}/?"),
)


def mirror_problems(directory: Path, label: str) -> list[str]:
    """The effective ``Mirror=`` (and ``LocalMirror=``) of an mkosi configuration must be a dated
    snapshot: a moving mirror installs different packages on the next build."""
    last: dict[str, tuple[str, str]] = {}
    for path in mkosibuild.conf_files(directory):
        try:
            entries = list(mkosibuild.parse_ini(path.read_text(encoding="utf-8")))
        except (mkosibuild.MkosiError, UnicodeDecodeError, OSError):
            continue  # reported by mkosibuild.validate
        where = f"{label}/{path.relative_to(directory).as_posix()}"
        for section, setting, value in entries:
            if section == "Distribution" and setting in ("Mirror", "LocalMirror"):
                last[setting] = (value, where)
    out = []
    mirror = last.get("Mirror")
    if mirror is None:
        out.append(f"{label}/mkosi.conf: no Mirror= in [Distribution]; mkosi then uses the distribution's moving "
                   "mirror: set a dated snapshot such as https://snapshot.debian.org/archive/debian/20250901T000000Z")
    for setting, (value, where) in sorted(last.items()):
        if value and not any(p.fullmatch(value) for p in PINNED_MIRRORS):
            out.append(f"{where}: {setting}={value} is not a dated snapshot (snapshot.debian.org, snapshot.ubuntu.com "
                       "or archive.archlinux.org with a date); a moving mirror installs other packages next time")
    return out


