"""GCP image versions from the lock file: pending builds, one resource per version, integrity."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pulumi
import pytest

from fleet.images import versions as fleet_images
from fleet.images import lock as fleet_lock
from fleet.nodes import boot_images
from fleet.plan.harness import run_program
from fleet.gcp.naming import LABEL_VALUE_RE, NAME_RE, Namer
from fleet.plan.planner import build_plan
from fleet.stacks.load import load_config
from tests.plans import shipped_plan

from .conftest import ROOT, stack_config

IMAGE_TYPE = "gcp:compute/image:Image"


def version_images(plan):
    """The GCP images of image versions (not configuration or data-disk images)."""
    return [r for r in plan.resources if r.type == IMAGE_TYPE and "dstack-fleet:images:GcpImage$" in r.urn]


def built_entry(input_hash: str, recipe: str = "tplus-overlay", generation="1712000000000000", crc="q1w2e3==") -> dict:
    return {"recipe": recipe, "label": f"{recipe} test build", "source": "test fixture",
            "artifact": {"url": f"gs://acme-tee-build-fleet-images/{input_hash}/disk.tar.gz",
                         "generation": generation, "crc32c": crc, "sha256": "5" * 64}}


def input_hashes(root: Path, stack: str) -> dict[str, str]:
    _, config = load_config(root, stack)
    namer = Namer(config.fleet.name_prefix, stack, config.gcp.project)
    return {k: v.content_hash for k, v in boot_images.resolve_for_stack(config, fleet_lock.load(root), namer).items()}


def lock_all(project, stack: str) -> None:
    entries = {h: built_entry(h) for h in input_hashes(project.root, stack).values() if h}
    (project.root / "images.lock.json").write_text(json.dumps({"version": 1, "images": entries}))


def two_versions(c):
    first = c["dstack-fleet:images"]["overlay-3eb04ca"]
    second = json.loads(json.dumps(first))
    second["build"]["guest"]["source"]["commit"] = "2321e30" + "0" * 33
    c["dstack-fleet:images"]["overlay-next"] = second
    c["dstack-fleet:nodes"][0]["image"] = "overlay-next"
    c["dstack-fleet:nodes"][0]["imageOverrides"] = {3: "overlay-3eb04ca", 4: "overlay-3eb04ca"}


def test_pending_image_plans_with_a_warning_and_no_image_resource():
    plan = shipped_plan("prod")
    assert not version_images(plan)
    summary = plan.outputs["images"]["overlay-3eb04ca"]
    assert summary["status"] == "pending" and summary["artifactSha256"] == fleet_lock.PENDING
    assert any("'overlay-3eb04ca' is pending build" in w for w in plan.warnings)


def test_built_image_is_one_resource_checked_before_creation(project):
    lock_all(project, "prod")
    plan = build_plan(project.root, "prod")
    digest = input_hashes(project.root, "prod")["overlay-3eb04ca"]
    (image,) = [r for r in version_images(plan) if r.name == f"image-{digest[:12]}"]
    assert image.name == f"image-{digest[:12]}"
    assert image.inputs["rawDisk"]["source"] == (
        f"https://storage.googleapis.com/acme-tee-build-fleet-images/{digest}/disk.tar.gz")
    assert sorted(f["type"] for f in image.inputs["guestOsFeatures"]) == [
        "GVNIC", "TDX_CAPABLE", "UEFI_COMPATIBLE", "VIRTIO_SCSI_MULTIQUEUE"]
    assert NAME_RE.match(image.inputs["name"]) and len(image.inputs["name"]) <= 63
    assert all(LABEL_VALUE_RE.match(v) for v in image.inputs["labels"].values())
    assert digest in image.inputs["description"]  # the full hash lives in the description
    (check,) = [r for r in plan.resources if r.name == f"image-{digest[:12]}-integrity"]
    assert check.urn in image.dependencies
    assert plan.outputs["images"]["overlay-3eb04ca"]["artifactSha256"] == "5" * 64


def test_each_version_is_its_own_resource_and_old_versions_stay(project):
    project.mutate("prod", "waves", two_versions)
    lock_all(project, "waves")
    plan = build_plan(project.root, "waves")
    names = sorted(r.name for r in version_images(plan))
    assert len(names) == 3  # two overlay versions and the dstack OS image
    # the wave finishes: no node uses the old version, which stays until removed deliberately
    def finished(c):
        two_versions(c)
        c["dstack-fleet:nodes"][0]["imageOverrides"] = {}

    project.mutate("prod", "waves", finished)
    plan = build_plan(project.root, "waves")
    assert sorted(r.name for r in version_images(plan)) == names
    assert any("'overlay-3eb04ca' is declared but no node uses it" in w for w in plan.warnings)


def test_identical_inputs_share_one_image(project):
    def alias(c):
        c["dstack-fleet:images"]["same-bytes"] = c["dstack-fleet:images"]["overlay-3eb04ca"]
        c["dstack-fleet:nodes"][0]["imageOverrides"] = {0: "same-bytes"}

    project.mutate("prod", "alias", alias)
    lock_all(project, "alias")
    plan = build_plan(project.root, "alias")
    assert len(version_images(plan)) == 2  # the shared overlay version and the dstack OS image


@pytest.mark.parametrize("stack, images", [("prod", "dstack-0-6-0-a2, overlay-3eb04ca"),
                                           ("dev", "dstack-0-6-0-a2, overlay-3eb04ca")])
def test_real_up_refuses_pending_images_in_every_tier(stack, images):
    """Dev too: a node left out because its image is pending would be deleted if it is deployed."""
    from fleet.config import stackfile

    sf = stackfile.read(ROOT, stack, secret_overrides={"dstack-fleet:secrets": {"phalaApiKey": "k"}})
    with pytest.raises(pulumi.RunError, match=f"{stack} refuses pending images {images}") as refused:
        run_program(ROOT, stack=stack, config=sf.config, secret_keys=sf.secret_keys, preview=False,
                     as_deployment=True)
    assert "nodes overlay-0, overlay-1" in str(refused.value)  # the nodes that boot it are named


def test_prebuilt_tarball_and_existing_image(project):
    def prebuilt(c):
        c["dstack-fleet:images"]["old-tarball"] = {"prebuilt": {"tarball": {
            "url": "gs://acme-legacy/overlay/disk.tar.gz", "sha256": "7" * 64}}}
        c["dstack-fleet:images"]["old-image"] = {"prebuilt": {"image": {
            "selfLink": "projects/acme-legacy/global/images/overlay-v1",
            "expected": {"osImageHash": "8" * 64, "source": "release notes of overlay v1"}}}}
        c["dstack-fleet:nodes"][0]["imageOverrides"] = {0: "old-tarball", 1: "old-image"}

    project.mutate("prod", "prebuilt", prebuilt)
    plan = build_plan(project.root, "prebuilt")
    (image,) = [r for r in version_images(plan) if r.name == f"image-{'7' * 12}"]
    assert image.inputs["rawDisk"]["source"] == "https://storage.googleapis.com/acme-legacy/overlay/disk.tar.gz"
    assert plan.outputs["images"]["old-image"]["osImageHash"] == "8" * 64
    assert plan.outputs["images"]["old-image"]["name"] == (
        "https://www.googleapis.com/compute/v1/projects/acme-legacy/global/images/overlay-v1")


@pytest.mark.parametrize("change,path,message", [
    (lambda c: c["dstack-fleet:nodes"][0].update(image="nope"), "dstack-fleet:nodes[0].image", "no image 'nope'"),
    (lambda c: c["dstack-fleet:nodes"][0].update(imageOverrides={9: "overlay-3eb04ca"}),
     "dstack-fleet:nodes[0].imageOverrides.9", "ordinal 9 is not a node of the group"),
    (lambda c: c["dstack-fleet:images"]["overlay-3eb04ca"]["build"]["guest"]["source"].update(commit="main"),
     "dstack-fleet:images.overlay-3eb04ca.build.guest.source.commit", "is not a full commit SHA"),
    (lambda c: c["dstack-fleet:images"].update({"x": {"prebuilt": {"image": {
        "selfLink": "projects/acme-legacy/global/images/family/overlay"}}}}),
     "dstack-fleet:images.x.prebuilt.image.selfLink", "families are not allowed"),
    (lambda c: c["dstack-fleet:images"].update({"x": {"build": {"recipe": "dstack-os", "version": "0.5.11"},
                                                      "prebuilt": {"image": {"selfLink": "projects/acme-legacy/global/images/a"}}}}),
     "dstack-fleet:images.x", "set exactly one of 'build' or 'prebuilt'"),
    (lambda c: c["dstack-fleet:images"].update({"x": {"build": {"recipe": "nosuch"}}}),
     "dstack-fleet:images.x.build", "tplus-overlay"),
    (lambda c: (c["dstack-fleet:images"].update({"d": {"build": {"recipe": "dstack-os", "version": "0.5.11"}}}),
                c["dstack-fleet:nodes"][0].update(image="d")),
     "dstack-fleet:nodes[0].image", "overlay nodes boot 'tplus-overlay' images"),
])
def test_image_config_errors(project, change, path, message):
    project.mutate("prod", "badimage", change)
    project.assert_config_error("badimage", path, message)


# ---- the integrity step, run for real against a fake gcloud ----------------------------------

FAKE_GCLOUD = """#!/bin/sh
# fake gcloud: `storage objects describe OBJ --format=...` and `storage cat OBJ`
case "$2" in
  objects) printf '%s\\t%s\\n' "$FAKE_GENERATION" "$FAKE_CRC32C" ;;
  cat) printf '%s' "$FAKE_CONTENT" ;;
