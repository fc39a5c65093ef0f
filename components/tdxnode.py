"""Confidential TDX nodes: a static internal address, a data disk of its own, the instance.

The instance is replaced delete-before-replace with the same data disk re-attached and is never
protected; stop-requiring updates (machine type, shielded settings, service account) are allowed
to stop it. In prod the disk and address are protected, kept on delete and ``PREVENT``ed. Instance
metadata updates in place (GCE applies it to a running instance; nothing here marks it
replace-on-change), which is how an overlay member gets a new signed member table.
"""

from __future__ import annotations

from typing import Callable

import pulumi
import pulumi_command as command
import pulumi_gcp as gcp

from components.adopt import options
from fleet.nodes.specs import DATA_DEVICE_NAME, DISK_TYPE, BOOT_DISK_GB, NodeSpec

PENDING_IMAGE = "pending build"


class TdxNode(pulumi.ComponentResource):
    """Shared by the node kinds; ``type_token`` names the kind (``OverlayNode``, ``DstackNode``)."""

    instance: gcp.compute.Instance
    data_disk: gcp.compute.Disk
    address: gcp.compute.Address

    def __init__(self, type_token: str, spec: NodeSpec, *, project: str, subnetwork: gcp.compute.Subnetwork,
                 boot_image: pulumi.Input[str], snapshot_policy: gcp.compute.ResourcePolicy | None,
                 data_disk_image: pulumi.Input[str] | None = None,
                 extra_disks: "Callable[[TdxNode], list[dict]] | None" = None,
                 extra_metadata: "Callable[[TdxNode], dict[str, pulumi.Input[str]]] | None" = None,
                 opts: pulumi.ResourceOptions | None = None):
        super().__init__(type_token, spec.key, {"group": spec.identity.group, "ordinal": spec.identity.ordinal,
                                                "maxUnavailable": spec.max_unavailable}, opts)
        self.spec_key = spec.key
        keep = dict(parent=self, protect=spec.protect_data or None, retain_on_delete=spec.protect_data or None)
        deletion_policy = "PREVENT" if spec.protect_data else None
        identity = spec.identity

        self.address = gcp.compute.Address(
            f"{spec.key}-address",
            name=spec.address_name,
            project=project,
            region=identity.region,
            subnetwork=subnetwork.id,
            address_type="INTERNAL",
            purpose="GCE_ENDPOINT",
            address=identity.address,
            description=f"Internal address of node {spec.key}",
            labels=spec.labels,
            deletion_policy=deletion_policy,
            opts=options(f"{spec.key}-address", **keep),
        )
        external = None
        if spec.external_address_name:
            external = gcp.compute.Address(
                f"{spec.key}-external",
                name=spec.external_address_name,
                project=project,
                region=identity.region,
                address_type="EXTERNAL",
                description=f"External address of node {spec.key}",
                labels=spec.labels,
                deletion_policy=deletion_policy,
                opts=options(f"{spec.key}-external", **keep),
            )
        self.data_disk = gcp.compute.Disk(
            f"{spec.key}-data",
            name=spec.data_disk_name,
            project=project,
            zone=identity.zone,
            type=DISK_TYPE,
            size=spec.data_disk_gb,
            # dstack finds its data by a partition label, so its disk starts from a small GPT image and
            # grows; a later image change must never recreate the disk
            image=data_disk_image,
            description=f"Data disk of node {spec.key}; survives instance replacement",
            labels=spec.labels,
            deletion_policy=deletion_policy,
            opts=options(f"{spec.key}-data", **keep, ignore_changes=["image"] if data_disk_image is not None else None),
        )
        if snapshot_policy is not None:
            gcp.compute.DiskResourcePolicyAttachment(
                f"{spec.key}-snapshots",
                project=project,
                zone=identity.zone,
                disk=self.data_disk.name,
                name=snapshot_policy.name,
                opts=pulumi.ResourceOptions(parent=self),
            )
        interface: dict = {"subnetwork": subnetwork.id, "network_ip": self.address.address, "nic_type": "GVNIC"}
        if external is not None:
            interface["access_configs"] = [{"nat_ip": external.address}]
        self.instance = gcp.compute.Instance(
            spec.key,
            name=identity.name,
            project=project,
            zone=identity.zone,
            machine_type=spec.machine_type,
            description=f"dstack-fleet {identity.kind} node {spec.key}",
            boot_disk={
                "auto_delete": True,
                "initialize_params": {"image": boot_image, "size": BOOT_DISK_GB, "type": DISK_TYPE},
            },
            attached_disks=[{"source": self.data_disk.self_link, "device_name": DATA_DEVICE_NAME,
                             "mode": "READ_WRITE"}] + (extra_disks(self) if extra_disks else []),
            network_interfaces=[interface],
            confidential_instance_config={"confidential_instance_type": "TDX"},
            scheduling={"on_host_maintenance": "TERMINATE", "automatic_restart": True},
            shielded_instance_config={
                "enable_secure_boot": spec.shielded.secure_boot,
                "enable_vtpm": spec.shielded.vtpm,
                "enable_integrity_monitoring": spec.shielded.integrity_monitoring,
            },
            service_account={"email": spec.service_account, "scopes": list(spec.scopes)},
            metadata={**spec.metadata, **(extra_metadata(self) if extra_metadata else {})},
            tags=list(spec.tags),
            labels=spec.labels,
            allow_stopping_for_update=True,
            deletion_protection=False,
            opts=options(spec.key, parent=self, delete_before_replace=True),
        )
        self.register_outputs({"name": self.instance.name, "address": self.address.address})


class OverlayNode(TdxNode):
    """A member of the overlay: its metadata carries the signed member table (``table`` gives it)."""

    def __init__(self, spec: NodeSpec, *, table: "Callable[[TdxNode], dict[str, pulumi.Input[str]]]", **kwargs):
        super().__init__("dstack-fleet:nodes:OverlayNode", spec, extra_metadata=table, **kwargs)
        # A running member reads the table once per start. Membership changes need nothing (a
        # running node accepts joining peers); a change it must act on (port, interface, topology,
        # execution RPC) resets it, which the rollout check counts as a stop and rolls in waves.
        # `create` runs when the node is first made (it boots with the table anyway).
        command.local.Command(
            f"{spec.key}-apply-table",
            create="true",
            update=(f"gcloud compute instances reset {spec.identity.name} --zone {spec.identity.zone} "
                    f"--project {kwargs['project']} --quiet"),
            environment={"OVERLAY_RESTART_KEY": spec.restart_key or ""},
            opts=pulumi.ResourceOptions(parent=self, depends_on=[self.instance]))
