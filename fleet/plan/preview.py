"""What the real CLI's ``pulumi preview --json`` says a change does to the nodes, the rules ``make up``
and ``make rollout`` hold it to, and the waves a large change is applied in.

The document is the CLI's preview digest (pulumi/pulumi ``pkg/display/json.go`` ``PreviewDigest``,
written by ``pkg/backend/display/json.go`` ``ShowPreviewDigest``; read at 1b5949891b3c, the newest
snapshot available, see docs/assumptions.md): top-level ``steps``, ``diagnostics``,
``changeSummary`` and ``duration`` (nanoseconds); per step ``op``, ``urn``, ``provider``,
``oldState``/``newState`` (``apitype.ResourceV3``: type, inputs, outputs, parent, dependencies,
propertyDependencies, deletedWith), ``diffReasons``, ``replaceReasons`` and ``detailedDiff``
(``{path: {kind, inputDiff}}``, kinds ``add``, ``update``, ``delete`` and their ``-replace`` forms).
``same`` steps appear only with ``--show-sames``; with ``--show-replacement-steps`` one replacement is
``replace`` plus ``create-replacement`` and ``delete-replaced`` for the same URN; with ``--refresh``
every resource also has a ``refresh`` step whose new state is what the cloud reports now, which is
where a node that is already down shows (the instance's ``currentStatus`` output, pulumi-gcp 10.2.0
``compute.Instance.current_status``: PROVISIONING, STAGING, RUNNING, STOPPING, SUSPENDING,
SUSPENDED, REPAIRING or TERMINATED).

Everything is counted per node (the URN of its ``OverlayNode``/``DstackNode`` component), never per
step: a node is *disrupted* when its instance is replaced or stopped, or when its ``apply-config``
step resets it (a dstack node's new configuration disk). How an instance update lands follows the
change table (``fleet.plan.changes``), with the engine's ``-replace`` kinds taking precedence.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fleet.attest import measure
from fleet.plan import changes
from fleet.plan.diff import identity_changes

REPLACEMENT_OPS = ("replace", "create-replacement", "delete-replaced")
# ops that change nothing in the cloud (pkg/resource/deploy/step.go StepOps)
PASSIVE_OPS = ("same", "refresh", "read", "read-replacement", "discard", "discard-replaced")
RUNNING = "RUNNING"
NODE_TYPES = changes.NODE_TYPES
INSTANCE_TYPE = changes.INSTANCE_TYPE
RESET_SUFFIX = "-apply-config"  # components/dstacknode.py: the step that resets a node for a new config disk
DISRUPTIONS = ("replace", "stop", "reset")
ROOT_STACK_TYPE = "pulumi:pulumi:Stack"


class PreviewError(Exception):
    """The CLI's output is not a preview document this code understands."""


# ---- the document ----------------------------------------------------------------------------------

def urn_type(urn: str) -> str:
    """The resource's own type (the last ``$`` segment of the URN's qualified type)."""
    parts = urn.split("::")
    return parts[2].rsplit("$", 1)[-1] if len(parts) >= 4 else ""


def urn_name(urn: str) -> str:
    return urn.split("::", 3)[-1] if urn.count("::") >= 3 else urn


@dataclass(frozen=True)
class Step:
    op: str
    urn: str
    old: dict[str, Any] | None
    new: dict[str, Any] | None
    diff_reasons: tuple[str, ...] = ()
    replace_reasons: tuple[str, ...] = ()
    detailed_diff: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    @property
    def drift(self) -> bool:
        """An ``update`` that only a refresh found: none of its paths is an input of the resource (the
        digest shows a refresh that saw a difference as an update of outputs such as
        ``currentStatus``). The program changes inputs; this changes nothing."""
        if self.op != "update":
            return False
        paths = list(self.detailed_diff) or list(self.diff_reasons)
        inputs = {k for state in self.states() for k in (state.get("inputs") or {})}
        return bool(paths) and not any(_top(p) in inputs for p in paths)

    @property
    def changes(self) -> bool:
        return self.op not in PASSIVE_OPS and not self.drift

    def states(self) -> list[dict[str, Any]]:
        return [s for s in (self.old, self.new) if s]


