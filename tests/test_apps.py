"""dstack apps: exact app-compose bytes known before deploy, pinned images, identity rules."""

from __future__ import annotations

import json

import pytest

from fleet.apps import plans as fleet_apps
from fleet.images import lock as fleet_lock
from fleet.apps.imageref import find_image_references
from fleet.plan.planner import build_plan
from fleet.stacks.load import load_config
from fleet.config.problems import ConfigError
from fleet.config.stackfile import available_stacks
from fleet.config.values import display

from .conftest import ROOT

VECTOR = json.loads((ROOT / "tests" / "vectors" / "near-mpc-tcb-info.json").read_text())


@pytest.fixture(autouse=True)
def vector_compose(project):
    """The vector's launcher compose, verbatim, where the stacks below name it."""
    target = project.root / "compose" / "near-mpc-launcher.yaml"
    target.parent.mkdir()
    target.write_bytes((ROOT / "tests" / "vectors" / "near-mpc-launcher-compose.yaml").read_bytes())


def minimal_env(apps, containers=None, secrets=None, nodes=None, images=None):
    config = {
        "gcp:project": "acme-tee-dev", "gcp:region": "us-central1",
        "dstack-fleet:role": "env", "dstack-fleet:tier": "dev",
        "dstack-fleet:bootstrap": {"project": "acme-tee-ops"},
        "dstack-fleet:network": {"subnets": {"us-central1": "10.10.0.0/20"}},
        "dstack-fleet:apps": apps,
        "dstack-fleet:secrets": {name: {"secure": "v1:placeholder"} for name in (secrets or {"vmmToken": ""})},
    }
    if containers:
        config["dstack-fleet:containers"] = containers
    if nodes:
        config["dstack-fleet:nodes"] = nodes
    if images:
        config["dstack-fleet:images"] = images
    return config


NEAR_APP = {
    "name": "mpc-localnet-one-node", "target": "vmm", "keyProvider": "local", "stateful": True,
    "composeFile": "compose/near-mpc-launcher.yaml", "dstackVersion": "0.5.11",
    "settings": {"publicLogs": True, "publicSysinfo": True, "noInstanceId": True},
    "vmm": {"url": "http://127.0.0.1:9080", "image": "dstack-0.5.11", "tokenSecret": "vmmToken"},
}


def test_near_vector_app_compose_rebuilt_byte_for_byte_from_a_stack_config(project):
    # the vector's app name is '<name>-<stack>' with the stack named after its timestamp
    project.write_stack("1774945636", minimal_env([NEAR_APP]))
    _, config = load_config(project.root, "1774945636")
    (app,) = fleet_apps.plan_apps(config, fleet_lock.load(ROOT), project.root, "registry")
    assert app.app_compose.text == VECTOR["app_compose"]
    assert app.compose_hash == VECTOR["compose_hash"]
    assert app.app_id == VECTOR["compose_hash"][:40] == "cb9b2d6204f5e44238b75f69e3a3069550734c0d"
    plan = build_plan(project.root, "1774945636")
    summary = plan.outputs["apps"]["mpc-localnet-one-node-1774945636"]
    assert summary["composeHash"] == VECTOR["compose_hash"] and summary["values"] == "predicted"
    expected = plan.measurements["app:mpc-localnet-one-node-1774945636"]
    assert expected["compose_hash"] == VECTOR["compose_hash"]
    assert expected["rtmr3_events"][1] == {"event": "app-id", "payload": VECTOR["compose_hash"][:40],
                                           "digest": VECTOR["event_log"][1]["digest"]}


def test_each_environment_gets_its_own_identity(project):
    project.write_stack("one", minimal_env([NEAR_APP]))
    project.write_stack("two", minimal_env([NEAR_APP]))
    ids = set()
    for stack in ("one", "two"):
        _, config = load_config(project.root, stack)
        ids.add(fleet_apps.plan_apps(config, fleet_lock.load(ROOT), project.root, "r")[0].app_id)
    assert len(ids) == 2


