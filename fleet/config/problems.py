"""Problems found in user input, reported all at once, one line each."""

from __future__ import annotations

import re
from dataclasses import dataclass

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _one_line(text: str) -> str:
    """Control characters (a line break in a key, an escape sequence in a value) written escaped:
    a problem is always one line, and a terminal never interprets a stack file's bytes."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


@dataclass(frozen=True, order=True)
class Problem:
    """One thing wrong with one key: ``<source>: <key path>: <message>``."""

    source: str
    path: str
    message: str

    def __str__(self) -> str:
        parts = [p for p in (self.source, self.path) if p]
        return _one_line(": ".join(parts + [self.message]))


class ConfigError(Exception):
    """Raised with every problem of a stack's configuration."""

    def __init__(self, problems: list[Problem]):
        self.problems = sorted(set(problems), key=lambda p: (p.source, p.path, p.message))
        super().__init__("\n".join(str(p) for p in self.problems))

    def lines(self) -> list[str]:
        return [str(p) for p in self.problems]
