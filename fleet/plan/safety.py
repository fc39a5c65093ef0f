"""What keeps a stack safe, as data in its plan, and the weakenings a change makes to it.

The plan JSON carries a ``safety`` section: the tier, every policy rule's effective enforcement, whether
data disks are snapshotted, and the allow-lists that widen what may run (extra TDX zones and
machine types, extra boot images). ``weakenings`` compares two plans of a stack whose tier is staging
or prod (on either side) and names everything that makes it less safe; ``fleet diff`` fails (exit 1)
on each. A plan made by older code has no ``safety`` section: what the resources show is used
instead (snapshot policies present, the tier's default enforcement), and the allow-lists are not
compared.
"""

from __future__ import annotations

from typing import Any

from fleet.config.schema import StackConfig
from fleet.nodes.specs import snapshots_enabled
from fleet.policy import rules

TIER_RANK = {None: 0, "dev": 1, "staging": 2, "prod": 3}
LEVEL_RANK = {"disabled": 0, "advisory": 1, "mandatory": 2}
GUARDED_TIERS = ("staging", "prod")
RESOURCE_POLICY = "gcp:compute/resourcePolicy:ResourcePolicy"
DATA_DISK = "gcp:compute/disk:Disk"


def summary(config: StackConfig, context: rules.RuleContext) -> dict[str, Any]:
    """The ``safety`` section of a plan."""
    fleet = config.fleet
    return {
        "tier": fleet.tier,
        "enforcement": {name: context.level(name) for name in rules.RULE_NAMES},
        "snapshots": snapshots_enabled(config) if fleet.role == "env" else None,
        "allowedImages": sorted(fleet.policy.allowed_images),
        "extraZones": sorted(fleet.tdx.extra_zones),
        "extraMachineTypes": sorted(fleet.tdx.extra_machine_types),
    }


def strictest_tier(base: dict[str, Any], head: dict[str, Any]) -> str | None:
    return max((base.get("tier"), head.get("tier")), key=lambda t: TIER_RANK.get(t, 0))


def _safety(document: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """The document's safety section, or what its resources show when the plan predates it."""
    found = document.get("safety")
    if isinstance(found, dict):
        return found, True
    tier = document.get("tier")
    return {
        "tier": tier,
        "enforcement": {name: rules.default_level(tier) for name in rules.RULE_NAMES},
        "snapshots": any(r.get("type") == RESOURCE_POLICY for r in document.get("resources", [])),
    }, False


def _protection(resource: dict[str, Any]) -> dict[str, bool]:
    options, inputs = resource.get("options") or {}, resource.get("inputs") or {}
    return {
        "protect": options.get("protect") is True,
        "retainOnDelete": options.get("retainOnDelete") is True,
        "deletionPolicy PREVENT": inputs.get("deletionPolicy") == "PREVENT",
        "deletionProtection": inputs.get("deletionProtection") is True,
    }


def weakenings(base: dict[str, Any], head: dict[str, Any]) -> list[str]:
    """One message per way ``head`` is less safe than ``base`` (both plan JSON documents), when
    either side is staging or prod."""
    tier = strictest_tier(base, head)
    if tier not in GUARDED_TIERS or not base.get("resources"):
        return []
    before, complete = _safety(base)
    after, _ = _safety(head)
    out: list[str] = []
    if TIER_RANK.get(after.get("tier"), 0) < TIER_RANK.get(before.get("tier"), 0):
        out.append(f"the tier goes from {before.get('tier')} to {after.get('tier')}: that drops what "
                   f"{before.get('tier')} enforces (protected data disks and addresses, PREVENT, snapshots, "
                   "mandatory policies); a stack's tier is not lowered in place")
    old_levels, new_levels = before.get("enforcement") or {}, after.get("enforcement") or {}
    for name in sorted(set(old_levels) & set(new_levels)):
        if LEVEL_RANK.get(new_levels[name], 0) < LEVEL_RANK.get(old_levels[name], 0):
            out.append(f"policy {name} goes from {old_levels[name]} to {new_levels[name]} in {tier}")
    if before.get("snapshots") and after.get("snapshots") is False:
        out.append("daily snapshots of data disks are turned off")
    if complete:
        for key, what in (("extraZones", "TDX zones"), ("extraMachineTypes", "TDX machine types"),
                          ("allowedImages", "boot images allowed besides the stack's own")):
            added = sorted(set(after.get(key) or []) - set(before.get(key) or []))
            if added:
                out.append(f"the {what} widen: {', '.join(added)} added (dstack-fleet:"
                           f"{'policy.allowedImages' if key == 'allowedImages' else 'tdx.' + key})")
    old_by = {r["urn"]: r for r in base.get("resources", [])}
    for resource in head.get("resources", []):
        old = old_by.get(resource["urn"])
        if old is None:
            continue
        was, now = _protection(old), _protection(resource)
        lost = [name for name in was if was[name] and not now[name]]
        if lost:
            out.append(f"{resource['name']} ({resource['type'].split(':')[-1]}) loses {', '.join(lost)}")
    return out


def identity_weakenings(changes: list[dict[str, Any]], old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Stateful apps whose identity changes, by any route: a new compose, a changed key provider or
    pinned app id, a rename or removal (the old identity's data is left behind), or ``stateful``
    turned off (which would let the next change through)."""
    out = []
    for change in changes:
        if not change["stateful"] or change["new"]:
            continue
        if change["removed"]:
            out.append(f"stateful app {change['name']} is removed or renamed (app-id {change['before']}): its data "
                       "stays under keys nothing will hold; mark it stateful: false in a change of its own first")
        else:
            out.append(f"app {change['name']} would get a new identity (app-id {change['before']} → {change['after']}): "
                       "its keys change and its data becomes unreadable; a stateful app keeps its identity")
    for name in sorted(set(old) & set(new)):
        if (old[name] or {}).get("stateful") and not (new[name] or {}).get("stateful"):
            out.append(f"app {name} is no longer marked stateful: nothing would stop its next change from "
                       "replacing its identity")
    return out


def data_weakenings(tier: str | None, data_at_risk: list[str]) -> list[str]:
    """In prod every data disk or address replaced or deleted is refused; in staging a data disk."""
    if tier == "prod":
        return [f"data at risk: {item}" for item in data_at_risk]
    if tier == "staging":
        return [f"data at risk: {item}" for item in data_at_risk if ": Disk " in item]
    return []
