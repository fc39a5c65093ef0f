"""The offline plan: the program run twice under mocks, rendered as a tree, Markdown or JSON.

The *preview* pass is what the plan shows, writes and diffs: provider-computed values stay
``<computed>`` exactly as in a real ``pulumi preview`` of a new stack. The *update* pass feeds
deterministic stand-ins so every ``apply`` body runs; both passes must succeed.
"""

from __future__ import annotations

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
from fleet.policy import rules
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
        }

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


def build_plan(root: Path, stack: str, *, overrides: dict[str, Any] | None = None,
               secret_overrides: dict[str, Any] | None = None,
               stack_references: dict[str, dict[str, Any]] | None = None) -> Plan:
    sf, cfg = load_config(root, stack, overrides=overrides, secret_overrides=secret_overrides)
    rule_context = rules.context_from_config(cfg)  # ConfigError for an unknown rule name, before any run
    runs: dict[str, ProgramRun] = {}
    for phase, preview in (("preview", True), ("update", False)):
        try:
            runs[phase] = run_program(
                root, stack=stack, config=sf.config, secret_keys=sf.secret_keys, preview=preview,
                stack_references=stack_references,
            )
        except ConfigError:
            raise
        except Exception as exc:  # noqa: BLE001 - reported as a failed plan, with its pass
            problems = getattr(exc, "problems", None)  # a configuration mistake the program found
            if isinstance(problems, list) and problems and all(isinstance(p, Problem) for p in problems):
                raise ConfigError(problems) from None
            raise PlanFailed(phase, exc) from exc
    preview_run = runs["preview"]
    outputs = dict(preview_run.outputs)
    measurements = outputs.pop("measurements", {}) or {}
    rule_context = replace(rule_context, outputs=outputs, measurements=measurements,
                           stack_urn=rules.stack_urn(stack, preview_run.project))
    violations = rules.evaluate(preview_run.resources, rule_context)
    return Plan(
        project=preview_run.project,
        stack=stack,
        role=cfg.fleet.role,
        tier=cfg.fleet.tier,
        resources=preview_run.resources,
        outputs=outputs,
        measurements=measurements if isinstance(measurements, dict) else {"value": measurements},
        violations=violations,
        warnings=preview_run.warnings + runs["update"].warnings,
        update_run=runs["update"],
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


def tree_lines(resources: list[Registration]) -> list[str]:
    tree = _children(resources)
    lines: list[str] = []

    def walk(parent: str | None, prefix: str) -> None:
        kids = tree.get(parent, [])
        for i, r in enumerate(kids):
            last = i == len(kids) - 1
            branch = "└─ " if last else "├─ "
            summary = _summary(r)
            lines.append(f"{prefix}{branch}{r.name}  ({r.type}){summary}")
            walk(r.urn, prefix + ("   " if last else "│  "))

    walk(None, "")
    return lines


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


def render_text(plan: Plan) -> str:
    out = [f"dstack-fleet plan: stack {plan.stack} (role {plan.role}"
           + (f", tier {plan.tier}" if plan.tier else "") + "), offline preview", ""]
    out.append(f"Resources ({len(plan.resources)}):")
    out += ["  " + line for line in tree_lines(plan.resources)]
    out += ["", "Counts by type:"]
    out += [f"  {n:4d}  {t}" for t, n in counts(plan.resources)]
    out += ["", "Outputs:"]
    out += ["  " + line for line in _json_block(plan.outputs).splitlines()]
    out += ["", "Expected measurements:"]
    if plan.measurements:
        out += ["  " + line for line in _json_block(plan.measurements).splitlines()]
    else:
        out.append("  (none in this stack)")
    out += ["", f"Warnings ({len(set(plan.warnings))}):"]
    out += [f"  - {w}" for w in sorted(set(plan.warnings))] or []
    out += ["", f"Policy violations ({len(plan.violations)}):"]
    for v in plan.to_json_dict()["violations"]:
        out.append(f"  - [{v['enforcement']}] {v['policy']}: {v['urn']}: {v['message']}")
    return "\n".join(out) + "\n"


def render_markdown(plan: Plan) -> str:
    out = [f"## dstack-fleet plan: `{plan.stack}`", "",
           f"Role `{plan.role}`" + (f", tier `{plan.tier}`" if plan.tier else "") + f", {len(plan.resources)} resources "
           "(offline preview; provider-computed values show as `<computed>`).", ""]
    out += ["### Resources", "", "```", *tree_lines(plan.resources), "```", ""]
    out += ["| type | count |", "|---|---:|"] + [f"| `{t}` | {n} |" for t, n in counts(plan.resources)] + [""]
    out += ["### Outputs", "", "```json", _json_block(plan.outputs), "```", ""]
    out += ["### Expected measurements", ""]
    out += ["```json", _json_block(plan.measurements), "```", ""] if plan.measurements else ["(none in this stack)", ""]
    if plan.warnings:
        out += ["### Warnings", ""] + [f"- {w}" for w in sorted(set(plan.warnings))] + [""]
    out += ["### Policy violations", ""]
    violations = plan.to_json_dict()["violations"]
    if violations:
        out += ["| enforcement | policy | resource | message |", "|---|---|---|---|"]
        out += [f"| {v['enforcement']} | {v['policy']} | `{v['urn']}` | {v['message']} |" for v in violations]
    else:
        out.append("None.")
    return "\n".join(out) + "\n"
