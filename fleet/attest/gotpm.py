"""The ``Attestation`` message of google/go-tpm-tools, as ``gotpm attest --format binarypb`` writes it.

Only the fields the vTPM lane reads are decoded (google/go-tpm-tools at
67670e5c021a24f2366eb1808db2659211af5eb2, ``proto/attest.proto`` ``Attestation`` and
``proto/tpm.proto`` ``Quote``/``PCRs``):

    Attestation: 1 ak_pub (TPMT_PUBLIC), 2 quotes (repeated Quote), 3 event_log (TCG2 log),
                 6 ak_cert (DER), 7 intermediate_certs (repeated DER)
    Quote:       1 quote (TPMS_ATTEST), 2 raw_sig (TPMT_SIGNATURE), 3 pcrs (PCRs)
    PCRs:        1 hash (TPM_ALG_ID), 2 pcrs (map<uint32, bytes>: entries of 1 key, 2 value)

Other fields (instance_info, canonical_event_log, the TEE attestations) are skipped. A small wire
reader stands in for generated code: varints, length-delimited, 32- and 64-bit fields (protobuf
encoding guide); proto3 leaves a field at its default out, so a missing map key is PCR 0. Every
length is checked against what is left, sizes and counts are bounded, and a field the schema
holds once must appear once, so a malformed file is one ``InputError`` line.
"""

from __future__ import annotations

from dataclasses import dataclass

from fleet.attest import tcg
from fleet.attest.checks import InputError, read_bytes

MAX_ATTESTATION_BYTES = tcg.MAX_LOG_BYTES + 1024 * 1024
MAX_QUOTES = 8
MAX_CERTS = 8
MAX_PCRS = 32
MAX_FIELDS = 1000  # per message; an Attestation has about ten, a PCRs message 25
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


@dataclass(frozen=True)
class Quote:
    quote: bytes  # TPMS_ATTEST
    raw_sig: bytes  # TPMT_SIGNATURE
    hash: int  # the PCR bank, a TPM_ALG_ID
    pcrs: dict[int, bytes]


@dataclass(frozen=True)
class Attestation:
    ak_pub: bytes
    quotes: tuple[Quote, ...]
    event_log: bytes
    ak_cert: bytes
    intermediate_certs: tuple[bytes, ...]


class _WireError(ValueError):
    pass


def _varint(data: bytes, offset: int) -> tuple[int, int]:
    value = shift = 0
    for index in range(10):
        if offset + index >= len(data):
            raise _WireError(f"a varint at offset {offset} is truncated")
        byte = data[offset + index]
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, offset + index + 1
    raise _WireError(f"a varint at offset {offset} is longer than 10 bytes")


def _fields(data: bytes, what: str) -> list[tuple[int, int, int | bytes]]:
    """(field number, wire type, value) of every field of one message, in order."""
    out: list[tuple[int, int, int | bytes]] = []
    offset = 0
    while offset < len(data):
        if len(out) >= MAX_FIELDS:
            raise _WireError(f"{what}: more than {MAX_FIELDS} fields")
        start = offset
        key, offset = _varint(data, offset)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise _WireError(f"{what}: field number 0 at offset {start}")
        value: int | bytes
        if wire == _VARINT:
            value, offset = _varint(data, offset)
        elif wire == _LEN:
            size, offset = _varint(data, offset)
            if size > len(data) - offset:
                raise _WireError(f"{what}: field {number} at offset {start} claims {size} bytes but "
                                 f"{len(data) - offset} are left")
            value, offset = data[offset:offset + size], offset + size
        elif wire in (_I64, _I32):
            size = 8 if wire == _I64 else 4
            if size > len(data) - offset:
                raise _WireError(f"{what}: field {number} at offset {start} is truncated")
            value, offset = data[offset:offset + size], offset + size
        else:
            raise _WireError(f"{what}: field {number} at offset {start} has wire type {wire} (groups are not used)")
        out.append((number, wire, value))
    return out


