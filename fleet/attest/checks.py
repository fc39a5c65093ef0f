"""What every verification lane shares: one check row, one input problem, and bounded reading.

``verify`` reads files an attacker may have shaped: each is read with a size bound, JSON is parsed
with a nesting bound, and times are kept inside a sane range, so bad input is one line and exit 2,
never a traceback, an exhausted machine or a ``RecursionError``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

MAX_FILE_BYTES = 64 * 1024 * 1024  # a plan of a thousand nodes stays far below this
EARLIEST, LATEST = 946684800, 4102444800  # 2000-01-01 .. 2100-01-01: anything else is a typo


class InputError(Exception):
    """Unreadable or malformed input: one line naming what is wrong and how to fix it."""


@dataclass(frozen=True)
class Check:
    name: str
    expected: str
    actual: str
    holds: bool | None  # None: not checked
    note: str = ""  # why it was not checked, or what a failure means

    @property
    def result(self) -> str:
        if self.holds is None:
            return f"not checked ({self.note})" if self.note else "not checked"
        if self.holds:
            return "ok"
        return f"MISMATCH: {self.note}" if self.note else "MISMATCH"


def compare(name: str, expected: str, actual: str, note: str = "") -> Check:
    return Check(name, expected, actual, expected == actual, note)


def one_line(text: object) -> str:
    return " ".join(str(text).split())


def read_bytes(path: str, option: str, limit: int = MAX_FILE_BYTES) -> bytes:
    """At most ``limit`` bytes of a file, or an ``InputError`` saying why not."""
    try:
        with Path(path).open("rb") as handle:
            data = handle.read(limit + 1)
    except OSError as exc:
        raise InputError(f"{option} {path}: cannot read it ({exc.strerror or exc}); check the path") from None
    if len(data) > limit:
        raise InputError(f"{option} {path}: larger than {limit} bytes, more than this input can be; "
                         "is it the right file?")
    return data


def load_json(data: bytes | str, what: str, fix: str = "pass the file as the guest agent returns it") -> Any:
    """JSON, where a document nested too deep for the parser is bad input, not a crash."""
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{what} is not JSON ({one_line(exc)}); {fix}") from None
    except RecursionError:
        raise InputError(f"{what} nests JSON deeper than any attestation document does") from None


def parse_time(text: str) -> int:
    """ISO-8601 (UTC unless it says otherwise) or unix seconds, between 2000 and 2100."""
    problem = InputError(f"--at {text!r} is not ISO-8601 (2026-08-20T00:00:00Z) or unix seconds since 1970")
    value = text.strip()
    if re.fullmatch(r"\d{1,12}", value):
        seconds = int(value)
    else:
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            raise problem from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=timezone.utc)
        seconds = int(moment.timestamp())
    if not EARLIEST <= seconds < LATEST:
        raise InputError(f"--at {text!r} is outside 2000..2100; give the time the quote is checked at")
    return seconds


def iso(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
