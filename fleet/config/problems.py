"""Problems found in user input, reported all at once, one line each."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class Problem:
    """One thing wrong with one key: ``<source>: <key path>: <message>``."""

    source: str
    path: str
    message: str

    def __str__(self) -> str:
        parts = [p for p in (self.source, self.path) if p]
        return ": ".join(parts + [self.message])


class ConfigError(Exception):
    """Raised with every problem of a stack's configuration."""

    def __init__(self, problems: list[Problem]):
        self.problems = sorted(set(problems), key=lambda p: (p.source, p.path, p.message))
        super().__init__("\n".join(str(p) for p in self.problems))

    def lines(self) -> list[str]:
        return [str(p) for p in self.problems]
