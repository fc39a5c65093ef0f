"""Apps on Phala Cloud: the generated scripts run for real against a fake ``phala`` CLI on PATH, the
reported compose-hash and app-id reach the component's outputs, and the API key never reaches argv."""

from __future__ import annotations

import hashlib
import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from fleet.apps import phala
from fleet.apps import plans as fleet_apps
from fleet.project import bootstrap
from fleet.images import lock
from fleet.plan import offline
from fleet.plan.harness import run_program
from fleet.stacks.load import load_config
from fleet.config.values import Secret, display, reveal

API_KEY = "phak-51c0ffee-9d2e"
GREETING = "hello from the enclave, secretly"
HELLO_DIGEST = "sha256:" + "ab" * 32

FAKE_PHALA = r'''#!{python}
"""A stand-in for the phala CLI: records argv, cwd, its files and which env vars it saw (never the key's
value), keeps CVMs in a state file and answers like `phala deploy --json` / `phala cvms get --json`."""
import hashlib, json, os, sys, uuid

args = sys.argv[1:]
state_path = os.environ["FAKE_PHALA_STATE"]
state = json.load(open(state_path)) if os.path.exists(state_path) else {{}}
key = os.environ.get("PHALA_CLOUD_API_KEY")
entry = {{"argv": args, "cwd": os.getcwd(), "files": sorted(os.listdir(".")),
          "env_names": sorted(k for k in os.environ if k.startswith(("PHALA", "DSTACK_FLEET"))),
          "api_key_sha256": hashlib.sha256(key.encode()).hexdigest() if key else None}}

def opt(name):
    return args[args.index(name) + 1] if name in args else None

if opt("--compose"):
    entry["compose"] = open(opt("--compose")).read()
if opt("-e"):
    entry["env_file_sha256"] = hashlib.sha256(open(opt("-e"), "rb").read()).hexdigest()
    entry["env_file_mode"] = oct(os.stat(opt("-e")).st_mode & 0o777)
with open(os.environ["FAKE_PHALA_LOG"], "a") as log:
    log.write(json.dumps(entry) + "\n")
if not key:
    print(json.dumps({{"success": False, "error": "API token is required"}}), file=sys.stderr)
    sys.exit(1)
if os.environ.get("FAKE_PHALA_FAIL"):
    print(json.dumps({{"success": False, "error": os.environ["FAKE_PHALA_FAIL"]}}, indent=2), file=sys.stderr)
    sys.exit(1)

if args[0] == "deploy":
    name = opt("--cvm-id") or opt("--name")
    compose = entry["compose"]
    cvm = state.get(name) or {{"vm_uuid": str(uuid.uuid4()), "app_id": hashlib.sha1(name.encode()).hexdigest()}}
    cvm["compose_hash"] = hashlib.sha256(("phala-salt|" + compose).encode()).hexdigest()
    cvm["name"] = name
    state[name] = cvm
    print(f"Provisioning CVM {{name}}...")
    print(json.dumps({{"success": True, "vm_uuid": cvm["vm_uuid"], "name": name, "app_id": cvm["app_id"],
                      "dashboard_url": "https://cloud.phala.network/dashboard/cvms/" + cvm["vm_uuid"]}}, indent=2))
elif args[:2] == ["cvms", "get"]:
    if os.environ.get("FAKE_PHALA_GET_FAIL"):  # an API error that says nothing about the CVM
        print(json.dumps({{"success": False, "error": os.environ["FAKE_PHALA_GET_FAIL"]}}))
        sys.exit(1)
    if args[2] not in state:  # as the CLI's cvms get: "CVM not found", exit 1
        print(json.dumps({{"success": False, "error": "CVM not found"}}))
        sys.exit(1)
    cvm = state[args[2]]
    print(json.dumps({{"id": "cvm_1", "name": cvm["name"], "app_id": cvm["app_id"], "vm_uuid": cvm["vm_uuid"],
                      "status": "running", "compose_hash": cvm["compose_hash"], "in_progress": False,
                      "gateway": {{"base_domain": "dstack-pha-prod8.phala.network", "cname": None}},
                      "resource": {{"instance_type": "tdx.small", "vcpu": 1}}, "listed": False}}, indent=2))
elif args[:2] == ["cvms", "delete"]:
    del state[args[2]]
    print(f"CVM {{args[2]}} deleted successfully")
json.dump(state, open(state_path, "w"))
'''


