"""dstack apps as data: their images by digest, their app-compose bytes, and their identity.

Every app resolves to the exact ``app-compose.json`` bytes the guest will hash (compose-hash) and
so its app-id: the pinned dstack releases emit the app id deployed in ``.instance_info`` and fill an
empty one with the compose hash's first 20 bytes, with or without a KMS, so unless ``kms.appId``
pins it, the app id follows the compose (identity ``compose``; pinned: ``pinned``). Values we
compute from our own bytes are *predicted*; Phala Cloud builds app-compose on its servers, so there
the compose-hash and app-id are *reported* by the service after deploy (identity ``reported``).
Each environment gets its own app name (``<name>-<stack>``), so dev and prod never share an identity.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from fleet.apps import compose as fc
from fleet.apps import configdisk
from fleet.apps import phala as phala_cli
from fleet.apps import pulls as fleet_pulls
from fleet.attest import measure
from fleet.gcp import tdx
from fleet.images import mkosibuild
from fleet.config.schema import AppConfig, ContainerSource, StackConfig
from fleet.apps.imageref import DigestKind, ImageDigest, ImageRef, parse_image_ref, repository_problem
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


def app_container_keys(app: AppConfig) -> list[str]:
    keys = [s.image for s in app.services]
    if app.near_mpc:
        keys += [app.near_mpc.launcher_image, app.near_mpc.mpc_image]
    if app.kettle:
        keys.append(app.kettle.launcher_image)
    return keys


def public_container_keys(config: StackConfig) -> set[str]:
    """Containers an app opted in to publish (``phala.publicImages``): built into the public-read repository."""
    return {key for app in config.fleet.apps if app.phala is not None and app.phala.public_images
            for key in app_container_keys(app)}


def resolve_containers(config: StackConfig, lock: LockFile, root: Path, registry_path: str,
                       public_path: str | None = None) -> dict[str, Container]:
    out = {}
    public = public_container_keys(config) if public_path else set()
    for key, source in sorted(config.fleet.containers.items()):
        path = public_path if key in public and source.external is None else registry_path
        out[key] = _container(key, source, lock, root, path, public=path == public_path)
    return out


def _container(key: str, source: ContainerSource, lock: LockFile, root: Path, registry_path: str, *,
               public: bool = False) -> Container:
    if source.external is not None:
        ext = source.external
        kind = DigestKind(ext.digest_kind)
        ref = parse_image_ref(f"{ext.image}@{ext.digest}") if kind is DigestKind.MANIFEST else None
        if kind is DigestKind.IMAGE_ID:
            # an image id cannot be pulled by; keep the repository and carry the id as the digest
            ref = parse_image_ref(f"{ext.image}@{ext.digest}")
        return Container(key, "external", ref, kind, repository=ext.image)
    origin, input_hash = container_build_hash(root, key, source, public=public)
    entry = lock.container(input_hash)
    repository = f"{registry_path}/{key}"
    if entry is None:
        return Container(key, origin, None, DigestKind.MANIFEST, input_hash, repository)
    return Container(key, origin, parse_image_ref(f"{entry.image}@{entry.digest}"), DigestKind(entry.digest_kind),
                     input_hash, entry.image)


def container_build_hash(root: Path, key: str, source: ContainerSource, *, public: bool = False) -> tuple[str, str]:
    """(builder, input hash) of a container the images stack builds: what images.lock.json keys it by.
    A container published to the public-read repository is another build (another push), so its
    hash says so; a private one's hash is unchanged."""
    if source.mkosi is not None:
        origin, digest = "mkosi", mkosibuild.input_hash(root, key, source.mkosi)
    else:
        assert source.docker is not None, "external containers are not built"
        origin, digest = "docker", docker_build_hash(root, key, source.docker)
    if public:
        digest = hashlib.sha256(canonical_json({"repository": "public", "build": digest})).hexdigest()
    return origin, digest


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
    identity: str  # measure.IDENTITIES: pinned | compose | reported
    provenance: str  # predicted | reported
    user_config: str | None
    image_digest_events: dict[str, str] = field(default_factory=dict)  # event name -> hex payload
    user_config_summary: dict[str, object] | None = None  # NEAR's Rust launcher: what its TOML does
    pulls: list[fleet_pulls.Pull] = field(default_factory=list)  # where each image is pulled from, and how

    @property
    def key(self) -> str:
        return self.config.name

    @property
    def compose_hash(self) -> str | None:
        return self.app_compose.compose_hash if self.app_compose else None

    @property
    def pinned_app_id(self) -> str | None:
        """The app id written to ``.instance_info`` (or sent as the VMM's app id): a pinned KMS app id."""
        return self.config.kms.app_id if self.config.kms and self.config.kms.app_id else None

    @property
    def app_id(self) -> str | None:
        """The app id the guest emits: the pinned one, else the compose hash's first 20 bytes."""
        if self.pinned_app_id:
            return self.pinned_app_id
        return self.app_compose.app_id if self.app_compose else None

    def summary(self) -> dict[str, object]:
        reported = self.provenance == "reported" and not self.pending
        hashes = {
            "composeHash": (measure.REPORTED_BY_PHALA if reported else self.compose_hash or PENDING),
            "appId": (measure.REPORTED_BY_PHALA if self.identity == measure.IDENTITY_REPORTED and reported
                      else self.app_id or PENDING),
        }
        return {
            "name": self.name, "kind": self.config.kind, "target": self.target,
            **({"nodes": self.config.nodes} if self.config.nodes else {}),
            "keyProvider": self.config.key_provider, "identity": self.identity, "stateful": self.config.stateful,
            "values": self.provenance, **hashes,
            "images": {where: ref for where, ref in self.images},
            "pending": self.pending,
            # unmeasured, host-controlled: a change here (e.g. NEAR's MPC_HASH_OVERRIDE) is a restart
            "userConfigSha256": hashlib.sha256(self.user_config.encode()).hexdigest() if self.user_config else None,
            **({"userConfig": self.user_config_summary} if self.user_config_summary else {}),
            **({"kettle": self.kettle_summary()} if self.config.kettle else {}),
        }

    def kettle_summary(self) -> dict[str, object]:
        """The manifest a kettle app is bound to: URL and sha256 are literal values of the measured
        compose environment, and the measured pre-launch script checks both before kettle starts."""
        k = self.config.kettle
        return {"manifestUrl": k.manifest_url, "manifestSha256": k.manifest_sha256, "appUrl": k.app_url,
                "appSha256": k.app_sha256,
                "measured": "compose environment (KETTLE_MANIFEST_URL, KETTLE_MANIFEST_SHA256, KETTLE_APP_SHA256) "
                            "and the pre-launch script, so both are in the compose hash"}


