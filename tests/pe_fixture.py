"""Minimal PE32+ images and FAT16/GPT disks, written byte by byte for the boot-input tests: a
"UKI" whose sections are small known strings and whose .linux is itself a PE image. Nothing here
boots; the layouts are the ones the PE/COFF specification, FAT and UEFI's GPT define."""

from __future__ import annotations

import struct
import zlib

FILE_ALIGN, SECTION_ALIGN = 0x200, 0x1000


def _align(value: int, to: int) -> int:
    return (value + to - 1) // to * to


def pe(sections: list[tuple[str, bytes]], *, virtual_sizes: dict[str, int] | None = None, trailer: bytes = b"") -> bytes:
    """A PE32+ image (x86-64, EFI application) with these sections, in this order."""
    header_size = _align(0x80 + 4 + 20 + 240 + 40 * len(sections), FILE_ALIGN)
    raw, pointer, rva, table = [], header_size, SECTION_ALIGN, b""
    for name, data in sections:
        raw_size = _align(len(data), FILE_ALIGN)
        virtual = (virtual_sizes or {}).get(name, len(data))
        table += struct.pack("<8sIIIIIIHHI", name.encode(), virtual, rva, raw_size, pointer, 0, 0, 0, 0, 0x40000040)
        raw.append(data.ljust(raw_size, b"\x00"))
        pointer += raw_size
        rva += _align(max(virtual, 1), SECTION_ALIGN)
    dos = b"MZ" + b"\x00" * 0x3A + struct.pack("<I", 0x80) + b"\x00" * 0x40
    coff = struct.pack("<HHIIIHH", 0x8664, len(sections), 0, 0, 0, 240, 0x22)
    optional = struct.pack("<HBBIIIIIQIIHHHHHHIIIIHHQQQQII", 0x20B, 14, 0, 0, 0, 0, SECTION_ALIGN, SECTION_ALIGN,
                           0, SECTION_ALIGN, FILE_ALIGN, 0, 0, 0, 0, 0, 0, 0, rva, header_size, 0x1234, 10, 0,
                           0x100000, 0x1000, 0x100000, 0x1000, 0, 16)
    optional += b"\x00" * (16 * 8)
    headers = (dos + b"PE\x00\x00" + coff + optional + table).ljust(header_size, b"\x00")
    return headers + b"".join(raw) + trailer


def fat16(files: dict[tuple[str, ...], bytes], *, sectors: int = 20480) -> bytes:
    """A FAT16 file system (512-byte sectors, 4 sectors per cluster, so at least 4085 clusters: FAT16
    by the FAT specification's count) holding ``files`` by 8.3 path."""
    per_cluster, reserved, root_entries, fat_sectors = 4, 4, 512, 32
    image = bytearray(sectors * 512)
    boot = struct.pack("<3s8sHBHBHHBHHHII", b"\xeb\x3c\x90", b"FIXTURE ", 512, per_cluster, reserved, 2, root_entries,
                       sectors, 0xF8, fat_sectors, 32, 64, 0, 0)
    image[:len(boot)] = boot
    image[510:512] = b"\x55\xaa"
    fat = [0xFFF8, 0xFFFF]
    data_start = (reserved + 2 * fat_sectors) * 512 + root_entries * 32
    cluster_bytes = per_cluster * 512

    def allocate(content: bytes) -> int:
        count = max(1, (len(content) + cluster_bytes - 1) // cluster_bytes)
        first = len(fat)
        for i in range(count):
            fat.append(first + i + 1 if i < count - 1 else 0xFFFF)
            chunk = content[i * cluster_bytes:(i + 1) * cluster_bytes]
            offset = data_start + (first + i - 2) * cluster_bytes
            image[offset:offset + len(chunk)] = chunk
        return first

    def entry(name: str, attr: int, cluster: int, size: int) -> bytes:
        stem, _, ext = name.partition(".")
        return struct.pack("<8s3sB8xHHHHI", stem.ljust(8).encode(), ext.ljust(3).encode(), attr, cluster >> 16, 0, 0,
                           cluster & 0xFFFF, size)

    def directory(prefix: tuple[str, ...]) -> bytes:
        names = sorted({path[len(prefix)] for path in files if path[:len(prefix)] == prefix and len(path) > len(prefix)})
        out = b""
        for name in names:
            here = prefix + (name,)
            if here in files:
                out += entry(name, 0x20, allocate(files[here]), len(files[here]))
            else:
                out += entry(name, 0x10, allocate(directory(here) or b"\x00" * 32), 0)
        return out

    root = directory(())
    root_offset = (reserved + 2 * fat_sectors) * 512
    image[root_offset:root_offset + len(root)] = root
    table = struct.pack(f"<{len(fat)}H", *fat)
    for copy in range(2):
        offset = (reserved + copy * fat_sectors) * 512
        image[offset:offset + len(table)] = table
    return bytes(image)


def gpt_disk(partition: bytes, *, disk_guid: bytes = bytes(range(16))) -> bytes:
    """A GPT disk with one EFI system partition (starting at LBA 2048) holding ``partition``."""
    esp_type = bytes.fromhex("28732ac11ff8d211ba4b00a0c93ec93b")
    first, last = 2048, 2048 + len(partition) // 512 - 1
    total = last + 1 + 2048
    entry = struct.pack("<16s16sQQQ72s", esp_type, bytes(range(16, 32)), first, last, 0, "ESP".encode("utf-16-le"))
    entries = entry.ljust(128 * 128, b"\x00")
    header = struct.pack("<8sIIIIQQQQ16sQIII", b"EFI PART", 0x10000, 92, 0, 0, 1, total - 1, 34, total - 34,
                         disk_guid, 2, 128, 128, zlib.crc32(entries))
    header = header[:16] + struct.pack("<I", zlib.crc32(header)) + header[20:]
    disk = bytearray(total * 512)
    disk[512:512 + len(header)] = header
    disk[1024:1024 + len(entries)] = entries
    disk[first * 512:first * 512 + len(partition)] = partition
    return bytes(disk)
