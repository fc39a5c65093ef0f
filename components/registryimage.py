"""A container image built by the images stack and pushed to the bootstrap registry.

Tagged with its input hash (tags are immutable in our registry, and the input hash names the
build); the pushed *manifest* digest is exported for ``make lock``. Env stacks never build: they
read the digest from the lock file.

- ``RegistryImage``: built with Docker by a generated step (fleet/images/dockerbuild.py) that resolves an
  existing immutable tag to its digest instead of pushing again, and otherwise builds, pushes and
  prints its lock entry.
- ``MkosiImage``: built reproducibly with mkosi by a generated step (fleet/images/mkosibuild.py) that builds
  twice, compares, turns the tar into a deterministic OCI image, pushes it with skopeo and prints its
  lock entry.
"""

from __future__ import annotations

import pulumi
import pulumi_command as command

from fleet.images import dockerbuild, mkosibuild
from fleet.stacks.builds import ContainerBuild
from fleet.config.schema import DockerBuildContainer, MkosiBuildContainer


class RegistryImage(pulumi.ComponentResource):
    lock_entry: pulumi.Output[dict]

    def __init__(self, key: str, build: DockerBuildContainer, *, input_hash: str, repository: str,
                 opts: pulumi.ResourceOptions | None = None):
        super().__init__("dstack-fleet:images:RegistryImage", f"container-{key}", {"inputHash": input_hash}, opts)
        script = dockerbuild.step_script(build, key=key, input_hash=input_hash, repository=repository)
        # keyed by the input hash (the tag): a new hash is a new build; nothing else replaces it
        step = command.local.Command(
            f"container-{key}-docker", create=script, interpreter=["/bin/bash", "-c"], triggers=[input_hash],
            opts=pulumi.ResourceOptions(parent=self))
        self.lock_entry = step.stdout.apply(_lock_entry)
        self.register_outputs({"lockEntry": self.lock_entry})


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


def _lock_entry(stdout: str) -> dict:
    try:
        return mkosibuild.parse_step_stdout(stdout)
    except mkosibuild.MkosiError as exc:
        raise pulumi.RunError(str(exc)) from None


def container_image(build: ContainerBuild) -> RegistryImage | MkosiImage:
    """The component that builds one container of the images stack's plan."""
    kind = MkosiImage if isinstance(build.build, MkosiBuildContainer) else RegistryImage
    return kind(build.key, build.build, input_hash=build.input_hash, repository=build.repository)
