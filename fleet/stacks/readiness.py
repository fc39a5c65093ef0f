"""What a real ``pulumi up`` of a stack needs before it can run, decided from the config and the lock.

A real ``pulumi up`` must register what the preview showed, or refuse. The program cannot read the
stack's state, so nothing here depends on it: the same functions decide

* in the program (``components/roles/env.py``): a real preview or update refuses, the offline plan
  warns and shows the gap (``[secret: not set]``, ``pending build``);
* in the offline plan's update pass (``python -m fleet plan --pass up``): it refuses where a real
  ``up`` refuses, before the program runs;
* in ``fleet deploy`` (``make preview``/``make up``): before the CLI runs, and against
  ``pulumi stack export`` for what is already deployed (``deployed_and_waiting``).

The two gaps:

* **a secret an app needs is not set** (``dstack-fleet:secrets``): the CLI cannot deploy the app, and
  the command that sets it is named;
* **an image a node boots is pending** (the lock file has no build of it): a real ``up`` cannot create
  the node, and dropping it instead would delete a deployed node with its address and data disk, so
  ``up`` refuses in every tier; so it does for a dstack node whose app's *containers* are pending (its
  configuration disk needs the app-compose). An app on a VMM host or Phala Cloud whose containers are
  pending is not registered by preview or up (there is no app-compose yet); ``fleet deploy`` refuses
  when such an app is already deployed, because the update would delete it.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Any, Iterable

from fleet.apps.plans import AppPlan
from fleet.config.schema import NAMESPACE, StackConfig
from fleet.config.values import NOT_SET
from fleet.gcp.naming import Namer
from fleet.images.lock import LockFile
from fleet.images.versions import ImageVersion
from fleet.nodes import boot_images
from fleet.nodes.identity import ordinals

SECRETS_KEY = f"{NAMESPACE}:secrets"
INSTANCE_TYPE = "gcp:compute/instance:Instance"
APP_TYPE = "dstack-fleet:apps:DstackApp"


def set_secret_command(stack: str, name: str) -> str:
    """The exact command that stores a secret; without a value on the command line the CLI prompts
    for it (or reads it from standard input), so it never lands in a shell history."""
    return shlex.join(["pulumi", "config", "set", "--stack", stack, "--secret", "--path", f"{SECRETS_KEY}.{name}"])


@dataclass(frozen=True)
class MissingSecret:
    name: str
    users: tuple[str, ...]  # "app hello (phala.apiKeySecret)"

    def line(self, stack: str) -> str:
        return (f"{SECRETS_KEY}.{self.name}: {NOT_SET} (needed by {'; '.join(self.users)}); set it with "
                f"`{set_secret_command(stack, self.name)}`")


def required_secrets(config: StackConfig) -> dict[str, list[str]]:
    """Secret name -> who needs it, for every secret an app of the stack references."""
    needed: dict[str, list[str]] = {}
    for app in config.fleet.apps:
        for env, secret in sorted(app.secret_env.items()):
            needed.setdefault(secret, []).append(f"app {app.name} (secretEnv.{env})")
        if app.vmm is not None and app.vmm.token_secret:
            needed.setdefault(app.vmm.token_secret, []).append(f"app {app.name} (vmm.tokenSecret)")
        if app.phala is not None:
            needed.setdefault(app.phala.api_key_secret, []).append(f"app {app.name} (phala.apiKeySecret)")
    return dict(sorted(needed.items()))


def missing_secrets(config: StackConfig) -> list[MissingSecret]:
    have = config.fleet.secrets
    return [MissingSecret(name, tuple(users)) for name, users in required_secrets(config).items() if name not in have]


@dataclass(frozen=True)
class PendingImage:
    key: str
    content_hash: str
    nodes: tuple[str, ...]

    def line(self) -> str:
        return (f"image {self.key!r} (input hash {self.content_hash}) is pending build and nodes "
                f"{', '.join(self.nodes)} boot it: build it with `make up STACK=images`, record it with "
                "`make lock` and commit images.lock.json")


def pending_images(config: StackConfig, lock: LockFile, namer: Namer,
                   versions: dict[str, ImageVersion] | None = None) -> list[PendingImage]:
    """Images some node boots that the lock file does not hold yet, with the nodes that boot them."""
    if versions is None:
        versions = boot_images.resolve_for_stack(config, lock, namer)
    users = boot_images.used_keys(config)
    return [PendingImage(key, versions[key].content_hash, tuple(users[key]))
            for key in boot_images.pending_in_use(config, lock, namer, versions)]


def waiting_nodes(config: StackConfig, apps: Iterable[AppPlan]) -> list[str]:
    """One line per dstack node group whose app's containers are pending: the node cannot get its
    configuration disk (there is no app-compose yet), and leaving it out would delete it if deployed."""
    lines = []
    for app in apps:
        if app.target != "gce" or not app.pending:
            continue
        group = next((g for g in config.fleet.nodes if g.name == app.config.nodes), None)
        nodes = [f"{group.name}-{n}" for n in ordinals(group)] if group is not None else []
        lines.append(f"nodes {', '.join(nodes)} run app {app.key}, whose container images {', '.join(app.pending)} "
                     "are pending build: build them with `make up STACK=images`, record them with `make lock` and "
                     "commit images.lock.json")
    return lines


def up_refusals(config: StackConfig, lock: LockFile, namer: Namer, apps: Iterable[AppPlan] = (),
                versions: dict[str, ImageVersion] | None = None) -> list[str]:
    """One line per reason a real ``pulumi up`` of this stack refuses; empty when it may run. ``apps``:
    the stack's planned apps (``fleet.apps.plans.plan_apps``), for nodes that wait for containers."""
    lines = [p.line() for p in pending_images(config, lock, namer, versions)]
    lines += waiting_nodes(config, apps)
    lines += [m.line(config.stack) for m in missing_secrets(config)]
    return lines


