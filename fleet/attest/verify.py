"""``python -m fleet verify``: check what a TDX guest reports, lane by lane, against itself, Intel's
collateral and the plan. Exit 0 all hold, 1 a check failed, 2 unreadable or malformed input, 3 the
program itself failed.

* ``--quote`` (binary, hex, base64 or a JSON byte array, TDX v4 or v5): its registers and report
  data are printed; with ``--collateral`` (or ``--pccs-url``, which fetches it and keeps it in the
  ``--collateral`` file) its signature chain, TCB status (``UpToDate`` unless
  ``--accept-tcb-status`` accepts more), advisories and TDX module identity are checked.
* ``--tcb-info``: a dstack guest's TcbInfo, whose RTMR3 log is replayed and whose app-compose is
  hashed. On its own it is unsigned JSON and only shows it is self-consistent.
* ``--ccel``: the CC event log, replayed to RTMR0-2 and compared with the quote, each event shown.
* ``--tpm-event-log``: the vTPM log, replayed; PCR0 against the GCE firmware table and PCR2's UKI
  event against the image's UKI hash. Without a TPM quote (``--tpm-attestation``) it is "replayed,
  not authenticated".
* ``--tpm-attestation``: the vTPM's quote as ``gotpm attest --key gceAK --format binarypb`` writes
  it (a go-tpm-tools Attestation; its event log is used when ``--tpm-event-log`` is not given). Its
  AK certificate must chain to Google's vTPM CA at ``--at`` (default now), the SHA-256 quote must be
  signed by that AK, cover the PCR values given and carry ``--tpm-nonce`` when one is given, and the
  log must replay to the quoted PCRs; then the lane says "authenticated (AK chains to Google vTPM
  root ...)", else it names the failing check.
* ``--plan``/``--target``: every register the plan predicts (MRTD per firmware, RTMR0-3) and every
  RTMR3 event; a target with nothing planned to compare fails.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import dcap_qvl
from dstack_sdk import EventLog
from pydantic import ValidationError

from fleet.attest import bootchain, ccel, measure, quote as quotes, tcg, vtpm
from fleet.attest.checks import (Check, InputError, compare as _compare, iso, load_json as _load_json,  # noqa: F401
                                 one_line as _one_line, parse_time, read_bytes)  # iso, parse_time: part of this API
from fleet.attest.quote import DEFAULT_TCB_STATUSES, GENUINE, SIGNATURE
from fleet.config.values import SECRET_MARK, UNKNOWN_MARK

EXIT_OK, EXIT_MISMATCH, EXIT_INPUT, EXIT_PROGRAM = 0, 1, 2, 3
REGISTERS = ("rtmr0", "rtmr1", "rtmr2", "rtmr3")
MAX_TCB_INFO_BYTES = 8 * 1024 * 1024
_NOT_PLANNED = (*measure.MARKERS, UNKNOWN_MARK, SECRET_MARK)
_HEX = re.compile(r"(?:[0-9a-fA-F]{2})*")


@dataclass(frozen=True)
class TcbInfo:
    """The parts of the guest agent's TcbInfo that ``verify`` reads. (dstack-sdk's ``TcbInfo``
    model requires mrtd and rtmr0-2, which TcbInfos with only RTMR3 lack, so only its
    ``EventLog`` entry model is used.)"""

    app_compose: str
    compose: dict[str, Any]
    event_log: list[EventLog]
    registers: dict[str, str] = field(default_factory=dict)  # "mrtd", "rtmr0".. when present
    compose_hash: str | None = None
    os_image_hash: str | None = None


# ---------------------------------------------------------------------------------------------
# Reading input


def _hex_field(document: Mapping[str, Any], key: str, length: int, source: str) -> str | None:
    value = document.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str) or not re.fullmatch(f"[0-9a-fA-F]{{{length}}}", value):
        raise InputError(f"{source}: {key} is not {length} hex characters ({str(value)[:20]!r}...)")
    return value.lower()


def _reject_v2(reason: str) -> InputError:
    return InputError(f"{reason}: event_log_version 2 digests are not supported yet; verify a guest using v1 digests")


def parse_event_log(value: Any, source: str = "TcbInfo") -> list[EventLog]:
    """``event_log`` as a list or as the JSON string the guest agent returns."""
    if isinstance(value, str):
        value = _load_json(value, f"{source}: event_log string")
    if not isinstance(value, list):
        raise InputError(f"{source}: event_log is not a list of events")
    events = []
    for index, entry in enumerate(value):
        where = f"{source}: event_log[{index}]"
        if not isinstance(entry, dict):
            raise InputError(f"{where} is not an object")
        if entry.get("version", 1) != 1 or "preimage" in entry or "hash_input" in entry:
            raise _reject_v2(f"{where} is a v2 event")
        runtime = entry.get("event_type") == measure.RUNTIME_EVENT_TYPE
        if runtime:
            entry = {"digest": "", **entry}  # newer guests leave runtime digests out
        try:
            event = EventLog.model_validate(entry)
        except ValidationError as exc:
            error = exc.errors()[0]
            key = ".".join(str(p) for p in error["loc"])
            raise InputError(f"{where}.{key}: {error['msg'].lower()}") from None
        for key in ("digest", "event_payload"):
            if not _HEX.fullmatch(getattr(event, key)):
                raise InputError(f"{where}.{key} is not hex")
        if not runtime and not event.digest:
            raise InputError(f"{where}.digest is empty; a firmware event is replayed from its logged digest")
        events.append(event)
    return events


def parse_tcb_info(document: Any, source: str = "TcbInfo") -> TcbInfo:
    """A TcbInfo object, or the guest agent's Info response that wraps one in ``tcb_info``."""
    if isinstance(document, dict) and "tcb_info" in document:
        inner = document["tcb_info"]
        document = _load_json(inner, f"{source}: tcb_info") if isinstance(inner, str) else inner
    if not isinstance(document, dict):
        raise InputError(f"{source} is not a JSON object")
    missing = [key for key in ("app_compose", "event_log") if key not in document]
    if missing:
        raise InputError(f"{source}: missing {', '.join(missing)}; pass the guest agent's full TcbInfo")
    app_compose = document["app_compose"]
    if not isinstance(app_compose, str):
        raise InputError(f"{source}: app_compose is not a string (it holds the exact app-compose.json text)")
    compose = _load_json(app_compose, f"{source}: app_compose")
    if not isinstance(compose, dict):
        raise InputError(f"{source}: app_compose is not a JSON object")
    if measure.event_log_version(compose) != 1:
        raise _reject_v2(f"{source}: app_compose sets event_log_version {compose.get('event_log_version')!r}")
    registers = {
        key: value for key in ("mrtd", *REGISTERS)
        if (value := _hex_field(document, key, 96, source)) is not None
    }
    return TcbInfo(
        app_compose=app_compose,
        compose=compose,
        event_log=parse_event_log(document["event_log"], source),
        registers=registers,
        compose_hash=_hex_field(document, "compose_hash", 64, source),
        os_image_hash=_hex_field(document, "os_image_hash", 64, source),
    )


