"""A GCP image version: an integrity check of the GCS object, then the image made from it."""

from __future__ import annotations

import pulumi
import pulumi_command as command
import pulumi_gcp as gcp

from components.adopt import options
from fleet.images.versions import GUEST_OS_FEATURES, ImageVersion, integrity_script


class GcpImage(pulumi.ComponentResource):
    image: gcp.compute.Image
    self_link: pulumi.Output[str]

    def __init__(self, version: ImageVersion, project: str, opts: pulumi.ResourceOptions | None = None):
        assert version.logical_name and version.creates_image
        super().__init__("dstack-fleet:images:GcpImage", version.logical_name, {}, opts)
        # A replaced GCS object must never become an image: check generation and crc32c (or the
        # sha256 of a prebuilt tarball) right before the image is created.
        check = command.local.Command(
            f"{version.logical_name}-integrity",
            create=integrity_script(version),
            interpreter=["/bin/bash", "-c"],
            triggers=[version.raw_disk_source, version.content_hash],
            opts=pulumi.ResourceOptions(parent=self),
        )
        self.image = gcp.compute.Image(
            version.logical_name,
            name=version.gcp_name,
            project=project,
            description=version.description,
            raw_disk={"source": version.raw_disk_source},
            guest_os_features=[{"type": feature} for feature in GUEST_OS_FEATURES],
            labels=version.labels,
            opts=options(version.logical_name, parent=self, depends_on=[check],
                         custom_timeouts=pulumi.CustomTimeouts(create="60m", delete="30m")),
        )
        self.self_link = self.image.self_link
        self.register_outputs({"selfLink": self.image.self_link})
