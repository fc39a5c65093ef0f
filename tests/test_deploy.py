"""make preview / make up: pinned CLI, backend rules, KMS secrets provider, secrets, pending builds and the
stack's state checked first (a fake `pulumi` on PATH records its arguments and answers canned output)."""

from __future__ import annotations

import copy
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from fleet.cli import deploy
from fleet.stacks import readiness

from .conftest import ROOT, stack_config

FAKE = """#!{python}
import json, os, stat, sys
log = os.environ["FAKE_PULUMI_LOG"]
argv = sys.argv[1:]
record = {{"argv": argv, "backend": os.environ.get("PULUMI_BACKEND_URL")}}
if "--policy-pack-config" in argv:  # the file exists only while the run lasts: record it now
    path = argv[argv.index("--policy-pack-config") + 1]
    record["policyConfig"] = json.load(open(path))
    record["policyModes"] = [stat.S_IMODE(os.stat(path).st_mode), stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode)]
with open(log, "a") as f:
    f.write(json.dumps(record) + "\\n")
if argv == ["version"]:
    print("v" + os.environ.get("FAKE_PULUMI_VERSION", "{version}"))
elif "export" in argv:
    path = os.environ.get("FAKE_PULUMI_EXPORT")
    sys.stdout.write(open(path).read() if path else json.dumps({{"version": 3, "deployment": {{"resources": []}}}}))
    sys.exit(int(os.environ.get("FAKE_EXPORT_RC", "0")))
elif "select" in argv:
    sys.exit(int(os.environ.get("FAKE_SELECT_RC", "0")))
elif "preview" in argv and "--json" in argv:  # make up's live check: a preview that changes nothing
    print(json.dumps({{"steps": [], "duration": 1}}))
"""
KMS = "gcpkms://projects/acme-tee-ops/locations/us-central1/keyRings/fleet-stack-secrets/cryptoKeys/fleet-{}"
ENCRYPTED_KEY = "CiQAh0fake0encrypted0data0key0written0by0pulumi0stack0init"
SECRETS = {"phalaApiKey": {"secure": "v1:fakeciphertext1"}, "vmmToken": {"secure": "v1:fakeciphertext2"}}


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
    env.pop("FLEET_UP_YES", None)
    return env, log


def make(target, stack, env, root=ROOT):
    return subprocess.run(["make", "-s", target, f"STACK={stack}", "PY_DEPS=", f"PY={sys.executable}"],
                          cwd=root, env=env, capture_output=True, text=True)


def fleet_deploy(project, action, stack, env):
    return subprocess.run([sys.executable, "-m", "fleet", "--root", str(project.root), "deploy", action, "--stack",
                           stack], cwd=ROOT, env=env, capture_output=True, text=True)


def calls(log: Path):
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def policy_config(call: dict) -> dict:
    """The policy pack flags of a preview/up call: the pack of this checkout and the config file,
    as the CLI read it (private to the run: mode 0600 in a 0700 directory, removed afterwards)."""
    argv = call["argv"]
    i = argv.index("--policy-pack")
    assert argv[i + 1] == str(ROOT / "policies") and argv[i + 2] == "--policy-pack-config"
    assert call["policyModes"] == [0o600, 0o700]
    assert not Path(argv[i + 3]).exists() and not Path(argv[i + 3]).parent.exists()
    return call["policyConfig"]


def initialised(project, base: str, name: str | None = None, *, change=None, encrypted: bool = True,
                provider: str | None = "derived") -> str:
    """A stack file as the operator leaves it after the first-time steps (docs/operations.md): its KMS secrets provider,
    the encryptedkey `pulumi stack init` wrote, and the secrets its apps need (as ciphertext)."""
    name = name or base
    config = copy.deepcopy(stack_config(base))
    config.setdefault("dstack-fleet:secrets", {}).update(SECRETS)
    if change:
        change(config)
    extra = {}
    if provider:
        extra["secretsprovider"] = KMS.format(name) if provider == "derived" else provider
    if encrypted:
        extra["encryptedkey"] = ENCRYPTED_KEY
    project.write_stack(name, config, extra=extra)
    return name


def lock(project, stack):
    from .test_readiness import lock_everything

    lock_everything(project, stack)


# ---------------------------------------------------------------------------------------------
# Secrets provider and stack creation


