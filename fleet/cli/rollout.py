"""``make rollout STACK=…`` (``python -m fleet rollout``): a change larger than a group's
``maxUnavailable`` applied in waves, each one proven before the next starts.

Each wave, from the live preview (``fleet.cli.preflight``; checked again before every wave, so a
change merged in between meets the same rules): one ``pulumi up --target`` naming the wave's nodes,
everything under and depending on them and the new resources they need (``fleet.plan.preview.
wave_targets``); then a health wait; then the attestation gate: ``fleet verify`` of what each node
runs against the plan's expected measurements, with Intel's collateral fetched at that moment, kept
as evidence, and ``UpToDate`` required. Only then the next wave. The first failing wave stops the
rollout: the nodes of later waves are untouched, and the message says how to resume or roll back.

* **dstack node**: every app the plan runs on its group is verified with the post-deploy check's
  script (``fleet.stacks.expectations.verify_script``: guest agent Info, the app's quote, collateral,
  ``fleet verify --plan --target app:<name>``), so the gate and the post-deploy check are one check.
* **overlay node**: healthy only once it holds the overlay's shared secret. That is observed on the
  light client's ``GET /attest`` (``fleet.stacks.rollout``): the client serves it only after it
  received (or founded) the secret, and its ``pubkey`` is the secret's public key, so the new node
  must report the key the members outside the wave report, read before its ``up``. Its quote must
  carry report data SHA-256("register" || hex(pubkey)) zero-padded to 64 bytes (tplus-examples
  3eb04ca ``mocks/src/lib.rs`` ``calc_report_data``), and is verified against ``node:<key>``.

Where nodes are read from: ``dstack-fleet:rollout.reach`` (or ``--reach``): ``direct``, the URLs as
written, or ``iap``, each read through its own IAP TCP forwarding tunnel (``fleet.cli.tunnel``),
started for the read and stopped after it.

Resumable: nothing is recorded locally. The waves are derived again from the live preview, and before
the first wave every node of a group being rolled that the change no longer touches is verified, so
a rollout stopped (or killed at a job's time limit) continues where it stopped and never past a node
that failed its gate. Exit codes: 0 done, 1 stopped (a refused change, a failing wave), 2 bad input,
3 the program itself failed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from fleet.cli import deploy, preflight, tunnel
from fleet.plan import preview as previews
from fleet.stacks.expectations import INTEL_PCS_URL, verify_script
from fleet.stacks.load import load_config
from fleet.stacks.rollout import NodeEndpoints, node_endpoints, quote_url_key, template_problems

EXIT_DONE, EXIT_STOPPED, EXIT_INPUT = 0, 1, 2
CODE_ROOT = Path(__file__).resolve().parents[2]  # this checkout: its .venv runs `fleet verify`
FETCH_TIMEOUT = 15


class Stopped(Exception):
    """The rollout cannot go on; the message says why."""


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=FETCH_TIMEOUT) as response:  # noqa: S310 - a configured http(s) URL
        return response.read()


def report_data(pubkey_hex: str) -> str:
    """What the light client's quote over its key carries (the first 32 of 64 bytes)."""
    return hashlib.sha256(b"register" + pubkey_hex.encode()).hexdigest()


def parse_attest(body: bytes) -> dict[str, str]:
    """``/attest`` answers ``json(string)``: a JSON string whose text is ``{"quote", "pubkey"}``."""
    document: Any = json.loads(body)
    if isinstance(document, str):
        document = json.loads(document)
    if not isinstance(document, dict) or not isinstance(document.get("quote"), str) \
            or not isinstance(document.get("pubkey"), str):
        raise ValueError("not a {quote, pubkey} answer")
    pubkey = document["pubkey"].lower()
    if len(pubkey) != 66 or any(c not in "0123456789abcdef" for c in pubkey):
        raise ValueError("pubkey is not a 33-byte compressed public key in hex")
    return {"quote": document["quote"], "pubkey": pubkey}


def mismatches(table: str) -> list[str]:
    """The failing rows of a ``fleet verify`` table, as ``check: MISMATCH: why``."""
    return [f"    {line.split('  ')[0]}: {line[line.index('MISMATCH'):]}" for line in table.splitlines()
            if "  MISMATCH" in line]


# ---- the real CLI ----------------------------------------------------------------------------------

