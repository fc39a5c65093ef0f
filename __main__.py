"""dstack-fleet: one Pulumi program, three stack roles (bootstrap, images, env).

Read this file as the table of contents: the core (``fleet``) decides names, addresses, bytes and
measurements; each component under ``components/`` turns one of those decisions into resources.
"""

import pulumi

from components.network import Network
from components.stackconfig import load_stack_config
from fleet.naming import Namer
from fleet.network import network_spec, public_ingress

config = load_stack_config()
namer = Namer(prefix=config.fleet.name_prefix, stack=config.stack, project=config.gcp.project)


def env() -> None:
    network = Network("network", network_spec(config, namer, public_ingress(config, namer)), config.gcp.project)
    pulumi.export("network", network.network.self_link)
    pulumi.export("subnets", network.summary)


def images() -> None:
    network = Network("network", network_spec(config, namer, []), config.gcp.project)
    pulumi.export("network", network.network.self_link)


def bootstrap() -> None:
    pulumi.export("project", config.gcp.project)


{"env": env, "images": images, "bootstrap": bootstrap}[config.fleet.role]()
