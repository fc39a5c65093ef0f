"""dstack-fleet: one Pulumi program, three stack roles (bootstrap, images, env).

Read this file as the table of contents: the core (``fleet``) decides names, addresses, bytes and
measurements; each component under ``components/`` turns one of those decisions into resources.
"""

from pathlib import Path

import pulumi

from components.images import GcpImage
from components.network import Network
from components.stackconfig import load_lock, load_stack_config
from fleet import images as fleet_images
from fleet.naming import Namer
from fleet.offline import is_real_update
from fleet.network import network_spec, public_ingress

ROOT = Path(__file__).resolve().parent
config = load_stack_config()
namer = Namer(prefix=config.fleet.name_prefix, stack=config.stack, project=config.gcp.project)


def env() -> None:
    lock = load_lock(ROOT)
    network = Network("network", network_spec(config, namer, public_ingress(config, namer)), config.gcp.project)

    versions = fleet_images.resolve(config, lock, namer)
    pending = fleet_images.pending_in_use(config, lock, namer)
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

    pulumi.export("network", network.network.self_link)
    pulumi.export("subnets", network.summary)
    pulumi.export("images", {key: version.summary() for key, version in versions.items()})


def images() -> None:
    network = Network("network", network_spec(config, namer, []), config.gcp.project)
    pulumi.export("network", network.network.self_link)


def bootstrap() -> None:
    pulumi.export("project", config.gcp.project)


{"env": env, "images": images, "bootstrap": bootstrap}[config.fleet.role]()
