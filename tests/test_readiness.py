"""The first real `pulumi up`: no undecryptable secret in a stack file, a missing secret named with the command
that sets it, and `fleet plan --pass up` registering what the preview shows or refusing as a real `up` does."""

from __future__ import annotations

import json
import subprocess
import sys

import pulumi
import pytest
import yaml

from fleet.apps import plans as fleet_apps
from fleet.config.stackfile import available_stacks
from fleet.config.values import NOT_SET
from fleet.plan.harness import run_program
from fleet.plan.planner import UpRefused, build_plan
from fleet.project.bootstrap import names_for
from fleet.stacks import readiness
from fleet.stacks.load import load_config

from .conftest import ROOT
from .test_images import built_entry, input_hashes

STACKS = available_stacks(ROOT)
SECRETS = {"dstack-fleet:secrets": {"phalaApiKey": "canary-phala-key-0042", "vmmToken": "ops:canary-vmm-0042"}}


def lock_everything(project, stack: str) -> None:
    """A lock file holding a stand-in build of every image and container the stack declares."""
    _, config = load_config(project.root, stack)
    images = {h: built_entry(h) for h in input_hashes(project.root, stack).values() if h}
    containers = {}
    public = fleet_apps.public_container_keys(config)  # a Phala app's images go to the public-read repository
    for key, source in sorted(config.fleet.containers.items()):
        if source.external is None:
            _, digest = fleet_apps.container_build_hash(project.root, key, source, public=key in public)
            repository = "fleet-public" if key in public else "fleet"
            containers[digest] = {"image": f"us-central1-docker.pkg.dev/acme-tee-ops/{repository}/{key}",
                                  "digest": "sha256:" + digest[:64], "digest_kind": "manifest", "source": "test"}
    (project.root / "images.lock.json").write_text(json.dumps({"version": 1, "images": images,
                                                               "containers": containers}))


def unlock_containers(project, stack: str, *keys: str) -> None:
    """Drop the lock entries of these containers (they are pending again)."""
    _, config = load_config(project.root, stack)
    lock = json.loads((project.root / "images.lock.json").read_text())
    public = fleet_apps.public_container_keys(config)
    for key in keys:
        _, digest = fleet_apps.container_build_hash(project.root, key, config.fleet.containers[key],
                                                    public=key in public)
        del lock["containers"][digest]
    (project.root / "images.lock.json").write_text(json.dumps(lock))


def secure_leaves(value) -> list:
    if isinstance(value, dict):
        if set(value) == {"secure"}:
            return [value["secure"]]
        return [leaf for v in value.values() for leaf in secure_leaves(v)]
    if isinstance(value, list):
        return [leaf for v in value for leaf in secure_leaves(v)]
    return []


# ---------------------------------------------------------------------------------------------
# Stack files


@pytest.mark.parametrize("stack", STACKS)
def test_no_stack_file_holds_a_value_the_cli_cannot_decrypt(stack):
    """The CLI decrypts every `secure:` value before the program runs, so a placeholder stops every preview;
    the shipped examples carry no secret at all (the operator sets them, docs/operations.md)."""
    document = yaml.safe_load((ROOT / "stacks" / f"Pulumi.{stack}.yaml").read_text())
    assert secure_leaves(document) == []


@pytest.mark.parametrize("stack", [s for s in STACKS if s != "bootstrap"])
def test_env_and_images_stacks_use_their_bootstrap_kms_key(stack):
    """The key the bootstrap stack creates for this stack, named by the same function (no passphrase in CI)."""
    document = yaml.safe_load((ROOT / "stacks" / f"Pulumi.{stack}.yaml").read_text())
    _, config = load_config(ROOT, stack)
    names = names_for(config)
    assert document["secretsprovider"] == names.secrets_provider(stack)
    assert document["secretsprovider"] == (
        f"gcpkms://projects/acme-tee-ops/locations/us-central1/keyRings/fleet-stack-secrets/cryptoKeys/fleet-{stack}")
    # the bootstrap plan creates exactly that key
    _, bootstrap = load_config(ROOT, "bootstrap")
    from fleet.project.bootstrap import plan_bootstrap
    assert plan_bootstrap(bootstrap).keys[stack] == names.key(stack)


# ---------------------------------------------------------------------------------------------
# Missing secrets


def test_a_missing_secret_is_named_with_the_exact_command():
    _, staging = load_config(ROOT, "staging")
    (missing,) = readiness.missing_secrets(staging)
    assert missing.name == "vmmToken" and missing.users == ("app mpc (vmm.tokenSecret)",)
    assert readiness.set_secret_command("staging", "vmmToken") == (
        "pulumi config set --stack staging --secret --path dstack-fleet:secrets.vmmToken")
    _, fed = load_config(ROOT, "staging", secret_overrides=SECRETS)
    assert readiness.missing_secrets(fed) == []


