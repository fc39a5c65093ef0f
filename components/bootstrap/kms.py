"""A key ring with one key per stack, for each stack's ``gcpkms://`` secrets provider, and the
fleet's asymmetric key that signs overlay member tables."""

from __future__ import annotations

import pulumi
import pulumi_gcp as gcp

from components.adopt import options

ROTATION = "7776000s"  # 90 days
# The table-signing key: ECDSA P-256 with SHA-256, which the overlay image's openssl verifies
# (`openssl dgst -sha256 -verify`; Cloud KMS returns the signature DER-encoded). pulumi-gcp 10.2.0
# CryptoKey takes `purpose` and `version_template.algorithm` as Cloud KMS's enum names
# (CryptoKeyPurpose ASYMMETRIC_SIGN, CryptoKeyVersionAlgorithm EC_SIGN_P256_SHA256). Asymmetric keys
# have no automatic rotation; a new version would be a new public key, so a new overlay image.
TABLE_KEY_PURPOSE = "ASYMMETRIC_SIGN"
TABLE_KEY_ALGORITHM = "EC_SIGN_P256_SHA256"
TABLE_KEY_PROTECTION = "HSM"


class SecretsKeys(pulumi.ComponentResource):
    keys: dict[str, gcp.kms.CryptoKey]
    table_key: gcp.kms.CryptoKey | None

    def __init__(self, *, ring_name: str, keys: dict[str, str], project: str, location: str,
                 labels: dict[str, str], table_key: str | None = None, opts: pulumi.ResourceOptions | None = None):
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
        self.table_key = None
        if table_key is not None:
            self.table_key = gcp.kms.CryptoKey(
                "key-overlay-tables", name=table_key, key_ring=ring.id, purpose=TABLE_KEY_PURPOSE,
                version_template={"algorithm": TABLE_KEY_ALGORITHM, "protection_level": TABLE_KEY_PROTECTION},
                labels=labels, opts=options("key-overlay-tables", parent=self, protect=True, retain_on_delete=True))
        self.register_outputs({})
