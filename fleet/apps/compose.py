"""docker-compose text and dstack app-compose.json bytes, both measured into RTMR3 (compose-hash).

A compose file comes in one of two ways: a user's text, validated and kept verbatim (never
re-serialized), or generated from typed service specs by a YAML emitter with pinned settings whose
output is fixed by golden files. app-compose.json is built for a targeted dstack release with
exactly the fields that release's ``vmm-cli.py compose`` writes, serialized the way vmm-cli does or
in dstack's normalized form. Helpers for the NEAR MPC launcher, kettle and their measured settings
sit on top.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import PurePosixPath
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

import tomli_w
import yaml

from fleet.apps.imageref import DigestKind, ImageDigest, ImageRef, parse_image_ref, unpinned_reason
from fleet.attest.measure import app_id_from_compose_hash, compose_hash
from fleet.config.problems import Problem

ProblemEntry = tuple[str, str]


class ComposeError(ValueError):
    """Every problem found in one compose or app-compose input, each as ``(path, message)``."""

    def __init__(self, problems: Sequence[ProblemEntry]):
        self.problems: list[ProblemEntry] = list(problems)
        super().__init__("\n".join(f"{path}: {message}" if path else message for path, message in self.problems))

    def as_problems(self, source: str = "", prefix: str = "") -> list[Problem]:
        """The same problems as config ``Problem`` lines, their paths under ``prefix``."""
        return [Problem(source, ".".join(p for p in (prefix, path) if p), message) for path, message in self.problems]


def _raise_if(problems: list[ProblemEntry]) -> None:
    if problems:
        raise ComposeError(problems)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path and key else path or key


# -- a user's compose text, verbatim ---------------------------------------------------------------

class _ComposeLoader(yaml.SafeLoader):
    """PyYAML's safe loader, but a key repeated in one mapping is recorded instead of silently
    overwriting the first: docker compose (go-yaml) rejects such files, and a check must never see
    a different value than the runtime does."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self.duplicate_keys: list[tuple[str, int]] = []

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else id(key_node)
            if key in seen:
                self.duplicate_keys.append((str(key), key_node.start_mark.line + 1))
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_ComposeLoader.add_constructor("tag:yaml.org,2002:map", _ComposeLoader.construct_mapping)


@dataclass(frozen=True)
class ComposeFile:
    """A validated compose text. ``text`` is what gets measured; ``document`` is only for reading."""

    text: str
    document: Mapping[str, Any]
    images: tuple[tuple[str, ImageRef], ...]

    @property
    def services(self) -> Mapping[str, Mapping[str, Any]]:
        return self.document["services"]

    def environment(self, service: str) -> dict[str, str | None]:
        """The service's ``environment`` as compose reads it: list entries ``KEY=value`` (``KEY``
        alone passes the variable through, shown as None) or a mapping; scalars as compose turns
        them into strings."""
        raw = self.services[service].get("environment") or {}
        result: dict[str, str | None] = {}
        if isinstance(raw, Mapping):
            for key, value in raw.items():
                result[str(key)] = _compose_scalar(value)
        else:
            for entry in raw:
                key, equals, value = str(entry).partition("=")
                result[key] = value if equals else None
        return result


