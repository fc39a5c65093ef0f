"""dstack apps as data: their images by digest, their app-compose bytes, and their identity.

Every app resolves to the exact ``app-compose.json`` bytes the guest will hash (compose-hash) and
so, without a KMS, its app-id: both are known at plan time. Values we compute from our own bytes are
*predicted*; Phala Cloud builds app-compose on its servers, so there the compose-hash and app-id are
*reported* by the service after deploy. Each environment gets its own app name
(``<name>-<stack>``), so dev and prod never share an identity.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from fleet.apps import compose as fc
from fleet.apps import configdisk
from fleet.gcp import tdx
from fleet.images import mkosibuild
from fleet.config.schema import AppConfig, ContainerSource, StackConfig
from fleet.apps.imageref import DigestKind, ImageDigest, ImageRef, parse_image_ref
from fleet.images.lock import PENDING, LockFile
from fleet.config.problems import Problem
from fleet.images.recipes import canonical_json

SERIALIZATION = fc.Serialization.VMM_CLI  # what vmm-cli and the config disk store, byte for byte


@dataclass(frozen=True)
class Container:
    key: str
    origin: str  # external | docker | mkosi
    ref: ImageRef | None  # name@sha256:... (None while pending)
    digest_kind: DigestKind
    input_hash: str | None = None  # built containers: what the lock is keyed by
    repository: str | None = None

    @property
    def pending(self) -> bool:
        return self.ref is None

    def summary(self) -> dict[str, object]:
        return {"origin": self.origin, "reference": str(self.ref) if self.ref else PENDING,
                "digestKind": self.digest_kind.value, "inputHash": self.input_hash}


def docker_build_hash(root: Path, key: str, source) -> str:
    """Input hash of a docker build: every file of the context, the Dockerfile, args, platform."""
    context = root / source.context
    digest = hashlib.sha256()
    files = sorted(p for p in context.rglob("*") if p.is_file()) if context.is_dir() else []
    for path in files:
        digest.update(str(path.relative_to(context)).encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    settings = {"key": key, "dockerfile": source.dockerfile, "platform": source.platform,
                "args": source.args, "target": source.target, "files": digest.hexdigest()}
    return hashlib.sha256(canonical_json(settings)).hexdigest()


def resolve_containers(config: StackConfig, lock: LockFile, root: Path, registry_path: str) -> dict[str, Container]:
    out = {}
    for key, source in sorted(config.fleet.containers.items()):
        out[key] = _container(key, source, lock, root, registry_path)
    return out


def _container(key: str, source: ContainerSource, lock: LockFile, root: Path, registry_path: str) -> Container:
    if source.external is not None:
        ext = source.external
        kind = DigestKind(ext.digest_kind)
        ref = parse_image_ref(f"{ext.image}@{ext.digest}") if kind is DigestKind.MANIFEST else None
        if kind is DigestKind.IMAGE_ID:
            # an image id cannot be pulled by; keep the repository and carry the id as the digest
            ref = parse_image_ref(f"{ext.image}@{ext.digest}")
        return Container(key, "external", ref, kind, repository=ext.image)
    origin, input_hash = container_build_hash(root, key, source)
    entry = lock.container(input_hash)
    repository = f"{registry_path}/{key}"
    if entry is None:
        return Container(key, origin, None, DigestKind.MANIFEST, input_hash, repository)
    return Container(key, origin, parse_image_ref(f"{entry.image}@{entry.digest}"), DigestKind(entry.digest_kind),
                     input_hash, entry.image)


def container_build_hash(root: Path, key: str, source: ContainerSource) -> tuple[str, str]:
    """(builder, input hash) of a container the images stack builds: what images.lock.json keys it by."""
    if source.mkosi is not None:
        return "mkosi", mkosibuild.input_hash(root, key, source.mkosi)
    assert source.docker is not None, "external containers are not built"
    return "docker", docker_build_hash(root, key, source.docker)


@dataclass
class AppPlan:
    config: AppConfig
    name: str  # the app-compose name
    target: str
    compose_text: str | None  # None while an image is pending
    app_compose: fc.AppCompose | None
    pre_launch_script: str | None
    images: list[tuple[str, str]]  # (where, reference)
    pending: list[str]  # container keys still to be built
    identity: str  # stable | derived | reported
    provenance: str  # predicted | reported
    user_config: str | None
    image_digest_events: dict[str, str] = field(default_factory=dict)  # event name -> hex payload

    @property
    def key(self) -> str:
        return self.config.name

    @property
    def compose_hash(self) -> str | None:
        return self.app_compose.compose_hash if self.app_compose else None

    @property
    def app_id(self) -> str | None:
        if self.config.kms and self.config.kms.app_id:
            return self.config.kms.app_id
        return self.app_compose.app_id if self.app_compose else None

    def summary(self) -> dict[str, object]:
        reported = self.provenance == "reported" and not self.pending
        hashes = {
            "composeHash": ("reported by Phala Cloud after deploy" if reported else self.compose_hash or PENDING),
            "appId": ("reported by Phala Cloud after deploy" if reported and not (self.config.kms and self.config.kms.app_id)
                      else self.app_id or (PENDING if self.pending else "assigned by the KMS")),
        }
        return {
            "name": self.name, "kind": self.config.kind, "target": self.target,
            "keyProvider": self.config.key_provider, "identity": self.identity, "stateful": self.config.stateful,
            "values": self.provenance, **hashes,
            "images": {where: ref for where, ref in self.images},
            "pending": self.pending,
            # unmeasured, host-controlled: a change here (e.g. NEAR's MPC_HASH_OVERRIDE) is a restart
            "userConfigSha256": hashlib.sha256(self.user_config.encode()).hexdigest() if self.user_config else None,
        }


def app_name(app: AppConfig, stack: str) -> str:
    return f"{app.name}-{stack}"


def _identity(app: AppConfig) -> str:
    if app.target == "phala" and not (app.kms and app.kms.app_id):
        return "reported"
    if app.key_provider == "kms" and app.kms and app.kms.app_id:
        return "stable"
    return "derived"


def plan_app(app: AppConfig, stack: str, containers: dict[str, Container], root: Path) -> AppPlan:
    name = app_name(app, stack)
    pending = []
    images: list[tuple[str, str]] = []
    pre_launch = None
    events: dict[str, str] = {}

    def image(key: str) -> Container:
        container = containers[key]
        if container.pending:
            pending.append(key)
        return container

    text: str | None
    if app.compose_file:
        text = (root / app.compose_file).read_text(encoding="utf-8")
    elif app.kind == "near-mpc":
        near = app.near_mpc
        launcher, mpc = image(near.launcher_image), image(near.mpc_image)
        facts = fc.NEAR_LAUNCHERS[fc.NearLauncher(near.launcher)]
        if pending:
            text = None
        else:
            default = ImageDigest(mpc.ref.digest.removeprefix("sha256:"), facts.compares)
            text = fc.render_compose(fc.near_launcher_compose(launcher.ref, default, launcher=fc.NearLauncher(near.launcher)))
            events["mpc-image-digest"] = default.hex
    elif app.kind == "kettle":
        k = app.kettle
        launcher = image(k.launcher_image)
        if pending:
            text = None
        else:
            kettle = fc.kettle_app(launcher.ref, fc.KettleManifest(k.manifest_url, k.manifest_sha256, k.app_url,
                                                                  k.app_sha256), port=k.port)
            text, pre_launch = kettle.compose_text, kettle.pre_launch_script
    else:
        used = [image(s.image) for s in app.services]
        if pending:
            text = None
        else:
            spec = fc.ComposeSpec(services=tuple(
                fc.ServiceSpec(name=s.name, image=c.ref, ports=s.ports, environment=s.environment, volumes=s.volumes,
                               command=s.command, working_dir=s.working_dir, restart=s.restart,
                               read_only=s.read_only, security_opt=s.security_opt, tmpfs=s.tmpfs)
                for s, c in zip(app.services, used)))
            text = fc.render_compose(spec)

    app_compose = None
    if text is not None:
        parsed = fc.parse_compose(text)
        images = [(where, str(ref)) for where, ref in parsed.images]
        settings = fc.AppComposeSettings(
            name=name, docker_compose_file=text, key_provider=fc.KeyProvider(app.key_provider),
            key_provider_id=app.kms.key_provider_id if app.kms else "",
            gateway_enabled=app.settings.gateway_enabled, public_logs=app.settings.public_logs,
            public_sysinfo=app.settings.public_sysinfo, public_tcbinfo=app.settings.public_tcbinfo,
            allowed_envs=tuple(app.settings.allowed_envs) + tuple(sorted(app.secret_env)),
            no_instance_id=app.settings.no_instance_id, secure_time=app.settings.secure_time,
            pre_launch_script=pre_launch, storage_fs=app.settings.storage_fs)
        app_compose = fc.build_app_compose(settings, dstack_version=app.dstack_version, serialization=SERIALIZATION)
    user_config = app.user_config
    if app.kind == "near-mpc" and app.near_mpc.user_config:
        user_config = fc.near_user_config(app.near_mpc.user_config, launcher=fc.NearLauncher(app.near_mpc.launcher))
    identity = _identity(app)
    return AppPlan(config=app, name=name, target=app.target, compose_text=text, app_compose=app_compose,
                   pre_launch_script=pre_launch, images=images, pending=sorted(set(pending)), identity=identity,
                   provenance="reported" if app.target == "phala" else "predicted", user_config=user_config,
                   image_digest_events=events)


def plan_apps(config: StackConfig, lock: LockFile, root: Path, registry_path: str) -> list[AppPlan]:
    containers = resolve_containers(config, lock, root, registry_path)
    return [plan_app(app, config.stack, containers, root) for app in config.fleet.apps]


def app_problems(config: StackConfig, root: Path) -> list[Problem]:
    """Config checks for apps that need the repository (compose files) or several keys at once."""
    out: list[Problem] = []
    fleet = config.fleet

    def p(path: str, message: str) -> None:
        out.append(Problem(config.source, f"dstack-fleet:{path}", message))

    groups = {g.name: g for g in fleet.nodes}
    seen: dict[str, int] = {}
    for i, app in enumerate(fleet.apps):
        at = f"apps[{i}]"
        if app.name in seen:
            p(f"{at}.name", f"app {app.name!r} is already declared at apps[{seen[app.name]}]")
        seen.setdefault(app.name, i)
        sources = [x for x in ("compose_file", "services") if getattr(app, x)]
        if app.kind == "compose" and len(sources) != 1:
            p(at, "set exactly one of 'composeFile' (taken verbatim) or 'services' (generated)")
        if app.kind != "compose" and sources:
            p(at, f"kind {app.kind} generates its compose; remove composeFile/services")
        for kind, attr in (("near-mpc", "near_mpc"), ("kettle", "kettle")):
            if (app.kind == kind) != (getattr(app, attr) is not None):
                p(f"{at}.{_camel(attr)}", f"is required for kind {kind} and only allowed there")
        if app.compose_file:
            path = (root / app.compose_file).resolve()
            if not path.is_relative_to(root.resolve()) or not path.is_file():
                p(f"{at}.composeFile", f"{app.compose_file!r} is not a file in the repository")
            else:
                try:
                    fc.parse_compose(path.read_text(encoding="utf-8"))
                except UnicodeDecodeError as exc:
                    p(f"{at}.composeFile", f"{app.compose_file}: is not UTF-8 text (byte {exc.start})")
                except fc.ComposeError as exc:
                    for where, message in exc.problems:
                        p(f"{at}.composeFile", f"{app.compose_file}: {where}: {message}")
        keys = [s.image for s in app.services]
        if app.near_mpc:
            keys += [app.near_mpc.launcher_image, app.near_mpc.mpc_image]
            mpc = fleet.containers.get(app.near_mpc.mpc_image)
            wanted = fc.NEAR_LAUNCHERS[fc.NearLauncher(app.near_mpc.launcher)].compares.value
            if mpc and mpc.external and mpc.external.digest_kind != wanted:
                p(f"{at}.nearMpc.mpcImage", f"the {app.near_mpc.launcher} launcher compares the {wanted} digest, but "
                  f"container {app.near_mpc.mpc_image!r} gives a {mpc.external.digest_kind} digest")
        if app.kettle:
            keys.append(app.kettle.launcher_image)
        for j, key in enumerate(keys):
            if key not in fleet.containers:
                p(f"{at}", f"container {key!r} is not declared in dstack-fleet:containers")
        if app.key_provider == "kms" and app.kms is None:
            p(f"{at}.kms", "is required with key provider kms (its URLs, optionally the pinned app id)")
        if app.key_provider != "kms" and app.kms is not None:
            p(f"{at}.kms", "is only used with key provider kms")
        if app.secret_env and app.key_provider != "kms":
            p(f"{at}.secretEnv", "secret env values are delivered encrypted, which needs a KMS: set keyProvider: kms "
              "(or move them out of the app)")
        for env_name, secret in app.secret_env.items():
            if secret not in fleet.secrets:
                p(f"{at}.secretEnv.{env_name}", f"no secret {secret!r} in dstack-fleet:secrets")
        target = {"gce": app.nodes, "vmm": app.vmm, "phala": app.phala}[app.target]
        if target is None:
            p(f"{at}.{'nodes' if app.target == 'gce' else app.target}", f"is required for target {app.target}")
        if app.target == "gce" and app.nodes:
            group = groups.get(app.nodes)
            if group is None or group.kind != "dstack":
                p(f"{at}.nodes", f"{app.nodes!r} is not a node group of kind dstack")
        if app.target == "phala" and app.key_provider == "local":
            p(f"{at}.keyProvider", "Phala Cloud apps use its KMS (kms) or none")
        if app.vmm and app.vmm.token_secret and app.vmm.token_secret not in fleet.secrets:
            p(f"{at}.vmm.tokenSecret", f"no secret {app.vmm.token_secret!r} in dstack-fleet:secrets")
        if app.phala:
            if app.phala.api_key_secret not in fleet.secrets:
                p(f"{at}.phala.apiKeySecret", f"no secret {app.phala.api_key_secret!r} in dstack-fleet:secrets")
            if app.phala.kms != "phala":
                p(f"{at}.phala.kms", "on-chain KMS deployments (ethereum, base) need a deployer key and RPC; use kms: "
                  "phala")
            if app.kms and app.kms.app_id:
                p(f"{at}.kms.appId", "Phala Cloud assigns the app id; a pinned app id is not supported there")
            if not 5 <= len(app_name(app, config.stack)) <= 63:
                p(f"{at}.name", f"the Phala CVM name {app_name(app, config.stack)!r} must be 5-63 characters")
    for key, source in sorted(fleet.containers.items()):
        if source.external and source.external.check_at_deploy and source.external.digest_kind != "manifest":
            p(f"containers.{key}.external.checkAtDeploy", "only a manifest digest can be checked against a registry; "
              "an image id is the image's config digest")
    runs = [a.nodes for a in fleet.apps if a.target == "gce" and a.nodes]
    for name in sorted({n for n in runs if runs.count(n) > 1}):
        p("apps", f"node group {name!r} runs more than one app; a dstack node runs exactly one app-compose")
    for i, group in enumerate(fleet.nodes):
        if group.kind == "dstack" and group.name not in runs:
            p(f"nodes[{i}]", f"dstack group {group.name!r} runs no app; add an app with target: gce and "
              f"nodes: {group.name}")
    for i, app in enumerate(fleet.apps):
        if app.target == "gce" and app.secret_env:
            p(f"apps[{i}].secretEnv", "encrypted env is not delivered to gce nodes yet (the config disk would carry "
              "a deploy-time secret); run this app on a vmm target or drop the secret env")
    return out


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def gce_node_files(apps: list[AppPlan], node, stack: str) -> dict[str, bytes] | None:
    """The configuration-disk files of a dstack node: its group's app, this node's seed. None while
    the app's images are pending."""

    app = next(a for a in apps if a.target == "gce" and a.config.nodes == node.identity.group)
    if app.app_compose is None:
        return None
    memory = tdx.memory_gib(node.machine_type)
    os_image_hash = None if node.image.pending else node.image.hashes.get("osImageHash")
    return configdisk.node_files(
        app_compose=app.app_compose.data, kms_urls=list(app.config.kms.urls) if app.config.kms else [],
        gateway_urls=list(app.config.gateway_urls), app_id=app.config.kms.app_id if app.config.kms else None,
        seed=configdisk.instance_seed(stack, node.key), os_image_hash=os_image_hash,
        cpu_count=tdx.vcpus(node.machine_type), memory_bytes=memory * 1024 ** 3 if memory else None,
        user_config=app.user_config)


def registry_check(reported: str, expected: str, reference: str) -> str:
    """The registry's answer for ``reference`` must be the pinned digest (a deploy-time check)."""
    if reported != expected:
        raise ValueError(f"the registry reports {reported or 'no image'} for {reference}, not the pinned {expected}; "
                         "the config names an image that does not exist there")
    return reported
