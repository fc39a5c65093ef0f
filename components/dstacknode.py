"""A dstack node: a TDX instance booting a dstack OS image, with its app's configuration disk.

The configuration disk is versioned by content: a changed app compose, KMS URL or user config is a
new image and disk that replace the old one on the running instance, which is then reset so the
guest reads it (it reads the disk once per boot). The data disk is never touched by any of this.
"""

from __future__ import annotations

import pulumi
import pulumi_command as command
import pulumi_gcp as gcp

from components.adopt import options
from components.tdxnode import TdxNode
from fleet.apps.configdisk import (Upload, build_script, bundle, content_hash, data_disk_script, data_image_name,
                              data_image_url, version_name)
from fleet.gcp.naming import Namer

CONFIG_DEVICE = "dstack-config"
GUEST_OS_FEATURES = [{"type": "GVNIC"}, {"type": "UEFI_COMPATIBLE"}]


def _https(gs_url: str) -> str:
    return "https://storage.googleapis.com/" + gs_url[len("gs://"):]


class ConfigDisk(pulumi.ComponentResource):
    """One version of a node's configuration disk: built, uploaded, made an image, then a disk."""

    disk: gcp.compute.Disk

    def __init__(self, node_key: str, files: dict[str, bytes], *, upload: Upload, project: str, zone: str,
                 namer: Namer, labels: dict[str, str], opts: pulumi.ResourceOptions | None = None):
        digest = content_hash(files)
        name = f"{node_key}-config-{digest[:12]}"
        super().__init__("dstack-fleet:nodes:ConfigDisk", name, {"contentHash": digest}, opts)
        child = pulumi.ResourceOptions(parent=self)
        build = command.local.Command(f"{name}-build", create=build_script(files, upload), stdin=bundle(files),
                                      interpreter=["/bin/bash", "-c"], opts=child)
        image = gcp.compute.Image(
            name, name=version_name(namer, node_key, digest), project=project,
            description=f"dstack configuration of {node_key}, content hash {digest}",
            raw_disk={"source": _https(upload.object_url(digest))}, guest_os_features=GUEST_OS_FEATURES,
            labels=labels, opts=pulumi.ResourceOptions(parent=self, depends_on=[build]))
        self.disk = gcp.compute.Disk(
            f"{name}-disk", name=version_name(namer, node_key, digest), project=project, zone=zone,
            type="pd-balanced", image=image.self_link, labels=labels,
            description=f"dstack configuration disk ({digest})", opts=child)
        self.register_outputs({"contentHash": digest})


class DataDiskImage(pulumi.ComponentResource):
    """The small GPT image dstack data disks start from (one partition named dstack-data)."""

    image: gcp.compute.Image

    def __init__(self, *, upload: Upload, project: str, namer: Namer, labels: dict[str, str],
                 opts: pulumi.ResourceOptions | None = None):
        super().__init__("dstack-fleet:nodes:DataDiskImage", "dstack-data-image", {}, opts)
        build = command.local.Command("dstack-data-image-build", create=data_disk_script(upload),
                                      interpreter=["/bin/bash", "-c"], opts=pulumi.ResourceOptions(parent=self))
        self.image = gcp.compute.Image(
            "dstack-data-image", name=data_image_name(namer), project=project,
            description="GPT disk with one partition named dstack-data, grown by the guest",
            raw_disk={"source": _https(data_image_url(upload))}, guest_os_features=GUEST_OS_FEATURES, labels=labels,
            opts=options("dstack-data-image", parent=self, depends_on=[build]))
        self.register_outputs({})


class DstackNode(TdxNode):
    def __init__(self, spec, *, files: dict[str, bytes], upload: Upload, namer: Namer,
                 data_image: gcp.compute.Image, nat: pulumi.Resource, **kwargs):
        self.config_disk: ConfigDisk | None = None

        def attach(node: TdxNode) -> list[dict]:
            self.config_disk = ConfigDisk(spec.key, files, upload=upload, project=kwargs["project"],
                                          zone=spec.identity.zone, namer=namer, labels=spec.labels,
                                          opts=pulumi.ResourceOptions(parent=node))
            return [{"source": self.config_disk.disk.self_link, "device_name": CONFIG_DEVICE, "mode": "READ_ONLY"}]

        super().__init__("dstack-fleet:nodes:DstackNode", spec, data_disk_image=data_image.self_link,
                         extra_disks=attach, **kwargs)
        # The guest reads its configuration once per boot: after a new version is attached, reset it.
        # `create` runs when the node is first made (it boots with the disk anyway); `update` runs
        # when the version changes. The rebooted guest pulls its containers through the region's Cloud
        # NAT (no external address), so the reset waits for it. gcloud runs where `pulumi up` runs, with
        # its credentials (the deploy workflow sets it up; docs/operations.md, "Continuous integration and delivery").
        command.local.Command(
            f"{spec.key}-apply-config",
            create="true",
            update=(f"gcloud compute instances reset {spec.identity.name} --zone {spec.identity.zone} "
                    f"--project {kwargs['project']} --quiet"),
            environment={"CONFIG_CONTENT_HASH": content_hash(files)},
            opts=pulumi.ResourceOptions(parent=self, depends_on=[self.instance, nat]))
