"""dstack-fleet: one Pulumi program, three stack roles (bootstrap, images, env).

Read this file as the table of contents: the core (``fleet``) decides names, addresses, bytes and
measurements; each component under ``components/`` turns one of those decisions into resources.
"""

import json
from pathlib import Path

import pulumi
import pulumi_command as command
import pulumi_docker as docker

from components import adopt
from components.apptargets import create_app_target
from components.bootstrap.buckets import Buckets
from components.buildhost import BuildHost
from components.registryimage import RegistryImage
from components.bootstrap.federation import GithubFederation
from components.bootstrap.identities import Identities
from components.bootstrap.kms import SecretsKeys
from components.bootstrap.registry import Registry
from components.bootstrap.services import ProjectServices
from components.images import GcpImage
from components.network import Network
from components.snapshots import SnapshotSchedule
from components.dstacknode import DataDiskImage, DstackNode
from components.tdxnode import PENDING_IMAGE, OverlayNode
from components.stackconfig import load_lock, load_stack_config
from fleet import apps as fleet_apps
from fleet import bootstrap as fleet_bootstrap
from fleet import builds as fleet_builds
from fleet import images as fleet_images
from fleet import nodes as fleet_nodes
from fleet.configdisk import Upload
from fleet.expectations import os_versions, plan_measurements, verify_script
from fleet.naming import Namer
from fleet.offline import is_real_update
from fleet.network import network_spec, public_ingress

ROOT = Path(__file__).resolve().parent
config = load_stack_config(ROOT)
namer = Namer(prefix=config.fleet.name_prefix, stack=config.stack, project=config.gcp.project)


def env() -> None:
    lock = load_lock(ROOT)
    names = fleet_bootstrap.names_for(config)
    versions = fleet_images.resolve_for_stack(config, lock, namer)
    fleet = fleet_nodes.plan_fleet(config, namer, versions)
    apps = fleet_apps.plan_apps(config, lock, ROOT, names.registry_path)
    network = Network("network", network_spec(config, namer, public_ingress(config, namer) + fleet.ingress),
                      config.gcp.project)

    pending = fleet_images.pending_in_use(config, lock, namer, versions)
    for key in pending:
        pulumi.log.warn(f"image {key!r} is pending build (input hash {versions[key].content_hash}); "
                        "build it with `make up STACK=images` and record it with `make lock`")
    if pending and config.fleet.tier in ("staging", "prod") and is_real_update():
        raise pulumi.RunError(f"{config.stack} refuses pending images {', '.join(pending)}: staging and prod run "
                              "only what was built and recorded in images.lock.json")
    for key in fleet_images.unused_versions(config):
        pulumi.log.warn(f"image version {key!r} is declared but no node uses it; remove it from "
                        "dstack-fleet:images to delete it")
    gcp_images: dict[str, GcpImage] = {}
    for version in versions.values():
        if version.creates_image and version.logical_name not in gcp_images:
            gcp_images[version.logical_name] = GcpImage(version, config.gcp.project)

    schedules = {
        region: SnapshotSchedule(region, namer.name(region, "snapshots"), config.gcp.project, namer.labels())
        for region in sorted({n.snapshot_policy for n in fleet.nodes if n.snapshot_policy})
    }
    upload = Upload(bucket=names.image_bucket, prefix=f"config-disks/{config.stack}")
    data_image = None
    if any(n.identity.kind == "dstack" for n in fleet.nodes):
        data_image = DataDiskImage(upload=upload, project=config.gcp.project, namer=namer, labels=namer.labels())
    deployed: dict[str, list[pulumi.Resource]] = {}  # what each app runs on, for the post-deploy check
    for spec in fleet.nodes:
        if spec.image.pending and is_real_update():
            pulumi.log.warn(f"node {spec.key} waits for image {spec.image_key!r} (pending build); skipped")
            continue
        if spec.image.creates_image:
            boot_image = gcp_images[spec.image.logical_name].self_link
        else:
            boot_image = spec.image.existing_self_link or f"{PENDING_IMAGE}: {spec.image_key} ({spec.image.content_hash})"
        common = dict(project=config.gcp.project, subnetwork=network.subnets[spec.identity.region],
                      boot_image=boot_image,
                      snapshot_policy=schedules[spec.snapshot_policy].policy if spec.snapshot_policy else None)
        if spec.identity.kind == "overlay":
            OverlayNode(spec, **common)
            continue
        files = fleet_apps.gce_node_files(apps, spec, config.stack)
        if files is None:
            pulumi.log.warn(f"dstack node {spec.key} waits for its app's images (pending build); skipped")
            continue
        deployed.setdefault(spec.identity.group, []).append(
            DstackNode(spec, files=files, upload=upload, namer=namer, data_image=data_image.image, **common))
    for app in apps:
        if app.pending:
            pulumi.log.warn(f"app {app.name} waits for container images {', '.join(app.pending)} (pending build)")
    targets = {app.name: create_app_target(app, config=config) for app in apps}
    for name, target in targets.items():
        if target is not None:
            deployed.setdefault(f"app:{name}", []).append(target)
    for key, source in sorted(config.fleet.containers.items()):
        ext = source.external
        if ext is not None and ext.check_at_deploy:
            reference = f"{ext.image}@{ext.digest}"
            docker.get_registry_image_output(name=reference).sha256_digest.apply(
                lambda reported, e=ext.digest, r=reference: fleet_apps.registry_check(reported, e, r))
    measurements = plan_measurements(fleet, apps, os_versions(config))
    for app in apps:
        if app.config.verify is not None and not app.pending:
            target = f"app:{app.name}"
            command.local.Command(
                f"verify-{app.key}",
                create=verify_script(target, app.config.verify.info_url, app.config.verify.quote_url),
                stdin=json.dumps({"measurements": {target: measurements[target]}}, sort_keys=True),
                triggers=[json.dumps(measurements[target], sort_keys=True)],
                interpreter=["/bin/bash", "-c"],
                opts=pulumi.ResourceOptions(depends_on=deployed.get(app.config.nodes or f"app:{app.name}", [])))

    pulumi.export("network", network.network.self_link)
    pulumi.export("subnets", network.summary)
    pulumi.export("images", {key: version.summary() for key, version in versions.items()})
    pulumi.export("nodes", {spec.key: spec.summary() for spec in fleet.nodes})
    pulumi.export("apps", {app.name: app.summary() for app in apps})
    pulumi.export("appTargets", {name: target.outputs for name, target in targets.items() if target is not None})
    pulumi.export("measurements", measurements)
    if fleet.overlay is not None and fleet.overlay.delivery == "metadata":
        pulumi.log.warn("overlay peer delivery 'metadata' is UNSAFE: peers come from host-controlled, unmeasured "
                        "instance metadata and the overlay does not check peer measurements; use 'baked' for "
                        "anything that matters (prod refuses metadata)")
    if fleet.overlay is not None:
        pulumi.export("overlay", {"topology": fleet.overlay.topology, "delivery": fleet.overlay.delivery,
                                  "interface": fleet.overlay.interface, "genesis": fleet.overlay.genesis,
                                  "port": fleet.overlay.port, "unsafe": fleet.overlay.delivery == "metadata"})


