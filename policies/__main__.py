"""The dstack-fleet CrossGuard policy pack.

The Pulumi CLI runs this file (``python -m pulumi.policy <engine address> __main__.py``) in the
virtualenv it creates from ``requirements.txt``. The rules are not here: they are ``fleet.rules``
of this checkout, the same functions the offline plan runs, so the repository root goes on the
import path first. ``PolicyPack`` starts the analyzer's gRPC server, prints its port and serves
until the engine stops it.
"""

import os
import sys
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parent.parent
if str(REPOSITORY) not in sys.path:
    sys.path.insert(0, str(REPOSITORY))

from pulumi_policy import EnforcementLevel, PolicyPack  # noqa: E402

from fleet.policy.rules import PACK_NAME, crossguard_policies, pack_enforcement  # noqa: E402

PolicyPack(
    name=PACK_NAME,
    # `make preview` / `make up` and the workflows pass the stack's --policy-pack-config. Without it the
    # pack reads the tier from the stack's configuration, which the CLI hands it in PULUMI_CONFIG (dev:
    # advisory, every other tier: mandatory), and a rule that needs the tier refuses when even that is
    # missing: the pack never guesses prod (fleet/policy/rules.py context_from_policy_config).
    enforcement_level=EnforcementLevel(pack_enforcement(os.environ)),
    policies=crossguard_policies(),
    description="dstack-fleet rules (fleet/policy/rules.py), shared with the offline plan",
)