def _compose_scalar(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def parse_compose(text: str) -> ComposeFile:
    """Validate a user's docker-compose text; raise ``ComposeError`` with every problem.

    Each service needs an ``image`` pinned by ``@sha256:<64 hex>`` and written literally;
    ``build:`` is refused because dstack runs ``docker compose up --build`` inside the CVM, which
    would build from sources the compose hash does not cover; ``include:`` and ``extends.file``
    are refused because they load files that are not part of the measured text.
    """
    if not isinstance(text, str):
        raise ComposeError([("", f"the compose file must be text, got {type(text).__name__}")])
    loader: _ComposeLoader | None = None
    try:
        loader = _ComposeLoader(text)
        document = loader.get_single_data()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = " ".join(str(getattr(exc, "problem", None) or exc).split())  # one line, whatever the kind
        raise ComposeError([("", f"not valid YAML{where}: {problem}; fix it")]) from None
    finally:
        if loader is not None:
            loader.dispose()

    problems: list[ProblemEntry] = [
        ("", f"key {key!r} appears twice in one mapping (line {line}); docker compose refuses duplicate keys, "
             "keep one") for key, line in loader.duplicate_keys
    ]
    if not isinstance(document, Mapping):
        raise ComposeError(problems + [("", "a compose file must be a mapping with a `services:` key")])
    if "include" in document:
        problems.append(("include", "loads other compose files, which are not part of the measured text; "
                                    "inline their services"))
    services = document.get("services")
    if not isinstance(services, Mapping) or not services:
        problems.append(("services", "missing or empty; declare at least one service"))
        raise ComposeError(problems)

    images: list[tuple[str, ImageRef]] = []
    for name, service in services.items():
        path = f"services.{name}"
        if not isinstance(service, Mapping):
            problems.append((path, "must be a mapping of service settings"))
            continue
        if "build" in service:
            problems.append((f"{path}.build", "dstack runs `docker compose up --build` inside the CVM, so the image "
                                              "would be built there from unmeasured sources; build and push it, "
                                              "then use `image: name@sha256:<64 hex>`"))
        extends = service.get("extends")
        if isinstance(extends, Mapping) and "file" in extends:
            problems.append((f"{path}.extends.file", "loads another file, which is not part of the measured text; "
                                                     "inline the settings"))
        if "image" not in service:
            if "build" not in service:
                problems.append((f"{path}.image", "missing; every service needs `image: name@sha256:<64 hex>`"))
            continue
        image = service["image"]
        if not isinstance(image, str):
            problems.append((f"{path}.image", f"must be a string, got {type(image).__name__}"))
            continue
        reason = unpinned_reason(image)
        if reason:
            problems.append((f"{path}.image", f"{image!r} {reason}"))
            continue
        images.append((f"{path}.image", parse_image_ref(image)))
    _raise_if(problems)
    return ComposeFile(text, document, tuple(images))


# -- the pinned YAML emitter -----------------------------------------------------------------------

YAML_EMITTER = {
    "library": "PyYAML",
    "version": yaml.__version__,
    "dumper": "fleet.compose.ComposeDumper (yaml.SafeDumper, indented block sequences, no aliases)",
    "sort_keys": False,
    "default_flow_style": False,
    "allow_unicode": True,
    "width": 2**31 - 1,
    "indent": 2,
    "line_break": "\n",
    "quoting": "plain only for [A-Za-z0-9_/][A-Za-z0-9_./@=+:-]* not ending in ':' and read as a string by both "
               "YAML 1.1 and 1.2; everything else double-quoted",
}

_PLAIN_SAFE = re.compile(r"[A-Za-z0-9_/][A-Za-z0-9_./@=+:-]*(?<!:)")
# Plain scalars YAML 1.2's core schema (go-yaml, which docker compose uses) or YAML 1.1 (PyYAML,
# go-yaml v2) read as something other than a string. PyYAML's own resolver covers most of 1.1;
# it reads y/n as strings although the 1.1 spec makes them booleans.
_NOT_A_STRING = re.compile(
    r"""(?x)
      null|Null|NULL|~
    | [yY]|[nN]|yes|Yes|YES|no|No|NO|true|True|TRUE|false|False|FALSE|on|On|ON|off|Off|OFF
    | [-+]?[0-9]+ | 0o[0-7]+ | 0x[0-9a-fA-F]+
    | [-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?
    | [-+]?\.(?:inf|Inf|INF) | \.(?:nan|NaN|NAN)
    # numbers with colons or underscores: YAML 1.1 reads 22:22 as base 60 (1342); port mappings
    # such as 3000:3000 are quoted for the same reason, as compose's documentation advises
    | [-+]?[0-9][0-9_.:]*
    """
)
_YAML11_RESOLVER = yaml.resolver.Resolver()


def _plain_is_safe(value: str) -> bool:
    return (
        _PLAIN_SAFE.fullmatch(value) is not None
        and _NOT_A_STRING.fullmatch(value) is None
        and _YAML11_RESOLVER.resolve(yaml.ScalarNode, value, (True, False)) == "tag:yaml.org,2002:str"
    )


class ComposeDumper(yaml.SafeDumper):
    """Block sequences indented under their key (``ports:\\n  - "80:80"``), never anchors/aliases,
    and strings quoted by ``_plain_is_safe`` rather than by the emitter's own guess."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        return super().increase_indent(flow, False)

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=None if _plain_is_safe(value) else '"')


ComposeDumper.add_representer(str, _represent_str)


def dump_yaml(document: Any) -> str:
    """YAML text of ``document`` (dicts, lists, str, bool, int) with the pinned emitter settings."""
    return yaml.dump(
        document,
        Dumper=ComposeDumper,
        sort_keys=YAML_EMITTER["sort_keys"],
        default_flow_style=YAML_EMITTER["default_flow_style"],
        allow_unicode=YAML_EMITTER["allow_unicode"],
        width=YAML_EMITTER["width"],
        indent=YAML_EMITTER["indent"],
        line_break=YAML_EMITTER["line_break"],
    )


# -- compose generated from typed specs -------------------------------------------------------------

_SERVICE_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]*")
_CONTAINER_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]+")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")
_RESTART = re.compile(r"no|always|unless-stopped|on-failure(?::[0-9]+)?")


@dataclass(frozen=True)
class ServiceSpec:
    """One service of a generated compose file. Sequences keep their order; ``environment`` is
    either a mapping (emitted as a mapping) or a list of ``KEY=value``/``KEY`` entries (emitted as a
    list). Docker compose interpolates ``$VAR``/``${VAR}`` in every value from the CVM's
    environment (dstack's encrypted env); write ``$$`` for a literal dollar."""

    name: str
    image: ImageRef
    container_name: str | None = None
    command: Sequence[str] | None = None
    entrypoint: Sequence[str] | None = None
    working_dir: str | None = None
    user: str | None = None
    environment: Mapping[str, str] | Sequence[str] = ()
    ports: Sequence[str] = ()
    volumes: Sequence[str] = ()
    tmpfs: Sequence[str] = ()
    security_opt: Sequence[str] = ()
    read_only: bool | None = None
    restart: str | None = None

    def __post_init__(self) -> None:
        for name in ("command", "entrypoint", "ports", "volumes", "tmpfs", "security_opt"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, bytes)):
                object.__setattr__(self, name, tuple(value))
        if isinstance(self.environment, Mapping):
            object.__setattr__(self, "environment", MappingProxyType(dict(self.environment)))
        elif not isinstance(self.environment, (str, bytes)):
            object.__setattr__(self, "environment", tuple(self.environment))


@dataclass(frozen=True)
class NamedVolume:
    """A top-level named volume; ``name`` fixes the docker volume name (else compose prefixes it)."""

    key: str
    name: str | None = None


@dataclass(frozen=True)
class ComposeSpec:
    services: tuple[ServiceSpec, ...]
    volumes: tuple[NamedVolume, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "services", tuple(self.services))
        object.__setattr__(self, "volumes", tuple(self.volumes))


def _text_problem(value: Any, *, allow_newlines: bool = True) -> str | None:
    if not isinstance(value, str):
        return f"must be a string, got {type(value).__name__}"
    if "\x00" in value:
        return "contains a NUL character, which no environment variable, argument or path can hold"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid Unicode text (lone surrogate)"
    if not allow_newlines and ("\n" in value or "\r" in value):
        return "contains a line break"
    return None


def _service_problems(service: ServiceSpec, volume_keys: set[str]) -> list[ProblemEntry]:
    path = f"services.{service.name}"
    problems: list[ProblemEntry] = []

    def check_text(where: str, value: Any, *, allow_newlines: bool = True, empty_ok: bool = True) -> None:
        problem = _text_problem(value, allow_newlines=allow_newlines)
        if problem is None and not empty_ok and not value:
            problem = "is empty"
        if problem:
            problems.append((where, problem))

    if not isinstance(service.image, ImageRef):
        problems.append((f"{path}.image", f"must be an ImageRef, got {type(service.image).__name__}"))
    elif service.image.unpinned_reason:
        problems.append((f"{path}.image", f"{service.image} {service.image.unpinned_reason}"))
    if service.container_name is not None and not _CONTAINER_NAME.fullmatch(str(service.container_name)):
        problems.append((f"{path}.container_name", f"{service.container_name!r} is not a container name "
                                                   "([a-zA-Z0-9][a-zA-Z0-9_.-]+)"))
    if service.restart is not None and not _RESTART.fullmatch(str(service.restart)):
        problems.append((f"{path}.restart", f"{service.restart!r} is not one of no, always, unless-stopped, "
                                            "on-failure[:N]"))
    if service.read_only is not None and not isinstance(service.read_only, bool):
        problems.append((f"{path}.read_only", "must be true or false"))
    for name in ("working_dir", "user"):
        value = getattr(service, name)
        if value is not None:
            check_text(f"{path}.{name}", value, allow_newlines=False, empty_ok=False)
    for name in ("command", "entrypoint"):
        value = getattr(service, name)
        if value is None:
            continue
        if isinstance(value, (str, bytes)):
            problems.append((f"{path}.{name}", "give a list of arguments (exec form); a single string is split "
                                               "by compose's own rules"))
            continue
        for index, arg in enumerate(value):
            check_text(f"{path}.{name}[{index}]", arg)
    for name in ("ports", "volumes", "tmpfs", "security_opt"):
        value = getattr(service, name)
        if isinstance(value, (str, bytes)):
            problems.append((f"{path}.{name}", "give a list of entries, not a single string"))
            continue
        for index, entry in enumerate(value):
            check_text(f"{path}.{name}[{index}]", entry, allow_newlines=False, empty_ok=False)
    for index, entry in enumerate(() if isinstance(service.volumes, (str, bytes)) else service.volumes):
        source = entry.split(":", 1)[0] if isinstance(entry, str) and ":" in entry else None
        if source and not source.startswith(("/", ".", "~", "$")) and source not in volume_keys:
            problems.append((f"{path}.volumes[{index}]", f"named volume {source!r} is not declared; add "
                                                         f"NamedVolume({source!r}) to the compose spec"))
    environment = service.environment
    if isinstance(environment, Mapping):
        for key, value in environment.items():
            if not isinstance(key, str) or not _ENV_NAME.fullmatch(key):
                problems.append((f"{path}.environment", f"{key!r} is not a variable name ([A-Za-z_][A-Za-z0-9_.-]*)"))
            check_text(f"{path}.environment.{key}", value)
    elif isinstance(environment, (str, bytes)):
        problems.append((f"{path}.environment", "give a mapping or a list of KEY=value entries"))
    else:
        seen: set[str] = set()
        for index, entry in enumerate(environment):
            where = f"{path}.environment[{index}]"
            problem = _text_problem(entry)
            if problem:
                problems.append((where, problem))
                continue
            key = entry.partition("=")[0]
            if not _ENV_NAME.fullmatch(key):
                problems.append((where, f"{key!r} is not a variable name ([A-Za-z_][A-Za-z0-9_.-]*)"))
            elif key in seen:
                problems.append((where, f"{key} is set twice; keep one"))
            seen.add(key)
    return problems


def compose_document(spec: ComposeSpec) -> dict[str, Any]:
    """The compose document of ``spec`` as plain data, keys in the order they are emitted."""
    problems: list[ProblemEntry] = []
    if not spec.services:
        problems.append(("services", "declare at least one service"))
    volume_keys: set[str] = set()
    for index, volume in enumerate(spec.volumes):
        if not _SERVICE_NAME.fullmatch(str(volume.key)):
            problems.append((f"volumes[{index}]", f"{volume.key!r} is not a volume name ([a-zA-Z0-9][a-zA-Z0-9_.-]*)"))
        elif volume.key in volume_keys:
            problems.append((f"volumes.{volume.key}", "declared twice"))
        if volume.name is not None:
            problem = _text_problem(volume.name, allow_newlines=False)
            if problem:
                problems.append((f"volumes.{volume.key}.name", problem))
        volume_keys.add(volume.key)
    names: set[str] = set()
    for index, service in enumerate(spec.services):
        if not isinstance(service.name, str) or not _SERVICE_NAME.fullmatch(service.name):
            problems.append((f"services[{index}]", f"{service.name!r} is not a service name "
                                                   "([a-zA-Z0-9][a-zA-Z0-9_.-]*)"))
            continue
        if service.name in names:
            problems.append((f"services.{service.name}", "declared twice"))
        names.add(service.name)
        problems.extend(_service_problems(service, volume_keys))
    _raise_if(problems)

    document: dict[str, Any] = {"services": {s.name: _service_document(s) for s in spec.services}}
    if spec.volumes:
        document["volumes"] = {v.key: ({"name": v.name} if v.name is not None else {}) for v in spec.volumes}
    return document


def _service_document(service: ServiceSpec) -> dict[str, Any]:
    document: dict[str, Any] = {"image": str(service.image)}
    optional: list[tuple[str, Any]] = [
        ("container_name", service.container_name),
        ("command", list(service.command) if service.command is not None else None),
        ("entrypoint", list(service.entrypoint) if service.entrypoint is not None else None),
        ("working_dir", service.working_dir),
        ("user", service.user),
        ("environment", dict(service.environment) if isinstance(service.environment, Mapping)
         else list(service.environment) or None),
        ("ports", list(service.ports) or None),
        ("volumes", list(service.volumes) or None),
        ("tmpfs", list(service.tmpfs) or None),
        ("security_opt", list(service.security_opt) or None),
        ("read_only", service.read_only),
        ("restart", service.restart),
    ]
    for key, value in optional:
        if value is not None and value != {}:
            document[key] = value
    return document


def render_compose(spec: ComposeSpec) -> str:
    """The compose text of ``spec``, byte-stable for a given PyYAML emitter (see ``YAML_EMITTER``)."""
    return dump_yaml(compose_document(spec))


# -- app-compose.json ------------------------------------------------------------------------------

# Releases whose vmm/src/vmm-cli.py `create_app_compose` was read (Dstack-TEE/dstack tags); the
# fields each writes are encoded in `app_compose_fields`. vmm-cli.py first appears at v0.4.2.
KNOWN_DSTACK_RELEASES = (
    "0.4.2", "0.5.0", "0.5.1", "0.5.2", "0.5.3", "0.5.4", "0.5.5", "0.5.6", "0.5.7", "0.5.8", "0.5.9",
    "0.5.10", "0.5.11",
)
# dstack OS releases (Dstack-TEE/meta-dstack tags) that build an untagged dstack commit, with the
# vmm-cli.py of that commit. 0.6.0.a2 (meta-dstack 86be7d60252f82ff1c9c8ac2a083d0a2e08c7a9e) pins
# Dstack-TEE/dstack f1ba0a22a961e8bdae110c7b1a796bc56dfd10a8, whose vmm/src/vmm-cli.py differs from
# v0.5.11 only in `compose --key-provider` accepting "tpm": the same fields in the same order.
DSTACK_OS_COMPOSE_RELEASES = ("0.6.0.a2",)
_ALL_RELEASES = KNOWN_DSTACK_RELEASES + DSTACK_OS_COMPOSE_RELEASES
_TPM_SINCE = (0, 6, 0)  # vmm-cli's --key-provider tpm: the 0.6.0.a2 pre-release on
MIB = 1024 * 1024


class KeyProvider(str, Enum):
    """Where the CVM's keys come from. ``local`` is dstack's local-sgx provider (needs SGX on the
    host, so not on GCP); ``kms`` is dstack-kms, and the app-id then comes from the KMS, not from
    the compose hash; ``tpm`` (dstack OS 0.6.0.a2) seals the key seed in the vTPM, and the guest
    only recognizes it from an explicit ``key_provider`` field."""

    NONE = "none"
    LOCAL = "local"
    KMS = "kms"
    TPM = "tpm"


class Serialization(str, Enum):
    """How the app-compose object becomes bytes. The VMM stores the bytes it is given unchanged
    (vmm/src/app.rs ``prepare_work_dir`` writes ``req.compose_file``) and the guest hashes them as
    they are, so the serialization decides the compose-hash.

    ``vmm-cli``: what ``vmm-cli.py compose`` writes: ``json.dumps(obj, indent=4,
    ensure_ascii=False)`` in insertion order, no trailing newline (``ensure_ascii`` left at its
    default True before 0.5.2). ``normalized``: dstack's normalized form (sorted keys, compact,
    UTF-8), which the SDKs' ``get_compose_hash`` hash.
    """

    VMM_CLI = "vmm-cli"
    NORMALIZED = "normalized"


@dataclass(frozen=True)
class AppComposeSettings:
    """The app settings that go into app-compose.json. ``None`` means the field stays absent (the
    guest then uses its default); ``pre_launch_script``/``init_script`` are bash text, measured."""

    name: str
    docker_compose_file: str
    key_provider: KeyProvider = KeyProvider.NONE
    key_provider_id: str = ""
    write_key_provider: bool = False
    gateway_enabled: bool = False
    public_logs: bool = False
    public_sysinfo: bool = False
    public_tcbinfo: bool | None = None
    allowed_envs: tuple[str, ...] = ()
    no_instance_id: bool = False
    secure_time: bool = False
    pre_launch_script: str | None = None
    init_script: str | None = None
    storage_fs: str | None = None
    swap_size: int = 0
    runner: str = "docker-compose"

    def __post_init__(self) -> None:
        if isinstance(self.key_provider, str) and not isinstance(self.key_provider, KeyProvider):
            try:
                object.__setattr__(self, "key_provider", KeyProvider(self.key_provider))
            except ValueError:
                pass
        if not isinstance(self.allowed_envs, (str, bytes)):
            object.__setattr__(self, "allowed_envs", tuple(self.allowed_envs))

    @property
    def kms_enabled(self) -> bool:
        return self.key_provider is KeyProvider.KMS

    @property
    def local_key_provider_enabled(self) -> bool:
        return self.key_provider is KeyProvider.LOCAL


_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_HEX = re.compile(r"(?:[0-9a-fA-F]{2})*")


def _release(version: str) -> tuple[int, ...]:
    """``0.5.11`` -> (0, 5, 11); a pre-release such as ``0.6.0.a2`` compares as its release."""
    if version not in _ALL_RELEASES:
        raise ComposeError([("dstack_version", f"{version!r} is not a dstack release whose vmm-cli field set is "
                                               f"known; use one of {', '.join(_ALL_RELEASES)}")])
    return tuple(int(part) for part in version.split(".")[:3])


def _settings_problems(settings: AppComposeSettings) -> list[ProblemEntry]:
    problems: list[ProblemEntry] = []
    name_problem = _text_problem(settings.name, allow_newlines=False)
    if name_problem or not settings.name:
        problems.append(("name", name_problem or "is empty; give each environment its own stable name"))
    if settings.runner != "docker-compose":
        problems.append(("runner", f"{settings.runner!r} is not supported; only docker-compose (vmm-cli writes "
                                   "no other runner)"))
    if not isinstance(settings.key_provider, KeyProvider):
        problems.append(("key_provider", f"{settings.key_provider!r} is not one of none, local, kms, tpm"))
    if settings.key_provider_id:
        if not isinstance(settings.key_provider_id, str) or not _HEX.fullmatch(settings.key_provider_id):
            problems.append(("key_provider_id", "must be hex bytes (the guest decodes it as hex)"))
        elif settings.key_provider is KeyProvider.NONE:
            problems.append(("key_provider_id", "is set but key_provider is none; set the provider or drop the id"))
    if settings.allowed_envs:
        if settings.key_provider is not KeyProvider.KMS:
            problems.append(("allowed_envs", "encrypted environment variables need key_provider kms (the env is "
                                             "encrypted to a KMS-derived key)"))
        seen: set[str] = set()
        for index, key in enumerate(settings.allowed_envs):
            if not isinstance(key, str) or not _ENV_KEY.fullmatch(key):
                problems.append((f"allowed_envs[{index}]", f"{key!r} is not a variable name"))
            elif key in seen:
                problems.append((f"allowed_envs[{index}]", f"{key} is listed twice"))
            seen.add(key)
    for name in ("pre_launch_script", "init_script"):
        script = getattr(settings, name)
        if script is None:
            continue
        problem = _text_problem(script)
        if problem:
            problems.append((name, problem))
        elif not script.strip():
            problems.append((name, "is empty; leave it unset instead"))
        elif script != script.strip():
            problems.append((name, "starts or ends with whitespace; vmm-cli's update-app-compose strips it while "
                                   "compose keeps it, so the two would measure different bytes; strip it"))
    if settings.storage_fs is not None and settings.storage_fs not in ("zfs", "ext4"):
        problems.append(("storage_fs", f"{settings.storage_fs!r} is not zfs or ext4"))
    if not isinstance(settings.swap_size, int) or isinstance(settings.swap_size, bool) or settings.swap_size < 0:
        problems.append(("swap_size", "must be a whole number of bytes, 0 for none"))
    elif settings.swap_size % MIB:
        problems.append(("swap_size", f"{settings.swap_size} bytes is not a whole number of MiB, which is all "
                                      "vmm-cli --swap can write"))
    for name in ("gateway_enabled", "public_logs", "public_sysinfo", "no_instance_id", "secure_time",
                 "write_key_provider"):
        if not isinstance(getattr(settings, name), bool):
            problems.append((name, "must be true or false"))
    if settings.public_tcbinfo is not None and not isinstance(settings.public_tcbinfo, bool):
        problems.append(("public_tcbinfo", "must be true, false or unset"))
    if isinstance(settings.docker_compose_file, str):
        try:
            parse_compose(settings.docker_compose_file)
        except ComposeError as exc:
            problems.extend((_join("docker_compose_file", path), message) for path, message in exc.problems)
    else:
        problems.append(("docker_compose_file", "must be the compose text"))
    return problems


def app_compose_fields(settings: AppComposeSettings, dstack_version: str) -> dict[str, Any]:
    """The app-compose object ``vmm-cli.py compose`` of ``dstack_version`` writes for ``settings``,
    in its insertion order. Read from Dstack-TEE/dstack ``vmm/src/vmm-cli.py`` at each release tag:

    * 0.4.2: manifest_version, name, runner, docker_compose_file, kms_enabled, gateway_enabled,
      local_key_provider_enabled, public_logs, public_sysinfo, allowed_envs, no_instance_id
      (a ``--prelaunch-script`` was written as its *path* under ``prelaunch_script``, which the
      guest never runs, so a pre-launch script needs 0.5.1 or later);
    * 0.5.0: + secure_time, always true;
    * 0.5.1: + key_provider_id after local_key_provider_enabled (null when not given);
      ``pre_launch_script`` holds the script text;
    * 0.5.4: key_provider_id defaults to "", secure_time follows ``--secure-time``;
    * 0.5.5: + swap_size (bytes, only when > 0);
    * 0.5.6 to 0.5.11: + key_provider (only with ``--key-provider``), after secure_time;
    * 0.6.0.a2 (the dstack OS pre-release, dstack commit f1ba0a22): as 0.5.11, and
      ``--key-provider`` also takes ``tpm`` (written only as ``key_provider``).

    Fields the guest reads but vmm-cli never writes (public_tcbinfo since 0.5.1, init_script and
    storage_fs since 0.5.5, per dstack's docs/security/cvm-boundaries.md) are appended in that
    order when set. Raises ``ComposeError`` for a setting the targeted release cannot express.
    """
    version = _release(dstack_version)
    problems = _settings_problems(settings)
    fields: dict[str, Any] = {
        "manifest_version": 2,
        "name": settings.name,
        "runner": settings.runner,
        "docker_compose_file": settings.docker_compose_file,
        "kms_enabled": settings.kms_enabled,
        "gateway_enabled": settings.gateway_enabled,
        "local_key_provider_enabled": settings.local_key_provider_enabled,
    }
    if version >= (0, 5, 1):
        fields["key_provider_id"] = settings.key_provider_id or ("" if version >= (0, 5, 4) else None)
    elif settings.key_provider_id:
        problems.append(("key_provider_id", f"dstack {dstack_version} has no key_provider_id; it needs 0.5.1 or later"))
    fields["public_logs"] = settings.public_logs
    fields["public_sysinfo"] = settings.public_sysinfo
    fields["allowed_envs"] = list(settings.allowed_envs)
    fields["no_instance_id"] = settings.no_instance_id
    if version >= (0, 5, 4):
        fields["secure_time"] = settings.secure_time
    elif version >= (0, 5, 0):
        if not settings.secure_time:
            problems.append(("secure_time", f"vmm-cli {dstack_version} always writes secure_time: true; set it "
                                            "or target 0.5.4 or later"))
        fields["secure_time"] = True
    elif settings.secure_time:
        problems.append(("secure_time", f"dstack {dstack_version} has no secure_time; it needs 0.5.0 or later"))
    if settings.key_provider is KeyProvider.TPM:
        if version < _TPM_SINCE:
            problems.append(("key_provider", f"vmm-cli {dstack_version} has no --key-provider tpm and its guest "
                                             "refuses the tpm provider; it needs 0.6.0.a2 or later"))
        elif not settings.write_key_provider:
            problems.append(("write_key_provider", "key_provider tpm has no *_enabled flag, so the guest would read "
                                                   "no key provider; set write_key_provider"))
    if settings.write_key_provider:
        if version < (0, 5, 6):
            problems.append(("write_key_provider", f"vmm-cli {dstack_version} has no --key-provider; it needs "
                                                   "0.5.6 or later"))
        elif isinstance(settings.key_provider, KeyProvider):
            fields["key_provider"] = settings.key_provider.value
    if settings.pre_launch_script is not None:
        if version < (0, 5, 1):
            problems.append(("pre_launch_script", f"vmm-cli {dstack_version} writes the script's path under "
                                                  "`prelaunch_script`, which the guest never runs; target 0.5.1 "
                                                  "or later"))
        else:
            fields["pre_launch_script"] = settings.pre_launch_script
    if settings.swap_size:
        if version < (0, 5, 5):
            problems.append(("swap_size", f"dstack {dstack_version} has no swap_size; it needs 0.5.5 or later"))
        else:
            fields["swap_size"] = settings.swap_size
    for name, since in (("public_tcbinfo", (0, 5, 1)), ("init_script", (0, 5, 5)), ("storage_fs", (0, 5, 5))):
        value = getattr(settings, name)
        if value is None:
            continue
        if version < since:
            problems.append((name, f"dstack {dstack_version} does not read {name}; it needs "
                                   f"{'.'.join(map(str, since))} or later"))
        else:
            fields[name] = value
    _raise_if(problems)
    return fields


def serialize_app_compose(fields: Mapping[str, Any], serialization: Serialization, dstack_version: str) -> bytes:
    if serialization is Serialization.VMM_CLI:
        ensure_ascii = _release(dstack_version) < (0, 5, 2)
        return json.dumps(fields, indent=4, ensure_ascii=ensure_ascii).encode("utf-8")
    if serialization is Serialization.NORMALIZED:
        return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                          allow_nan=False).encode("utf-8")
    raise ComposeError([("serialization", f"{serialization!r} is not vmm-cli or normalized")])


