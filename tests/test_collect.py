"""``python -m fleet collect``: finished builds are verified in the bucket before the lock records them;
failed and timed-out builds are recorded with their log; running ones are left alone."""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import datetime, timedelta, timezone

import pytest

from fleet.images import lock as fleet_lock
from fleet.images import recipes
from fleet.images.buildscript import BuildHostSettings, plan_build_host
from fleet.gcp.naming import Namer
from tests.test_buildscript import TABLE_KEY_VERSION
from fleet.stacks import collect

BUCKET = "acme-tee-ops-fleet-images"
NOW = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)
SETTINGS = BuildHostSettings(bucket=BUCKET, zone="us-central1-a",
                             boot_image="projects/ubuntu-os-cloud/global/images/ubuntu-2404-noble-amd64-v20251205")
NAMER = Namer(prefix="fleet", stack="images", project="acme-tee-build")


class MemoryBucket:
    """A bucket in a dict: object text and (generation, crc32c) per gs:// URL."""

    def __init__(self):
        self.objects: dict[str, str] = {}
        self.meta: dict[str, tuple[str, str]] = {}
        self.generation = 1712000000000001

    def put(self, url: str, text: str) -> None:
        self.objects[url] = text
        self.generation += 1
        crc = base64.b64encode(hashlib.sha256(text.encode()).digest()[:4]).decode()
        self.meta[url] = (str(self.generation), crc)

    def read(self, url: str) -> str | None:
        return self.objects.get(url)

    def describe(self, url: str) -> tuple[str, str] | None:
        return self.meta.get(url)


def finish(bucket: MemoryBucket, host, *, started: datetime = NOW - timedelta(hours=2)) -> dict:
    """What a build host that finished leaves in the bucket (the shape buildscript's OUTPUTS_PROGRAM
    writes; tests/test_buildscript.py runs the real script)."""
    prefix = host.artifact_prefix
    bucket.put(f"{prefix}/started.json", json.dumps({"started_at": started.strftime("%Y-%m-%dT%H:%M:%SZ")}))
    tarball = f"tarball of {host.input_hash}"
    bucket.put(f"{prefix}/disk.tar.gz", tarball)
    sha256 = hashlib.sha256(tarball.encode()).hexdigest()
    bucket.put(f"{prefix}/disk.tar.gz.sha256", f"{sha256}  disk.tar.gz\n")
    bucket.put(f"{prefix}/build.log", "built\n")
    generation, crc = bucket.describe(f"{prefix}/disk.tar.gz")
    document = {"inputHash": host.input_hash, "recipe": host.recipe, "label": f"{host.recipe} test build",
                "source": f"dstack-fleet remote build of input hash {host.input_hash}", "built_at": "2026-03-01T11:00:00Z",
                "artifact": {"url": f"{prefix}/disk.tar.gz", "generation": generation, "crc32c": crc, "sha256": sha256},
                "details": {"mode": "remote"}}
    if host.recipe == "dstack-os":
        document.update(os_image_hash=hashlib.sha256(b"sha256sum.txt").hexdigest(), rootfs_hash="5e" * 32,
                        uki_hash="6f" * 32)
    bucket.put(f"{prefix}/outputs.json", json.dumps(document, indent=2, sort_keys=True))
    return document


def host(recipe: str = "dstack-os"):
    if recipe == "dstack-os":
        spec = recipes.build_spec("dstack-a", {"recipe": "dstack-os", "version": "0.6.0.a2"})
    else:
        init = "#!/bin/sh\necho overlay\n"
        spec = recipes.build_spec("overlay-a", {"recipe": "tplus-overlay", "guest": {"source": {
            "repository": "https://github.com/tpluslabs/tplus-examples", "commit": "3eb04cad11664a381227d77a469e68bca7e94c30",
            "workspace": "dstack-helios-tdx", "binary": "light_client"}}},
            {"init_script_sha256": hashlib.sha256(init.encode()).hexdigest(), "table_key_version": TABLE_KEY_VERSION},
            init_script=init)
    return plan_build_host(spec, SETTINGS, NAMER, project="acme-tee-build")


