"""The post-deploy check: the generated step fetches the app's TcbInfo and quote, fetches Intel's
collateral for the quote, runs fleet verify against the plan's expectation and keeps everything it
checked as evidence (run here against local HTTP servers: the guest and a PCCS)."""

from __future__ import annotations

import http.server
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from fleet.attest import measure
from fleet.config.problems import ConfigError
from fleet.plan.planner import build_plan
from fleet.stacks.expectations import verify_script
from fleet.stacks.load import load_config
from tests.plans import shipped_plan

from .conftest import ROOT
from .pccs_stub import serve
from .test_apps import NEAR_APP, minimal_env, vector_compose  # noqa: F401 - fixture

QUOTE_SET = ROOT / "tests" / "vectors" / "near-mpc-quote-set"
TCB_INFO = (QUOTE_SET / "tcb_info.json").read_bytes()
QUOTE = (QUOTE_SET / "quote.json").read_bytes()
INSIDE_WINDOW = "2026-08-20T00:00:00Z"  # the quote set's collateral is current 2026-08-13 .. 2026-09-12
TARGET = "app:mpc-quote-set"


def quote_set_expectation() -> dict:
    """What a plan predicts for the app of the quote set (near/mpc 50328c652): its exact
    app-compose, the local key provider of its log and its MPC image."""
    tcb = json.loads(TCB_INFO)
    provider = next(e for e in tcb["event_log"] if e.get("event") == "key-provider")
    return measure.expected_measurements(
        tcb["app_compose"].encode(), dstack_version="0.5.8",
        key_provider_id=json.loads(bytes.fromhex(provider["event_payload"]))["id"],
        image_digests={"mpc-image-digest": "sha256:564a5aebc33495d5610626d23cb9e3da8e9d531d0edff9e38aa1ccaf059c15d3"})


@pytest.fixture
def guest():
    """A local server answering /info and /quote with whatever the test puts in ``state``."""
    state = {"/info": TCB_INFO, "/quote": QUOTE}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            body = state.get(self.path)
            self.send_response(200 if body is not None else 404)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield state, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def run(script: str, stdin: str, tmp_path: Path, pccs: str, **env: str) -> subprocess.CompletedProcess:
    environment = {"PATH": "/usr/bin:/bin", "FLEET_PCCS_URL": pccs, "FLEET_EVIDENCE_DIR": str(tmp_path / "evidence"),
                   "FLEET_VERIFY_AT": INSIDE_WINDOW, **env}
    return subprocess.run(["bash", "-c", script], input=stdin, text=True, capture_output=True, cwd=ROOT,
                          env=environment, timeout=300)


def verdict(result: subprocess.CompletedProcess) -> str:
    return next(line for line in result.stdout.splitlines() if line.startswith("verify: "))


def stdin(expectation: dict) -> str:
    return json.dumps({"measurements": {TARGET: expectation}})


def test_the_genuine_app_passes_and_its_evidence_is_kept(guest, tmp_path):
    state, url = guest
    with serve(QUOTE_SET / "collateral.json") as (pccs, asked):
        result = run(verify_script(TARGET, f"{url}/info", f"{url}/quote"), stdin(quote_set_expectation()), tmp_path, pccs)
    assert result.returncode == 0, result.stdout + result.stderr
    assert any(p.endswith("/tcb") for p in asked)  # the collateral was fetched for this quote
    assert verdict(result).startswith("verify: all")
    for row in ("quote signature", "TCB status", "TDX module TCB", "plan rtmr3"):
        assert next(ln for ln in result.stdout.splitlines() if ln.startswith(row)).rstrip().endswith("ok"), row
    [kept] = list((tmp_path / "evidence" / "app-mpc-quote-set").iterdir())
    assert sorted(p.name for p in kept.iterdir()) == ["collateral.json", "info.json", "plan.json", "quote.json",
                                                    "result.txt"]
    assert json.loads((kept / "collateral.json").read_text())["tcb_info"] == \
        json.loads((QUOTE_SET / "collateral.json").read_text())["tcb_info"]
    assert f"{kept}:" in result.stdout and "  collateral.json" in result.stdout  # their sha256, in the step output


