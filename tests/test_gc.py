"""Garbage collection: what nothing names is marked, then deleted after the retention period; what a
stack or the lock names, and any image a disk was made from, is never deleted. Run against a fake
`gcloud` that keeps a project's images, disks and the image bucket's objects in a file."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from fleet.apps.configdisk import DATA_IMAGE_VERSION
from fleet.cli import gc as gc_cli
from fleet.images import lock as fleet_lock
from fleet.plan.planner import build_plan
from fleet.stacks import gc
from fleet.stacks.load import load_config

from .conftest import ROOT

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=timezone.utc)
BUCKET = "acme-tee-ops-fleet-images"
OLD = gc.mark_value(NOW - timedelta(days=40))
RECENT = gc.mark_value(NOW - timedelta(days=10))

FAKE_GCLOUD = """#!{python}
import json, os, sys
args = sys.argv[1:]
path = os.environ["FAKE_CLOUD_STATE"]
state = json.load(open(path))
with open(os.environ["FAKE_CLOUD_LOG"], "a") as log:
    log.write(json.dumps(args) + "\\n")
def value(flag):
    return next(a.split("=", 1)[1] for a in args if a.startswith(flag + "="))
if args[:3] == ["compute", "images", "list"]:
    wanted = value("--filter").split(" AND ")
    found = [i for i in state["images"] if all(i["labels"].get(c.split("=")[0][len("labels."):]) == c.split("=")[1]
                                                for c in wanted)]
    print(json.dumps(found))
elif args[:3] == ["compute", "disks", "list"]:
    print(json.dumps(state["disks"]))
elif args[:3] == ["storage", "objects", "list"]:
    print(json.dumps(state["objects"]))
elif args[:3] == ["compute", "images", "add-labels"]:
    key, val = value("--labels").split("=")
    next(i for i in state["images"] if i["name"] == args[3])["labels"][key] = val
elif args[:3] == ["compute", "images", "remove-labels"]:
    next(i for i in state["images"] if i["name"] == args[3])["labels"].pop(value("--labels"))
elif args[:3] == ["compute", "images", "delete"]:
    state["images"] = [i for i in state["images"] if i["name"] != args[3]]
elif args[:3] == ["storage", "objects", "update"]:
    name = args[3].split("/", 3)[3]
    entry = next(o for o in state["objects"] if o["name"] == name)
    fields = entry.setdefault("custom_fields", {{}})
    for a in args[4:]:
        if a.startswith("--update-custom-metadata="):
            k, v = a.split("=", 1)[1].split("=")
            fields[k] = v
        elif a.startswith("--remove-custom-metadata="):
            fields.pop(a.split("=", 1)[1])
elif args[:2] == ["storage", "rm"]:
    name = args[2].split("/", 3)[3]
    state["objects"] = [o for o in state["objects"] if o["name"] != name]
else:
    sys.exit("fake gcloud: unsupported " + " ".join(args))
