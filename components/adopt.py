"""Adopting resources that were created by hand (``dstack-fleet:adopt``).

A team that already made a state bucket, a registry, or the seeds' VMs, images and disks lists them
as ``logical name -> import id``; the resource of that logical name is then imported (Pulumi's
``import`` option) instead of created. Import succeeds only when the declared inputs match the
existing resource, so nothing is changed by adopting it; docs/operations.md walks through it.
"""

from __future__ import annotations

import pulumi

_pending: dict[str, str] = {}
_used: set[str] = set()


def configure(mapping: dict[str, str]) -> None:
    _pending.clear()
    _pending.update(mapping)
    _used.clear()


def options(name: str, **kwargs) -> pulumi.ResourceOptions:
    """Resource options for the resource with logical ``name``, importing it when adopted."""
    import_id = _pending.get(name)
    if import_id is not None:
        _used.add(name)
        kwargs["import_"] = import_id
    return pulumi.ResourceOptions(**kwargs)


def unused() -> list[str]:
    """Adopt entries that named no resource of this stack (a typo would otherwise create a duplicate)."""
    return sorted(set(_pending) - _used)
