"""The plan's ``measurements``: what every node and app is expected to measure, before deploy.

Keys are ``node:<group>-<ordinal>`` and ``app:<name>``. Hashes come from the lock file (or read
``pending build``), app values from the exact app-compose bytes; values only a booted guest knows
read ``known at boot``. Every GCP node (and every app on one) states its expected MRTD per GCE
firmware and RTMR0-2 (``registers``, ``fleet.attest.bootchain``): the machine type decides the TD
HOB (memory) and ACPI tables, the attached disks the Boot#### variables, the image's recorded boot
inputs RTMR1 and RTMR2; a value that cannot be predicted says which recorded input is missing.
"""

from __future__ import annotations

import functools
import json
import re
import shlex
from typing import Any

from fleet.attest import bootchain, measure
from fleet.apps.plans import AppPlan, gce_os_image_hash
from fleet.config.problems import Problem
from fleet.config.schema import NAMESPACE
from fleet.nodes.specs import Fleet, NodeSpec

PENDING = measure.PENDING_BUILD


def _vm_config_os_image_hash(node: NodeSpec, os_version: str | None) -> str | None:
    if node.image.pending:
        return PENDING
    return gce_os_image_hash(node, os_version)


# Disks a node has besides its boot disk, each a Boot#### variable in RTMR0: every node attaches
# its data disk (components/tdxnode.py), a dstack node also its configuration disk
# (components/dstacknode.py). tests/test_expectations.py checks this against the planned instances.
EXTRA_DISKS = {"overlay": 1, "dstack": 2}


def _boot_missing(node: NodeSpec) -> str:
    image = node.image
    if image.recipe == "tplus-overlay":
        return "the tplus-overlay recipe records no boot inputs (its image's boot path is not hashed by the build)"
    if image.origin != "build":
        return f"image {node.image_key} is prebuilt: no build recorded its boot inputs"
    return (f"images.lock.json entry {image.content_hash} has no 'boot' inputs (built before they were recorded); "
            "rebuild it or add them")


def node_registers(node: NodeSpec) -> dict[str, Any]:
    """Expected MRTD and RTMR0-2 of a node: see ``fleet.attest.bootchain.expected_registers``."""
    image = node.image
    produces_boot = image.origin == "build" and image.recipe == "dstack-os"
    boot = json.dumps(image.boot, sort_keys=True) if image.boot is not None else None
    return json.loads(_registers(node.machine_type, EXTRA_DISKS[node.identity.kind], boot,
                                 image.pending and produces_boot, _boot_missing(node)))


@functools.lru_cache(maxsize=256)
def _registers(machine_type: str, extra_disks: int, boot: str | None, pending: bool, boot_missing: str) -> str:
    """Nodes of a group share their expectation: computed once per distinct input (a fleet of a
    thousand nodes has a handful), returned as JSON so no caller can change the cached value."""
    inputs = json.loads(boot) if boot is not None else None
    out = bootchain.expected_registers(machine_type, extra_disks=extra_disks, boot=inputs, pending=pending,
                                       boot_missing=boot_missing)
    out["boot"] = inputs
    return json.dumps(out)


def _uki_hash(node: NodeSpec) -> str | None:
    if node.image.pending:
        return PENDING if node.image.recipe == "dstack-os" else None
    return node.image.hashes.get("ukiHash")


