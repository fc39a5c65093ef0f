"""The BuildHost component under the mock harness: no way in, a pinned boot image, narrow scopes, the
generated build script as its startup script, and nothing that waits for the build where pulumi runs
(``python -m fleet collect`` reads the outputs later: tests/test_collect.py)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pulumi
import pytest

from components.buildhost import BuildHost
from fleet.images import lock
from fleet.images import recipes
from fleet.images.buildscript import (BuildHostSettings, BuildScriptError, build_script, plan_build_host,
                               settings_problems)
from fleet.plan.harness import UNKNOWN, run_program
from fleet.gcp.naming import Namer

BUCKET = "acme-tee-build-fleet-images"
BOOT_IMAGE = "projects/ubuntu-os-cloud/global/images/ubuntu-2404-noble-amd64-v20250805"
SUBNET = "projects/acme-tee-build/regions/us-central1/subnetworks/fleet-images-us-central1"
ACCOUNT = "fleet-build@acme-tee-build.iam.gserviceaccount.com"
INIT = "#!/bin/sh\necho overlay\n"
DERIVED = {"init_script_sha256": hashlib.sha256(INIT.encode()).hexdigest(),
           "table_key_version": ("projects/acme-tee-ops/locations/us-central1/keyRings/fleet-stack-secrets/"
                                 "cryptoKeys/fleet-overlay-tables/cryptoKeyVersions/1")}
NAMER = Namer(prefix="fleet", stack="images", project="acme-tee-build")
SETTINGS = BuildHostSettings(bucket=BUCKET, zone="us-central1-a", boot_image=BOOT_IMAGE)

INSTANCE = "gcp:compute/instance:Instance"
COMMAND = "command:local:Command"
OBJECT = "gcp:storage/bucketObject:BucketObject"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "Pulumi.yaml").write_text("name: demo\nruntime: python\n")
    return tmp_path


def tplus(guest: dict | None = None) -> recipes.BuildSpec:
    guest = guest or {"source": {"repository": "https://github.com/tpluslabs/tplus-examples",
                                 "commit": "3eb04cad11664a381227d77a469e68bca7e94c30",
                                 "workspace": "dstack-helios-tdx", "binary": "light_client", "features": ["quic"]}}
    return recipes.build_spec("overlay-a", {"recipe": "tplus-overlay", "guest": guest}, DERIVED, init_script=INIT)


def dstack() -> recipes.BuildSpec:
    return recipes.build_spec("dstack-a", {"recipe": "dstack-os", "version": "0.6.0.a2"})


def run(root: Path, specs: list[recipes.BuildSpec], *, preview: bool, settings: BuildHostSettings = SETTINGS,
        repo: Path | None = None):
    plans = [plan_build_host(s, settings, NAMER, project="acme-tee-build", root=repo) for s in specs]

    def program():
        hosts = [BuildHost(p, project="acme-tee-build", subnetwork=SUBNET, service_account=ACCOUNT) for p in plans]
        pulumi.export("hosts", {h.input_hash: h.instance.name for h in hosts})

    return plans, run_program(root, stack="images", config={}, preview=preview, program=program)


@pytest.mark.parametrize("preview", [True, False])
def test_build_host_has_no_way_in_and_only_narrow_scopes(root, preview):
    plans, result = run(root, [tplus()], preview=preview)
    (plan,) = plans
    (instance,) = result.of_type(INSTANCE)
    assert instance.inputs["name"] == NAMER.name("build", plan.input_hash[:12])
    (interface,) = instance.inputs["networkInterfaces"]
    assert interface["subnetwork"] == SUBNET and not interface.get("accessConfigs")
    assert not result.of_type("gcp:compute/firewall:Firewall")
    assert instance.inputs["bootDisk"]["initializeParams"]["image"] == BOOT_IMAGE  # a self link, not a family
    assert instance.inputs["bootDisk"]["initializeParams"]["size"] == 400  # two overlay Yocto trees
    assert instance.inputs["machineType"] == "n2-standard-16"
    account = instance.inputs["serviceAccount"]
    assert account["email"] == ACCOUNT
    assert sorted(account["scopes"]) == ["https://www.googleapis.com/auth/devstorage.read_write",
                                         "https://www.googleapis.com/auth/logging.write"]
    metadata = instance.inputs["metadata"]
    assert metadata["startup-script"] == build_script(tplus(), mode="remote", bucket=BUCKET)
    assert "shutdown -h now" in metadata["startup-script"]
    assert metadata["serial-port-logging-enable"] == "TRUE" and metadata["block-project-ssh-keys"] == "TRUE"
    assert instance.inputs["labels"]["role"] == "build-host"
    assert instance.inputs["labels"]["input_hash"] == plan.input_hash[:32]


@pytest.mark.parametrize("preview", [True, False])
def test_up_starts_the_build_and_returns_nothing_waits_for_it(root, preview):
    plans, result = run(root, [tplus()], preview=preview)
    assert result.of_type(COMMAND) == []  # a build outlives a CI job: no step polls for it
    (instance,) = result.of_type(INSTANCE)
    assert "deleted once collected" in instance.inputs["description"]
    assert 'mark_started\n    prepare_host' in instance.inputs["metadata"]["startup-script"]
    assert plans[0].timeout_seconds == 10 * 3600  # the recipe's default: how long collect lets it run


def test_builds_of_different_inputs_do_not_collide(root):
    plans, result = run(root, [tplus(), dstack()], preview=True)
    assert len(result.of_type(INSTANCE)) == 2
    dstack_instance = next(r for r in result.of_type(INSTANCE) if r.name == plans[1].logical_name)
    assert dstack_instance.inputs["machineType"] == "n2-standard-32"
    assert dstack_instance.inputs["bootDisk"]["initializeParams"]["size"] == 500


def test_guest_kept_in_the_repository_is_uploaded_before_the_vm_boots(root, tmp_path):
    repo = tmp_path / "repo"
    (repo / "bin").mkdir(parents=True)
    guest = b"musl light client"
    (repo / "bin" / "guest").write_bytes(guest)
    spec = tplus({"binary": {"url": "bin/guest", "sha256": hashlib.sha256(guest).hexdigest()}})
    plans, result = run(root, [spec], preview=False, repo=repo)
    (upload,) = result.of_type(OBJECT)
    assert upload.inputs["bucket"] == BUCKET and upload.inputs["name"] == f"{spec.input_hash}/inputs/guest"
    assert upload.inputs["source"]["asset"]["path"] == "bin/guest"  # the same plan on every machine
    (instance,) = result.of_type(INSTANCE)
    assert upload.urn in instance.dependencies
    assert f"readonly GUEST_URL=gs://{BUCKET}/{spec.input_hash}/inputs/guest" in instance.inputs["metadata"][
        "startup-script"]
    with pytest.raises(BuildScriptError, match="file 'bin/guest' not found in the repository"):
        plan_build_host(spec, SETTINGS, NAMER, project="acme-tee-build", root=tmp_path / "empty")


def test_config_sizes_the_build_host_and_bounds_the_build(root):
    settings = BuildHostSettings(bucket=BUCKET, zone="us-central1-b", boot_image=BOOT_IMAGE, machine_type="c3-standard-44",
                                 disk_gb=800, disk_type="pd-balanced", timeout_seconds=3 * 3600, poll_seconds=30)
    plans, result = run(root, [dstack()], preview=True, settings=settings)
    (instance,) = result.of_type(INSTANCE)
    assert (instance.inputs["machineType"], instance.inputs["zone"]) == ("c3-standard-44", "us-central1-b")
    assert instance.inputs["bootDisk"]["initializeParams"] == {"image": BOOT_IMAGE, "size": 800, "type": "pd-balanced"}
    assert plans[0].timeout_seconds == 3 * 3600


@pytest.mark.parametrize("change,path,message", [
    ({"boot_image": "projects/ubuntu-os-cloud/global/images/family/ubuntu-2404-lts-amd64"}, "bootImage",
     "is an image family, which moves; pin the image by self link"),
    ({"boot_image": "ubuntu-2404"}, "bootImage", "is not an image self link"),
    ({"bucket": "Bad_Bucket!"}, "bucket", "is not a GCS bucket name"),
    ({"zone": "us-central1"}, "zone", "is not a zone"),
    ({"disk_gb": 20}, "diskGb", "needs at least 50 GB"),
])
def test_bad_build_host_settings_name_the_key(change, path, message):
    settings = BuildHostSettings(**{**SETTINGS.__dict__, **change})
    problems = settings_problems(settings)
    assert [p for p, _ in problems] == [f"dstack-fleet:buildHost.{path}"]
    assert message in problems[0][1]
    with pytest.raises(BuildScriptError, match=message.split(";")[0]):
        plan_build_host(dstack(), settings, NAMER, project="acme-tee-build")