def read_tcb_info(path: str) -> TcbInfo:
    data = read_bytes(path, "--tcb-info", MAX_TCB_INFO_BYTES)
    return parse_tcb_info(_load_json(data, f"--tcb-info {path}"), f"--tcb-info {path}")


def parse_quote_bytes(data: bytes, source: str = "quote") -> bytes:
    """A JSON array of bytes, hex or base64 (bare, JSON or GetQuote's ``quote``), or raw binary."""
    return quotes.decode_quote(data, source)


def parse_quote(raw: bytes, source: str = "quote") -> Any:
    return quotes.parse(raw, source)


def read_collateral(path: str) -> dcap_qvl.QuoteCollateralV3:
    return quotes.read_collateral(path)


def read_expectation(path: str, target: str) -> dict[str, Any]:
    """``measurements[target]`` of a plan JSON (``python -m fleet plan --json``)."""
    plan = _load_json(read_bytes(path, "--plan"), f"--plan {path}", "write it with `python -m fleet plan --json`")
    measurements = plan.get("measurements") if isinstance(plan, dict) else None
    if not isinstance(measurements, dict):
        raise InputError(f"--plan {path}: no 'measurements' object; write it with `python -m fleet plan --json`")
    if target not in measurements:
        known = ", ".join(sorted(measurements)) or "none"
        raise InputError(f"--target {target!r} is not in the plan's measurements; known targets: {known}")
    expectation = measurements[target]
    if not isinstance(expectation, dict) or "kind" not in expectation:
        raise InputError(f"--plan {path}: measurements[{target!r}] is not a measurement object")
    return expectation


# ---------------------------------------------------------------------------------------------
# Checks