def test_a_finished_build_is_verified_in_the_bucket_and_becomes_a_lock_entry():
    bucket, h = MemoryBucket(), host()
    document = finish(bucket, h)
    (result,) = collect.collect([h], bucket, NOW)
    assert result.state == collect.FINISHED and result.deletes_host
    outputs = collect.lock_outputs([result])
    assert outputs["lockEntries"]["failed"] == {}
    merged, changes = fleet_lock.merge(fleet_lock.LockFile(version=1), outputs)
    assert changes == [f"added images.{h.input_hash}"]
    entry = merged.image(h.input_hash)
    assert entry.artifact.sha256 == document["artifact"]["sha256"] and entry.os_image_hash == document["os_image_hash"]


@pytest.mark.parametrize("tamper,problem", [
    (lambda b, p: b.put(f"{p}/disk.tar.gz", "another tarball"), "the object was replaced"),
    (lambda b, p: b.objects.pop(f"{p}/disk.tar.gz") and b.meta.pop(f"{p}/disk.tar.gz"), "no such object"),
    (lambda b, p: b.put(f"{p}/disk.tar.gz.sha256", "0" * 64 + "  disk.tar.gz\n"), "does not name the recorded sha256"),
    (lambda b, p: b.meta.pop(f"{p}/build.log"), "build.log is missing"),
    (lambda b, p: b.put(f"{p}/outputs.json", "{"), "outputs.json is not JSON"),
])
def test_outputs_that_fail_verification_are_neither_recorded_nor_collected(tamper, problem):
    bucket, h = MemoryBucket(), host()
    finish(bucket, h)
    tamper(bucket, h.artifact_prefix)
    (result,) = collect.collect([h], bucket, NOW)
    assert result.state == collect.INVALID and not result.deletes_host
    assert any(problem in line for line in result.problems), result.problems
    assert collect.lock_outputs([result]) == {"lockEntries": {"images": {}, "failed": {}}}


def test_a_failed_build_is_recorded_with_its_log_and_its_host_goes():
    bucket, h = MemoryBucket(), host("tplus-overlay")
    prefix = h.artifact_prefix
    bucket.put(f"{prefix}/started.json", json.dumps({"started_at": "2026-03-01T10:00:00Z"}))
    bucket.put(f"{prefix}/build.log", "bitbake: error\n")
    bucket.put(f"{prefix}/failure.txt", "build of input hash x failed with exit status 1 at 2026-03-01T11:00:00Z; "
                                        "see build.log\n")
    (result,) = collect.collect([h], bucket, NOW)
    assert result.state == collect.FAILED and result.deletes_host
    failed = collect.lock_outputs([result])["lockEntries"]["failed"][h.input_hash]
    assert failed == {"recipe": "tplus-overlay", "log": f"{prefix}/build.log", "at": "2026-03-01T12:00:00Z",
                      "reason": "build of input hash x failed with exit status 1 at 2026-03-01T11:00:00Z; see build.log"}
    assert fleet_lock.FailedBuild.model_validate(failed)


def test_a_build_past_its_timeout_is_given_up_and_one_within_it_is_left_running():
    bucket, h = MemoryBucket(), host()
    bucket.put(f"{h.artifact_prefix}/started.json", json.dumps({"started_at": "2026-03-01T00:00:00Z"}))
    (running,) = collect.collect([h], bucket, datetime(2026, 3, 1, 9, 0, tzinfo=timezone.utc))
    assert running.state == collect.RUNNING and not running.deletes_host
    assert "running for 540 of at most 600 min" in running.detail
    assert "get-serial-port-output" in running.detail
    (late,) = collect.collect([h], bucket, datetime(2026, 3, 1, 10, 1, tzinfo=timezone.utc))
    assert late.state == collect.TIMED_OUT and late.deletes_host
    assert "timeout is 600 min" in late.failure["reason"]


def test_a_host_that_has_not_started_is_left_alone():
    (result,) = collect.collect([host()], MemoryBucket(), NOW)
    assert result.state == collect.NOT_STARTED and not result.deletes_host
    assert collect.report([result])[0].startswith("not started: dstack-os ")
    assert collect.report([]) == ["no image build is waiting to be collected"]
