"""The optional post-deploy check: the generated step fetches a TcbInfo and runs fleet verify
against the expectation the plan computed (run here against a local HTTP server)."""

from __future__ import annotations

import http.server
import json
import subprocess
import threading

import pytest

from fleet.stacks.expectations import verify_script
from fleet.plan.planner import build_plan
from tests.plans import shipped_plan

from .conftest import ROOT
from .test_apps import NEAR_APP, minimal_env, vector_compose  # noqa: F401 - fixture

VECTOR = (ROOT / "tests" / "vectors" / "near-mpc-tcb-info.json").read_bytes()


@pytest.fixture
def served():
    """A local server returning whatever the test puts in ``body``."""
    state = {"body": VECTOR}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(state["body"])

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield state, f"http://127.0.0.1:{server.server_address[1]}/info"
    server.shutdown()


def expectation(project):
    app = dict(NEAR_APP, verify={"infoUrl": "http://127.0.0.1:1/info"})
    project.write_stack("1774945636", minimal_env([app]))
    plan = build_plan(project.root, "1774945636")
    target = "app:mpc-localnet-one-node-1774945636"
    step = next(r for r in plan.resources if r.name == "verify-mpc-localnet-one-node")
    assert json.loads(step.inputs["stdin"]) == {"measurements": {target: plan.measurements[target]}}
    return target, step.inputs["stdin"]


def run(script: str, stdin: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", script], input=stdin, text=True, capture_output=True, cwd=ROOT)


def test_the_genuine_node_passes(project, served):
    state, url = served
    target, stdin = expectation(project)
    result = run(verify_script(target, url, None), stdin)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all" in result.stdout and "hold" in result.stdout


def test_a_node_running_something_else_fails(project, served):
    state, url = served
    target, stdin = expectation(project)
    tampered = json.loads(VECTOR)
    tampered["app_compose"] = tampered["app_compose"].replace('"public_logs": true', '"public_logs": false')
    state["body"] = json.dumps(tampered).encode()
    result = run(verify_script(target, url, None), stdin)
    assert result.returncode == 1


def test_the_step_is_off_unless_configured():
    plan = shipped_plan("prod")
    assert not [r for r in plan.resources if r.name.startswith("verify-")]


def test_step_passes_shellcheck(tmp_path):
    import sys
    from pathlib import Path

    path = tmp_path / "verify.sh"
    path.write_text("#!/bin/bash\n" + verify_script("app:x", "https://a.example/info", "https://a.example/quote"))
    result = subprocess.run([str(Path(sys.executable).parent / "shellcheck"), "-s", "bash", str(path)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
