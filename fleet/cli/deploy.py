"""``make preview`` / ``make up``: the real Pulumi CLI, pinned, on the right backend, with every check first.

* The CLI version must equal ``.pulumi-version`` (the SDK in requirements.txt is the same release).
* dev (and the bootstrap stack, which creates the shared backend) may use the local file backend in
  ``.pulumi-state/``; every other stack refuses to run unless ``PULUMI_BACKEND_URL`` names a shared
  backend, so nobody previews prod against an empty local state ("create everything").
* The configuration is validated before the CLI starts, with the same messages as ``make plan``.
* Secrets: every env and images stack file names the bootstrap stack's Cloud KMS key for it
  (``secretsprovider: gcpkms://...``, derived by ``fleet.project.bootstrap.Names``). Only dev is ever
  created here (``stack select --create --secrets-provider gcpkms://...``); staging, prod and images are
  created once by the operator (docs/operations.md), whose ``pulumi stack init`` writes the ``encryptedkey`` that is
  committed. A secret an app needs but the stack does not set stops preview and up with the exact
  ``pulumi config set`` command.
* ``up`` refuses what a real update cannot do safely (``fleet.stacks.readiness``): a node booting a
  pending image, and, read from ``pulumi stack export``, a deployed node or app that the update would
  delete because it waits for a build.
* Every preview and update runs the policy pack under ``policies/`` with a generated
  ``--policy-pack-config``: the stack's tier sets each rule's level (mandatory in staging and prod,
  advisory in dev), ``dstack-fleet:policy.enforcement`` overrides it. The file is written for each
  run into a directory only this user can open, and removed afterwards: a config under a
  predictable name in the shared temporary directory could be planted or swapped by anyone on the
  machine (turning every rule off) between its check and the CLI reading it.

Each check is one function of a ``Deployment`` (``BEFORE_CLI``, then ``ON_STATE`` for ``up``), so a new
check is one more function in one of those lists.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from fleet.apps import plans as fleet_apps
from fleet.config.files import write_atomic
from fleet.config.problems import ConfigError
from fleet.config.schema import StackConfig
from fleet.config.stackfile import StackFile
from fleet.gcp.naming import Namer
from fleet.images import lock
from fleet.images.lock import LockFile
from fleet.policy.rules import pack_config_for
from fleet.project.bootstrap import names_for
from fleet.stacks import readiness
from fleet.stacks.load import load_config

LOCAL_BACKEND_DIR = ".pulumi-state"
# The pack of this checkout: it imports the same ``fleet`` core as the program it checks.
POLICY_PACK_DIR = Path(__file__).resolve().parents[2] / "policies"


class DeployRefused(Exception):
    """A precondition for running the real CLI does not hold; the message says how to fix it."""


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


def policy_pack_args(config, workdir: Path) -> list[str]:
    """``--policy-pack`` and ``--policy-pack-config`` for a validated stack configuration. The
    config document (``fleet.rules.pack_config``) is written into ``workdir``, a directory private
    to this run (mode 0700), as a file of mode 0600."""
    text = json.dumps(pack_config_for(config), indent=2, sort_keys=True) + "\n"
    path = Path(workdir) / f"policy-{config.stack}.json"
    write_atomic(path, text, mode=0o600)
    return ["--policy-pack", str(POLICY_PACK_DIR), "--policy-pack-config", str(path)]


@dataclass
class Deployment:
    """One ``make preview`` / ``make up`` of one stack: what every check reads."""

    root: Path
    command: str  # preview | up
    stack: str
    env: dict[str, str]  # the caller's environment
    stack_file: StackFile
    config: StackConfig
    lock: LockFile
    extra: list[str] = field(default_factory=list)

    @property
    def role(self) -> str:
        return self.config.fleet.role

    @property
    def tier(self) -> str | None:
        return self.config.fleet.tier

    @property
    def namer(self) -> Namer:
        return Namer(prefix=self.config.fleet.name_prefix, stack=self.stack, project=self.config.gcp.project)

    @property
    def secrets_provider(self) -> str | None:
        """The KMS key the stack's secrets are encrypted with; None for the bootstrap stack, which runs
        before any key exists (passphrase, docs/operations.md)."""
        return None if self.role == "bootstrap" else names_for(self.config).secrets_provider(self.stack)

    @property
    def may_create(self) -> bool:
        """Only dev (and bootstrap, on the local backend) is created by a deploy; the others are
        initialised once by the operator, who commits the ``encryptedkey`` (docs/operations.md)."""
        return self.tier == "dev" or self.role == "bootstrap"


def prepare(root: Path, command: str, stack: str, env: dict[str, str], extra: list[str] | None = None) -> Deployment:
    if command not in ("preview", "up"):
        raise ValueError(command)
    stack_file, config = load_config(root, stack)  # ConfigError propagates: exit 2, like make plan
    return Deployment(root=root, command=command, stack=stack, env=env, stack_file=stack_file, config=config,
                      lock=lock.load(root), extra=list(extra or []))


# ---------------------------------------------------------------------------------------------
# Checks before the CLI runs


def init_steps(d: Deployment, wanted: str) -> str:
    source = d.stack_file.source
    return (f"export PULUMI_BACKEND_URL=<the bootstrap stack's backendUrl>; pulumi login \"$PULUMI_BACKEND_URL\"; "
            f"pulumi stack init {d.stack} --secrets-provider '{wanted}'; then commit the encryptedkey it writes "
            f"into {source} (docs/operations.md, \"First time in a new GCP project\")")


def check_secrets_provider(d: Deployment) -> None:
    """The stack file names its KMS key (never a passphrase CI does not have); a stack this command does
    not create must have been initialised with it."""
    wanted = d.secrets_provider
    if wanted is None:
        return
    settings = d.stack_file.settings
    found = settings.get("secretsprovider")
    source = d.stack_file.source
    if not found:
        raise DeployRefused(f"{source}: no secretsprovider; add `secretsprovider: {wanted}` (the bootstrap stack's "
                            f"Cloud KMS key for {d.stack}), or the CLI would fall back to a passphrase CI does not have")
    if found != wanted:
        raise DeployRefused(f"{source}: secretsprovider is {found}, but the bootstrap stack's key for {d.stack} is "
                            f"{wanted}; use `pulumi stack change-secrets-provider --stack {d.stack} '{wanted}'` and "
                            "commit the stack file")
    if not d.may_create and not settings.get("encryptedkey"):
        raise DeployRefused(f"{source}: no encryptedkey, so stack {d.stack} was never initialised from this "
                            f"repository, and make {d.command} does not create it: {init_steps(d, wanted)}")


def check_secrets_set(d: Deployment) -> None:
    """A secret an app needs: set it before any preview or update (the CLI cannot deploy the app)."""
    missing = readiness.preview_refusals(d.config)
    if missing:
        raise DeployRefused(f"{d.stack} needs secrets the stack does not set:\n" + "\n".join(missing))


BEFORE_CLI: tuple[Callable[[Deployment], None], ...] = (check_secrets_provider, check_secrets_set)


# ---------------------------------------------------------------------------------------------
# Checks against the stack's state (``pulumi stack export``), before ``up``


def check_deployed_waiting(d: Deployment, export: dict[str, Any]) -> None:
    """A deployed node or app the update would delete because it now waits for a build."""
    names = names_for(d.config)
    apps = fleet_apps.plan_apps(d.config, d.lock, d.root, names.registry_path)
    lines = readiness.deployed_and_waiting(export, readiness.waiting(d.config, d.lock, d.namer, apps))
    if lines:
        raise DeployRefused(f"{d.stack} refuses to update:\n" + "\n".join(lines))


def check_pending_images(d: Deployment, export: dict[str, Any]) -> None:
    """A node booting a pending image, or running an app whose containers are pending, cannot be created:
    a real ``up`` refuses in every tier."""
    pending = readiness.pending_images(d.config, d.lock, d.namer)
    if pending:
        raise DeployRefused(f"{d.stack} refuses pending images {', '.join(p.key for p in pending)}:\n"
                            + "\n".join(p.line() for p in pending))
    apps = fleet_apps.plan_apps(d.config, d.lock, d.root, names_for(d.config).registry_path)
    waiting = readiness.waiting_nodes(d.config, apps)
    if waiting:
        raise DeployRefused(f"{d.stack} refuses nodes that wait for container builds:\n" + "\n".join(waiting))


ON_STATE: tuple[Callable[[Deployment, dict[str, Any]], None], ...] = (check_deployed_waiting, check_pending_images)


# ---------------------------------------------------------------------------------------------
# The CLI calls


def select_args(d: Deployment) -> list[str]:
    args = ["stack", "select", "--stack", d.stack, "--non-interactive"]
    if d.may_create:
        args.append("--create")
        if d.secrets_provider:
            args += ["--secrets-provider", d.secrets_provider]
    return args


def command_args(d: Deployment, policy: list[str]) -> list[str]:
    args = [d.command, "--stack", d.stack, "--diff"]
    if d.command == "preview" or d.env.get("FLEET_UP_YES") == "1":
        # CI: no prompts; `up` is confirmed by the caller (an approved GitHub environment).
        args += ["--non-interactive"] + (["--yes"] if d.command == "up" else [])
    return args + policy + d.extra


def stack_export(exe: str, d: Deployment, run_env: dict[str, str]) -> dict[str, Any]:
    result = subprocess.run([exe, "--cwd", str(d.root), "stack", "export", "--stack", d.stack], env=run_env,
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise DeployRefused(f"pulumi stack export --stack {d.stack} failed ({result.returncode}): "
                            f"{' '.join(result.stderr.split())[:300]}")
    try:
        document = json.loads(result.stdout)
    except ValueError:
        raise DeployRefused(f"pulumi stack export --stack {d.stack} printed no JSON document") from None
    if not isinstance(document, dict):
        raise DeployRefused(f"pulumi stack export --stack {d.stack} printed no JSON object")
    return document


@dataclass
class Invocation:
    """One call of the real CLI: what to run and with which environment."""

    argv: list[str]
    env: dict[str, str]


def _command_call(d: Deployment, command: str, select: Invocation, extra: list[str], workdir: Path) -> Invocation:
    deployment = Deployment(root=d.root, command=command, stack=d.stack, env=d.env, stack_file=d.stack_file,
                            config=d.config, lock=d.lock, extra=list(extra))
    base = select.argv[:3]  # the CLI and --cwd ROOT
    return Invocation(base + command_args(deployment, policy_pack_args(d.config, workdir)), select.env)


def _checked_calls(root: Path, command: str, stack: str, env: dict[str, str], extra: list[str] | None,
                   workdir: Path) -> tuple[Deployment, list[Invocation]]:
    d = prepare(root, command, stack, env, extra)
    pack_config_for(d.config)  # ConfigError first: an unknown rule in dstack-fleet:policy.enforcement
    for check in BEFORE_CLI:
        check(d)
    exe = check_cli(root, env)
    run_env = dict(env)
    run_env["PULUMI_BACKEND_URL"] = backend_url(root, stack, d.role, d.tier, env)
    run_env.setdefault("PULUMI_SKIP_UPDATE_CHECK", "true")
    select = Invocation([exe, "--cwd", str(root)] + select_args(d), run_env)
    return d, [select, _command_call(d, command, select, d.extra, workdir)]


def invocations(root: Path, command: str, stack: str, env: dict[str, str], extra: list[str] | None = None, *,
                workdir: Path) -> list[Invocation]:
    """The CLI calls of ``make preview``/``make up`` (``stack select``, then the command) after every
    check before the CLI passed; the policy config they read is written into ``workdir``, which the
    caller keeps private and alive while it runs them (``make rollout`` runs one per wave)."""
    if command not in ("preview", "up"):
        raise ValueError(command)
    return _checked_calls(root, command, stack, env, extra, workdir)[1]


def run(root: Path, command: str, stack: str, extra: list[str] | None = None,
        acknowledgements: list[str] | None = None) -> int:
    env = dict(os.environ)
    acks = acknowledgements or []
    with tempfile.TemporaryDirectory(prefix="dstack-fleet-deploy-") as workdir:  # mkdtemp: mode 0700
        d, calls = _checked_calls(root, command, stack, env, extra, Path(workdir))
        select, run_command = calls
        selected = subprocess.run(select.argv, env=select.env, check=False)
        if selected.returncode != 0:
            return selected.returncode
        if command == "up":
            export = stack_export(select.argv[0], d, select.env)
            for state_check in ON_STATE:
                state_check(d, export)
            # Rollout safety (fleet/cli/preflight.py): an env stack's live preview is checked first, and
            # nothing is applied when a rule refuses it.
            from fleet.cli import preflight

            if preflight.applies(root, stack):
                preview = _command_call(d, "preview", select, (extra or []) + preflight.PREVIEW_FLAGS, Path(workdir))
                return preflight.checked_up(root, stack, [run_command], preview, acks)
        return subprocess.run(run_command.argv, env=run_command.env, check=False).returncode


__all__ = ["BEFORE_CLI", "ConfigError", "DeployRefused", "Deployment", "ON_STATE", "prepare", "run"]
