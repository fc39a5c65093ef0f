"""What the images stack builds: every image and container the env stacks it serves declare and
the lock file does not hold yet, one build per input hash.

The env stacks' own stack files are read from this repository, and their build inputs (including
an overlay's init script) are derived exactly as the env stacks derive them, so the input hash a
build is keyed by is the one the env stack will look up in ``images.lock.json``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fleet.project import accounts
from fleet.apps.plans import container_build_hash
from fleet.project.bootstrap import Names
from fleet.images.buildscript import BuildHostPlan, BuildHostSettings, build_script, plan_build_host
from fleet.config.schema import DockerBuildContainer, MkosiBuildContainer, StackConfig
from fleet.images.versions import build_inputs
from fleet.images.lock import LockFile
from fleet.config.problems import ConfigError, Problem
from fleet.gcp.naming import Namer
from fleet.stacks.load import load_config
from fleet.nodes.specs import derived_image_inputs, overlay_init_script
from fleet.images.recipes import BuildSpec, build_spec, builds_to_run


@dataclass(frozen=True)
class ContainerBuild:
    key: str
    input_hash: str
    build: DockerBuildContainer | MkosiBuildContainer
    repository: str
    stacks: tuple[str, ...]

    @property
    def builder(self) -> str:
        return "mkosi" if isinstance(self.build, MkosiBuildContainer) else "docker"


@dataclass
class BuildPlan:
    hosts: list[BuildHostPlan]
    containers: list[ContainerBuild]
    specs: list[BuildSpec]
    locked_images: list[str]
    locked_containers: list[str]
    builder_account: str
    pending_stacks: dict[str, list[str]] = field(default_factory=dict)

    def summary(self) -> dict[str, object]:
        building = {h.input_hash for h in self.hosts}
        images = {}
        for spec in self.specs:
            images[spec.input_hash] = {"recipe": spec.recipe, "label": spec.label, "keys": list(spec.keys),
                                       "status": "building" if spec.input_hash in building else "locked",
                                       **({"kernelCmdline": spec.kernel_cmdline} if spec.kernel_cmdline else {})}
        containers = {c.input_hash: {"key": c.key, "builder": c.builder, "repository": c.repository,
                                     "stacks": list(c.stacks), "status": "building"} for c in self.containers}
        for h in self.locked_containers:
            containers.setdefault(h, {"status": "locked"})
        return {"images": images, "containers": containers}


def env_configs(config: StackConfig, root: Path) -> list[StackConfig]:
    return [load_config(root, stack)[1] for stack in config.fleet.build_for]


def host_settings(config: StackConfig, names: Names, recipe: str) -> BuildHostSettings:
    host = config.fleet.build_host
    assert host is not None, "checked for images stacks"
    sizing = host.recipes.get(recipe)
    return BuildHostSettings(
        bucket=names.image_bucket,
        zone=host.zone or f"{config.gcp.region}-a",
        boot_image=host.boot_image,
        machine_type=sizing.machine_type if sizing else None,
        disk_gb=sizing.disk_gb if sizing else None,
        disk_type=sizing.disk_type if sizing else "pd-ssd",
        timeout_seconds=sizing.timeout_minutes * 60 if sizing and sizing.timeout_minutes else None,
        poll_seconds=host.poll_seconds,
    )


def plan_builds(config: StackConfig, root: Path, lock: LockFile, names: Names, namer: Namer) -> BuildPlan:
    specs: list[BuildSpec] = []
    containers: dict[str, ContainerBuild] = {}
    for env in env_configs(config, root):
        env_namer = Namer(env.fleet.name_prefix, env.stack, env.gcp.project)
        derived = derived_image_inputs(env, env_namer)
        _, script = overlay_init_script(env, env_namer)
        for key, source in sorted(env.fleet.images.items()):
            if source.build is None:
                continue
            init = script if source.build.recipe == "tplus-overlay" else None
            specs.append(build_spec(key, build_inputs(source), derived.get(key, {}), init_script=init, root=root))
        for key, source in sorted(env.fleet.containers.items()):
            if source.external is not None:
                continue
            _, digest = container_build_hash(root, key, source)
            if digest in lock.containers:
                continue
            existing = containers.get(digest)
            stacks = (existing.stacks if existing else ()) + (env.stack,)
            build = source.docker or source.mkosi
            assert build is not None
            containers[digest] = ContainerBuild(key, digest, build, f"{names.registry_path}/{key}", stacks)
    to_run = builds_to_run(specs, lock.images)
    hosts = [plan_build_host(spec, host_settings(config, names, spec.recipe), namer, project=config.gcp.project,
                             root=root) for spec in to_run]
    builder = accounts.email(names.builder_account_id(), config.gcp.project)
    return BuildPlan(hosts=hosts, containers=sorted(containers.values(), key=lambda c: c.input_hash), specs=specs,
                     locked_images=sorted(lock.images), locked_containers=sorted(lock.containers),
                     builder_account=builder)


def local_build_script(root: Path, stack: str, key: str, output_dir: Path, *, bucket: str | None = None,
                       work_dir: str | None = None) -> tuple[BuildSpec, str]:
    """The same generated build an images-stack build host runs, for the operator's machine."""
    _, env = load_config(root, stack)
    source = env.fleet.images.get(key)
    if source is None or source.build is None:
        raise ConfigError([Problem(env.source, f"dstack-fleet:images.{key}", "no such image build in this stack; "
                                   f"builds: {', '.join(k for k, v in env.fleet.images.items() if v.build) or '(none)'}")])
    env_namer = Namer(env.fleet.name_prefix, env.stack, env.gcp.project)
    derived = derived_image_inputs(env, env_namer).get(key, {})
    _, script = overlay_init_script(env, env_namer)
    spec = build_spec(key, build_inputs(source), derived,
                      init_script=script if source.build.recipe == "tplus-overlay" else None, root=root)
    guest = None  # a guest binary kept in the repository is read from its absolute path
    binary = getattr(source.build, "guest", None)
    if binary is not None and binary.binary is not None and not binary.binary.url.startswith("https://"):
        guest = str((root / binary.binary.url).resolve())
    return spec, build_script(spec, mode="local", bucket=bucket, work_dir=work_dir, output_dir=str(output_dir),
                              guest_location=guest)
