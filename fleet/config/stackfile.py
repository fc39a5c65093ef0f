"""Reads ``stacks/Pulumi.<stack>.yaml`` the way the Pulumi CLI hands config to a program.

Only keys under ``config:`` are configuration; ``encryptionsalt``, ``secretsprovider`` and
``environment`` are the CLI's. Top-level scalars become strings (as ``pulumi config get`` shows
them), objects and lists stay structured. ``secure:`` values cannot be decrypted offline: they
become placeholders and their top-level key is secret, as it is in a real run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fleet.config.problems import ConfigError, Problem

STACK_FILE_KEYS = {"config", "encryptionsalt", "encryptedkey", "secretsprovider", "environment"}


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
    path = stack_file_path(root, stack)
    source = str(path.relative_to(root)) if path.is_relative_to(root) else str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([Problem(source, "", f"no such stack file; create it or choose one of "
                                   f"{', '.join(available_stacks(root)) or '(none)'}")]) from None
    try:
        document = yaml.safe_load(text)
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


def available_stacks(root: Path) -> list[str]:
    return sorted(p.name[len("Pulumi."):-len(".yaml")] for p in (root / "stacks").glob("Pulumi.*.yaml"))