def app_name(app: AppConfig, stack: str) -> str:
    return f"{app.name}-{stack}"


def _identity(app: AppConfig) -> str:
    if app.target == "phala" and not (app.kms and app.kms.app_id):
        return measure.IDENTITY_REPORTED
    if app.key_provider == "kms" and app.kms and app.kms.app_id:
        return measure.IDENTITY_PINNED
    return measure.IDENTITY_COMPOSE


def plan_app(app: AppConfig, stack: str, containers: dict[str, Container], root: Path,
             registries: fleet_pulls.Registries | None = None) -> AppPlan:
    name = app_name(app, stack)
    pending = []
    images: list[tuple[str, str]] = []
    pre_launch = None
    events: dict[str, str] = {}

    def image(key: str) -> Container:
        container = containers[key]
        if container.pending:
            pending.append(key)
        elif app.target == "gce" and registries is not None and app.docker_hub == "mirror":
            # a GCE guest pulls Docker Hub images through the bootstrap's mirror (fleet/apps/pulls.py)
            container = dataclasses.replace(container, ref=fleet_pulls.through_mirror(container.ref, registries))
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
            if near.launcher == "rust":
                rust = near_rust_user_config(app, containers)
                if rust.mpc_hash_override:
                    events["mpc-image-digest"] = rust.mpc_hash_override.removeprefix("sha256:")
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
    routes: list[fleet_pulls.Pull] = []
    if registries is not None:
        routes = [fleet_pulls.route_pending(f"containers.{key}", containers[key].repository, app.target, registries)
                  for key in sorted(set(pending))]
        if app.kind == "near-mpc" and not containers[app.near_mpc.mpc_image].pending:
            mpc = containers[app.near_mpc.mpc_image]
            # the launcher pulls the MPC node itself, from MPC_REGISTRY (user config; Docker Hub by default)
            routes.append(fleet_pulls.Pull("launcher: nearMpc.mpcImage", f"{mpc.repository}@{mpc.ref.digest}",
                                           "direct (the launcher pulls it)", fleet_pulls.ANONYMOUS))
    if text is not None:
        parsed = fc.parse_compose(text)
        images = [(where, str(ref)) for where, ref in parsed.images]
        if registries is not None:
            routes = [fleet_pulls.route(where, ref, app.target, registries) for where, ref in images] + routes
            if app.target == "gce" and fleet_pulls.needs_login(routes):
                login = fleet_pulls.login_script(registries.host)
                pre_launch = f"{login}\n{pre_launch}" if pre_launch else login
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
    user_config_summary = None
    if app.kind == "near-mpc" and app.near_mpc.launcher == "rust":
        # the Rust launcher fails without /tapp/user_config, so it always gets one
        rust = near_rust_user_config(app, containers)
        user_config = rust.text()
        user_config_summary = near_user_config_summary(rust, events.get("mpc-image-digest"))
    elif app.kind == "near-mpc" and app.near_mpc.user_config:
        user_config = fc.near_user_config(app.near_mpc.user_config, launcher=fc.NearLauncher(app.near_mpc.launcher))
    identity = _identity(app)
    return AppPlan(config=app, name=name, target=app.target, compose_text=text, app_compose=app_compose,
                   pre_launch_script=pre_launch, images=images, pending=sorted(set(pending)), identity=identity,
                   provenance="reported" if app.target == "phala" else "predicted", user_config=user_config,
                   image_digest_events=events, user_config_summary=user_config_summary,
                   pulls=routes)