def test_the_exact_command_sets_the_secret_where_the_program_reads_it(tmp_path):
    """`--path dstack-fleet:secrets.NAME` makes `dstack-fleet:secrets: {NAME: {secure: ...}}`, which is where
    the schema reads secrets (a stack file written that way loads with the secret set)."""
    from fleet.config import stackfile

    (tmp_path / "stacks").mkdir()
    document = yaml.safe_load((ROOT / "stacks" / "Pulumi.staging.yaml").read_text())
    command = readiness.set_secret_command("staging", "vmmToken").split()
    namespace, _, path = command[-1].partition(":")
    key, name = path.split(".")
    document["config"].setdefault(f"{namespace}:{key}", {})[name] = {"secure": "v1:AAAA"}
    (tmp_path / "stacks" / "Pulumi.staging.yaml").write_text(yaml.safe_dump(document))
    sf = stackfile.read(tmp_path, "staging")
    from fleet.stacks.load import load
    config = load(sf.config, stack="staging", source=sf.source, secret_keys=sf.secret_keys)
    assert readiness.missing_secrets(config) == []


def phala_app_active(config):
    """Dev's Phala app with an external image, so it has a compose and is registered."""
    config["dstack-fleet:containers"]["hello"] = {"external": {
        "image": "docker.io/acme/hello", "digest": "sha256:" + "ab" * 32, "digestKind": "manifest", "source": "test"}}


def test_the_offline_plan_shows_a_missing_secret_as_not_set(project):
    project.mutate("dev", "keyless", phala_app_active)
    plan = build_plan(project.root, "keyless")
    (deploy,) = [r for r in json.loads(plan.to_json())["resources"] if r["name"] == "hello-keyless-phala-deploy"]
    assert deploy["inputs"]["environment"]["PHALA_CLOUD_API_KEY"] == NOT_SET == "[secret: not set]"
    assert any(w.startswith("dstack-fleet:secrets.phalaApiKey: [secret: not set] (needed by app hello") and
               "`pulumi config set --stack keyless --secret --path dstack-fleet:secrets.phalaApiKey`" in w
               for w in plan.warnings)
    # the tests feed their own value without touching the stack file: then it is a secret like any other
    fed = build_plan(project.root, "keyless", secret_overrides=SECRETS)
    (deploy,) = [r for r in json.loads(fed.to_json())["resources"] if r["name"] == "hello-keyless-phala-deploy"]
    assert deploy["inputs"]["environment"]["PHALA_CLOUD_API_KEY"] == "[secret]"
    assert not any("phalaApiKey" in w for w in fed.warnings)
    assert "canary-phala-key-0042" not in fed.to_json()


def test_a_real_preview_refuses_a_missing_secret_with_the_command(project):
    project.mutate("dev", "keyless", phala_app_active)
    from fleet.config import stackfile
    sf = stackfile.read(project.root, "keyless")
    with pytest.raises(pulumi.RunError, match=r"keyless refuses to deploy:\ndstack-fleet:secrets.phalaApiKey: "
                                              r"\[secret: not set\]"):
        run_program(project.root, stack="keyless", config=sf.config, secret_keys=sf.secret_keys, preview=True,
                    as_deployment=True)


# ---------------------------------------------------------------------------------------------
# Preview = up


@pytest.mark.parametrize("stack", STACKS)
def test_the_up_pass_registers_what_the_preview_shows(project, stack):
    """With every build locked and every secret set, a real `up` registers exactly the preview's URNs."""
    lock_everything(project, stack)
    preview = build_plan(project.root, stack, secret_overrides=SECRETS, passes="preview")
    up = build_plan(project.root, stack, secret_overrides=SECRETS, passes="up")
    assert up.shown_pass == "up" and json.loads(up.to_json())["pass"] == "up"
    assert [r.urn for r in up.resources] == [r.urn for r in preview.resources]
    assert len(preview.resources) > 5
    if stack == "dev":  # the apps waiting for containers in the shipped lock are deployed once built
        assert any(r.name == "hello-dev-phala-deploy" for r in up.resources)


@pytest.mark.parametrize("stack", ["dev", "staging", "prod"])
def test_the_up_pass_of_a_shipped_env_stack_refuses_naming_the_pending_image(stack):
    with pytest.raises(UpRefused) as refused:
        build_plan(ROOT, stack, secret_overrides=SECRETS, passes="up")
    assert any(line.startswith("image 'overlay-3eb04ca' (input hash ") and "is pending build and nodes overlay-0"
               in line for line in refused.value.lines)


@pytest.mark.parametrize("stack", [s for s in STACKS if s not in ("dev", "staging", "prod")])
def test_stacks_without_nodes_plan_their_up_pass_from_the_shipped_lock(stack):
    up = build_plan(ROOT, stack, passes="up")
    assert [r.urn for r in up.resources] == [r.urn for r in build_plan(ROOT, stack, passes="preview").resources]


