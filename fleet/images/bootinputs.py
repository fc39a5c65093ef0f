"""What a built disk image contributes to RTMR1 and RTMR2 on GCP, recorded by the build.

Run on the build host against ``disk.raw`` (the build script embeds this file's source and runs it
with ``python3``, so it uses the standard library only and imports nothing from ``fleet``):

* the SHA-384 of the boot disk's ``UEFI_GPT_DATA`` as OVMF measures it (the primary GPT header,
  the number of used entries, the used entries in order: EDK2 ``Tcg2MeasureGptTable``);
* from the UKI at ``EFI/BOOT/BOOTX64.EFI`` of the EFI system partition (FAT12/16/32): its
  Authenticode SHA-384 (and SHA-256, dstack's ``uki_hash``), its ``.linux`` section's Authenticode
  SHA-384, the SHA-384 of its ``.cmdline`` as UTF-16LE with a NUL and of its ``.initrd``, and,
  when systemd-stub >= 256 measures the sections into RTMR2, the register those section events
  leave (Easy-TEE/attest ``crates/measure/src/uki.rs`` and ``dcap/mod.rs`` at 17d6d8b3, MIT).

Authenticode follows Microsoft's PE/COFF specification ("Calculating the PE Image Hash"): the
headers without the checksum and the certificate-table entry, the sections in file order, then any
data after them but before the certificate table. Checked against osslsigncode.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import sys

SECTOR = 512
MAX_UKI_BYTES = 512 * 1024 * 1024
# Sections systemd-stub measures, in its order (Easy-TEE/attest uki.rs UKI_MEASURED_SECTIONS).
MEASURED_SECTIONS = (".linux", ".osrel", ".cmdline", ".initrd", ".splash", ".dtb", ".uname", ".sbat", ".pcrkey")
ESP_TYPE = bytes.fromhex("28732ac11ff8d211ba4b00a0c93ec93b")  # C12A7328-F81F-11D2-BA4B-00A0C93EC93B
UKI_PATH = ("EFI", "BOOT", "BOOTX64.EFI")


class BootInputError(ValueError):
    """The image is not a GPT disk with a UKI where GCE's firmware boots it from."""


def _read(handle, offset: int, size: int) -> bytes:
    handle.seek(offset)
    data = handle.read(size)
    if len(data) != size:
        raise BootInputError(f"the image ends before offset {offset + size}")
    return data


# ---------------------------------------------------------------------------------------------
# GPT


def gpt(handle) -> tuple[bytes, list[tuple[bytes, int, int]]]:
    """(UEFI_GPT_DATA as OVMF measures it, [(type GUID, first LBA, last LBA)] of used entries)."""
    header = _read(handle, SECTOR, SECTOR)
    if header[:8] != b"EFI PART":
        raise BootInputError("no GPT header at LBA 1 (GCE boots UEFI images from GPT disks)")
    header_size, = struct.unpack_from("<I", header, 12)
    entries_lba, count, entry_size = struct.unpack_from("<QII", header, 72)
    if not 92 <= header_size <= SECTOR or not 128 <= entry_size <= 4096 or count > 4096:
        raise BootInputError(f"implausible GPT header (size {header_size}, {count} entries of {entry_size} bytes)")
    table = _read(handle, entries_lba * SECTOR, count * entry_size)
    used = [table[i * entry_size:(i + 1) * entry_size] for i in range(count)]
    used = [entry for entry in used if entry[:16] != bytes(16)]
    event = header[:header_size] + struct.pack("<Q", len(used)) + b"".join(used)
    partitions = [(e[:16], *struct.unpack_from("<QQ", e, 32)) for e in used]
    return event, partitions


# ---------------------------------------------------------------------------------------------
# FAT


