"""The live check before anything is applied: the real CLI's ``pulumi preview --json`` of the stack,
against the rules of ``fleet.plan.preview`` (group ``maxUnavailable`` counting nodes already down,
never every overlay member at once, no new identity for a stateful prod app). ``make up`` runs it
before its ``pulumi up`` and refuses without applying anything; ``make rollout`` runs it before every
wave. A refusal an operator means to override is acknowledged by name (``ACK=group:overlay``,
``ACK=identity:app:mpc-prod``); the overlay rule cannot be acknowledged.

The preview runs with ``--refresh`` (the state is read from the cloud first, so a node that is down
now shows as down), ``--show-sames`` (every node is in the document, changed or not) and
``--show-replacement-steps``. Its expected measurements, app identities and node groups come from
the offline plan of the same checkout and configuration; the deployed side from the preview's
root-stack old state (the outputs the last ``up`` recorded).
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from fleet.plan import allowlists
from fleet.plan import preview as previews
from fleet.plan.planner import PlanFailed, build_plan
from fleet.stacks.load import load_config

PREVIEW_FLAGS = ["--json", "--refresh", "--show-sames", "--show-replacement-steps"]
EXIT_REFUSED = 1


class Call(Protocol):
    """``fleet.cli.deploy.Invocation``: what to run and with which environment."""

    argv: list[str]
    env: dict[str, str]


class CheckFailed(Exception):
    """The live preview could not be had or read; nothing was applied."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


def applies(root: Path, stack: str) -> bool:
    """Only env stacks have nodes and apps; the bootstrap and images stacks are applied as they are."""
    return load_config(root, stack)[1].fleet.role == "env"


def run_preview(call: Call) -> previews.Preview:
    """Run the preview invocation and read its JSON; a failing CLI or unreadable output is a
    ``CheckFailed`` that keeps the CLI's exit code and its error lines."""
    result = subprocess.run(call.argv, env=call.env, capture_output=True, text=True, check=False)
    try:
        document = previews.parse(result.stdout)
    except previews.PreviewError as exc:
        tail = (result.stderr.strip().splitlines() or [str(exc)])[-1]
        raise CheckFailed(f"the live preview failed (exit {result.returncode}): {tail}",
                          result.returncode or 2) from None
    if result.returncode != 0:
        errors = document.errors() or (result.stderr.strip().splitlines() or ["no message"])[-1:]
        raise CheckFailed(f"the live preview failed (exit {result.returncode}): " + "; ".join(errors),
                          result.returncode)
    return document


@dataclass
class Assessment:
    plan: dict[str, Any]
    analysis: previews.Analysis
    findings: list[previews.Finding]
    refused: list[previews.Finding]
    acknowledged: list[previews.Finding]
    allow: allowlists.Changes

    def lines(self) -> list[str]:
        out = previews.summary_lines(self.analysis)
        out += [f"acknowledged: {f.message}" for f in self.acknowledged]
        return out


def load_plan(root: Path, stack: str, plan_path: Path | None = None) -> dict[str, Any]:
    """The offline plan document of the checkout (or the plan JSON given, e.g. the one reviewed)."""
    if plan_path is not None:
        try:
            document = json.loads(plan_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckFailed(f"--plan {plan_path}: not a plan JSON ({exc})") from None
        if not isinstance(document, dict) or document.get("stack") != stack or "resources" not in document:
            raise CheckFailed(f"--plan {plan_path}: not a plan of stack {stack} (python -m fleet plan --json)")
        return document
    try:
        return json.loads(build_plan(root, stack, passes="preview").to_json())
    except PlanFailed as exc:
        raise CheckFailed(f"planning {stack} failed: {exc}", 3) from None


def assess(root: Path, stack: str, preview: previews.Preview, acks: set[str], *, waves: bool,
           plan: dict[str, Any] | None = None) -> Assessment:
    _, config = load_config(root, stack)
    plan = plan if plan is not None else load_plan(root, stack)
    analysis = previews.analyze(preview, previews.fleet_view(plan), [g.name for g in config.fleet.nodes])
    deployed = preview.deployed_outputs()
    identities = previews.app_identities(deployed.get("measurements") or {}, plan.get("measurements") or {})
    findings = previews.check(analysis, tier=config.fleet.tier, identities=identities, waves=waves)
    refused, acknowledged = previews.refusals(findings, acks)
    allow = allowlists.compare(allowlists.deployed_document(deployed, stack), plan)
    return Assessment(plan, analysis, findings, refused, acknowledged, allow)


def refusal_lines(assessment: Assessment, stack: str, command: str) -> list[str]:
    lines = [f"error: {command} {stack} refused: {f}" for f in assessment.refused]
    if any(f.subject.startswith("group:") for f in assessment.refused) and command == "make up":
        lines.append(f"  nothing was applied; `make rollout STACK={stack}` applies it in waves")
    return lines


def checked_up(root: Path, stack: str, calls: list[Call], preview_call: Call, ack_values: list[str]) -> int:
    """``make up``: the setup calls, the live preview and its check, then the ``up`` (``calls[-1]``)
    only when nothing is refused."""
    acks, problems = previews.parse_acks(ack_values)
    if problems:
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr)
        return 2
    for call in calls[:-1]:
        result = subprocess.run(call.argv, env=call.env, check=False)
        if result.returncode != 0:
            return result.returncode
    try:
        assessment = assess(root, stack, run_preview(preview_call), acks, waves=False)
    except CheckFailed as exc:
        print(f"error: {exc}; nothing was applied", file=sys.stderr)
        return exc.code
    for line in assessment.lines():
        print(line)
    if assessment.refused:
        for line in refusal_lines(assessment, stack, "make up"):
            print(line, file=sys.stderr)
        return EXIT_REFUSED
    for line in assessment.allow.before_lines():
        print(line)
    code = subprocess.run(calls[-1].argv, env=calls[-1].env, check=False).returncode
    if code == 0:
        for line in assessment.allow.after_lines():
            print(line)
    return code
