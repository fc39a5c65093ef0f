"""Measurements a dstack guest will report, computed from exact bytes before anything is deployed."""

from __future__ import annotations

import hashlib


def compose_hash(app_compose: bytes) -> str:
    """SHA-256 over the exact app-compose.json bytes the guest reads (no normalization)."""
    return hashlib.sha256(app_compose).hexdigest()


def app_id_from_compose_hash(compose_hash_hex: str) -> str:
    """Without a KMS, dstack's app-id is the first 20 bytes of the compose hash (40 hex chars)."""
    return compose_hash_hex[:40]