@dataclass(frozen=True)
class AppCompose:
    """app-compose.json as exact bytes, with what dstack derives from them."""

    data: bytes
    fields: Mapping[str, Any]
    dstack_version: str
    serialization: Serialization
    key_provider: KeyProvider

    @property
    def text(self) -> str:
        return self.data.decode("utf-8")

    @property
    def compose_hash(self) -> str:
        return compose_hash(self.data)

    @property
    def app_id(self) -> str:
        """The app id a guest derives from these bytes when none is deployed: the compose hash's
        first 20 bytes, with or without a KMS (Dstack-TEE/dstack v0.5.11 and f1ba0a22
        dstack-util/src/system_setup.rs ``measure_app_info``; vmm-cli.py's ``--app-id`` default). A
        KMS then derives the app's keys from it; only a pinned id (``.instance_info``) differs."""
        return app_id_from_compose_hash(self.compose_hash)


def build_app_compose(settings: AppComposeSettings, *, dstack_version: str,
                      serialization: Serialization = Serialization.VMM_CLI) -> AppCompose:
    fields = app_compose_fields(settings, dstack_version)
    data = serialize_app_compose(fields, Serialization(serialization), dstack_version)
    return AppCompose(data, MappingProxyType(fields), dstack_version, Serialization(serialization),
                      settings.key_provider)