@dataclass(frozen=True)
class _Replay:
    rtmr3_events: list[EventLog]
    registers: dict[str, str]  # replayed value per register that has events

    def boot_events(self) -> list[EventLog]:
        """System events: up to and including ``system-ready`` (dstack's verifier stops there, so
        an app event cannot stand in for a system event)."""
        names = [e.event for e in self.rtmr3_events]
        end = names.index("system-ready") + 1 if "system-ready" in names else len(names)
        return self.rtmr3_events[:end]

    def app_events(self) -> list[EventLog]:
        return self.rtmr3_events[len(self.boot_events()):]

    def find(self, name: str, *, app: bool = False) -> EventLog | None:
        return next((e for e in (self.app_events() if app else self.boot_events()) if e.event == name), None)


def _event_log_checks(tcb: TcbInfo) -> tuple[_Replay, list[Check]]:
    checks: list[Check] = []
    # GCP's CCEL numbers some entries from 0: only the type marks an event as dstack's RTMR3 event.
    rtmr3_events = [e for e in tcb.event_log if e.imr == 3 and e.event_type == measure.RUNTIME_EVENT_TYPE]
    strays = [e for e in tcb.event_log if e.imr == 3 and e.event_type != measure.RUNTIME_EVENT_TYPE]
    if strays:
        checks.append(Check("imr 3 events of other types", "none", str(len(strays)), None,
                            "not dstack runtime events; left out of the RTMR3 replay"))
    bad = []
    for index, event in enumerate(rtmr3_events):
        computed = measure.event_digest(event.event, bytes.fromhex(event.event_payload)).hex()
        if event.digest and event.digest.lower() != computed:
            bad.append(Check(f"digest of event #{index} {event.event}", computed, event.digest.lower(), False,
                             "the logged digest is not the digest of its name and payload"))
    checks += bad or [Check("RTMR3 event digests", "recomputed from name and payload",
                            f"{len(rtmr3_events)} events match", True)]
    registers: dict[str, str] = {}
    for index, register in enumerate(REGISTERS):
        if index == 3:
            # Recomputed, not as logged: the log's digests are not trusted.
            digests = [measure.event_digest(e.event, bytes.fromhex(e.event_payload)) for e in rtmr3_events]
        else:
            digests = [bytes.fromhex(e.digest) for e in tcb.event_log if e.imr == index]
        if digests or index == 3:
            registers[register] = measure.replay(digests).hex()
    for register, value in registers.items():
        if register in tcb.registers:
            checks.append(_compare(f"{register} replay = TcbInfo", value, tcb.registers[register],
                                   "the event log does not replay to the TcbInfo's register"))
        else:
            checks.append(Check(f"{register} replay", "", value, None, f"the TcbInfo has no {register}"))
    return _Replay(rtmr3_events, registers), checks


def _payload_text(event: EventLog | None) -> str:
    return "(no such event)" if event is None else event.event_payload.lower()


def _compose_checks(tcb: TcbInfo, replay: _Replay) -> list[Check]:
    computed = measure.compose_hash(tcb.app_compose.encode("utf-8"))
    checks = []
    if tcb.compose_hash is not None:
        checks.append(_compare("compose_hash = sha256(app_compose)", computed, tcb.compose_hash,
                               "app_compose is not the file the guest hashed"))
    checks.append(_compare("compose-hash event", computed, _payload_text(replay.find("compose-hash")),
                           "RTMR3 measured a different app-compose"))
    kind = measure.key_provider_kind(tcb.compose)
    app_id = replay.find("app-id")
    if kind == "kms":
        # a KMS app emits .instance_info's app id: pinned at deploy, else the compose-derived one
        checks.append(Check("app-id event", "pinned or compose-derived", _payload_text(app_id), None,
                            "KMS mode: compare with --plan"))
    else:
        checks.append(_compare("app-id event", measure.app_id_from_compose_hash(computed), _payload_text(app_id),
                               "not the compose-hash prefix dstack uses without a KMS"))
    checks.append(_compare("key-provider event", measure.KEY_PROVIDER_EVENT_NAMES.get(kind, kind),
                           str(_key_provider(replay.find("key-provider")).get("name", "(unreadable)")),
                           f"app_compose selects key provider {kind!r}"))
    return checks


