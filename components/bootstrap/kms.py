"""A key ring with one key per stack, for each stack's ``gcpkms://`` secrets provider."""

from __future__ import annotations

import pulumi
import pulumi_gcp as gcp

from components.adopt import options

ROTATION = "7776000s"  # 90 days


class SecretsKeys(pulumi.ComponentResource):
    keys: dict[str, gcp.kms.CryptoKey]

    def __init__(self, *, ring_name: str, keys: dict[str, str], project: str, location: str,
                 labels: dict[str, str], opts: pulumi.ResourceOptions | None = None):
        super().__init__("dstack-fleet:bootstrap:SecretsKeys", "secrets-keys", {}, opts)
        # Key rings and keys cannot be deleted in GCP; protect them so a destroy never tries.
        ring = gcp.kms.KeyRing("key-ring", name=ring_name, project=project, location=location,
                               opts=options("key-ring", parent=self, protect=True, retain_on_delete=True))
        self.keys = {}
        for stack, key_name in sorted(keys.items()):
            self.keys[stack] = gcp.kms.CryptoKey(
                f"key-{stack}", name=key_name, key_ring=ring.id, purpose="ENCRYPT_DECRYPT",
                rotation_period=ROTATION, labels=labels,
                opts=options(f"key-{stack}", parent=self, protect=True, retain_on_delete=True))
        self.register_outputs({})