# -- NEAR MPC launcher -----------------------------------------------------------------------------

class NearLauncher(str, Enum):
    PYTHON = "python"
    RUST = "rust"


@dataclass(frozen=True)
class NearLauncherFacts:
    """What a NEAR MPC launcher implementation compares and reads (near/mpc)."""

    launcher: NearLauncher
    compares: DigestKind
    user_config_format: str
    source: str


NEAR_LAUNCHERS: Mapping[NearLauncher, NearLauncherFacts] = MappingProxyType({
    NearLauncher.PYTHON: NearLauncherFacts(
        NearLauncher.PYTHON, DigestKind.IMAGE_ID, "env",
        "near/mpc tee_launcher/launcher.py (last at 2953484be^): resolves a tag's manifest whose config.digest "
        "equals the expected digest, pulls it, requires `docker image inspect .ID` to match, extends RTMR3 "
        "with that image ID; reads /tapp/user_config as KEY=value lines"),
    NearLauncher.RUST: NearLauncherFacts(
        NearLauncher.RUST, DigestKind.MANIFEST, "toml",
        "near/mpc crates/tee-launcher: pulls and extends RTMR3 with the manifest digest; reads "
        "/tapp/user_config as TOML ([launcher_config], [mpc_node_config])"),
})
NEAR_MEASURED_ENV = ("PLATFORM", "DOCKER_CONTENT_TRUST", "DEFAULT_IMAGE_DIGEST")
NEAR_USER_CONFIG_LAUNCHER_KEYS = (
    "MPC_IMAGE_NAME", "MPC_IMAGE_TAGS", "MPC_REGISTRY", "MPC_HASH_OVERRIDE",
    "RPC_REQUEST_TIMEOUT_SECS", "RPC_REQUEST_INTERVAL_SECS", "RPC_MAX_ATTEMPTS",
)
# Passed to the MPC container by the last Python launcher besides MPC_[A-Z0-9_]{1,64}.
_NEAR_CONTAINER_KEYS = ("NEAR_BOOT_NODES", "RUST_BACKTRACE", "RUST_LOG", "PORTS")
_NEAR_DENIED_KEYS = ("MPC_P2P_PRIVATE_KEY", "MPC_ACCOUNT_SK")
_NEAR_MPC_KEY = re.compile(r"MPC_[A-Z0-9_]{1,64}")
_NEAR_OLD_KEYS = {
    "LAUNCHER_IMAGE_NAME": "MPC_IMAGE_NAME", "LAUNCHER_IMAGE_TAGS": "MPC_IMAGE_TAGS",
    "LAUNCHER_REGISTRY": "MPC_REGISTRY", "ENV_VAR_MPC_HASH_OVERRIDE": "MPC_HASH_OVERRIDE",
}
_NEAR_MAX_VALUE = 1024
_NEAR_MAX_VARS = 64
_NEAR_MAX_TOTAL = 32 * 1024
_SHA256_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