@dataclass
class Cli:
    root: Path
    stack: str
    env: dict[str, str]
    workdir: Path  # private to this run: the policy config each call reads (fleet.cli.deploy)
    selected: bool = False

    def _calls(self, command: str, extra: list[str]) -> list[deploy.Invocation]:
        calls = deploy.invocations(self.root, command, self.stack, self.env, extra, workdir=self.workdir)
        if self.selected:
            return calls[-1:]
        self.selected = True
        return calls

    def preview(self) -> previews.Preview:
        calls = self._calls("preview", list(preflight.PREVIEW_FLAGS))
        for call in calls[:-1]:
            if subprocess.run(call.argv, env=call.env, check=False).returncode != 0:
                raise preflight.CheckFailed("pulumi stack select failed")
        return preflight.run_preview(calls[-1])

    def up(self, targets: list[str] | None) -> int:
        extra = [arg for urn in targets or [] for arg in ("--target", urn)]
        calls = self._calls("up", extra)
        for call in calls:
            code = subprocess.run(call.argv, env=call.env, check=False).returncode
            if code != 0:
                return code
        return 0


# ---- health and attestation ------------------------------------------------------------------------

@dataclass
class GateResult:
    ok: bool
    lines: list[str] = field(default_factory=list)


@dataclass
class Gate:
    """Reads nodes through their endpoints and verifies them with ``fleet verify``."""

    root: Path
    config: Any
    plan: dict[str, Any]
    evidence: Path
    env: dict[str, str]
    fetcher: Callable[[str], bytes] = fetch
    sleep: Callable[[float], None] = time.sleep
    reach: Any = field(default_factory=tunnel.Direct)  # fleet.cli.tunnel: Direct or Iap
    overlay_key: str | None = None  # the overlay's shared public key, once read

    def node(self, key: str) -> dict[str, Any]:
        node = (self.plan.get("outputs") or {}).get("nodes", {}).get(key)
        if not isinstance(node, dict):
            raise Stopped(f"the plan has no node {key}")
        return node

    def endpoints(self, key: str) -> NodeEndpoints:
        return node_endpoints(self.config, key, self.node(key))

    def read(self, key: str, url: str) -> bytes:
        """One URL of a node, the way the rollout reaches it (as written, or through an IAP tunnel
        opened for this read and stopped after it)."""
        with self.reach.urls(key, self.node(key), [url]) as (local,):
            return self.fetcher(local)

    def apps_on(self, group: str) -> list[str]:
        apps = (self.plan.get("outputs") or {}).get("apps") or {}
        return sorted(name for name, app in apps.items()
                      if isinstance(app, dict) and app.get("target") == "gce" and app.get("nodes") == group)

    def problems(self, groups: list[previews.Group]) -> list[str]:
        """What keeps the gate from checking these groups at all (checked before any wave)."""
        out = []
        for group in groups:
            if group.kind != "dstack":
                continue
            if not self.apps_on(group.name):
                out.append(f"group {group.name} runs no app of this stack: nothing on its nodes can be attested")
            elif any(self.endpoints(n.key).quote_url is None for n in group.nodes if n.key in self.planned()):
                out.append(f"{quote_url_key(group.name)}: required to roll group {group.name}: the URL of a "
                           "GetQuote response of the node's app (the guest agent serves none on its public port)")
        return out

    def unreachable(self, groups: list[previews.Group]) -> list[str]:
        """Groups none of whose running nodes answers from here: their waves could never be verified,
        so the rollout does not start them (an overlay's members are read before each wave anyway)."""
        out = []
        for group in groups:
            if group.kind != "dstack":
                continue
            running = [n.key for n in group.nodes if n.exists and not n.down and n.key in self.planned()]
            errors = []
            for key in running:
                url = self.endpoints(key).info_url or ""
                try:
                    self.read(key, url)
                    break
                except (OSError, ValueError) as exc:
                    errors.append(f"{url}: {exc}")
            else:
                if running:
                    how = "through IAP" if self.reach.name == "iap" else "from here"
                    out.append(f"no node of group {group.name} answers {how} ({'; '.join(errors[:2])}), so no "
                               f"wave of it could be verified: {self.reach.hint(group.name)}")
        return out

    def planned(self) -> set[str]:
        return set((self.plan.get("outputs") or {}).get("nodes") or {})

    # -- overlay

    def read_overlay_key(self, members: list[str]) -> str:
        """The shared secret's public key as the members report it; they must agree."""
        seen: dict[str, str] = {}
        errors = []
        for key in members:
            url = self.endpoints(key).attest_url or ""
            try:
                seen[key] = parse_attest(self.read(key, url))["pubkey"]
            except (OSError, ValueError) as exc:
                errors.append(f"{key} ({url}): {exc}")
        if len(set(seen.values())) > 1:
            raise Stopped("the overlay's members report different shared keys ("
                          + ", ".join(f"{k} {v[:16]}…" for k, v in sorted(seen.items())) + "): it is split")
        if not seen:
            raise Stopped("no member of the overlay outside this wave answers on /attest, so no new node could be "
                          "shown to hold the shared secret: " + "; ".join(errors or ["no member is up"]))
        self.overlay_key = next(iter(seen.values()))
        return self.overlay_key

    def _wait(self, what: str, probe: Callable[[], str | None]) -> str | None:
        """Probe until it returns None (healthy) or the timeout passes; the last reason otherwise."""
        settings = self.config.fleet.rollout
        deadline = time.monotonic() + settings.health_timeout_seconds
        while True:
            reason = probe()
            if reason is None:
                return None
            if reason.startswith("!"):  # will not get better by waiting
                return reason[1:]
            if time.monotonic() >= deadline:
                return f"{what} not healthy after {settings.health_timeout_seconds}s: {reason}"
            self.sleep(settings.poll_seconds)

    def health(self, key: str, kind: str) -> str | None:
        endpoints = self.endpoints(key)
        if kind == "overlay":
            def probe() -> str | None:
                try:
                    answer = parse_attest(self.read(key, endpoints.attest_url or ""))
                except (OSError, ValueError) as exc:
                    return f"{endpoints.attest_url}: {exc} (the light client answers only once it holds the secret)"
                if self.overlay_key and answer["pubkey"] != self.overlay_key:
                    return (f"!{key} holds a different secret (public key {answer['pubkey'][:16]}…, the overlay's is "
                            f"{self.overlay_key[:16]}…): it founded a new overlay instead of joining")
                return None
        else:
            def probe() -> str | None:
                for url in (endpoints.info_url, endpoints.quote_url):
                    try:
                        self.read(key, url or "")
                    except (OSError, ValueError) as exc:
                        return f"{url}: {exc}"
                return None
        return self._wait(key, probe)

    def _verify_env(self, evidence: Path) -> dict[str, str]:
        env = dict(self.env)
        env["FLEET_EVIDENCE_DIR"] = str(evidence)
        env.setdefault("FLEET_PCCS_URL", INTEL_PCS_URL)
        return env

    def verify(self, key: str, kind: str, where: Path) -> GateResult:
        """``fleet verify`` of the node (overlay) or of each app on it (dstack) against the plan."""
        if kind == "overlay":
            return self._verify_overlay(key, where)
        lines, ok = [], True
        endpoints = self.endpoints(key)
        for app in self.apps_on(self.node(key)["group"]):
            target = f"app:{app}"
            expectation = (self.plan.get("measurements") or {}).get(target)
            if expectation is None:
                return GateResult(False, [f"the plan has no expected measurements for {target}"])
            try:
                with self.reach.urls(key, self.node(key), [endpoints.info_url or "", endpoints.quote_url or ""]) \
                        as (info_url, quote_url):
                    script = verify_script(target, info_url, quote_url)
                    result = subprocess.run(["bash", "-c", script],
                                            input=json.dumps({"measurements": {target: expectation}}), text=True,
                                            capture_output=True, cwd=CODE_ROOT, env=self._verify_env(where),
                                            check=False)
            except (OSError, ValueError) as exc:
                return GateResult(False, [*lines, f"{key} {target}: {exc}"])
            verdict = [ln for ln in result.stdout.splitlines() if ln.startswith("verify: ")] or \
                      (result.stderr.strip().splitlines() or ["no output"])[-1:]
            lines.append(f"{key} {target}: {verdict[0]}")
            ok = ok and result.returncode == 0
            lines += mismatches(result.stdout)
        return GateResult(ok, lines)

    def _verify_overlay(self, key: str, where: Path) -> GateResult:
        endpoints = self.endpoints(key)
        target = f"node:{key}"
        expectation = (self.plan.get("measurements") or {}).get(target)
        if expectation is None:
            return GateResult(False, [f"the plan has no expected measurements for {target}"])
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        evidence = where / f"node-{key}" / stamp
        evidence.mkdir(parents=True, exist_ok=True)
        try:
            body = self.read(key, endpoints.attest_url or "")
            answer = parse_attest(body)
        except (OSError, ValueError) as exc:
            return GateResult(False, [f"{key}: {endpoints.attest_url}: {exc}"])
        (evidence / "attest.json").write_bytes(body)
        (evidence / "quote.txt").write_text(answer["quote"], encoding="utf-8")
        (evidence / "plan.json").write_text(json.dumps({"measurements": {target: expectation}}, indent=2,
                                                       sort_keys=True), encoding="utf-8")
        if self.overlay_key and answer["pubkey"] != self.overlay_key:
            return GateResult(False, [f"{key}: holds a different secret than the overlay"])
        env = self._verify_env(where)
        args = [sys.executable, "-m", "fleet", "verify", "--quote", str(evidence / "quote.txt"),
                "--collateral", str(evidence / "collateral.json"), "--pccs-url", env["FLEET_PCCS_URL"],
                "--report-data", report_data(answer["pubkey"]), "--plan", str(evidence / "plan.json"),
                "--target", target]
        if env.get("FLEET_VERIFY_AT"):
            args += ["--at", env["FLEET_VERIFY_AT"]]
        result = subprocess.run(args, text=True, capture_output=True, cwd=CODE_ROOT, env=env, check=False)
        (evidence / "result.txt").write_text(result.stdout + result.stderr, encoding="utf-8")
        sums = [f"      {hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}" for p in sorted(evidence.iterdir())]
        verdict = [ln for ln in result.stdout.splitlines() if ln.startswith("verify: ")] or \
                  (result.stderr.strip().splitlines() or ["no output"])[-1:]
        return GateResult(result.returncode == 0,
                          [f"{key} {target}: {verdict[0]} (holds the overlay's secret {answer['pubkey'][:16]}…)",
                           *mismatches(result.stdout), f"    evidence kept in {evidence}:", *sums])