def _singular(fields: list[tuple[int, int, int | bytes]], number: int, wire: int, what: str) -> int | bytes | None:
    found = [(w, v) for n, w, v in fields if n == number]
    if not found:
        return None
    if len(found) > 1:
        raise _WireError(f"{what}: field {number} appears {len(found)} times")
    if found[0][0] != wire:
        raise _WireError(f"{what}: field {number} has wire type {found[0][0]}, not {wire}")
    return found[0][1]


def _repeated(fields: list[tuple[int, int, int | bytes]], number: int, what: str, limit: int) -> list[bytes]:
    found = [v for n, w, v in fields if n == number and w == _LEN and isinstance(v, bytes)]
    if any(n == number and w != _LEN for n, w, _ in fields):
        raise _WireError(f"{what}: field {number} is not length-delimited")
    if len(found) > limit:
        raise _WireError(f"{what}: {len(found)} entries of field {number} (at most {limit})")
    return found


def _bytes(fields: list[tuple[int, int, int | bytes]], number: int, what: str) -> bytes:
    value = _singular(fields, number, _LEN, what)
    return value if isinstance(value, bytes) else b""


def _int(fields: list[tuple[int, int, int | bytes]], number: int, what: str) -> int:
    value = _singular(fields, number, _VARINT, what)
    return value if isinstance(value, int) else 0


def _quote(data: bytes, where: str) -> Quote:
    fields = _fields(data, where)
    pcrs_message = _bytes(fields, 3, where)
    pcr_fields = _fields(pcrs_message, f"{where}.pcrs")
    hash_value = _int(pcr_fields, 1, f"{where}.pcrs")
    entries = _repeated(pcr_fields, 2, f"{where}.pcrs", MAX_PCRS)
    pcrs: dict[int, bytes] = {}
    for index, entry in enumerate(entries):
        entry_fields = _fields(entry, f"{where}.pcrs.pcrs[{index}]")
        key = _int(entry_fields, 1, f"{where}.pcrs.pcrs[{index}]")
        value = _bytes(entry_fields, 2, f"{where}.pcrs.pcrs[{index}]")
        if key >= MAX_PCRS:
            raise _WireError(f"{where}.pcrs: PCR {key} (a TPM has at most {MAX_PCRS})")
        if key in pcrs:
            raise _WireError(f"{where}.pcrs: PCR {key} is given twice")
        pcrs[key] = value
    return Quote(_bytes(fields, 1, where), _bytes(fields, 2, where), hash_value, pcrs)


def parse(data: bytes, source: str) -> Attestation:
    """An Attestation message, or an ``InputError`` naming what is wrong with it."""
    try:
        fields = _fields(data, "Attestation")
        quotes = tuple(_quote(q, f"quotes[{i}]")
                       for i, q in enumerate(_repeated(fields, 2, "Attestation", MAX_QUOTES)))
        attestation = Attestation(
            ak_pub=_bytes(fields, 1, "Attestation"),
            quotes=quotes,
            event_log=_bytes(fields, 3, "Attestation"),
            ak_cert=_bytes(fields, 6, "Attestation"),
            intermediate_certs=tuple(_repeated(fields, 7, "Attestation", MAX_CERTS)),
        )
    except _WireError as exc:
        raise InputError(f"{source}: not a go-tpm-tools Attestation protobuf ({exc}); write it on the guest with "
                         "`gotpm attest --key gceAK --format binarypb`") from None
    if not attestation.ak_pub or not attestation.quotes:
        missing = ", ".join(name for name, value in (("ak_pub", attestation.ak_pub), ("quotes", attestation.quotes))
                            if not value)
        raise InputError(f"{source}: the Attestation has no {missing}; write it on the guest with "
                         "`gotpm attest --key gceAK --format binarypb`")
    return attestation


def read(path: str) -> Attestation:
    return parse(read_bytes(path, "--tpm-attestation", MAX_ATTESTATION_BYTES), f"--tpm-attestation {path}")
