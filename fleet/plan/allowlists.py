"""Measurement allow-lists a rollout has to keep in step with the nodes: NEAR MPC's contract and a
dstack KMS. A node booting the new version is admitted only once its values are allowed, and the
nodes not rolled yet still run the old ones, so the new values go in before the first wave and the
old ones come out only after the last.

* NEAR MPC (near/mpc b0b6b7167e89c015ad59bfb4b0bbc78fcc8432cc,
  ``crates/contract/src/api/tee_measurements.rs``): ``vote_add_launcher_hash``, ``vote_code_hash`` and
  ``vote_add_os_measurement`` add; ``vote_remove_launcher_hash`` and ``vote_remove_os_measurement``
  remove (every participant must vote). There is no removal for a code hash: an old one stops being
  accepted when the contract's ``tee_upgrade_deadline_duration_seconds`` after its successor passes.
  Payloads are ``fleet.attest.exports.near_votes``'s.
* dstack KMS with the on-chain authority (Dstack-TEE/dstack 312dc605ebaaf93372534ffb135ea011533d28e9,
  ``kms/auth-eth/contracts/DstackApp.sol`` ``addComposeHash``/``removeComposeHash`` and
  ``DstackKms.sol`` ``addOsImageHash``/``removeOsImageHash``, each a ``bytes32``): an app whose key
  provider is a KMS needs its compose hash and its OS image hash allowed.

Old values are the deployed stack's (its ``apps`` and ``measurements`` outputs), new ones the plan's.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fleet.attest import exports

_HEX64 = re.compile(r"[0-9a-f]{64}")
NEAR_REMOVAL = {"vote_add_launcher_hash": "vote_remove_launcher_hash",
                "vote_add_os_measurement": "vote_remove_os_measurement"}
KMS_SOURCE = "Dstack-TEE/dstack 312dc605 kms/auth-eth/contracts"


@dataclass(frozen=True)
class Entry:
    where: str  # the allow-list: "NEAR MPC contract, app mpc-prod"
    method: str  # the call that adds the value
    argument: Any  # its exact argument (JSON)

    def key(self) -> tuple[str, str, str]:
        return (self.where, self.method, json.dumps(self.argument, sort_keys=True))

    def call(self, method: str | None = None) -> str:
        return f"{self.where}: {method or self.method} {json.dumps(self.argument, sort_keys=True)}"


def _near(document: Mapping[str, Any]) -> list[Entry]:
    out = []
    for name, app in sorted(exports.near_votes(document)["apps"].items()):
        where = f"NEAR MPC contract, app {name}"
        for method in ("vote_add_launcher_hash", "vote_code_hash"):
            if method in app:
                out.append(Entry(where, method, app[method]))
        for vote in app.get("vote_add_os_measurement") or []:
            out.append(Entry(where, "vote_add_os_measurement", {"measurement": vote["measurement"]}))
    return out


def _kms(document: Mapping[str, Any]) -> list[Entry]:
    out = []
    apps = (document.get("outputs") or {}).get("apps") or {}
    measurements = document.get("measurements") or {}
    for name, app in sorted(apps.items()):
        if not isinstance(app, dict) or app.get("keyProvider") != "kms" or app.get("target") == "phala":
            continue
        expected = measurements.get(f"app:{name}") or {}
        compose, os_image = expected.get("compose_hash"), expected.get("os_image_hash")
        if isinstance(compose, str) and _HEX64.fullmatch(compose):
            out.append(Entry(f"dstack KMS, app {name}", "DstackApp.addComposeHash", f"0x{compose}"))
        if isinstance(os_image, str) and _HEX64.fullmatch(os_image):
            out.append(Entry(f"dstack KMS, app {name}", "DstackKms.addOsImageHash", f"0x{os_image}"))
    return out


def entries(document: Mapping[str, Any]) -> list[Entry]:
    """Every allow-list value a plan document (or the deployed outputs, shaped alike) needs."""
    return _near(document) + _kms(document)


def removal(entry: Entry) -> str | None:
    if entry.method.startswith("DstackApp.add") or entry.method.startswith("DstackKms.add"):
        return entry.method.replace(".add", ".remove", 1)
    return NEAR_REMOVAL.get(entry.method)


@dataclass
class Changes:
    add: list[Entry]
    remove: list[Entry]

    def before_lines(self) -> list[str]:
        if not self.add:
            return []
        return (["Allow-lists: add these before the first wave (a new node is admitted only with them):"]
                + [f"  {i}. {e.call()}" for i, e in enumerate(self.add, 1)])

    def after_lines(self) -> list[str]:
        if not self.remove:
            return []
        lines = ["Allow-lists: remove these now that the last wave is done (no node runs them any more):"]
        for i, entry in enumerate(self.remove, 1):
            method = removal(entry)
            lines.append(f"  {i}. " + (entry.call(method) if method else
                                       f"{entry.call()}: no removal call; it expires with the contract's "
                                       "tee_upgrade_deadline_duration_seconds"))
        return lines


def deployed_document(outputs: Mapping[str, Any], stack: str) -> dict[str, Any]:
    """The deployed stack's outputs in the shape of a plan document."""
    measurements = outputs.get("measurements") if isinstance(outputs.get("measurements"), dict) else {}
    return {"stack": stack, "outputs": dict(outputs), "measurements": measurements}


def compare(old: Mapping[str, Any], new: Mapping[str, Any]) -> Changes:
    before, after = entries(old), entries(new)
    old_keys, new_keys = {e.key() for e in before}, {e.key() for e in after}
    return Changes([e for e in after if e.key() not in old_keys], [e for e in before if e.key() not in new_keys])
