"""The plan's expected registers in the formats other verifiers consume.

* **flashbots**: the measurements file of flashbots/attested-tls (``crates/attestation``, read by
  its ``MeasurementPolicy``) and https://measurements.builder.flashbots.net: a JSON list of
  ``{"measurement_id", "attestation_type", "measurements": {"<index>": {"expected": hex} |
  {"expected_any": [hex, ...]}}}`` (``measurements.rs`` ``from_json_bytes``: ``expected`` is
  deprecated, so we write ``expected_any``); for ``dcap-tdx`` index 0 is MRTD, 1-3 RTMR0-2, 4
  RTMR3, and a missing index is not checked. One entry per target and GCE firmware, since MRTD and
  RTMR0 go together; ``dcap-tdx`` as BuilderNet's published GCP entries use it.
* **near-votes**: the arguments of NEAR MPC's contract votes at near/mpc
  b0b6b7167e89c015ad59bfb4b0bbc78fcc8432cc (``crates/contract/src/api/tee_measurements.rs``):
  ``vote_add_launcher_hash {launcher_hash}``, ``vote_code_hash {code_hash}`` (being renamed,
  near/mpc#4445) and ``vote_add_os_measurement {measurement: {mrtd, rtmr0, rtmr1, rtmr2,
  key_provider_event_digest}}`` (``ContractExpectedMeasurements``), hashes as lowercase hex without
  ``sha256:`` (``crates/primitives/src/hash.rs``). With it, the launcher compose hash the contract
  derives from its template (``crates/contract/src/tee/proposal.rs``) for these two images.

Both are written and read back by the same code, so an export can be checked before it is used.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any

NEAR_CONTRACT = {
    "repository": "https://github.com/near/mpc",
    "commit": "b0b6b7167e89c015ad59bfb4b0bbc78fcc8432cc",
    "methods": "crates/contract/src/api/tee_measurements.rs",
    "note": "vote_code_hash is being renamed (near/mpc#4445); check the method name of the deployed contract",
}
# near/mpc crates/contract/assets/launcher_docker_compose.yaml.template at the commit above: the
# contract renders it with the launcher and MPC image hashes and allows the compose hash it gives.
NEAR_LAUNCHER_TEMPLATE = """version: '3.8'

services:
  launcher:
    image: nearone/mpc-launcher@sha256:{{LAUNCHER_IMAGE_HASH}}

    container_name: launcher

    environment:
      - PLATFORM=TEE
      - DOCKER_CONTENT_TRUST=1
      - DEFAULT_IMAGE_DIGEST=sha256:{{DEFAULT_IMAGE_DIGEST_HASH}}

    volumes:
      - /var/run/docker.sock:/var/run/docker.sock
      - /var/run/dstack.sock:/var/run/dstack.sock
      - /tapp:/tapp:ro
      - shared-volume:/mnt/shared:rw

    security_opt:
      - no-new-privileges:true

    read_only: true

    tmpfs:
      - /tmp

volumes:
  shared-volume:
    name: shared-volume
