"""A build host: an ephemeral VM that builds one image from its startup script.

Lifecycle (images stack and ``python -m fleet collect``):

1. The images stack declares a ``BuildHost`` only for an input hash that ``images.lock.json``
   neither records as built nor as failed (``fleet.stacks.builds``); identical inputs share one build.
2. ``pulumi up`` creates the VM and returns: nothing waits for a build that takes longer than a CI
   job may run. The startup script (``fleet.images.buildscript.build_script``) writes
   ``started.json``, builds, uploads ``disk.tar.gz``, its sha256, ``build.log`` and finally
   ``outputs.json`` to ``gs://<bucket>/<input hash>/`` (or ``build.log`` and ``failure.txt``), and
   powers the VM off, success or not. Nothing logs in: no external address, no SSH firewall rule,
   egress through the network's Cloud NAT, progress on the serial port (Cloud Logging).
3. ``python -m fleet collect`` (later, on a schedule) verifies a finished build's outputs in the
   bucket (object generation and crc32c as recorded, the published sha256) and hands them to
   ``make lock``; a failed or timed-out build is recorded under ``failed`` with its log's URL.
4. The next ``pulumi up`` no longer declares the ``BuildHost`` of a collected hash: Pulumi deletes
   the VM and its disk. The artifacts and the log stay in the bucket; they are not this component's.

The VM is sized per recipe from config; its boot image is pinned by self link, and its service
account may only write storage and logs (never ``cloud-platform``).
"""

from __future__ import annotations

import pulumi
import pulumi_gcp as gcp

from fleet.images.buildscript import BuildHostPlan


class BuildHost(pulumi.ComponentResource):
    instance: gcp.compute.Instance
    input_hash: str

    def __init__(self, plan: BuildHostPlan, *, project: str, subnetwork: pulumi.Input[str],
                 service_account: pulumi.Input[str], opts: pulumi.ResourceOptions | None = None):
        super().__init__("dstack-fleet:images:BuildHost", plan.logical_name, {}, opts)
        self.input_hash = plan.input_hash
        depends: list[pulumi.Resource] = []
        if plan.guest_upload is not None:
            upload = plan.guest_upload
            # a guest binary kept in the repository reaches the VM through the bucket; the build
            # verifies its sha256 before use
            depends.append(gcp.storage.BucketObject(
                f"{plan.logical_name}-guest",
                bucket=upload.bucket,
                name=upload.object_name,
                source=pulumi.FileAsset(upload.path),
                content_type="application/octet-stream",
                opts=pulumi.ResourceOptions(parent=self),
            ))
        self.instance = gcp.compute.Instance(
            plan.logical_name,
            name=plan.instance_name,
            project=project,
            zone=plan.zone,
            machine_type=plan.machine_type,
            description=plan.description,
            boot_disk={
                "auto_delete": True,
                "initialize_params": {"image": plan.boot_image, "size": plan.disk_gb, "type": plan.disk_type},
            },
            # no access_configs: no external address; egress through the network's Cloud NAT
            network_interfaces=[{"subnetwork": subnetwork}],
            service_account={"email": service_account, "scopes": list(plan.scopes)},
            metadata=plan.metadata,
            labels=plan.labels,
            scheduling={"automatic_restart": True, "on_host_maintenance": "MIGRATE"},
            shielded_instance_config={"enable_secure_boot": True, "enable_vtpm": True,
                                      "enable_integrity_monitoring": True},
            allow_stopping_for_update=True,
            deletion_protection=False,
            opts=pulumi.ResourceOptions(parent=self, depends_on=depends, delete_before_replace=True),
        )
        self.register_outputs({"inputHash": plan.input_hash, "instance": self.instance.name,
                               "artifacts": plan.artifact_prefix})