def _key_provider(event: EventLog | None) -> dict[str, str]:
    if event is None:
        return {"name": "(no such event)", "id": ""}
    try:
        value = json.loads(bytes.fromhex(event.event_payload))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def _quote_checks(tcb: TcbInfo | None, replay: _Replay | None, quoted: Mapping[str, str], report: Any,
                  report_data: str | None) -> list[Check]:
    checks = []
    if tcb is not None and replay is not None:
        for register, value in quoted.items():
            if register in replay.registers:
                checks.append(_compare(f"{register} replay = quote", replay.registers[register], value,
                                       "the event log is not the log of the quoted TD"))
            if register in tcb.registers and register not in replay.registers:
                checks.append(_compare(f"{register} TcbInfo = quote", tcb.registers[register], value,
                                       "the TcbInfo is not from the quoted TD"))
            if register not in tcb.registers and register not in replay.registers:
                checks.append(Check(f"{register} (quote)", "", value, None, "neither TcbInfo nor event log has it"))
    if report_data is not None:
        expected = report_data.lower().ljust(128, "0")
        checks.append(_compare("quote report_data", expected, report.report_data.hex(),
                               "the quote was not made for this report data"))
    return checks


MISSING_INPUTS = "missing inputs"


def _plan_value(value: Any) -> str | None:
    """The expected string, or None when the plan could not know it."""
    if value is None or value in _NOT_PLANNED or value == MISSING_INPUTS or not isinstance(value, str):
        return None
    return value.lower()


def _skip_reason(value: Any) -> str:
    if value in measure.MARKERS:
        return str(value)
    if value in (UNKNOWN_MARK, SECRET_MARK):
        return f"plan shows {value}"
    return "not in the plan"


def _planned(name: str, planned: Any, actual: str, note: str, registers: Mapping[str, Any] | None = None,
             register: str | None = None) -> Check:
    expected = _plan_value(planned)
    if expected is None:
        reason = (_missing_for(registers, register) if planned == MISSING_INPUTS and registers is not None
                  and register is not None else _skip_reason(planned))
        return Check(name, str(planned), actual, None, reason)
    return _compare(name, expected, actual, note)


def _plan_checks(tcb: TcbInfo, replay: _Replay, plan: Mapping[str, Any]) -> list[Check]:
    profile = measure.profile_by_name(str(plan.get("profile")))
    planned_events = plan.get("rtmr3_events") or []
    if plan.get("kind") == "overlay-node" or (profile is not None and not profile.has_dstack_events):
        return [_compare("plan: no dstack events", "0", str(len(replay.rtmr3_events)),
                         f"profile {plan.get('profile')} emits no dstack RTMR3 events")]
    checks = [
        _planned("plan app-id", plan.get("app_id"), _payload_text(replay.find("app-id")),
                 "not the app the plan deploys"),
        _planned("plan compose-hash", plan.get("compose_hash"), _payload_text(replay.find("compose-hash")),
                 "not the app-compose the plan deploys"),
    ]
    os_event = replay.find("os-image-hash")
    if os_event is not None:
        checks.append(_planned("plan os-image-hash (event)", plan.get("os_image_hash"), _payload_text(os_event),
                               "a different OS image"))
    elif tcb.os_image_hash is not None:
        checks.append(_planned("plan os-image-hash (TcbInfo field, unmeasured)", plan.get("os_image_hash"),
                               tcb.os_image_hash, "a different OS image"))
    else:
        checks.append(Check("plan os-image-hash", str(plan.get("os_image_hash")), "", None,
                            "the guest reports no os-image-hash"))
    planned_provider = plan.get("key_provider")
    if isinstance(planned_provider, dict):
        actual = _key_provider(replay.find("key-provider"))
        checks.append(_compare("plan key-provider name", str(planned_provider.get("name")),
                               str(actual.get("name")), "a different key provider"))
        checks.append(_planned("plan key-provider id", planned_provider.get("id"), str(actual.get("id")),
                               "a different key provider instance"))
    for name, digest in (plan.get("image_digests") or {}).items():
        to_payload = measure.APP_EVENT_PAYLOADS.get(name)
        expected = digest if to_payload is None or _plan_value(digest) is None else to_payload(digest).hex()
        checks.append(_planned(f"plan {name}", expected, _payload_text(replay.find(name, app=True)),
                               "a different image"))
    if planned_events:
        checks += _planned_event_checks(replay, planned_events, profile)
    else:
        checks.append(Check("plan boot event order", "", "", None, "the plan lists no RTMR3 events"))
    checks.append(_planned("plan rtmr3", plan.get("rtmr3"), replay.registers["rtmr3"], "RTMR3 is not the planned one"))
    return checks