def test_make_preview_dev_creates_the_stack_with_its_kms_key_and_the_local_backend(fake_pulumi, project):
    env, log = fake_pulumi
    initialised(project, "dev", encrypted=False)  # the first deploy of dev creates it
    result = fleet_deploy(project, "preview", "dev", env)
    assert result.returncode == 0, result.stderr
    recorded = calls(log)
    assert [c["argv"][2:4] for c in recorded[1:]] == [["stack", "select"], ["preview", "--stack"]]
    assert recorded[0]["argv"] == ["version"]
    assert recorded[1]["argv"] == ["--cwd", str(project.root), "stack", "select", "--stack", "dev", "--non-interactive",
                                   "--create", "--secrets-provider", KMS.format("dev")]
    preview = recorded[2]["argv"]
    assert preview[:2] == ["--cwd", str(project.root)] and preview[2:6] == ["preview", "--stack", "dev", "--diff"]
    assert recorded[2]["backend"] == f"file://{project.root / '.pulumi-state'}"
    config = policy_config(recorded[2])
    assert config["all"] == "advisory"  # dev: every policy advisory
    assert {entry["enforcementLevel"] for name, entry in config.items() if name != "all"} == {"advisory"}
    assert not any("export" in c["argv"] for c in recorded)  # a preview does not read the state


@pytest.mark.parametrize("stack", ["staging", "prod", "images"])
def test_staging_prod_and_images_are_never_created_by_a_deploy(fake_pulumi, project, stack):
    env, log = fake_pulumi
    env["PULUMI_BACKEND_URL"] = "gs://acme-tee-ops-fleet-state"
    initialised(project, stack)
    result = fleet_deploy(project, "preview", stack, env)
    assert result.returncode == 0, result.stderr
    select = calls(log)[1]["argv"]
    assert select[2:] == ["stack", "select", "--stack", stack, "--non-interactive"]
    assert "--create" not in select and "--secrets-provider" not in select


@pytest.mark.parametrize("stack", ["staging", "prod", "images"])
def test_a_stack_never_initialised_is_refused_with_the_steps(fake_pulumi, project, stack):
    env, log = fake_pulumi
    env["PULUMI_BACKEND_URL"] = "gs://acme-tee-ops-fleet-state"
    initialised(project, stack, encrypted=False)
    result = fleet_deploy(project, "up", stack, env)
    assert result.returncode == 2
    assert f"stacks/Pulumi.{stack}.yaml: no encryptedkey, so stack {stack} was never initialised" in result.stderr
    assert f"pulumi stack init {stack} --secrets-provider '{KMS.format(stack)}'" in result.stderr
    assert calls(log) == []


def test_a_stack_file_without_its_secretsprovider_is_refused(fake_pulumi, project):
    env, log = fake_pulumi
    initialised(project, "dev", provider=None)
    result = fleet_deploy(project, "preview", "dev", env)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"error: stacks/Pulumi.dev.yaml: no secretsprovider; add `secretsprovider: {KMS.format('dev')}` (the "
        "bootstrap stack's Cloud KMS key for dev), or the CLI would fall back to a passphrase CI does not have")
    assert calls(log) == []


def test_a_secretsprovider_other_than_the_bootstrap_key_is_refused(fake_pulumi, project):
    env, log = fake_pulumi
    initialised(project, "dev", provider="passphrase")
    result = fleet_deploy(project, "preview", "dev", env)
    assert result.returncode == 2
    assert "secretsprovider is passphrase, but the bootstrap stack's key for dev is " + KMS.format("dev") in result.stderr
    assert "pulumi stack change-secrets-provider --stack dev" in result.stderr and calls(log) == []


@pytest.mark.parametrize("stack", ["dev", "staging", "prod", "images"])
def test_every_shipped_env_and_images_stack_file_passes_the_provider_check(stack):
    d = deploy.prepare(ROOT, "preview", stack, {})
    assert d.stack_file.settings["secretsprovider"] == d.secrets_provider == KMS.format(stack)
    if stack != "dev":  # not yet initialised: the operator's first `pulumi stack init` is refused, not guessed
        with pytest.raises(deploy.DeployRefused, match="no encryptedkey"):
            deploy.check_secrets_provider(d)
    else:
        deploy.check_secrets_provider(d)


# ---------------------------------------------------------------------------------------------
# Secrets