def _top(path: str) -> str:
    return re.split(r"[.\[]", path, maxsplit=1)[0]


def dependencies(state: Mapping[str, Any], *, parent: bool = True) -> set[str]:
    """What a state depends on as the engine sees it (``State.GetAllDependencies``: parent,
    dependencies, property dependencies, deleted-with)."""
    out = set(state.get("dependencies") or [])
    for urns in (state.get("propertyDependencies") or {}).values():
        out.update(urns or [])
    if state.get("deletedWith"):
        out.add(state["deletedWith"])
    if parent and state.get("parent"):
        out.add(state["parent"])
    return out


@dataclass
class Preview:
    steps: list[Step]
    diagnostics: list[dict[str, Any]] = field(default_factory=list)
    change_summary: dict[str, int] = field(default_factory=dict)
    duration_ns: int | None = None

    def __post_init__(self) -> None:
        self.by_urn: dict[str, list[Step]] = {}
        for step in self.steps:
            self.by_urn.setdefault(step.urn, []).append(step)
        self.parents = {s.urn: st["parent"] for s in self.steps for st in s.states() if st.get("parent")}

    def ops(self, urn: str) -> set[str]:
        return {s.op for s in self.by_urn.get(urn, ())}

    def changed(self, urn: str) -> bool:
        return any(s.changes for s in self.by_urn.get(urn, ()))

    def changed_urns(self) -> list[str]:
        return sorted(u for u in self.by_urn if self.changed(u))

    def states(self, urn: str) -> list[dict[str, Any]]:
        return [st for s in self.by_urn.get(urn, ()) for st in s.states()]

    def dependencies(self, urn: str, *, new_only: bool = False) -> set[str]:
        out: set[str] = set()
        for s in self.by_urn.get(urn, ()):
            for state in ([s.new] if new_only else s.states()):
                if state:
                    out |= dependencies(state)
        return out

    def errors(self) -> list[str]:
        return [d.get("message", "").strip() for d in self.diagnostics if d.get("severity") == "error"]

    def deployed_outputs(self) -> dict[str, Any]:
        """The stack outputs of the deployed state (the root stack's old state)."""
        for step in self.steps:
            if urn_type(step.urn) == ROOT_STACK_TYPE and step.old:
                return dict(step.old.get("outputs") or {})
        return {}

    def instance_status(self, urn: str) -> str | None:
        """The instance's status as the cloud reports it now: a refresh step's new state, else the
        old state of the last step (with ``--refresh`` the program's step diffs against the
        refreshed state; a refresh that saw a difference precedes it as an update)."""
        steps = self.by_urn.get(urn, [])
        for step in steps:
            if step.op == "refresh" and step.new and "currentStatus" in (step.new.get("outputs") or {}):
                return step.new["outputs"]["currentStatus"]
        for step in reversed(steps):
            if step.old and step.op != "refresh":
                return (step.old.get("outputs") or {}).get("currentStatus")
        return None

    def existed(self, urn: str) -> bool:
        return any(s.old for s in self.by_urn.get(urn, ()))


