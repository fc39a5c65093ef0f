"""The TDX guest's CC event log (CCEL): what the firmware, the boot loader and the kernel's EFI
stub extended into RTMR0-2, replayed and compared with the registers a quote reports.

The log is the ACPI CCEL area as Linux exposes it (``/sys/firmware/acpi/tables/data/CCEL``): a
crypto-agile TCG log (``fleet.attest.tcg``) whose register index is the CC measurement register,
0 for MRTD (built by the TDX module, never extended) and 1-4 for RTMR0-3, padded with 0xFF. The
replay uses the SHA-384 digests, as the TDX module extends them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from fleet.attest import tcg
from fleet.attest.bootchain import Step
from fleet.attest.checks import Check, InputError, read_bytes

MR_NAMES = {0: "mrtd", 1: "rtmr0", 2: "rtmr1", 3: "rtmr2", 4: "rtmr3"}
MAX_CCEL_BYTES = tcg.MAX_LOG_BYTES


def parse(data: bytes, source: str) -> tcg.EventLog:
    try:
        log = tcg.parse(data, allow_padding=True)
    except tcg.EventLogError as exc:
        raise InputError(f"{source}: {exc}") from None
    if "sha384" not in log.algorithms:
        raise InputError(f"{source}: the log has no SHA-384 digests, so it is not a TDX CC event log "
                         "(is it the vTPM's log? pass that with --tpm-event-log)")
    strays = sorted({e.register for e in log.events if e.register not in MR_NAMES})
    if strays:
        raise InputError(f"{source}: events for measurement register {strays[0]}; a CCEL has 0 (MRTD) to 4 (RTMR3)")
    return log


def read(path: str) -> tcg.EventLog:
    return parse(read_bytes(path, "--ccel", MAX_CCEL_BYTES), f"--ccel {path}")


def replayed(log: tcg.EventLog) -> dict[str, str]:
    """RTMR0-2 (and RTMR3 when the log has its events) after replaying the log."""
    values = log.replay("sha384")
    out = {MR_NAMES[i]: values.get(i, bytes(48)).hex() for i in (1, 2, 3)}
    if 4 in values:
        out["rtmr3"] = values[4].hex()
    return out


def listing(log: tcg.EventLog) -> list[str]:
    """One readable line per event: register, position, what it is, digest prefix."""
    lines = []
    for event in log.events:
        register = MR_NAMES.get(event.register, str(event.register)).upper()
        digest = event.digests.get("sha384", b"").hex()[:16]
        extended = "" if event.extends and event.register != 0 else " (not extended)"
        lines.append(f"{register:<5} #{event.number:<3} {event.describe()}{extended}  {digest}")
    return lines


def first_difference(log: tcg.EventLog, register: str, expected: Sequence[Step]) -> str:
    """Where a register's logged events part from the expected ones, for a reader to act on."""
    index = next(i for i, name in MR_NAMES.items() if name == register)
    events = [e for e in log.on(index) if e.extends]
    for position, (event, step) in enumerate(zip(events, expected)):
        if event.digests.get("sha384") != step.digest:
            return (f"event {position + 1} of {register.upper()}: expected {step.what} "
                    f"({step.digest.hex()[:16]}), the log has {event.describe(60)} "
                    f"({event.digests.get('sha384', b'').hex()[:16]})")
    if len(events) != len(expected):
        return f"{register.upper()} has {len(events)} events, {len(expected)} expected"
    return "every expected event is in the log"


def checks(log: tcg.EventLog, *, quote_registers: Mapping[str, str] | None,
           tcb_registers: Mapping[str, str] | None, source: str = "CCEL") -> list[Check]:
    """Replay against the quote (or, without one, the TcbInfo's registers), and the log's own
    consistency: an event whose shown data does not hash to its digest is a forged description."""
    out: list[Check] = []
    forged = tcg.data_mismatches(log)
    out.append(Check(f"{source} event data", "hashes to the logged digests",
                     f"events {', '.join(f'#{e.number}' for e in forged)} differ" if forged
                     else f"{len(log.events)} events", not forged,
                     "the log shows data that is not what was measured"))
    mrtd_events = [e for e in log.events if e.register == 0 and e.extends]
    if mrtd_events:
        out.append(Check(f"{source} MRTD events", "none (MRTD is never extended)", f"{len(mrtd_events)} events", None,
                         "left out of the replay"))
    replay = replayed(log)
    against, label = (quote_registers, "quote") if quote_registers else (tcb_registers, "TcbInfo")
    for register, value in replay.items():
        if against and register in against:
            out.append(Check(f"{register} {source} replay = {label}", value, against[register],
                             value == against[register], "the event log is not the log of this TD's boot"))
        else:
            out.append(Check(f"{register} {source} replay", "", value, None, "no quote to compare with"))
    return out
