"""The images stack: build hosts for image builds not yet collected, container builds, outputs for the lock."""

from __future__ import annotations

from pathlib import Path

import pulumi

from components.buildhost import BuildHost
from components.network import Network
from components.registryimage import container_image
from components.stackconfig import load_lock
from fleet.project import bootstrap as fleet_bootstrap
from fleet.stacks import builds as fleet_builds
from fleet.stacks import gc as fleet_gc
from fleet.config.schema import StackConfig
from fleet.gcp.naming import Namer
from fleet.nodes.network import network_spec


def build(config: StackConfig, namer: Namer, root: Path) -> None:
    lock = load_lock(root)
    names = fleet_bootstrap.names_for(config)
    network = Network("network", network_spec(config, namer, []), config.gcp.project)
    builds = fleet_builds.plan_builds(config, root, lock, names, namer)
    hosts = [BuildHost(plan, project=config.gcp.project, subnetwork=network.subnets[config.gcp.region].self_link,
                       service_account=builds.builder_account)
             for plan in builds.hosts]
    containers = [container_image(c) for c in builds.containers]

    pulumi.export("network", network.network.self_link)
    pulumi.export("builds", builds.summary())
    # image builds outlive `pulumi up`: `python -m fleet collect` reads their outputs from the bucket
    pulumi.export("lockEntries", {"containers": {c.input_hash: image.lock_entry
                                                 for c, image in zip(builds.containers, containers)}})
    # what `make gc STACK=images` keeps in the image bucket; anything else of ours is marked, then deleted
    pulumi.export("gc", fleet_gc.keeps_for_images(config, root, lock, [h.input_hash for h in builds.hosts]).summary(
        config.fleet.gc.retention_days))
    pulumi.export("buildHosts", {h.input_hash: {"instance": h.instance.name, "recipe": plan.recipe,
                                                "artifacts": plan.artifact_prefix}
                                 for h, plan in zip(hosts, builds.hosts)})
