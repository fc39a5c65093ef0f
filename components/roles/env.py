"""An env stack (dev, staging, prod): network, image versions, nodes, apps, measurements."""

from __future__ import annotations

import json
from pathlib import Path

import pulumi
import pulumi_command as command

from components.apptargets import create_app_target
from components.dstacknode import DataDiskImage, DstackNode
from components.images import GcpImage
from components.network import Network
from components.overlaytable import OverlayTable
from components.snapshots import SnapshotSchedule
from components.stackconfig import load_lock
from components.tdxnode import PENDING_IMAGE, OverlayNode
from fleet.apps import plans as fleet_apps
from fleet.project import bootstrap as fleet_bootstrap
from fleet.nodes import boot_images
from fleet.nodes import specs as fleet_nodes
from fleet.apps.plans import AppPlan
from fleet.config.schema import StackConfig
from fleet.apps.configdisk import Upload
from fleet.stacks import gc as fleet_gc
from fleet.stacks import wiring
from fleet.stacks.expectations import image_storage_fs, os_versions, plan_measurements, verify_script
from fleet.images.versions import ImageVersion
from fleet.gcp.naming import Namer
from fleet.nodes.network import network_spec, public_ingress
from fleet.plan.offline import is_offline_plan, is_real_update
from fleet.stacks import readiness


def build(config: StackConfig, namer: Namer, root: Path) -> None:
    lock = load_lock(root)
    names = fleet_bootstrap.names_for(config)
    versions = boot_images.resolve_for_stack(config, lock, namer)
    fleet = fleet_nodes.plan_fleet(config, namer, versions)
    apps = fleet_apps.plan_apps(config, lock, root, names.registry_path, registries=wiring.registries(names))
    upload = wiring.config_disk_upload(names, config.stack)

    guard_secrets(config)
    network = Network("network", network_spec(config, namer, public_ingress(config, namer) + fleet.ingress),
                      config.gcp.project)
    guard_pending_images(config, namer, lock, versions)
    guard_waiting_nodes(config, apps)
    images = image_versions(config, versions)
    deployed = deploy_nodes(config, namer, fleet, apps, images, network, upload)
    targets = deploy_app_targets(config, apps, deployed)
    check_external_images(config)
    measurements = plan_measurements(fleet, apps, os_versions(config), image_storage_fs(config))
    post_deploy_checks(apps, measurements, deployed)

    pulumi.export("network", network.network.self_link)
    pulumi.export("subnets", network.summary)
    pulumi.export("images", {key: version.summary() for key, version in versions.items()})
    pulumi.export("nodes", {spec.key: spec.summary() for spec in fleet.nodes})
    pulumi.export("apps", {app.name: app.summary() for app in apps})
    pulumi.export("pulls", pull_paths(apps, fleet))
    # what `make gc` keeps of this stack (everything else it finds is marked, then deleted after the retention)
    pulumi.export("gc", fleet_gc.env_keeps(versions, fleet, apps, config.stack, namer, upload).summary(
        config.fleet.gc.retention_days))
    pulumi.export("appTargets", {name: target.outputs for name, target in targets.items()})
    pulumi.export("measurements", measurements)
    export_overlay(fleet)


def guard_secrets(config: StackConfig) -> None:
    """A secret an app needs must be set before a real preview or update; the offline plan shows it as
    ``[secret: not set]`` and says how to set it."""
    missing = readiness.preview_refusals(config)
    if missing and not is_offline_plan():
        raise pulumi.RunError(f"{config.stack} refuses to deploy:\n" + "\n".join(missing))
    for line in missing:
        pulumi.log.warn(line)


def guard_pending_images(config: StackConfig, namer: Namer, lock, versions: dict[str, ImageVersion]) -> None:
    """A real update refuses while a node's image is pending, in every tier: it cannot create the node,
    and leaving the node out would delete it if it is deployed (the program cannot see state)."""
    pending = readiness.pending_images(config, lock, namer, versions)
    for image in pending:
        pulumi.log.warn(f"image {image.key!r} is pending build (input hash {image.content_hash}); "
                        "build it with `make up STACK=images` and record it with `make lock`")
    if pending and is_real_update():
        raise pulumi.RunError(f"{config.stack} refuses pending images {', '.join(i.key for i in pending)}:\n"
                              + "\n".join(i.line() for i in pending))
    for key in boot_images.unused_versions(config):
        pulumi.log.warn(f"image version {key!r} is declared but no node uses it; remove it from "
                        "dstack-fleet:images to delete it")


