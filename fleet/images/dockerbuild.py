"""Container images built with pulumi-docker (``docker.Image``): what the build is given and where it pushes.

* **No ``None`` to the provider.** ``build.args`` and ``build.target`` are sent only when the stack sets
  them; a ``null`` is not "unset" to every provider, and a change from ``null`` to absent would be a diff.
* **A push never reuses a tag.** Tags are immutable in our registry (the bootstrap stack's Artifact
  Registry repository), and a Docker build is not reproducible, so a second build of the same input hash
  (state lost, the resource replaced, a failed push retried by a fresh ``pulumi up``) pushing to the tag
  of the first one is refused by the registry. The tag is therefore ``<input hash[:32]>-<nonce>``: the
  nonce is made once by a ``push-tag`` step whose replacement triggers are every build input, kept in
  state, so it stays the same across updates and is new for every new build. The lock records the
  pushed manifest digest, never the tag.
"""

from __future__ import annotations

import json
import re
from typing import Any

STEP = "push-tag"
STEP_MARK = "# dstack-fleet:step="
TAG_HASH_LENGTH = 32
NONCE_HEX = 8
NONCE_RE = re.compile(rf"[0-9a-f]{{{NONCE_HEX}}}")
# Docker's tag grammar (distribution/reference: [\w][\w.-]{0,127})
TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


class DockerBuildError(ValueError):
    pass


def build_settings(build: Any) -> dict[str, Any]:
    """The ``build`` input of ``docker.Image`` (``DockerBuildArgs``): only what is set."""
    settings: dict[str, Any] = {"context": build.context, "dockerfile": f"{build.context}/{build.dockerfile}",
                                "platform": build.platform}
    if build.args:
        settings["args"] = dict(sorted(build.args.items()))
    if build.target:
        settings["target"] = build.target
    return settings


def tag_triggers(input_hash: str, build: Any) -> list[str]:
    """What makes a new build, and so a new tag: the input hash and every setting docker.Image is given."""
    return [input_hash, json.dumps(build_settings(build), sort_keys=True, separators=(",", ":"))]


def tag_script() -> str:
    """Prints a fresh random nonce of NONCE_HEX hex digits (coreutils only), once per build."""
    return "\n".join([
        "set -euo pipefail",
        f"{STEP_MARK}{STEP}",
        f"od -An -N{NONCE_HEX // 2} -tx1 /dev/urandom | tr -d ' \\n'",
    ]) + "\n"


def push_tag(input_hash: str, nonce_stdout: str) -> str:
    nonce = nonce_stdout.strip()
    if not NONCE_RE.fullmatch(nonce):
        raise DockerBuildError(f"the push-tag step printed {nonce_stdout!r}, not {NONCE_HEX} hex digits")
    tag = f"{input_hash[:TAG_HASH_LENGTH]}-{nonce}"
    if not TAG_RE.fullmatch(tag):  # pragma: no cover - guarded by construction
        raise DockerBuildError(f"{tag!r} is not a Docker tag")
    return tag


def offline_tag_stdout(ctx) -> str:
    """Offline stand-in for the push-tag step (``fleet.plan.offline.COMMAND_STEPS``): a nonce of the real
    shape derived from the step's URN."""
    return ctx.digest("push-tag")[:NONCE_HEX]
