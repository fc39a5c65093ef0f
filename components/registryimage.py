"""A container image built by the images stack and pushed to the bootstrap registry.

Built with pulumi-docker for linux/amd64 and tagged with its input hash (tags are immutable in our
registry, and the input hash names the build); the pushed *manifest* digest (``repo_digest``) is
exported for ``make lock``. Env stacks never build: they read the digest from the lock file.
"""

from __future__ import annotations

import pulumi
import pulumi_docker as docker

from fleet.config import DockerBuildContainer


class RegistryImage(pulumi.ComponentResource):
    lock_entry: pulumi.Output[dict]

    def __init__(self, key: str, build: DockerBuildContainer, *, input_hash: str, repository: str,
                 opts: pulumi.ResourceOptions | None = None):
        super().__init__("dstack-fleet:images:RegistryImage", f"container-{key}", {"inputHash": input_hash}, opts)
        image = docker.Image(
            f"container-{key}",
            image_name=f"{repository}:{input_hash[:32]}",
            build={"context": build.context, "dockerfile": f"{build.context}/{build.dockerfile}",
                   "platform": build.platform, "args": build.args or None, "target": build.target},
            build_on_preview=False,
            skip_push=False,
            opts=pulumi.ResourceOptions(parent=self),
        )
        source = f"images stack build of {build.context} (input hash {input_hash})"
        self.lock_entry = image.repo_digest.apply(lambda ref: {
            "image": repository, "digest": ref.split("@", 1)[1], "digest_kind": "manifest", "source": source})
        self.register_outputs({"repoDigest": image.repo_digest})
