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
from tests.plans import shipped_plan

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
    (lambda a: None, "compose"),
    (lambda a: a.update(keyProvider="kms", kms={"urls": ["https://kms.example"]}), "compose"),
    (lambda a: a.update(keyProvider="kms", kms={"urls": ["https://kms.example"], "appId": "ab" * 20}), "pinned"),
])
def test_identity_kind(project, change, identity):
    app = json.loads(json.dumps(NEAR_APP))
    change(app)
    project.write_stack("ident", minimal_env([app]))
    _, config = load_config(project.root, "ident")
    (plan,) = fleet_apps.plan_apps(config, fleet_lock.load(ROOT), project.root, "r")
    assert plan.identity == identity
    if identity == "pinned":
        assert plan.app_id == plan.summary()["appId"] == "ab" * 20
    else:  # with or without a KMS, the guest derives an unpinned app id from the compose hash
        assert plan.app_id == plan.summary()["appId"] == plan.compose_hash[:40]


def test_phala_values_are_reported_not_predicted():
    plan = shipped_plan("dev")
    hello = plan.outputs["apps"]["hello-dev"]
    assert hello["values"] == "reported" and hello["identity"] == "reported"


def test_pending_container_marks_the_app_pending():
    plan = shipped_plan("dev")
    hello = plan.outputs["apps"]["hello-dev"]
    assert hello["pending"] == ["hello"] and hello["composeHash"] == fleet_lock.PENDING
    assert any("app hello-dev waits for container images hello" in w for w in plan.warnings)


def test_a_locked_container_build_gives_a_pinned_compose(project):
    from .conftest import lock_hello_container

    lock_hello_container(project)
    _, config = load_config(project.root, "dev")
    from fleet.apps.pulls import Registries

    registries = Registries(app="us-central1-docker.pkg.dev/acme-tee-ops/fleet",
                            mirror="us-central1-docker.pkg.dev/acme-tee-ops/fleet-dockerhub",
                            public="us-central1-docker.pkg.dev/acme-tee-ops/fleet-public")
    (hello,) = [a for a in fleet_apps.plan_apps(config, fleet_lock.load(project.root), project.root, registries.app,
                                                registries=registries) if a.key == "hello"]
    # its Phala app opted in to publishing it: built into the public-read repository, pulled from there
    assert hello.images == [("services.hello.image",
                             "us-central1-docker.pkg.dev/acme-tee-ops/fleet-public/hello@sha256:" + "4" * 64)]
    assert "image: us-central1-docker.pkg.dev/acme-tee-ops/fleet-public/hello@sha256:" in hello.compose_text
    assert [(p.source, p.auth) for p in hello.pulls] == [("public-app-registry", "anonymous")]


@pytest.mark.parametrize("stack", available_stacks(ROOT))
def test_every_image_reference_in_every_plan_is_pinned(stack):
    """Container references live in app composes, command scripts and instance metadata; every one
    of them is pinned by digest (GCE boot images are checked by the tdx-only rule instead)."""
    from fleet.apps.imageref import unpinned_reason

    plan = shipped_plan(stack)
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
    project.assert_config_error("badapp", path, message)


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

    plan = shipped_plan("staging")  # the stand-in registry has the pinned launcher digest
    assert plan.outputs["apps"]["mpc-staging"]["images"]
    monkeypatch.setitem(offline.INVOKES, "docker:index/getRegistryImage:getRegistryImage",
                        lambda args, project: {"name": args["name"], "sha256Digest": "sha256:" + "0" * 64})
    with pytest.raises(PlanFailed, match="the registry reports sha256:0000"):
        build_plan(ROOT, "staging")


