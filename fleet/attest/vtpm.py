"""The vTPM lane of dstack on GCP: the TCG2 event log of the guest's vTPM, and the TPM quote that
authenticates it.

dstack's GCP verifier binds the OS image through the vTPM (Dstack-TEE/dstack f1ba0a22
``verifier/src/verification.rs`` ``verify_os_image_hash_for_gcp_tdx``): PCR0 must be GCP's OVMF
(its ``EXPECTED_PCR0``), then the third PCR2 event ("event 28" in GCP's log) is the UKI's
Authenticode SHA-256, which must be the image's. Here PCR0 is looked up in a dated table of GCE
firmware (``bootchain.FIRMWARES``; the verifier's constant is one entry) so that a firmware we have
not recorded reads *unknown*, not *mismatch*, and the UKI event is compared with the lock's
``uki_hash``.

A log is only the guest's word. It counts when a TPM quote over these PCRs, signed by an attestation
key that chains to Google's vTPM CA, vouches for it: the go-tpm-tools ``Attestation`` that
``gotpm attest --key gceAK`` writes carries the AK's public area and certificate and quotes over
every PCR bank. Its SHA-256 quote is checked as google/go-tpm-tools
67670e5c021a24f2366eb1808db2659211af5eb2 ``server/verify.go`` ``VerifyAttestation`` does (the AK
certificate against Google's CA, the quote with ``quote/quote.go`` ``Verify``, the log replayed to the
quoted PCRs), and further: the certificate's key must be ``ak_pub``'s, the quote's qualifiedSigner
must be ``ak_pub`` as a primary key of the endorsement hierarchy (where GCE makes its AK), so that
``ak_pub``'s attributes (a restricted signing key that never leaves the TPM) are the signing key's.
Without an attestation, or when one of its checks fails, every result here says
"replayed, not authenticated".
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timezone

from cryptography import x509

from fleet.attest import bootchain, gotpm, tcg, tpmquote, vtpmca
from fleet.attest.checks import Check, InputError, compare, read_bytes

MAX_TPM_LOG_BYTES = tcg.MAX_LOG_BYTES
UNAUTHENTICATED = "replayed, not authenticated"
AUTHENTICATED = "authenticated by the vTPM quote"
AUTHENTICITY = "vTPM log authenticity"
_FIRMWARE_OBJECT = re.compile(rb"ovmf_x64_csm/([0-9a-f]{96})\.fd")
UKI_EVENT = 2  # the verifier's index among PCR2 events (separator, GPT, UKI, kernel)
BANK = "sha256"  # the bank this lane replays (dstack's verifier reads SHA-256 PCRs)


def parse(data: bytes, source: str) -> tcg.EventLog:
    try:
        log = tcg.parse(data, allow_padding=False)
    except tcg.EventLogError as exc:
        raise InputError(f"{source}: {exc}") from None
    if BANK not in log.algorithms:
        raise InputError(f"{source}: the log has no SHA-256 bank; pass the vTPM's binary_bios_measurements")
    return log


def read(path: str) -> tcg.EventLog:
    return parse(read_bytes(path, "--tpm-event-log", MAX_TPM_LOG_BYTES), f"--tpm-event-log {path}")


# ---------------------------------------------------------------------------------------------
# The TPM attestation


@dataclass(frozen=True)
class Evidence:
    """A go-tpm-tools Attestation, its parts parsed: what ``attestation_checks`` judges."""

    source: str
    attestation: gotpm.Attestation
    ak: tpmquote.Public
    ak_cert: x509.Certificate | None
    intermediates: tuple[x509.Certificate, ...]
    quote: gotpm.Quote  # the one over the SHA-256 bank
    attest: tpmquote.Attest
    signature: tpmquote.Signature


def _certificate(der: bytes, what: str) -> x509.Certificate:
    try:
        return vtpmca.load(der)
    except ValueError as exc:
        raise InputError(f"{what} is not a DER X.509 certificate ({str(exc)[:120]})") from None


def parse_attestation(data: bytes, source: str) -> Evidence:
    """An ``Evidence``, or an ``InputError`` naming the first part that does not parse."""
    attestation = gotpm.parse(data, source)
    try:
        ak = tpmquote.parse_public(attestation.ak_pub)
    except tpmquote.TpmStructureError as exc:
        raise InputError(f"{source}: ak_pub: {exc}") from None
    cert = _certificate(attestation.ak_cert, f"{source}: ak_cert") if attestation.ak_cert else None
    intermediates = tuple(_certificate(der, f"{source}: intermediate_certs[{index}]")
                          for index, der in enumerate(attestation.intermediate_certs))
    wanted = tpmquote.HASH_IDS[BANK]
    indexes = [index for index, q in enumerate(attestation.quotes) if q.hash == wanted]
    if len(indexes) != 1:
        banks = ", ".join(tpmquote.hash_name(q.hash) for q in attestation.quotes)
        raise InputError(f"{source}: {len(indexes)} quotes over the SHA-256 PCR bank (the quotes are over: "
                         f"{banks}); this lane needs exactly one")
    index = indexes[0]
    quote = attestation.quotes[index]
    try:
        attest = tpmquote.parse_attest(quote.quote)
        signature = tpmquote.parse_signature(quote.raw_sig)
    except tpmquote.TpmStructureError as exc:
        raise InputError(f"{source}: quotes[{index}]: {exc}") from None
    return Evidence(source, attestation, ak, cert, intermediates, quote, attest, signature)


def read_attestation(path: str) -> Evidence:
    data = read_bytes(path, "--tpm-attestation", gotpm.MAX_ATTESTATION_BYTES)
    return parse_attestation(data, f"--tpm-attestation {path}")


def _stamp(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _ranges(pcrs: list[int] | tuple[int, ...]) -> str:
    return tpmquote.PcrSelection(0, tuple(sorted(pcrs))).describe().split(":", 1)[1]


def _pcr_checks(evidence: Evidence, log: tcg.EventLog) -> list[Check]:
    """The quote covers the PCRs the attestation gives values for, those values hash to the quoted
    digest, and the log replays to them (go-eventlog ``tcg/pfpformat.go`` ``replayEvents``, via
    go-tpm-tools ``server/eventlog.go``: every quoted PCR with events must replay to its value;
    here, also every PCR the log extends must be quoted)."""
    quote, attest = evidence.quote, evidence.attest
    given = tpmquote.PcrSelection(quote.hash, tuple(sorted(quote.pcrs)))
    rows = []
    selection_holds = attest.selections == (given,)
    rows.append(Check("vTPM quote PCR selection", f"{given.describe()} (the PCR values given)",
                      " ".join(s.describe() for s in attest.selections) or "none", selection_holds,
                      "the quote covers other PCRs than the attestation gives values for"))
    algorithm = tpmquote.hash_name(evidence.signature.hash)
    if selection_holds and algorithm in tpmquote.HASH_IDS:
        values = {(quote.hash, pcr): value for pcr, value in quote.pcrs.items()}
        recomputed = tpmquote.pcr_digest(attest.selections, values, algorithm)
        rows.append(compare(f"vTPM quote PCR digest ({algorithm.upper()})", attest.pcr_digest.hex(), recomputed.hex(),
                            "the PCR values are not the ones the TPM quoted"))
    replayed = log.replay(BANK)
    registers = sorted(replayed)
    unquoted = [r for r in registers if r not in quote.pcrs]
    differ = [r for r in registers if r in quote.pcrs and quote.pcrs[r] != replayed[r]]
    actual = "; ".join(part for part in (f"PCR {_ranges(differ)} differ" if differ else "",
                                         f"PCR {_ranges(unquoted)} not quoted" if unquoted else "") if part)
    rows.append(Check("vTPM log replay = quoted PCRs", f"PCR {_ranges(registers)} as quoted ({BANK.upper()})",
                      actual or f"{len(registers)} PCRs match", not (differ or unquoted),
                      "the event log is not the log of the quoted boot"))
    return rows


def attestation_checks(evidence: Evidence, log: tcg.EventLog, *, nonce: bytes | None,
                       at: datetime) -> tuple[list[Check], str | None]:
    """Every check of the attestation, and the Google root the AK chains to when all of them hold."""
    rows: list[Check] = []
    ak, attest, signature = evidence.ak, evidence.attest, evidence.signature
    chain = None
    if evidence.ak_cert is None:
        rows.append(Check("vTPM AK certificate", "chains to a Google vTPM root", "none in the attestation", False,
                          "take it with `gotpm attest --key gceAK`, which adds GCE's AK certificate"))
    else:
        chain = vtpmca.verify_ak_certificate(evidence.ak_cert, evidence.intermediates, at)
        where = vtpmca.instance(evidence.ak_cert)
        rows.append(Check("vTPM AK certificate", f"chains to a Google vTPM root at {_stamp(at)}",
                          chain.describe() + (f"; {where}" if where else ""), chain.problem is None,
                          chain.problem or ""))
        rows.append(Check("vTPM AK certificate key = ak_pub", ak.describe(),
                          "the same key" if tpmquote.same_key(ak.key, evidence.ak_cert.public_key())
                          else "another key", tpmquote.same_key(ak.key, evidence.ak_cert.public_key()),
                          "the certificate is not for the key that signed the quote"))
    rows.append(compare("vTPM quote signer = ak_pub", ak.primary_qualified_name().hex(),
                        attest.qualified_signer.hex(),
                        "the quote names another signing key than ak_pub as an endorsement-hierarchy primary key "
                        "(how GCE makes its AK)"))
    rows.append(Check("vTPM AK attributes", "fixedTPM, restricted, sign", ak.describe_attributes(),
                      ak.attributes & tpmquote.AK_ATTRIBUTES == tpmquote.AK_ATTRIBUTES,
                      "not a restricted signing key that stays in the TPM, so it could sign what the TPM did not "
                      "generate"))
    rows.append(Check("vTPM quote magic", f"{tpmquote.TPM_GENERATED_VALUE:08x} (TPM_GENERATED_VALUE)",
                      f"{attest.magic:08x}", attest.magic == tpmquote.TPM_GENERATED_VALUE,
                      "not a structure the TPM generated"))
    problem = tpmquote.verify_signature(ak.key, signature, evidence.quote.quote)
    rows.append(Check("vTPM quote signature", f"{signature.describe()} by the AK over the quote",
                      "valid" if problem is None else "invalid", problem is None, problem or ""))
    if nonce is None:
        rows.append(Check("vTPM quote nonce", "", attest.extra_data.hex() or "(empty)", None,
                          "no --tpm-nonce: whether the quote is fresh is not checked"))
    else:
        rows.append(compare("vTPM quote nonce", nonce.hex() or "(empty)", attest.extra_data.hex() or "(empty)",
                            "the quote was not made for this nonce (an old quote, or another request's)"))
    rows += _pcr_checks(evidence, log)
    holds = all(row.holds is not False for row in rows)
    return rows, chain.root if holds and chain is not None else None


def summary(evidence: Evidence) -> list[str]:
    """The attestation's facts, for the section printed above the checks."""
    attest, ak = evidence.attest, evidence.ak
    lines = [("AK", f"{ak.describe()}, {ak.describe_attributes()}"),
             ("AK cert", (vtpmca.instance(evidence.ak_cert) or vtpmca.label(evidence.ak_cert))
              if evidence.ak_cert is not None else "(none)"),
             ("signer (QN)", attest.qualified_signer.hex()),
             ("extraData", attest.extra_data.hex() or "(empty)"),
             ("clock", f"{attest.clock} ms, reset {attest.reset_count}, restart {attest.restart_count}, "
                       f"safe {attest.safe}"),
             ("firmware", f"0x{attest.firmware_version:016x}"),
             ("PCRs", " ".join(s.describe() for s in attest.selections)),
             ("signature", evidence.signature.describe())]
    return [f"  {name:<13} {value}" for name, value in lines]


