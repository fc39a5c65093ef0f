"""images.lock.json: schema, loader errors, merging build outputs (make lock)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fleet.images import lock
from fleet.config.problems import ConfigError

from .conftest import ROOT

H1 = "1" * 64
H2 = "2" * 64


def image_entry(sha="a" * 64, generation="1700000000000001", crc="AAAAAA=="):
    return {"recipe": "tplus-overlay", "label": "overlay test", "source": "test build",
            "artifact": {"url": f"gs://acme-images/{H1}/disk.tar.gz", "generation": generation,
                         "crc32c": crc, "sha256": sha}}


def test_committed_lock_file_is_valid_and_sorted():
    text = (ROOT / "images.lock.json").read_text()
    parsed = lock.parse(text)
    assert parsed.to_json() == text


@pytest.mark.parametrize("text,expected", [
    ("{", "images.lock.json: invalid JSON at line 1"),
    ("[]", "images.lock.json: must be a JSON object"),
    ('{"version": 2, "images": {}}', "images.lock.json: version: must be 1 (got 2)"),
    (json.dumps({"version": 1, "images": {"abc": image_entry()}}), "images.lock.json: images.abc: 'abc' is not a sha256"),
    (json.dumps({"version": 1, "images": {H1: dict(image_entry(), extra=1)}}), f"images.{H1}.extra: unknown key"),
    (json.dumps({"version": 1, "images": {H1: image_entry(sha="A" * 64)}}), f"images.{H1}.artifact.sha256:"),
    (json.dumps({"version": 1, "images": {H1: image_entry(generation="latest")}}), f"images.{H1}.artifact.generation:"),
    (json.dumps({"version": 1, "images": {H1: image_entry(crc="nope")}}), f"images.{H1}.artifact.crc32c:"),
    (json.dumps({"version": 1, "containers": {H1: {"image": "x", "digest": "sha256:abc", "digestKind": "manifest",
                                                  "source": "s"}}}), f"containers.{H1}"),
    (json.dumps({"version": 1, "containers": {H1: {"image": "x", "digest": "sha256:" + "a" * 64,
                                                  "digest_kind": "tag", "source": "s"}}}),
     f"containers.{H1}.digest_kind: must be one of 'manifest' or 'image-id'"),
])
def test_loader_errors_name_the_key(text, expected):
    with pytest.raises(ConfigError) as info:
        lock.parse(text)
    assert any(expected in line for line in info.value.lines()), info.value.lines()


def test_artifact_url_for_the_image_api():
    entry = lock.parse(json.dumps({"version": 1, "images": {H1: image_entry()}})).image(H1)
    assert entry.artifact.https_url() == f"https://storage.googleapis.com/acme-images/{H1}/disk.tar.gz"


def test_merge_adds_entries_and_keeps_old_ones():
    current = lock.parse(json.dumps({"version": 1, "images": {H1: image_entry()}}))
    merged, changes = lock.merge(current, {"lockEntries": {"images": {H2: image_entry(sha="b" * 64)}}})
    assert set(merged.images) == {H1, H2}
    assert changes == [f"added images.{H2}"]
    again, changes = lock.merge(merged, {"lockEntries": {"images": {H2: image_entry(sha="b" * 64)}}})
    assert changes == [] and again == merged


def test_merge_refuses_different_outputs_for_the_same_inputs():
    current = lock.parse(json.dumps({"version": 1, "images": {H1: image_entry()}}))
    with pytest.raises(lock.LockConflict, match="same inputs produced different outputs"):
        lock.merge(current, {"lockEntries": {"images": {H1: image_entry(sha="c" * 64)}}})
    merged, changes = lock.merge(current, {"lockEntries": {"images": {H1: image_entry(sha="c" * 64)}}}, replace=True)
    assert merged.image(H1).artifact.sha256 == "c" * 64 and changes == [f"changed images.{H1}"]


def test_merge_validates_what_it_writes():
    with pytest.raises(ConfigError):
        lock.merge(lock.LockFile(version=1), {"lockEntries": {"images": {H1: {"recipe": "x"}}}})


def test_lock_offline_from_an_outputs_file(project, tmp_path):
    outputs = tmp_path / "outputs.json"
    outputs.write_text(json.dumps({"lockEntries": {"images": {H1: image_entry()}}, "other": 1}))
    result = subprocess.run([sys.executable, "-m", "fleet", "--root", str(project.root), "lock", "--outputs",
                             str(outputs)], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"added images.{H1}"
    written = lock.load(project.root)
    assert written.image(H1).artifact.generation == "1700000000000001"


def test_lock_with_unreadable_outputs_exits_2(project, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("not json")
    result = subprocess.run([sys.executable, "-m", "fleet", "--root", str(project.root), "lock", "--outputs", str(bad)],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and "cannot read the images stack outputs" in result.stderr
    assert "Traceback" not in result.stderr


def failed_entry(reason="build of input hash failed with exit status 1"):
    return {"recipe": "tplus-overlay", "reason": reason, "log": f"gs://acme-images/{H2}/build.log",
            "at": "2026-01-01T00:00:00Z"}


def test_a_failure_is_recorded_and_an_image_of_that_hash_clears_it():
    first, changes = lock.merge(lock.LockFile(version=1), {"lockEntries": {"failed": {H2: failed_entry()}}})
    assert changes == [f"added failed.{H2}"] and H2 in first.failed
    assert '"failed"' in first.to_json()
    fixed, changes = lock.merge(first, {"lockEntries": {"images": {H2: image_entry()}}})
    assert changes == [f"added images.{H2}", f"cleared failed.{H2}"]
    assert fixed.failed == {} and '"failed"' not in fixed.to_json()


def test_a_failure_never_shadows_a_recorded_image():
    locked, _ = lock.merge(lock.LockFile(version=1), {"lockEntries": {"images": {H1: image_entry()}}})
    same, changes = lock.merge(locked, {"lockEntries": {"failed": {H1: failed_entry()}}})
    assert changes == [] and same.failed == {}