def test_registry_lookups_use_a_provider_that_needs_no_docker_daemon(monkeypatch):
    """The default Docker provider checks for a daemon when it is configured, which the deploying machine
    (CI) does not run; the look-ups go through one explicit provider with that check off."""
    from fleet.plan import offline

    plan = shipped_plan("staging")
    (provider,) = [r for r in plan.resources if r.type == "pulumi:providers:docker"]
    assert provider.name == "registry-lookup" and provider.parent is None
    assert provider.inputs == {"disableDockerDaemonCheck": "true", "host": "unix:///var/run/docker.sock"}
    # the machine's DOCKER_HOST never reaches the plan (the SDK would read it for an unset host)
    monkeypatch.setenv("DOCKER_HOST", "tcp://203.0.113.9:2376")
    again = build_plan(ROOT, "staging", passes="preview")
    assert next(r for r in again.resources if r.type == "pulumi:providers:docker").inputs == provider.inputs
    # the offline invoke refuses a look-up through the default provider, so every plan proves the wiring
    lookup = "docker:index/getRegistryImage:getRegistryImage"
    with pytest.raises(offline.OfflineGap, match="must use an explicit pulumi:providers:docker provider"):
        offline.invoke(lookup, {"name": "docker.io/a/b@sha256:" + "1" * 64}, project="p", preview=False)
    # stacks that check no external image register no provider
    assert not [r for r in shipped_plan("prod").resources if r.type.startswith("pulumi:providers:")]


def test_only_manifest_digests_can_be_checked(project):
    containers = {"x": {"external": {"image": "docker.io/a/b", "digest": "sha256:" + "1" * 64,
                                     "digestKind": "image-id", "source": "t", "checkAtDeploy": True}}}
    project.write_stack("idcheck", minimal_env([NEAR_APP], containers=containers))
    with pytest.raises(ConfigError) as info:
        load_config(project.root, "idcheck")
    assert any("containers.x.external.checkAtDeploy: only a manifest digest" in l for l in info.value.lines())


def _config_disk_files(document: dict, node: str) -> dict[str, bytes]:
    import base64

    step = next(r for r in document["resources"]
                if r["type"] == "command:local:Command" and r["name"].endswith("-build") and node in r["parent"])
    return {name: base64.b64decode(data) for name, data in json.loads(step["inputs"]["stdin"]).items()}


def test_gce_nodes_carry_the_uki_hash_as_vm_config_os_image_hash(project):
    # Dstack-TEE/dstack f1ba0a22 (the dstack OS 0.6.0.a2's dstack) verifier/src/verification.rs
    # verify_os_image_hash_for_gcp_tdx: vm_config.os_image_hash must equal the UKI Authenticode hash
    # in PCR 2's event log; the KMS runs it when [core.image] verify is on. The lock's os_image_hash
    # (digest.txt) would make such a KMS refuse every GCE app.
    def kms(c):
        c["dstack-fleet:apps"][0].update(keyProvider="kms", kms={"urls": ["https://kms.example"]})
    project.mutate("dev", "dev", kms)
    first = json.loads(build_plan(project.root, "dev").to_json())
    content = first["outputs"]["images"]["dstack-0-6-0-a2"]["contentHash"]
    digest_txt, uki = "d1" * 32, "0b" * 32
    artifact = {"url": f"gs://acme-tee-ops-images/{content}/disk.tar.gz", "generation": "1", "crc32c": "AAAAAA==",
                "sha256": "ab" * 32}
    (project.root / "images.lock.json").write_text(json.dumps({"version": 1, "images": {content: {
        "recipe": "dstack-os", "label": "test", "artifact": artifact, "os_image_hash": digest_txt,
        "rootfs_hash": "cd" * 32, "uki_hash": uki, "source": "test fixture"}}}))
    document = json.loads(build_plan(project.root, "dev").to_json())
    files = _config_disk_files(document, "apps-0")
    vm_config = json.loads(json.loads(files[".sys-config.json"])["vm_config"])
    assert vm_config["os_image_hash"] == uki != digest_txt
    node = document["measurements"]["node:apps-0"]
    assert node["os_image_hash"] == uki and node["image_digest"] == digest_txt
    app = document["measurements"]["app:mpc-dev"]
    events = {e["event"]: e["payload"] for e in app["rtmr3_events"]}
    # the KMS answers GetAppKey with the vm_config value, which the guest extends as os-image-hash
    assert app["os_image_hash"] == events["os-image-hash"] == uki
    assert app["identity"] == "compose" and app["app_id"] == app["compose_hash"][:40] == events["app-id"]


