"""``python -m fleet toolchain NAME...``: refuse a tool whose version is not the one this code pins.

The workflows install mkosi, skopeo and the ``phala`` CLI at pinned versions and run this right
after, so a runner image or package update that slips another version in fails the job before
anything is built or deployed. The pins live next to the code that drives each tool:
``fleet.images.mkosibuild`` (mkosi, skopeo) and ``fleet.apps.phala`` (phala).

``registry-host --stack S`` prints the Artifact Registry host of the stack's bootstrap registry
(``<region>-docker.pkg.dev``), which the workflows log in to with a federated access token.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from fleet.apps import phala
from fleet.images import mkosibuild


@dataclass(frozen=True)
class Pin:
    argv: tuple[str, ...]
    pattern: str  # what the first line of the version output must match, entirely
    wanted: str
    install: str


PINS = {
    "mkosi": Pin(("mkosi", "--version"), re.escape(f"mkosi {mkosibuild.MKOSI_VERSION}"),
                 f"mkosi {mkosibuild.MKOSI_VERSION}", mkosibuild.MKOSI_INSTALL),
    "skopeo": Pin(("skopeo", "--version"), re.escape(f"skopeo version {mkosibuild.SKOPEO_VERSION}") + r"( .*)?",
                  f"skopeo {mkosibuild.SKOPEO_VERSION}",
                  f"apt-get install skopeo={mkosibuild.SKOPEO_APT_VERSION} (Ubuntu 24.04)"),
    "phala": Pin(("phala", "--version"), re.escape(f"v{phala.CLI_VERSION}") + r"(\+[0-9a-f]+)?",
                 f"phala {phala.CLI_VERSION}", "npm ci --prefix tools/phala (see tools/phala/README.md)"),
}


def check(name: str) -> str | None:
    """None when the installed tool is the pinned version; otherwise one line saying what to do."""
    pin = PINS[name]
    if shutil.which(pin.argv[0]) is None:
        return f"{name} is not installed; this project pins {pin.wanted}: {pin.install}"
    result = subprocess.run(list(pin.argv), capture_output=True, text=True, check=False)
    first = ((result.stdout or result.stderr).strip().splitlines() or [""])[0].strip()
    if result.returncode != 0 or not re.fullmatch(pin.pattern, first):
        return f"{name} reports {first!r}, but this project pins {pin.wanted}: {pin.install}"
    return None


def registry_host(root: Path, stack: str) -> str:
    from fleet.project import bootstrap
    from fleet.stacks.load import load_config

    _, config = load_config(root, stack)
    return bootstrap.names_for(config).registry_path.split("/", 1)[0]