esac
"""


def run_step(tmp_path, script: str, **fake) -> subprocess.CompletedProcess:
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    gcloud = bindir / "gcloud"
    gcloud.write_text(FAKE_GCLOUD)
    gcloud.chmod(gcloud.stat().st_mode | stat.S_IEXEC)
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}", **fake)
    return subprocess.run(["/bin/bash", "-c", script], env=env, capture_output=True, text=True)


def _built_version(generation="1712000000000000", crc="q1w2e3=="):
    entry = fleet_lock.parse(json.dumps({"version": 1, "images": {"9" * 64: built_entry("9" * 64, generation=generation,
                                                                                         crc=crc)}}))
    return fleet_images.ImageVersion(
        key="k", origin="build", recipe="tplus-overlay", content_hash="9" * 64, status="built",
        logical_name="image-999999999999", gcp_name="fleet-x-img", description="d",
        artifact=entry.image("9" * 64).artifact)


def test_integrity_step_passes_for_the_locked_object(tmp_path):
    result = run_step(tmp_path, fleet_images.integrity_script(_built_version()),
                      FAKE_GENERATION="1712000000000000", FAKE_CRC32C="q1w2e3==")
    assert result.returncode == 0, result.stderr
    assert "ok: gs://acme-tee-build-fleet-images/" in result.stdout


@pytest.mark.parametrize("generation,crc,why", [
    ("1712000000000999", "q1w2e3==", "has generation 1712000000000999, the lock file says 1712000000000000"),
    ("1712000000000000", "zzzzzz==", "has crc32c zzzzzz==, the lock file says q1w2e3=="),
])
def test_integrity_step_stops_a_replaced_object(tmp_path, generation, crc, why):
    result = run_step(tmp_path, fleet_images.integrity_script(_built_version()),
                      FAKE_GENERATION=generation, FAKE_CRC32C=crc)
    assert result.returncode == 1 and why in result.stderr


def test_integrity_step_for_a_prebuilt_tarball_checks_its_sha256(tmp_path):
    import hashlib

    content = "tarball bytes"
    version = fleet_images.ImageVersion(
        key="k", origin="tarball", recipe=None, content_hash="x", status="prebuilt", logical_name="image-x",
        gcp_name="n", description="d", tarball_url="gs://b/o.tar.gz",
        tarball_sha256=hashlib.sha256(content.encode()).hexdigest())
    script = fleet_images.integrity_script(version)
    assert run_step(tmp_path, script, FAKE_CONTENT=content).returncode == 0
    bad = run_step(tmp_path, script, FAKE_CONTENT="other bytes")
    assert bad.returncode == 1 and "integrity check failed" in bad.stderr


def test_integrity_step_quotes_hostile_values(tmp_path):
    version = _built_version()
    hostile = fleet_images.ImageVersion(**{**version.__dict__, "artifact": version.artifact.model_copy(
        update={"url": "gs://b/$(touch pwned) 'x'.tar.gz"})})
    result = run_step(tmp_path, fleet_images.integrity_script(hostile), FAKE_GENERATION="1712000000000000",
                      FAKE_CRC32C="q1w2e3==")
    assert result.returncode == 0 and not (Path.cwd() / "pwned").exists()
    assert "gs://b/$(touch pwned) 'x'.tar.gz" in result.stdout


def test_integrity_step_passes_shellcheck(tmp_path):
    script = tmp_path / "step.sh"
    script.write_text("#!/bin/bash\n" + fleet_images.integrity_script(_built_version()))
    result = subprocess.run([str(Path(sys.executable).parent / "shellcheck"), "-s", "bash", str(script)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