def near_rust_user_config(app: AppConfig, containers: dict[str, Container]) -> fc.NearRustUserConfig:
    """The Rust launcher's TOML user config from the app's typed settings: the image reference
    defaults to the MPC image's repository, the hash override names a declared container."""
    near = app.near_mpc
    settings = near.launcher_config
    override = containers.get(settings.hash_override) if settings.hash_override else None
    return fc.NearRustUserConfig(
        image_reference=settings.image_reference or containers[near.mpc_image].repository or "",
        port_mappings=tuple((m.host, m.container) for m in settings.port_mappings),
        mpc_hash_override=str(override.ref.digest) if override and override.ref else None,
        pull_max_retries=settings.pull_max_retries, pull_retry_interval_secs=settings.pull_retry_interval_secs,
        pull_max_delay_secs=settings.pull_max_delay_secs, mpc_node_config=dict(near.node_config))


def near_user_config_summary(rust: fc.NearRustUserConfig, mpc_image_digest: str | None) -> dict[str, object]:
    """What the plan says about the Rust launcher's user config: which parts are measured, which
    are not, and what a change of it does."""
    shown = f"sha256:{mpc_image_digest}" if mpc_image_digest else PENDING
    selection = ("mpc_hash_override (it must be in the approved-hashes file the node writes from the contract, "
                 "else the launcher stops)" if rust.mpc_hash_override else
                 "DEFAULT_IMAGE_DIGEST until the node writes the contract's approved hashes, then the newest of them")
    return {
        "format": "toml",
        "source": fc.NEAR_RUST_SOURCE,
        "measured": ["compose: launcher image digest, DEFAULT_IMAGE_DIGEST, PLATFORM, DOCKER_CONTENT_TRUST",
                     "RTMR3 mpc-image-digest: the digest the launcher selects and pulls"],
        "unmeasured": ["launcher_config: " + ", ".join(rust.document()["launcher_config"]), "mpc_node_config"],
        "mpcImageDigest": shown,
        "selectedBy": selection,
        "restart": f"restart the CVM: the launcher rereads it; RTMR3 mpc-image-digest becomes {shown}",
    }


