"""make preview / make up: pinned CLI, backend rules, config checked first (fake `pulumi`)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT

FAKE = """#!{python}
import json, os, sys
log = os.environ["FAKE_PULUMI_LOG"]
with open(log, "a") as f:
    f.write(json.dumps({{"argv": sys.argv[1:], "backend": os.environ.get("PULUMI_BACKEND_URL")}}) + "\\n")
if sys.argv[1:] == ["version"]:
    print("v" + os.environ.get("FAKE_PULUMI_VERSION", "{version}"))
if "preview" in sys.argv and "--json" in sys.argv:  # make up's live check: a preview that changes nothing
    print(json.dumps({{"steps": [], "duration": 1}}))
"""


@pytest.fixture
def fake_pulumi(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    exe = bindir / "pulumi"
    version = (ROOT / ".pulumi-version").read_text().strip()
    exe.write_text(FAKE.format(python=sys.executable, version=version))
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "calls.jsonl"
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}", FAKE_PULUMI_LOG=str(log))
    env.pop("PULUMI_BACKEND_URL", None)
    return env, log


def make(target, stack, env, root=ROOT):
    return subprocess.run(["make", "-s", target, f"STACK={stack}", "PY_DEPS=", f"PY={sys.executable}"],
                          cwd=root, env=env, capture_output=True, text=True)


def calls(log: Path):
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def policy_config(argv: list[str]) -> dict:
    """The policy pack flags of a preview/up call: the pack of this checkout and the config file."""
    i = argv.index("--policy-pack")
    assert argv[i + 1] == str(ROOT / "policies") and argv[i + 2] == "--policy-pack-config"
    return json.loads(Path(argv[i + 3]).read_text())


def test_make_preview_dev_uses_the_local_backend(fake_pulumi):
    env, log = fake_pulumi
    result = make("preview", "dev", env)
    assert result.returncode == 0, result.stderr
    recorded = calls(log)
    assert recorded[0]["argv"] == ["version"]
    assert recorded[1]["argv"][-5:] == ["select", "--create", "--non-interactive", "--stack", "dev"]
    preview = recorded[2]["argv"]
    assert preview[:2] == ["--cwd", str(ROOT)] and preview[2:6] == ["preview", "--stack", "dev", "--diff"]
    assert recorded[2]["backend"] == f"file://{ROOT / '.pulumi-state'}"
    config = policy_config(preview)
    assert config["all"] == "advisory"  # dev: every policy advisory
    assert {entry["enforcementLevel"] for name, entry in config.items() if name != "all"} == {"advisory"}


def test_make_up_prod_refuses_without_a_shared_backend(fake_pulumi):
    env, log = fake_pulumi
    result = make("up", "prod", env)
    assert result.returncode != 0
    assert "stack prod needs a shared backend" in result.stderr
    assert not any(c["argv"][:1] == ["up"] or "up" in c["argv"] for c in calls(log))


def test_make_up_staging_refuses_a_local_backend_url(fake_pulumi):
    env, log = fake_pulumi
    env["PULUMI_BACKEND_URL"] = "file:///tmp/somewhere"
    result = make("up", "staging", env)
    assert result.returncode != 0 and "is a local path" in result.stderr


def test_up_prod_with_a_shared_backend_and_locked_images(fake_pulumi, project):
    from .test_images import lock_all

    env, log = fake_pulumi
    env["PULUMI_BACKEND_URL"] = "gs://acme-tee-bootstrap-fleet-state"
    env["FLEET_UP_YES"] = "1"
    lock_all(project, "prod")
    result = subprocess.run([sys.executable, "-m", "fleet", "--root", str(project.root), "deploy", "up", "--stack",
                             "prod"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    up = calls(log)[-1]
    assert up["argv"][2:8] == ["up", "--stack", "prod", "--diff", "--non-interactive", "--yes"]
    assert up["argv"][8:11] == ["--policy-pack", str(ROOT / "policies"), "--policy-pack-config"]
    assert len(up["argv"]) == 12
    assert up["backend"] == "gs://acme-tee-bootstrap-fleet-state"
    config = policy_config(up["argv"])
    assert config["all"] == "mandatory" and config["data-safety"] == {"enforcementLevel": "mandatory", "tier": "prod"}
    assert config["unsafe-peer-delivery"]["tier"] == "prod"


def test_policy_enforcement_overrides_reach_the_pack_config(fake_pulumi, project):
    env, log = fake_pulumi
    env["PULUMI_BACKEND_URL"] = "gs://acme-tee-bootstrap-fleet-state"
    project.mutate("staging", "strict", lambda c: c.update({"dstack-fleet:policy": {
        "enforcement": {"tdx-only": "advisory", "pinned-digests": "disabled"}, "publicPorts": [443],
        "allowedImages": ["projects/ubuntu-os-cloud/global/images/ubuntu-2404-tdx-v20250805"]}}))
    result = subprocess.run([sys.executable, "-m", "fleet", "--root", str(project.root), "deploy", "preview",
                             "--stack", "strict"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    first = calls(log)[-1]["argv"]
    config = policy_config(first)
    subprocess.run([sys.executable, "-m", "fleet", "--root", str(project.root), "deploy", "preview", "--stack",
                    "strict"], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert calls(log)[-1]["argv"] == first  # the same settings reuse one config file
    assert config["all"] == "mandatory"
    assert config["tdx-only"] == {"enforcementLevel": "advisory", "extraMachineTypes": [],
                                  "allowedImages": ["projects/ubuntu-os-cloud/global/images/ubuntu-2404-tdx-v20250805"]}
    assert config["pinned-digests"] == {"enforcementLevel": "disabled"}
    assert config["no-open-ingress"] == {"enforcementLevel": "mandatory", "publicPorts": [443]}


def test_unknown_policy_rule_stops_before_the_cli_runs(fake_pulumi, project):
    env, log = fake_pulumi
    project.mutate("dev", "typo", lambda c: c.update({"dstack-fleet:policy": {"enforcement": {"tdx-olny": "advisory"}}}))
    result = subprocess.run([sys.executable, "-m", "fleet", "--root", str(project.root), "deploy", "preview",
                             "--stack", "typo"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 2
    assert "dstack-fleet:policy.enforcement.tdx-olny: no policy rule is named 'tdx-olny'" in result.stderr
    assert "Traceback" not in result.stderr and calls(log) == []


def test_wrong_cli_version_is_refused(fake_pulumi):
    env, log = fake_pulumi
    env["FAKE_PULUMI_VERSION"] = "3.100.0"
    result = make("preview", "dev", env)
    assert result.returncode != 0
    assert "Pulumi CLI 3.100.0 found" in result.stderr and "pins" in result.stderr
    assert len(calls(log)) == 1  # only `pulumi version`


def test_missing_cli_gives_install_instructions(tmp_path):
    env = dict(os.environ, PATH=str(tmp_path))
    env.pop("PULUMI_BACKEND_URL", None)
    result = subprocess.run([sys.executable, "-m", "fleet", "deploy", "preview", "--stack", "dev"],
                            cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 2
    assert "the Pulumi CLI is not installed" in result.stderr and "get.pulumi.com" in result.stderr


def test_bad_config_stops_before_the_cli_runs(fake_pulumi, project):
    env, log = fake_pulumi
    project.mutate("dev", "broken", lambda c: c.update({"dstack-fleet:nodez": []}))
    result = subprocess.run([sys.executable, "-m", "fleet", "--root", str(project.root), "deploy", "preview",
                             "--stack", "broken"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 2
    assert "dstack-fleet:nodez: unknown key" in result.stderr
    assert calls(log) == []