# ---- the rollout ----------------------------------------------------------------------------------

class Stop(Exception):
    """The rollout stops here: ``where`` it stopped and why."""

    def __init__(self, where: str, reason: str):
        super().__init__(reason)
        self.where = where


@dataclass
class Rollout:
    root: Path
    stack: str
    acks: set[str]
    plan: dict[str, Any]
    cli: Cli
    gate: Gate
    evidence: Path
    done: list[previews.Wave] = field(default_factory=list)
    current: previews.Wave | None = None
    remaining: list[str] = field(default_factory=list)

    def assess(self, preview: previews.Preview | None = None, *, waves: bool = True,
               where: str = "") -> preflight.Assessment:
        """The live preview (again), under the rules; a refusal stops the rollout."""
        try:
            found = preflight.assess(self.root, self.stack, preview or self.cli.preview(), self.acks, waves=waves,
                                     plan=self.plan)
        except (preflight.CheckFailed, deploy.DeployRefused) as exc:
            raise Stop(where, str(exc)) from None
        if found.refused:
            self.remaining = _remaining(found.analysis)
            raise Stop(where, "; ".join(str(f) for f in found.refused))
        return found

    def verify_settled(self, analysis: previews.Analysis) -> None:
        """Nodes of the groups being rolled that the change leaves as they are (done by an earlier run,
        or not part of it) verify before anything changes: a resumed rollout never goes past a node
        that failed its gate."""
        settled = [n for g in _rolled_groups(analysis) for n in g.nodes if n.exists and not n.disrupted
                   and not n.down and not n.removed and n.key in self.gate.planned()]
        if not settled:
            return
        print("before the first wave: verifying the nodes this change leaves as they are ("
              + ", ".join(n.key for n in settled) + ")")
        self.remaining = _remaining(analysis)
        for node in settled:
            try:
                if node.info.kind == "overlay" and self.gate.overlay_key is None:
                    self.gate.read_overlay_key([node.key])
            except Stopped as exc:
                raise Stop("before the first wave", str(exc)) from None
            result = self.gate.verify(node.key, node.info.kind, self.evidence / "wave-0")
            for line in result.lines:
                print(f"  {line}")
            if not result.ok:
                raise Stop("before the first wave", f"{node.key} does not verify against the plan; fix it or roll "
                           "it back before continuing")

    def wave(self, analysis: previews.Analysis, keys: list[str]) -> None:
        """One wave: its targeted up, the health wait and the gate of each of its nodes."""
        number = len(self.done) + 1
        where = f"wave {number}"
        self.remaining = _remaining(analysis)
        try:
            wave = previews.wave_targets(analysis, keys)
        except previews.WaveError as exc:
            raise Stop(where, str(exc)) from None
        kind = analysis.nodes[keys[0]].info.kind
        print(f"wave {number}: {wave.label()} ({len(wave.targets)} resources targeted"
              + (f"; with {len(wave.extras)} change(s) outside the nodes" if wave.extras else "") + ")")
        if kind == "overlay":
            others = [m.key for m in analysis.overlay_members()
                      if m.key not in keys and not m.down and not m.removed and m.key in self.gate.planned()]
            try:
                print(f"  overlay shared key (read from {', '.join(others)}): {self.gate.read_overlay_key(others)}")
            except Stopped as exc:
                raise Stop(f"{where} ({wave.label()}), before its up", str(exc)) from None
        self.current, self.remaining = wave, _remaining(analysis, keys)
        where = f"{where} ({wave.label()})"
        code = self.cli.up(wave.targets)
        if code != 0:
            raise Stop(where, f"pulumi up of the wave failed (exit {code})")
        for key in keys:
            reason = self.gate.health(key, kind)
            if reason is not None:
                raise Stop(where, f"health: {reason}")
            print(f"  {key}: healthy" + (" and holds the overlay's shared secret" if kind == "overlay" else ""))
            result = self.gate.verify(key, kind, self.evidence / f"wave-{number}")
            for line in result.lines:
                print(f"  {line}")
            if not result.ok:
                raise Stop(where, f"{key} failed its attestation gate")
        self.done.append(wave)
        self.current = None

    def waves(self, analysis: previews.Analysis) -> previews.Analysis:
        """Waves until no node is left to roll, each derived from the live preview."""
        applied: set[str] = set()
        while True:
            keys = previews.next_wave(analysis)
            left = _remaining(analysis)
            if not keys:
                if left:
                    self.remaining = left
                    raise Stop(f"wave {len(self.done) + 1}", f"no wave fits: {', '.join(left)} would exceed "
                               "maxUnavailable or leave the overlay without a member holding its secret")
                return analysis
            repeated = sorted(set(keys) & applied)
            if repeated:
                self.remaining = left
                raise Stop(f"wave {len(self.done) + 1}", f"{', '.join(repeated)} still show(s) the change after "
                           "its wave was applied")
            self.wave(analysis, keys)
            applied.update(keys)
            analysis = self.assess(where=f"wave {len(self.done) + 1}").analysis

    def finish(self, analysis: previews.Analysis) -> None:
        """What is left lands in one up, checked like `make up`: deletions of the old versions, changes
        outside the nodes."""
        final = self.assess(analysis.preview if not self.done else None, waves=False, where="after the last wave")
        changed = final.analysis.preview.changed_urns()
        if changed:
            print(f"after the last wave: applying the rest ({len(changed)} change(s))")
            code = self.cli.up(None)
            if code != 0:
                raise Stop("after the last wave", f"pulumi up of the remaining changes failed (exit {code})")

    def stop_lines(self, stop: Stop) -> list[str]:
        lines = [f"rollout stopped {'at ' if stop.where.startswith('wave') else ''}{stop.where}: {stop}"]
        for index, wave in enumerate(self.done, 1):
            lines.append(f"  wave {index} ({wave.label()}): applied and verified")
        if self.current is not None:
            lines.append(f"  wave {len(self.done) + 1} ({self.current.label()}): applied, not verified")
        lines.append(f"  untouched: {', '.join(self.remaining) or 'nothing'}")
        if self.evidence.exists():
            lines.append(f"  evidence: {self.evidence}")
        lines += [f"To resume once the cause is fixed: make rollout STACK={self.stack} (the waves are derived again "
                  "from the live preview; every node already changed is verified again before the next wave).",
                  f"To roll back: revert the change (git revert) and run make rollout STACK={self.stack}: the changed "
                  "nodes roll back in waves the same way (or pin them to the previous image with "
                  "dstack-fleet:nodes[].imageOverrides)."]
        return lines