def test_make_preview_refuses_a_missing_secret_with_the_exact_command(fake_pulumi):
    env, log = fake_pulumi
    result = make("preview", "dev", env)  # the shipped dev stack: the Phala key is the operator's to set
    assert result.returncode != 0
    assert "error: dev needs secrets the stack does not set:" in result.stderr
    assert ("dstack-fleet:secrets.phalaApiKey: [secret: not set] (needed by app hello (phala.apiKeySecret); "
            "app simple-mkosi (phala.apiKeySecret)); set it with "
            "`pulumi config set --stack dev --secret --path dstack-fleet:secrets.phalaApiKey`") in result.stderr
    assert calls(log) == []


def test_up_refuses_a_missing_secret_before_the_cli(fake_pulumi, project):
    env, log = fake_pulumi
    env["PULUMI_BACKEND_URL"] = "gs://acme-tee-ops-fleet-state"
    initialised(project, "staging", change=lambda c: c["dstack-fleet:secrets"].pop("vmmToken"))
    result = fleet_deploy(project, "up", "staging", env)
    assert result.returncode == 2
    assert "`pulumi config set --stack staging --secret --path dstack-fleet:secrets.vmmToken`" in result.stderr
    assert calls(log) == []


# ---------------------------------------------------------------------------------------------
# Backends


def test_make_up_prod_refuses_without_a_shared_backend(fake_pulumi, project):
    env, log = fake_pulumi
    initialised(project, "prod")
    result = fleet_deploy(project, "up", "prod", env)
    assert result.returncode == 2
    assert "stack prod needs a shared backend" in result.stderr
    assert not any("up" in c["argv"] for c in calls(log))


def test_make_up_staging_refuses_a_local_backend_url(fake_pulumi, project):
    env, log = fake_pulumi
    env["PULUMI_BACKEND_URL"] = "file:///tmp/somewhere"
    initialised(project, "staging")
    result = fleet_deploy(project, "up", "staging", env)
    assert result.returncode != 0 and "is a local path" in result.stderr


# ---------------------------------------------------------------------------------------------
# up: pending builds and the stack's state


def test_up_prod_with_a_shared_backend_and_locked_images(fake_pulumi, project):
    env, log = fake_pulumi
    env["PULUMI_BACKEND_URL"] = "gs://acme-tee-bootstrap-fleet-state"
    env["FLEET_UP_YES"] = "1"
    initialised(project, "prod")
    lock(project, "prod")
    result = fleet_deploy(project, "up", "prod", env)
    assert result.returncode == 0, result.stderr
    recorded = calls(log)
    # Every up is first previewed (as JSON) so the rollout rules judge the exact steps it would take.
    assert [c["argv"][2:4] for c in recorded[1:]] == [
        ["stack", "select"], ["stack", "export"], ["preview", "--stack"], ["up", "--stack"]]
    assert recorded[2]["argv"][2:] == ["stack", "export", "--stack", "prod"]
    assert "--json" in recorded[3]["argv"] and "--policy-pack" in recorded[3]["argv"]
    up = recorded[-1]
    assert up["argv"][2:8] == ["up", "--stack", "prod", "--diff", "--non-interactive", "--yes"]
    assert up["argv"][8:11] == ["--policy-pack", str(ROOT / "policies"), "--policy-pack-config"]
    assert len(up["argv"]) == 12
    assert up["backend"] == "gs://acme-tee-bootstrap-fleet-state"
    config = policy_config(up)
    assert config["all"] == "mandatory" and config["data-safety"] == {"enforcementLevel": "mandatory", "tier": "prod"}
    assert config["unsafe-peer-delivery"]["tier"] == "prod"


@pytest.mark.parametrize("stack", ["staging", "dev"])
def test_make_up_refuses_pending_images_in_every_tier(fake_pulumi, project, stack):
    env, log = fake_pulumi
    env["PULUMI_BACKEND_URL"] = "gs://acme-tee-ops-fleet-state"
    initialised(project, stack)
    result = fleet_deploy(project, "up", stack, env)
    assert result.returncode == 2
    assert f"{stack} refuses pending images " in result.stderr and "overlay-3eb04ca" in result.stderr
    assert "is pending build and nodes overlay-0, overlay-1" in result.stderr
    assert not any(c["argv"][2:3] == ["up"] for c in calls(log))


