"""``python -m fleet gc --stack S [--apply]``: what ``fleet.stacks.gc`` decides, against what exists.

The inventory and the changes go through ``gcloud`` (the credentials of whoever runs it):

* env stack: ``gcloud compute images list`` of the stack's labelled images and ``gcloud compute disks
  list`` of its project (a disk made from an image keeps it); marks are the image label
  ``dstack-fleet-unused-since``;
* images stack: ``gcloud storage objects list`` of the image bucket; marks are the object's custom
  metadata of the same name.

Assumption, not checked against a real project here: the JSON field names of those ``gcloud``
listings (``name``, ``labels``, ``sourceImage``; ``name``, ``custom_fields``), as documented for the
Compute API and gcloud storage.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fleet.images import lock as fleet_lock
from fleet.project import bootstrap as fleet_bootstrap
from fleet.stacks import gc
from fleet.stacks.builds import plan_builds
from fleet.gcp.naming import Namer


class GcError(Exception):
    """A gcloud call failed: one line."""


@dataclass
class Gcloud:
    exe: str = "gcloud"

    def run(self, *args: str) -> str:
        result = subprocess.run([self.exe, *args], capture_output=True, text=True, check=False)
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["no message"])[-1]
            raise GcError(f"gcloud {' '.join(args[:3])} failed: {last}")
        return result.stdout

    def json(self, *args: str) -> Any:
        return json.loads(self.run(*args, "--format=json") or "[]")


def env_inventory(cloud: Gcloud, project: str, stack: str) -> gc.Inventory:
    images = cloud.json("compute", "images", "list", f"--project={project}", "--no-standard-images",
                        f"--filter=labels.managed_by=dstack-fleet AND labels.stack={stack}")
    disks = cloud.json("compute", "disks", "list", f"--project={project}")
    booted = frozenset(str(d.get("sourceImage", "")).rsplit("/", 1)[-1] for d in disks if d.get("sourceImage"))
    return gc.Inventory(
        images=[gc.Item("image", i["name"], gc.parse_mark((i.get("labels") or {}).get(gc.MARK))) for i in images],
        booted=booted)


def bucket_inventory(cloud: Gcloud, bucket: str, stacks: list[str]) -> gc.Inventory:
    objects = cloud.json("storage", "objects", "list", f"gs://{bucket}/**")
    items = []
    for o in objects:
        if not gc.ours(bucket, o["name"], stacks):
            continue
        custom = o.get("custom_fields") or o.get("metadata") or {}
        items.append(gc.Item("object", f"{bucket}/{o['name']}", gc.parse_mark(custom.get(gc.MARK))))
    return gc.Inventory(objects=items)


def apply(cloud: Gcloud, decisions: list[gc.Decision], project: str, now: datetime) -> None:
    mark = gc.mark_value(now)
    for d in decisions:
        item = d.item
        if item.kind == "image":
            if d.action == gc.MARK_NOW:
                cloud.run("compute", "images", "add-labels", item.name, f"--project={project}",
                          f"--labels={gc.MARK}={mark}")
            elif d.action == gc.UNMARK:
                cloud.run("compute", "images", "remove-labels", item.name, f"--project={project}", f"--labels={gc.MARK}")
            elif d.action == gc.DELETE:
                cloud.run("compute", "images", "delete", item.name, f"--project={project}", "--quiet")
        else:
            url = f"gs://{item.name}"
            if d.action == gc.MARK_NOW:
                cloud.run("storage", "objects", "update", url, f"--update-custom-metadata={gc.MARK}={mark}")
            elif d.action == gc.UNMARK:
                cloud.run("storage", "objects", "update", url, f"--remove-custom-metadata={gc.MARK}")
            elif d.action == gc.DELETE:
                cloud.run("storage", "rm", url)


def run(root: Path, config, *, apply_changes: bool, cloud: Gcloud | None = None,
        now: datetime | None = None) -> list[str]:
    cloud = cloud or Gcloud()
    now = now or datetime.now(timezone.utc)
    lock = fleet_lock.load(root)
    if config.fleet.role == "env":
        keeps = gc.keeps_for_env(config, root, lock)
        inventory = env_inventory(cloud, config.gcp.project, config.stack)
    elif config.fleet.role == "images":
        names = fleet_bootstrap.names_for(config)
        namer = Namer(prefix=config.fleet.name_prefix, stack=config.stack, project=config.gcp.project)
        building = [h.input_hash for h in plan_builds(config, root, lock, names, namer).hosts]
        keeps = gc.keeps_for_images(config, root, lock, building)
        inventory = bucket_inventory(cloud, names.image_bucket, list(config.fleet.build_for))
    else:
        raise GcError(f"stack {config.stack} has role {config.fleet.role}; gc runs for the images and env stacks")
    decisions = gc.decide(inventory, keeps, config.fleet.gc.retention_days, now)
    if apply_changes:
        apply(cloud, decisions, config.gcp.project, now)
    return gc.report(decisions, applied=apply_changes)
