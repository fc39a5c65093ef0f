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
from fleet.stacks.expectations import os_versions, plan_measurements, verify_script
from fleet.images.versions import ImageVersion
from fleet.gcp.naming import Namer
from fleet.nodes.network import network_spec, public_ingress
from fleet.plan.offline import is_real_update


def build(config: StackConfig, namer: Namer, root: Path) -> None:
    lock = load_lock(root)
    names = fleet_bootstrap.names_for(config)
    versions = boot_images.resolve_for_stack(config, lock, namer)
    fleet = fleet_nodes.plan_fleet(config, namer, versions)
    apps = fleet_apps.plan_apps(config, lock, root, names.registry_path)

    network = Network("network", network_spec(config, namer, public_ingress(config, namer) + fleet.ingress),
                      config.gcp.project)
    guard_pending_images(config, namer, lock, versions)
    images = image_versions(config, versions)
    deployed = deploy_nodes(config, namer, fleet, apps, images, network, Upload(
        bucket=names.image_bucket, prefix=f"config-disks/{config.stack}"))
    targets = deploy_app_targets(config, apps, deployed)
    check_external_images(config)
    measurements = plan_measurements(fleet, apps, os_versions(config))
    post_deploy_checks(apps, measurements, deployed)

    pulumi.export("network", network.network.self_link)
    pulumi.export("subnets", network.summary)
    pulumi.export("images", {key: version.summary() for key, version in versions.items()})
    pulumi.export("nodes", {spec.key: spec.summary() for spec in fleet.nodes})
    pulumi.export("apps", {app.name: app.summary() for app in apps})
    pulumi.export("appTargets", {name: target.outputs for name, target in targets.items()})
    pulumi.export("measurements", measurements)
    export_overlay(fleet)


def guard_pending_images(config: StackConfig, namer: Namer, lock, versions: dict[str, ImageVersion]) -> None:
    pending = boot_images.pending_in_use(config, lock, namer, versions)
    for key in pending:
        pulumi.log.warn(f"image {key!r} is pending build (input hash {versions[key].content_hash}); "
                        "build it with `make up STACK=images` and record it with `make lock`")
    if pending and config.fleet.tier in ("staging", "prod") and is_real_update():
        raise pulumi.RunError(f"{config.stack} refuses pending images {', '.join(pending)}: staging and prod run "
                              "only what was built and recorded in images.lock.json")
    for key in boot_images.unused_versions(config):
        pulumi.log.warn(f"image version {key!r} is declared but no node uses it; remove it from "
                        "dstack-fleet:images to delete it")


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
        if spec.image.pending and is_real_update():
            pulumi.log.warn(f"node {spec.key} waits for image {spec.image_key!r} (pending build); skipped")
            continue
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
        files = fleet_apps.gce_node_files(apps, spec, config.stack)
        if files is None:
            pulumi.log.warn(f"dstack node {spec.key} waits for its app's images (pending build); skipped")
            continue
        deployed.setdefault(spec.identity.group, []).append(
            DstackNode(spec, files=files, upload=upload, namer=namer, data_image=data_image.image, **common))
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


def check_external_images(config: StackConfig) -> None:
    """Ask the registry for each external image marked checkAtDeploy; a missing digest stops the deploy."""
    import pulumi_docker as docker  # only stacks that check external images load the Docker SDK

    for key, source in sorted(config.fleet.containers.items()):
        ext = source.external
        if ext is not None and ext.check_at_deploy:
            reference = f"{ext.image}@{ext.digest}"
            docker.get_registry_image_output(name=reference).sha256_digest.apply(
                lambda reported, e=ext.digest, r=reference: fleet_apps.registry_check(reported, e, r))


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


def export_overlay(fleet) -> None:
    overlay = fleet.overlay
    if overlay is None:
        return
    if overlay.delivery_notice:
        pulumi.log.warn(overlay.delivery_notice)
    pulumi.export("overlay", fleet_nodes.overlay_summary(fleet))