def _planned_event_checks(replay: _Replay, planned_events: list[Any],
                          profile: measure.MeasurementProfile | None) -> list[Check]:
    boot = replay.boot_events()
    actual_names = [e.event for e in boot]
    optional = profile.optional_events if profile else frozenset()
    planned = [e for e in planned_events if isinstance(e, dict) and isinstance(e.get("event"), str)]
    names = [e["event"] for e in planned]
    planned_boot = planned[: names.index("system-ready") + 1] if "system-ready" in names else planned
    expected_names = [e["event"] for e in planned_boot if e["event"] not in optional or e["event"] in actual_names]
    checks = [_compare("plan boot event order", " ".join(expected_names), " ".join(actual_names),
                       "the guest did not boot as the profile says")]
    actual_payloads = {e.event: e.event_payload.lower() for e in boot}
    wrong = [e["event"] for e in planned_boot
             if _plan_value(e.get("payload")) is not None and actual_payloads.get(e["event"]) != e["payload"]]
    known = [e for e in planned_boot if _plan_value(e.get("payload")) is not None]
    checks.append(Check("plan boot event payloads", f"{len(known)} known before boot",
                        f"differ: {', '.join(wrong)}" if wrong else f"{len(known)} match", not wrong,
                        "payloads differ from the plan" if wrong else ""))
    return checks


def _missing_for(plan_registers: Mapping[str, Any], register: str) -> str:
    missing = [str(m).split(": ", 1)[1] for m in plan_registers.get("missing") or []
               if str(m).startswith(f"{register}:") or str(m).startswith(f"{register} ")]
    return "missing inputs: " + "; ".join(missing) if missing else "missing inputs"


def _difference(ccel_log: tcg.EventLog | None, register: str, steps: Any) -> str:
    """Which event of the CCEL parts from the expected ones, when there is a CCEL to look at."""
    if ccel_log is None:
        return "pass the CC event log (--ccel) to see which event differs"
    try:
        return ccel.first_difference(ccel_log, register, steps())
    except (bootchain.MissingInputs, ValueError, KeyError, TypeError):
        return "the expected events cannot be rebuilt from the plan"


def _register_plan_checks(plan_registers: Mapping[str, Any], actual: Mapping[str, str], source: str,
                          ccel_log: tcg.EventLog | None) -> list[Check]:
    """MRTD among the planned firmware, RTMR0 of that firmware, RTMR1 and RTMR2."""
    checks: list[Check] = []
    firmware = {n: e for n, e in (plan_registers.get("firmware") or {}).items() if isinstance(e, dict)}
    platform = plan_registers.get("platform") or {}
    boot = plan_registers.get("boot") or {}
    mrtd = actual.get("mrtd")
    name = next((n for n, e in firmware.items() if e.get("mrtd") == mrtd), None)
    if mrtd is None:
        checks.append(Check("plan mrtd", "one of the planned firmware", "", None, f"the {source} has no MRTD"))
    else:
        checks.append(Check("plan mrtd (GCE firmware)", "one of " + ", ".join(firmware) if firmware else "(none planned)",
                            f"{mrtd} = {name}" if name else mrtd, name is not None if firmware else None,
                            "firmware not in the plan: if Google rolled out new firmware, add it with its source to "
                            "fleet/attest/bootchain.py FIRMWARES" if firmware else "the plan lists no firmware"))
    if name is not None and "rtmr0" in actual:
        known = bootchain.FIRMWARES_BY_NAME.get(name)
        planned = firmware[name].get("rtmr0")
        note = "RTMR0 is not the planned platform; " + _difference(ccel_log, "rtmr0", lambda: bootchain.rtmr0_steps(
            known, str(platform.get("machine_type")), extra_disks=int(platform.get("extra_disks", 0)),
            keyset=str(platform.get("secure_boot_keys")))) if known is not None else "RTMR0 is not the planned one"
        checks.append(_planned(f"plan rtmr0 ({name})", planned, actual["rtmr0"], note, plan_registers, "rtmr0"))
    steps = {"rtmr1": lambda: bootchain.rtmr1_steps(boot),
             "rtmr2": lambda: [] if boot.get("pe_sections_sha384") else bootchain.rtmr2_steps(boot)}
    for register in ("rtmr1", "rtmr2"):
        if register not in actual:
            continue
        note = f"{register.upper()} is not the planned boot; " + _difference(ccel_log, register, steps[register])
        checks.append(_planned(f"plan {register}", plan_registers.get(register), actual[register], note,
                               plan_registers, register))
    return checks


