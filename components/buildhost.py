"""A build host: an ephemeral VM that builds one image from its startup script, and the step that
waits for the result.

Lifecycle (images stack):

1. The images stack creates a ``BuildHost`` only for an input hash that ``images.lock.json`` does not
   hold yet (``fleet.recipes.builds_to_run``); identical inputs share one build.
2. ``pulumi up`` creates the VM. Its startup script (``fleet.buildscript.build_script``) builds,
   uploads ``disk.tar.gz``, its sha256, ``build.log`` and finally ``outputs.json`` to
   ``gs://<bucket>/<input hash>/``, and powers the VM off, success or not, so it stops billing.
   Nothing logs in: no external address, no SSH firewall rule, egress through the network's Cloud
   NAT, progress on the serial port (Cloud Logging).
3. The wait step (a local command where ``pulumi up`` runs) polls for ``outputs.json`` with a bounded
   timeout and prints it; ``lock_entry`` is that parsed into an ``images.lock.json`` entry, which the
   stack exports and ``make lock`` records.
4. Once locked, the next ``pulumi up`` no longer declares the ``BuildHost``: Pulumi deletes the VM
   (and its disk). The artifacts stay in the bucket; they are not this component's resources.

A failed build leaves ``failure.txt`` next to the log and the wait step fails at once, naming the log.
Rerunning ``pulumi up`` resumes waiting (a restarted VM first checks for ``outputs.json``, so a
finished build is never redone). The VM is sized per recipe from config; its boot image is pinned by
self link, and its service account may only write storage and logs (never ``cloud-platform``).
"""

from __future__ import annotations

from typing import Any

import pulumi
import pulumi_command as command
import pulumi_gcp as gcp

from fleet.images.buildscript import BuildHostPlan, parse_outputs


class BuildHost(pulumi.ComponentResource):
    instance: gcp.compute.Instance
    wait: command.local.Command
    lock_entry: pulumi.Output[dict[str, Any]]
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
        self.wait = command.local.Command(
            f"{plan.logical_name}-wait",
            create=plan.wait_script,
            interpreter=["/bin/bash", "-c"],
            triggers=[plan.input_hash],
            opts=pulumi.ResourceOptions(parent=self, depends_on=[self.instance]),
        )
        expected = plan.input_hash
        self.lock_entry = self.wait.stdout.apply(lambda text: parse_outputs(text, expect_input_hash=expected)[1])
        self.register_outputs({"inputHash": plan.input_hash, "instance": self.instance.name,
                               "lockEntry": self.lock_entry})