def test_an_external_image_with_a_tag_is_refused_with_advice(project):
    # `docker.io/nearone/mpc-launcher:latest` used to pass the schema's pattern and end up measured as
    # `...:latest@sha256:...` in the compose.
    def tagged(c):
        c["dstack-fleet:containers"]["mpc-launcher"]["external"]["image"] = "docker.io/nearone/mpc-launcher:latest"
    project.mutate("dev", "dev", tagged)
    with pytest.raises(ConfigError) as info:
        load_config(project.root, "dev")
    assert any("dstack-fleet:containers.mpc-launcher.external.image: 'docker.io/nearone/mpc-launcher:latest' "
               "names the tag :latest; give the repository alone (docker.io/nearone/mpc-launcher)" in line
               for line in info.value.lines())


# -- NEAR's Rust launcher: TOML user config (near/mpc b0b6b716 crates/tee-launcher/src) -------------

NEAR_TEMPLATE = (ROOT / "tests" / "vectors" / "near-mpc-os-0.5.8" / "node.conf.localnet.toml.tpl").read_text()


def test_the_toml_writer_expresses_nears_own_localnet_user_config():
    import re
    import tomllib

    from fleet.apps import compose as fc

    values = {"MPC_IMAGE": "nearone/mpc-node:localnet", "PORTS_TOML": '{ host = 80, container = 80 },\n',
              "NEAR_BOOT_NODES": "ed25519:abc@10.0.0.1:24567", "MPC_SECRET_STORE_KEY": "00" * 16,
              "MPC_ACCOUNT_ID": "frodo.test.near", "MPC_CONTRACT_ID": "mpc.test.near"}
    theirs = tomllib.loads(re.sub(r"\$\{(\w+)\}", lambda m: values[m.group(1)], NEAR_TEMPLATE))
    launcher = theirs["launcher_config"]
    node = {k: v for k, v in theirs["mpc_node_config"].items() if k != "secrets"}
    ours = fc.NearRustUserConfig(
        image_reference=launcher["image_reference"], port_mappings=((80, 80),),
        pull_max_retries=launcher["pull_max_retries"], pull_retry_interval_secs=launcher["pull_retry_interval_secs"],
        pull_max_delay_secs=launcher["pull_max_delay_secs"], mpc_node_config=node)
    parsed = fc.parse_near_rust_user_config(ours.text())
    assert parsed["launcher_config"] == launcher
    assert parsed["mpc_node_config"] == node
    # NEAR's template carries secrets in the host-readable file; here they are refused with the reason
    with_secrets = fc.NearRustUserConfig(image_reference="nearone/mpc-node", mpc_node_config=theirs["mpc_node_config"])
    assert [path for path, _ in with_secrets.problems()] == ["mpc_node_config.secrets"]


@pytest.mark.parametrize(("text", "why"), [
    ("a\x7fb", "DEL is escaped"), ('q"uote\\', "quotes"), ("line\nbreak\ttab", "control characters"), ("é ü", "utf-8"),
])
def test_the_toml_writer_round_trips_awkward_strings(text, why):
    import tomllib

    from fleet.apps import compose as fc

    document = {"launcher_config": {"image_reference": "x", "port_mappings": []},
                "mpc_node_config": {"odd key": text, "nested": {"list": [text, 1, True, 2.5]}}}
    assert tomllib.loads(fc.toml_text(document)) == document, why


def _rust_near(c, **launcher_config):
    app = c["dstack-fleet:apps"][0]
    app["nearMpc"]["launcherConfig"] = {"portMappings": [{"host": 80, "container": 80}], **launcher_config}
    app["nearMpc"]["nodeConfig"] = {"home_dir": "/data", "log": {"format": "plain", "filter": "info"}}