def _actual_registers(tcb: TcbInfo | None, quoted: Mapping[str, str] | None,
                      ccel_log: tcg.EventLog | None) -> tuple[dict[str, str], str]:
    """The registers the plan is compared with: the quote's, else the TcbInfo's, else the CCEL's
    replay (the last two unsigned)."""
    if quoted:
        return dict(quoted), "quote"
    out: dict[str, str] = {}
    label = []
    if ccel_log is not None:
        out.update(ccel.replayed(ccel_log))
        label.append("CCEL replay")
    if tcb is not None and tcb.registers:
        out.update(tcb.registers)
        label.append("TcbInfo")
    return out, " and ".join(label) or "evidence"


def verify_attestation(
    tcb: TcbInfo | None,
    *,
    quote: bytes | None = None,
    collateral: dcap_qvl.QuoteCollateralV3 | None = None,
    at: int | None = None,
    expectation: Mapping[str, Any] | None = None,
    report_data: str | None = None,
    accepted_tcb_statuses: Sequence[str] = DEFAULT_TCB_STATUSES,
    ccel_log: tcg.EventLog | None = None,
    tpm_log: tcg.EventLog | None = None,
    uki_hash: str | None = None,
    tpm_evidence: vtpm.Evidence | None = None,
    tpm_nonce: bytes | None = None,
) -> list[Check]:
    """Every check, in the order printed. Raises ``InputError`` for an unparsable quote."""
    checks: list[Check] = []
    replay = None
    if tcb is not None:
        replay, checks = _event_log_checks(tcb)
        checks += _compose_checks(tcb, replay)
    parsed = quotes.parse(quote) if quote is not None else None
    quoted = quotes.registers(parsed) if parsed is not None else None
    if parsed is not None and quoted is not None and quote is not None:
        checks += _quote_checks(tcb, replay, quoted, parsed.report, report_data)
        if collateral is None:
            checks.append(Check(SIGNATURE, GENUINE, "", None,
                                "no --collateral: the quote's contents are unauthenticated"))
        else:
            now = at if at is not None else int(datetime.now(timezone.utc).timestamp())
            checks += quotes.signature_checks(quote, collateral, now, accepted_tcb_statuses)
            checks += quotes.module_identity_checks(parsed, collateral, accepted_tcb_statuses)
    if ccel_log is not None:
        checks += ccel.checks(ccel_log, quote_registers=quoted, tcb_registers=tcb.registers if tcb else None)
    if tpm_log is not None:
        planned_uki = expectation.get("uki_hash") if expectation else None
        expected_uki = uki_hash or (planned_uki if isinstance(planned_uki, str) and _plan_value(planned_uki) else None)
        moment = datetime.fromtimestamp(at, timezone.utc) if at is not None else datetime.now(timezone.utc)
        checks += vtpm.checks(tpm_log, uki_hash=expected_uki, quote_mrtd=quoted["mrtd"] if quoted else None,
                              evidence=tpm_evidence, nonce=tpm_nonce, at=moment)
    if expectation is not None:
        plan_checks: list[Check] = []
        if tcb is not None and replay is not None and expectation.get("kind") != "dstack-node":
            plan_checks += _plan_checks(tcb, replay, expectation)
        elif quoted is not None and expectation.get("kind") != "dstack-node":
            plan_checks.append(_planned("plan rtmr3", expectation.get("rtmr3"), quoted["rtmr3"],
                                        "RTMR3 is not the planned one"))
        registers = expectation.get("registers")
        if isinstance(registers, dict):
            actual, source = _actual_registers(tcb, quoted, ccel_log)
            plan_checks += _register_plan_checks(registers, actual, source, ccel_log)
        if not any(c.holds is not None for c in plan_checks):
            plan_checks.append(Check("plan values", "at least one value the plan predicts",
                                     "none could be compared", False,
                                     "the plan has no values for this target yet (pending build or missing inputs), "
                                     "so nothing about this guest was verified"))
        checks += plan_checks
    return checks


def quote_section(quote: bytes) -> list[str]:
    return [f"  {name:<13} {value}" for name, value in quotes.summary(quotes.parse(quote))]