"""
# flashbots/attested-tls crates/attestation/src/lib.rs AttestationType (223349776d2e): kebab-case
# names, qemu-tdx an alias of dcap-tdx; gcp-tdx and dcap-tdx both hold DCAP registers.
ATTESTATION_TYPES = {"dcap-tdx": 96, "gcp-tdx": 96, "qemu-tdx": 96, "azure-tdx": 64, "none": 0}
DCAP_INDEXES = {"mrtd": "0", "rtmr0": "1", "rtmr1": "2", "rtmr2": "3", "rtmr3": "4"}
_HEX96 = re.compile(r"[0-9a-f]{96}")
_HEX64 = re.compile(r"[0-9a-f]{64}")


class ExportError(ValueError):
    """A measurements file that is not in the format, one line per problem."""


def _hex96(value: object) -> str | None:
    return value if isinstance(value, str) and _HEX96.fullmatch(value) else None


def _gcp_targets(measurements: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(t, m) for t, m in sorted(measurements.items()) if isinstance(m, dict) and isinstance(m.get("registers"), dict)]


def flashbots(plan: Mapping[str, Any], *, partial: bool = False) -> tuple[list[dict[str, Any]], list[str]]:
    """(entries, notes): one ``dcap-tdx`` entry per distinct (registers, firmware); targets that
    share them are named together. Entries lacking a register are left out (and noted) unless
    ``partial``, where the missing index means "not checked" to the reader."""
    stack = plan.get("stack", "stack")
    groups: dict[str, tuple[list[str], dict[str, str]]] = {}
    notes: list[str] = []
    for target, measurement in _gcp_targets(plan.get("measurements") or {}):
        registers = measurement["registers"]
        rtmr3 = _hex96(measurement.get("rtmr3"))
        for name, firmware in sorted((registers.get("firmware") or {}).items()):
            values = {"mrtd": _hex96(firmware.get("mrtd")), "rtmr0": _hex96(firmware.get("rtmr0")),
                      "rtmr1": _hex96(registers.get("rtmr1")), "rtmr2": _hex96(registers.get("rtmr2")),
                      "rtmr3": rtmr3}
            unknown = [r for r in ("mrtd", "rtmr0", "rtmr1", "rtmr2") if values[r] is None]
            if unknown and not partial:
                notes.append(f"{target} on {name}: left out, {', '.join(unknown)} not predicted "
                             "(see the plan's registers.missing; --partial writes it without them)")
                continue
            known = {r: v for r, v in values.items() if v is not None}
            key = json.dumps([name, known], sort_keys=True)
            groups.setdefault(key, ([], known))[0].append(target)
            if unknown:
                notes.append(f"{target} on {name}: {', '.join(unknown)} not checked (not predicted)")
    entries = []
    for key, (targets, known) in sorted(groups.items(), key=lambda item: (item[1][0][0], item[0])):
        firmware = json.loads(key)[0]
        label = targets[0] + (f"+{len(targets) - 1}" if len(targets) > 1 else "")
        entries.append({
            "measurement_id": f"dstack-fleet/{stack}/{label}/{firmware}",
            "attestation_type": "dcap-tdx",
            "measurements": {DCAP_INDEXES[r]: {"expected_any": [v]} for r, v in sorted(known.items(),
                                                                                  key=lambda i: DCAP_INDEXES[i[0]])},
        })
    return entries, notes


def parse_flashbots(text: str) -> list[dict[str, Any]]:
    """A flashbots measurements file, checked: raises ``ExportError`` naming each problem."""
    try:
        document = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ExportError(f"not JSON ({exc})") from None
    if not isinstance(document, list):
        raise ExportError("a measurements file is a JSON list of entries")
    problems = []
    for index, entry in enumerate(document):
        where = f"[{index}]"
        if not isinstance(entry, dict) or set(entry) - {"measurement_id", "attestation_type", "measurements",
                                                         "dcap_image_hashes"}:
            problems.append(f"{where}: an entry has measurement_id, attestation_type and measurements only")
            continue
        kind = entry.get("attestation_type")
        if kind not in ATTESTATION_TYPES:
            problems.append(f"{where}.attestation_type: {kind!r} is not one of {', '.join(ATTESTATION_TYPES)}")
            continue
        if "measurement_id" in entry and not isinstance(entry["measurement_id"], str):
            problems.append(f"{where}.measurement_id: not a string")
        for register, value in (entry.get("measurements") or {}).items():
            at = f"{where}.measurements.{register}"
            if not register.isdigit():
                problems.append(f"{at}: register indexes are decimal")
            values = ([value.get("expected")] if isinstance(value, dict) and set(value) == {"expected"} else
                      value.get("expected_any") if isinstance(value, dict) and set(value) == {"expected_any"} else None)
            if not isinstance(values, list) or not values:
                problems.append(f"{at}: expected {{'expected': hex}} or {{'expected_any': [hex, ...]}}")
                continue
            size = ATTESTATION_TYPES[kind]
            bad = [v for v in values if not (isinstance(v, str) and re.fullmatch(f"[0-9a-f]{{{size}}}", v))]
            if bad:
                problems.append(f"{at}: {str(bad[0])[:20]!r} is not {size} lowercase hex characters")
    if problems:
        raise ExportError("; ".join(problems))
    return document


def render_flashbots(entries: list[dict[str, Any]]) -> str:
    return json.dumps(entries, indent=4) + "\n"


# ---------------------------------------------------------------------------------------------
# NEAR MPC votes


def launcher_compose(launcher_hash: str, mpc_hash: str, template: str = NEAR_LAUNCHER_TEMPLATE) -> str:
    """The docker compose the contract derives (``proposal.rs``: two string replacements)."""
    return template.replace("{{LAUNCHER_IMAGE_HASH}}", launcher_hash).replace("{{DEFAULT_IMAGE_DIGEST_HASH}}", mpc_hash)


def os_measurement(registers: Mapping[str, str], key_provider_event_digest: str) -> dict[str, dict[str, str]]:
    """``vote_add_os_measurement``'s argument."""
    return {"measurement": {"mrtd": registers["mrtd"], "rtmr0": registers["rtmr0"], "rtmr1": registers["rtmr1"],
                            "rtmr2": registers["rtmr2"], "key_provider_event_digest": key_provider_event_digest}}


