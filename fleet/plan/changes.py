"""How a change lands: which input changes replace a resource, need a stop, or update it live.

The table follows the Google provider's schema (ForceNew fields replace; the fields in
``needToStopInstanceBeforeUpdating`` stop the instance; everything else updates in place), for the
resource types this program uses. Field paths are Pulumi input names with list indexes dropped.
An input that is not in the table counts as a replacement: an unknown change is assumed to be the
worst case. The classification is an estimate for reviews and rollout checks; the real
``pulumi preview`` is authoritative.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from typing import Any, Iterable

REPLACE, STOP, LIVE = "replace", "stop", "live"
_RANK = {LIVE: 1, STOP: 2, REPLACE: 3}

# type -> {field path: action}; the longest matching path prefix wins.
FIELD_ACTIONS: dict[str, dict[str, str]] = {
    "gcp:compute/instance:Instance": {
        # replace (ForceNew)
        "name": REPLACE, "zone": REPLACE, "project": REPLACE, "hostname": REPLACE,
        "bootDisk": REPLACE, "bootDisk.autoDelete": LIVE, "bootDisk.initializeParams.size": LIVE,
        "confidentialInstanceConfig": REPLACE, "metadataStartupScript": REPLACE,
        "networkInterfaces": REPLACE, "networkInterfaces.networkIp": REPLACE, "networkInterfaces.nicType": REPLACE,
        "networkInterfaces.queueCount": REPLACE, "networkInterfaces.ipv6AccessConfigs": REPLACE,
        "networkInterfaces.accessConfigs": LIVE,
        "networkInterfaces.network": STOP, "networkInterfaces.subnetwork": STOP,
        "networkPerformanceConfig": REPLACE, "guestAccelerators": REPLACE, "scratchDisks": REPLACE,
        "reservationAffinity": REPLACE, "keyRevocationActionType": REPLACE, "instanceEncryptionKey": REPLACE,
        "params": REPLACE, "workloadIdentityConfig": REPLACE,
        "scheduling": LIVE, "scheduling.preemptible": REPLACE, "scheduling.provisioningModel": REPLACE,
        "scheduling.terminationTime": REPLACE, "scheduling.maxRunDuration": REPLACE,
        "scheduling.onInstanceStopAction": REPLACE, "scheduling.localSsdRecoveryTimeout": REPLACE,
        "scheduling.nodeAffinities": STOP,
        "advancedMachineFeatures": STOP, "advancedMachineFeatures.enableUefiNetworking": REPLACE,
        # stop (needToStopInstanceBeforeUpdating)
        "machineType": STOP, "minCpuPlatform": STOP, "serviceAccount": STOP, "shieldedInstanceConfig": STOP,
        "enableDisplay": STOP,
        # live
        "metadata": LIVE, "tags": LIVE, "labels": LIVE, "description": LIVE, "deletionProtection": LIVE,
        "resourcePolicies": LIVE, "attachedDisks": LIVE, "allowStoppingForUpdate": LIVE, "desiredStatus": LIVE,
        "deletionPolicy": LIVE, "canIpForward": STOP,
    },
    "gcp:compute/disk:Disk": {
        "name": REPLACE, "zone": REPLACE, "project": REPLACE, "type": REPLACE, "image": REPLACE,
        "snapshot": REPLACE, "description": REPLACE, "diskEncryptionKey": REPLACE, "interface": REPLACE,
        "physicalBlockSizeBytes": REPLACE, "sourceImageEncryptionKey": REPLACE, "storagePool": REPLACE,
        # growing updates live; shrinking replaces (see SHRINK_REPLACES)
        "size": LIVE, "labels": LIVE, "resourcePolicies": LIVE, "provisionedIops": LIVE,
        "provisionedThroughput": LIVE, "deletionPolicy": LIVE, "accessMode": LIVE,
    },
    "gcp:compute/address:Address": {
        "name": REPLACE, "address": REPLACE, "addressType": REPLACE, "subnetwork": REPLACE, "network": REPLACE,
        "region": REPLACE, "purpose": REPLACE, "networkTier": REPLACE, "project": REPLACE, "description": REPLACE,
        "ipVersion": REPLACE, "prefixLength": REPLACE, "labels": LIVE, "deletionPolicy": LIVE,
    },
    "gcp:compute/image:Image": {"labels": LIVE, "deletionPolicy": LIVE, "": REPLACE},
    "gcp:compute/firewall:Firewall": {
        "name": REPLACE, "network": REPLACE, "project": REPLACE, "direction": REPLACE, "": LIVE,
    },
    "gcp:compute/network:Network": {
        "name": REPLACE, "project": REPLACE, "autoCreateSubnetworks": REPLACE, "description": REPLACE,
        "routingMode": LIVE, "mtu": LIVE, "deleteDefaultRoutesOnCreate": LIVE, "deletionPolicy": LIVE,
    },
    "gcp:compute/subnetwork:Subnetwork": {
        "name": REPLACE, "network": REPLACE, "region": REPLACE, "project": REPLACE, "ipCidrRange": REPLACE,
        "privateIpGoogleAccess": LIVE, "logConfig": LIVE, "secondaryIpRanges": LIVE, "description": LIVE,
        "deletionPolicy": LIVE,
    },
    "gcp:compute/router:Router": {"name": REPLACE, "network": REPLACE, "region": REPLACE, "project": REPLACE,
                                  "": LIVE},
    "gcp:compute/routerNat:RouterNat": {"name": REPLACE, "router": REPLACE, "region": REPLACE, "project": REPLACE,
                                        "": LIVE},
    "gcp:compute/resourcePolicy:ResourcePolicy": {"": REPLACE},
    "gcp:compute/diskResourcePolicyAttachment:DiskResourcePolicyAttachment": {"": REPLACE},
    # pulumi-command: a changed create (with no update script) or trigger re-runs as a replacement
    "command:local:Command": {"": REPLACE},
    # an app's VM on a dstack VMM host: a new name or host replaces it; any other change stops the VM,
    # updates it and starts it again (components/vmm.py)
    "pulumi-python:dynamic/vmm:Vm": {"url": REPLACE, "name": REPLACE, "ports": LIVE, "tokenSecret": LIVE,
                                     "apiVersion": LIVE, "stopTimeout": LIVE, "": STOP},
}


# Sizes that only grow in place: a smaller value recreates the resource. pulumi-gcp 10.2.0,
# compute/disk.py, Disk ``size``: "the provider updates the disk size if upsizing is detected but
# recreates the disk if downsizing is requested".
SHRINK_REPLACES: dict[str, tuple[str, ...]] = {"gcp:compute/disk:Disk": ("size",)}


def shrinks(type_: str, path: str, old_inputs: dict, new_inputs: dict) -> bool:
    """Whether the change of ``path`` is a size going down where that means a replacement."""
    if path not in SHRINK_REPLACES.get(type_, ()):
        return False
    old, new = old_inputs.get(path), new_inputs.get(path)
    return isinstance(old, (int, float)) and isinstance(new, (int, float)) and new < old


def strip_indexes(path: str) -> str:
    out, depth = [], 0
    for ch in path:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif depth == 0:
            out.append(ch)
    return "".join(out)


def action_for(type_: str, path: str) -> str:
    """The action a change of ``path`` (a dotted input path) causes on a resource of ``type_``."""
    table = FIELD_ACTIONS.get(type_)
    if table is None:
        return REPLACE
    path = strip_indexes(path)
    best = None
    for key in table:
        if key == "" or path == key or path.startswith(key + "."):
            if best is None or len(key) > len(best):
                best = key
    return table[best] if best is not None else REPLACE


UNKNOWN = "<computed>"


def unknown_paths(value: Any, prefix: str = "") -> list[str]:
    if value == UNKNOWN:
        return [prefix]
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in unknown_paths(v, f"{prefix}.{k}" if prefix else k)]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in unknown_paths(v, f"{prefix}[{i}]")]
    return []


def changed_paths(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Leaf paths whose values differ; a list that changes length counts as its own path."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            path = f"{prefix}.{key}" if prefix else key
            if key not in old or key not in new:
                out.append(path)
            else:
                out += changed_paths(old[key], new[key], path)
        return out
    if isinstance(old, list) and isinstance(new, list):
        if len(old) != len(new):
            return [prefix]
        out = []
        for i, (a, b) in enumerate(zip(old, new)):
            out += changed_paths(a, b, f"{prefix}[{i}]")
        return out
    return [] if old == new else [prefix]


@dataclass
class ResourceChange:
    urn: str
    type: str
    action: str  # create | delete | replace | stop | live | none
    reasons: list[tuple[str, str]] = field(default_factory=list)  # (path, action)


def classify(old: dict | None, new: dict | None) -> ResourceChange:
    """Compare one resource of two plans (plan-JSON resource objects)."""
    if old is None and new is None:
        raise ValueError("nothing to classify")
    if old is None:
        return ResourceChange(new["urn"], new["type"], "create")
    if new is None:
        return ResourceChange(old["urn"], old["type"], "delete")
    if not new.get("custom", True):
        return ResourceChange(new["urn"], new["type"], "none")
    reasons = []
    forced = set(new.get("options", {}).get("replaceOnChanges") or [])
    paths = changed_paths(old.get("inputs", {}), new.get("inputs", {}))
    # A value computed by a provider shows as <computed> on both sides; it changed when it now comes
    # from a different resource (e.g. a new image version).
    old_deps, new_deps = old.get("propertyDependencies"), new.get("propertyDependencies")
    comparable = old_deps is not None and new_deps is not None  # plans from older code lack them
    for key, value in new.get("inputs", {}).items() if comparable else ():
        if key in old.get("inputs", {}) and sorted(old_deps.get(key, [])) != sorted(new_deps.get(key, [])):
            paths += [p for p in unknown_paths(value, key) if p not in paths]
    # A dstack guest reads its configuration disk once per boot: swapping it is applied by a reset.
    reboots_on_disks = new["type"] == INSTANCE_TYPE and (new.get("inputs", {}).get("labels") or {}).get("kind") == "dstack"
    # pulumi-command 1.2.1: with an `update` script, any input change (triggers included) runs it in place
    updates_in_place = new["type"] == COMMAND_TYPE and bool(new.get("inputs", {}).get("update"))
    for path in paths:
        action = LIVE if updates_in_place else action_for(new["type"], path)
        if shrinks(new["type"], path, old.get("inputs", {}), new.get("inputs", {})):
            action = REPLACE
        if reboots_on_disks and strip_indexes(path).startswith("attachedDisks"):
            action = STOP
        top = strip_indexes(path)
        if "*" in forced or any(top == f or top.startswith(f + ".") for f in forced):
            action = REPLACE
        reasons.append((path, action))
    if not reasons:
        return ResourceChange(new["urn"], new["type"], "none")
    worst = max((a for _, a in reasons), key=_RANK.__getitem__)
    return ResourceChange(new["urn"], new["type"], worst, reasons)


def diff(old_resources: Iterable[dict], new_resources: Iterable[dict]) -> list[ResourceChange]:
    old = {r["urn"]: r for r in old_resources}
    new = {r["urn"]: r for r in new_resources}
    return [classify(old.get(u), new.get(u)) for u in sorted(set(old) | set(new))]


# ---- rollout: nodes replaced or stopped per group ------------------------------------------------

NODE_TYPES = ("dstack-fleet:nodes:OverlayNode", "dstack-fleet:nodes:DstackNode")
INSTANCE_TYPE = "gcp:compute/instance:Instance"
COMMAND_TYPE = "command:local:Command"
DATA_TYPES = ("gcp:compute/disk:Disk", "gcp:compute/address:Address")
RESET_MARK = "gcloud compute instances reset "  # a node's own step whose update resets the node


@dataclass
class GroupRollout:
    group: str
    max_unavailable: int
    replaced: list[str] = field(default_factory=list)
    stopped: list[str] = field(default_factory=list)
    created: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    data_at_risk: list[str] = field(default_factory=list)  # data disks / addresses replaced or deleted
    reset: list[str] = field(default_factory=list)  # of the stopped: nodes a step resets (reads its config at boot)
    targets: dict[str, list[str]] = field(default_factory=dict)  # node -> URNs a targeted update of it needs
    images: dict[str, tuple[str | None, str | None]] = field(default_factory=dict)  # node -> image key before, after
    stack: str = ""

    @property
    def unavailable(self) -> int:
        return len(self.replaced) + len(self.stopped)

    @property
    def over_limit(self) -> bool:
        return self.unavailable > self.max_unavailable


def _node_of(resource: dict, by_urn: dict[str, dict]) -> dict | None:
    parent = resource.get("parent")
    while parent:
        owner = by_urn.get(parent)
        if owner is None:
            return None
        if owner["type"] in NODE_TYPES:
            return owner
        parent = owner.get("parent")
    return None


def _needs(urn: str, new_by: dict[str, dict], created: set[str]) -> list[str]:
    """``urn`` and every resource it depends on (transitively) that the change creates: what a
    targeted update of it must name, since Pulumi refuses a target whose new dependency is not one."""
    out, frontier = [urn], [urn]
    while frontier:
        resource = new_by.get(frontier.pop())
        if resource is None:
            continue
        deps = set(resource.get("dependencies") or [])
        for more in (resource.get("propertyDependencies") or {}).values():
            deps.update(more)
        parent = resource.get("parent")
        if parent:
            deps.add(parent)
        for dep in sorted(deps):
            if dep in created and dep not in out:
                out.append(dep)
                frontier.append(dep)
    return out


def rollout(old_resources: list[dict], new_resources: list[dict], old_outputs: dict | None = None,
            new_outputs: dict | None = None) -> dict[str, GroupRollout]:
    """Per node group: which nodes a change replaces, stops, creates or removes, and what a targeted
    update of each taken-down node must name (for waves)."""
    old_by = {r["urn"]: r for r in old_resources}
    new_by = {r["urn"]: r for r in new_resources}
    groups: dict[str, GroupRollout] = {}
    all_changes = diff(old_resources, new_resources)
    created = {c.urn for c in all_changes if c.action == "create"}
    old_nodes = (old_outputs or {}).get("nodes") or {}
    new_nodes = (new_outputs or {}).get("nodes") or {}

    def group_of(node: dict) -> GroupRollout:
        inputs = node.get("inputs", {})
        name = inputs.get("group", node["name"])
        rollout = groups.setdefault(name, GroupRollout(name, int(inputs.get("maxUnavailable", 1))))
        if node["urn"] in new_by:
            rollout.max_unavailable = int(new_by[node["urn"]]["inputs"].get("maxUnavailable", 1))
        return rollout

    for change in all_changes:
        resource = new_by.get(change.urn) or old_by.get(change.urn)
        if resource["type"] in NODE_TYPES:
            g = group_of(resource)
            if change.action == "create":
                g.created.append(resource["name"])
            elif change.action == "delete":
                g.removed.append(resource["name"])
            continue
        node = _node_of(resource, new_by if change.urn in new_by else old_by)
        if node is None:
            continue
        g = group_of(node)
        key = node["name"]
        g.stack = g.stack or change.urn.split("::", 1)[0].removeprefix("urn:pulumi:")
        resets = (resource["type"] == COMMAND_TYPE and change.action == LIVE
                  and RESET_MARK in str(resource.get("inputs", {}).get("update", "")))
        if (resource["type"] == INSTANCE_TYPE and change.action in (REPLACE, STOP)) or resets:
            target = g.replaced if change.action == REPLACE else g.stopped
            if key not in target:
                target.append(key)
            if resets and key not in g.reset:
                g.reset.append(key)
            needed = g.targets.setdefault(key, [])
            needed += [u for u in _needs(change.urn, new_by, created) if u not in needed and u != node["urn"]]
            g.images[key] = ((old_nodes.get(key) or {}).get("image"), (new_nodes.get(key) or {}).get("image"))
        # configuration disks are versions made to be replaced; only data disks and addresses hold state
        versioned = "dstack-fleet:nodes:ConfigDisk$" in change.urn
        if resource["type"] in DATA_TYPES and not versioned and change.action in (REPLACE, "delete") \
                and change.urn in old_by:
            if key not in (g.removed + g.created):
                g.data_at_risk.append(f"{key}: {resource['type'].split(':')[-1]} {change.action}")
    for g in groups.values():
        g.stopped = [k for k in g.stopped if k not in g.replaced]
        for items in (g.replaced, g.stopped, g.created, g.removed):
            items.sort()
    return dict(sorted(groups.items()))


def _ordinal(key: str) -> int:
    tail = key.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else 0


def waves(g: GroupRollout, last: str | None = None) -> list[list[str]]:
    """The nodes a change takes down, at most ``maxUnavailable`` per wave, by ordinal, with ``last``
    (the overlay's genesis node, which keeps the founding mark) in the last wave."""
    nodes = sorted(g.replaced + g.stopped, key=lambda k: (k == last, _ordinal(k), k))
    size = max(1, g.max_unavailable)
    return [nodes[i:i + size] for i in range(0, len(nodes), size)]


def wave_command(g: GroupRollout, nodes: list[str]) -> str:
    """A targeted update of exactly these nodes (and what they newly depend on), with the policy pack."""
    urns: list[str] = []
    for key in nodes:
        urns += [u for u in g.targets.get(key, []) if u not in urns]
    # quoted: a URN holds `$` (parent type chains), which a shell would expand
    return " ".join(["python -m fleet deploy up --stack", shlex.quote(g.stack or "STACK")]
                    + [shlex.quote(f"--pulumi-arg=--target={u}") for u in urns])


def rollout_hint(g: GroupRollout, declared_images: set[str] | None = None, last: str | None = None) -> str:
    """A step that works for this change: pin the waiting nodes to the image key they run now when
    that key is still declared; otherwise apply the change as targeted updates, wave by wave."""
    plan = waves(g, last)
    keep = plan[0]
    befores = {before for key, (before, after) in g.images.items() if before != after}
    if (g.replaced and not g.stopped and len(befores) == 1 and None not in befores
            and all(g.images.get(k, (None, None))[0] != g.images.get(k, (None, None))[1] for k in g.replaced)
            and declared_images is not None and next(iter(befores)) in declared_images):
        old = next(iter(befores))
        wait = [k for k in g.replaced if k not in keep]
        pins = ", ".join(f"{_ordinal(k)}: {old}" for k in sorted(wait, key=_ordinal))
        return (f"keep the others on {old!r} for now: set group {g.group}'s imageOverrides to {{{pins}}}, then "
                f"shrink it by at most {g.max_unavailable} node(s) per change")
    order = ", ".join("+".join(w) for w in plan)
    return (f"roll it with `make rollout STACK={g.stack or 'STACK'}`: {len(plan)} wave(s) of targeted updates, each "
            f"once the last one's nodes are healthy and verified, in this order: {order} (by hand: the commands "
            "under 'Rollout waves', then the rest with `make up`)")


def over_limit(groups: dict[str, GroupRollout], declared_images: set[str] | None = None,
               last: str | None = None) -> list[str]:
    return [f"group {g.group} would take {g.unavailable} node(s) down at once ({', '.join(g.replaced + g.stopped)}); "
            f"maxUnavailable is {g.max_unavailable}: {rollout_hint(g, declared_images, last)}"
            for g in groups.values() if g.over_limit]


def whole_overlay_down(groups: dict[str, GroupRollout], members: list[str]) -> str | None:
    """A change that takes every member of an overlay of two or more down at once: its shared
    secret exists only in the running members, so it would be gone for good."""
    down = {k for g in groups.values() for k in g.replaced + g.stopped}
    if len(members) >= 2 and set(members) <= down:
        return (f"the change takes every member of the overlay down at once ({', '.join(sorted(members, key=_ordinal))}): "
                "its shared secret lives only in running members and would be lost for good; roll it in waves")
    return None