def near_launcher_compose(launcher_image: ImageRef, default_image_digest: ImageDigest, *,
                          launcher: NearLauncher = NearLauncher.PYTHON, platform: str = "TEE",
                          shared_volume_mode: str = "rw") -> ComposeSpec:
    """The NEAR MPC launcher service: docker.sock and dstack.sock mounted, ``/tapp`` read-only,
    the shared volume, read-only root, no-new-privileges, tmpfs /tmp. ``PLATFORM``,
    ``DOCKER_CONTENT_TRUST=1`` and ``DEFAULT_IMAGE_DIGEST`` sit in ``environment`` because only
    that is measured; ``/tapp/user_config`` is host-controlled.

    ``default_image_digest`` must be of the kind ``launcher`` compares. A node that registers with
    NEAR's contract must run the contract's own template rendered byte for byte (the contract
    hashes the compose YAML: near/mpc ``launcher_compose_digest``); pass that text through
    ``parse_compose`` instead. This generator gives the same settings in this project's bytes.
    """
    problems: list[ProblemEntry] = []
    facts = NEAR_LAUNCHERS.get(NearLauncher(launcher))
    if not isinstance(default_image_digest, ImageDigest):
        problems.append(("DEFAULT_IMAGE_DIGEST", "must be an ImageDigest (a sha256 digest and its kind)"))
    elif default_image_digest.kind is not facts.compares:
        problems.append(("DEFAULT_IMAGE_DIGEST", f"the {facts.launcher.value} launcher compares "
                                                 f"{facts.compares.obtained_from}; this is a "
                                                 f"{default_image_digest.kind.value} digest"))
    if platform not in ("TEE", "NONTEE"):
        problems.append(("PLATFORM", f"{platform!r} is not TEE or NONTEE"))
    if shared_volume_mode not in ("ro", "rw"):
        problems.append(("shared_volume_mode", f"{shared_volume_mode!r} is not ro or rw"))
    _raise_if(problems)
    launcher_service = ServiceSpec(
        name="launcher",
        image=launcher_image,
        container_name="launcher",
        environment=(f"PLATFORM={platform}", "DOCKER_CONTENT_TRUST=1", f"DEFAULT_IMAGE_DIGEST={default_image_digest}"),
        volumes=(
            "/var/run/docker.sock:/var/run/docker.sock",
            "/var/run/dstack.sock:/var/run/dstack.sock",
            "/tapp:/tapp:ro",
            f"shared-volume:/mnt/shared:{shared_volume_mode}",
        ),
        security_opt=("no-new-privileges:true",),
        read_only=True,
        tmpfs=("/tmp",),
    )
    spec = ComposeSpec((launcher_service,), (NamedVolume("shared-volume", "shared-volume"),))
    compose_document(spec)  # validates the image now, not at render time
    return spec