def export_of(*resources: tuple[str, str, str]) -> dict:
    """A `pulumi stack export` document holding (parent type, type, name) resources of stack dev."""
    out = []
    for parent, type_, name in resources:
        qualified = f"{parent}${type_}" if parent else type_
        out.append({"urn": f"urn:pulumi:dev::dstack-fleet::{qualified}::{name}", "type": type_, "custom": True})
    return {"version": 3, "deployment": {"manifest": {}, "resources": out}}


def test_up_refuses_when_a_deployed_app_now_waits_for_a_container_build(fake_pulumi, project, tmp_path):
    """The Phala app's container moved to a build the lock lacks: preview and up leave the app out, which
    would delete the deployed CVM. The export shows it deployed, so `up` refuses, naming app and image."""
    env, log = fake_pulumi
    initialised(project, "dev")
    lock(project, "dev")
    from .test_readiness import unlock_containers

    unlock_containers(project, "dev", "hello", "simple-app")  # not built (any more)
    exported = tmp_path / "export.json"
    exported.write_text(json.dumps(export_of(("", "dstack-fleet:apps:DstackApp", "hello-dev"),
                                             ("dstack-fleet:nodes:OverlayNode", "gcp:compute/instance:Instance",
                                              "overlay-0"))))
    env["FAKE_PULUMI_EXPORT"] = str(exported)
    result = fleet_deploy(project, "up", "dev", env)
    assert result.returncode == 2, result.stderr
    assert "error: dev refuses to update:" in result.stderr
    assert "app hello-dev is deployed, but app hello's container images hello are pending build" in result.stderr
    assert "overlay-0" not in result.stderr  # its image is built: nothing to refuse there
    assert not any(c["argv"][2:3] == ["up"] for c in calls(log))
    # nothing deployed yet: the apps are simply created later, and up runs
    env.pop("FAKE_PULUMI_EXPORT")
    assert fleet_deploy(project, "up", "dev", env).returncode == 0


def test_deployed_nodes_waiting_for_their_image_are_named():
    """The state check by itself, for a node: its image pending (the check runs before the pending-image
    refusal so the message says the node is deployed)."""
    d = deploy.prepare(ROOT, "up", "dev", {})
    with pytest.raises(deploy.DeployRefused) as refused:
        deploy.check_deployed_waiting(d, export_of(("dstack-fleet:nodes:OverlayNode", "gcp:compute/instance:Instance",
                                                    "overlay-1")))
    assert ("node overlay-1 is deployed, but its image 'overlay-3eb04ca' is pending build (input hash "
            in str(refused.value))
    assert deploy.ON_STATE.index(deploy.check_deployed_waiting) < deploy.ON_STATE.index(deploy.check_pending_images)
    assert readiness.deployed_and_waiting(export_of(), {}) == []


def test_an_unreadable_export_stops_up(fake_pulumi, project, tmp_path):
    env, log = fake_pulumi
    initialised(project, "dev")
    lock(project, "dev")
    broken = tmp_path / "export.json"
    broken.write_text("not json")
    env["FAKE_PULUMI_EXPORT"] = str(broken)
    result = fleet_deploy(project, "up", "dev", env)
    assert result.returncode == 2 and "pulumi stack export --stack dev printed no JSON document" in result.stderr
    env["FAKE_EXPORT_RC"] = "1"
    result = fleet_deploy(project, "up", "dev", env)
    assert result.returncode == 2 and "pulumi stack export --stack dev failed (1)" in result.stderr
    assert not any(c["argv"][2:3] == ["up"] for c in calls(log))


def test_a_failing_stack_select_stops_with_its_code(fake_pulumi, project):
    env, log = fake_pulumi
    initialised(project, "dev")
    env["FAKE_SELECT_RC"] = "7"
    assert fleet_deploy(project, "preview", "dev", env).returncode == 7
    assert [c["argv"][2:4] for c in calls(log)[1:]] == [["stack", "select"]]


# ---------------------------------------------------------------------------------------------
# Policy config, CLI version, config errors


