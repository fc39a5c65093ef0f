"""Garbage collection: images and bucket artifacts that nothing names any more, after a retention period.

What a stack **keeps** is decided here from its configuration and the lock file, the way the
program decides what to create, so it is known offline and every plan exports it (output ``gc``):

* an env stack: the GCP images of its image versions, of its nodes' current configuration disks and
  the data-disk seed image (by name), and the bucket objects those images are made from;
* the images stack: every build artifact folder (``gs://<image bucket>/<input hash>/``) that the lock
  names (built or failed) or a build host is still working on, and every env stack's configuration
  disks and data-disk seed (``config-disks/<stack>/...``), for the env stacks it builds for.

``make gc STACK=<stack>`` (``python -m fleet gc``) compares that with what exists: images labelled
``managed_by=dstack-fleet`` and ``stack=<stack>`` in the stack's project (env stacks), objects of the
shapes dstack-fleet writes in the image bucket (images stack; anything else is never touched). An
item nothing keeps is first **marked** (the image label or object metadata
``dstack-fleet-unused-since``), and deleted only once it has stayed unkept for
``dstack-fleet:gc.retentionDays``, so the retention counts from when the last name went away, not
from when the item was made. An item named again is unmarked. **An image any disk of the project
was made from is never deleted**, whatever the plan says: that is what a deployed node boots. The
command only lists what it would do, unless ``--apply``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Iterable

from pathlib import Path

from fleet.apps import configdisk
from fleet.apps import plans as fleet_apps
from fleet.apps.plans import AppPlan, gce_node_files
from fleet.config.schema import StackConfig
from fleet.gcp.naming import Namer
from fleet.images.lock import LockFile
from fleet.images.versions import ImageVersion
from fleet.nodes import boot_images
from fleet.nodes import specs as fleet_nodes
from fleet.project import bootstrap as fleet_bootstrap
from fleet.stacks import wiring

MARK = "dstack-fleet-unused-since"
CONFIG_DISKS = "config-disks"
_BUILD_OBJECT = re.compile(r"(?P<hash>[0-9a-f]{64})/.+")
_CONFIG_OBJECT = re.compile(rf"{CONFIG_DISKS}/(?P<stack>[a-z0-9-]+)/(?P<version>[0-9a-f]{{64}}|data-disk-v[0-9]+)/.+")
KEEP, MARK_NOW, WAIT, UNMARK, DELETE, BOOTED = "keep", "mark", "wait", "unmark", "delete", "booted"


@dataclass(frozen=True)
class Keeps:
    """What a stack still names: image names, and bucket object prefixes (``<bucket>/<path>/``)."""

    images: frozenset[str] = frozenset()
    objects: frozenset[str] = frozenset()

    def summary(self, retention_days: int) -> dict[str, Any]:
        return {"retentionDays": retention_days, "keepsImages": sorted(self.images),
                "keepsObjects": sorted(self.objects)}


def _prefix_of(url: str) -> str:
    """``gs://b/x/y/disk.tar.gz`` or its https form -> ``b/x/y/``."""
    for scheme in ("gs://", "https://storage.googleapis.com/"):
        if url.startswith(scheme):
            return url[len(scheme):].rsplit("/", 1)[0] + "/"
    return url.rsplit("/", 1)[0] + "/"


def env_keeps(versions: dict[str, ImageVersion], fleet: Any, apps: list[AppPlan], stack: str, namer: Namer,
              upload: configdisk.Upload) -> Keeps:
    images: set[str] = set()
    objects: set[str] = set()
    for version in versions.values():
        if version.creates_image and version.gcp_name:
            images.add(version.gcp_name)
            if version.raw_disk_source:
                objects.add(_prefix_of(version.raw_disk_source))
    dstack_nodes = [n for n in fleet.nodes if n.identity.kind == "dstack"]
    if dstack_nodes:
        images.add(configdisk.data_image_name(namer))
        objects.add(_prefix_of(configdisk.data_image_url(upload)))
    for node in dstack_nodes:
        files = gce_node_files(apps, node, stack)
        if files is None:
            continue
        digest = configdisk.content_hash(files)
        images.add(configdisk.version_name(namer, node.key, digest))
        objects.add(_prefix_of(upload.object_url(digest)))
    return Keeps(frozenset(images), frozenset(objects))


