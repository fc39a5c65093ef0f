"""TCG PC Client crypto-agile event logs: the format of both a vTPM's log
(``/sys/kernel/security/tpm0/binary_bios_measurements``) and a TDX guest's CC event log
(``/sys/firmware/acpi/tables/data/CCEL``).

Layout (TCG PC Client Platform Firmware Profile, section 10): a first event in the SHA-1 format
(``TCG_PCClientPCREvent``) whose data is the ``Spec ID Event03`` naming the digest algorithms and
their sizes, then ``TCG_PCR_EVENT2`` records: register index (u32), event type (u32), digest count
(u32), that many (algorithm id u16, digest) pairs, data size (u32), data. All little-endian.
A CCEL's register index is the CC measurement register (0 MRTD, 1-4 RTMR0-3); its ACPI area is
larger than the log and the rest reads 0xFF (an index of 0xFFFFFFFF), which is padding, not an
event (google/go-eventlog ``tcg/pfpformat.go`` ``errEventLogPadding``).

The parser reads untrusted bytes: every length is checked against what is left, and the number of
events is bounded, so a malformed log is an ``EventLogError`` naming the byte offset.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

# TCG Algorithm Registry ids the logs we read use, with their digest sizes.
ALGORITHMS = {0x0004: ("sha1", 20), 0x000B: ("sha256", 32), 0x000C: ("sha384", 48), 0x000D: ("sha512", 64)}
ALGORITHM_IDS = {name: alg for alg, (name, _) in ALGORITHMS.items()}
SPEC_ID_SIGNATURE = b"Spec ID Event03\x00"
MAX_EVENTS = 100_000
MAX_LOG_BYTES = 16 * 1024 * 1024

EV_NO_ACTION = 0x03
EV_SEPARATOR = 0x04
EV_EVENT_TAG = 0x06
EV_IPL = 0x0D
EVENT_TYPES = {
    0x00: "EV_PREBOOT_CERT", 0x01: "EV_POST_CODE", 0x02: "EV_UNUSED", 0x03: "EV_NO_ACTION",
    0x04: "EV_SEPARATOR", 0x05: "EV_ACTION", 0x06: "EV_EVENT_TAG", 0x07: "EV_S_CRTM_CONTENTS",
    0x08: "EV_S_CRTM_VERSION", 0x09: "EV_CPU_MICROCODE", 0x0A: "EV_PLATFORM_CONFIG_FLAGS",
    0x0B: "EV_TABLE_OF_DEVICES", 0x0C: "EV_COMPACT_HASH", 0x0D: "EV_IPL", 0x0E: "EV_IPL_PARTITION_DATA",
    0x0F: "EV_NONHOST_CODE", 0x10: "EV_NONHOST_CONFIG", 0x11: "EV_NONHOST_INFO",
    0x12: "EV_OMIT_BOOT_DEVICE_EVENTS",
    0x80000001: "EV_EFI_VARIABLE_DRIVER_CONFIG", 0x80000002: "EV_EFI_VARIABLE_BOOT",
    0x80000003: "EV_EFI_BOOT_SERVICES_APPLICATION", 0x80000004: "EV_EFI_BOOT_SERVICES_DRIVER",
    0x80000005: "EV_EFI_RUNTIME_SERVICES_DRIVER", 0x80000006: "EV_EFI_GPT_EVENT",
    0x80000007: "EV_EFI_ACTION", 0x80000008: "EV_EFI_PLATFORM_FIRMWARE_BLOB",
    0x80000009: "EV_EFI_HANDOFF_TABLES", 0x8000000A: "EV_EFI_PLATFORM_FIRMWARE_BLOB2",
    0x8000000B: "EV_EFI_HANDOFF_TABLES2", 0x8000000C: "EV_EFI_VARIABLE_BOOT2",
    0x80000010: "EV_EFI_HCRTM_EVENT", 0x800000E0: "EV_EFI_VARIABLE_AUTHORITY",
    0x800000E1: "EV_EFI_SPDM_FIRMWARE_BLOB", 0x800000E2: "EV_EFI_SPDM_FIRMWARE_CONFIG",
}
EFI_GLOBAL_VARIABLE = bytes.fromhex("61dfe48bca93d211aa0d00e098032b8c")
EFI_IMAGE_SECURITY_DATABASE = bytes.fromhex("cbb219d73a3d9645a3bcdad00e67656f")
# Linux's EFI stub tags (include/linux/efi.h): the command line and the initrd it measures.
LINUX_TAGS = {0x8F3B22ED: "kernel command line (LOADED_IMAGE::LoadOptions)", 0x8F3B22EC: "initrd"}
# GCE's EV_NONHOST_INFO technology byte (go-tpm-tools proto/attest.proto GCEConfidentialTechnology).
GCE_TECHNOLOGIES = {0: "none", 1: "AMD SEV", 2: "AMD SEV-ES", 3: "Intel TDX", 4: "AMD SEV-SNP"}


class EventLogError(ValueError):
    """The bytes are not a crypto-agile TCG event log."""


@dataclass(frozen=True)
class Event:
    number: int  # position in the log, from 0 (the Spec ID event)
    register: int  # PCR index, or CC measurement register index in a CCEL
    event_type: int
    digests: Mapping[str, bytes]  # algorithm name -> digest
    data: bytes
    offset: int

    @property
    def type_name(self) -> str:
        return EVENT_TYPES.get(self.event_type, f"0x{self.event_type:08x}")

    @property
    def extends(self) -> bool:
        """EV_NO_ACTION events are logged but never extended into a register."""
        return self.event_type != EV_NO_ACTION

    def describe(self, limit: int = 96) -> str:
        text = _describe(self)
        return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class EventLog:
    algorithms: Mapping[str, int]  # name -> digest size, as the Spec ID event declares
    events: tuple[Event, ...]  # every event after the Spec ID event, in log order
    padding: int  # trailing bytes that were padding (0xFF), not events

    def replay(self, algorithm: str, initial: Mapping[int, bytes] | None = None) -> dict[int, bytes]:
        """Every register's value after extending its events' ``algorithm`` digests in order,
        each register starting from zero (or ``initial``)."""
        size = self.algorithms.get(algorithm)
        if size is None:
            raise EventLogError(f"the log has no {algorithm} digests (it has {', '.join(self.algorithms)})")
        values: dict[int, bytes] = dict(initial or {})
        for event in self.events:
            if not event.extends:
                continue
            digest = event.digests.get(algorithm)
            if digest is None:
                raise EventLogError(f"event #{event.number} (offset {event.offset}) has no {algorithm} digest")
            current = values.get(event.register, bytes(size))
            values[event.register] = hashlib.new(algorithm, current + digest).digest()
        return values

    def on(self, register: int) -> list[Event]:
        return [e for e in self.events if e.register == register]


def _take(data: bytes, offset: int, size: int, what: str) -> bytes:
    if size < 0 or offset + size > len(data):
        raise EventLogError(f"{what} at offset {offset} needs {size} bytes but only {len(data) - offset} are left; "
                            "the log is truncated or not a TCG event log")
    return data[offset:offset + size]


def _u32(data: bytes, offset: int, what: str) -> int:
    return struct.unpack("<I", _take(data, offset, 4, what))[0]


def _spec_id(data: bytes) -> tuple[dict[int, int], int]:
    """The algorithms (id -> size) of the first event, and where the next event starts."""
    header = _take(data, 0, 32, "the first (Spec ID) event header")
    register, event_type, _digest, size = struct.unpack("<II20sI", header)
    body = _take(data, 32, size, "the Spec ID event")
    if event_type != EV_NO_ACTION or not body.startswith(SPEC_ID_SIGNATURE):
        raise EventLogError("the log does not open with a 'Spec ID Event03' EV_NO_ACTION event; pass the crypto-agile "
                            "log as the kernel exposes it (binary_bios_measurements, or the CCEL data table)")
    count = _u32(body, 24, "the Spec ID algorithm count")
    if not 1 <= count <= 16:
        raise EventLogError(f"the Spec ID event declares {count} algorithms")
    algorithms: dict[int, int] = {}
    for index in range(count):
        alg, digest_size = struct.unpack("<HH", _take(body, 28 + 4 * index, 4, "a Spec ID algorithm"))
        if alg in ALGORITHMS and ALGORITHMS[alg][1] != digest_size:
            raise EventLogError(f"the Spec ID event gives {ALGORITHMS[alg][0]} a {digest_size}-byte digest")
        if not 1 <= digest_size <= 64:
            raise EventLogError(f"the Spec ID event gives algorithm 0x{alg:04x} a {digest_size}-byte digest")
        algorithms[alg] = digest_size
    del register
    return algorithms, 32 + size


def parse(data: bytes, *, allow_padding: bool = True, max_events: int = MAX_EVENTS) -> EventLog:
    """Parse a crypto-agile log. Trailing padding (an index of 0xFFFFFFFF, as a CCEL's unused area
    reads) ends the log when ``allow_padding``; anything else that does not parse is an error."""
    if len(data) > MAX_LOG_BYTES:
        raise EventLogError(f"{len(data)} bytes is more than an event log holds ({MAX_LOG_BYTES} at most)")
    algorithms, offset = _spec_id(data)
    events: list[Event] = []
    padding = 0
    while offset < len(data):
        start = offset
        if len(data) - offset < 8 or data[offset:offset + 4] == b"\xff\xff\xff\xff":
            rest = data[offset:]
            if allow_padding and set(rest) <= {0xFF}:
                padding = len(rest)
                break
            if allow_padding and len(rest) < 8 and not any(rest):
                padding = len(rest)
                break
            raise EventLogError(f"offset {offset}: {len(rest)} trailing bytes are neither an event nor 0xFF padding")
        if len(events) >= max_events:
            raise EventLogError(f"more than {max_events} events; this is not a boot log")
        register, event_type, count = struct.unpack("<III", _take(data, offset, 12, "an event header"))
        offset += 12
        if count > len(algorithms):
            raise EventLogError(f"event at offset {start} has {count} digests; the log declares {len(algorithms)} "
                                "algorithms")
        digests: dict[str, bytes] = {}
        for _ in range(count):
            alg = struct.unpack("<H", _take(data, offset, 2, "a digest algorithm id"))[0]
            offset += 2
            if alg not in algorithms:
                raise EventLogError(f"event at offset {start} has a digest of algorithm 0x{alg:04x}, which the Spec ID "
                                    "event does not declare")
            name = ALGORITHMS.get(alg, (f"alg-0x{alg:04x}", 0))[0]
            digests[name] = _take(data, offset, algorithms[alg], f"a {name} digest")
            offset += algorithms[alg]
        size = _u32(data, offset, "an event data size")
        offset += 4
        body = _take(data, offset, size, "event data")
        offset += size
        events.append(Event(len(events) + 1, register, event_type, digests, body, start))
    names = {ALGORITHMS.get(a, (f"alg-0x{a:04x}", 0))[0]: s for a, s in algorithms.items()}
    return EventLog(algorithms=names, events=tuple(events), padding=padding)


# Event types whose digest is the hash of their data, so the data a reader is shown cannot differ
# from what was measured (TCG PFP 10.4.1; checked on GCE's CCEL and vTPM logs): the whole event
# data, or for Boot#### variables the variable's value alone.
_DIGEST_OF_DATA = {0x04, 0x08, 0x11, 0x80000001, 0x80000006, 0x80000007, 0x800000E0}
_DIGEST_OF_VALUE = {0x80000002}


def data_mismatches(log: EventLog) -> list[Event]:
    """Events whose logged data does not hash to their logged digest (an edited description)."""
    out = []
    for event in log.events:
        if event.event_type in _DIGEST_OF_DATA:
            measured = event.data
        elif event.event_type in _DIGEST_OF_VALUE and (parsed := variable(event.data)) is not None:
            measured = parsed[2]
        else:
            continue
        for algorithm, digest in event.digests.items():
            if algorithm in hashlib.algorithms_available and hashlib.new(algorithm, measured).digest() != digest:
                out.append(event)
                break
    return out


# ---------------------------------------------------------------------------------------------
# Writing (test fixtures, and logs rebuilt from recorded inputs)


def encode_spec_id(algorithms: Iterable[str]) -> bytes:
    """The SHA-1-format first event declaring ``algorithms`` (names of ALGORITHMS)."""
    algs = [ALGORITHM_IDS[a] for a in algorithms]
    body = SPEC_ID_SIGNATURE + struct.pack("<IBBBBI", 0, 0, 2, 0, 2, len(algs))
    body += b"".join(struct.pack("<HH", a, ALGORITHMS[a][1]) for a in algs) + b"\x00"
    return struct.pack("<II20sI", 0, EV_NO_ACTION, bytes(20), len(body)) + body


def encode_event(register: int, event_type: int, digests: Mapping[str, bytes], data: bytes) -> bytes:
    out = struct.pack("<III", register, event_type, len(digests))
    for name, digest in digests.items():
        out += struct.pack("<H", ALGORITHM_IDS[name]) + digest
    return out + struct.pack("<I", len(data)) + data


# ---------------------------------------------------------------------------------------------
# Readable events


def _utf16(data: bytes) -> str:
    text = data.decode("utf-16-le", errors="replace")
    return text.split("\x00", 1)[0]


def _ascii(data: bytes) -> str:
    text = data.split(b"\x00", 1)[0].decode("utf-8", errors="replace")
    return " ".join(text.split())


def variable(data: bytes) -> tuple[bytes, str, bytes] | None:
    """A UEFI_VARIABLE_DATA: (vendor GUID, name, value), or None when it is not one."""
    if len(data) < 32:
        return None
    guid = data[:16]
    name_chars, value_size = struct.unpack("<QQ", data[16:32])
    if name_chars > 256 or 32 + 2 * name_chars + value_size != len(data):
        return None
    name = data[32:32 + 2 * name_chars].decode("utf-16-le", errors="replace")
    return guid, name, data[32 + 2 * name_chars:]


def load_option_description(value: bytes) -> str:
    """The description of an EFI_LOAD_OPTION (a Boot#### variable)."""
    if len(value) < 6:
        return ""
    return _utf16(value[6:])


def _device_path_file(path: bytes) -> str:
    """The file name nodes of a device path (type 4, subtype 4), joined."""
    names = []
    offset = 0
    while offset + 4 <= len(path):
        node_type, subtype, length = path[offset], path[offset + 1], struct.unpack("<H", path[offset + 2:offset + 4])[0]
        if length < 4:
            break
        if node_type == 4 and subtype == 4:
            names.append(_utf16(path[offset + 4:offset + length]))
        if node_type == 0x7F:
            break
        offset += length
    return "".join(names)


def _describe_variable(event: Event) -> str:
    parsed = variable(event.data)
    if parsed is None:
        return f"{len(event.data)} bytes"
    guid, name, value = parsed
    if name == "BootOrder" and len(value) % 2 == 0:
        return "BootOrder = " + ",".join(f"{v:04X}" for v in struct.unpack(f"<{len(value) // 2}H", value))
    if name.startswith("Boot") and len(name) == 8:
        return f"{name}: {load_option_description(value)!r}"
    if name == "SecureBoot" and len(value) == 1:
        return f"SecureBoot = {value[0]} ({'on' if value[0] else 'off'})"
    owner = ("EFI global" if guid == EFI_GLOBAL_VARIABLE
             else "image security database" if guid == EFI_IMAGE_SECURITY_DATABASE else guid.hex())
    return f"{name} ({owner}, {len(value)} bytes)"


def _describe(event: Event) -> str:
    data, kind = event.data, event.event_type
    name = event.type_name
    if kind in (0x80000001, 0x80000002, 0x8000000C, 0x800000E0):
        return f"{name}: {_describe_variable(event)}"
    if kind == EV_SEPARATOR:
        return f"{name}: {data.hex()}" + (" (error)" if data == b"\xff\xff\xff\xff" else "")
    if kind in (0x80000007, 0x05, 0x0A, 0x0B):
        return f"{name}: {_ascii(data)}"
    if kind == 0x08:
        text = _utf16(data) if data[1:2] == b"\x00" else _ascii(data)
        return f"{name}: {text}"
    if kind == 0x11 and data.startswith(b"GCE NonHostInfo\x00") and len(data) > 16:
        return f"{name}: GCE NonHostInfo, confidential technology {GCE_TECHNOLOGIES.get(data[16], data[16])}"
    if kind == EV_NO_ACTION:
        return f"{name}: {_ascii(data[:32])}"
    if kind == 0x8000000A and data:
        size = data[0]
        desc = _ascii(data[1:1 + size])
        if len(data) >= 1 + size + 16:
            base, length = struct.unpack("<QQ", data[1 + size:1 + size + 16])
            return f"{name}: firmware volume {desc} at 0x{base:x}, {length} bytes"
        return f"{name}: {desc}"
    if kind == 0x8000000B and data:
        return f"{name}: {_ascii(data[1:1 + data[0]])}"
    if kind in (0x80000003, 0x80000004, 0x80000005) and len(data) >= 32:
        _location, length, _link, path_size = struct.unpack("<QQQQ", data[:32])
        path = _device_path_file(data[32:32 + path_size])
        return f"{name}: image of {length} bytes" + (f", {path}" if path else "")
    if kind == 0x80000006 and len(data) >= 92:
        guid = data[56:72]
        count = struct.unpack("<Q", data[92:100])[0] if len(data) >= 100 else 0
        return f"{name}: GPT of disk {guid.hex()}, {count} partitions"
    if kind == EV_EVENT_TAG and len(data) >= 8:
        tag, size = struct.unpack("<II", data[:8])
        label = LINUX_TAGS.get(tag, f"tag 0x{tag:08x}")
        return f"{name}: {label}, {_ascii(data[8:8 + size])!r}" if tag not in LINUX_TAGS else f"{name}: {label}"
    if kind == EV_IPL:
        text = _utf16(data) if len(data) > 1 and data[1] == 0 else _ascii(data)
        return f"{name}: {text}"
    return f"{name}: {len(data)} bytes"