# ---------------------------------------------------------------------------------------------
# The log


def firmware_object(log: tcg.EventLog) -> str | None:
    """The GCE firmware object the SP800-155 event names (its SHA-384), if any."""
    for event in log.on(0):
        if event.event_type == tcg.EV_NO_ACTION and (match := _FIRMWARE_OBJECT.search(event.data)):
            return match.group(1).decode("ascii")
    return None


def uki_event(log: tcg.EventLog) -> tcg.Event | None:
    events = log.on(2)
    return events[UKI_EVENT] if len(events) > UKI_EVENT else None


def checks(log: tcg.EventLog, *, uki_hash: str | None, quote_mrtd: str | None, evidence: Evidence | None = None,
           nonce: bytes | None = None, at: datetime | None = None) -> list[Check]:
    quote_rows: list[Check] = []
    root = None
    if evidence is not None:
        quote_rows, root = attestation_checks(evidence, log, nonce=nonce, at=at or datetime.now(timezone.utc))
    out = list(quote_rows)
    state = AUTHENTICATED if root else UNAUTHENTICATED
    pcrs = log.replay(BANK)
    pcr0 = pcrs.get(0, bytes(32)).hex()
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
        out.append(Check("vTPM PCR0 (GCE firmware)", firmware.pcr0 or "", f"{pcr0} = {firmware.name} ({state})", True))
    named = firmware_object(log)
    named_firmware = next((f for f in bootchain.FIRMWARES if f.firmware_sha384 == named), None)
    if named is not None and firmware is not None and named_firmware is not None:
        out.append(Check("vTPM firmware object = PCR0 firmware", firmware.name, named_firmware.name,
                         named_firmware is firmware, "the log's SP800-155 event names other firmware than PCR0 shows"))
    if quote_mrtd is not None and named_firmware is not None:
        out.append(Check("vTPM firmware = quote MRTD", named_firmware.mrtd, quote_mrtd, named_firmware.mrtd == quote_mrtd,
                         "the vTPM log is from a boot on other firmware than the quoted TD"))
    event = uki_event(log)
    actual = "(no third PCR2 event)" if event is None else f"{event.digests.get(BANK, b'').hex()} ({event.type_name})"
    if uki_hash is None:
        out.append(Check("vTPM PCR2 UKI event", "", actual, None, "no expected UKI hash (the plan or --uki-hash)"))
    else:
        holds = event is not None and event.digests.get(BANK, b"").hex() == uki_hash.lower()
        out.append(Check("vTPM PCR2 UKI event", uki_hash.lower(), actual if not holds else f"{actual}, {state}",
                         holds, "the vTPM log booted a different UKI than the image's"))
    expected = "a TPM quote by an AK chaining to Google's vTPM CA"
    if evidence is None:
        out.append(Check(AUTHENTICITY, expected, "none", None,
                         f"{UNAUTHENTICATED}: no TPM quote (--tpm-attestation)"))
    elif root is not None:
        out.append(Check(AUTHENTICITY, expected, f"authenticated (AK chains to Google vTPM root {root})", True))
    else:
        failing = [row.name for row in quote_rows if row.holds is False]
        out.append(Check(AUTHENTICITY, expected, "not authenticated: " + ", ".join(failing), False, UNAUTHENTICATED))
    return out