def render_sections(*, quote: bytes | None, ccel_log: tcg.EventLog | None, tpm_log: tcg.EventLog | None,
                    tpm_evidence: vtpm.Evidence | None = None) -> str:
    """What the evidence says, printed above the checks: the quote's registers and report data,
    and every event of the event logs in readable form."""
    parts = []
    if quote is not None:
        parts.append("quote:\n" + "\n".join(quote_section(quote)))
    if ccel_log is not None:
        parts.append("CC event log (register, event, SHA-384 prefix):\n" +
                     "\n".join(f"  {line}" for line in ccel.listing(ccel_log)))
    if tpm_log is not None:
        lines = [f"  PCR{e.register:<2} #{e.number:<3} {e.describe()}  {e.digests.get('sha256', b'').hex()[:16]}"
                 for e in tpm_log.events]
        parts.append("vTPM event log (PCR, event, SHA-256 prefix):\n" + "\n".join(lines))
    if tpm_evidence is not None:
        parts.append("vTPM quote (SHA-256 bank):\n" + "\n".join(vtpm.summary(tpm_evidence)))
    return "".join(part + "\n\n" for part in parts)


def failed(checks: Sequence[Check]) -> list[Check]:
    return [c for c in checks if c.holds is False]


def render_table(checks: Sequence[Check]) -> str:
    rows = [("check", "expected", "actual", "result")] + [(c.name, c.expected, c.actual, c.result) for c in checks]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = ["  ".join(cell.ljust(widths[i]) if i < 3 else cell for i, cell in enumerate(row)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths) + "  ------")
    bad = failed(checks)
    skipped = sum(c.holds is None for c in checks)
    if bad:
        lines.append(f"verify: {len(bad)} check(s) failed: {', '.join(c.name for c in bad)}")
    else:
        lines.append(f"verify: all {len(checks) - skipped} checks hold ({skipped} not checked)")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Command line


def _validate(args: argparse.Namespace) -> None:
    if not (args.tcb_info or args.quote or args.ccel or args.tpm_event_log or args.tpm_attestation):
        raise InputError("nothing to verify: give --quote, --tcb-info, --ccel, --tpm-event-log or --tpm-attestation")
    if args.collateral and not args.quote:
        raise InputError("--collateral needs --quote (the quote it verifies)")
    if args.pccs_url and not (args.quote and args.collateral):
        raise InputError("--pccs-url needs --quote and --collateral (the file the fetched collateral is kept in)")
    if args.at and not (args.collateral or args.tpm_attestation):
        raise InputError("--at needs --collateral or --tpm-attestation (it sets the time collateral and "
                         "certificates are checked at)")
    if args.tpm_nonce is not None and not args.tpm_attestation:
        raise InputError("--tpm-nonce needs --tpm-attestation (the quote that must carry it)")
    if args.tpm_nonce is not None and not (_HEX.fullmatch(args.tpm_nonce) and 2 <= len(args.tpm_nonce) <= 128):
        raise InputError("--tpm-nonce is not hex of 1 to 64 bytes (the nonce given to `gotpm attest --nonce`)")
    if bool(args.plan) != bool(args.target):
        raise InputError("--plan and --target go together: name the plan JSON and the node or app in it")
    if args.report_data is not None and not (_HEX.fullmatch(args.report_data) and len(args.report_data) <= 128):
        raise InputError("--report-data is not hex of at most 64 bytes")
    if args.uki_hash is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", args.uki_hash):
        raise InputError("--uki-hash is not a SHA-256 (64 hex characters): the UKI's Authenticode hash")


def _collateral(args: argparse.Namespace, quote: bytes | None) -> dcap_qvl.QuoteCollateralV3 | None:
    """Read the collateral, or with ``--pccs-url`` fetch it and keep it in the ``--collateral``
    file, so what the quote was checked with stays as evidence."""
    if not args.collateral:
        return None
    if args.pccs_url and quote is not None:
        quotes.parse(quote, f"--quote {args.quote}")
        fetched = quotes.fetch_collateral(quote, args.pccs_url)
        try:
            Path(args.collateral).write_text(fetched.to_json(), encoding="utf-8")
        except OSError as exc:
            raise InputError(f"--collateral {args.collateral}: cannot write the fetched collateral ({exc.strerror})") \
                from None
    return read_collateral(args.collateral)


def _tpm_log(args: argparse.Namespace, evidence: vtpm.Evidence | None) -> tcg.EventLog | None:
    """``--tpm-event-log``, else the event log inside ``--tpm-attestation``."""
    if args.tpm_event_log:
        return vtpm.read(args.tpm_event_log)
    if evidence is None:
        return None
    if not evidence.attestation.event_log:
        raise InputError(f"{evidence.source}: the attestation has no event log; pass the vTPM's log with "
                         "--tpm-event-log")
    return vtpm.parse(evidence.attestation.event_log, f"{evidence.source}: event_log")