@pytest.fixture
def fake_cli(tmp_path: Path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "phala"
    script.write_text(FAKE_PHALA.format(python=sys.executable))
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    caller = tmp_path / "caller"
    caller.mkdir()
    (caller / "phala.toml").write_text('cvm_id = "someone-elses-cvm"\n')

    class Cli:
        log = tmp_path / "phala.log"
        state = tmp_path / "state.json"

        def env(self, **extra) -> dict[str, str]:
            return {"PATH": f"{bin_dir}:/usr/bin:/bin", "FAKE_PHALA_LOG": str(self.log),
                    "FAKE_PHALA_STATE": str(self.state), **extra}

        def run(self, script: str, *, stdin: str = "", **env) -> subprocess.CompletedProcess:
            return subprocess.run(["/bin/bash", "-c", script], input=stdin, capture_output=True, text=True,
                                  cwd=caller, env=self.env(**env), timeout=60)

        def calls(self) -> list[dict]:
            return [json.loads(line) for line in self.log.read_text().splitlines()] if self.log.exists() else []

    cli = Cli()
    cli.caller = caller
    return cli


def phala_entry(config) -> dict:
    return next(a for a in config["dstack-fleet:apps"] if a["target"] == "phala")


def with_phala_app(config):
    """The dev stack's Phala app with its image pinned (so it has a compose) and one secret env var."""
    config["dstack-fleet:containers"]["hello"] = {"external": {
        "image": "docker.io/acme/hello", "digest": HELLO_DIGEST, "digestKind": "manifest", "source": "test"}}
    phala_entry(config)["secretEnv"] = {"GREETING": "greeting"}
    config.setdefault("dstack-fleet:secrets", {})["greeting"] = {"secure": "v1:placeholder"}


def dev_app(project, change=with_phala_app, secrets=None):
    project.mutate("dev", "dev", change)
    sf, cfg = load_config(project.root, "dev", secret_overrides={
        "dstack-fleet:secrets": secrets or {"phalaApiKey": API_KEY, "greeting": GREETING}})
    names = bootstrap.names_for(cfg)
    app = next(a for a in fleet_apps.plan_apps(cfg, lock.load(project.root), project.root, names.registry_path)
               if a.target == "phala")
    return sf, cfg, app


# ---------------------------------------------------------------------------------------------
# The scripts, for real


def test_create_update_delete_scripts_against_the_fake_cli(project, fake_cli):
    _, _, app = dev_app(project)
    target = app.config.phala
    env_text = phala.env_file({"GREETING": GREETING})
    secrets = {"PHALA_CLOUD_API_KEY": API_KEY, phala.APP_ENV: env_text}

    created = fake_cli.run(phala.create_script(app, target, with_env=True, with_pre_launch=False),
                           stdin=app.compose_text, **secrets)
    assert created.returncode == 0, created.stderr
    lookup, deploy, get = fake_cli.calls()
    assert lookup["argv"] == ["cvms", "get", "hello-dev", "--json"]  # nothing left by an earlier run
    assert deploy["argv"] == ["deploy", "--json", "--name", "hello-dev", "--instance-type", "tdx.small", "--kms",
                              "phala", "--no-dev-os", "--no-listed", "--compose",
                              "docker-compose.yml", "--public-logs", "--public-sysinfo", "-e", "app.env"]
    assert deploy["compose"] == app.compose_text  # byte for byte, through stdin
    assert deploy["env_file_sha256"] == hashlib.sha256((env_text + "\n").encode()).hexdigest()
    assert deploy["env_file_mode"] == "0o600"
    assert deploy["api_key_sha256"] == hashlib.sha256(API_KEY.encode()).hexdigest()
    # run in a fresh directory: the caller's phala.toml (with another CVM's id) is never seen
    assert deploy["cwd"] != str(fake_cli.caller) and "phala.toml" not in deploy["files"]
    assert get["argv"] == ["cvms", "get", "hello-dev", "--json"]
    state = json.loads(fake_cli.state.read_text())["hello-dev"]
    reported = phala.parse_cvm_info(created.stdout)
    assert reported["appId"] == state["app_id"] and reported["composeHash"] == state["compose_hash"]
    assert reported["cvmId"] == state["vm_uuid"] and reported["status"] == "running"
    assert "Provisioning CVM" in created.stderr and "Provisioning" not in created.stdout  # deploy output -> stderr

    updated = fake_cli.run(phala.update_script(app, target, with_env=True, with_pre_launch=False),
                           stdin=app.compose_text + "# changed\n", **secrets)
    assert updated.returncode == 0, updated.stderr
    deploy = fake_cli.calls()[3]
    assert deploy["argv"][:4] == ["deploy", "--json", "--cvm-id", "hello-dev"] and deploy["argv"][-1] == "--wait"
    assert "--name" not in deploy["argv"] and deploy["compose"].endswith("# changed\n")
    after = phala.parse_cvm_info(updated.stdout)
    assert after["appId"] == reported["appId"] and after["cvmId"] == reported["cvmId"]  # same CVM, updated
    assert after["composeHash"] != reported["composeHash"]

    deleted = fake_cli.run(phala.delete_script(app), **secrets)
    assert deleted.returncode == 0, deleted.stderr
    assert fake_cli.calls()[-1]["argv"] == ["cvms", "delete", "hello-dev", "--yes"]
    assert json.loads(fake_cli.state.read_text()) == {}

    for call in fake_cli.calls():
        assert API_KEY not in " ".join(call["argv"]) and GREETING not in json.dumps(call)
        assert "PHALA_CLOUD_API_KEY" in call["env_names"]


def test_a_create_adopts_the_cvm_an_interrupted_run_left_behind(project, fake_cli):
    """The CLI made the CVM, then the run was interrupted before Pulumi recorded it: the next `up` creates
    again. Before, that made a second CVM of the same name; now the create updates the one that exists."""
    _, _, app = dev_app(project)
    target = app.config.phala
    env = {"PHALA_CLOUD_API_KEY": API_KEY, phala.APP_ENV: phala.env_file({"GREETING": GREETING})}
    script = phala.create_script(app, target, with_env=True, with_pre_launch=False)
    first = fake_cli.run(script, stdin=app.compose_text, **env)
    assert first.returncode == 0, first.stderr
    before = json.loads(fake_cli.state.read_text())
    # the interrupted run's CVM is still there; the create runs again with a changed compose
    again = fake_cli.run(script, stdin=app.compose_text + "# retried\n", **env)
    assert again.returncode == 0, again.stderr
    after = json.loads(fake_cli.state.read_text())
    assert list(after) == ["hello-dev"] and after["hello-dev"]["vm_uuid"] == before["hello-dev"]["vm_uuid"]
    deploys = [c["argv"] for c in fake_cli.calls() if c["argv"][0] == "deploy"]
    assert deploys[0][2:4] == ["--name", "hello-dev"]
    assert deploys[1][2:4] == ["--cvm-id", "hello-dev"] and deploys[1][-1] == "--wait"  # an in-place update
    assert "a CVM named hello-dev exists (left by an interrupted run): updating it in place" in again.stderr
    assert phala.parse_cvm_info(again.stdout)["cvmId"] == before["hello-dev"]["vm_uuid"]


def test_a_create_that_cannot_tell_whether_its_cvm_exists_makes_none(project, fake_cli):
    _, _, app = dev_app(project)
    script = phala.create_script(app, app.config.phala, with_env=False, with_pre_launch=False)
    failed = fake_cli.run(script, stdin=app.compose_text, PHALA_CLOUD_API_KEY=API_KEY,
                          FAKE_PHALA_GET_FAIL="Request timed out after 30s")
    assert failed.returncode != 0 and failed.stdout == ""
    assert "cannot tell whether a CVM named hello-dev exists, so none is created:" in failed.stderr
    assert "Request timed out after 30s" in failed.stderr
    assert [c["argv"][0] for c in fake_cli.calls()] == ["cvms"]  # no deploy ran
    assert not fake_cli.state.exists() or json.loads(fake_cli.state.read_text()) == {}


def test_a_failing_cli_fails_the_step_with_its_message(project, fake_cli):
    _, _, app = dev_app(project)
    script = phala.create_script(app, app.config.phala, with_env=False, with_pre_launch=False)
    failed = fake_cli.run(script, stdin=app.compose_text, PHALA_CLOUD_API_KEY=API_KEY, FAKE_PHALA_FAIL="No available nodes")
    assert failed.returncode != 0 and failed.stdout == "" and "No available nodes" in failed.stderr
    missing = fake_cli.run(script, stdin=app.compose_text)
    assert missing.returncode != 0 and "PHALA_CLOUD_API_KEY is not set" in missing.stderr
    assert len(fake_cli.calls()) == 1  # without the key the script stops before the CLI runs


# ---------------------------------------------------------------------------------------------
# The CLI's JSON


def test_the_reported_values_tolerate_extra_fields_wrappers_and_noise():
    doc = {"id": "cvm_9", "app_id": "app_" + "1f" * 20, "compose_hash": "0x" + "AB" * 32, "vm_uuid": "u-1",
           "status": "starting", "brand_new_field": {"x": [1]}, "gateway": {"base_domain": "d.example"}}
    assert phala.parse_cvm_info(json.dumps(doc)) == {"appId": "1f" * 20, "composeHash": "ab" * 32, "cvmId": "u-1",
                                                     "name": "", "status": "starting", "gatewayDomain": "d.example"}
    wrapped = "Fetching CVM details\n" + json.dumps({"success": True, "data": doc}, indent=2) + "\n"
    assert phala.parse_cvm_info(wrapped)["appId"] == "1f" * 20


@pytest.mark.parametrize("stdout,message", [
    ("", "no JSON object in the output (0 characters)"),
    (json.dumps({"app_id": "1f" * 20, "name": "x"}), "the response has no compose_hash (fields: app_id, name)"),
    (json.dumps({"compose_hash": "ab" * 32}), "the response has no app_id (fields: compose_hash)"),
    (json.dumps({"app_id": "xyz", "compose_hash": "ab" * 32}), "app_id 'xyz' is not 40 hex digits"),
    (json.dumps({"success": False, "error": "CVM not\nfound"}), "the CLI reported failure: CVM not found"),
])
def test_a_missing_or_malformed_field_fails_in_one_line(stdout, message):
    with pytest.raises(phala.PhalaError) as exc:
        phala.parse_cvm_info(stdout, where="phala cvms get app-dev --json")
    assert str(exc.value) == f"phala cvms get app-dev --json: {message}"


def test_urls_and_names():
    assert phala.app_urls("1f" * 20, [3000, 8080], "dstack-pha-prod8.phala.network") == [
        f"https://{'1f' * 20}-3000.dstack-pha-prod8.phala.network",
        f"https://{'1f' * 20}-8080.dstack-pha-prod8.phala.network"]
    assert phala.name_problem("hello-dev") is None
    assert "5-63 characters" in phala.name_problem("a-qa")
    with pytest.raises(phala.PhalaError, match="GREETING: the value spans several lines"):
        phala.env_file({"GREETING": "a\nb"})


def test_the_offline_stand_in_has_the_cli_shape():
    ctx = offline.Context(project="p", stack="dev", type="command:local:Command", name="hello-dev-phala-deploy",
                          urn="urn:x", inputs={"create": "# dstack-fleet:step=phala-deploy\nphala cvms get hello-dev --json\n"})
    reported = phala.parse_cvm_info(offline.command_stdout(ctx))
    assert reported["name"] == "hello-dev" and len(reported["appId"]) == 40 and len(reported["composeHash"]) == 64


# ---------------------------------------------------------------------------------------------
# The component under the mock harness, with the step's stdout produced by the fake CLI


def _program(app, cfg):
    def program():
        import pulumi

        from components.apptargets import create_app_target

        pulumi.export("app", create_app_target(app, config=cfg).outputs)
    return program


@pytest.mark.parametrize("preview", [True, False])
def test_reported_values_reach_the_outputs_and_the_key_stays_secret(project, fake_cli, monkeypatch, preview):
    sf, cfg, app = dev_app(project)

    def run_for_real(ctx):  # the update pass runs the registered create script against the fake CLI
        inputs = reveal(ctx.inputs)
        done = fake_cli.run(inputs["create"], stdin=inputs["stdin"], **inputs["environment"])
        assert done.returncode == 0, done.stderr
        return done.stdout

    monkeypatch.setitem(offline.COMMAND_STEPS, phala.STEP, run_for_real)
    run = run_program(project.root, stack="dev", config=sf.config, secret_keys=sf.secret_keys, preview=preview,
                      program=_program(app, cfg))
    by_type = {r.type: r for r in run.resources}
    assert set(by_type) == {"dstack-fleet:apps:DstackApp", "command:local:Command"}
    step = by_type["command:local:Command"]
    assert step.parent == by_type["dstack-fleet:apps:DstackApp"].urn
    assert step.urn.endswith("dstack-fleet:apps:DstackApp$command:local:Command::hello-dev-phala-deploy")
    assert step.options["deleteBeforeReplace"] is True and "triggers[*]" in step.options["replaceOnChanges"]
    assert offline.command_step(step.inputs["create"]) == phala.STEP
    assert isinstance(step.inputs["environment"]["PHALA_CLOUD_API_KEY"], Secret)
    assert isinstance(step.inputs["environment"][phala.APP_ENV], Secret)
    assert step.inputs["stdin"] == app.compose_text
    assert step.inputs["triggers"][:4] == ["hello-dev", "phala", "tdx.small", None]
    shown = json.dumps([display(r.inputs) for r in run.resources] + [display(run.outputs)], default=str)
    assert API_KEY not in shown and GREETING not in shown
    for script in (step.inputs["create"], step.inputs["update"], step.inputs["delete"]):
        assert API_KEY not in script and "PHALA_CLOUD_API_KEY" in script
    outputs = run.outputs["app"]
    assert outputs["target"] == "phala" and outputs["values"] == "reported" and outputs["identity"] == "reported"
    if preview:
        assert str(outputs["appId"]) == "<computed>" and fake_cli.calls() == []
        return
    state = json.loads(fake_cli.state.read_text())["hello-dev"]
    assert outputs["appId"] == state["app_id"] and outputs["composeHash"] == state["compose_hash"]
    assert outputs["instanceId"] == state["vm_uuid"] and outputs["status"] == "running"
    assert outputs["urls"] == [f"https://{state['app_id']}-3000.dstack-pha-prod8.phala.network"]
    assert outputs["composeHash"] != app.compose_hash  # Phala's own app-compose, not ours
    assert all(API_KEY not in " ".join(c["argv"]) for c in fake_cli.calls())


def test_an_unusable_cli_response_fails_the_program_in_one_line(project, monkeypatch):
    sf, cfg, app = dev_app(project)
    monkeypatch.setitem(offline.COMMAND_STEPS, phala.STEP, lambda ctx: '{"app_id": "' + "1f" * 20 + '"}')
    with pytest.raises(Exception, match=r"phala cvms get hello-dev --json: the response has no compose_hash \(fields: app_id\)"):
        run_program(project.root, stack="dev", config=sf.config, secret_keys=sf.secret_keys, preview=False,
                    program=_program(app, cfg))


def test_an_on_chain_kms_is_refused_by_the_config_check(project):
    from fleet.config.problems import ConfigError

    def change(config):
        with_phala_app(config)
        phala_entry(config)["phala"]["kms"] = "base"
    with pytest.raises(ConfigError) as info:
        dev_app(project, change)
    assert any(".phala.kms: on-chain KMS deployments (ethereum, base) need a deployer key" in line
               for line in info.value.lines())


@pytest.mark.parametrize("update", [False, True])
@pytest.mark.parametrize("fs,node", [(None, None), ("ext4", 7)])
def test_every_flag_the_scripts_pass_exists_in_the_pinned_cli(project, update, fs, node):
    """DEPLOY_FLAGS is `phala deploy --help` of phala 1.1.18; an unknown flag is a hard CLI error there."""
    def change(config):
        with_phala_app(config)
        entry = phala_entry(config)
        entry["settings"]["storageFs"] = fs
        entry["phala"]["nodeId"] = node
    _, _, app = dev_app(project, change)
    args = phala.deploy_args(app, app.config.phala, update=update, with_env=True, with_pre_launch=True)
    flags = [a for a in args[2:] if a.startswith("-")]
    assert flags and set(flags) <= phala.DEPLOY_FLAGS, set(flags) - phala.DEPLOY_FLAGS
    assert "--public-tcbinfo" not in phala.DEPLOY_FLAGS and "--secure-time" not in phala.DEPLOY_FLAGS


@pytest.mark.parametrize("setting,value", [("publicTcbinfo", True), ("publicTcbinfo", False), ("secureTime", True)])
def test_settings_the_pinned_cli_cannot_pass_are_refused_by_the_config_check(project, setting, value):
    from fleet.config.problems import ConfigError

    def change(config):
        with_phala_app(config)
        phala_entry(config)["settings"][setting] = value
    with pytest.raises(ConfigError) as info:
        dev_app(project, change)
    assert any(f".settings.{setting}: phala {phala.CLI_VERSION} has no flag" in line for line in info.value.lines())


def test_the_pinned_cli_is_what_tools_phala_installs():
    root = Path(__file__).resolve().parent.parent / "tools" / "phala"
    package = json.loads((root / "package.json").read_text())
    locked = json.loads((root / "package-lock.json").read_text())
    assert package["dependencies"] == {"phala": phala.CLI_VERSION}  # exact, no range
    entry = locked["packages"]["node_modules/phala"]
    assert entry["version"] == phala.CLI_VERSION and entry["integrity"].startswith("sha512-")
    assert all(p.get("integrity", "").startswith("sha512-") for name, p in locked["packages"].items() if name)