def test_a_forged_quote_is_refused(guest, tmp_path):
    state, url = guest
    forged = json.loads(QUOTE)
    forged[100] ^= 1  # inside the TD report the quoting enclave signed
    state["/quote"] = json.dumps(forged).encode()
    with serve(QUOTE_SET / "collateral.json") as (pccs, _):
        result = run(verify_script(TARGET, f"{url}/info", f"{url}/quote"), stdin(quote_set_expectation()), tmp_path, pccs)
    assert result.returncode == 1 and "quote signature" in verdict(result)


def test_an_app_running_something_else_fails(guest, tmp_path):
    state, url = guest
    tampered = json.loads(TCB_INFO)
    tampered["app_compose"] = tampered["app_compose"].replace('"public_logs": true', '"public_logs": false')
    state["/info"] = json.dumps(tampered).encode()
    with serve(QUOTE_SET / "collateral.json") as (pccs, _):
        result = run(verify_script(TARGET, f"{url}/info", f"{url}/quote"), stdin(quote_set_expectation()), tmp_path, pccs)
    assert result.returncode == 1


def test_stale_collateral_fails_the_step(guest, tmp_path):
    state, url = guest
    with serve(QUOTE_SET / "collateral.json") as (pccs, _):
        result = run(verify_script(TARGET, f"{url}/info", f"{url}/quote"), stdin(quote_set_expectation()), tmp_path,
                     pccs, FLEET_VERIFY_AT="2026-10-20T00:00:00Z")
    assert result.returncode == 1 and verdict(result) == "verify: 1 check(s) failed: quote collateral"


def test_a_target_without_planned_values_is_an_error(guest, tmp_path):
    state, url = guest
    nothing = {"kind": "dstack-app", "app_id": "pending build", "compose_hash": "pending build"}
    with serve(QUOTE_SET / "collateral.json") as (pccs, _):
        result = run(verify_script(TARGET, f"{url}/info", f"{url}/quote"), stdin(nothing), tmp_path, pccs)
    assert result.returncode == 1 and "plan values" in verdict(result)


def test_the_plan_hands_the_step_its_expectation(project):
    app = dict(NEAR_APP, verify={"infoUrl": "http://127.0.0.1:1/info", "quoteUrl": "http://127.0.0.1:1/quote"})
    project.write_stack("1774945636", minimal_env([app]))
    plan = build_plan(project.root, "1774945636")
    target = "app:mpc-localnet-one-node-1774945636"
    step = next(r for r in plan.resources if r.name == "verify-mpc-localnet-one-node")
    assert json.loads(step.inputs["stdin"]) == {"measurements": {target: plan.measurements[target]}}
    assert "--pccs-url" in step.inputs["create"] and "http://127.0.0.1:1/quote" in step.inputs["create"]


def test_verify_without_a_quote_url_is_refused_at_plan_time(project):
    app = dict(NEAR_APP, verify={"infoUrl": "http://127.0.0.1:1/info"})
    project.write_stack("noquote", minimal_env([app]))
    with pytest.raises(ConfigError) as error:
        load_config(project.root, "noquote")
    assert any(str(p).endswith("dstack-fleet:apps[0].verify.quoteUrl: required: the post-deploy check always "
                               "verifies the guest's TDX quote (signature, TCB status) against the plan; give the URL "
                               "of the app's GetQuote response") for p in error.value.problems)


def test_the_step_is_off_unless_configured():
    plan = shipped_plan("prod")
    assert not [r for r in plan.resources if r.name.startswith("verify-")]


def test_step_passes_shellcheck(tmp_path):
    path = tmp_path / "verify.sh"
    path.write_text("#!/bin/bash\n" + verify_script("app:x", "https://a.example/info", "https://a.example/quote"))
    result = subprocess.run([str(Path(sys.executable).parent / "shellcheck"), "-s", "bash", str(path)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
