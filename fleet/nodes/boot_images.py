"""Which image versions the nodes of a stack boot, and which of those the lock file still lacks."""

from __future__ import annotations

from fleet.config.schema import StackConfig
from fleet.gcp.naming import Namer
from fleet.images.lock import LockFile
from fleet.images.versions import ImageVersion, resolve
from fleet.nodes.identity import ordinals
from fleet.nodes.specs import derived_image_inputs


def used_keys(config: StackConfig) -> dict[str, list[str]]:
    """Image key -> the nodes that boot it."""
    users: dict[str, list[str]] = {}
    for group in config.fleet.nodes:
        for n in ordinals(group):
            key = group.image_overrides.get(n, group.image)
            users.setdefault(key, []).append(f"{group.name}-{n}")
    return users


def unused_versions(config: StackConfig) -> list[str]:
    users = used_keys(config)
    return sorted(k for k in config.fleet.images if k not in users)


def resolve_for_stack(config: StackConfig, lock: LockFile, namer: Namer) -> dict[str, ImageVersion]:
    """``resolve`` with the inputs the stack itself adds to builds (an overlay's init script)."""
    return resolve(config, lock, namer, derived_image_inputs(config, namer))


def pending_in_use(config: StackConfig, lock: LockFile, namer: Namer,
                   versions: dict[str, ImageVersion] | None = None) -> list[str]:
    """Image keys some node boots whose build the lock file does not hold."""
    if versions is None:
        versions = resolve_for_stack(config, lock, namer)
    users = used_keys(config)
    return sorted(k for k, v in versions.items() if v.pending and k in users)
