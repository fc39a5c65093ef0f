"""What an env stack derives from the bootstrap's names: the registries its apps pull from and
where its configuration disks go. The program (``components/roles/env.py``) and the offline tools
that recompute a stack's decisions (``fleet.stacks.gc``) take them from here, so they agree."""

from __future__ import annotations

from fleet.apps.configdisk import Upload
from fleet.apps.pulls import Registries
from fleet.project.bootstrap import Names


def registries(names: Names) -> Registries:
    return Registries(app=names.registry_path, mirror=names.mirror_path, public=names.public_registry_path)


def config_disk_upload(names: Names, stack: str) -> Upload:
    return Upload(bucket=names.image_bucket, prefix=f"config-disks/{stack}")