def _remaining(analysis: previews.Analysis, skip: list[str] | None = None) -> list[str]:
    return [n.key for g in analysis.groups.values() for n in g.disrupted if n.key not in (skip or [])]


def _rolled_groups(analysis: previews.Analysis) -> list[previews.Group]:
    return [g for g in analysis.groups.values() if g.disrupted]


def _terminated(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def run(root: Path, stack: str, ack_values: list[str], plan_path: Path | None = None,
        gate_factory: Callable[..., Gate] = Gate, reach: str | None = None) -> int:
    """``reach``: ``direct`` or ``iap`` for this run instead of the stack's ``dstack-fleet:rollout.reach``."""
    # A SIGTERM (a job's time limit, a kill) unwinds like an error, so every open IAP tunnel is stopped.
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        with tempfile.TemporaryDirectory(prefix="dstack-fleet-rollout-") as workdir:  # mkdtemp: mode 0700
            return _run(root, stack, ack_values, plan_path, gate_factory, Path(workdir), reach)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _reach(config: Any, override: str | None, env: dict[str, str]) -> tuple[Any, list[str]]:
    """How nodes are read in this run, and what keeps that from working at all (checked before anything)."""
    mode = override or config.fleet.rollout.reach
    if mode == "direct":
        return tunnel.Direct(), []
    problems = [str(p) for p in template_problems(config, "iap")]
    if shutil.which(tunnel.GCLOUD, path=env.get("PATH")) is None:
        problems.append(f"reaching nodes through IAP needs the Google Cloud CLI and {tunnel.GCLOUD} is not on PATH "
                        "(install it, authenticate it, or run where the nodes are reachable with REACH=direct)")
    timeout = min(tunnel.OPEN_TIMEOUT_SECONDS, config.fleet.rollout.health_timeout_seconds)
    return tunnel.Iap(project=config.gcp.project, timeout=timeout, env=env), problems


def _run(root: Path, stack: str, ack_values: list[str], plan_path: Path | None, gate_factory: Callable[..., Gate],
         workdir: Path, reach_override: str | None = None) -> int:
    acks, problems = previews.parse_acks(ack_values)
    if problems:
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr)
        return EXIT_INPUT
    _, config = load_config(root, stack)  # ConfigError: exit 2 in fleet.cli.main
    if config.fleet.role != "env":
        print(f"error: stack {stack} has role {config.fleet.role}; only env stacks have nodes to roll", file=sys.stderr)
        return EXIT_INPUT
    env = dict(os.environ)
    reach, unusable = _reach(config, reach_override, env)
    if unusable:
        for problem in unusable:
            print(f"error: {problem}; nothing was applied", file=sys.stderr)
        return EXIT_INPUT
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    evidence = Path(env.get("FLEET_EVIDENCE_DIR") or root / ".fleet-evidence").resolve() / f"rollout-{stack}-{stamp}"
    cli = Cli(root, stack, env, workdir)
    try:
        plan = preflight.load_plan(root, stack, plan_path)
        first = preflight.assess(root, stack, cli.preview(), acks, waves=True, plan=plan)
    except (preflight.CheckFailed, deploy.DeployRefused) as exc:
        print(f"error: {exc}; nothing was applied", file=sys.stderr)
        return getattr(exc, "code", EXIT_INPUT)
    for line in first.lines():
        print(line)
    if first.refused:
        for line in preflight.refusal_lines(first, stack, "make rollout"):
            print(line, file=sys.stderr)
        return EXIT_STOPPED
    gate = gate_factory(root=root, config=config, plan=plan, evidence=evidence, env=env, reach=reach)
    if reach.name == "iap":
        print(f"reading nodes through IAP TCP forwarding: one gcloud compute start-iap-tunnel per node and port "
              f"(project {config.gcp.project}), stopped after each read")
    trouble = gate.problems(_rolled_groups(first.analysis))
    if trouble:
        for line in trouble:
            print(f"error: {line}; nothing was applied", file=sys.stderr)
        return EXIT_INPUT
    unreachable = gate.unreachable(_rolled_groups(first.analysis))
    if unreachable:
        for line in unreachable:
            print(f"error: {line}; nothing was applied", file=sys.stderr)
        return EXIT_STOPPED
    if env.get("FLEET_VERIFY_AT"):
        print(f"note: FLEET_VERIFY_AT={env['FLEET_VERIFY_AT']}: attestations are checked as of that time, not now")
    for line in first.allow.before_lines():
        print(line)
    rollout = Rollout(root, stack, acks, plan, cli, gate, evidence)
    try:
        rollout.verify_settled(first.analysis)
        rollout.finish(rollout.waves(first.analysis))
    except Stop as stop:
        for line in rollout.stop_lines(stop):
            print(line, file=sys.stderr)
        return EXIT_STOPPED
    for line in first.allow.after_lines():
        print(line)
    print(f"rollout of {stack} done: {len(rollout.done)} wave(s)"
          + (f"; evidence in {evidence}" if evidence.exists() else ""))
    return EXIT_DONE