def guard_waiting_nodes(config: StackConfig, apps: list[AppPlan]) -> None:
    """A dstack node whose app's containers are pending has no configuration disk yet: preview and the
    offline plan leave it out (with a warning below), a real update refuses (it would delete a deployed one)."""
    waiting = readiness.waiting_nodes(config, apps)
    if waiting and is_real_update():
        raise pulumi.RunError(f"{config.stack} refuses nodes that wait for container builds:\n" + "\n".join(waiting))


def image_versions(config: StackConfig, versions: dict[str, ImageVersion]) -> dict[str, GcpImage]:
    """One GCP image per content version (two keys with the same bytes share it)."""
    images: dict[str, GcpImage] = {}
    for version in versions.values():
        if version.creates_image and version.logical_name not in images:
            images[version.logical_name] = GcpImage(version, config.gcp.project)
    return images


def deploy_nodes(config: StackConfig, namer: Namer, fleet, apps: list[AppPlan], images: dict[str, GcpImage],
                 network: Network, upload: Upload) -> dict[str, list[pulumi.Resource]]:
    """Every node; returns what each node group runs on (for the post-deploy checks)."""
    schedules = {
        region: SnapshotSchedule(region, fleet_nodes.snapshot_policy_name(namer, region), config.gcp.project,
                                 namer.labels())
        for region in sorted({n.snapshot_policy for n in fleet.nodes if n.snapshot_policy})
    }
    data_image = None
    if any(n.identity.kind == "dstack" for n in fleet.nodes):
        data_image = DataDiskImage(upload=upload, project=config.gcp.project, namer=namer, labels=namer.labels())
    deployed: dict[str, list[pulumi.Resource]] = {}
    table = overlay_table(fleet)
    for spec in genesis_first(fleet):
        # a pending image never drops a node: a real update refused above (guard_pending_images)
        if spec.image.creates_image:
            boot_image = images[spec.image.logical_name].self_link
        else:
            boot_image = spec.image.existing_self_link or f"{PENDING_IMAGE}: {spec.image_key} ({spec.image.content_hash})"
        common = dict(project=config.gcp.project, subnetwork=network.subnets[spec.identity.region],
                      boot_image=boot_image,
                      snapshot_policy=schedules[spec.snapshot_policy].policy if spec.snapshot_policy else None)
        if spec.identity.kind == "overlay":
            OverlayNode(spec, table=table, **common)
            continue
        os_version = os_versions(config).get(spec.image_key)
        files = fleet_apps.gce_node_files(apps, spec, config.stack, os_version)
        if not spec.image.pending and fleet_apps.gce_os_image_hash(spec, os_version) is None:
            pulumi.log.warn(f"dstack node {spec.key}: image {spec.image_key!r} has no UKI Authenticode hash "
                            "(uki_hash) in images.lock.json, so its vm_config carries no os_image_hash and a KMS "
                            "that verifies images refuses its keys")
        if files is None:
            pulumi.log.warn(f"dstack node {spec.key} waits for its app's images (pending build); skipped")
            continue
        deployed.setdefault(spec.identity.group, []).append(
            DstackNode(spec, files=files, upload=upload, namer=namer, data_image=data_image.image,
                       nat=network.nats[spec.identity.region], **common))
    return deployed


def genesis_first(fleet) -> list:
    """The nodes in construction order: the overlay's genesis node first, since the table's signing
    step follows its data disk and every other member's metadata comes from that step. (Order of
    construction is not part of any URN.)"""
    genesis = fleet.overlay.genesis if fleet.overlay is not None else None
    return sorted(fleet.nodes, key=lambda spec: spec.key != genesis)


