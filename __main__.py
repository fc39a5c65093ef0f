"""dstack-fleet: one Pulumi program, three stack roles (bootstrap, images, env).

The core (``fleet``) decides names, addresses, bytes and measurements; each component under
``components/`` turns one of those decisions into resources; ``components/roles`` lists, per role,
the steps of its stack in order:

* ``bootstrap``: APIs, state and image buckets, KMS keys, identities and grants, registry, CI federation;
* ``images``: build hosts for image builds the lock file lacks, container builds, ``lockEntries``;
* ``env``: network, image versions, overlay and dstack nodes, app targets, expected measurements.
"""

from pathlib import Path

from components import adopt
from components.roles import bootstrap, env, images
from components.stackconfig import ConfigRunError, load_stack_config
from fleet.config.problems import Problem
from fleet.gcp.naming import Namer

ROOT = Path(__file__).resolve().parent
config = load_stack_config(ROOT)
namer = Namer(prefix=config.fleet.name_prefix, stack=config.stack, project=config.gcp.project)

adopt.configure(config.fleet.adopt)
{"bootstrap": bootstrap.build, "images": images.build, "env": env.build}[config.fleet.role](config, namer, ROOT)
if adopt.unused():
    raise ConfigRunError("dstack-fleet:adopt names no resource of this stack: " + ", ".join(adopt.unused())
                         + "; use the logical names shown by `make plan`",
                         [Problem(config.source, f"dstack-fleet:adopt.{name}", "names no resource of this stack; use "
                                  "the logical names shown by `make plan`") for name in adopt.unused()])