def plan_apps(config: StackConfig, lock: LockFile, root: Path, registry_path: str, *,
              registries: fleet_pulls.Registries | None = None) -> list[AppPlan]:
    """Every app of the stack. ``registries`` (the bootstrap's, as the env stack derives them) decides
    the pull paths; without it references stay as written and no pull path is planned."""
    containers = resolve_containers(config, lock, root, registry_path, registries.public if registries else None)
    return [plan_app(app, config.stack, containers, root, registries) for app in config.fleet.apps]


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
        if app.near_mpc:
            out += _near_problems(config, app, at)
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
        target = {"gce": app.nodes, "vmm": app.vmm, "phala": app.phala}[app.target]
        if target is None:
            p(f"{at}.{'nodes' if app.target == 'gce' else app.target}", f"is required for target {app.target}")
        if app.target == "gce" and app.nodes:
            group = groups.get(app.nodes)
            if group is None or group.kind != "dstack":
                p(f"{at}.nodes", f"{app.nodes!r} is not a node group of kind dstack")
        if app.target == "phala" and app.key_provider == "local":
            p(f"{at}.keyProvider", "Phala Cloud apps use its KMS (kms) or none")
        if app.phala:
            if app.phala.kms != "phala":
                p(f"{at}.phala.kms", "on-chain KMS deployments (ethereum, base) need a deployer key and RPC; use kms: "
                  "phala")
            if app.kms and app.kms.app_id:
                p(f"{at}.kms.appId", "Phala Cloud assigns the app id; a pinned app id is not supported there")
            built = [k for k in app_container_keys(app) if k in fleet.containers and fleet.containers[k].external is None]
            if built and not app.phala.public_images:
                p(f"{at}.phala.publicImages", f"Phala Cloud pulls anonymously and cannot read the private registry the "
                  f"images stack pushes {', '.join(sorted(set(built)))} to; set phala.publicImages: true to publish "
                  "them to the public-read repository (anyone can pull them), or use external images")
            if not 5 <= len(app_name(app, config.stack)) <= 63:
                p(f"{at}.name", f"the Phala CVM name {app_name(app, config.stack)!r} must be 5-63 characters")
            for key, message in phala_cli.unsupported_settings(app.settings):
                p(f"{at}.settings.{key}", message)
    for key, source in sorted(fleet.containers.items()):
        problem = repository_problem(source.external.image) if source.external else None
        if problem:
            p(f"containers.{key}.external.image", problem)
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


def _app_guest_version(config: StackConfig, app: AppConfig) -> str:
    """The dstack release the app's guest runs: its node group's OS image on gce, else dstackVersion."""
    if app.target == "gce" and app.nodes:
        group = next((g for g in config.fleet.nodes if g.name == app.nodes), None)
        source = config.fleet.images.get(group.image) if group else None
        if source is not None and source.build is not None and source.build.recipe == "dstack-os":
            return source.build.version
    return app.dstack_version


