"""``python -m fleet verify``: check a dstack guest's TcbInfo, optionally its TDX quote with Intel's
collateral, and optionally the plan's expected measurements. Exit 0 all hold, 1 a check failed,
2 unreadable or malformed input, 3 the program itself failed.

A TcbInfo alone is unsigned JSON: replaying its log to its own ``rtmr3`` only shows it is
self-consistent. ``--quote`` ties the replay to registers the CPU signed; ``--collateral`` checks
that signature chain and the platform's TCB status with Intel's collateral.
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

from fleet.attest import measure
from fleet.config.values import SECRET_MARK, UNKNOWN_MARK

EXIT_OK, EXIT_MISMATCH, EXIT_INPUT, EXIT_PROGRAM = 0, 1, 2, 3
REGISTERS = ("rtmr0", "rtmr1", "rtmr2", "rtmr3")
DEFAULT_TCB_STATUSES = ("UpToDate",)
SIGNATURE, GENUINE = "quote signature", "valid chain to Intel's root"
_NOT_PLANNED = (*measure.MARKERS, UNKNOWN_MARK, SECRET_MARK)
_COLLATERAL_TIME_ERROR = re.compile(r"expired|in the future|not yet valid|notvalidyet", re.IGNORECASE)
_HEX = re.compile(r"(?:[0-9a-fA-F]{2})*")


class InputError(Exception):
    """Unreadable or malformed input: one line naming what is wrong and how to fix it."""


@dataclass(frozen=True)
class Check:
    name: str
    expected: str
    actual: str
    holds: bool | None  # None: not checked
    note: str = ""  # why it was not checked, or what a failure means

    @property
    def result(self) -> str:
        if self.holds is None:
            return f"not checked ({self.note})" if self.note else "not checked"
        if self.holds:
            return "ok"
        return f"MISMATCH: {self.note}" if self.note else "MISMATCH"


def _compare(name: str, expected: str, actual: str, note: str = "") -> Check:
    return Check(name, expected, actual, expected == actual, note)


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


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _read_bytes(path: str, option: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise InputError(f"{option} {path}: cannot read it ({exc.strerror or exc}); check the path") from None


def _load_json(data: bytes | str, what: str, fix: str = "pass the file as the guest agent returns it") -> Any:
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{what} is not JSON ({_one_line(exc)}); {fix}") from None


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
    return parse_tcb_info(_load_json(_read_bytes(path, "--tcb-info"), f"--tcb-info {path}"), f"--tcb-info {path}")


def parse_quote_bytes(data: bytes, source: str = "quote") -> bytes:
    """A JSON array of bytes, a hex string (bare, JSON or GetQuote's ``quote``), or raw binary."""
    text = data.strip()
    if text[:1] in (b"[", b"{", b'"'):
        value = _load_json(text, source)
        if isinstance(value, dict):
            value = value.get("quote")
        if isinstance(value, list):
            if not all(isinstance(b, int) and 0 <= b <= 255 for b in value):
                raise InputError(f"{source}: the JSON array holds something other than bytes 0-255")
            return bytes(value)
        if isinstance(value, str) and _HEX.fullmatch(value):
            return bytes.fromhex(value)
        raise InputError(f"{source}: expected a JSON array of bytes or a hex string")
    if text and _HEX.fullmatch(text.decode("latin-1")):
        return bytes.fromhex(text.decode("ascii"))
    return data


def parse_quote(raw: bytes, source: str = "quote") -> Any:
    try:
        quote = dcap_qvl.parse_quote(raw)
    except ValueError as exc:
        raise InputError(f"{source}: not a quote dcap-qvl can parse ({_one_line(exc)}); is it complete?") from None
    if not quote.is_tdx():
        raise InputError(f"{source}: a {quote.quote_type()} quote, not a TDX quote")
    return quote


def read_collateral(path: str) -> dcap_qvl.QuoteCollateralV3:
    data = _read_bytes(path, "--collateral")
    _load_json(data, f"--collateral {path}", "pass Intel PCS collateral JSON as dcap-qvl writes it")
    try:
        return dcap_qvl.QuoteCollateralV3.from_json(data.decode("utf-8"))
    except ValueError as exc:
        raise InputError(
            f"--collateral {path}: not Intel PCS collateral ({_one_line(exc)}); "
            "fetch it with dcap-qvl for this quote"
        ) from None


def parse_time(text: str) -> int:
    """ISO-8601 (UTC unless it says otherwise) or unix seconds."""
    problem = InputError(f"--at {text!r} is not ISO-8601 (2026-08-20T00:00:00Z) or unix seconds since 1970")
    if re.fullmatch(r"\d{1,12}", text.strip()):
        return int(text)
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise problem from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    if moment.year < 1970:
        raise problem
    return int(moment.timestamp())


def iso(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def read_expectation(path: str, target: str) -> dict[str, Any]:
    """``measurements[target]`` of a plan JSON (``python -m fleet plan --json``)."""
    plan = _load_json(_read_bytes(path, "--plan"), f"--plan {path}", "write it with `python -m fleet plan --json`")
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


def _quote_checks(tcb: TcbInfo, replay: _Replay, quote: Any, report_data: str | None) -> list[Check]:
    report = quote.report
    quoted = {"mrtd": report.mr_td.hex(), "rtmr0": report.rt_mr0.hex(), "rtmr1": report.rt_mr1.hex(),
              "rtmr2": report.rt_mr2.hex(), "rtmr3": report.rt_mr3.hex()}
    checks = []
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


def _collateral_window(collateral: dcap_qvl.QuoteCollateralV3) -> tuple[int, int] | None:
    """The span in which Intel's TCB info and QE identity are both current."""
    try:
        documents = [json.loads(collateral.tcb_info), json.loads(collateral.qe_identity)]
        starts = [parse_time(d["issueDate"]) for d in documents]
        ends = [parse_time(d["nextUpdate"]) for d in documents]
    except (ValueError, KeyError, TypeError, InputError):
        return None
    return (max(starts), min(ends)) if max(starts) < min(ends) else None


def _dcap_verify(raw: bytes, collateral: dcap_qvl.QuoteCollateralV3, at: int) -> tuple[Any, str]:
    """dcap-qvl's report, or None and its error in one line."""
    try:
        return dcap_qvl.verify(raw, collateral, at), ""
    except ValueError as exc:
        return None, _one_line(exc).removeprefix("Verification failed: ")


def _tcb_status(report: Any, accepted: Sequence[str], at: int, *, current: bool) -> Check:
    actual = f"{report.status}; advisories: {', '.join(report.advisory_ids) or 'none'}"
    if not current:
        return Check("TCB status", " or ".join(accepted), f"{actual} (at {iso(at)})", None,
                     "as of the collateral's issue date only")
    return Check("TCB status", " or ".join(accepted), actual, report.status in accepted,
                 "the platform's TCB is not accepted")


def _signature_checks(raw: bytes, collateral: dcap_qvl.QuoteCollateralV3, at: int,
                      accepted: Sequence[str]) -> list[Check]:
    report, error = _dcap_verify(raw, collateral, at)
    if report is not None:
        return [Check(SIGNATURE, GENUINE, f"valid at {iso(at)}", True), _tcb_status(report, accepted, at, current=True)]
    if not _COLLATERAL_TIME_ERROR.search(error):
        return [Check(SIGNATURE, GENUINE, f"invalid: {error}", False,
                      "the quote, its certificates or this collateral do not verify")]
    state = "not yet valid" if re.search(r"future|not yet", error, re.IGNORECASE) else "expired"
    stale = Check("quote collateral", f"current at {iso(at)}", f"collateral {state} at/for {iso(at)}: {error}",
                  False, "fetch current collateral for this quote (not a sign of a forged quote)")
    # Verify once more when the collateral was current, so a forgery is still told from staleness.
    window = _collateral_window(collateral)
    if window is None:
        return [Check(SIGNATURE, GENUINE, "", None, "the collateral is current at no time"), stale]
    report, error = _dcap_verify(raw, collateral, window[0])
    if report is not None:
        return [Check(SIGNATURE, GENUINE, f"valid with this collateral at {iso(window[0])}", True), stale,
                _tcb_status(report, accepted, window[0], current=False)]
    if _COLLATERAL_TIME_ERROR.search(error):
        return [Check(SIGNATURE, GENUINE, error, None, f"not all collateral is current at {iso(window[0])}"), stale]
    return [Check(SIGNATURE, GENUINE, f"invalid: {error}", False,
                  f"checked at {iso(window[0])}, when the collateral was current"), stale]


def _plan_value(value: Any) -> str | None:
    """The expected string, or None when the plan could not know it."""
    return None if value is None or value in _NOT_PLANNED else str(value).lower()


def _skip_reason(value: Any) -> str:
    if value in measure.MARKERS:
        return str(value)
    if value in (UNKNOWN_MARK, SECRET_MARK):
        return f"plan shows {value}"
    return "not in the plan"


def _planned(name: str, planned: Any, actual: str, note: str) -> Check:
    expected = _plan_value(planned)
    if expected is None:
        return Check(name, str(planned), actual, None, _skip_reason(planned))
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


def verify_attestation(
    tcb: TcbInfo,
    *,
    quote: bytes | None = None,
    collateral: dcap_qvl.QuoteCollateralV3 | None = None,
    at: int | None = None,
    expectation: Mapping[str, Any] | None = None,
    report_data: str | None = None,
    accepted_tcb_statuses: Sequence[str] = DEFAULT_TCB_STATUSES,
) -> list[Check]:
    """Every check, in the order printed. Raises ``InputError`` for an unparsable quote."""
    replay, checks = _event_log_checks(tcb)
    checks += _compose_checks(tcb, replay)
    if quote is not None:
        checks += _quote_checks(tcb, replay, parse_quote(quote), report_data)
        if collateral is None:
            checks.append(Check(SIGNATURE, GENUINE, "", None,
                                "no --collateral: the quote's contents are unauthenticated"))
        else:
            now = at if at is not None else int(datetime.now(timezone.utc).timestamp())
            checks += _signature_checks(quote, collateral, now, accepted_tcb_statuses)
    if expectation is not None:
        checks += _plan_checks(tcb, replay, expectation)
    return checks


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


def run(args: argparse.Namespace) -> int:
    """The ``verify`` subcommand."""
    try:
        if args.collateral and not args.quote:
            raise InputError("--collateral needs --quote (the quote it verifies)")
        if args.at and not args.collateral:
            raise InputError("--at needs --collateral (it sets the time collateral is checked at)")
        if bool(args.plan) != bool(args.target):
            raise InputError("--plan and --target go together: name the plan JSON and the node or app in it")
        if args.report_data is not None and not (_HEX.fullmatch(args.report_data) and len(args.report_data) <= 128):
            raise InputError("--report-data is not hex of at most 64 bytes")
        tcb = read_tcb_info(args.tcb_info)
        quote = parse_quote_bytes(_read_bytes(args.quote, "--quote"), f"--quote {args.quote}") if args.quote else None
        collateral = read_collateral(args.collateral) if args.collateral else None
        at = parse_time(args.at) if args.at else None
        expectation = read_expectation(args.plan, args.target) if args.plan else None
        checks = verify_attestation(
            tcb, quote=quote, collateral=collateral, at=at, expectation=expectation,
            report_data=args.report_data, accepted_tcb_statuses=args.accept_tcb_status or DEFAULT_TCB_STATUSES,
        )
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    except Exception as exc:  # noqa: BLE001 - a bug or a library failure: one line, not a traceback
        print(f"error: verify failed unexpectedly ({type(exc).__name__}: {_one_line(exc)})", file=sys.stderr)
        return EXIT_PROGRAM
    sys.stdout.write(render_table(checks))
    return EXIT_MISMATCH if failed(checks) else EXIT_OK


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tcb-info", required=True, metavar="FILE",
                        help="the guest agent's TcbInfo JSON (or its Info response)")
    parser.add_argument("--quote", metavar="FILE", help="the TDX quote: JSON array of bytes, hex, or binary")
    parser.add_argument("--collateral", metavar="FILE", help="Intel PCS collateral JSON for the quote")
    parser.add_argument("--at", metavar="TIME", help="verification time: ISO-8601 or unix seconds (default: now)")
    parser.add_argument("--accept-tcb-status", action="append", metavar="STATUS",
                        help="a TCB status to accept, e.g. SWHardeningNeeded (repeatable; default: UpToDate)")
    parser.add_argument("--report-data", metavar="HEX", help="the report data the quote must carry")
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