json.dump(state, open(path, "w"))
"""


@pytest.fixture
def cloud(tmp_path):
    exe = tmp_path / "gcloud"
    exe.write_text(FAKE_GCLOUD.format(python=sys.executable))
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    state, log = tmp_path / "cloud.json", tmp_path / "calls.jsonl"

    def setup(images=(), disks=(), objects=()):
        state.write_text(json.dumps({"images": list(images), "disks": list(disks), "objects": list(objects)}))
        os.environ["FAKE_CLOUD_STATE"], os.environ["FAKE_CLOUD_LOG"] = str(state), str(log)
        return gc_cli.Gcloud(str(exe))

    yield setup, state, log
    os.environ.pop("FAKE_CLOUD_STATE", None)
    os.environ.pop("FAKE_CLOUD_LOG", None)


def image(name, mark=None, stack="dev"):
    labels = {"managed_by": "dstack-fleet", "stack": stack}
    if mark:
        labels[gc.MARK] = mark
    return {"name": name, "labels": labels}


def test_env_images_are_marked_then_deleted_and_never_one_a_disk_was_made_from(cloud):
    setup, state, log = cloud
    _, config = load_config(ROOT, "dev")
    keeps = gc.keeps_for_env(config, ROOT, fleet_lock.load(ROOT))
    (current,) = [n for n in keeps.images if "-cfg-" in n]
    (data,) = [n for n in keeps.images if n.startswith("fleet-dev-dstack-data")]
    gcloud = setup(images=[
        image(current, mark=OLD),                      # named again: unmarked
        image(data),                                   # named: kept
        image("fleet-dev-apps-0-cfg-000000000001"),    # an old config version: marked now
        image("fleet-dev-apps-0-cfg-000000000002", OLD),     # unnamed for 40 days: deleted
        image("fleet-dev-apps-0-cfg-000000000003", RECENT),  # unnamed for 10 days: waits
        image("fleet-dev-img-000000000004", OLD),      # unnamed long ago, but a node's disk was made from it
        image("fleet-prod-img-000000000005", OLD, stack="prod"),  # another stack's: not even listed
    ], disks=[{"name": "apps-0-boot", "sourceImage": "https://www.googleapis.com/compute/v1/projects/acme-tee-dev/"
                                                    "global/images/fleet-dev-img-000000000004"}])
    lines = gc_cli.run(ROOT, config, apply_changes=False, cloud=gcloud, now=NOW)
    assert f"unmark image {current}: named by the stack or the lock" in lines
    assert any(l.startswith("mark image fleet-dev-apps-0-cfg-000000000001: nothing names it; deleted after 30 days")
               for l in lines)
    assert any(l.startswith("delete image fleet-dev-apps-0-cfg-000000000002: nothing has named it since") for l in lines)
    assert any(l.startswith("wait image fleet-dev-apps-0-cfg-000000000003:") and "deleted in 20 days" in l for l in lines)
    assert any(l.startswith("keep image fleet-dev-img-000000000004: a disk of the project was made from it")
               for l in lines)
    assert not any("fleet-prod" in l for l in lines) and lines[-1].endswith("dry run: rerun with --apply "
                                                                           "(make gc GC_APPLY=1) to act")
    mutating = [c for c in map(json.loads, log.read_text().splitlines()) if c[2] not in ("list",)]
    assert mutating == []  # a dry run changes nothing

    gc_cli.run(ROOT, config, apply_changes=True, cloud=gcloud, now=NOW)
    after = {i["name"]: i["labels"].get(gc.MARK) for i in json.loads(state.read_text())["images"]}
    assert after == {current: None, data: None,
                     "fleet-dev-apps-0-cfg-000000000001": gc.mark_value(NOW),
                     "fleet-dev-apps-0-cfg-000000000003": RECENT,
                     "fleet-dev-img-000000000004": OLD, "fleet-prod-img-000000000005": OLD}


def test_bucket_artifacts_the_lock_or_a_stack_names_stay_and_foreign_objects_are_never_touched(cloud, project):
    setup, state, _ = cloud
    _, config = load_config(project.root, "images")
    keeps = gc.keeps_for_images(config, project.root, fleet_lock.load(project.root), [])
    kept_config = next(p for p in keeps.objects if "/config-disks/dev/" in p and "data-disk" not in p)
    old_hash = "9" * 64
    objects = [
        {"name": kept_config.split("/", 1)[1] + "disk.tar.gz"},
        {"name": f"config-disks/dev/data-disk-{DATA_IMAGE_VERSION}/disk.tar.gz"},
        {"name": f"config-disks/dev/{'1' * 64}/disk.tar.gz", "custom_fields": {gc.MARK: OLD}},
        {"name": f"{old_hash}/disk.tar.gz", "custom_fields": {gc.MARK: OLD}},
        {"name": f"{old_hash}/build.log"},
        {"name": "notes/README.txt", "custom_fields": {gc.MARK: OLD}},          # not ours: never touched
        {"name": f"config-disks/qa/{'2' * 64}/disk.tar.gz", "custom_fields": {gc.MARK: OLD}},  # no such env stack
    ]
    gcloud = setup(objects=objects)
    lines = gc_cli.run(project.root, config, apply_changes=True, cloud=gcloud, now=NOW)
    assert any(l.startswith(f"delete object {BUCKET}/config-disks/dev/{'1' * 64}/disk.tar.gz") for l in lines)
    assert any(l.startswith(f"mark object {BUCKET}/{old_hash}/build.log") for l in lines)
    left = {o["name"]: (o.get("custom_fields") or {}).get(gc.MARK) for o in json.loads(state.read_text())["objects"]}
    assert f"{old_hash}/disk.tar.gz" not in left and f"config-disks/dev/{'1' * 64}/disk.tar.gz" not in left
    assert left["notes/README.txt"] == OLD and left[f"config-disks/qa/{'2' * 64}/disk.tar.gz"] == OLD
    assert left[f"{old_hash}/build.log"] == gc.mark_value(NOW)
    assert left[f"config-disks/dev/data-disk-{DATA_IMAGE_VERSION}/disk.tar.gz"] is None

    # a build the lock records (or a failure it keeps the log of) is named: its folder stays
    locked, _ = fleet_lock.merge(fleet_lock.load(project.root), {"lockEntries": {"failed": {old_hash: {
        "recipe": "tplus-overlay", "reason": "failed", "log": f"gs://{BUCKET}/{old_hash}/build.log",
        "at": "2026-05-01T00:00:00Z"}}}})
    fleet_lock.write(project.root, locked)
    lines = gc_cli.run(project.root, config, apply_changes=True, cloud=gcloud, now=NOW + timedelta(days=60))
    assert any(l.startswith(f"unmark object {BUCKET}/{old_hash}/build.log") for l in lines)


def test_the_plan_lists_what_each_stack_keeps():
    dev = build_plan(ROOT, "dev").outputs["gc"]
    _, config = load_config(ROOT, "dev")
    keeps = gc.keeps_for_env(config, ROOT, fleet_lock.load(ROOT))
    assert dev == keeps.summary(30) and dev["retentionDays"] == 30
    assert any("-cfg-" in n for n in dev["keepsImages"]) and any(n.startswith("fleet-dev-dstack-data") for n in dev["keepsImages"])
    images = build_plan(ROOT, "images").outputs["gc"]
    hosts = build_plan(ROOT, "images").outputs["buildHosts"]
    assert {f"{BUCKET}/{h}/" for h in hosts} <= set(images["keepsObjects"])  # builds still running stay


def test_a_retention_of_its_own_per_stack(project):
    project.mutate("dev", "dev", lambda c: c.update({"dstack-fleet:gc": {"retentionDays": 7}}))
    _, config = load_config(project.root, "dev")
    assert config.fleet.gc.retention_days == 7
    item = gc.Item("image", "fleet-dev-img-x", NOW - timedelta(days=8))
    (decision,) = gc.decide(gc.Inventory(images=[item]), gc.Keeps(), 7, NOW)
    assert decision.action == gc.DELETE


def test_gc_from_the_command_line_reports_a_failing_gcloud_in_one_line(tmp_path):
    exe = tmp_path / "gcloud"
    exe.write_text("#!/bin/sh\necho 'ERROR: (gcloud.compute.images.list) not authenticated' >&2\nexit 1\n")
    exe.chmod(0o755)
    result = subprocess.run([sys.executable, "-m", "fleet", "gc", "--stack", "dev"], cwd=ROOT, capture_output=True,
                            text=True, env={**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"})
    assert result.returncode == 2
    assert result.stderr.strip() == ("error: gcloud compute images list failed: ERROR: (gcloud.compute.images.list) "
                                     "not authenticated")
