"""Old name of :mod:`fleet.policy.rules`, kept because policy packs and tools import ``fleet.rules``.

The module object is the same one, so patching or reading either name sees the same rules."""

import sys

from fleet.policy import rules as _rules

sys.modules[__name__] = _rules
