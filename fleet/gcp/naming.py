"""Every GCP name and label the program creates comes from here.

GCP limits (Compute Engine resource names, labels, service-account ids, bucket names):
  - resource names: 1-63 chars, ``[a-z]([-a-z0-9]*[a-z0-9])?``
  - service-account ids: 6-30 chars, same alphabet
  - label keys: 1-63 chars, start with a lowercase letter, ``[a-z0-9_-]``
  - label values: 0-63 chars, ``[a-z0-9_-]``
  - bucket names: 3-63 chars, globally unique

A value that does not fit is truncated and suffixed with a short hash of the full value, so two
long values never collapse onto one name; callers put the full value into a description.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

MAX_NAME = 63
MAX_SERVICE_ACCOUNT_ID = 30
MAX_LABEL = 63
SUFFIX_HEX = 8

NAME_RE = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
LABEL_KEY_RE = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
LABEL_VALUE_RE = re.compile(r"^[a-z0-9_-]{0,63}$")
BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{1,61}[a-z0-9]$")

_INVALID_NAME_CHARS = re.compile(r"[^a-z0-9-]+")
_INVALID_LABEL_CHARS = re.compile(r"[^a-z0-9_-]+")


def short_hash(value: str, length: int = SUFFIX_HEX) -> str:
    """The first ``length`` hex digits of SHA-256 over ``value`` (stable across runs)."""
    return hashlib.sha256(value.encode("utf-8")).hexdigest()[:length]


def _fit(text: str, full: str, max_length: int, separator: str) -> str:
    if len(text) <= max_length:
        return text
    suffix = separator + short_hash(full, max(4, min(SUFFIX_HEX, max_length // 3)))
    head = text[: max_length - len(suffix)].rstrip("-_")
    return head + suffix


def gcp_name(*parts: str, max_length: int = MAX_NAME) -> str:
    """A valid GCP resource name made of ``parts`` joined by dashes.

    Invalid characters become dashes; a name that does not start with a letter gets an ``n``
    prefix; a name over ``max_length`` keeps its head and ends in a hash of the full value.
    """
    if not parts or not all(parts):
        raise ValueError(f"gcp_name needs non-empty parts, got {parts!r}")
    full = "-".join(parts)
    text = _INVALID_NAME_CHARS.sub("-", full.lower()).strip("-")
    if not text or not text[0].isalpha():
        text = "n" + ("-" + text if text else "")
    text = _fit(text, full, max_length, "-")
    if not NAME_RE.match(text):  # pragma: no cover - guarded by construction
        raise ValueError(f"could not make a GCP name from {parts!r}: {text!r}")
    return text


def label_value(value: str) -> str:
    """A valid label value for ``value`` (truncated with a hash when over 63 chars)."""
    text = _INVALID_LABEL_CHARS.sub("-", value.lower())
    return _fit(text, value, MAX_LABEL, "_")


def label_key(key: str) -> str:
    text = _INVALID_LABEL_CHARS.sub("_", key.lower())
    if not text or not text[0].isalpha():
        text = "k" + text
    return _fit(text, key, MAX_LABEL, "_")


# Label keys the program sets on resources itself (``Namer.labels`` and node specs); a user label
# of the same key would be overwritten or collide, so the schema refuses them.
PROGRAM_LABEL_KEYS = ("environment", "group", "image_key", "input_hash", "kind", "managed_by", "node", "recipe",
                      "role", "stack", "tier")


def labels(**values: str) -> dict[str, str]:
    """Labels for a resource, keys and values made valid, sorted by key."""
    return {label_key(k): label_value(v) for k, v in sorted(values.items())}


@dataclass(frozen=True)
class Namer:
    """Names for one stack of the project.

    ``prefix`` keeps our resources apart from anything else in the GCP project; ``stack`` is part of
    every name that must be unique per project (Compute names) or globally (bucket names), so
    several stacks can share one project.
    """

    prefix: str
    stack: str
    project: str

    def name(self, *parts: str, max_length: int = MAX_NAME) -> str:
        return gcp_name(self.prefix, self.stack, *parts, max_length=max_length)

    def service_account_id(self, *parts: str) -> str:
        return gcp_name(self.prefix, *parts, max_length=MAX_SERVICE_ACCOUNT_ID)

    def bucket(self, *parts: str) -> str:
        """A globally unique bucket name: the project id makes it unique across GCP."""
        text = gcp_name(self.project, self.prefix, *parts)
        if len(text) < 3:  # pragma: no cover - project ids are at least 6 chars
            raise ValueError(f"bucket name too short: {text!r}")
        return text

    def labels(self, **values: str) -> dict[str, str]:
        return labels(managed_by="dstack-fleet", stack=self.stack, **values)


def public_repository_id(prefix: str) -> str:
    """The bootstrap's public-read app repository: the one public grant the policy rules allow."""
    return gcp_name(prefix, "public")
