"""Container images built reproducibly with mkosi: a root-filesystem tar, an OCI image, the registry.

A container declared as ``mkosi: {directory, command, entrypoint, workingDir, env, ports}`` is built
by a generated bash step (``step_script``, marked ``# dstack-fleet:step=mkosi-build``) that runs
from the project root, as the images stack's ``command.local.Command``:

1. refuses a configuration that cannot be reproducible: ``mkosi.conf`` (with its
   ``mkosi.conf.d`` drop-ins, the last assignment winning, as mkosi reads them) must set
   ``Format=tar`` in ``[Output]`` and ``SourceDateEpoch=`` in ``[Content]``, unconditionally, and
   there must be no machine-local ``mkosi.local.conf``/``mkosi.local``;
2. refuses any mkosi but the pinned one (``mkosi --version`` must print ``mkosi 25.3``);
3. builds twice, into two fresh output directories, uncompressed (``--compress-output=no``), with
   a wiped build directory and no incremental cache, and compares the two tars byte for byte:
   when they differ nothing is published;
4. turns the tar into a deterministic OCI image layout (``python -m fleet.ocilayout``, the image
   config from the settings, every time from ``SourceDateEpoch``);
5. pushes it with ``skopeo copy --preserve-digests`` to ``<repository>:<input hash[:32]>`` and
   checks that the digest skopeo reports is the layout's manifest digest. Tags are immutable in our
   registry and name the input hash, so before building anything the step asks the registry
   (``skopeo inspect``) whether the tag exists; if it does (a rerun after the lock entry was lost,
   another stack's run), the tag's digest is the lock entry and nothing is built or pushed again;
6. prints one JSON line, the lock entry: ``{"digest", "digest_kind": "manifest", "image", "source"}``.

**The pinned mkosi is 25.3** (tag ``v25.3``, commit ``54c625c380ef5500f17460981a3c67b109b6a847``,
2025-01-31): the version seed 004's reproducible tar was built and checked with, and the last
release whose configuration parser fails on an unknown setting (v26 only warns, so a misspelt
``SourceDateEpoch`` would silently build an unreproducible image). Its CLI is what the step
passes: ``--directory``, ``--output-directory``, ``--output``, ``--compress-output=no`` (a
``Format=tar`` image is zstd-compressed by default), ``--incremental=no``, ``--wipe-build-dir``.
The version is part of the input hash, so a deliberate bump rebuilds every mkosi image.

What the step needs where it runs: mkosi 25.3 on ``PATH`` (root, or unprivileged user namespaces),
skopeo with credentials for the registry (``gcloud auth configure-docker <region>-docker.pkg.dev``
writes a credential helper skopeo reads), and the project's ``.venv``. Everything but this module's
``parse_step_stdout`` is standard library only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import stat
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Iterator, Mapping

from fleet.images import ocilayout

STEP = "mkosi-build"
STEP_MARK = "# dstack-fleet:step="
MKOSI_VERSION = "25.3"
MKOSI_COMMIT = "54c625c380ef5500f17460981a3c67b109b6a847"
MKOSI_INSTALL = f"python3 -m pip install 'git+https://github.com/systemd/mkosi@{MKOSI_COMMIT}'  # v{MKOSI_VERSION}"
# skopeo pushes (and resolves existing tags): Ubuntu 24.04's package, the runners' and build hosts' OS;
# the apt version is pinned in .github/workflows/images.yml, the upstream version checked here.
SKOPEO_VERSION = "1.13.3"
SKOPEO_APT_VERSION = "1.13.3+ds1-2build2"
PYTHON = ".venv/bin/python"  # the project's interpreter, relative to the project root
TAG_LENGTH = 32  # the registry tag is the input hash's first 32 digits, as for docker builds
OUTPUT_NAME = "rootfs"
# Directories mkosi itself writes into its configuration directory: state, not inputs.
MKOSI_STATE_DIRS = ("mkosi.output", "mkosi.cache", "mkosi.builddir")
LOCAL_OVERRIDES = ("mkosi.local.conf", "mkosi.local")
CONDITIONAL_SECTIONS = ("Match", "TriggerMatch")
# The source is local and was just built: accept it; signatures are not part of this flow.
SKOPEO_POLICY = {"default": [{"type": "insecureAcceptAnything"}]}
SETTING_KEYS = ("directory", "command", "entrypoint", "workingDir", "env", "ports")

_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_REPOSITORY = re.compile(r"[a-z0-9][a-z0-9._/:-]*[a-z0-9]")


class MkosiError(ValueError):
    """Settings that cannot be built, or step output that cannot be read (one line)."""


# ---- settings -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MkosiBuild:
    """A validated ``mkosi:`` container declaration."""

    directory: str  # relative to the project root, holding mkosi.conf
    command: tuple[str, ...]
    entrypoint: tuple[str, ...] = ()
    working_dir: str | None = None
    env: tuple[tuple[str, str], ...] = ()  # sorted by name
    ports: tuple[str, ...] = ()  # "3000/tcp", sorted, unique

    @classmethod
    def from_settings(cls, settings: Any) -> "MkosiBuild":
        """From the stack config's mapping (camelCase keys) or an object with the same fields in
        snake_case (a pydantic model). Raises ``MkosiError`` naming every problem."""
        data = _as_mapping(settings)
        problems = _shape_problems(data)
        if problems:
            raise MkosiError("; ".join(f"{path}: {message}" for path, message in problems))
        env = data.get("env") or {}
        return cls(directory=str(PurePosixPath(data["directory"])), command=tuple(data["command"]),
                   entrypoint=tuple(data.get("entrypoint") or ()), working_dir=data.get("workingDir"),
                   env=tuple(sorted((str(k), str(v)) for k, v in env.items())),
                   ports=tuple(sorted({ocilayout.port_key(str(p)) for p in data.get("ports") or ()},
                                      key=lambda p: (int(p.split("/")[0]), p))))

    def canonical(self) -> dict[str, Any]:
        return {"directory": self.directory, "command": list(self.command), "entrypoint": list(self.entrypoint),
                "workingDir": self.working_dir, "env": dict(self.env), "ports": list(self.ports)}

    def image_settings(self) -> ocilayout.ImageSettings:
        return ocilayout.ImageSettings(cmd=self.command, entrypoint=self.entrypoint, working_dir=self.working_dir,
                                       env=tuple(f"{k}={v}" for k, v in self.env), exposed_ports=self.ports)

    def layout_args(self) -> list[str]:
        """The image config as ``python -m fleet.ocilayout`` arguments (``--x=value``: values may start with '-')."""
        args = [f"--cmd={c}" for c in self.command] + [f"--entrypoint={e}" for e in self.entrypoint]
        if self.working_dir:
            args.append(f"--workdir={self.working_dir}")
        args += [f"--env={k}={v}" for k, v in self.env] + [f"--expose={p}" for p in self.ports]
        return args


def _as_mapping(settings: Any) -> Mapping[str, Any]:
    if isinstance(settings, Mapping):
        return settings
    if isinstance(settings, MkosiBuild):
        return settings.canonical()
    fields = {"directory": "directory", "command": "command", "entrypoint": "entrypoint",
              "workingDir": "working_dir", "env": "env", "ports": "ports"}
    return {key: getattr(settings, attr) for key, attr in fields.items() if getattr(settings, attr, None) is not None}


def _text_problem(value: Any) -> str | None:
    if not isinstance(value, str):
        return f"must be a string (got {type(value).__name__})"
    if "\0" in value:
        return "must not contain a NUL character"
    return None


def _shape_problems(data: Mapping[str, Any]) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    for key in sorted(set(data) - set(SETTING_KEYS)):
        problems.append((str(key), f"unknown setting; known: {', '.join(SETTING_KEYS)}"))
    directory = data.get("directory")
    if directory is None:
        problems.append(("directory", "is required: the repository directory holding mkosi.conf"))
    elif (problem := _text_problem(directory)) is not None:
        problems.append(("directory", problem))
    else:
        path = PurePosixPath(directory)
        if not directory or path.is_absolute() or ".." in path.parts or str(path) == ".":
            problems.append(("directory", f"{directory!r} is not a directory inside the repository "
                                          "(a relative path without '..')"))
    for key, required in (("command", True), ("entrypoint", False)):
        value = data.get(key)
        if value is None or (not required and value == []):
            if required:
                problems.append((key, "is required: what the container runs (the root filesystem has no default)"))
            continue
        if not isinstance(value, (list, tuple)) or (required and not value):
            problems.append((key, "must be a non-empty list of strings"))
            continue
        problems += [(f"{key}[{i}]", p) for i, item in enumerate(value) if (p := _text_problem(item)) is not None]
    working_dir = data.get("workingDir")
    if working_dir is not None:
        problem = _text_problem(working_dir)
        if problem is None and not working_dir.startswith("/"):
            problem = f"{working_dir!r} is not an absolute path"
        if problem:
            problems.append(("workingDir", problem))
    env = data.get("env")
    if env is not None:
        if not isinstance(env, Mapping):
            problems.append(("env", "must be a mapping of NAME to value"))
        else:
            for name, value in env.items():
                if not isinstance(name, str) or not ocilayout.ENV_NAME.fullmatch(name):
                    problems.append((f"env.{name}", "is not an environment variable name"))
                elif (problem := _text_problem(value)) is not None:
                    problems.append((f"env.{name}", problem))
    ports = data.get("ports")
    if ports is not None:
        if not isinstance(ports, (list, tuple)):
            problems.append(("ports", "must be a list of ports (3000, or \"3000/tcp\", \"53/udp\")"))
        else:
            for i, port in enumerate(ports):
                try:
                    if isinstance(port, bool) or not isinstance(port, (int, str)):
                        raise ocilayout.LayoutError(f"{port!r} is not a port")
                    ocilayout.port_key(str(port))
                except ocilayout.LayoutError as exc:
                    problems.append((f"ports[{i}]", str(exc)))
    return problems


def validate(settings: Any, root: Path) -> list[tuple[str, str]]:
    """Every problem of a ``mkosi:`` declaration as ``(path, message)``, the path relative to the
    ``mkosi`` object (``directory``, ``env.NAME``, ``ports[0]``). Reads the configuration files."""
    data = _as_mapping(settings)
    problems = _shape_problems(data)
    if any(path == "directory" for path, _ in problems):
        return problems
    directory = root / str(data["directory"])
    if not directory.is_dir():
        return problems + [("directory", f"{data['directory']}: no such directory in the repository")]
    _, conf = read_conf(directory, label=str(PurePosixPath(str(data["directory"]))))
    return problems + [("directory", message) for message in conf]


# ---- mkosi.conf ---------------------------------------------------------------------------------------------

def parse_ini(text: str) -> Iterator[tuple[str, str, str]]:
    """(section, setting, value) as mkosi v25.3's ``parse_ini`` reads them: ``#`` starts a comment
    anywhere, an indented line continues the previous value, the same setting may repeat."""
    section = setting = value = None
    for raw in textwrap.dedent(text).splitlines():
        line = raw.split("#", 1)[0]
        if not line.strip():
            continue
        if section and setting and value is not None and line[0].isspace():
            value = f"{value}\n{line.strip()}"
            continue
        if section and setting and value is not None:
            yield section, setting, value
            setting = value = None
        line = line.strip()
        if line.startswith("["):
            if not line.endswith("]") or not line[1:-1].strip():
                raise MkosiError(f"{line!r} is not a valid section")
            section = line[1:-1].strip()
            continue
        if not section:
            raise MkosiError(f"setting {line!r} is outside of a section")
        name, sep, rest = line.partition("=")
        if not sep or not name.strip():
            raise MkosiError(f"{line!r} is not Setting=value")
        setting, value = name.strip(), rest.strip()
    if section and setting and value is not None:
        yield section, setting, value


def conf_files(directory: Path) -> list[Path]:
    """``mkosi.conf`` then ``mkosi.conf.d`` (its ``*.conf`` files and, as top-level directories, its
    subdirectories), in name order: the order in which later assignments win."""
    files = [directory / "mkosi.conf"] if (directory / "mkosi.conf").is_file() else []
    drop_ins = directory / "mkosi.conf.d"
    if drop_ins.is_dir():
        for entry in sorted(drop_ins.iterdir()):
            if entry.is_dir():
                files += conf_files(entry)
            elif entry.suffix == ".conf" and entry.is_file():
                files.append(entry)
    return files


def read_conf(directory: Path, *, label: str | None = None) -> tuple[int | None, list[str]]:
    """The ``SourceDateEpoch`` of the configuration in ``directory`` and its problems (one line each)."""
    label = label or str(directory)
    if not (directory / "mkosi.conf").is_file():
        return None, [f"{label} has no mkosi.conf"]
    problems: list[str] = []
    for name in LOCAL_OVERRIDES:
        if (directory / name).exists():
            problems.append(f"{label}/{name} holds machine-local overrides; a reproducible build reads only the "
                            "committed configuration: remove it")
    wanted = {"Format": "Output", "SourceDateEpoch": "Content"}
    last: dict[str, tuple[str, str]] = {}
    for path in conf_files(directory):
        where = f"{label}/{path.relative_to(directory).as_posix()}"
        try:
            entries = list(parse_ini(path.read_text(encoding="utf-8")))
        except (MkosiError, UnicodeDecodeError) as exc:
            problems.append(f"{where}: {exc}")
            continue
        conditional = {s for s, _, _ in entries} & set(CONDITIONAL_SECTIONS)
        for section, setting, value in entries:
            if setting not in wanted:
                continue
            if section != wanted[setting]:
                problems.append(f"{where}: {setting}= is in [{section}]; mkosi {MKOSI_VERSION} reads it from "
                                f"[{wanted[setting]}]")
            elif conditional:
                problems.append(f"{where}: sets {setting}= in a file with [{sorted(conditional)[0]}]; set it "
                                "unconditionally, so every build of this directory uses it")
            else:
                last[setting] = (value, where)
    fmt, fmt_where = last.get("Format", ("", f"{label}/mkosi.conf"))
    if fmt != "tar":
        got = f"Format={fmt}" if fmt else "no Format= (mkosi builds a disk image by default)"
        problems.append(f"{fmt_where}: {got}; a container image is built from Format=tar in [Output]")
    epoch, epoch_where = last.get("SourceDateEpoch", ("", f"{label}/mkosi.conf"))
    source_date_epoch = None
    if not epoch:
        problems.append(f"{epoch_where}: no SourceDateEpoch= in [Content]; without it the build stamps the "
                        "current time into the image and is not reproducible")
    elif not epoch.isdigit():
        problems.append(f"{epoch_where}: SourceDateEpoch={epoch} is not a non-negative integer")
    else:
        source_date_epoch = int(epoch)
    return (source_date_epoch if not problems else None), problems


# ---- input hash ---------------------------------------------------------------------------------------------

def tree_digest(directory: Path) -> str:
    """Every entry under ``directory`` except mkosi's state directories: files (content and the
    executable bit: mkosi runs its scripts), symbolic links (their target) and directories (an
    empty one in ``mkosi.extra`` is part of the image)."""
    digest = hashlib.sha256()
    entries: list[tuple[str, bytes]] = []
    if directory.is_dir():
        for top, dirs, files in os.walk(directory, followlinks=False):
            here = Path(top)
            if here == directory:
                dirs[:] = [d for d in dirs if d not in MKOSI_STATE_DIRS]
            for name in dirs + files:
                path = here / name
                rel = path.relative_to(directory).as_posix()
                info = path.lstat()
                if stat.S_ISLNK(info.st_mode):
                    entries.append((rel, b"l" + os.readlink(path).encode("utf-8", "surrogateescape")))
                elif stat.S_ISDIR(info.st_mode):
                    entries.append((rel, b"d"))
                elif stat.S_ISREG(info.st_mode):
                    kind = b"x" if info.st_mode & 0o111 else b"f"
                    entries.append((rel, kind + hashlib.sha256(path.read_bytes()).digest()))
    for rel, value in sorted(entries):
        digest.update(rel.encode("utf-8", "surrogateescape") + b"\0" + value + b"\0")
    return digest.hexdigest()


def input_hash(root: Path, key: str, settings: Any) -> str:
    """What the lock keys an mkosi container by: the configuration directory's files, the image
    settings, the pinned mkosi and the layout format (like ``fleet.apps.docker_build_hash``)."""
    build = settings if isinstance(settings, MkosiBuild) else MkosiBuild.from_settings(settings)
    document = {"key": key, "builder": "mkosi", "mkosi": MKOSI_VERSION, "layout": ocilayout.LAYOUT_VERSION,
                "settings": build.canonical(), "files": tree_digest(root / build.directory)}
    return hashlib.sha256(ocilayout.canonical(document)).hexdigest()


def image_tag(input_hash_value: str) -> str:
    return input_hash_value[:TAG_LENGTH]


def source_text(build: MkosiBuild, input_hash_value: str) -> str:
    return f"images stack mkosi {MKOSI_VERSION} build of {build.directory} (input hash {input_hash_value})"


# ---- the step -----------------------------------------------------------------------------------------------

def _assign(name: str, value: object) -> str:
    return f"readonly {name}={shlex.quote(str(value))}"


STEP_BODY = r'''
log() { printf '[dstack-fleet mkosi %s] %s\n' "$KEY" "$*" >&2; }
die() { log "error: $*"; exit 1; }

work=$(mktemp -d "${TMPDIR:-/var/tmp}/dstack-fleet-mkosi.XXXXXX")
trap 'rm -rf -- "$work"' EXIT
case "$work" in
  /*) ;;
  *) work="$PWD/$work" ;;
esac
case "$work" in
  *:*) die "work directory $work holds a ':', which skopeo's oci: reference cannot carry; set TMPDIR" ;;
esac

check_settings() {
  if [ ! -d "$MKOSI_DIR" ]; then
    die "$MKOSI_DIR: no such directory (the step runs from the project root)"
  fi
  if ! source_date_epoch=$("$PYTHON" -m fleet.mkosibuild check-conf -- "$MKOSI_DIR"); then
    die "$MKOSI_DIR: the configuration is not reproducible; nothing is built"
  fi
}

check_tools() {
  local version
  if ! command -v mkosi >/dev/null 2>&1; then
    die "mkosi is not installed; this build is pinned to mkosi $MKOSI_VERSION: $MKOSI_INSTALL"
  fi
  version=$(mkosi --version 2>&1) || die "mkosi --version failed: $version"
  if [ "$version" != "mkosi $MKOSI_VERSION" ]; then
    die "mkosi --version says '$version', but this build is pinned to mkosi $MKOSI_VERSION: $MKOSI_INSTALL"
  fi
  if ! command -v skopeo >/dev/null 2>&1; then
    die "skopeo is not installed; it pushes the image"
  fi
}

build_once() {  # NAME: one mkosi build into $work/NAME
  local out="$work/$1"
  mkdir -p -- "$out"
  log "mkosi build $1 of $MKOSI_DIR"
  mkosi --directory="$MKOSI_DIR" --output-directory="$out" --output="$OUTPUT_NAME" --compress-output=no \
    --incremental=no --wipe-build-dir build >&2
  if [ ! -f "$out/$OUTPUT_NAME.tar" ]; then
    die "mkosi build $1 produced no $OUTPUT_NAME.tar (is Format=tar overridden somewhere?)"
  fi
}

compare_builds() {
  local a="$work/a/$OUTPUT_NAME.tar" b="$work/b/$OUTPUT_NAME.tar" sha_a sha_b
  sha_a=$(sha256sum -- "$a" | cut -d' ' -f1)
  sha_b=$(sha256sum -- "$b" | cut -d' ' -f1)
  if ! cmp -s -- "$a" "$b"; then
    die "the two mkosi builds differ ($sha_a vs $sha_b): the image is not reproducible; nothing is published"
  fi
  log "both builds are byte-identical: $OUTPUT_NAME.tar sha256 $sha_a"
}

make_layout() {
  local digests
  "$PYTHON" -m fleet.ocilayout --rootfs-tar "$work/a/$OUTPUT_NAME.tar" --out "$work/layout" --tag "$TAG" \
    --source-date-epoch "$source_date_epoch" "${LAYOUT_ARGS[@]}" > "$work/layout.json"
  digests=$("$PYTHON" -m fleet.mkosibuild read-layout "$work/layout.json")
  read -r manifest_digest image_id <<< "$digests"
  log "OCI layout: manifest $manifest_digest, image id $image_id"
}

resolve_existing() {  # the tag names the input hash and cannot be moved: if it exists, it is the build
  local existing
  printf '%s\n' "$SKOPEO_POLICY" > "$work/policy.json"
  if ! existing=$(skopeo --policy "$work/policy.json" inspect --no-tags --format '{{.Digest}}' \
      "docker://$REPOSITORY:$TAG" 2> "$work/inspect.err"); then
    log "$REPOSITORY:$TAG does not exist yet; building it"
    return 1
  fi
  log "$REPOSITORY:$TAG already exists (tags are immutable): $existing; nothing is built or pushed again"
  "$PYTHON" -m fleet.mkosibuild lock-line --repository="$REPOSITORY" --digest="$existing" \
    --source="$SOURCE; an existing immutable tag, resolved to its digest"
}

push() {
  local pushed
  printf '%s\n' "$SKOPEO_POLICY" > "$work/policy.json"
  log "pushing $REPOSITORY:$TAG"
  skopeo --policy "$work/policy.json" copy --preserve-digests --retry-times 3 --digestfile "$work/pushed-digest" \
    "oci:$work/layout:$TAG" "docker://$REPOSITORY:$TAG" >&2
  pushed=$(cat -- "$work/pushed-digest")
  if [ "$pushed" != "$manifest_digest" ]; then
    die "the registry reports $pushed for $REPOSITORY:$TAG, but the layout's manifest is" \
      "$manifest_digest; no lock entry"
  fi
  "$PYTHON" -m fleet.mkosibuild lock-line --repository="$REPOSITORY" --digest="$pushed" \
    --source="$SOURCE; image id $image_id"
}

log "building $MKOSI_DIR as $REPOSITORY:$TAG (input hash $INPUT_HASH)"
check_settings
check_tools
if resolve_existing; then
  exit 0
fi
build_once a
build_once b
compare_builds
make_layout
push
'''


def step_script(build: MkosiBuild, *, key: str, input_hash: str, repository: str) -> str:
    """The bash step that builds, checks, pushes and prints the lock entry of one mkosi container.

    Every value is assigned once at the top with ``shlex.quote`` and only used as ``"$VARIABLE"``,
    so no path, argument or environment value can become a command."""
    if not _HEX64.fullmatch(input_hash):
        raise MkosiError(f"input hash {input_hash!r} is not 64 lowercase hex digits")
    if not _REPOSITORY.fullmatch(repository) or "@" in repository:
        raise MkosiError(f"repository {repository!r} is not a registry path without tag or digest")
    build.image_settings().document()  # refuse what the layout step would refuse, now
    header = [
        "#!/bin/bash",
        "# shellcheck disable=SC2016 # the values are literal data, single-quoted on purpose",
        "set -euo pipefail",
        f"{STEP_MARK}{STEP}",
        f"# Container image {key!r} built with mkosi {MKOSI_VERSION}, input hash {input_hash}.",
        "# Generated by fleet/mkosibuild.py: every value is assigned once below, quoted, and only ever",
        "# used as \"$VARIABLE\". Runs from the project root.",
        "export TZ=UTC",
        _assign("KEY", key),
        _assign("INPUT_HASH", input_hash),
        _assign("MKOSI_DIR", build.directory),
        _assign("REPOSITORY", repository),
        _assign("TAG", image_tag(input_hash)),
        _assign("MKOSI_VERSION", MKOSI_VERSION),
        _assign("MKOSI_INSTALL", MKOSI_INSTALL),
        _assign("OUTPUT_NAME", OUTPUT_NAME),
        _assign("PYTHON", PYTHON),
        _assign("SOURCE", source_text(build, input_hash)),
        _assign("SKOPEO_POLICY", json.dumps(SKOPEO_POLICY, sort_keys=True, separators=(",", ":"))),
        f"readonly LAYOUT_ARGS=({' '.join(shlex.quote(a) for a in build.layout_args())})",
    ]
    return "\n".join(header) + "\n" + STEP_BODY


# ---- the step's output --------------------------------------------------------------------------------------

def lock_entry(image: str, digest: str, source: str) -> dict[str, str]:
    if not _DIGEST.fullmatch(digest):
        raise MkosiError(f"{digest!r} is not a sha256:<64 hex> digest")
    if not _REPOSITORY.fullmatch(image) or "@" in image:
        raise MkosiError(f"{image!r} is not a repository")
    return {"image": image, "digest": digest, "digest_kind": "manifest", "source": source}


def parse_step_stdout(stdout: str) -> dict[str, str]:
    """The lock entry (``images.lock.json`` ``containers`` value) the step printed as its last line."""
    from fleet.images.lock import ContainerEntry  # the only import beyond the standard library
    from pydantic import ValidationError

    lines = [line for line in stdout.splitlines() if line.strip()]
    if not lines:
        raise MkosiError("the mkosi build step printed nothing; it prints its lock entry last")
    try:
        entry = ContainerEntry.model_validate(json.loads(lines[-1]))
    except (json.JSONDecodeError, ValidationError) as exc:
        first = str(exc).splitlines()[0]
        raise MkosiError(f"the mkosi build step's last line is not a lock entry ({first}): {lines[-1][:200]}") from None
    return entry.model_dump(mode="json")


def step_values(ctx, names: tuple[str, ...] = ("REPOSITORY", "SOURCE")) -> dict[str, str]:
    """The single-word ``readonly NAME=value`` assignments of a build step's command (``create``)."""
    values: dict[str, str] = {}
    for line in str(ctx.inputs.get("create") or "").splitlines():
        name, _, value = line[len("readonly "):].partition("=")
        if line.startswith("readonly ") and name in names:
            try:
                values[name] = shlex.split(value)[0]
            except (ValueError, IndexError):
                pass
    return values