def near_user_config(values: Mapping[str, str], *, launcher: NearLauncher = NearLauncher.PYTHON) -> str:
    """The unmeasured ``/tapp/user_config`` text for the Python launcher (the Rust one reads TOML:
    ``NearRustUserConfig``): ``KEY=value`` lines in the
    mapping's order. The launcher strips each line and splits at the first ``=`` without any
    quoting, so a value must be one line without surrounding whitespace; keys it would ignore,
    keys it refuses and settings that must be measured are refused here."""
    facts = NEAR_LAUNCHERS[NearLauncher(launcher)]
    if facts.user_config_format != "env":
        raise ComposeError([("", f"the {facts.launcher.value} launcher reads its user config as "
                                 f"{facts.user_config_format}, not KEY=value lines")])
    problems: list[ProblemEntry] = []
    total = 0
    passed = 0
    for key, value in values.items():
        if key in NEAR_MEASURED_ENV:
            problems.append((key, "must be measured: it belongs in the launcher compose `environment`, not in the "
                                  "host-controlled user config"))
            continue
        if key in _NEAR_OLD_KEYS:
            problems.append((key, f"was renamed; the launcher reads {_NEAR_OLD_KEYS[key]}"))
            continue
        if key in _NEAR_DENIED_KEYS:
            problems.append((key, "the launcher refuses to pass raw private keys; provide it another way"))
            continue
        launcher_key = key in NEAR_USER_CONFIG_LAUNCHER_KEYS
        if not (launcher_key or key in _NEAR_CONTAINER_KEYS or _NEAR_MPC_KEY.fullmatch(key)):
            problems.append((key, "the launcher ignores this key (it takes launcher settings, MPC_* and "
                                  f"{', '.join(_NEAR_CONTAINER_KEYS)})"))
            continue
        if not isinstance(value, str):
            problems.append((key, f"must be a string, got {type(value).__name__}"))
            continue
        if any(ord(c) < 0x20 and c != "\t" for c in value) or "\x7f" in value:
            problems.append((key, "contains a line break or control character; the file is one KEY=value per line"))
        elif value != value.strip():
            problems.append((key, "has surrounding whitespace, which the launcher strips"))
        elif len(value) > _NEAR_MAX_VALUE:
            problems.append((key, f"is {len(value)} characters; the launcher drops values over {_NEAR_MAX_VALUE}"))
        elif "LD_PRELOAD" in value:
            problems.append((key, "mentions LD_PRELOAD, which the launcher refuses"))
        if key == "MPC_HASH_OVERRIDE" and not _SHA256_DIGEST.fullmatch(value):
            problems.append((key, "must be sha256:<64 lower-case hex>, one of the approved image hashes"))
        if key == "MPC_IMAGE_TAGS" and not all(t.strip() and t.strip() == t for t in value.split(",")):
            problems.append((key, "must be a comma-separated list of tags without spaces"))
        if not launcher_key and key != "PORTS":
            passed += 1
            total += len(key) + 1 + len(value)
    if passed > _NEAR_MAX_VARS:
        problems.append(("", f"{passed} variables for the MPC container; the launcher stops above {_NEAR_MAX_VARS}"))
    if total > _NEAR_MAX_TOTAL:
        problems.append(("", f"{total} bytes of variables; the launcher stops above {_NEAR_MAX_TOTAL}"))
    _raise_if(problems)
    return "".join(f"{key}={value}\n" for key, value in values.items())


# -- the Rust launcher's user config (TOML) --------------------------------------------------------
# near/mpc b0b6b7167e89c015ad59bfb4b0bbc78fcc8432cc crates/tee-launcher/src/types.rs (`Config`,
# `LauncherConfig`, `PortMapping`), src/lib.rs (`load_config` reads /tapp/user_config as TOML and
# fails without it; `select_image_hash` in src/selection.rs) and src/config.rs
# (`intercept_node_config`, `validate_image_reference`).

NEAR_RUST_SOURCE = "near/mpc@b0b6b7167e89c015ad59bfb4b0bbc78fcc8432cc:crates/tee-launcher/src"
_NEAR_RESERVED_NODE_KEYS = {"tee": "the launcher inserts its own [mpc_node_config.tee] and refuses a user's"}
_NEAR_TEE_BLOCKED_NODE_KEYS = {"gcp": "the launcher refuses it with PLATFORM=TEE (TEE_BLOCKED_KEYS: it could "
                                      "exfiltrate key material)"}
# Not refused by the launcher, refused here: the user config is host-readable (the config disk in the
# image bucket, the VMM's request, this plan and the Pulumi state).
_NEAR_HOST_READABLE_NODE_KEYS = {"secrets": "the user config is unmeasured and host-readable (config disk, VMM "
                                            "request, plan, state); MPC node secrets cannot be delivered this way "
                                            "yet"}
def toml_text(document: Mapping[str, Any]) -> str:
    """TOML text of ``document``: the one place TOML is written (``tomli_w``; Python's ``tomllib`` only
    reads). The text is parsed back and must equal the document, so a wrong byte never reaches a guest."""
    text = tomli_w.dumps(dict(document))
    if tomllib.loads(text) != json.loads(json.dumps(document)):
        raise ValueError("the TOML writer did not round-trip the user config")
    return text