def test_fleet_plan_pass_up_exits_2_naming_image_nodes_and_secret():
    result = subprocess.run([sys.executable, "-m", "fleet", "plan", "--stack", "staging", "--pass", "up"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert lines[0] == "error: a real `pulumi up` of staging refuses:"
    assert any("image 'overlay-3eb04ca'" in line and "nodes overlay-0, overlay-1, overlay-2, overlay-3" in line
               for line in lines)
    assert any("dstack-fleet:secrets.vmmToken: [secret: not set]" in line for line in lines)
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_a_real_up_never_drops_a_node_whose_image_is_pending(project):
    """Before: dev skipped such nodes in a real `up` (deleting a deployed one). Now the update refuses, and
    no pass leaves a node out: the preview and the offline update pass register every node."""
    lock_everything(project, "dev")
    lock = json.loads((project.root / "images.lock.json").read_text())
    lock["images"] = {}
    (project.root / "images.lock.json").write_text(json.dumps(lock))
    plan = build_plan(project.root, "dev", secret_overrides=SECRETS)  # preview + offline update pass
    instances = sorted(r.name for r in plan.update_run.resources if r.type == "gcp:compute/instance:Instance")
    _, config = load_config(project.root, "dev")
    assert instances == sorted(f"{g.name}-{n}" for g in config.fleet.nodes for n in range(g.count))
    assert {"apps-0", "overlay-0", "overlay-1"} <= set(instances)
    assert instances == sorted(r.name for r in plan.resources if r.type == "gcp:compute/instance:Instance")
    with pytest.raises(UpRefused):
        build_plan(project.root, "dev", secret_overrides=SECRETS, passes="up")


@pytest.mark.parametrize("shape", ["ring", "mesh"])
def test_the_bench_plans_the_up_pass_of_its_generated_stacks(tmp_path, shape):
    """make bench times the up pass as a real up runs it, so its generated stacks carry stand-in builds."""
    from fleet.cli import bench

    shipped = (ROOT / "images.lock.json").read_bytes()
    project = bench._stack_dir(ROOT, tmp_path, shape, 10)
    up = build_plan(project, bench.STACK, passes="up")
    assert [r.urn for r in up.resources] == [r.urn for r in build_plan(project, bench.STACK, passes="preview").resources]
    assert sum(r.type == "gcp:compute/instance:Instance" for r in up.resources) == 10
    lock = json.loads((project / "images.lock.json").read_text())
    assert all(entry["source"] == "make bench stand-in, not a build" for entry in lock["images"].values())
    assert (ROOT / "images.lock.json").read_bytes() == shipped  # only the temporary copy has stand-ins


def test_a_dstack_node_whose_app_waits_for_a_container_build_is_refused_not_dropped(project):
    """Its configuration disk needs the app-compose, which needs the container's digest: preview leaves the
    node out with a warning, a real up refuses (leaving it out would delete a deployed node)."""
    def built_launcher(config):
        config["dstack-fleet:containers"]["mpc-launcher"] = {"docker": {"context": "apps/hello"}}

    project.mutate("dev", "dev", built_launcher)
    lock_everything(project, "dev")
    unlock_containers(project, "dev", "mpc-launcher")
    preview = build_plan(project.root, "dev", secret_overrides=SECRETS, passes="preview")
    assert "apps-0" not in {r.name for r in preview.resources}
    with pytest.raises(UpRefused) as refused:
        build_plan(project.root, "dev", secret_overrides=SECRETS, passes="up")
    assert refused.value.lines == [
        "nodes apps-0 run app mpc, whose container images mpc-launcher are pending build: build them with "
        "`make up STACK=images`, record them with `make lock` and commit images.lock.json"]
    from fleet.config import stackfile
    sf = stackfile.read(project.root, "dev", secret_overrides=SECRETS)
    with pytest.raises(pulumi.RunError, match="dev refuses nodes that wait for container builds:\nnodes apps-0 run"):
        run_program(project.root, stack="dev", config=sf.config, secret_keys=sf.secret_keys, preview=False,
                    as_deployment=True)


def none_paths(value, path=""):
    if value is None:
        yield path or "."
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from none_paths(item, f"{path}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from none_paths(item, f"{path}[{i}]")


@pytest.mark.parametrize("stack", STACKS)
def test_no_provider_is_sent_a_none(stack):
    """A `null` is not "unset" to every provider (docker.Image got `args: null`, `target: null`)."""
    from tests.plans import shipped_plan

    plan = shipped_plan(stack)
    for run in (plan.resources, plan.update_run.resources):
        found = [(r.name, p) for r in run if r.custom for p in none_paths(r.inputs)]
        assert found == []
