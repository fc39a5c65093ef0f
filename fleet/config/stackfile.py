"""Reads ``stacks/Pulumi.<stack>.yaml`` the way the Pulumi CLI hands config to a program.

Only keys under ``config:`` are configuration; ``encryptionsalt``, ``secretsprovider`` and
``environment`` are the CLI's. Top-level scalars become strings (as ``pulumi config get`` shows
them), objects and lists stay structured. ``secure:`` values cannot be decrypted offline: they
become placeholders and their top-level key is secret, as it is in a real run.

A stack file is untrusted input (it arrives in pull requests, and the plan runs in CI): it is read
with limits that hold before anything is expanded. Its size and nesting depth are bounded, anchors
and aliases are refused when the parser meets them (an alias bomb of a few hundred bytes would
otherwise expand into gigabytes once walked), duplicate keys are refused as the Pulumi CLI refuses
them (its YAML library, gopkg.in/yaml.v3, reports "mapping key ... already defined"), only the
plain YAML types are built, and the bytes must be UTF-8. Secrets may only appear as ``secure:``
values: a plaintext value under ``dstack-fleet:secrets`` is refused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from yaml.events import AliasEvent
from yaml.nodes import MappingNode, ScalarNode

from fleet.config.problems import ConfigError, Problem

STACK_FILE_KEYS = {"config", "encryptionsalt", "encryptedkey", "secretsprovider", "environment"}
SECRETS_KEY = "dstack-fleet:secrets"
# Far above any real stack file (a 1,000-node fleet is a few kilobytes), far below what could hurt.
MAX_STACK_FILE_BYTES = 1 << 20
MAX_DEPTH = 32  # nodes from the document root; the schema's deepest values sit about 10 down
# Pulumi's stack names: 1-100 characters of [A-Za-z0-9_.-] (pulumi/pulumi
# c8bf1862344e561754ea3ebb1c444c77ca7378c0, sdk/go/common/tokens/stack_name.go, ParseStackName).
STACK_NAME = re.compile(r"[A-Za-z0-9_.-]{1,100}")
_PLAIN_TAGS = {f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null", "seq", "map")}
_TIMESTAMP = "tag:yaml.org,2002:timestamp"


def stack_name_problem(stack: str) -> str | None:
    """Why ``stack`` cannot be a Pulumi stack name, or None."""
    if STACK_NAME.fullmatch(stack):
        return None
    return (f"{stack[:40]!r}{'...' if len(stack) > 40 else ''} is not a stack name: Pulumi allows 1-100 "
            "characters of letters, digits, '_', '.' and '-'")


class _Refused(yaml.MarkedYAMLError):
    """A construct the stack-file reader refuses (reported like a YAML syntax error, with its line)."""


class _StackFileLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` with the limits above, checked while the document is composed."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):  # type: ignore[override]
        if self.check_event(AliasEvent):
            event = self.peek_event()
            raise _Refused(None, None, f"alias *{event.anchor} is not supported in stack files (write the value "
                           "out in full)", event.start_mark)
        event = self.peek_event()
        if event.anchor is not None:
            raise _Refused(None, None, f"anchor &{event.anchor} is not supported in stack files (write the value "
                           "out in full)", event.start_mark)
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise _Refused(None, None, f"values are nested more than {MAX_DEPTH} levels deep", event.start_mark)
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if isinstance(node, MappingNode):
            _check_unique_keys(node)
        if node.tag not in _PLAIN_TAGS and node.tag != _TIMESTAMP:
            raise _Refused(None, None, f"tag {node.tag!r} is not supported in stack files (use plain strings, "
                           "numbers, booleans, lists and mappings)", node.start_mark)
        return node

    def construct_yaml_timestamp(self, node):  # type: ignore[override]
        return self.construct_scalar(node)  # as written: the CLI hands the program the text


_StackFileLoader.add_constructor(_TIMESTAMP, _StackFileLoader.construct_yaml_timestamp)


def _check_unique_keys(node: MappingNode) -> None:
    """yaml.v3 refuses a mapping whose keys repeat (same kind, same text): so do we."""
    seen: dict[tuple[type, str], Any] = {}
    for key, _ in node.value:
        if not isinstance(key, ScalarNode):
            raise _Refused(None, None, "mapping keys must be plain strings", key.start_mark)
        first = seen.setdefault((type(key), key.value), key)
        if first is not key:
            raise _Refused(None, None, f"mapping key {key.value!r} already defined at line "
                           f"{first.start_mark.line + 1}; the Pulumi CLI refuses duplicate keys", key.start_mark)


def _parse(text: str) -> Any:
    loader = _StackFileLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _decode(data: bytes, source: str) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError([Problem(source, "", f"is not valid UTF-8 (byte 0x{data[exc.start]:02x} at line {line}); "
                                   "save the file as UTF-8")]) from None
    return text.removeprefix("\ufeff")


@dataclass
class StackFile:
    stack: str
    source: str  # path as shown in messages, relative to the project root
    config: dict[str, Any]
    secret_keys: set[str] = field(default_factory=set)
    settings: dict[str, Any] = field(default_factory=dict)


def stack_file_path(root: Path, stack: str) -> Path:
    return root / "stacks" / f"Pulumi.{stack}.yaml"


def _scalar(value: Any) -> Any:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if value is None:
        return ""
    return value


def _placeholders(value: Any, key: str, path: str) -> tuple[Any, bool]:
    """Replace ``{secure: ...}`` leaves by a placeholder; report whether any was found."""
    if isinstance(value, dict):
        if set(value) == {"secure"}:
            return f"[secret {path}]", True
        found = False
        out = {}
        for k, v in value.items():
            out[k], f = _placeholders(v, key, f"{path}.{k}")
            found = found or f
        return out, found
    if isinstance(value, list):
        found = False
        items = []
        for i, v in enumerate(value):
            item, f = _placeholders(v, key, f"{path}[{i}]")
            items.append(item)
            found = found or f
        return items, found
    return value, False


def read(root: Path, stack: str, *, overrides: dict[str, Any] | None = None,
         secret_overrides: dict[str, Any] | None = None) -> StackFile:
    """Parse the stack file. ``overrides`` replace keys; ``secret_overrides`` replace keys and mark
    them secret, as the CLI does for decrypted ``secure:`` values (used by tests)."""
    problem = stack_name_problem(stack)
    if problem:
        raise ConfigError([Problem("--stack", "", problem)])
    path = stack_file_path(root, stack)
    source = str(path.relative_to(root)) if path.is_relative_to(root) else str(path)
    try:
        with path.open("rb") as f:
            data = f.read(MAX_STACK_FILE_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError([Problem(source, "", f"no such stack file; create it or choose one of "
                                   f"{', '.join(available_stacks(root)) or '(none)'}")]) from None
    except OSError as exc:
        raise ConfigError([Problem(source, "", f"cannot be read: {exc.strerror or exc}")]) from None
    if len(data) > MAX_STACK_FILE_BYTES:
        raise ConfigError([Problem(source, "", f"is larger than {MAX_STACK_FILE_BYTES // 1024} KiB; a stack file "
                                   "holds configuration, not data")])
    text = _decode(data, source)
    try:
        document = _parse(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError([Problem(source, "", f"invalid YAML at {where}{problem}")]) from None
    if document is None:
        document = {}
    if not isinstance(document, dict):
        raise ConfigError([Problem(source, "", "a stack file is a mapping with a 'config:' key")])
    problems = []
    for key in document:
        if key not in STACK_FILE_KEYS:
            problems.append(Problem(source, str(key), "not a stack-file key; configuration goes under 'config:'"))
    raw = document.get("config") or {}
    if not isinstance(raw, dict):
        problems.append(Problem(source, "config", "must be a mapping of 'namespace:key' to values"))
        raw = {}
    problems += _plaintext_secrets(source, raw.get(SECRETS_KEY))
    if problems:
        raise ConfigError(problems)

    config: dict[str, Any] = {}
    secret_keys: set[str] = set()
    for key, value in raw.items():
        key = str(key)
        value, secret = _placeholders(value, key, key)
        if secret:
            secret_keys.add(key)
        config[key] = value if isinstance(value, (dict, list)) else _scalar(value)
    for key, value in (overrides or {}).items():
        config[key] = value
    for key, value in (secret_overrides or {}).items():
        config[key] = value
        secret_keys.add(key)
    settings = {k: v for k, v in document.items() if k != "config"}
    return StackFile(stack=stack, source=source, config=config, secret_keys=secret_keys, settings=settings)


def _plaintext_secrets(source: str, secrets: Any) -> list[Problem]:
    """Every value under ``dstack-fleet:secrets`` must be ``{secure: ...}``: the CLI encrypts what
    ``pulumi config set --secret`` writes, so plaintext there was typed in by hand and is in git."""
    if not isinstance(secrets, dict):
        return []
    out = []
    for name, value in secrets.items():
        if not (isinstance(value, dict) and set(value) == {"secure"} and isinstance(value["secure"], str)):
            out.append(Problem(source, f"{SECRETS_KEY}.{name}", "is not encrypted: a secret must be a 'secure:' "
                               "value; remove it from the file and set it with `pulumi config set --secret "
                               f"--path '{SECRETS_KEY}.{name}' <value>`"))
    return out


def available_stacks(root: Path) -> list[str]:
    return sorted(p.name[len("Pulumi."):-len(".yaml")] for p in (root / "stacks").glob("Pulumi.*.yaml"))