def preview_refusals(config: StackConfig) -> list[str]:
    """A preview runs with pending images (it shows them), but not without the secrets apps need."""
    return [m.line(config.stack) for m in missing_secrets(config)]


# ---------------------------------------------------------------------------------------------
# What is deployed (``pulumi stack export``)


def deployed_resources(export: dict[str, Any]) -> list[tuple[str, str]]:
    """(type, logical name) of every resource in a ``pulumi stack export`` document."""
    deployment = export.get("deployment") if isinstance(export, dict) else None
    resources = (deployment or {}).get("resources") or []
    out = []
    for resource in resources:
        if not isinstance(resource, dict):
            continue
        urn = str(resource.get("urn") or "")
        out.append((str(resource.get("type") or ""), urn.rsplit("::", 1)[-1]))
    return out


def waiting(config: StackConfig, lock: LockFile, namer: Namer, apps: Iterable[AppPlan],
            versions: dict[str, ImageVersion] | None = None) -> dict[tuple[str, str], str]:
    """(resource type, logical name) -> why the program will not register it in this state: nodes whose
    boot image is pending, dstack nodes and app targets whose app's containers are pending."""
    out: dict[tuple[str, str], str] = {}
    for image in pending_images(config, lock, namer, versions):
        for node in image.nodes:
            out[(INSTANCE_TYPE, node)] = f"its image {image.key!r} is pending build (input hash {image.content_hash})"
    for app in apps:
        if not app.pending:
            continue
        why = f"app {app.key}'s container images {', '.join(app.pending)} are pending build"
        if app.target == "gce":
            group = next((g for g in config.fleet.nodes if g.name == app.config.nodes), None)
            for n in ordinals(group) if group is not None else []:
                out.setdefault((INSTANCE_TYPE, f"{group.name}-{n}"), why)
        else:
            out[(APP_TYPE, app.name)] = why
    return out


def deployed_and_waiting(export: dict[str, Any], waits: dict[tuple[str, str], str]) -> list[str]:
    """One line per deployed node or app that an update now would delete because it waits for a build."""
    lines = []
    for type_, name in sorted(set(deployed_resources(export))):
        why = waits.get((type_, name))
        if why is None:
            continue
        what = "node" if type_ == INSTANCE_TYPE else "app"
        lines.append(f"{what} {name} is deployed, but {why}: this update would delete it; build and lock the "
                     "image first (`make up STACK=images`, `make lock`), or keep the previous version declared")
    return lines
