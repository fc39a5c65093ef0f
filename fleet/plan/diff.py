"""``python -m fleet diff``: what a change does to a stack, offline, as Markdown for a pull request.

The base revision is planned in a temporary git worktree with *its own* code (a change to the
program is reviewed as what it does, not as what the new code thinks the old config meant), the
working tree with the current code; both run as ``python -m fleet plan --json`` and the two plan
documents are compared. The summary's counts come from ``fleet.changes`` and are an estimate: the
real ``pulumi preview`` is authoritative.

Exit codes: 0 ok, 1 a mandatory check failed, 2 bad input (unknown ref, invalid config). The
mandatory checks: a prod group over its ``maxUnavailable``; a mandatory policy violation; and any
weakening of a staging or prod stack (``fleet.plan.safety``): a lower tier, a rule disabled or
downgraded, protection removed from a resource, snapshots turned off, the TDX or image allow-lists
widened, a stateful app's identity changed by any route (a new compose, a rename, a removal,
``stateful: false``), a data disk shrunk or replaced; in prod every data disk or address at risk.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleet.attest import measure
from fleet.plan import changes, safety

COMMENT_LIMIT = 65_536
TRUNCATION_NOTE = "\n\n> The diff was truncated to fit a GitHub comment; the full text is in the job log.\n"
ACTION_LABELS = {"create": "create", "live": "update live", "stop": "update with stop", "replace": "replace",
                 "delete": "delete"}


class DiffInputError(Exception):
    """Bad input: the ref does not exist, or the head revision's config is invalid."""


@dataclass
class PlanResult:
    document: dict[str, Any] | None  # None: no plan (stack absent, or the revision cannot plan)
    note: str | None = None


@dataclass
class DiffReport:
    stack: str
    base_ref: str
    markdown: str
    failures: list[str] = field(default_factory=list)
    changed: bool = False

    @property
    def exit_code(self) -> int:
        return 1 if self.failures else 0


def _run_plan(root: Path, stack: str, out: Path, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fleet", "--root", str(root), "plan", "--stack", stack,
                           "--json", str(out)], cwd=cwd, capture_output=True, text=True, check=False)


def plan_revision(repo: Path, ref: str, stack: str, work: Path) -> PlanResult:
    """Plan ``stack`` as revision ``ref`` sees it, with that revision's own code."""
    check = subprocess.run(["git", "-C", str(repo), "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"],
                           capture_output=True, text=True, check=False)
    if check.returncode != 0:
        raise DiffInputError(f"unknown git revision {ref!r}")
    tree = work / "base"
    subprocess.run(["git", "-C", str(repo), "worktree", "add", "--detach", "--quiet", str(tree), ref],
                   capture_output=True, text=True, check=True)
    try:
        if not (tree / "stacks" / f"Pulumi.{stack}.yaml").exists():
            return PlanResult(None, f"stack {stack} does not exist at {ref}")
        if not any((tree / "fleet" / where).exists() for where in ("plan.py", "plan/planner.py")):
            return PlanResult(None, f"{ref} predates the offline plan")
        out = work / "base.json"
        result = _run_plan(tree, stack, out, cwd=tree)
        if result.returncode not in (0, 1) or not out.exists():
            reason = (result.stderr.strip().splitlines() or ["no output"])[-1]
            return PlanResult(None, f"the base revision could not be planned ({reason})")
        return PlanResult(json.loads(out.read_text(encoding="utf-8")))
    finally:
        subprocess.run(["git", "-C", str(repo), "worktree", "remove", "--force", str(tree)],
                       capture_output=True, check=False)


def plan_working_tree(root: Path, stack: str, work: Path) -> dict[str, Any]:
    out = work / "head.json"
    result = _run_plan(root, stack, out, cwd=root)
    if result.returncode not in (0, 1) or not out.exists():
        raise DiffInputError(result.stderr.strip() or f"planning {stack} failed")
    return json.loads(out.read_text(encoding="utf-8"))


# ---- comparing two plan documents ------------------------------------------------------------------

def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if not prefix and value in ({}, None):
        return {}
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(value, list) and value and any(isinstance(v, (dict, list)) for v in value):
        out = {}
        for i, v in enumerate(value):
            out.update(_flatten(v, f"{prefix}[{i}]"))
        return out
    return {prefix: value}