def _near_problems(config: StackConfig, app: AppConfig, at: str) -> list[Problem]:
    near, fleet = app.near_mpc, config.fleet
    out: list[Problem] = []

    def p(path: str, message: str) -> None:
        out.append(Problem(config.source, f"dstack-fleet:{at}.nearMpc{path}", message))

    version = _app_guest_version(config, app)
    problem = measure.emit_event_problem(version)
    if problem:
        p("", problem)
    rust_fields = near.launcher_config != type(near.launcher_config)() or near.node_config
    if near.launcher == "rust" and near.user_config:
        p(".userConfig", "the rust launcher reads TOML ([launcher_config], [mpc_node_config]), not KEY=value lines; "
                         "use nearMpc.launcherConfig and nearMpc.nodeConfig")
    if near.launcher == "python" and rust_fields:
        p("", "launcherConfig and nodeConfig are the rust launcher's TOML user config; the python launcher reads "
              "userConfig (KEY=value)")
    if near.launcher != "rust":
        return out
    override = near.launcher_config.hash_override
    if override is not None:
        source = fleet.containers.get(override)
        if source is None:
            p(".launcherConfig.hashOverride", f"container {override!r} is not declared in dstack-fleet:containers")
        elif source.external is None or source.external.digest_kind != "manifest":
            p(".launcherConfig.hashOverride", f"container {override!r} must be an external image with a manifest "
                                              "digest: the rust launcher pulls and compares manifest digests")
        else:
            mpc = fleet.containers.get(near.mpc_image)
            reference = near.launcher_config.image_reference or (mpc.external.image if mpc and mpc.external else None)
            name = reference.split("@")[0] if reference else None
            if name and ":" in name.rsplit("/", 1)[-1]:
                name = name.rsplit(":", 1)[0]
            if name and name != source.external.image:
                p(".launcherConfig.hashOverride", f"container {override!r} is in {source.external.image}, but the "
                                                  f"launcher pulls from {name}; the pull by digest would fail")
    rust = fc.NearRustUserConfig(
        image_reference=near.launcher_config.image_reference or "placeholder", mpc_node_config=dict(near.node_config),
        port_mappings=tuple((m.host, m.container) for m in near.launcher_config.port_mappings))
    for path, message in rust.problems():
        if path.startswith("mpc_node_config."):
            p(f".nodeConfig.{path.removeprefix('mpc_node_config.')}", message)
        else:
            p(f".launcherConfig.{_camel(path.removeprefix('launcher_config.'))}", message)
    return out


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def gce_os_image_hash(node, os_version: str | None) -> str | None:
    """``vm_config.os_image_hash`` of a GCE dstack node: the UKI Authenticode hash the lock records
    for its image (see ``measure.vm_config_os_image_hash``); None while the image is pending or when
    the lock has no UKI hash."""
    if node.image.pending:
        return None
    release = measure.guest_release(os_version) if os_version else None
    return measure.vm_config_os_image_hash(release, target="gce", digest_txt=node.image.hashes.get("osImageHash"),
                                           uki_hash=node.image.hashes.get("ukiHash"))


def gce_node_files(apps: list[AppPlan], node, stack: str, os_version: str | None = None) -> dict[str, bytes] | None:
    """The configuration-disk files of a dstack node: its group's app, this node's seed. None while
    the app's images are pending. ``os_version``: the dstack release of the node's image."""

    app = next(a for a in apps if a.target == "gce" and a.config.nodes == node.identity.group)
    if app.app_compose is None:
        return None
    memory = tdx.memory_gib(node.machine_type)
    os_image_hash = gce_os_image_hash(node, os_version)
    return configdisk.node_files(
        app_compose=app.app_compose.data, kms_urls=list(app.config.kms.urls) if app.config.kms else [],
        gateway_urls=list(app.config.gateway_urls), app_id=app.pinned_app_id,
        seed=configdisk.instance_seed(stack, node.key), os_image_hash=os_image_hash,
        cpu_count=tdx.vcpus(node.machine_type), memory_bytes=memory * 1024 ** 3 if memory else None,
        user_config=app.user_config)


def registry_check(reported: str, expected: str, reference: str) -> str:
    """The registry's answer for ``reference`` must be the pinned digest (a deploy-time check)."""
    if reported != expected:
        raise ValueError(f"the registry reports {reported or 'no image'} for {reference}, not the pinned {expected}; "
                         "the config names an image that does not exist there")
    return reported