def test_a_rust_near_app_gets_its_toml_user_config_on_the_config_disk(project):
    project.mutate("dev", "dev", _rust_near)
    document = json.loads(build_plan(project.root, "dev").to_json())
    import tomllib

    files = _config_disk_files(document, "apps-0")
    user_config = tomllib.loads(files[".user-config"].decode())
    assert user_config == {"launcher_config": {"image_reference": "docker.io/nearone/mpc-node",
                                               "port_mappings": [{"host": 80, "container": 80}]},
                           "mpc_node_config": {"home_dir": "/data", "log": {"format": "plain", "filter": "info"}}}
    summary = document["outputs"]["apps"]["mpc-dev"]["userConfig"]
    assert summary["format"] == "toml" and "mpc_node_config" in summary["unmeasured"]
    default = "sha256:6a5700fccbb3facddd1f3934f4976c4dcefc176c4aac28cd2fd035984b368980"
    assert summary["mpcImageDigest"] == default and "DEFAULT_IMAGE_DIGEST" in summary["selectedBy"]


def test_seed_003_upgrade_is_a_user_config_change_and_a_restart(project):
    from fleet.plan import diff

    project.mutate("dev", "dev", _rust_near)
    base = json.loads(build_plan(project.root, "dev").to_json())
    new_digest = "ab" * 32

    def upgrade(c):
        _rust_near(c)
        c["dstack-fleet:containers"]["mpc-node-v2"] = {"external": {
            "image": "docker.io/nearone/mpc-node", "digest": f"sha256:{new_digest}", "digestKind": "manifest",
            "source": "approved on the contract by vote_code_hash"}}
        c["dstack-fleet:apps"][0]["nearMpc"]["launcherConfig"]["hashOverride"] = "mpc-node-v2"
    project.mutate("dev", "dev", upgrade)
    head = json.loads(build_plan(project.root, "dev").to_json())
    before, after = base["measurements"]["app:mpc-dev"], head["measurements"]["app:mpc-dev"]
    assert before["compose_hash"] == after["compose_hash"] and before["app_id"] == after["app_id"]
    assert after["image_digests"] == {"mpc-image-digest": new_digest} != before["image_digests"]
    report = diff.compare("dev", "base", diff.PlanResult(base), head)
    assert (f"| `mpc-dev` | user config only: restart the CVM: the launcher rereads it; RTMR3 mpc-image-digest "
            f"becomes sha256:{new_digest} | kept |") in report.markdown
    assert not any("new identity" in f for f in report.failures)
    assert "app:mpc-dev.image_digests.mpc-image-digest" in report.markdown


@pytest.mark.parametrize(("change", "message"), [
    (lambda n: n.update(userConfig={"MPC_IMAGE_TAGS": "latest"}), "nearMpc.userConfig: the rust launcher reads TOML"),
    (lambda n: n.update(nodeConfig={"tee": {}}), "nearMpc.nodeConfig.tee: the launcher inserts its own"),
    (lambda n: n.update(nodeConfig={"gcp": {}}), "nearMpc.nodeConfig.gcp: the launcher refuses it with PLATFORM=TEE"),
    (lambda n: n.update(nodeConfig={"secrets": {"secret_store_key_hex": "00"}}),
     "nearMpc.nodeConfig.secrets: the user config is unmeasured and host-readable"),
    (lambda n: n.update(launcherConfig={"imageReference": "nearone/mpc-node@sha256:" + "a" * 64}),
     "nearMpc.launcherConfig.imageReference: 'nearone/mpc-node@sha256:"),
    (lambda n: n.update(launcherConfig={"hashOverride": "mpc-launcher"}),
     "is in docker.io/nearone/mpc-launcher, but the launcher pulls from docker.io/nearone/mpc-node"),
    (lambda n: n.update(launcherConfig={"hashOverride": "nope"}), "container 'nope' is not declared"),
])
def test_rust_launcher_settings_that_would_break_are_refused(project, change, message):
    def mutate(c):
        change(c["dstack-fleet:apps"][0]["nearMpc"])
    project.mutate("dev", "dev", mutate)
    with pytest.raises(ConfigError) as info:
        load_config(project.root, "dev")
    assert any(message in line for line in info.value.lines()), info.value.lines()