class Fat:
    """Just enough FAT12/16/32 to read a file by its 8.3 path."""

    def __init__(self, handle, offset: int):
        self.handle, self.offset = handle, offset
        boot = _read(handle, offset, SECTOR)
        if boot[510:512] != b"\x55\xaa":
            raise BootInputError("the EFI system partition has no FAT boot sector")
        self.sector, self.per_cluster, reserved, fats, root_entries, total16, _, fat16 = struct.unpack_from(
            "<HBHBHHBH", boot, 11)
        total = total16 or struct.unpack_from("<I", boot, 32)[0]
        fat_size = fat16 or struct.unpack_from("<I", boot, 36)[0]
        if self.sector not in (512, 1024, 2048, 4096) or self.per_cluster == 0 or fats == 0:
            raise BootInputError("the EFI system partition's FAT boot sector is implausible")
        self.fat_start = reserved * self.sector
        root_sectors = (root_entries * 32 + self.sector - 1) // self.sector
        self.root_start = self.fat_start + fats * fat_size * self.sector
        self.data_start = self.root_start + root_sectors * self.sector
        clusters = (total - (self.data_start // self.sector)) // self.per_cluster
        self.bits = 12 if clusters < 4085 else 16 if clusters < 65525 else 32
        self.root_cluster = struct.unpack_from("<I", boot, 44)[0] if self.bits == 32 else None
        self.root_size = root_entries * 32
        self.clusters = clusters

    def _next(self, cluster: int) -> int:
        if self.bits == 32:
            return struct.unpack("<I", _read(self.handle, self.offset + self.fat_start + 4 * cluster, 4))[0] & 0x0FFFFFFF
        if self.bits == 16:
            return struct.unpack("<H", _read(self.handle, self.offset + self.fat_start + 2 * cluster, 2))[0]
        pair = struct.unpack("<H", _read(self.handle, self.offset + self.fat_start + cluster * 3 // 2, 2))[0]
        return pair >> 4 if cluster & 1 else pair & 0xFFF

    def _chain(self, first: int, size: int | None = None) -> bytes:
        end = {12: 0xFF8, 16: 0xFFF8, 32: 0x0FFFFFF8}[self.bits]
        cluster_bytes = self.sector * self.per_cluster
        parts, cluster, seen = [], first, 0
        while 2 <= cluster < end:
            seen += 1
            if seen > self.clusters + 2 or (size is not None and seen * cluster_bytes > size + cluster_bytes):
                raise BootInputError("a FAT cluster chain loops or runs past its file")
            parts.append(_read(self.handle, self.offset + self.data_start + (cluster - 2) * cluster_bytes,
                               cluster_bytes))
            cluster = self._next(cluster)
        data = b"".join(parts)
        return data if size is None else data[:size]

    def read(self, path: tuple[str, ...]) -> bytes:
        if self.root_cluster is not None:
            directory = self._chain(self.root_cluster)
        else:
            directory = _read(self.handle, self.offset + self.root_start, self.root_size)
        for depth, name in enumerate(path):
            entry = _find(directory, _short_name(name))
            if entry is None:
                raise BootInputError(f"{'/'.join(path[:depth + 1])} is not on the EFI system partition")
            cluster = struct.unpack_from("<H", entry, 20)[0] << 16 | struct.unpack_from("<H", entry, 26)[0]
            size = struct.unpack_from("<I", entry, 28)[0]
            if depth == len(path) - 1:
                if size > MAX_UKI_BYTES:
                    raise BootInputError(f"{'/'.join(path)} is {size} bytes")
                return self._chain(cluster, size)
            directory = self._chain(cluster)
        raise BootInputError(f"{'/'.join(path)} is not a file")


def _find(directory: bytes, wanted: bytes) -> bytes | None:
    """The 32-byte entry of an 8.3 name in a directory (long-name and deleted entries skipped)."""
    for index in range(0, len(directory) - 31, 32):
        entry = directory[index:index + 32]
        if entry[0] == 0:
            return None
        if entry[0] != 0xE5 and entry[11] != 0x0F and entry[:11].upper() == wanted:
            return entry
    return None


def _short_name(name: str) -> bytes:
    stem, _, extension = name.upper().partition(".")
    return stem.ljust(8).encode("ascii") + extension.ljust(3).encode("ascii")


# ---------------------------------------------------------------------------------------------
# PE


def pe_layout(data: bytes) -> dict:
    if data[:2] != b"MZ" or len(data) < 64:
        raise BootInputError("not a PE image (no MZ header)")
    pe, = struct.unpack_from("<I", data, 0x3C)
    if data[pe:pe + 4] != b"PE\x00\x00":
        raise BootInputError("not a PE image (no PE signature)")
    sections, optional_size = struct.unpack_from("<H", data, pe + 6)[0], struct.unpack_from("<H", data, pe + 20)[0]
    optional = pe + 24
    magic, = struct.unpack_from("<H", data, optional)
    if magic not in (0x10B, 0x20B):
        raise BootInputError(f"unknown PE optional header magic 0x{magic:x}")
    directories = optional + (96 if magic == 0x10B else 112)
    number, = struct.unpack_from("<I", data, directories - 4)
    security = directories + 4 * 8
    cert_offset, cert_size = struct.unpack_from("<II", data, security) if number > 4 else (0, 0)
    table = optional + optional_size
    out = []
    for index in range(sections):
        entry = data[table + 40 * index:table + 40 * (index + 1)]
        name = entry[:8].rstrip(b"\x00").decode("ascii", errors="replace")
        virtual_size, _, raw_size, raw_pointer = struct.unpack_from("<IIII", entry, 8)
        out.append({"name": name, "virtual_size": virtual_size, "raw_size": raw_size, "raw_pointer": raw_pointer})
    return {"checksum": optional + 64, "security": security if number > 4 else None,
            "headers": struct.unpack_from("<I", data, optional + 60)[0], "cert": (cert_offset, cert_size),
            "sections": out}


def authenticode(data: bytes, algorithm: str) -> bytes:
    layout = pe_layout(data)
    digest = hashlib.new(algorithm)
    checksum, security, headers = layout["checksum"], layout["security"], layout["headers"]
    digest.update(data[:checksum])
    if security is None:
        digest.update(data[checksum + 4:headers])
    else:
        digest.update(data[checksum + 4:security])
        digest.update(data[security + 8:headers])
    hashed = headers
    for section in sorted(layout["sections"], key=lambda s: s["raw_pointer"]):
        if section["raw_size"]:
            digest.update(data[section["raw_pointer"]:section["raw_pointer"] + section["raw_size"]])
            hashed += section["raw_size"]
    cert_offset, cert_size = layout["cert"]
    end = len(data) - cert_size if cert_size and cert_offset + cert_size == len(data) else len(data)
    if end > hashed:
        digest.update(data[hashed:end])
    return digest.digest()


def section_content(data: bytes, section: dict) -> bytes:
    """A section as loaded: its raw data cut or zero-filled to its virtual size."""
    raw = data[section["raw_pointer"]:section["raw_pointer"] + section["raw_size"]]
    size = section["virtual_size"] or section["raw_size"]
    return raw[:size].ljust(size, b"\x00")


def stub_version(sdmagic: bytes) -> int | None:
    text = sdmagic.decode("ascii", errors="replace")
    if "systemd-stub " not in text:
        return None
    digits = ""
    for char in text.split("systemd-stub ", 1)[1]:
        if not char.isdigit():
            break
        digits += char
    return int(digits) if digits else None


def sha384(data: bytes) -> str:
    return hashlib.sha384(data).hexdigest()


def uki_inputs(uki: bytes) -> dict:
    layout = pe_layout(uki)
    sections = {s["name"]: s for s in layout["sections"]}
    missing = [n for n in (".linux", ".cmdline", ".initrd") if n not in sections]
    if missing:
        raise BootInputError(f"the UKI has no {', '.join(missing)} section")
    content = {name: section_content(uki, s) for name, s in sections.items()}
    cmdline = content[".cmdline"].split(b"\x00", 1)[0].decode("utf-8", errors="replace")
    version = stub_version(content[".sdmagic"]) if ".sdmagic" in content else None
    out = {
        "uki_authenticode_sha384": authenticode(uki, "sha384").hex(),
        "uki_authenticode_sha256": authenticode(uki, "sha256").hex(),
        "kernel_authenticode_sha384": authenticode(content[".linux"], "sha384").hex(),
        "cmdline_sha384": sha384((cmdline + "\x00").encode("utf-16-le")),
        "initrd_sha384": sha384(content[".initrd"]),
        "stub_version": version,
        "pe_sections_sha384": None,
    }
    if version is not None and version >= 256:
        register = bytes(48)
        for name in MEASURED_SECTIONS:
            if name in content:
                register = hashlib.sha384(register + hashlib.sha384(name.encode() + b"\x00").digest()).digest()
                register = hashlib.sha384(register + hashlib.sha384(content[name]).digest()).digest()
        out["pe_sections_sha384"] = register.hex()
    return out


def disk_inputs(path: str) -> dict:
    with open(path, "rb") as handle:
        event, partitions = gpt(handle)
        esp = next((p for p in partitions if p[0] == ESP_TYPE), None)
        if esp is None:
            raise BootInputError("the GPT has no EFI system partition")
        uki = Fat(handle, esp[1] * SECTOR).read(UKI_PATH)
    return {"gpt_event_sha384": sha384(event), **uki_inputs(uki)}


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not os.path.isfile(argv[0]):
        print("usage: bootinputs.py DISK.raw", file=sys.stderr)
        return 2
    try:
        inputs = disk_inputs(argv[0])
    except BootInputError as exc:
        print(f"boot inputs not recorded: {exc}", file=sys.stderr)
        return 1
    json.dump(inputs, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
