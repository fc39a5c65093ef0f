"""The vTPM lane of dstack on GCP: the TCG2 event log of the guest's vTPM.

dstack's GCP verifier binds the OS image through the vTPM (Dstack-TEE/dstack f1ba0a22
``verifier/src/verification.rs`` ``verify_os_image_hash_for_gcp_tdx``): PCR0 must be GCP's OVMF
(its ``EXPECTED_PCR0``), then the third PCR2 event ("event 28" in GCP's log) is the UKI's
Authenticode SHA-256, which must be the image's. Here PCR0 is looked up in a dated table of GCE
firmware (``bootchain.FIRMWARES``; the verifier's constant is one entry) so that a firmware we have
not recorded reads *unknown*, not *mismatch*, and the UKI event is compared with the lock's
``uki_hash``.

A log is only the guest's word. It counts when a TPM quote over these PCRs, signed by an attestation
key that chains to Google's vTPM CA, vouches for it; without one, every result here says
"replayed, not authenticated".
"""

from __future__ import annotations

import re

from fleet.attest import bootchain, tcg
from fleet.attest.checks import Check, InputError, read_bytes

MAX_TPM_LOG_BYTES = tcg.MAX_LOG_BYTES
UNAUTHENTICATED = "replayed, not authenticated"
_FIRMWARE_OBJECT = re.compile(rb"ovmf_x64_csm/([0-9a-f]{96})\.fd")
UKI_EVENT = 2  # the verifier's index among PCR2 events (separator, GPT, UKI, kernel)


def parse(data: bytes, source: str) -> tcg.EventLog:
    try:
        log = tcg.parse(data, allow_padding=False)
    except tcg.EventLogError as exc:
        raise InputError(f"{source}: {exc}") from None
    if "sha256" not in log.algorithms:
        raise InputError(f"{source}: the log has no SHA-256 bank; pass the vTPM's binary_bios_measurements")
    return log


def read(path: str) -> tcg.EventLog:
    return parse(read_bytes(path, "--tpm-event-log", MAX_TPM_LOG_BYTES), f"--tpm-event-log {path}")


def firmware_object(log: tcg.EventLog) -> str | None:
    """The GCE firmware object the SP800-155 event names (its SHA-384), if any."""
    for event in log.on(0):
        if event.event_type == tcg.EV_NO_ACTION and (match := _FIRMWARE_OBJECT.search(event.data)):
            return match.group(1).decode("ascii")
    return None


def uki_event(log: tcg.EventLog) -> tcg.Event | None:
    events = log.on(2)
    return events[UKI_EVENT] if len(events) > UKI_EVENT else None


def checks(log: tcg.EventLog, *, uki_hash: str | None, quote_mrtd: str | None) -> list[Check]:
    pcrs = log.replay("sha256")
    pcr0 = pcrs.get(0, bytes(32)).hex()
    out: list[Check] = []
    forged = tcg.data_mismatches(log)
    out.append(Check("vTPM event data", "hashes to the logged digests",
                     f"events {', '.join(f'#{e.number}' for e in forged)} differ" if forged
                     else f"{len(log.events)} events", not forged, "the log shows data that is not what was measured"))
    firmware = bootchain.firmware_by_pcr0(pcr0)
    known = ", ".join(f"{f.name} {f.pcr0[:16]}" for f in bootchain.FIRMWARES if f.pcr0)
    if firmware is None:
        out.append(Check("vTPM PCR0 (GCE firmware)", f"one of: {known}", pcr0, None,
                         "unknown firmware: not in fleet.attest.bootchain.FIRMWARES (not a mismatch)"))
    else:
        out.append(Check("vTPM PCR0 (GCE firmware)", firmware.pcr0 or "", f"{pcr0} = {firmware.name} ({UNAUTHENTICATED})",
                         True))
    named = firmware_object(log)
    named_firmware = next((f for f in bootchain.FIRMWARES if f.firmware_sha384 == named), None)
    if named is not None and firmware is not None and named_firmware is not None:
        out.append(Check("vTPM firmware object = PCR0 firmware", firmware.name, named_firmware.name,
                         named_firmware is firmware, "the log's SP800-155 event names other firmware than PCR0 shows"))
    if quote_mrtd is not None and named_firmware is not None:
        out.append(Check("vTPM firmware = quote MRTD", named_firmware.mrtd, quote_mrtd, named_firmware.mrtd == quote_mrtd,
                         "the vTPM log is from a boot on other firmware than the quoted TD"))
    event = uki_event(log)
    actual = "(no third PCR2 event)" if event is None else f"{event.digests.get('sha256', b'').hex()} ({event.type_name})"
    if uki_hash is None:
        out.append(Check("vTPM PCR2 UKI event", "", actual, None, "no expected UKI hash (the plan or --uki-hash)"))
    else:
        holds = event is not None and event.digests.get("sha256", b"").hex() == uki_hash.lower()
        out.append(Check("vTPM PCR2 UKI event", uki_hash.lower(), actual if not holds else f"{actual}, {UNAUTHENTICATED}",
                         holds, "the vTPM log booted a different UKI than the image's"))
    out.append(Check("vTPM log authenticity", "a TPM quote by an AK chaining to Google's vTPM CA", "none", None,
                     f"{UNAUTHENTICATED}: TPM quote verification is not implemented"))
    return out