def test_a_launcher_on_a_release_without_emit_event_is_refused(project):
    # Dstack-TEE/dstack f672c731 (2025-04-28) added EmitEvent, first released in v0.5.0.
    containers = {
        "launcher": {"external": {"image": "docker.io/nearone/mpc-launcher", "digest": "sha256:" + "1" * 64,
                                  "source": "t"}},
        "node": {"external": {"image": "docker.io/nearone/mpc-node", "digest": "sha256:" + "2" * 64, "source": "t"}},
    }
    app = {"name": "mpc", "kind": "near-mpc", "target": "vmm", "keyProvider": "local", "dstackVersion": "0.4.2",
           "nearMpc": {"launcherImage": "launcher", "mpcImage": "node", "launcher": "rust"}, "vmm": NEAR_APP["vmm"]}
    project.write_stack("old", minimal_env([app], containers=containers))
    with pytest.raises(ConfigError) as info:
        load_config(project.root, "old")
    assert any("nearMpc: dstack 0.4.2 has no EmitEvent in its guest agent" in line for line in info.value.lines())
    app["dstackVersion"] = "0.5.0"
    app["settings"] = {"secureTime": True}  # vmm-cli 0.5.0 writes secure_time: true, so the config says so
    project.write_stack("old", minimal_env([app], containers=containers))
    load_config(project.root, "old")


def test_machine_memory_sizes_the_td_hob_so_the_table_is_googles():
    # Google's accelerator-optimized machine family page, A3 High: a3-highgpu-1g = 26 vCPUs, 234 GB
    # (an eighth of a3-highgpu-8g's 208 vCPUs / 1,872 GB); C3: 4 GB per vCPU for standard.
    from fleet.gcp import tdx

    assert (tdx.vcpus("a3-highgpu-1g"), tdx.memory_gib("a3-highgpu-1g")) == (26, 234)
    assert "234 GB" in tdx.FIXED_SHAPES_SOURCE
    assert (tdx.vcpus("c3-standard-4"), tdx.memory_gib("c3-standard-4")) == (4, 16)
    assert tdx.memory_gib("c3-highmem-8") == 64 and tdx.memory_gib("n2-standard-4") is None


def test_dev_runs_a_kettle_app_whose_manifest_is_measured_and_predicted(project):
    # seed 002: the manifest URL and sha256 are literal compose values, checked by the measured
    # pre-launch script; teekit's example manifest at canvasxyz/teekit 147be92d hashes to 9c436b40…
    from fleet.apps import plans as apps

    _, config = load_config(project.root, "dev")
    kettle = config.fleet.containers["kettle-launcher"].docker
    digest = apps.docker_build_hash(project.root, "kettle-launcher", kettle)
    (project.root / "images.lock.json").write_text(json.dumps({"version": 1, "containers": {digest: {
        "image": "us-central1-docker.pkg.dev/acme-tee-ops/fleet/kettle-launcher", "digest": "sha256:" + "7" * 64,
        "digest_kind": "manifest", "source": "test fixture"}}}))
    document = json.loads(build_plan(project.root, "dev").to_json())
    summary = document["outputs"]["apps"]["kettle-dev"]
    manifest = config.fleet.apps[1].kettle
    assert summary["kettle"]["manifestUrl"] == manifest.manifest_url
    assert summary["kettle"]["manifestSha256"] == manifest.manifest_sha256 == (
        "9c436b40320029b1a7c1ac4f65f80df7201f9e65fc75a0c4daded06961bbcef4")
    files = _config_disk_files(document, "kettle-0")
    compose = json.loads(files["app-compose.json"])
    assert f"KETTLE_MANIFEST_SHA256={manifest.manifest_sha256}" in compose["docker_compose_file"]
    assert f"KETTLE_MANIFEST_URL={manifest.manifest_url}" in compose["docker_compose_file"]
    assert manifest.manifest_sha256 in compose["pre_launch_script"]
    expected = document["measurements"]["app:kettle-dev"]
    import hashlib

    assert expected["compose_hash"] == hashlib.sha256(files["app-compose.json"]).hexdigest() == summary["composeHash"]
    events = {e["event"]: e["payload"] for e in expected["rtmr3_events"]}
    assert events["compose-hash"] == expected["compose_hash"] and events["app-id"] == expected["compose_hash"][:40]
    assert expected["identity"] == "compose" and expected["values"] == "predicted"