def images() -> None:
    lock = load_lock(ROOT)
    names = fleet_bootstrap.names_for(config)
    network = Network("network", network_spec(config, namer, []), config.gcp.project)
    builds = fleet_builds.plan_builds(config, ROOT, lock, names, namer)
    hosts = [BuildHost(plan, project=config.gcp.project, subnetwork=network.subnets[config.gcp.region].self_link,
                       service_account=builds.builder_account)
             for plan in builds.hosts]
    containers = [RegistryImage(c.key, c.build, input_hash=c.input_hash, repository=c.repository)
                  for c in builds.containers]
    pulumi.export("network", network.network.self_link)
    pulumi.export("builds", builds.summary())
    pulumi.export("lockEntries", {"images": {h.input_hash: h.lock_entry for h in hosts},
                                  "containers": {c.input_hash: image.lock_entry
                                                 for c, image in zip(builds.containers, containers)}})


def bootstrap() -> None:
    plan = fleet_bootstrap.plan_bootstrap(config)
    names = plan.names
    labels = namer.labels()
    services = ProjectServices(plan.services)
    after_services = pulumi.ResourceOptions(depends_on=[services])
    buckets = Buckets(state_name=names.state_bucket, images_name=names.image_bucket, project=config.gcp.project,
                      location=config.gcp.region, labels=labels, opts=after_services)
    keys = SecretsKeys(ring_name=names.key_ring, keys=plan.keys, project=config.gcp.project,
                       location=config.gcp.region, labels=labels, opts=after_services)
    registry = Registry(repository_id=names.registry_id, mirror_id=names.mirror_id, project=config.gcp.project,
                        location=config.gcp.region,
                        keep_digests=[c.digest for c in load_lock(ROOT).containers.values()],
                        keep_recent=config.fleet.registry.keep_recent,
                        untagged_days=config.fleet.registry.cleanup_untagged_after_days, labels=labels,
                        opts=after_services)
    identities = Identities(
        accounts=plan.accounts, bindings=plan.bindings,
        buckets={names.state_bucket: buckets.state, names.image_bucket: buckets.images},
        keys=keys.keys, key_names=plan.keys,
        repositories={names.registry_id: registry.repository, names.mirror_id: registry.mirror},
        location=config.gcp.region, project=config.gcp.project, opts=after_services)
    federation = GithubFederation(
        project=config.gcp.project, pool_id=names.pool_id, provider_id=names.provider_id,
        attribute_mapping=plan.attribute_mapping, attribute_condition=plan.attribute_condition,
        impersonation=[(identities.accounts[key], attribute, value)
                       for key, attribute, value in fleet_bootstrap.impersonation(plan, config.fleet.github)],
        opts=after_services)

    pulumi.export("backendUrl", names.backend_url)
    pulumi.export("secretsProviders", {stack: names.secrets_provider(stack) for stack in plan.keys})
    pulumi.export("workloadIdentityProvider", federation.provider.name)
    pulumi.export("serviceAccounts", {a.key: a.email for a in plan.accounts})
    pulumi.export("registry", names.registry_path)
    pulumi.export("dockerHubMirror", names.mirror_path)
    pulumi.export("imageBucket", f"gs://{names.image_bucket}")


adopt.configure(config.fleet.adopt)
{"env": env, "images": images, "bootstrap": bootstrap}[config.fleet.role]()
if adopt.unused():
    raise pulumi.RunError("dstack-fleet:adopt names no resource of this stack: " + ", ".join(adopt.unused())
                          + "; use the logical names shown by `make plan`")
