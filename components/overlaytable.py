"""The overlay's signed member table: a deploy-time step that signs the table the plan made with the
fleet's Cloud KMS key (``fleet.nodes.membertable``), and the metadata every member gets from it.

``create`` runs once, when the overlay first exists, and opens founding; every later change of the
table (or of the genesis node's data disk, which the step follows) runs ``update``, which closes it
and raises the serial. The members' metadata updates in place: running nodes read the new table at
their next start; nothing is replaced, stopped or reset by it.
"""

from __future__ import annotations

import json

import pulumi
import pulumi_command as command

from fleet.nodes import membertable


class OverlayTable(pulumi.ComponentResource):
    metadata: dict[str, pulumi.Output[str]]

    def __init__(self, *, table_body: str, key_version: str, genesis_disk: pulumi.Input[str] | None,
                 opts: pulumi.ResourceOptions | None = None):
        super().__init__("dstack-fleet:nodes:OverlayTable", "overlay-table",
                         {"keyVersion": key_version, "bodySha256": membertable.sha256_text(table_body)}, opts)
        self.step = command.local.Command(
            "overlay-table-sign",
            create=membertable.step_script(key_version, founding=True),
            update=membertable.step_script(key_version, founding=False),
            stdin=table_body,
            # a replaced genesis data disk must never found again: its new id makes the step update
            triggers=[genesis_disk if genesis_disk is not None else "none"],
            opts=pulumi.ResourceOptions(parent=self))
        signed = self.step.stdout.apply(json.loads)
        self.metadata = {
            membertable.METADATA_TABLE: signed.apply(lambda s: s["table"]),
            membertable.METADATA_SIGNATURE: signed.apply(lambda s: s["signature"]),
        }
        self.register_outputs({"serial": signed.apply(lambda s: s["serial"])})