def offline_step_stdout(ctx) -> str:
    """Offline stand-in for the step's stdout (``fleet.offline.COMMAND_STEPS``): a lock entry of the
    real shape whose digests are fake, derived from the step's URN."""
    values = step_values(ctx)
    image = values.get("REPOSITORY") or f"offline.invalid/{ctx.name}"
    source = values.get("SOURCE") or f"images stack mkosi {MKOSI_VERSION} build"
    entry = lock_entry(image, f"sha256:{ctx.digest('mkosi-manifest')}",
                       f"{source}; image id sha256:{ctx.digest('mkosi-image-id')}")
    return json.dumps(entry, sort_keys=True) + "\n"


# ---- command line (used by the step) ------------------------------------------------------------------------

def _fail(message: str) -> int:
    print(f"fleet.mkosibuild: error: {message}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fleet.mkosibuild",
                                     description="Helpers of the generated mkosi build step.")
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check-conf", help="check an mkosi configuration; print its SourceDateEpoch")
    check.add_argument("directory", type=Path)
    read = commands.add_parser("read-layout", help="print the manifest digest and image ID of ocilayout's JSON")
    read.add_argument("file", type=Path)
    line = commands.add_parser("lock-line", help="print the lock entry as one JSON line")
    line.add_argument("--repository", required=True)
    line.add_argument("--digest", required=True)
    line.add_argument("--source", required=True)
    args = parser.parse_args(argv)
    if args.command == "check-conf":
        epoch, problems = read_conf(args.directory)
        for problem in problems:
            print(f"fleet.mkosibuild: error: {problem}", file=sys.stderr)
        if problems or epoch is None:
            return 1
        print(epoch)
        return 0
    if args.command == "read-layout":
        try:
            data = json.loads(args.file.read_text(encoding="utf-8"))
            manifest, image_id = data["manifest_digest"], data["image_id"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return _fail(f"{args.file}: not the output of python -m fleet.ocilayout ({exc})")
        if not (isinstance(manifest, str) and _DIGEST.fullmatch(manifest)
                and isinstance(image_id, str) and _DIGEST.fullmatch(image_id)):
            return _fail(f"{args.file}: digests {manifest!r} and {image_id!r} are not sha256:<64 hex>")
        print(manifest, image_id)
        return 0
    try:
        entry = lock_entry(args.repository, args.digest, args.source)
    except MkosiError as exc:
        return _fail(str(exc))
    print(json.dumps(entry, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
