"""The plan's ``measurements``: what every node and app is expected to measure, before deploy.

Keys are ``node:<group>-<ordinal>`` and ``app:<name>``. Hashes come from the lock file (or read
``pending build``), app values from the exact app-compose bytes; values only a booted guest knows
read ``known at boot``. The machine type is part of a node's expectation because RTMR0 depends on
the memory size (the TD HOB).
"""

from __future__ import annotations

import shlex
from typing import Any

from fleet.attest import measure
from fleet.apps.plans import AppPlan, gce_os_image_hash
from fleet.nodes.specs import Fleet, NodeSpec

PENDING = measure.PENDING_BUILD


def _vm_config_os_image_hash(node: NodeSpec, os_version: str | None) -> str | None:
    if node.image.pending:
        return PENDING
    return gce_os_image_hash(node, os_version)


def node_expectation(node: NodeSpec, os_version: str | None = None) -> dict[str, Any]:
    if node.identity.kind == "overlay":
        out = measure.overlay_measurements(machine_type=node.machine_type)
        out["image_artifact_sha256"] = PENDING if node.image.pending else node.image.hashes.get("artifactSha256")
        return out
    # os_image_hash is the vm_config value the guest reports and its KMS checks (on GCE the UKI
    # Authenticode hash); image_digest is the release's digest.txt (sha256 of sha256sum.txt).
    return {"kind": "dstack-node", "image": node.image_key, "os_image_hash": _vm_config_os_image_hash(node, os_version),
            "image_digest": PENDING if node.image.pending else node.image.hashes.get("osImageHash"),
            "machine_type": node.machine_type}


def _guest_version(app: AppPlan, nodes: list[NodeSpec], os_versions: dict[str, str]) -> str:
    """The dstack version whose events the guest emits: the OS image's release on gce nodes."""
    versions = {os_versions[n.image_key] for n in nodes if n.image_key in os_versions}
    return versions.pop() if len(versions) == 1 else app.config.dstack_version


def app_expectation(app: AppPlan, nodes: list[NodeSpec], os_versions: dict[str, str] | None = None,
                    storage_fs: dict[str, str] | None = None) -> dict[str, Any]:
    """``storage_fs``: image key -> the ``dstack.storage_fs`` its kernel command line sets."""
    extra = {"identity": app.identity, "stateful": app.config.stateful, "values": app.provenance,
             "target": app.target}
    if app.app_compose is None:
        return {"kind": "dstack-app", "compose_hash": PENDING, "app_id": PENDING, "pending": app.pending, **extra}
    version = _guest_version(app, nodes, os_versions or {})
    os_image_hash = None
    machine_type = None
    cmdline_storage_fs = None
    if app.target == "gce" and nodes:
        hashes = {_vm_config_os_image_hash(n, version) for n in nodes}
        os_image_hash = hashes.pop() if len(hashes) == 1 else PENDING
        machine_type = nodes[0].machine_type
        options = {(storage_fs or {}).get(n.image_key) for n in nodes}
        cmdline_storage_fs = options.pop() if len(options) == 1 else None
    try:
        measure.measurement_profile("dstack-os", version, app.config.key_provider)
    except measure.UnknownProfile as exc:
        return {"kind": "dstack-app", "profile": f"none for dstack {version}", "compose_hash": app.compose_hash,
                "app_id": app.app_id, "os_image_hash": os_image_hash,
                "rtmr3_events": [], "rtmr3": f"no measurement profile for dstack {version} yet ({exc})",
                "machine_type": machine_type, **extra}
    out = measure.expected_measurements(
        app.app_compose.data, dstack_version=version, os_image_hash=os_image_hash,
        app_id=app.pinned_app_id, key_provider_id=(app.config.kms.key_provider_id or None) if app.config.kms else None,
        cmdline_storage_fs=cmdline_storage_fs,
        image_digests={k: f"sha256:{v}" for k, v in app.image_digest_events.items()}, machine_type=machine_type)
    if app.provenance == "reported":
        # Phala Cloud writes the app-compose itself: our bytes are not the ones measured.
        out["compose_hash"] = measure.REPORTED_BY_PHALA
        out["app_id"] = app.pinned_app_id or measure.REPORTED_BY_PHALA
        out["rtmr3"] = measure.REPORTED_BY_PHALA
        out["rtmr3_events"] = []
    out.update(extra)
    return out


def plan_measurements(fleet: Fleet, apps: list[AppPlan], os_versions: dict[str, str] | None = None,
                      storage_fs: dict[str, str] | None = None) -> dict[str, Any]:
    """``os_versions``: image key -> dstack release of the dstack-os images the stack builds;
    ``storage_fs``: image key -> ``dstack.storage_fs`` of its kernel command line."""
    versions = os_versions or {}
    out: dict[str, Any] = {f"node:{n.key}": node_expectation(n, versions.get(n.image_key)) for n in fleet.nodes}
    for app in apps:
        nodes = [n for n in fleet.nodes if app.target == "gce" and n.identity.group == app.config.nodes]
        out[f"app:{app.name}"] = app_expectation(app, nodes, os_versions, storage_fs)
    return out


def os_versions(config) -> dict[str, str]:
    return {key: source.build.version for key, source in config.fleet.images.items()
            if source.build is not None and source.build.recipe == "dstack-os"}


def image_storage_fs(config) -> dict[str, str]:
    """Image key -> the ``dstack.storage_fs`` kernel parameter its build sets (dstack-util falls back
    to it when app-compose names no storage_fs)."""
    return {key: source.build.cmdline_overrides["dstack.storage_fs"] for key, source in config.fleet.images.items()
            if source.build is not None and source.build.recipe == "dstack-os"
            and "dstack.storage_fs" in source.build.cmdline_overrides}


VERIFY_PYTHON = ".venv/bin/python"  # the project's interpreter, relative to the project root


def verify_script(target: str, info_url: str, quote_url: str | None) -> str:
    """Bash: fetch the app's TcbInfo (and quote), then ``fleet verify`` it against the expectation
    given on stdin (``{"measurements": {target: ...}}``). Runs from the project root after deploy."""
    lines = [
        "set -euo pipefail",
        "# dstack-fleet:step=verify",
        'work=$(mktemp -d)',
        'trap \'rm -rf "$work"\' EXIT',
        'cat > "$work/plan.json"',
        f'curl -fsS --retry 10 --retry-delay 15 --retry-all-errors {shlex.quote(info_url)} -o "$work/info.json"',
        f'args=(--tcb-info "$work/info.json" --plan "$work/plan.json" --target {shlex.quote(target)})',
    ]
    if quote_url:
        lines += [f'curl -fsS --retry 5 {shlex.quote(quote_url)} -o "$work/quote.json"',
                  'args+=(--quote "$work/quote.json")']
    lines.append(f'{VERIFY_PYTHON} -m fleet verify "${{args[@]}}"')
    return "\n".join(lines) + "\n"