def run(args: argparse.Namespace) -> int:
    """The ``verify`` subcommand."""
    try:
        _validate(args)
        accepted = quotes.check_statuses(args.accept_tcb_status or ())
        tcb = read_tcb_info(args.tcb_info) if args.tcb_info else None
        quote = quotes.read(args.quote) if args.quote else None
        if quote is not None:
            quotes.parse(quote, f"--quote {args.quote}")
        collateral = _collateral(args, quote)
        at = parse_time(args.at) if args.at else None
        ccel_log = ccel.read(args.ccel) if args.ccel else None
        tpm_evidence = vtpm.read_attestation(args.tpm_attestation) if args.tpm_attestation else None
        tpm_log = _tpm_log(args, tpm_evidence)
        expectation = read_expectation(args.plan, args.target) if args.plan else None
        checks = verify_attestation(
            tcb, quote=quote, collateral=collateral, at=at, expectation=expectation,
            report_data=args.report_data, accepted_tcb_statuses=accepted, ccel_log=ccel_log, tpm_log=tpm_log,
            uki_hash=args.uki_hash.lower() if args.uki_hash else None, tpm_evidence=tpm_evidence,
            tpm_nonce=bytes.fromhex(args.tpm_nonce) if args.tpm_nonce is not None else None,
        )
        sections = render_sections(quote=quote, ccel_log=ccel_log, tpm_log=tpm_log, tpm_evidence=tpm_evidence)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    except Exception as exc:  # noqa: BLE001 - a bug or a library failure: one line, not a traceback
        print(f"error: verify failed unexpectedly ({type(exc).__name__}: {_one_line(exc)})", file=sys.stderr)
        return EXIT_PROGRAM
    sys.stdout.write(sections + render_table(checks))
    return EXIT_MISMATCH if failed(checks) else EXIT_OK


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tcb-info", metavar="FILE", help="the guest agent's TcbInfo JSON (or its Info response)")
    parser.add_argument("--quote", metavar="FILE",
                        help="the TDX quote (v4 or v5): binary, hex, base64, a JSON array of bytes or GetQuote's JSON")
    parser.add_argument("--collateral", metavar="FILE", help="Intel PCS collateral JSON for the quote")
    parser.add_argument("--pccs-url", metavar="URL",
                        help="fetch the quote's collateral from this PCCS (or Intel's PCS, "
                             f"{dcap_qvl.INTEL_PCS_URL}) and keep it in the --collateral file")
    parser.add_argument("--at", metavar="TIME", help="verification time of the collateral and the vTPM AK certificate: "
                                                     "ISO-8601 or unix seconds (default: now)")
    parser.add_argument("--accept-tcb-status", action="append", metavar="STATUS",
                        help="a TCB status to accept besides UpToDate, e.g. SWHardeningNeeded or OutOfDate "
                             "(repeatable)")
    parser.add_argument("--report-data", metavar="HEX", help="the report data the quote must carry")
    parser.add_argument("--ccel", metavar="FILE",
                        help="the CC event log as Linux exposes it (/sys/firmware/acpi/tables/data/CCEL)")
    parser.add_argument("--tpm-event-log", metavar="FILE",
                        help="the vTPM's TCG2 log (/sys/kernel/security/tpm0/binary_bios_measurements)")
    parser.add_argument("--tpm-attestation", metavar="FILE",
                        help="the vTPM's quote, AK and AK certificate as `gotpm attest --key gceAK --format binarypb` "
                             "writes them (a go-tpm-tools Attestation; its event log stands in for --tpm-event-log)")
    parser.add_argument("--tpm-nonce", metavar="HEX",
                        help="the nonce the TPM quote must carry (what was passed to `gotpm attest --nonce`)")
    parser.add_argument("--uki-hash", metavar="HEX",
                        help="the UKI's Authenticode SHA-256 the vTPM log must show (default: the plan's uki_hash)")
    parser.add_argument("--plan", metavar="PLAN.json", help="a plan JSON from `python -m fleet plan --json`")
    parser.add_argument("--target", metavar="NAME", help="the node or app under the plan's measurements")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``verify`` on an argparse subparsers object; its ``func`` is ``run``."""
    parser = subparsers.add_parser(
        "verify", help="check a guest's TcbInfo, quote and collateral against each other and the plan",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fleet")
    add_parser(parser.add_subparsers(dest="command", required=True))
    try:
        argv = sys.argv[1:] if argv is None else list(argv)
        args = parser.parse_args(argv if argv[:1] == ["verify"] else ["verify", *argv])
    except SystemExit as exc:
        return int(exc.code or 0)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