def images_keeps(bucket: str, lock: LockFile, building: Iterable[str], env_keeps_by_stack: dict[str, Keeps]) -> Keeps:
    objects = {f"{bucket}/{h}/" for h in (*lock.images, *lock.failed, *building)}
    for keeps in env_keeps_by_stack.values():
        objects |= {p for p in keeps.objects if p.startswith(f"{bucket}/{CONFIG_DISKS}/")}
    return Keeps(frozenset(), frozenset(objects))


def keeps_for_env(config: StackConfig, root: Path, lock: LockFile) -> Keeps:
    """``env_keeps`` recomputed from the configuration, as the env program computes its pieces."""
    names = fleet_bootstrap.names_for(config)
    namer = Namer(prefix=config.fleet.name_prefix, stack=config.stack, project=config.gcp.project)
    versions = boot_images.resolve_for_stack(config, lock, namer)
    fleet = fleet_nodes.plan_fleet(config, namer, versions)
    apps = fleet_apps.plan_apps(config, lock, root, names.registry_path, registries=wiring.registries(names))
    return env_keeps(versions, fleet, apps, config.stack, namer, wiring.config_disk_upload(names, config.stack))


def keeps_for_images(config: StackConfig, root: Path, lock: LockFile, building: Iterable[str]) -> Keeps:
    from fleet.stacks.builds import env_configs

    names = fleet_bootstrap.names_for(config)
    return images_keeps(names.image_bucket, lock, building,
                        {env.stack: keeps_for_env(env, root, lock) for env in env_configs(config, root)})


# ---- deciding -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Item:
    kind: str  # image | object
    name: str  # image name, or bucket/path of an object
    marked_at: datetime | None = None


@dataclass(frozen=True)
class Decision:
    item: Item
    action: str  # keep | mark | wait | unmark | delete | booted
    why: str


@dataclass
class Inventory:
    images: list[Item] = field(default_factory=list)
    objects: list[Item] = field(default_factory=list)
    booted: frozenset[str] = frozenset()  # images some disk of the project was made from


def parse_mark(value: Any) -> datetime | None:
    """A mark is ``YYYYMMDDtHHMMSSz`` (a valid GCE label value and GCS metadata value)."""
    try:
        return datetime.strptime(str(value), "%Y%m%dt%H%M%Sz").replace(tzinfo=timezone.utc)
    except ValueError:
        return None


def mark_value(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y%m%dt%H%M%Sz")


def ours(bucket: str, path: str, stacks: Iterable[str]) -> bool:
    """Objects of the shapes dstack-fleet writes; anything else in the bucket is never touched."""
    if _BUILD_OBJECT.fullmatch(path):
        return True
    match = _CONFIG_OBJECT.fullmatch(path)
    return bool(match and match.group("stack") in set(stacks))


def decide(inventory: Inventory, keeps: Keeps, retention_days: int, now: datetime) -> list[Decision]:
    retention = timedelta(days=retention_days)
    out = []
    for item in inventory.images + inventory.objects:
        if item.kind == "image":
            kept = item.name in keeps.images
        else:
            kept = any(item.name.startswith(prefix) for prefix in keeps.objects)
        if kept:
            out.append(Decision(item, UNMARK if item.marked_at else KEEP, "named by the stack or the lock"))
        elif item.kind == "image" and item.name in inventory.booted:
            out.append(Decision(item, BOOTED, "a disk of the project was made from it (a deployed node boots it)"))
        elif item.marked_at is None:
            out.append(Decision(item, MARK_NOW, f"nothing names it; deleted after {retention_days} days unless "
                                                "named again"))
        elif now - item.marked_at >= retention:
            out.append(Decision(item, DELETE, f"nothing has named it since {item.marked_at:%Y-%m-%d}"))
        else:
            left = retention - (now - item.marked_at)
            out.append(Decision(item, WAIT, f"unnamed since {item.marked_at:%Y-%m-%d}; deleted in {left.days} days"))
    return sorted(out, key=lambda d: (d.item.kind, d.item.name))


def report(decisions: list[Decision], *, applied: bool) -> list[str]:
    if not decisions:
        return ["nothing to collect: every image and artifact found is named"]
    verb = {KEEP: "keep", UNMARK: "unmark", BOOTED: "keep", MARK_NOW: "mark", WAIT: "wait", DELETE: "delete"}
    lines = [f"{verb[d.action]} {d.item.kind} {d.item.name}: {d.why}" for d in decisions if d.action != KEEP]
    kept = sum(d.action == KEEP for d in decisions)
    lines.append(f"{kept} named item(s) kept; " + ("changes applied" if applied else
                                                    "dry run: rerun with --apply (make gc GC_APPLY=1) to act"))
    return lines