def _digest_hex(reference: object) -> str | None:
    if not isinstance(reference, str) or "@sha256:" not in reference:
        return None
    value = reference.rsplit("@sha256:", 1)[1]
    return value if _HEX64.fullmatch(value) else None


def near_votes(plan: Mapping[str, Any]) -> dict[str, Any]:
    """The votes that let the plan's NEAR MPC apps join: per app, the launcher and MPC image hashes
    and one OS measurement per GCE firmware whose registers are all predicted; what cannot be
    voted for yet is listed under ``missing``."""
    apps_out = {}
    outputs = (plan.get("outputs") or {}).get("apps") or {}
    measurements = plan.get("measurements") or {}
    for name, app in sorted(outputs.items()):
        if not isinstance(app, dict) or app.get("kind") != "near-mpc":
            continue
        expectation = measurements.get(f"app:{name}") or {}
        missing: list[str] = []
        launcher = next((_digest_hex(ref) for where, ref in sorted((app.get("images") or {}).items())
                         if "launcher" in where), None)
        code = (expectation.get("image_digests") or {}).get("mpc-image-digest")
        code = code if isinstance(code, str) and _HEX64.fullmatch(code) else None
        entry: dict[str, Any] = {}
        if launcher is None:
            missing.append("launcher_hash: the launcher image has no digest yet")
        else:
            entry["vote_add_launcher_hash"] = {"launcher_hash": launcher}
        if code is None:
            missing.append("code_hash: the MPC image has no digest yet")
        else:
            entry["vote_code_hash"] = {"code_hash": code}
        if launcher and code:
            entry["launcher_compose_hash"] = hashlib.sha256(launcher_compose(launcher, code).encode()).hexdigest()
        provider = next((e.get("digest") for e in expectation.get("rtmr3_events") or []
                         if isinstance(e, dict) and e.get("event") == "key-provider"), None)
        if _hex96(provider) is None:
            missing.append(f"key_provider_event_digest: {provider or 'no key-provider event planned'}")
        registers = expectation.get("registers")
        votes = []
        if not isinstance(registers, dict):
            missing.append("mrtd, rtmr0-2: the app runs on no GCP node group of this stack")
        else:
            for firmware, values in sorted((registers.get("firmware") or {}).items()):
                known = {"mrtd": _hex96(values.get("mrtd")), "rtmr0": _hex96(values.get("rtmr0")),
                         "rtmr1": _hex96(registers.get("rtmr1")), "rtmr2": _hex96(registers.get("rtmr2"))}
                unknown = [k for k, v in known.items() if v is None]
                if unknown:
                    missing.append(f"os measurement on {firmware}: {', '.join(unknown)} not predicted")
                elif _hex96(provider) is not None:
                    votes.append({"firmware": firmware, **os_measurement(known, str(provider))})
        entry["vote_add_os_measurement"] = votes
        entry["missing"] = missing
        apps_out[name] = entry
    return {"contract": NEAR_CONTRACT, "stack": plan.get("stack"), "apps": apps_out}


def parse_near_votes(text: str) -> dict[str, Any]:
    """Our near-votes document, checked (hex sizes and the argument names of the pinned contract)."""
    try:
        document = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ExportError(f"not JSON ({exc})") from None
    problems = []
    if not isinstance(document, dict) or document.get("contract", {}).get("commit") != NEAR_CONTRACT["commit"]:
        raise ExportError(f"not votes for near/mpc {NEAR_CONTRACT['commit']}")
    for name, app in (document.get("apps") or {}).items():
        launcher = (app.get("vote_add_launcher_hash") or {}).get("launcher_hash")
        code = (app.get("vote_code_hash") or {}).get("code_hash")
        for label, value in (("launcher_hash", launcher), ("code_hash", code)):
            if value is not None and not _HEX64.fullmatch(str(value)):
                problems.append(f"apps.{name}.{label}: not 64 lowercase hex characters")
        for index, vote in enumerate(app.get("vote_add_os_measurement") or []):
            measurement = vote.get("measurement") if isinstance(vote, dict) else None
            keys = ("mrtd", "rtmr0", "rtmr1", "rtmr2", "key_provider_event_digest")
            if not isinstance(measurement, dict) or sorted(measurement) != sorted(keys):
                problems.append(f"apps.{name}.vote_add_os_measurement[{index}]: needs exactly {', '.join(keys)}")
                continue
            problems += [f"apps.{name}.vote_add_os_measurement[{index}].{k}: not 96 lowercase hex characters"
                         for k in keys if not _HEX96.fullmatch(str(measurement[k]))]
    if problems:
        raise ExportError("; ".join(problems))
    return document


def render_near_votes(document: Mapping[str, Any]) -> str:
    return json.dumps(document, indent=2, sort_keys=True) + "\n"
