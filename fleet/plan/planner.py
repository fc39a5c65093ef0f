"""The offline plan: the program run twice under mocks, rendered as a tree, Markdown or JSON.

The *preview* pass is what the plan shows, writes and diffs: provider-computed values stay
``<computed>`` exactly as in a real ``pulumi preview`` of a new stack. The *update* pass feeds
deterministic stand-ins so every ``apply`` body runs; both passes must succeed.

``--pass up`` shows the update pass as a real ``pulumi up`` runs it: with every deploy-time decision
on, so it registers the same resources as the preview or refuses (``UpRefused``) where a real ``up``
refuses (``fleet.stacks.readiness``: a node's image pending, a secret an app needs not set).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dataclasses import replace

from fleet.config.problems import ConfigError, Problem
from fleet.config.values import display
from fleet.plan import safety
from fleet.plan.harness import ProgramRun, Registration, run_program
from fleet.apps.plans import plan_apps
from fleet.gcp.naming import Namer
from fleet.images import lock as fleet_lock
from fleet.project.bootstrap import names_for
from fleet.policy import rules
from fleet.stacks import readiness
from fleet.stacks.load import load_config


@dataclass
class Plan:
    project: str
    stack: str
    role: str
    tier: str | None
    resources: list[Registration]
    outputs: dict[str, Any]
    measurements: dict[str, Any] = field(default_factory=dict)
    violations: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    update_run: ProgramRun | None = None
    shown_pass: str = "preview"  # the pass whose registrations this plan shows: preview or up
    safety: dict[str, Any] = field(default_factory=dict)  # fleet.plan.safety.summary

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "project": self.project,
            "stack": self.stack,
            "role": self.role,
            "tier": self.tier,
            "resources": [resource_json(r) for r in self.resources],
            "outputs": display(self.outputs),
            "measurements": display(self.measurements),
            "violations": sorted(self.violations, key=lambda v: (v["urn"], v["policy"], v["message"])),
            "warnings": sorted(set(self.warnings)),
            "safety": self.safety,
        } | ({"pass": "up"} if self.shown_pass == "up" else {})

    def to_json(self) -> str:
        return json.dumps(self.to_json_dict(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def resource_json(r: Registration) -> dict[str, Any]:
    return {
        "urn": r.urn,
        "type": r.type,
        "name": r.name,
        "parent": r.parent,
        "custom": r.custom,
        "inputs": display(r.inputs),
        "dependencies": r.dependencies,
        "propertyDependencies": r.property_dependencies,
        "options": {k: r.options[k] for k in ("protect", "retainOnDelete", "deleteBeforeReplace",
                                              "ignoreChanges", "replaceOnChanges")}
        | ({"import": r.options["import"]} if r.options.get("import") else {}),
    }


class PlanFailed(Exception):
    def __init__(self, phase: str, error: BaseException):
        self.phase = phase
        self.error = error
        super().__init__(f"the program failed in the {phase} pass: {type(error).__name__}: {error}")


class UpRefused(Exception):
    """A real ``pulumi up`` of the stack would refuse; ``lines`` say why, one per reason."""

    def __init__(self, stack: str, lines: list[str]):
        self.stack = stack
        self.lines = lines
        super().__init__(f"{stack}: a real `pulumi up` refuses: " + "; ".join(lines))


PASSES = ("preview", "up", "both")


def build_plan(root: Path, stack: str, *, overrides: dict[str, Any] | None = None,
               secret_overrides: dict[str, Any] | None = None,
               stack_references: dict[str, dict[str, Any]] | None = None, passes: str = "both") -> Plan:
    """Plan ``stack``. ``passes``: ``preview`` (what ``make plan`` shows: provider-computed values
    unknown, as in a real preview), ``up`` (the update pass as a real ``pulumi up`` runs it, deploy-time
    decisions on: raises ``UpRefused`` where a real ``up`` refuses; every ``apply`` body runs on
    stand-ins), or ``both`` (the preview is shown and the update pass must succeed too, with the
    deploy-time refusals reported as warnings so every ``apply`` body runs; what the tests run)."""
    if passes not in PASSES:
        raise ValueError(f"passes must be one of {PASSES}, not {passes!r}")
    sf, cfg = load_config(root, stack, overrides=overrides, secret_overrides=secret_overrides)
    rule_context = rules.context_from_config(cfg)  # ConfigError for an unknown rule name, before any run
    if passes == "up":
        namer = Namer(prefix=cfg.fleet.name_prefix, stack=stack, project=cfg.gcp.project)
        lock = fleet_lock.load(root)
        apps = plan_apps(cfg, lock, root, names_for(cfg).registry_path)
        refusals = readiness.up_refusals(cfg, lock, namer, apps)
        if refusals:
            raise UpRefused(stack, refusals)
    runs: dict[str, ProgramRun] = {}
    wanted = {"preview": (("preview", True),), "up": (("update", False),),
              "both": (("preview", True), ("update", False))}[passes]
    for phase, preview in wanted:
        try:
            runs[phase] = run_program(
                root, stack=stack, config=sf.config, secret_keys=sf.secret_keys, preview=preview,
                stack_references=stack_references, as_deployment=passes == "up",
            )
        except ConfigError:
            raise
        except Exception as exc:  # noqa: BLE001 - reported as a failed plan, with its pass
            problems = getattr(exc, "problems", None)  # a configuration mistake the program found
            if isinstance(problems, list) and problems and all(isinstance(p, Problem) for p in problems):
                raise ConfigError(problems) from None
            raise PlanFailed(phase, exc) from exc
    shown = runs.get("preview") or runs["update"]
    outputs = dict(shown.outputs)
    measurements = outputs.pop("measurements", {}) or {}
    rule_context = replace(rule_context, outputs=outputs, measurements=measurements,
                           stack_urn=rules.stack_urn(stack, shown.project))
    violations = rules.evaluate(shown.resources, rule_context)
    return Plan(
        project=shown.project,
        stack=stack,
        role=cfg.fleet.role,
        tier=cfg.fleet.tier,
        resources=shown.resources,
        outputs=outputs,
        measurements=measurements if isinstance(measurements, dict) else {"value": measurements},
        violations=violations,
        warnings=[w for run in runs.values() for w in run.warnings],
        update_run=runs.get("update"),
        shown_pass="preview" if "preview" in runs else "up",
        safety=safety.summary(cfg, rule_context),
    )


# ---------------------------------------------------------------------------------------------
# Text and Markdown


def _short_type(type_: str) -> str:
    return type_


def _children(resources: list[Registration]) -> dict[str | None, list[Registration]]:
    tree: dict[str | None, list[Registration]] = {}
    for r in resources:
        tree.setdefault(r.parent, []).append(r)
    return tree


def tree_lines(resources: list[Registration], *, verbose: bool = True) -> list[str]:
    """The resource tree. Without ``verbose``, a component of a type that occurs more than once (a node,
    a config disk) is one line naming its children: a 30-node stack reads in one screen."""
    tree = _children(resources)
    repeated = {t for t, n in Counter(r.type for r in resources if not r.custom).items() if n > 1}
    lines: list[str] = []

    def subtree(urn: str) -> list[Registration]:
        out = []
        for kid in tree.get(urn, []):
            out += [kid, *subtree(kid.urn)]
        return out

    def walk(parent: str | None, prefix: str) -> None:
        kids = tree.get(parent, [])
        for i, r in enumerate(kids):
            last = i == len(kids) - 1
            branch = "└─ " if last else "├─ "
            if not verbose and r.type in repeated and tree.get(r.urn):
                below = subtree(r.urn)
                names = ", ".join(_short_name(k.name, r.name) for k in below if k.custom)
                kept = sorted({f for k in below for f in ("protect", "retainOnDelete") if k.options.get(f)})
                lines.append(f"{prefix}{branch}{r.name}  ({r.type})  {len(below)} resources: {names}"
                             + (f"  [{','.join(kept)}]" if kept else ""))
                continue
            lines.append(f"{prefix}{branch}{r.name}  ({r.type}){_summary(r)}")
            walk(r.urn, prefix + ("   " if last else "│  "))

    walk(None, "")
    return lines


def _short_name(name: str, parent: str) -> str:
    return name[len(parent) + 1:] if name.startswith(parent + "-") else name


_SUMMARY_KEYS = ("name", "zone", "region", "machineType", "ipCidrRange", "address", "priority")


def _summary(r: Registration) -> str:
    if not r.custom:
        return ""
    shown = display(r.inputs)
    parts = [f"{k}={shown[k]}" for k in _SUMMARY_KEYS if k in shown and not isinstance(shown[k], (dict, list))]
    flags = [k for k in ("protect", "retainOnDelete", "deleteBeforeReplace") if r.options.get(k)]
    if flags:
        parts.append("[" + ",".join(flags) + "]")
    return ("  " + " ".join(parts)) if parts else ""


def counts(resources: list[Registration]) -> list[tuple[str, int]]:
    return sorted(Counter(r.type for r in resources).items())


def _json_block(value: Any) -> str:
    return json.dumps(display(value), indent=2, sort_keys=True, ensure_ascii=False)


def _pass_title(plan: Plan) -> str:
    if plan.shown_pass == "up":
        return "offline update pass (provider-computed values are stand-ins)"
    return "offline preview"


def _short(value: Any, width: int = 12) -> str:
    """A hex value cut to ``width`` characters with an ellipsis; markers and other text as they are."""
    if value is None:
        return "-"
    text = str(display(value))
    if len(text) > width and all(c in "0123456789abcdef" for c in text.lower()):
        return text[:width] + "…"
    return text


# registers and hashes a node's expected measurements show in the table, in this order
SHORT_MEASUREMENTS = ("mrtd", "rtmr0", "rtmr1", "rtmr2", "rtmr3", "os_image_hash", "image_artifact_sha256")


def _register_summary(registers: Any) -> list[str]:
    """``mrtd ×4 rtmr0 3/4 rtmr1=… rtmr2=…``: how many firmware releases the node's MRTD may come from,
    for how many of them RTMR0 is predicted, and RTMR1-2 in short form."""
    if not isinstance(registers, dict):
        return []
    out = []
    firmware = registers.get("firmware") if isinstance(registers.get("firmware"), dict) else {}
    if isinstance(registers.get("mrtd"), list):
        out.append(f"mrtd×{len(registers['mrtd'])}")
    if firmware:
        known = sum(1 for f in firmware.values() if isinstance(f, dict) and _is_hex(f.get("rtmr0")))
        out.append(f"rtmr0 {known}/{len(firmware)}")
    out += [f"{name}={_short(registers[name], 8)}" for name in ("rtmr1", "rtmr2") if registers.get(name) is not None]
    return out


def _is_hex(value: Any) -> bool:
    return isinstance(value, str) and len(value) >= 32 and all(c in "0123456789abcdef" for c in value)


def node_rows(plan: Plan) -> list[list[str]]:
    """Per node: group, ordinal, zone, address, image and its status, peers (count and a short hash of
    the list) and the expected measurements in short form."""
    nodes = plan.outputs.get("nodes") if isinstance(plan.outputs.get("nodes"), dict) else {}
    rows = []
    for key, info in sorted(nodes.items(), key=lambda kv: (str(kv[1].get("group")), kv[1].get("ordinal", 0))):
        peers = info.get("peers")
        if isinstance(peers, list):
            digest = hashlib.sha256("\n".join(map(str, peers)).encode()).hexdigest()[:8]
            peer_text = f"{len(peers)} ({digest})" if peers else "0"
        else:
            peer_text = "-" if peers is None else str(peers)
        expected = plan.measurements.get(f"node:{key}") or {}
        shown = _register_summary(expected.get("registers")) if isinstance(expected, dict) else []
        shown += [f"{name}={_short(expected[name], 8)}" for name in SHORT_MEASUREMENTS
                  if isinstance(expected, dict) and expected.get(name) is not None]
        rows.append([str(info.get("group", "-")), str(info.get("ordinal", "-")), str(info.get("zone", "-")),
                     str(display(info.get("address", "-"))), str(info.get("image", "-")),
                     str(info.get("imageStatus", "-")), peer_text, " ".join(shown) or "-"])
    return rows


NODE_HEADER = ["group", "#", "zone", "address", "image", "status", "peers", "expected measurements"]
APP_HEADER = ["app", "target", "nodes", "compose hash", "app id", "identity", "images"]


def app_rows(plan: Plan) -> list[list[str]]:
    apps = plan.outputs.get("apps") if isinstance(plan.outputs.get("apps"), dict) else {}
    rows = []
    for name, app in sorted(apps.items()):
        images = ", ".join(f"{ref.rsplit('/', 1)[-1].split('@')[0]}@{_short(ref.split('@sha256:')[-1], 8)}"
                           for ref in (app.get("images") or {}).values()) or ", ".join(app.get("pending") or []) or "-"
        rows.append([name, str(app.get("target", "-")), str(app.get("nodes") or "-"),
                     _short(app.get("composeHash")), _short(app.get("appId")), str(app.get("identity", "-")), images])
    return rows


def grouped_findings(plan: Plan) -> list[tuple[dict[str, Any], list[str]]]:
    """Violations with the same enforcement, rule and message, as one finding and the resources it names."""
    groups: dict[tuple[str, str, str], list[str]] = {}
    for v in plan.to_json_dict()["violations"]:
        groups.setdefault((v["enforcement"], v["policy"], v["message"]), []).append(v["urn"])
    order = {"mandatory": 0, "advisory": 1}
    return [({"enforcement": e, "policy": p, "message": m}, urns)
            for (e, p, m), urns in sorted(groups.items(), key=lambda kv: (order.get(kv[0][0], 2), kv[0]))]


def _finding_line(finding: dict[str, Any], urns: list[str]) -> str:
    head = f"[{finding['enforcement']}] {finding['policy']}"
    if len(urns) == 1:
        return f"{head}: {urns[0]}: {finding['message']}"
    names = ", ".join(urn.rsplit("::", 1)[-1] for urn in urns)
    return f"{head} ×{len(urns)}: {finding['message']}: {names}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) for i in range(len(header))]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return [fmt(header)] + [fmt(r) for r in rows]


def _headline(plan: Plan) -> str:
    mandatory = sum(1 for v in plan.violations if v["enforcement"] == "mandatory")
    def n(count: int, what: str) -> str:
        return f"{count} {what}" + ("" if count == 1 else "s")

    return " · ".join([f"{n(len(plan.resources), 'resource')} of {n(len(counts(plan.resources)), 'type')}",
                       n(len(node_rows(plan)), "node"), n(len(app_rows(plan)), "app"),
                       n(len(set(plan.warnings)), "warning"),
                       f"{n(len(plan.violations), 'policy finding')} ({mandatory} mandatory)"])


def render_text(plan: Plan, *, verbose: bool = False) -> str:
    """Summary, tree, nodes, apps, warnings, findings, counts; ``verbose`` adds every resource of the tree
    and the full outputs and expected measurements as JSON."""
    out = [f"dstack-fleet plan: stack {plan.stack} (role {plan.role}"
           + (f", tier {plan.tier}" if plan.tier else "") + "), " + _pass_title(plan), _headline(plan), ""]
    out.append(f"Resources ({len(plan.resources)}):")
    out += ["  " + line for line in tree_lines(plan.resources, verbose=verbose)]
    nodes, apps = node_rows(plan), app_rows(plan)
    if nodes:
        out += ["", f"Nodes ({len(nodes)}):"] + ["  " + line for line in _table(NODE_HEADER, nodes)]
    if apps:
        out += ["", f"Apps ({len(apps)}):"] + ["  " + line for line in _table(APP_HEADER, apps)]
    out += ["", f"Warnings ({len(set(plan.warnings))}):"]
    out += [f"  - {w}" for w in sorted(set(plan.warnings))] or []
    out += ["", f"Policy violations ({len(plan.violations)}):"]
    out += [f"  - {_finding_line(f, urns)}" for f, urns in grouped_findings(plan)]
    out += ["", "Counts by type:"]
    out += [f"  {n:4d}  {t}" for t, n in counts(plan.resources)]
    if verbose:
        out += ["", "Outputs:"]
        out += ["  " + line for line in _json_block(plan.outputs).splitlines()]
        out += ["", "Expected measurements:"]
        if plan.measurements:
            out += ["  " + line for line in _json_block(plan.measurements).splitlines()]
        else:
            out.append("  (none in this stack)")
    else:
        out += ["", "(--verbose: every resource, the outputs and the expected measurements in full; --json FILE: all of it)"]
    return "\n".join(out) + "\n"


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    cell = lambda c: c.replace("|", "\\|")  # noqa: E731
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows])


def render_markdown(plan: Plan, *, verbose: bool = False) -> str:
    """The same sections in the same order as ``render_text``, as Markdown for pull requests."""
    out = [f"## dstack-fleet plan: `{plan.stack}`", "",
           f"Role `{plan.role}`" + (f", tier `{plan.tier}`" if plan.tier else "") + f", {len(plan.resources)} resources "
           "(offline preview; provider-computed values show as `<computed>`).", "", _headline(plan), ""]
    out += ["### Resources", "", "```", *tree_lines(plan.resources, verbose=verbose), "```", ""]
    nodes, apps = node_rows(plan), app_rows(plan)
    if nodes:
        out += ["### Nodes", "", *_md_table(NODE_HEADER, nodes), ""]
    if apps:
        out += ["### Apps", "", *_md_table(APP_HEADER, apps), ""]
    if plan.warnings:
        out += ["### Warnings", ""] + [f"- {w}" for w in sorted(set(plan.warnings))] + [""]
    out += ["### Policy violations", ""]
    findings = grouped_findings(plan)
    if findings:
        out += ["| enforcement | policy | resources | message |", "|---|---|---|---|"]
        out += [f"| {f['enforcement']} | {f['policy']} | "
                + (f"`{urns[0]}`" if len(urns) == 1 else f"{len(urns)}: " + ", ".join(
                    f"`{u.rsplit('::', 1)[-1]}`" for u in urns)) + f" | {f['message']} |" for f, urns in findings]
    else:
        out.append("None.")
    out += ["", "| type | count |", "|---|---:|"] + [f"| `{t}` | {n} |" for t, n in counts(plan.resources)] + [""]
    if verbose:
        out += ["### Outputs", "", "```json", _json_block(plan.outputs), "```", ""]
        out += ["### Expected measurements", ""]
        out += ["```json", _json_block(plan.measurements), "```", ""] if plan.measurements else ["(none in this stack)", ""]
    return "\n".join(out) + "\n"
