"""Old name of :mod:`fleet.images.ocilayout`: generated build steps, which are resource inputs of deployed
stacks, run ``python -m fleet.ocilayout``; changing that string would replace those steps, so it keeps working."""

import runpy
import sys

if __name__ == "__main__":
    runpy.run_module("fleet.images.ocilayout", run_name="__main__", alter_sys=True)
else:
    from fleet.images import ocilayout as _module

    sys.modules[__name__] = _module