@dataclass(frozen=True)
class NearRustUserConfig:
    """``/tapp/user_config`` of NEAR's Rust launcher. Nothing here is measured: the launcher reads it
    at start, so a change is a restart. ``mpc_hash_override`` picks one of the approved MPC images
    (the launcher refuses one that is not in the approved-hashes file the node writes from the
    contract); that digest is what RTMR3's ``mpc-image-digest`` then shows."""

    image_reference: str
    port_mappings: tuple[tuple[int, int], ...] = ()
    mpc_hash_override: str | None = None
    pull_max_retries: int | None = None
    pull_retry_interval_secs: int | None = None
    pull_max_delay_secs: int | None = None
    mpc_node_config: Mapping[str, Any] = field(default_factory=dict)
    platform: str = "TEE"

    def document(self) -> dict[str, Any]:
        launcher: dict[str, Any] = {"image_reference": self.image_reference}
        for name in ("pull_max_retries", "pull_retry_interval_secs", "pull_max_delay_secs"):
            if getattr(self, name) is not None:
                launcher[name] = getattr(self, name)
        if self.mpc_hash_override is not None:
            launcher["mpc_hash_override"] = self.mpc_hash_override
        launcher["port_mappings"] = [{"host": h, "container": c} for h, c in self.port_mappings]
        return {"launcher_config": launcher, "mpc_node_config": json.loads(json.dumps(dict(self.mpc_node_config)))}

    def problems(self) -> list[ProblemEntry]:
        out: list[ProblemEntry] = []
        ref = self.image_reference
        # validate_image_reference: [a-zA-Z0-9._/:-], starts alphanumeric, no trailing : / ., no // :: :.
        if not (isinstance(ref, str) and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._/:-]*", ref)
                and not ref.endswith((":", "/", ".")) and not any(x in ref for x in ("//", "::", ":."))):
            out.append(("launcher_config.image_reference", f"{ref!r} is not [registry[:port]/]name[:tag] as the "
                                                           "launcher's validate_image_reference accepts (no digest: "
                                                           "the approved hash selects the content)"))
        if self.mpc_hash_override is not None and not _SHA256_DIGEST.fullmatch(str(self.mpc_hash_override)):
            out.append(("launcher_config.mpc_hash_override", "must be sha256:<64 lower-case hex>"))
        for name in ("pull_max_retries", "pull_retry_interval_secs", "pull_max_delay_secs"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                out.append((f"launcher_config.{name}", f"{value!r} is not a whole number >= 0"))
        for index, (host, container) in enumerate(self.port_mappings):
            for side, port in (("host", host), ("container", container)):
                if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
                    out.append((f"launcher_config.port_mappings[{index}].{side}", f"{port!r} is not a port 1-65535 "
                                                                                  "(NonZeroU16)"))
        refused = dict(_NEAR_RESERVED_NODE_KEYS, **_NEAR_HOST_READABLE_NODE_KEYS)
        if self.platform == "TEE":
            refused.update(_NEAR_TEE_BLOCKED_NODE_KEYS)
        for key in self.mpc_node_config:
            if key in refused:
                out.append((f"mpc_node_config.{key}", refused[key]))
        out += [(f"mpc_node_config.{path}", problem) for path, problem in _toml_value_problems(self.mpc_node_config)]
        return out

    def text(self) -> str:
        _raise_if(self.problems())
        return toml_text(self.document())


def _toml_value_problems(value: Any, path: str = "") -> list[tuple[str, str]]:
    if value is None:
        return [(path, "is null, which TOML cannot hold; remove the key")]
    if isinstance(value, Mapping):
        out = []
        for key, item in value.items():
            if not isinstance(key, str) or not key:
                out.append((path, f"key {key!r} must be a non-empty string"))
            out += _toml_value_problems(item, f"{path}.{key}" if path else str(key))
        return out
    if isinstance(value, (list, tuple)):
        return [p for i, item in enumerate(value) for p in _toml_value_problems(item, f"{path}[{i}]")]
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return [(path, "nan and infinity are not written")]
    if not isinstance(value, (str, int, float, bool)):
        return [(path, f"{type(value).__name__} has no TOML form")]
    return []


def parse_near_rust_user_config(text: str) -> dict[str, Any]:
    """``/tapp/user_config`` read the way the Rust launcher reads it (``toml::from_str::<Config>``)."""
    import tomllib

    document = tomllib.loads(text)
    if "launcher_config" not in document or "mpc_node_config" not in document:
        raise ValueError("the launcher needs both [launcher_config] and [mpc_node_config]")
    return document


def parse_near_user_config(text: str) -> dict[str, str]:
    """``/tapp/user_config`` read the way the Python launcher reads it (``parse_env_lines``)."""
    result: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, value = line.split("=", 1)
        if key.strip():
            result[key.strip()] = value.strip()
    return result


class MpcUpgradeKind(str, Enum):
    UNCHANGED = "unchanged"
    USER_CONFIG = "user-config"
    HASH_OVERRIDE = "hash-override"
    NEW_COMPOSE = "new-compose"


@dataclass(frozen=True)
class MpcUpgrade:
    kind: MpcUpgradeKind
    compose_hash_before: str
    compose_hash_after: str
    changed_user_config_keys: tuple[str, ...]
    summary: str

    @property
    def keeps_identity(self) -> bool:
        return self.kind is not MpcUpgradeKind.NEW_COMPOSE


def classify_mpc_upgrade(app_compose_before: bytes, app_compose_after: bytes,
                         user_config_before: str = "", user_config_after: str = "") -> MpcUpgrade:
    """What kind of change moves an MPC node from one (app-compose bytes, user config) to another.

    A different app-compose is a new compose hash: a new app identity (without KMS a new app-id
    and sealing key), so NEAR needs the new launcher compose hash voted in, a new CVM and its key
    shares migrated. Otherwise only the unmeasured user config changes and a restart applies it;
    a changed ``MPC_HASH_OVERRIDE`` selects another already-approved MPC image that way.
    """
    before_hash, after_hash = compose_hash(app_compose_before), compose_hash(app_compose_after)
    before, after = parse_near_user_config(user_config_before), parse_near_user_config(user_config_after)
    changed = tuple(sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k)))
    if before_hash != after_hash:
        kind = MpcUpgradeKind.NEW_COMPOSE
        summary = (f"compose hash {before_hash[:12]} -> {after_hash[:12]}: new app identity; vote the launcher "
                   "compose hash in, deploy a new CVM and migrate key shares")
    elif "MPC_HASH_OVERRIDE" in changed:
        kind = MpcUpgradeKind.HASH_OVERRIDE
        summary = (f"MPC_HASH_OVERRIDE {before.get('MPC_HASH_OVERRIDE', 'unset')} -> "
                   f"{after.get('MPC_HASH_OVERRIDE', 'unset')} in the user config and a restart; compose hash and "
                   "identity unchanged (the image must already be approved)")
    elif changed:
        kind = MpcUpgradeKind.USER_CONFIG
        summary = f"user config {', '.join(changed)} changed; a restart applies it, identity unchanged"
    else:
        kind = MpcUpgradeKind.UNCHANGED
        summary = "no change"
    return MpcUpgrade(kind, before_hash, after_hash, changed, summary)


# -- kettle ----------------------------------------------------------------------------------------