def node_expectation(node: NodeSpec, os_version: str | None = None) -> dict[str, Any]:
    if node.identity.kind == "overlay":
        out = measure.overlay_measurements(machine_type=node.machine_type)
        out["image_artifact_sha256"] = PENDING if node.image.pending else node.image.hashes.get("artifactSha256")
        out["registers"] = node_registers(node)
        return out
    # os_image_hash is the vm_config value the guest reports and its KMS checks (on GCE the UKI
    # Authenticode hash); image_digest is the release's digest.txt (sha256 of sha256sum.txt).
    return {"kind": "dstack-node", "image": node.image_key, "os_image_hash": _vm_config_os_image_hash(node, os_version),
            "image_digest": PENDING if node.image.pending else node.image.hashes.get("osImageHash"),
            "machine_type": node.machine_type, "uki_hash": _uki_hash(node), "registers": node_registers(node)}


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
    registers: dict[str, Any] = {}
    if app.target == "gce" and nodes:
        hashes = {_vm_config_os_image_hash(n, version) for n in nodes}
        os_image_hash = hashes.pop() if len(hashes) == 1 else PENDING
        machine_type = nodes[0].machine_type
        options = {(storage_fs or {}).get(n.image_key) for n in nodes}
        cmdline_storage_fs = options.pop() if len(options) == 1 else None
        # the app's guest is one of its group's nodes: their registers, when they agree
        per_node = [node_expectation(n, version) for n in nodes]
        if all(e["registers"] == per_node[0]["registers"] for e in per_node):
            registers = {"registers": per_node[0]["registers"], "uki_hash": per_node[0]["uki_hash"]}
    try:
        measure.measurement_profile("dstack-os", version, app.config.key_provider)
    except measure.UnknownProfile as exc:
        return {"kind": "dstack-app", "profile": f"none for dstack {version}", "compose_hash": app.compose_hash,
                "app_id": app.app_id, "os_image_hash": os_image_hash,
                "rtmr3_events": [], "rtmr3": f"no measurement profile for dstack {version} yet ({exc})",
                "machine_type": machine_type, **registers, **extra}
    out = measure.expected_measurements(
        app.app_compose.data, dstack_version=version, os_image_hash=os_image_hash,
        app_id=app.pinned_app_id, key_provider_id=(app.config.kms.key_provider_id or None) if app.config.kms else None,
        cmdline_storage_fs=cmdline_storage_fs,
        image_digests={k: f"sha256:{v}" for k, v in app.image_digest_events.items()}, machine_type=machine_type)
    out.update(registers)
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
# Where the collateral comes from (Intel's PCS unless FLEET_PCCS_URL names a PCCS), and where each
# run's evidence stays (FLEET_EVIDENCE_DIR, default .fleet-evidence/ under the project root).
INTEL_PCS_URL = "https://api.trustedservices.intel.com"


def verify_problems(config) -> list[Problem]:
    """The post-deploy check verifies the guest's quote every time, so it needs where to get one."""
    return [Problem(config.source, f"{NAMESPACE}:apps[{index}].verify.quoteUrl",
                    "required: the post-deploy check always verifies the guest's TDX quote (signature, TCB status) "
                    "against the plan; give the URL of the app's GetQuote response")
            for index, app in enumerate(config.fleet.apps) if app.verify is not None and not app.verify.quote_url]


def verify_script(target: str, info_url: str, quote_url: str) -> str:
    """Bash, run from the project root after deploy: fetch the app's TcbInfo and quote, fetch
    Intel's collateral for the quote, and ``fleet verify`` all of it against the expectation
    given on stdin (``{"measurements": {target: ...}}``). Signature and TCB status are always
    checked; the inputs, the collateral and the result stay in the evidence directory, whose files'
    sha256 are printed (and so kept in the step's recorded output)."""
    if not quote_url:
        raise ValueError("the post-deploy check needs the quote's URL (verify.quoteUrl)")
    directory = re.sub(r"[^A-Za-z0-9._-]", "-", target)
    lines = [
        "set -euo pipefail",
        "# dstack-fleet:step=verify",
        f'evidence="${{FLEET_EVIDENCE_DIR:-.fleet-evidence}}/{directory}/$(date -u +%Y%m%dT%H%M%SZ)"',
        'mkdir -p "$evidence"',
        'cat > "$evidence/plan.json"',
        f'curl -fsS --retry 10 --retry-delay 15 --retry-all-errors {shlex.quote(info_url)} -o "$evidence/info.json"',
        f'curl -fsS --retry 5 --retry-all-errors {shlex.quote(quote_url)} -o "$evidence/quote.json"',
        f'args=(--tcb-info "$evidence/info.json" --quote "$evidence/quote.json" --collateral "$evidence/collateral.json"'
        f' --pccs-url "${{FLEET_PCCS_URL:-{INTEL_PCS_URL}}}" --plan "$evidence/plan.json" --target {shlex.quote(target)})',
        '# FLEET_VERIFY_AT re-checks kept evidence as of a past time (an audit); unset, the time is now',
        'if [ -n "${FLEET_VERIFY_AT:-}" ]; then args+=(--at "$FLEET_VERIFY_AT"); fi',
        "status=0",
        f'{VERIFY_PYTHON} -m fleet verify "${{args[@]}}" > "$evidence/result.txt" || status=$?',
        'cat "$evidence/result.txt"',
        'echo "evidence kept in $evidence:"',
        '(cd "$evidence" && sha256sum -- *)',
        'exit "$status"',
    ]
    return "\n".join(lines) + "\n"