def _strings(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise PreviewError(f"{where} is not a list of property names")
    return tuple(value)


def parse(text: str, source: str = "pulumi preview --json") -> Preview:
    """A preview digest, checked; raises ``PreviewError`` naming the first problem."""
    try:
        document = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        first = (text.strip().splitlines() or ["(no output)"])[0][:120]
        raise PreviewError(f"{source} printed no JSON document ({exc.msg} at line {exc.lineno}); it began: {first}") \
            from None
    if not isinstance(document, dict):
        raise PreviewError(f"{source}: the document is not a JSON object")
    raw_steps = document.get("steps") or []
    if not isinstance(raw_steps, list):
        raise PreviewError(f"{source}: steps is not a list")
    steps = []
    for index, raw in enumerate(raw_steps):
        where = f"{source}: steps[{index}]"
        if not isinstance(raw, dict) or not isinstance(raw.get("op"), str) or not isinstance(raw.get("urn"), str):
            raise PreviewError(f"{where} has no op and urn")
        for key in ("oldState", "newState"):
            if raw.get(key) is not None and not isinstance(raw[key], dict):
                raise PreviewError(f"{where}.{key} is not an object")
        detailed = raw.get("detailedDiff")
        detailed = {} if detailed is None else detailed
        if not isinstance(detailed, dict) or not all(isinstance(v, dict) for v in detailed.values()):
            raise PreviewError(f"{where}.detailedDiff is not an object of property diffs")
        steps.append(Step(raw["op"], raw["urn"], raw.get("oldState"), raw.get("newState"),
                          _strings(raw.get("diffReasons"), f"{where}.diffReasons"),
                          _strings(raw.get("replaceReasons"), f"{where}.replaceReasons"), detailed))
    diagnostics = document.get("diagnostics") or []
    if not isinstance(diagnostics, list):
        raise PreviewError(f"{source}: diagnostics is not a list")
    summary = document.get("changeSummary") or {}
    duration = document.get("duration")
    return Preview(steps, [d for d in diagnostics if isinstance(d, dict)],
                   {k: v for k, v in summary.items() if isinstance(v, int)} if isinstance(summary, dict) else {},
                   duration if isinstance(duration, int) else None)


# ---- the fleet: which node each resource belongs to -----------------------------------------------

@dataclass(frozen=True)
class NodeInfo:
    key: str
    group: str
    kind: str  # overlay | dstack
    ordinal: int
    max_unavailable: int
    genesis: bool = False  # the overlay's genesis node (it keeps the founding mark): rolled last, as the diff lists


def _kind(type_: str) -> str:
    return "overlay" if type_.endswith(":OverlayNode") else "dstack"


def fleet_view(plan: Mapping[str, Any]) -> dict[str, NodeInfo]:
    """Nodes of the offline plan (``python -m fleet plan --json``), from their components' inputs."""
    out = {}
    genesis = ((plan.get("outputs") or {}).get("overlay") or {}).get("genesis")
    for resource in plan.get("resources") or []:
        if resource.get("type") in NODE_TYPES:
            inputs = resource.get("inputs") or {}
            out[resource["name"]] = NodeInfo(resource["name"], str(inputs.get("group", resource["name"])),
                                             _kind(resource["type"]), int(inputs.get("ordinal", 0)),
                                             int(inputs.get("maxUnavailable", 1)), resource["name"] == genesis)
    return out


@dataclass
class NodeChange:
    """One node: what the change does to it and how it is now."""

    info: NodeInfo
    urn: str | None = None  # its component's URN, when the preview shows it
    effects: dict[str, list[str]] = field(default_factory=dict)  # replace|stop|reset|create|delete|live -> reasons
    status: str | None = None  # the instance's refreshed status
    exists: bool = False  # the deployed state has its instance

    @property
    def key(self) -> str:
        return self.info.key

    @property
    def disrupted(self) -> bool:
        return any(e in self.effects for e in DISRUPTIONS)

    @property
    def down(self) -> bool:
        return self.exists and self.status is not None and self.status != RUNNING

    @property
    def removed(self) -> bool:
        return "delete" in self.effects

    def effect(self) -> str:
        return next((e for e in (*DISRUPTIONS, "delete", "create", "live") if e in self.effects), "none")

    def describe(self) -> str:
        effect = self.effect()
        reasons = sorted(set(self.effects.get(effect, [])))
        shown = ", ".join(reasons[:3]) + (f", +{len(reasons) - 3}" if len(reasons) > 3 else "")
        return f"{self.key}: {effect}" + (f" ({shown})" if shown else "")


@dataclass
class Group:
    name: str
    kind: str
    max_unavailable: int
    nodes: list[NodeChange]

    @property
    def down(self) -> list[NodeChange]:
        return [n for n in self.nodes if n.down]

    @property
    def disrupted(self) -> list[NodeChange]:
        return [n for n in self.nodes if n.disrupted]

    def unavailable(self) -> list[str]:
        return sorted({n.key for n in self.nodes if n.down or n.disrupted}, key=self.order)

    def order(self, key: str) -> tuple[int, str]:
        node = next((n for n in self.nodes if n.key == key), None)
        return (node.info.ordinal if node else 0, key)


@dataclass
class Analysis:
    preview: Preview
    nodes: dict[str, NodeChange]
    groups: dict[str, Group]
    owner: dict[str, str]  # URN -> node key, for every URN inside a node

    def outside(self) -> list[str]:
        """Changed URNs that belong to no node."""
        return [u for u in self.preview.changed_urns() if u not in self.owner]

    def overlay_members(self) -> list[NodeChange]:
        return [n for n in self.nodes.values() if n.info.kind == "overlay" and n.exists]


def _node_key_of(urn: str, preview: Preview, known: Iterable[str]) -> str | None:
    """The node ``urn`` belongs to: up its parents to a node component; when the preview leaves a
    parent out, the URN's qualified type starts with the node's type and its name with the key."""
    seen = set()
    current: str | None = urn
    while current and current not in seen:
        seen.add(current)
        if urn_type(current) in NODE_TYPES:
            return urn_name(current)
        current = preview.parents.get(current)
    qualified = urn.split("::")[2] if urn.count("::") >= 3 else ""
    if qualified.split("$", 1)[0] in NODE_TYPES:
        name = urn_name(urn)
        matches = [k for k in known if name == k or name.startswith(k + "-")]
        if matches:
            return max(matches, key=len)
    return None


def _update_effects(step: Step, kind: str) -> tuple[str, list[str]]:
    """How an instance update lands: the engine's ``-replace`` kinds, else the change table."""
    paths = list(step.detailed_diff) or list(step.diff_reasons)
    if not paths:
        return "stop", ["update without a diff (assumed to stop)"]
    worst, reasons = "live", []
    rank = {"live": 0, "stop": 1, "replace": 2}
    for path in sorted(paths):
        diff_kind = str(step.detailed_diff.get(path, {}).get("kind", ""))
        if diff_kind.endswith("-replace"):
            action = changes.REPLACE
        else:
            action = changes.action_for(INSTANCE_TYPE, path)
            # a dstack guest reads its configuration disk once per boot (fleet.plan.changes.classify)
            if kind == "dstack" and changes.strip_indexes(path).startswith("attachedDisks") and action != changes.REPLACE:
                action = changes.STOP
        reasons.append(path)
        if rank[action] > rank[worst]:
            worst = action
    return worst, reasons


def _effect(node: NodeChange, effect: str, reasons: Iterable[str]) -> None:
    found = node.effects.setdefault(effect, [])
    found += [r for r in reasons if r not in found]


def analyze(preview: Preview, view: Mapping[str, NodeInfo], group_order: Iterable[str] = ()) -> Analysis:
    """Per node of the plan (and of the deployed state): effects of the change and live status."""
    components: dict[str, str] = {}
    for urn in preview.by_urn:
        if urn_type(urn) in NODE_TYPES:
            components[urn_name(urn)] = urn
    nodes: dict[str, NodeChange] = {k: NodeChange(info) for k, info in view.items()}
    for key, urn in components.items():
        if key not in nodes:  # deployed but no longer planned: its component's old inputs say where it was
            inputs = next((st.get("inputs") or {} for st in preview.states(urn)), {})
            nodes[key] = NodeChange(NodeInfo(key, str(inputs.get("group", key.rsplit("-", 1)[0])), _kind(urn_type(urn)),
                                             int(inputs.get("ordinal", 0)), int(inputs.get("maxUnavailable", 1))))
        nodes[key].urn = urn
    owner: dict[str, str] = {}
    for urn in preview.by_urn:
        key = _node_key_of(urn, preview, nodes)
        if key is not None and key in nodes:
            owner[urn] = key
    for urn, key in owner.items():
        node = nodes[key]
        kind, type_ = node.info.kind, urn_type(urn)
        if type_ == INSTANCE_TYPE:
            if preview.existed(urn):
                node.exists = True
                node.status = preview.instance_status(urn)
            for step in preview.by_urn[urn]:
                if step.op in REPLACEMENT_OPS:
                    _effect(node, "replace", [p for p, d in step.detailed_diff.items()
                                              if str(d.get("kind", "")).endswith("-replace")] or step.replace_reasons)
                elif step.op == "update" and not step.drift:
                    _effect(node, *_update_effects(step, kind))
                elif step.op == "delete":
                    _effect(node, "delete", [])
                elif step.op in ("create", "import"):
                    _effect(node, "create", [])
        elif type_ == "command:local:Command" and urn_name(urn).endswith(RESET_SUFFIX):
            if any(step.changes and (step.op == "update" or step.op in REPLACEMENT_OPS) for step in preview.by_urn[urn]):
                _effect(node, "reset", ["new configuration disk: gcloud compute instances reset"])
    order = list(dict.fromkeys([*group_order, *sorted({n.info.group for n in nodes.values()})]))
    groups: dict[str, Group] = {}
    for name in order:
        members = sorted((n for n in nodes.values() if n.info.group == name), key=lambda n: (n.info.ordinal, n.key))
        if members:
            # the planned setting (the one this change applies); a group being removed keeps its old one
            setting = next((n.info for n in members if n.key in view), members[0].info)
            groups[name] = Group(name, members[0].info.kind, setting.max_unavailable, members)
    return Analysis(preview, nodes, groups, owner)


# ---- rules -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Finding:
    subject: str  # what an acknowledgement names: group:<name>, identity:app:<name>; or overlay, data
    message: str
    ackable: bool

    def __str__(self) -> str:
        return self.message + (f" (acknowledge with ACK={self.subject})" if self.ackable else "")


ACK_PATTERN = re.compile(r"(group:[a-z][a-z0-9-]*|identity:app:[a-z0-9][a-z0-9-]*)")


def parse_acks(values: Iterable[str]) -> tuple[set[str], list[str]]:
    """(acknowledgements, problems): tokens separated by commas or spaces."""
    acks, problems = set(), []
    for value in values:
        for token in re.split(r"[,\s]+", value.strip()):
            if not token:
                continue
            if ACK_PATTERN.fullmatch(token):
                acks.add(token)
            else:
                problems.append(f"acknowledgement {token!r} names nothing: use group:<group> or identity:app:<app>")
    return acks, problems


def _names(nodes: Iterable[NodeChange]) -> str:
    return ", ".join(n.key for n in nodes)


def group_findings(analysis: Analysis, *, waves: bool) -> list[Finding]:
    """More than ``maxUnavailable`` nodes of a group down at once, counting the ones already down.
    In waves, only a group with no room left for even one node is a finding."""
    out = []
    for group in analysis.groups.values():
        disrupted = group.disrupted
        if not disrupted:
            continue
        down = group.down
        already = [n for n in down if not n.disrupted]
        downs = f"; already down: {', '.join(f'{n.key} ({n.status})' for n in down)}" if down else ""
        if waves:
            if len(already) >= group.max_unavailable and not any(n.down for n in disrupted):
                out.append(Finding(f"group:{group.name}", f"group {group.name} already has {len(already)} node(s) "
                                   f"down ({_names(already)}) and maxUnavailable is {group.max_unavailable}: no "
                                   "wave fits; bring them back (or fix them in this change) first", False))
            continue
        unavailable = group.unavailable()
        if len(unavailable) > group.max_unavailable:
            out.append(Finding(f"group:{group.name}", f"group {group.name} would have {len(unavailable)} node(s) "
                               f"down at once ({'; '.join(n.describe() for n in disrupted)}{downs}); maxUnavailable "
                               f"is {group.max_unavailable}: roll it in waves with `make rollout`", True))
    return out


def overlay_findings(analysis: Analysis, *, waves: bool) -> list[Finding]:
    """No change may take every node of the overlay down at once: the shared secret lives only in
    the running members, so it would be lost for good."""
    members = analysis.overlay_members()
    touched = [n for n in members if n.disrupted or n.removed]
    if not members or not touched:
        return []
    up = [n for n in members if not n.down and not n.removed]
    if waves:
        lost = not up or (len(up) == 1 and up[0].disrupted)
    else:
        lost = all(n.down or n.disrupted or n.removed for n in members)
    if not lost:
        return []
    holding = f" (up now: {_names(up)})" if up else " (none is up now)"
    return [Finding("overlay", f"the overlay would lose every member holding its shared secret "
                    f"({'; '.join(n.describe() for n in touched)}){holding}: it could never be recovered; "
                    "keep one member up (add a node first, or roll with `make rollout`)", False)]


def app_identities(old_measurements: Mapping[str, Any], new_measurements: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Apps whose identity the change gives a new value: the deployed stack's ``measurements``
    output against the plan's (``fleet.plan.diff.identity_changes``)."""
    return identity_changes(dict(old_measurements), dict(new_measurements))


def identity_findings(changed: list[dict[str, Any]], tier: str | None) -> list[Finding]:
    out = []
    for change in changed:
        if tier == "prod" and change["stateful"] and change["identity"] != measure.IDENTITY_PINNED \
                and not change["new"] and not change["removed"]:
            out.append(Finding(f"identity:{change['name']}", f"{change['name']} would get a new identity (app-id "
                               f"{change['before']} -> {change['after']}): its keys change and the data under the "
                               "old ones becomes unreadable; pin kms.appId to keep it", True))
    return out


def check(analysis: Analysis, *, tier: str | None, identities: list[dict[str, Any]], waves: bool) -> list[Finding]:
    return (overlay_findings(analysis, waves=waves) + group_findings(analysis, waves=waves)
            + identity_findings(identities, tier))


def refusals(findings: list[Finding], acks: set[str]) -> tuple[list[Finding], list[Finding]]:
    """(refused, acknowledged)."""
    refused = [f for f in findings if not (f.ackable and f.subject in acks)]
    return refused, [f for f in findings if f not in refused]


# ---- waves -----------------------------------------------------------------------------------------

class WaveError(Exception):
    """The change cannot be split into waves as it stands; the message says why."""


@dataclass
class Wave:
    group: str
    keys: list[str]
    targets: list[str]  # URNs for `pulumi up --target`
    extras: list[str]  # of those: changes outside the nodes (new versioned resources, live updates)

    def label(self) -> str:
        return f"{self.group}: {', '.join(self.keys)}"


def next_wave(analysis: Analysis) -> list[str]:
    """Keys of the next wave: the first group (in config order) with disrupted nodes, as many as its
    ``maxUnavailable`` allows next to the nodes already down (those first: rolling one that is down
    costs nothing), the overlay's genesis node last, never the overlay's last member up."""
    members = analysis.overlay_members()
    for group in analysis.groups.values():
        # the order `fleet diff` lists (fleet.plan.changes.waves): by ordinal, the genesis node last
        candidates = sorted(group.disrupted, key=lambda n: (not n.down, n.info.genesis, n.info.ordinal, n.key))
        if not candidates:
            continue
        down = {n.key for n in group.down}
        wave: list[str] = []
        for node in candidates:
            after = down | set(wave) | {node.key}
            if node.key not in down and len(after) > group.max_unavailable:
                continue
            if group.kind == "overlay":
                keeping = [m for m in members if not m.down and not m.removed and m.key not in after]
                if not keeping:
                    continue
            wave.append(node.key)
        return wave
    return []


def wave_targets(analysis: Analysis, keys: list[str]) -> Wave:
    """The URNs one targeted ``up`` needs for these nodes: their components and everything under them,
    what depends on them (as the engine follows dependencies: parents, dependencies, property
    dependencies, deleted-with), the new resources they need (a new GCP image version; config-disk
    images and the reset step are under the node), and the changes outside every node that create or
    update something (the deletions of old versions wait for the end). Not ``--target-dependents``:
    the group's new image is a dependency of every instance booting it, so the engine would take
    them all (pulumi/pulumi pkg/resource/deploy/step_generator.go ``isTargetedForUpdate``)."""
    preview = analysis.preview
    wave = set(keys)
    subtree = {u for u, k in analysis.owner.items() if k in wave}
    if not subtree:
        raise WaveError(f"the preview shows nothing of {', '.join(keys)}")
    group = analysis.nodes[keys[0]].info.group
    # dependents: everything that depends, directly or not, on what the wave changes (a resource of the
    # wave that stays as it is, such as the genesis node's data disk the member table's signing step
    # reads, changes nothing for what depends on it)
    closure = {u for u in subtree if preview.changed(u)}
    grew = True
    while grew:
        grew = False
        for urn in preview.by_urn:
            if urn not in closure and preview.dependencies(urn) & closure:
                closure.add(urn)
                grew = True
    targets = set(subtree)
    for urn in sorted(closure - subtree):
        if not preview.changed(urn):
            continue
        other = analysis.owner.get(urn)
        if other is not None:
            raise WaveError(f"{urn} (node {other}) depends on {', '.join(keys)}: they cannot be rolled apart")
        targets.add(urn)
    extras = {u for u in analysis.outside() if preview.ops(u) & {"create", "update", "import"}
              and not preview.ops(u) & {"delete", *REPLACEMENT_OPS}}
    targets |= extras
    # what the targets need: changed dependencies (and their changed parents), never another node's
    work = sorted(u for u in targets if preview.changed(u))
    while work:
        urn = work.pop()
        for dep in sorted(preview.dependencies(urn, new_only=True)):
            if dep in targets or not preview.changed(dep):
                continue
            other = analysis.owner.get(dep)
            if other is not None and other not in wave:
                raise WaveError(f"{urn} needs {dep}, a change of node {other}: they cannot be rolled apart")
            ops = preview.ops(dep)
            if ops & {"delete", *REPLACEMENT_OPS}:
                raise WaveError(f"{urn} needs {dep}, which this change replaces or deletes ({', '.join(sorted(ops))}): "
                                "it is shared, so apply that change on its own first")
            targets.add(dep)
            extras.add(dep)
            work.append(dep)
    return Wave(group, list(keys), sorted(targets), sorted(extras))


# ---- text ------------------------------------------------------------------------------------------

def summary_lines(analysis: Analysis) -> list[str]:
    """One line per group the change touches or that has nodes down, one per other change."""
    lines = []
    for group in analysis.groups.values():
        touched = [n for n in group.nodes if n.effects or n.down]
        if not touched:
            continue
        down = group.down
        lines.append(f"group {group.name} ({group.kind}, maxUnavailable {group.max_unavailable}): "
                     f"{len(group.disrupted)} of {len(group.nodes)} node(s) disrupted"
                     + (f", {len(down)} down now ({', '.join(f'{n.key} {n.status}' for n in down)})" if down else ""))
        lines += [f"  {n.describe()}" for n in touched if n.effects]
    outside = analysis.outside()
    if outside:
        lines.append(f"{len(outside)} other change(s): " + ", ".join(
            f"{urn_type(u).rsplit(':', 1)[-1]} {urn_name(u)} ({'/'.join(sorted(analysis.preview.ops(u) - set(PASSIVE_OPS)))})"
            for u in outside[:8])
            + (f", +{len(outside) - 8}" if len(outside) > 8 else ""))
    return lines or ["no change to any node"]
