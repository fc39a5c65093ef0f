"""``make preview`` / ``make up``: the real Pulumi CLI, pinned, on the right backend.

* The CLI version must equal ``.pulumi-version`` (the SDK in requirements.txt is the same release).
* dev (and the bootstrap stack, which creates the shared backend) may use the local file backend in
  ``.pulumi-state/``; every other stack refuses to run unless ``PULUMI_BACKEND_URL`` names a shared
  backend, so nobody previews prod against an empty local state ("create everything").
* The configuration is validated before the CLI starts, with the same messages as ``make plan``.
* Every preview and update runs the policy pack under ``policies/`` with a generated
  ``--policy-pack-config``: the stack's tier sets each rule's level (mandatory in staging and prod,
  advisory in dev), ``dstack-fleet:policy.enforcement`` overrides it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from fleet.config.problems import ConfigError
from fleet.gcp.naming import Namer
from fleet.images import lock
from fleet.nodes import boot_images
from fleet.policy.rules import pack_config_for
from fleet.stacks.load import load_config

LOCAL_BACKEND_DIR = ".pulumi-state"
# The pack of this checkout: it imports the same ``fleet`` core as the program it checks.
POLICY_PACK_DIR = Path(__file__).resolve().parents[2] / "policies"


class DeployRefused(Exception):
    """A precondition for running the real CLI does not hold; the message says how to fix it."""


@dataclass
class Invocation:
    argv: list[str]
    env: dict[str, str]


def pinned_version(root: Path) -> str:
    return (root / ".pulumi-version").read_text(encoding="utf-8").strip()


def check_cli(root: Path, env: dict[str, str]) -> str:
    exe = shutil.which("pulumi", path=env.get("PATH"))
    wanted = pinned_version(root)
    if exe is None:
        raise DeployRefused(
            f"the Pulumi CLI is not installed; install version {wanted} "
            f"(curl -fsSL https://get.pulumi.com | sh -s -- --version {wanted}) and retry"
        )
    result = subprocess.run([exe, "version"], capture_output=True, text=True, env=env, check=False)
    found = result.stdout.strip().lstrip("v")
    if result.returncode != 0 or found != wanted:
        raise DeployRefused(
            f"Pulumi CLI {found or '(unknown version)'} found at {exe}, but this project pins {wanted} "
            "(.pulumi-version); install that version"
        )
    return exe


def backend_url(root: Path, stack: str, role: str, tier: str | None, env: dict[str, str]) -> str:
    url = env.get("PULUMI_BACKEND_URL", "").strip()
    local_ok = tier == "dev" or role == "bootstrap"
    if url:
        if url.startswith("file://") and not local_ok:
            raise DeployRefused(
                f"stack {stack} needs a shared backend, but PULUMI_BACKEND_URL is a local path ({url}); "
                "use the state bucket from the bootstrap stack (gs://...)"
            )
        return url
    if not local_ok:
        raise DeployRefused(
            f"stack {stack} needs a shared backend: set PULUMI_BACKEND_URL to the state bucket from the "
            "bootstrap stack (gs://...); the local file backend is for dev only"
        )
    state = root / LOCAL_BACKEND_DIR
    state.mkdir(exist_ok=True)
    return f"file://{state}"


def policy_pack_args(config) -> list[str]:
    """``--policy-pack`` and ``--policy-pack-config`` for a validated stack configuration. The
    config document (``fleet.rules.pack_config``) goes to the temporary directory under a name
    derived from its content, so runs with the same settings reuse one file."""
    text = json.dumps(pack_config_for(config), indent=2, sort_keys=True) + "\n"
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
    path = Path(tempfile.gettempdir()) / f"dstack-fleet-policy-{config.stack}-{digest}.json"
    if not path.exists() or path.read_text(encoding="utf-8") != text:
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(text, encoding="utf-8")
        os.replace(partial, path)
    return ["--policy-pack", str(POLICY_PACK_DIR), "--policy-pack-config", str(path)]


def invocations(root: Path, command: str, stack: str, env: dict[str, str], extra: list[str] | None = None) -> list[Invocation]:
    """The CLI calls ``make preview``/``make up`` run, after every check passed."""
    if command not in ("preview", "up"):
        raise ValueError(command)
    _, config = load_config(root, stack)  # ConfigError propagates: exit 2, like make plan
    policy = policy_pack_args(config)  # ConfigError too: an unknown rule in dstack-fleet:policy.enforcement
    exe = check_cli(root, env)
    run_env = dict(env)
    run_env["PULUMI_BACKEND_URL"] = backend_url(root, stack, config.fleet.role, config.fleet.tier, env)
    if command == "up" and config.fleet.tier in ("staging", "prod"):
        namer = Namer(prefix=config.fleet.name_prefix, stack=stack, project=config.gcp.project)
        pending = boot_images.pending_in_use(config, lock.load(root), namer)
        if pending:
            raise DeployRefused(
                f"{stack} refuses pending images {', '.join(pending)}: build them with `make up STACK=images`, "
                "record them with `make lock`, and commit images.lock.json")
    run_env.setdefault("PULUMI_SKIP_UPDATE_CHECK", "true")
    base = [exe, "--cwd", str(root)]
    calls = [Invocation(base + ["stack", "select", "--create", "--non-interactive", "--stack", stack], run_env)]
    args = [command, "--stack", stack, "--diff"]
    if command == "preview" or env.get("FLEET_UP_YES") == "1":
        # CI: no prompts; `up` is confirmed by the caller (an approved GitHub environment).
        args += ["--non-interactive"] + (["--yes"] if command == "up" else [])
    args += policy
    args += extra or []
    calls.append(Invocation(base + args, run_env))
    return calls


def run(root: Path, command: str, stack: str, extra: list[str] | None = None,
        acknowledgements: list[str] | None = None) -> int:
    env = dict(os.environ)
    calls = invocations(root, command, stack, env, extra)
    if command == "up":
        # Rollout safety (fleet/cli/preflight.py): an env stack's live preview is checked first, and
        # nothing is applied when a rule refuses it.
        from fleet.cli import preflight

        if preflight.applies(root, stack):
            preview = invocations(root, "preview", stack, env, (extra or []) + preflight.PREVIEW_FLAGS)[-1]
            return preflight.checked_up(root, stack, calls, preview, acknowledgements or [])
    for call in calls:
        result = subprocess.run(call.argv, env=call.env, check=False)
        if result.returncode != 0:
            return result.returncode
    return 0


__all__ = ["ConfigError", "DeployRefused", "run", "invocations"]