def overlay_table(fleet):
    """The members' metadata callback: the first overlay node built (the genesis node, unless it
    waits for its image) creates the signing step. A genesis node that waits for its image while
    others are created makes its disk appear later, which updates the step: founding closes, and the
    overlay is then founded only by replacing the step (`pulumi up --replace <its URN>`)."""
    made: list[OverlayTable] = []

    def metadata(node) -> dict:
        if not made:
            genesis = node.data_disk.id if node.spec_key == fleet.overlay.genesis else None
            made.append(OverlayTable(table_body=fleet.table_body, key_version=fleet.table_key_version,
                                     genesis_disk=genesis))
        return made[0].metadata

    return metadata


def deploy_app_targets(config: StackConfig, apps: list[AppPlan],
                       deployed: dict[str, list[pulumi.Resource]]) -> dict[str, pulumi.ComponentResource]:
    """Apps on a dstack VMM host or on Phala Cloud (gce apps run on their dstack nodes)."""
    targets = {}
    for app in apps:
        if app.pending:
            pulumi.log.warn(f"app {app.name} waits for container images {', '.join(app.pending)} (pending build)")
        target = create_app_target(app, config=config)
        if target is not None:
            targets[app.name] = target
            deployed.setdefault(f"app:{app.name}", []).append(target)
    return targets


# A registry look-up needs no Docker daemon, but pulumi-docker's default provider checks for one when it is
# configured, so a deploying machine (CI) without Docker fails. pulumi-docker 5.2.0 provider.py,
# disable_docker_daemon_check: "the provider will not check if the Docker daemon is running. This is useful
# for resources/data_sourcess that do not require a running Docker daemon, such as the data source
# RegistryImage". ``host`` is set so the provider's inputs never depend on the machine's DOCKER_HOST
# (the SDK reads it when unset); nothing connects to it with the check off.
REGISTRY_LOOKUP_PROVIDER = "registry-lookup"
DOCKER_HOST_UNUSED = "unix:///var/run/docker.sock"


def check_external_images(config: StackConfig) -> None:
    """Ask the registry for each external image marked checkAtDeploy; a missing digest stops the deploy."""
    checks = [(key, source.external) for key, source in sorted(config.fleet.containers.items())
              if source.external is not None and source.external.check_at_deploy]
    if not checks:
        return
    import pulumi_docker as docker  # only stacks that check external images load the Docker SDK

    provider = docker.Provider(REGISTRY_LOOKUP_PROVIDER, disable_docker_daemon_check=True, host=DOCKER_HOST_UNUSED)
    for _, ext in checks:
        reference = f"{ext.image}@{ext.digest}"
        docker.get_registry_image_output(name=reference, opts=pulumi.InvokeOutputOptions(provider=provider)) \
            .sha256_digest.apply(lambda reported, e=ext.digest, r=reference: fleet_apps.registry_check(reported, e, r))


def post_deploy_checks(apps: list[AppPlan], measurements: dict, deployed: dict[str, list[pulumi.Resource]]) -> None:
    """For apps with `verify` set: after they are deployed, check their attestation against the plan."""
    for app in apps:
        if app.config.verify is None or app.pending:
            continue
        target = f"app:{app.name}"
        command.local.Command(
            f"verify-{app.key}",
            create=verify_script(target, app.config.verify.info_url, app.config.verify.quote_url),
            stdin=json.dumps({"measurements": {target: measurements[target]}}, sort_keys=True),
            triggers=[json.dumps(measurements[target], sort_keys=True)],
            interpreter=["/bin/bash", "-c"],
            opts=pulumi.ResourceOptions(depends_on=deployed.get(app.config.nodes or target, [])))


def pull_paths(apps: list[AppPlan], fleet) -> dict[str, dict]:
    """Where each node and app pulls every image from, and how it authenticates (fleet/apps/pulls.py)."""
    out = {}
    for app in apps:
        nodes = [n.key for n in fleet.nodes if app.target == "gce" and n.identity.group == app.config.nodes]
        out[f"app:{app.name}"] = {"target": app.target, "nodes": nodes,
                                  "images": {p.where: p.summary() for p in app.pulls}}
    return out


def export_overlay(fleet) -> None:
    overlay = fleet.overlay
    if overlay is None:
        return
    if overlay.delivery_notice:
        pulumi.log.warn(overlay.delivery_notice)
    pulumi.export("overlay", fleet_nodes.overlay_summary(fleet))
