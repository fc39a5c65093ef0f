"""The Pulumi state bucket and the image artifact bucket."""

from __future__ import annotations

import pulumi
import pulumi_gcp as gcp

from components.adopt import options

SOFT_DELETE_SECONDS = 7 * 24 * 3600


class Buckets(pulumi.ComponentResource):
    state: gcp.storage.Bucket
    images: gcp.storage.Bucket

    def __init__(self, *, state_name: str, images_name: str, project: str, location: str, labels: dict[str, str],
                 opts: pulumi.ResourceOptions | None = None):
        super().__init__("dstack-fleet:bootstrap:Buckets", "buckets", {}, opts)
        common = dict(project=project, location=location, uniform_bucket_level_access=True,
                      public_access_prevention="enforced", versioning={"enabled": True},
                      soft_delete_policy={"retention_duration_seconds": SOFT_DELETE_SECONDS},
                      force_destroy=False, labels=labels)
        # No retention policy on the state bucket: the backend rewrites and deletes its checkpoint and
        # lock objects. Versioning and soft delete keep every overwritten state recoverable.
        self.state = gcp.storage.Bucket("state", name=state_name, **common,
                                        opts=options("state", parent=self, protect=True, retain_on_delete=True))
        # Artifacts are content-addressed by input hash and never overwritten; versioning makes a
        # replaced object visible as a new generation, which the integrity step refuses.
        self.images = gcp.storage.Bucket("images", name=images_name, **common,
                                         opts=options("images", parent=self, protect=True, retain_on_delete=True))
        self.register_outputs({"state": self.state.url, "images": self.images.url})
