"""Old name of :mod:`fleet.images.mkosibuild`: generated build steps, which are resource inputs of deployed
stacks, run ``python -m fleet.mkosibuild``; changing that string would replace those steps, so it keeps working."""

import runpy
import sys

if __name__ == "__main__":
    runpy.run_module("fleet.images.mkosibuild", run_name="__main__", alter_sys=True)
else:
    from fleet.images import mkosibuild as _module

    sys.modules[__name__] = _module
