"""Where a dstack app runs when it is not on this stack's own GCE nodes: a dstack VMM host or Phala Cloud.

``create_app_target`` gives each such app one ``DstackApp`` component whose children are the target's
resources (``components/vmm.py``: the VM; ``components/phala.py``: the deploy step) and whose outputs
are the same for every target:

=============  ===============================================================================
``target``     ``vmm`` or ``phala``
``name``       the app-compose name (``<app>-<stack>``)
``identity``   ``stable``, ``derived`` or ``reported`` (``fleet.apps``)
``values``     ``predicted`` (our own app-compose bytes, vmm) or ``reported`` (Phala builds its own)
``composeHash``  vmm: sha256 of the planned app-compose bytes; phala: as Phala reports it
``appId``      as the target reports it: vmm: the VM's app id (an in-place compose update keeps the VM's
               first one, so it can differ from the planned id); phala: as Phala reports it
``instanceId`` vmm: the VMM's VM id; phala: the CVM's vm_uuid
``status``     as the VMM or Phala last reported it
``urls``       phala: ``https://<app-id>-<port>.<gateway domain>`` per declared port; vmm: ``[]``
=============  ===============================================================================
"""

from __future__ import annotations

from typing import Any

import pulumi

from components.phala import phala_deployment
from components.vmm import Vm, vm_props
from fleet.apps.plans import AppPlan
from fleet.config.schema import StackConfig

TYPE = "dstack-fleet:apps:DstackApp"
OUTPUT_NAMES = ("target", "name", "identity", "values", "composeHash", "appId", "instanceId", "status", "urls")


class DstackApp(pulumi.ComponentResource):
    outputs: dict[str, Any]

    def __init__(self, app: AppPlan, *, config: StackConfig, opts: pulumi.ResourceOptions | None = None):
        super().__init__(TYPE, app.name, {"name": app.name, "target": app.target, "identity": app.identity}, opts)
        common = {"target": app.target, "name": app.name, "identity": app.identity, "values": app.provenance}
        if app.target == "vmm":
            target = app.config.vmm
            props = vm_props(app, target)
            vm = Vm(f"{app.name}-vm", props, pulumi.ResourceOptions(parent=self))
            self.resource = vm
            outputs = {**common, "composeHash": app.compose_hash, "appId": vm.vmAppId, "instanceId": vm.vmId,
                       "status": vm.status, "urls": []}
        else:
            deployment = phala_deployment(app, config=config, parent=self)
            self.resource = deployment.command
            outputs = {**common, "composeHash": deployment.compose_hash, "appId": deployment.app_id,
                       "instanceId": deployment.cvm_id, "status": deployment.status, "urls": deployment.urls}
        self.outputs = outputs
        self.register_outputs(outputs)


def create_app_target(app: AppPlan, *, config: StackConfig) -> pulumi.ComponentResource | None:
    """The app's resources on its vmm or phala target; None for gce apps (``DstackNode``) and for apps
    whose container images are still pending (no app-compose yet)."""
    if app.target not in ("vmm", "phala") or app.app_compose is None:
        return None
    return DstackApp(app, config=config)