def test_policy_enforcement_overrides_reach_the_pack_config(fake_pulumi, project):
    env, log = fake_pulumi
    env["PULUMI_BACKEND_URL"] = "gs://acme-tee-bootstrap-fleet-state"
    initialised(project, "staging", "strict", change=lambda c: c.update({"dstack-fleet:policy": {
        "enforcement": {"tdx-only": "advisory", "pinned-digests": "disabled"}, "publicPorts": [443],
        "allowedImages": ["projects/ubuntu-os-cloud/global/images/ubuntu-2404-tdx-v20250805"]}}))
    result = fleet_deploy(project, "preview", "strict", env)
    assert result.returncode == 0, result.stderr
    first = calls(log)[-1]
    config = policy_config(first)
    assert fleet_deploy(project, "preview", "strict", env).returncode == 0
    second = calls(log)[-1]
    # every run writes its own file in a fresh private directory: nothing is reused from a shared place
    assert policy_config(second) == config and second["argv"][-1] != first["argv"][-1]
    assert config["all"] == "mandatory"
    assert config["tdx-only"] == {"enforcementLevel": "advisory", "extraMachineTypes": [],
                                  "allowedImages": ["projects/ubuntu-os-cloud/global/images/ubuntu-2404-tdx-v20250805"]}
    assert config["pinned-digests"] == {"enforcementLevel": "disabled"}
    assert config["no-open-ingress"] == {"enforcementLevel": "mandatory", "publicPorts": [443]}


def test_unknown_policy_rule_stops_before_the_cli_runs(fake_pulumi, project):
    env, log = fake_pulumi
    project.mutate("dev", "typo", lambda c: c.update({"dstack-fleet:policy": {"enforcement": {"tdx-olny": "advisory"}}}))
    result = fleet_deploy(project, "preview", "typo", env)
    assert result.returncode == 2
    assert "dstack-fleet:policy.enforcement.tdx-olny: no policy rule is named 'tdx-olny'" in result.stderr
    assert "Traceback" not in result.stderr and calls(log) == []


def test_wrong_cli_version_is_refused(fake_pulumi, project):
    env, log = fake_pulumi
    env["FAKE_PULUMI_VERSION"] = "3.100.0"
    initialised(project, "dev")
    result = fleet_deploy(project, "preview", "dev", env)
    assert result.returncode != 0
    assert "Pulumi CLI 3.100.0 found" in result.stderr and "pins" in result.stderr
    assert len(calls(log)) == 1  # only `pulumi version`


def test_missing_cli_gives_install_instructions(tmp_path, project):
    initialised(project, "dev")
    env = dict(os.environ, PATH=str(tmp_path))
    env.pop("PULUMI_BACKEND_URL", None)
    result = fleet_deploy(project, "preview", "dev", env)
    assert result.returncode == 2
    assert "the Pulumi CLI is not installed" in result.stderr and "get.pulumi.com" in result.stderr


def test_bad_config_stops_before_the_cli_runs(fake_pulumi, project):
    env, log = fake_pulumi
    project.mutate("dev", "broken", lambda c: c.update({"dstack-fleet:nodez": []}))
    result = fleet_deploy(project, "preview", "broken", env)
    assert result.returncode == 2
    assert "dstack-fleet:nodez: unknown key" in result.stderr
    assert calls(log) == []


def test_the_checks_are_one_function_each_in_order():
    """Later checks (the real CLI's preview, rollouts) are added as one function to one of these lists."""
    assert deploy.BEFORE_CLI == (deploy.check_secrets_provider, deploy.check_secrets_set)
    assert deploy.ON_STATE == (deploy.check_deployed_waiting, deploy.check_pending_images)



def test_up_refuses_a_dstack_node_whose_app_waits_for_a_container_build(fake_pulumi, project):
    env, log = fake_pulumi
    initialised(project, "dev", change=lambda c: c["dstack-fleet:containers"].update(
        {"mpc-launcher": {"docker": {"context": "apps/hello"}}}))
    lock(project, "dev")
    from .test_readiness import unlock_containers

    unlock_containers(project, "dev", "mpc-launcher")
    result = fleet_deploy(project, "up", "dev", env)
    assert result.returncode == 2, result.stderr
    assert "dev refuses nodes that wait for container builds:" in result.stderr
    assert "nodes apps-0 run app mpc, whose container images mpc-launcher are pending build" in result.stderr
    assert not any(c["argv"][2:3] == ["up"] for c in calls(log))
    assert fleet_deploy(project, "preview", "dev", env).returncode == 0  # a preview shows it waiting
