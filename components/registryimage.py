"""A container image built by the images stack and pushed to the bootstrap registry.

The pushed *manifest* digest is exported for ``make lock``. Env stacks never build: they read the digest
from the lock file.

- ``RegistryImage``: built with pulumi-docker for linux/amd64 (``repo_digest``), tagged
  ``<input hash[:32]>-<nonce>`` so a rebuild never pushes to a tag the immutable registry already holds
  (``fleet/images/dockerbuild.py``).
- ``MkosiImage``: built reproducibly with mkosi by a generated step (fleet/images/mkosibuild.py) that builds
  twice, compares, turns the tar into a deterministic OCI image, pushes it with skopeo and prints its
  lock entry.
"""

from __future__ import annotations

import pulumi
import pulumi_command as command
import pulumi_docker as docker

from fleet.images import dockerbuild, mkosibuild
from fleet.stacks.builds import ContainerBuild
from fleet.config.schema import DockerBuildContainer, MkosiBuildContainer


class RegistryImage(pulumi.ComponentResource):
    lock_entry: pulumi.Output[dict]

    def __init__(self, key: str, build: DockerBuildContainer, *, input_hash: str, repository: str,
                 opts: pulumi.ResourceOptions | None = None):
        super().__init__("dstack-fleet:images:RegistryImage", f"container-{key}", {"inputHash": input_hash}, opts)
        # a nonce made once per build (replaced with any build input), so each build pushes a new tag
        nonce = command.local.Command(
            f"container-{key}-tag", create=dockerbuild.tag_script(), interpreter=["/bin/bash", "-c"],
            triggers=dockerbuild.tag_triggers(input_hash, build), opts=pulumi.ResourceOptions(parent=self))
        image = docker.Image(
            f"container-{key}",
            image_name=nonce.stdout.apply(lambda out: f"{repository}:{_push_tag(input_hash, out)}"),
            build=dockerbuild.build_settings(build),
            build_on_preview=False,
            skip_push=False,
            opts=pulumi.ResourceOptions(parent=self),
        )
        source = f"images stack build of {build.context} (input hash {input_hash})"
        self.lock_entry = image.repo_digest.apply(lambda ref: {
            "image": repository, "digest": ref.split("@", 1)[1], "digest_kind": "manifest", "source": source})
        self.register_outputs({"repoDigest": image.repo_digest})


class MkosiImage(pulumi.ComponentResource):
    lock_entry: pulumi.Output[dict]

    def __init__(self, key: str, build: MkosiBuildContainer, *, input_hash: str, repository: str,
                 opts: pulumi.ResourceOptions | None = None):
        super().__init__("dstack-fleet:images:MkosiImage", f"container-{key}", {"inputHash": input_hash}, opts)
        script = mkosibuild.step_script(mkosibuild.MkosiBuild.from_settings(build), key=key,
                                        input_hash=input_hash, repository=repository)
        # The step is keyed by the input hash: a new hash replaces it (a new build); nothing else does.
        step = command.local.Command(
            f"container-{key}-mkosi", create=script, interpreter=["/bin/bash", "-c"], triggers=[input_hash],
            opts=pulumi.ResourceOptions(parent=self))
        self.lock_entry = step.stdout.apply(_lock_entry)
        self.register_outputs({"lockEntry": self.lock_entry})


def _push_tag(input_hash: str, stdout: str) -> str:
    try:
        return dockerbuild.push_tag(input_hash, stdout)
    except dockerbuild.DockerBuildError as exc:
        raise pulumi.RunError(str(exc)) from None


def _lock_entry(stdout: str) -> dict:
    try:
        return mkosibuild.parse_step_stdout(stdout)
    except mkosibuild.MkosiError as exc:
        raise pulumi.RunError(str(exc)) from None


def container_image(build: ContainerBuild) -> RegistryImage | MkosiImage:
    """The component that builds one container of the images stack's plan."""
    kind = MkosiImage if isinstance(build.build, MkosiBuildContainer) else RegistryImage
    return kind(build.key, build.build, input_hash=build.input_hash, repository=build.repository)