@pytest.mark.parametrize("change,identity", [
    (lambda a: None, "derived"),
    (lambda a: a.update(keyProvider="kms", kms={"urls": ["https://kms.example"], "appId": "ab" * 20}), "stable"),
])
def test_identity_kind(project, change, identity):
    app = json.loads(json.dumps(NEAR_APP))
    change(app)
    project.write_stack("ident", minimal_env([app]))
    _, config = load_config(project.root, "ident")
    (plan,) = fleet_apps.plan_apps(config, fleet_lock.load(ROOT), project.root, "r")
    assert plan.identity == identity
    if identity == "stable":
        assert plan.app_id == "ab" * 20


def test_phala_values_are_reported_not_predicted():
    plan = build_plan(ROOT, "dev")
    hello = plan.outputs["apps"]["hello-dev"]
    assert hello["values"] == "reported" and hello["identity"] == "reported"


def test_pending_container_marks_the_app_pending():
    plan = build_plan(ROOT, "dev")
    hello = plan.outputs["apps"]["hello-dev"]
    assert hello["pending"] == ["hello"] and hello["composeHash"] == fleet_lock.PENDING
    assert any("app hello-dev waits for container images hello" in w for w in plan.warnings)


def test_a_locked_container_build_gives_a_pinned_compose(project):
    from .conftest import lock_hello_container

    lock_hello_container(project)
    _, config = load_config(project.root, "dev")
    (hello,) = [a for a in fleet_apps.plan_apps(config, fleet_lock.load(project.root), project.root, "r")
                if a.key == "hello"]
    assert hello.images == [("services.hello.image",
                             "us-central1-docker.pkg.dev/acme-tee-ops/fleet/hello@sha256:" + "4" * 64)]
    assert "image: us-central1-docker.pkg.dev/acme-tee-ops/fleet/hello@sha256:" in hello.compose_text


@pytest.mark.parametrize("stack", available_stacks(ROOT))
def test_every_image_reference_in_every_plan_is_pinned(stack):
    """Container references live in app composes, command scripts and instance metadata; every one
    of them is pinned by digest (GCE boot images are checked by the tdx-only rule instead)."""
    from fleet.apps.imageref import unpinned_reason

    plan = build_plan(ROOT, stack)
    for app in (plan.outputs.get("apps") or {}).values():
        for where, ref in app["images"].items():
            assert unpinned_reason(ref) is None, f"{stack}: {app['name']} {where}"
    texts = [json.dumps(display(r.inputs)) for r in plan.resources if r.type == "command:local:Command"]
    texts += [json.dumps(display(r.inputs.get("metadata", {}))) for r in plan.resources
              if r.type == "gcp:compute/instance:Instance"]
    for text in texts:
        for mention in find_image_references(text):
            assert mention.pinned, f"{stack}: unpinned image reference {mention.text!r}: {mention.unpinned_reason}"


@pytest.mark.parametrize("change,path,message", [
    (lambda a: a.update(secretEnv={"TOKEN": "vmmToken"}), "dstack-fleet:apps[0].secretEnv", "needs a KMS"),
    (lambda a: a.update(composeFile="nope/compose.yaml"), "dstack-fleet:apps[0].composeFile", "is not a file"),
    (lambda a: a.update(composeFile="Pulumi.yaml"), "dstack-fleet:apps[0].composeFile", "Pulumi.yaml"),
    (lambda a: a.update(target="gce", nodes="missing"), "dstack-fleet:apps[0].nodes", "is not a node group of kind dstack"),
    (lambda a: a.update(services=[{"name": "x", "image": "nope"}]), "dstack-fleet:apps[0]",
     "set exactly one of 'composeFile'"),
    (lambda a: a.update(keyProvider="kms"), "dstack-fleet:apps[0].kms", "is required with key provider kms"),
    (lambda a: a.pop("vmm"), "dstack-fleet:apps[0].vmm", "is required for target vmm"),
    (lambda a: a.update(name="Bad_Name"), "dstack-fleet:apps[0].name", "is not an app name"),
])
def test_app_config_errors(project, change, path, message):
    app = json.loads(json.dumps(NEAR_APP))
    change(app)
    project.write_stack("badapp", minimal_env([app]))
    with pytest.raises(ConfigError) as info:
        load_config(project.root, "badapp")
    lines = [l for l in info.value.lines() if f": {path}: " in l]
    assert lines and any(message in l for l in lines), info.value.lines()


