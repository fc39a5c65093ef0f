"""Markers for values a plan cannot show: secrets and values computed by a provider."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SECRET_MARK = "[secret]"
UNKNOWN_MARK = "<computed>"
# The value the offline plan gives a secret the stack does not set (a real run refuses it); it is shown
# as itself, so a plan says which secret is missing without ever showing one that is set.
NOT_SET = "[secret: not set]"


class _Unknown:
    _instance: "_Unknown | None" = None

    def __new__(cls) -> "_Unknown":
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return UNKNOWN_MARK


UNKNOWN = _Unknown()


@dataclass(frozen=True)
class Secret:
    """A value that must never be printed."""

    value: Any

    def __repr__(self) -> str:
        return SECRET_MARK


def display(value: Any) -> Any:
    """A JSON-ready copy of ``value`` with secrets and unknowns replaced by their marks."""
    if isinstance(value, Secret):
        return NOT_SET if value.value == NOT_SET else SECRET_MARK
    if value is UNKNOWN:
        return UNKNOWN_MARK
    if isinstance(value, dict):
        return {str(k): display(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [display(v) for v in value]
    return value


def reveal(value: Any) -> Any:
    """The plain value with every ``Secret`` unwrapped (for rules that read values, never for output)."""
    if isinstance(value, Secret):
        return reveal(value.value)
    if isinstance(value, dict):
        return {k: reveal(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [reveal(v) for v in value]
    return value


def contains_unknown(value: Any) -> bool:
    if value is UNKNOWN:
        return True
    if isinstance(value, Secret):
        return contains_unknown(value.value)
    if isinstance(value, dict):
        return any(contains_unknown(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(contains_unknown(v) for v in value)
    return False