KETTLE_HOST_DIR = "/dstack/kettle"  # app-compose.service runs in /dstack inside the CVM
KETTLE_CONTAINER_DIR = "/kettle"
_SUFFIX = re.compile(r"\.[A-Za-z0-9]{1,8}")
_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class KettleManifest:
    """A kettle manifest (``{"app": URL, "sha256": hex}``) pinned by the sha256 of its bytes."""

    url: str
    sha256: str
    app_url: str
    app_sha256: str

    def __post_init__(self) -> None:
        problems = [("url", p) for p in _fetchable_url_problems(self.url)]
        if not isinstance(self.app_url, str):
            problems.append(("manifest.app", "missing; the manifest must name the app URL"))
        else:
            problems += [("manifest.app", p) for p in _fetchable_url_problems(self.app_url)]
        if not isinstance(self.app_sha256, str) or not _HEX64.fullmatch(self.app_sha256):
            problems.append(("manifest.sha256", "missing or not 64 lower-case hex digits; a manifest without the "
                                                "app's sha256 cannot be verified, republish it with `kettle publish`"))
        if not isinstance(self.sha256, str) or not _HEX64.fullmatch(self.sha256):
            problems.append(("sha256", "the manifest's own sha256 must be 64 lower-case hex digits"))
        _raise_if(problems)

    @classmethod
    def from_bytes(cls, url: str, manifest: bytes) -> "KettleManifest":
        """Pin the manifest served at ``url`` whose exact bytes are ``manifest``."""
        try:
            document = json.loads(manifest)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ComposeError([("manifest", f"is not JSON ({exc})")]) from None
        if not isinstance(document, Mapping):
            raise ComposeError([("manifest", "must be a JSON object {\"app\": ..., \"sha256\": ...}")])
        return cls(url, hashlib.sha256(manifest).hexdigest(), document.get("app"), document.get("sha256"))

    @property
    def verified(self) -> bool:
        """Both fetched over https. Over http the pinned sha256 still catches altered content, but
        the transport itself is unauthenticated and visible."""
        return all(urlsplit(u).scheme == "https" for u in (self.url, self.app_url))

    @property
    def warnings(self) -> tuple[str, ...]:
        return tuple(f"{what} {u} is fetched over http://: unverified transport, anyone on the path can read "
                     "or block it; only the pinned sha256 protects it"
                     for what, u in (("manifest", self.url), ("app", self.app_url)) if urlsplit(u).scheme == "http")


def _fetchable_url_problems(url: Any) -> list[str]:
    if not isinstance(url, str):
        return ["must be a URL string"]
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.netloc:
        return [f"{url!r} is not an https:// (or http://) URL the CVM can fetch"]
    if any(c.isspace() or ord(c) < 0x20 for c in url):
        return [f"{url!r} contains whitespace or control characters"]
    if "$" in url:
        return [f"{url!r} contains '$', which docker compose would interpolate from unmeasured input"]
    return []


def kettle_pre_launch_script(manifest: KettleManifest, host_dir: str = KETTLE_HOST_DIR) -> str:
    """Bash for app-compose's ``pre_launch_script`` (dstack sources it before ``docker compose up``):
    fetch the manifest and the app, check both against their pinned sha256, then write a local
    ``file://`` manifest for kettle, which re-checks the app hash for local files. On any mismatch
    it exits, so no container starts. The work runs in a subshell so nothing leaks into
    app-compose.sh. ``host_dir`` is where the verified files go inside the CVM (mounted read-only
    into the kettle container)."""
    suffix = PurePosixPath(urlsplit(manifest.app_url).path).suffix
    app_file = "app" + (suffix if _SUFFIX.fullmatch(suffix) else "")
    local_manifest = json.dumps({"app": f"file://{KETTLE_CONTAINER_DIR}/{app_file}", "sha256": manifest.app_sha256},
                                sort_keys=True, separators=(",", ":"))
    settings = {
        "dir": host_dir,
        "manifest_url": manifest.url,
        "manifest_sha256": manifest.sha256,
        "app_url": manifest.app_url,
        "app_sha256": manifest.app_sha256,
        "app_file": app_file,
        "local_manifest": local_manifest,
    }
    assignments = "\n".join(f"    {name}={shlex.quote(value)}" for name, value in settings.items())
    body = _KETTLE_SCRIPT.replace("@ASSIGNMENTS@", assignments)
    return body.strip()


# Fixed logic; only the shlex-quoted assignments vary. Every step ends in `|| return 1` because
# bash ignores `set -e` inside a function whose status is tested (`if ! kettle_verify`).
_KETTLE_SCRIPT = r"""
# kettle: verify the pinned manifest and app before any container starts
kettle_verify() (
    set -u
@ASSIGNMENTS@
    fetch() {
        curl --fail --silent --show-error --location --proto '=https,http' --max-time 120 --output "$2" "$1"
    }
    check() {
        actual=$(sha256sum < "$2" | cut -d ' ' -f 1)
        if [ "$actual" != "$1" ]; then
            echo "kettle: $3 has sha256 $actual, expected $1" >&2
            return 1
        fi
    }
    staging="$dir.new"
    rm -rf "$staging" && mkdir -p "$staging" || return 1
    fetch "$manifest_url" "$staging/manifest.json" || return 1
    check "$manifest_sha256" "$staging/manifest.json" "manifest $manifest_url" || return 1
    fetch "$app_url" "$staging/$app_file" || return 1
    check "$app_sha256" "$staging/$app_file" "app $app_url" || return 1
    printf '%s' "$local_manifest" > "$staging/manifest.local.json" || return 1
    rm -rf "$dir" && mv "$staging" "$dir"
)
if ! kettle_verify; then
    echo "kettle: manifest or app failed verification; not starting containers" >&2
    exit 1
fi
"""


@dataclass(frozen=True)
class KettleApp:
    compose: ComposeSpec
    pre_launch_script: str
    manifest: KettleManifest

    @property
    def compose_text(self) -> str:
        return render_compose(self.compose)


def kettle_app(launcher_image: ImageRef, manifest: KettleManifest, *, port: int = 3001,
               host_port: int | None = None) -> KettleApp:
    """kettle behind dstack with its manifest bound to the compose hash: the manifest URL, the
    manifest's sha256 and the app's sha256 are literal (measured) environment values, and the
    measured pre-launch script fetches and checks both before kettle starts on the verified local
    copy. The launcher image is pinned by digest. No restart policy: dockerd would start the
    container at boot on its own, before the pre-launch check runs."""
    problems: list[ProblemEntry] = []
    for name, value in (("port", port), ("host_port", port if host_port is None else host_port)):
        if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 65536:
            problems.append((name, f"{value!r} is not a TCP port"))
    _raise_if(problems)
    service = ServiceSpec(
        name="kettle",
        image=launcher_image,
        environment=(
            f"KETTLE_MANIFEST={KETTLE_CONTAINER_DIR}/manifest.local.json",
            f"KETTLE_MANIFEST_URL={manifest.url}",
            f"KETTLE_MANIFEST_SHA256={manifest.sha256}",
            f"KETTLE_APP_SHA256={manifest.app_sha256}",
            f"KETTLE_PORT={port}",
            "KETTLE_DB_DIR=/data",
        ),
        ports=(f"{port if host_port is None else host_port}:{port}",),
        volumes=(f"{KETTLE_HOST_DIR}:{KETTLE_CONTAINER_DIR}:ro", "kettle-data:/data"),
        security_opt=("no-new-privileges:true",),
    )
    compose = ComposeSpec((service,), (NamedVolume("kettle-data"),))
    compose_document(compose)  # validates the image now, not at render time
    return KettleApp(compose, kettle_pre_launch_script(manifest), manifest)