def test_compose_with_build_or_a_tag_is_refused(project, tmp_path):
    bad = project.root / "bad-compose.yaml"
    bad.write_text("services:\n  web:\n    build: .\n  db:\n    image: postgres:16\n")
    app = dict(NEAR_APP, composeFile="bad-compose.yaml")
    project.write_stack("badcompose", minimal_env([app]))
    with pytest.raises(ConfigError) as info:
        load_config(project.root, "badcompose")
    text = "\n".join(info.value.lines())
    assert "services.web" in text and "build" in text
    assert "services.db.image" in text


def test_near_launcher_digest_kind_must_match(project):
    containers = {
        "launcher": {"external": {"image": "docker.io/nearone/mpc-launcher", "digest": "sha256:" + "1" * 64,
                                  "source": "t"}},
        "node": {"external": {"image": "docker.io/nearone/mpc-node", "digest": "sha256:" + "2" * 64,
                              "digestKind": "manifest", "source": "t"}},
    }
    app = {"name": "mpc", "kind": "near-mpc", "target": "vmm", "keyProvider": "local",
           "nearMpc": {"launcherImage": "launcher", "mpcImage": "node", "launcher": "python"},
           "vmm": NEAR_APP["vmm"]}
    project.write_stack("nearkind", minimal_env([app], containers=containers))
    with pytest.raises(ConfigError) as info:
        load_config(project.root, "nearkind")
    assert any("the python launcher compares the image-id digest" in l for l in info.value.lines())


def test_canary_secret_never_appears_in_generated_app_files(project):
    canary = "canary-31ab-app-must-not-leak"
    project.write_stack("canary", minimal_env([NEAR_APP]))
    secrets = {"dstack-fleet:secrets": {"vmmToken": canary}}  # as the CLI hands a decrypted secure: value
    _, config = load_config(project.root, "canary", secret_overrides=secrets)
    (app,) = fleet_apps.plan_apps(config, fleet_lock.load(ROOT), project.root, "r")
    generated = app.app_compose.text + (app.user_config or "") + json.dumps(app.summary())
    assert canary not in generated
    plan = build_plan(project.root, "canary", secret_overrides=secrets)
    assert canary not in plan.to_json()


def test_external_digest_is_checked_against_the_registry_at_deploy(monkeypatch):
    from fleet.plan import offline
    from fleet.plan.planner import PlanFailed

    plan = build_plan(ROOT, "staging")  # the stand-in registry has the pinned launcher digest
    assert plan.outputs["apps"]["mpc-staging"]["images"]
    monkeypatch.setitem(offline.INVOKES, "docker:index/getRegistryImage:getRegistryImage",
                        lambda args, project: {"name": args["name"], "sha256Digest": "sha256:" + "0" * 64})
    with pytest.raises(PlanFailed, match="the registry reports sha256:0000"):
        build_plan(ROOT, "staging")


def test_only_manifest_digests_can_be_checked(project):
    containers = {"x": {"external": {"image": "docker.io/a/b", "digest": "sha256:" + "1" * 64,
                                     "digestKind": "image-id", "source": "t", "checkAtDeploy": True}}}
    project.write_stack("idcheck", minimal_env([NEAR_APP], containers=containers))
    with pytest.raises(ConfigError) as info:
        load_config(project.root, "idcheck")
    assert any("containers.x.external.checkAtDeploy: only a manifest digest" in l for l in info.value.lines())