def changed_values(old: Any, new: Any) -> list[tuple[str, Any, Any]]:
    a, b = _flatten(old or {}), _flatten(new or {})
    return [(k, a.get(k, "(absent)"), b.get(k, "(absent)")) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _cell(value: Any, limit: int = 120) -> str:
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        text = ", ".join(value) if value else "(none)"
    else:
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    text = text.replace("|", "\\|").replace("\n", " ")
    return "`" + (text if len(text) <= limit else text[: limit - 1] + "…") + "`"


# Words older plans used for the same identities (a base revision is planned with its own code).
_LEGACY_IDENTITY = {"stable": measure.IDENTITY_PINNED, "derived": measure.IDENTITY_COMPOSE}


def _identity(m: dict[str, Any]) -> str:
    value = m.get("identity", measure.IDENTITY_COMPOSE)
    return _LEGACY_IDENTITY.get(value, value)


def _identity_value(m: dict[str, Any]) -> Any:
    """What an app's identity follows: its app-id when known; for a compose identity whose id a
    plan could not show (older plans said "known at boot" for KMS apps) the compose hash's first
    20 bytes, which is the id the guest derives."""
    app_id = m.get("app_id")
    if isinstance(app_id, str) and len(app_id) == 40 and all(c in "0123456789abcdef" for c in app_id):
        return app_id
    compose = m.get("compose_hash")
    if _identity(m) == measure.IDENTITY_COMPOSE and isinstance(compose, str) and len(compose) == 64:
        return compose[:40]
    return app_id


def identity_changes(old: dict[str, Any], new: dict[str, Any]) -> list[dict[str, Any]]:
    """Apps whose identity changes (new keys; data under the old keys becomes unreadable). An app
    counts as stateful when either side says so: turning ``stateful`` off in the same change does
    not let a new identity through. An app whose compose was still pending had no identity yet."""
    out = []
    for name in sorted(set(old) | set(new)):
        before, after = old.get(name) or {}, new.get(name) or {}
        if "app_id" not in before and "app_id" not in after:
            continue
        if _identity_value(before) != _identity_value(after):
            out.append({"name": name, "before": before.get("app_id", "(none)"), "after": after.get("app_id", "(none)"),
                        "stateful": bool(before.get("stateful")) or bool(after.get("stateful")),
                        "identity": _identity(after or before),
                        "new": not before or _identity_value(before) == measure.PENDING_BUILD,
                        "removed": not after})
    return out


def app_upgrades(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """How each changed app lands: a new compose (measured: a new identity unless its app id is
    pinned), or only its unmeasured user config (a restart; e.g. NEAR's MPC hash override picks
    another approved image and keeps the identity, and the plan's ``userConfig`` says what RTMR3
    then shows)."""
    rows = []
    for name in sorted(set(old) & set(new)):
        a, b = old[name], new[name]
        if a.get("composeHash") != b.get("composeHash"):
            kept = _identity(b) == measure.IDENTITY_PINNED
            rows.append(f"| `{name}` | new compose | {'kept (pinned app id)' if kept else 'new identity'} |")
        elif a.get("userConfigSha256") != b.get("userConfigSha256"):
            note = (b.get("userConfig") or {}).get("restart") if isinstance(b.get("userConfig"), dict) else None
            rows.append(f"| `{name}` | user config only: {note or 'restart'} | kept |")
    return rows


def _full(values: list[str]) -> str:
    """A list in full (a reviewer must see which peer changed), escaped for a table cell."""
    return "`" + (", ".join(values) if values else "(none)").replace("|", "\\|") + "`"


def _peers_cell(a: dict[str, Any] | None, b: dict[str, Any] | None) -> str:
    before, after = (a or {}).get("peers"), (b or {}).get("peers")
    if a is None:
        return _full(list(after or []))
    if b is None:
        return "(removed)"
    if before == after:
        return _full(list(after or []))
    added = [p for p in after or [] if p not in (before or [])]
    removed = [p for p in before or [] if p not in (after or [])]
    parts = ([f"added {_full(added)}"] if added else []) + ([f"removed {_full(removed)}"] if removed else [])
    return "; ".join(parts) or f"reordered: {_full(list(after or []))}"


def topology_rows(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """One row per node whose placement or peers change (added, removed or rewired); peers added and
    removed are listed in full."""
    before, after = old.get("nodes") or {}, new.get("nodes") or {}
    rows = []
    for key in sorted(set(before) | set(after), key=lambda k: (k.rsplit("-", 1)[0], int(k.rsplit("-", 1)[1]))):
        a, b = before.get(key), after.get(key)
        if a == b:
            continue
        if a is None:
            change = "added"
        elif b is None:
            change = "removed"
        else:
            change = "changed: " + ", ".join(sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k)))
        shown = b or a

        def field(name: str) -> str:
            if a and b and a.get(name) != b.get(name):
                return f"{_cell(a.get(name), 60)} → {_cell(b.get(name), 60)}"
            return _cell(shown.get(name, "-"), 60)

        rows.append(f"| `{key}` | {change} | {field('zone')} | {field('address')} | {_peers_cell(a, b)} |")
    for k, a, b in changed_values(old.get("overlay"), new.get("overlay")):
        rows.append(f"| overlay | `{k}` changed | | | {_cell(a)} → {_cell(b)} |")
    return rows


def table_notes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """When the signed member table changes: where it goes, and which running members keep the
    older table until their next start."""
    a = ((old.get("overlay") or {}).get("table") or {}).get("bodySha256")
    b = ((new.get("overlay") or {}).get("table") or {}).get("bodySha256")
    if not b or a == b:
        return []
    before, after = old.get("nodes") or {}, new.get("nodes") or {}
    running = sorted((k for k, v in after.items() if v.get("kind") == "overlay" and k in before),
                     key=lambda k: (k.rsplit("-", 1)[0], int(k.rsplit("-", 1)[1])))
    new_members = sorted(k for k, v in after.items() if v.get("kind") == "overlay" and k not in before)
    what = f"changes (body sha256 `{a[:16]}` → `{b[:16]}`)" if a else f"is new (body sha256 `{b[:16]}`)"
    lines = [f"The signed member table {what}. It is signed at deploy and written into every member's instance "
             "metadata in place: no member is replaced, stopped or reset by it."]
    if running:
        lines.append(f"Running members that keep the older table until their next restart: {', '.join(running)} "
                     "(a running member accepts joining peers it was not started with).")
    if new_members:
        lines.append(f"New members start with the new table: {', '.join(new_members)}.")
    return ["", *lines]


def rollout_waves(rollout: dict[str, changes.GroupRollout], genesis: str | None, forced: bool) -> list[str]:
    """For each group a change takes over its limit (or that would take the whole overlay down):
    every node it takes down, each exactly once, wave by wave, with the targeted update of each wave."""
    out: list[str] = []
    for g in rollout.values():
        if not (g.over_limit or (forced and g.unavailable)):
            continue
        if not out:
            out = ["### Rollout waves", ""]
        plan = changes.waves(g, genesis)
        down = {k: ("replaced" if k in g.replaced else "reset" if k in g.reset else "stopped")
                for k in g.replaced + g.stopped}
        out.append(f"Group `{g.group}`: {len(down)} node(s), each taken down exactly once, at most "
                   f"{max(1, g.max_unavailable)} per wave" + (f"; the genesis node `{genesis}` goes last"
                                                              if genesis in down else "") + ":")
        out.append("")
        for i, wave in enumerate(plan, start=1):
            out.append(f"{i}. {', '.join(f'`{k}` ({down[k]})' for k in wave)}:")
            out += ["", "   ```sh", f"   {changes.wave_command(g, wave)}", "   ```", ""]
        out.append(f"`make rollout STACK={g.stack or 'STACK'}` runs these waves for you from the live preview, each "
                   "after the last one's nodes are healthy (an overlay member: it holds the shared secret again) and "
                   "pass `fleet verify`. By hand: start the next wave only when the nodes of the last one are "
                   "healthy; `make up` applies what remains.")
        out.append("")
    return out


def _mermaid(changed: list[changes.ResourceChange], head: dict[str, dict], base: dict[str, dict]) -> list[str]:
    urns = {c.urn for c in changed}
    lines = ["```mermaid", "flowchart LR"]
    ids = {u: f"r{i}" for i, u in enumerate(sorted(urns))}
    for c in changed:
        r = head.get(c.urn) or base.get(c.urn)
        lines.append(f'  {ids[c.urn]}["{r["name"]}<br/>{r["type"].split(":")[-1]}<br/>{ACTION_LABELS.get(c.action, c.action)}"]')
    for c in changed:
        r = head.get(c.urn) or base.get(c.urn)
        for dep in r.get("dependencies", []):
            if dep in urns:
                lines.append(f"  {ids[dep]} --> {ids[c.urn]}")
    lines.append("```")
    return lines


def compare(stack: str, base_ref: str, base: PlanResult, head: dict[str, Any]) -> DiffReport:
    base_doc = base.document or {"resources": [], "outputs": {}, "measurements": {}, "violations": []}
    base_by = {r["urn"]: r for r in base_doc["resources"]}
    head_by = {r["urn"]: r for r in head["resources"]}
    resource_changes = [c for c in changes.diff(base_doc["resources"], head["resources"]) if c.action != "none"]
    # the stricter of the two tiers: lowering prod to staging must not also lower the checks
    tier = safety.strictest_tier(base_doc, head)
    failures: list[str] = []

    base_outputs, head_outputs = base_doc.get("outputs") or {}, head.get("outputs") or {}
    rollout = changes.rollout(base_doc["resources"], head["resources"], base_outputs, head_outputs)
    genesis = (head_outputs.get("overlay") or {}).get("genesis")
    declared = set(head_outputs.get("images") or {})
    over = changes.over_limit(rollout, declared, genesis)
    if tier == "prod":
        failures += over
    members = [k for k, v in (head_outputs.get("nodes") or {}).items()
               if v.get("kind") == "overlay" and k in (base_outputs.get("nodes") or {})]
    all_down = changes.whole_overlay_down(rollout, members)
    if all_down:
        failures.append(all_down)
    failures += safety.weakenings(base_doc, head)
    old_measurements, new_measurements = base_doc.get("measurements", {}), head.get("measurements", {})
    identities = identity_changes(old_measurements, new_measurements)
    if tier in safety.GUARDED_TIERS:
        failures += safety.identity_weakenings(identities, old_measurements, new_measurements)
    risky = [item for g in rollout.values() for item in g.data_at_risk]
    failures += safety.data_weakenings(tier, risky)
    mandatory = [v for v in head.get("violations", []) if v.get("enforcement") == "mandatory"]
    failures += [f"policy {v['policy']}: {v['urn']}: {v['message']}" for v in mandatory]

    measurement_changes = changed_values(base_doc.get("measurements"), head.get("measurements"))
    output_changes = changed_values(base_doc.get("outputs"), head.get("outputs"))
    safety_changes = changed_values(base_doc.get("safety"), head.get("safety")) if "safety" in base_doc else []
    changed = bool(resource_changes or measurement_changes or output_changes or safety_changes)

    lines = [f"## `{stack}`: offline plan diff against `{base_ref}`", ""]
    if base.note:
        lines += [f"> {base.note}; compared with an empty stack.", ""]
    if not changed:
        lines.append(f"No change to stack `{stack}` (resources, outputs and expected measurements are identical).")
        if mandatory:
            lines += ["", "Mandatory policy violations (also present before this change):", ""]
            lines += [f"- `{v['policy']}` on `{v['urn']}`: {v['message']}" for v in mandatory]
        return DiffReport(stack, base_ref, "\n".join(lines) + "\n", failures, changed)

    counts = {label: 0 for label in ACTION_LABELS}
    for c in resource_changes:
        counts[c.action] += 1
    summary = ", ".join(f"{n} {ACTION_LABELS[a]}" for a, n in counts.items())
    lines += [f"**Summary** (estimate from `fleet.changes`; the real `pulumi preview` is authoritative): {summary}.",
              ""]
    if failures:
        lines += ["**Mandatory checks failed:**", ""] + [f"- {f}" for f in failures] + [""]

    lines += ["### Rollout per node group", "", "| group | maxUnavailable | replaced | stopped | created | removed | check |",
              "|---|---:|---|---|---|---|---|"]
    for g in rollout.values():
        check = "over the limit" if g.over_limit else "ok"
        lines.append(f"| `{g.group}` | {g.max_unavailable} | {', '.join(g.replaced) or '-'} | "
                     f"{', '.join(g.stopped) or '-'} | {', '.join(g.created) or '-'} | {', '.join(g.removed) or '-'} | {check} |")
    if not rollout:
        lines.append("| (no node groups) | | | | | | |")
    if risky:
        lines += ["", "**Data at risk** (data disks or addresses replaced or deleted): " + ", ".join(risky)]
    lines.append("")
    wave_lines = rollout_waves(rollout, genesis, all_down is not None)
    if wave_lines:
        lines += wave_lines

    upgrades = app_upgrades(base_doc.get("outputs", {}).get("apps") or {}, head.get("outputs", {}).get("apps") or {})
    if upgrades:
        lines += ["### App changes", "", "| app | change | identity |", "|---|---|---|"] + upgrades + [""]
    if identities:
        lines += ["### App identity changes", "", "| app | app-id before | app-id after | identity | stateful |",
                  "|---|---|---|---|---|"]
        lines += [f"| `{c['name']}` | {_cell(c['before'])} | {_cell(c['after'])} | {c['identity']} | "
                  f"{'yes' if c['stateful'] else 'no'} |" for c in identities]
        lines.append("")
    if safety_changes:
        lines += ["### Safety settings", "", "| setting | before | after |", "|---|---|---|"]
        lines += [f"| `{k}` | {_cell(a)} | {_cell(b)} |" for k, a, b in safety_changes]
        lines.append("")
    if measurement_changes:
        lines += ["### Expected measurements", "", "| measurement | before | after |", "|---|---|---|"]
        lines += [f"| `{k}` | {_cell(a)} | {_cell(b)} |" for k, a, b in measurement_changes]
        lines.append("")
    topology = topology_rows(base_outputs, head_outputs)
    notes = table_notes(base_outputs, head_outputs)
    if topology or notes:
        lines += ["### Topology", ""]
        if topology:
            lines += ["| node | change | zone | address | peers |", "|---|---|---|---|---|"] + topology
        lines += notes
        lines.append("")
    other_outputs = [(k, a, b) for k, a, b in output_changes if not k.startswith(("nodes", "overlay"))]
    if other_outputs:
        lines += ["### Stack outputs", "", "| output | before | after |", "|---|---|---|"]
        lines += [f"| `{k}` | {_cell(a)} | {_cell(b)} |" for k, a, b in other_outputs]
        lines.append("")

    lines += ["### Resources", ""]
    for c in resource_changes:
        r = head_by.get(c.urn) or base_by.get(c.urn)
        lines.append(f"- **{ACTION_LABELS.get(c.action, c.action)}** `{r['name']}` ({r['type']})")
        if c.action not in ("create", "delete"):
            old_inputs, new_inputs = base_by[c.urn].get("inputs", {}), head_by[c.urn].get("inputs", {})
            values = {k: (a, b) for k, a, b in changed_values(old_inputs, new_inputs)}
            for path, action in c.reasons:
                before, after = values.get(path, ("<computed>", "<computed>, from another resource"))
                lines.append(f"  - `{path}` ({action}): {_cell(before, 80)} → {_cell(after, 80)}")
    lines.append("")
    lines += ["### Policy violations", ""]
    violations = head.get("violations", [])
    lines += [f"- [{v['enforcement']}] `{v['policy']}` on `{v['urn']}`: {v['message']}" for v in violations] or ["None."]
    lines += ["", "### Changed part of the graph", ""] + _mermaid(resource_changes, head_by, base_by)
    return DiffReport(stack, base_ref, truncate("\n".join(lines) + "\n"), failures, changed)


def truncate(text: str, limit: int = COMMENT_LIMIT) -> str:
    """Keep the Markdown under GitHub's comment limit (counted in UTF-8 bytes, never fewer than
    characters), cutting at a line boundary and saying so."""
    if len(text.encode("utf-8")) <= limit:
        return text
    budget = limit - len(TRUNCATION_NOTE.encode("utf-8")) - 16
    cut = text.encode("utf-8")[:budget].decode("utf-8", errors="ignore")
    cut = cut[: cut.rfind("\n")] if "\n" in cut else cut
    if cut.count("```") % 2:
        cut += "\n```"
    return cut + TRUNCATION_NOTE


def run_diff(root: Path, stack: str, base_ref: str) -> DiffReport:
    with tempfile.TemporaryDirectory(prefix="fleet-diff-") as tmp:
        work = Path(tmp)
        head = plan_working_tree(root, stack, work)
        base = plan_revision(root, base_ref, stack, work)
    return compare(stack, base_ref, base, head)
