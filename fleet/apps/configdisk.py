"""The configuration disk a dstack guest on GCP reads once per boot.

The guest looks for a disk whose filesystem label is ``DSTACKSHR``, mounts it read-only, copies
``app-compose.json``, ``.sys-config.json``, ``.instance_info`` and the optional ``.user-config``
(and ``.encrypted-env``), and unmounts it. The format follows Dstack-TEE/dstack at
``312dc605ebaaf93372534ffb135ea011533d28e9`` (branch ``next``, 2026-08-07):
``dstack/dstack-types/src/shared_filenames.rs`` for the names, ``HostShared::copy`` in
``dstack/dstack-util/src/system_setup.rs`` for the size limits.

The core renders the files byte for byte; a generated step builds a reproducible ext4 image of them
(``mke2fs -d`` with a fixed UUID, hash seed and timestamps), pads it to a whole number of GiB (GCE
imports a raw disk only in 1 GB increments; the padding is sparse, so the tarball stays small), packs
it as a GCE ``disk.raw`` tarball and uploads it content-addressed. One version per content hash: a config change is a new
image and disk, attached in place of the old one, and the node is reset so the guest reads it.
"""

from __future__ import annotations

import base64
import hashlib
import inspect
import json
import shlex
import uuid
from dataclasses import dataclass

LABEL = "DSTACKSHR"
PINNED_GUEST = "Dstack-TEE/dstack@312dc605ebaaf93372534ffb135ea011533d28e9"
APP_COMPOSE, SYS_CONFIG, INSTANCE_INFO, USER_CONFIG, ENCRYPTED_ENV = (
    "app-compose.json", ".sys-config.json", ".instance_info", ".user-config", ".encrypted-env")
MIB, KIB = 1024 * 1024, 1024
SIZE_LIMITS = {APP_COMPOSE: 50 * MIB, SYS_CONFIG: 32 * KIB, INSTANCE_INFO: 10 * KIB, USER_CONFIG: 50 * MIB,
               ENCRYPTED_ENV: 256 * KIB}
REQUIRED = (APP_COMPOSE, SYS_CONFIG)
MIN_IMAGE_MIB = 8
# GCE creates an image from a raw disk only when disk.raw is a whole number of GB (2**30 bytes): Google's
# "Manually import boot disks" page (compute/docs/import/import-existing-image), as quoted in
# rancher/os#1998 ("must have a size in an increment of 1GB") and rancher/elemental-toolkit#406 ("Image
# needs to be rounded up to the next Gb"). Every raw disk made here is padded to that.
GIB = 1024 ** 3
DATA_PARTITION_LABEL = "dstack-data"
DATA_IMAGE_BYTES = GIB
# v1 was 10 MiB, which GCE does not import; a new version is a new object and a new image name, so an
# object uploaded by an earlier run is never taken for the new bytes
DATA_IMAGE_VERSION = "v2"
# The layout of configuration-disk objects: v1 (unpadded, which GCE refused) sat at <digest>/disk.tar.gz.
# The build step skips an object that exists, so padded disks go to a new path.
CONFIG_DISK_LAYOUT = "gib"
STEP = "# dstack-fleet:step="


class ConfigDiskError(ValueError):
    pass


def sys_config(*, kms_urls: list[str], gateway_urls: list[str], pccs_url: str, docker_registry: str | None,
               os_image_hash: str | None, cpu_count: int | None, memory_bytes: int | None) -> bytes:
    """``.sys-config.json``: unmeasured host settings. ``vm_config`` is itself a JSON string; the KMS
    checks the image against it and answers with its os_image_hash, which the guest measures. On GCE
    ``os_image_hash`` must be the UKI Authenticode hash (``fleet.attest.measure.vm_config_os_image_hash``
    decides; ``fleet.apps.plans.gce_os_image_hash`` passes it here)."""
    vm_config = {"spec_version": 2}
    if os_image_hash:
        vm_config["os_image_hash"] = os_image_hash
    if cpu_count:
        vm_config["cpu_count"] = cpu_count
    if memory_bytes:
        vm_config["memory_size"] = memory_bytes
    document = {"kms_urls": kms_urls, "gateway_urls": gateway_urls, "pccs_url": pccs_url,
                "vm_config": json.dumps(vm_config, sort_keys=True, separators=(",", ":"))}
    if docker_registry:
        document["docker_registry"] = docker_registry
    return (json.dumps(document, indent=2, sort_keys=True) + "\n").encode()


def instance_seed(stack: str, node_key: str) -> str:
    """A stable, non-secret per-node seed: the instance id still differs per node and, on GCP,
    is bound to the vTPM at boot."""
    return hashlib.sha256(f"dstack-fleet instance seed|{stack}|{node_key}".encode()).hexdigest()[:40]


def instance_info(*, app_id: str | None, seed: str) -> bytes:
    document = {"instance_id_seed": seed}
    if app_id:
        document["app_id"] = app_id
    return (json.dumps(document, sort_keys=True, separators=(",", ":"))).encode()


def check_files(files: dict[str, bytes]) -> None:
    problems = [f"{name} is required" for name in REQUIRED if name not in files]
    problems += [f"{name} is not a file the guest reads" for name in files if name not in SIZE_LIMITS]
    problems += [f"{name} is {len(data)} bytes; the guest accepts at most {SIZE_LIMITS[name]}"
                 for name, data in files.items() if name in SIZE_LIMITS and len(data) > SIZE_LIMITS[name]]
    if problems:
        raise ConfigDiskError("; ".join(problems))


def version_name(namer, node_key: str, digest: str) -> str:
    """GCP name of a node's configuration image and disk of one content version."""
    return namer.name(node_key, "cfg", digest[:12])


def data_image_name(namer) -> str:
    return namer.name("dstack-data", DATA_IMAGE_VERSION)


def content_hash(files: dict[str, bytes]) -> str:
    listing = [[name, hashlib.sha256(data).hexdigest()] for name, data in sorted(files.items())]
    return hashlib.sha256(json.dumps(listing, separators=(",", ":")).encode()).hexdigest()


def image_mib(files: dict[str, bytes]) -> int:
    """Room for the files and filesystem overhead, in whole MiB (at least 8): the filesystem's size."""
    return max(MIN_IMAGE_MIB, -(-sum(len(d) for d in files.values()) // MIB) + 4)


def padded_bytes(size: int) -> int:
    """``size`` rounded up to a whole number of GiB (what GCE imports), at least 1 GiB."""
    return max(1, -(-size // GIB)) * GIB


def bundle(files: dict[str, bytes]) -> str:
    """The files as the build step reads them on stdin (JSON of base64)."""
    return json.dumps({name: base64.b64encode(data).decode() for name, data in sorted(files.items())},
                      separators=(",", ":"))


@dataclass(frozen=True)
class Upload:
    bucket: str  # image bucket name
    prefix: str  # object prefix, e.g. "config-disks"

    def object_url(self, digest: str) -> str:
        return f"gs://{self.bucket}/{self.prefix}/{digest}/{CONFIG_DISK_LAYOUT}/disk.tar.gz"


def _uuid_from(digest: str, salt: str) -> str:
    return str(uuid.UUID(hashlib.sha256(f"{salt}|{digest}".encode()).hexdigest()[:32]))


DECODE = ("import base64, json, os, sys\n"
          "target = sys.argv[1]\n"
          "for name, data in json.load(sys.stdin).items():\n"
          "    path = os.path.join(target, name)\n"
          "    with open(path, 'wb') as f:\n"
          "        f.write(base64.b64decode(data))\n"
          "    os.utime(path, (1, 1))\n"
          "os.utime(target, (1, 1))\n")


def build_script(files: dict[str, bytes], upload: Upload | None) -> str:
    """Bash: files (JSON on stdin) -> reproducible ext4 image labelled DSTACKSHR -> GCE disk.raw
    tarball -> uploaded under the content hash (skipped when already there). Prints the object URL
    and the tarball's sha256. Without ``upload`` it leaves ``disk.tar.gz`` in ``$OUT_DIR``."""
    check_files(files)
    digest = content_hash(files)
    names = sorted(files)
    lines = [
        "set -euo pipefail",
        f"{STEP}config-disk",
        f"# content hash {digest}",
        'work=$(mktemp -d)',
        'trap \'rm -rf "$work"\' EXIT',
    ]
    if upload is not None:
        url = upload.object_url(digest)
        lines += [
            f"object={shlex.quote(url)}",
            'if gcloud storage objects describe "$object" >/dev/null 2>&1; then',
            '  echo "$object already exists"',
            '  exit 0',
            'fi',
        ]
    lines += [
        'mkdir "$work/files"',
        f"python3 -c {shlex.quote(DECODE)} \"$work/files\"",
        f"truncate -s {image_mib(files)}M \"$work/disk.raw\"  # the filesystem's size",
        "# fixed UUID, hash seed and times (E2FSPROGS_FAKE_TIME), so the same files give the same bytes",
        "E2FSPROGS_FAKE_TIME=1 mke2fs -q -t ext4 -O ^has_journal -m 0 -N 64 "
        f"-L {LABEL} -U {_uuid_from(digest, 'uuid')} "
        f"-E hash_seed={_uuid_from(digest, 'hash-seed')},root_owner=0:0,lazy_itable_init=0,nodiscard "
        '-d "$work/files" "$work/disk.raw"',
        "# mke2fs copies each source file's ctime and atime, which no tool can set: pin them",
        "{",
    ]
    for name in names:
        for field in ("atime", "ctime", "mtime", "crtime"):
            lines.append(f"  printf 'sif %s {field} 1\\n' {shlex.quote('/' + name)}")
    lines += [
        '} > "$work/times"',
        'E2FSPROGS_FAKE_TIME=1 debugfs -w -f "$work/times" "$work/disk.raw" >/dev/null 2>&1',
        'e2fsck -fn "$work/disk.raw" >/dev/null',
        "# GCE imports whole GiB only: pad with a hole after the filesystem (the guest finds it by its label)",
        f"truncate -s {padded_bytes(image_mib(files) * MIB)} \"$work/disk.raw\"",
        'tar --format=oldgnu -S --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner '
        '-C "$work" -cf - disk.raw | gzip -n -9 > "$work/disk.tar.gz"',
        'sha=$(sha256sum "$work/disk.tar.gz" | cut -d" " -f1)',
    ]
    if upload is not None:
        lines += ['gcloud storage cp --no-clobber "$work/disk.tar.gz" "$object" >&2',
                  'echo "$object $sha"']
    else:
        lines += ['cp "$work/disk.tar.gz" "$OUT_DIR/disk.tar.gz"', 'echo "$OUT_DIR/disk.tar.gz $sha"']
    return "\n".join(lines) + "\n"


DATA_DISK_GUID = "5c3d1a9e-6b1f-4b7e-9c52-1d7a0b6e4f21"
DATA_PART_GUID = "9b2e4c71-3a5d-4f08-b6c9-7e1d2a3b4c5d"
LINUX_DATA_TYPE = "0fc63daf-8483-4772-8e79-3d69d8477de4"


def write_gpt(path: str, size: int, name: str, disk_guid: str, part_guid: str, type_guid: str) -> None:
    """Write a GPT disk image of ``size`` bytes (sparse) with one partition (from LBA 2048 to the end)
    named ``name``: protective MBR, primary and backup headers and partition arrays (UEFI spec, 512-byte
    sectors; the backup header in the last LBA of ``size``, so ``size`` must be the disk's final size).
    Standard library only and self-contained: the build step runs this same function's source."""
    import struct
    import uuid as _uuid
    import zlib

    sector, entries, entry_size = 512, 128, 128
    last = size // sector - 1
    array_sectors = entries * entry_size // sector
    first_usable, last_usable = 2 + array_sectors, last - 1 - array_sectors
    entry = struct.pack("<16s16sQQQ72s", _uuid.UUID(type_guid).bytes_le, _uuid.UUID(part_guid).bytes_le,
                        2048, last_usable, 0, name.encode("utf-16-le"))
    array = entry + bytes(entry_size * (entries - 1))
    array_crc = zlib.crc32(array)

    def header(current: int, backup: int, array_lba: int) -> bytes:
        fields = [b"EFI PART", 0x00010000, 92, 0, 0, current, backup, first_usable, last_usable,
                  _uuid.UUID(disk_guid).bytes_le, array_lba, entries, entry_size, array_crc]
        raw = struct.pack("<8sIIIIQQQQ16sQIII", *fields)
        fields[3] = zlib.crc32(raw)
        return struct.pack("<8sIIIIQQQQ16sQIII", *fields).ljust(sector, b"\0")

    mbr = bytearray(sector)
    mbr[446:462] = struct.pack("<B3sB3sII", 0, b"\x00\x02\x00", 0xEE, b"\xff\xff\xff", 1, min(last, 0xFFFFFFFF))
    mbr[510:512] = b"\x55\xaa"
    with open(path, "wb") as f:
        f.truncate(size)
        f.write(bytes(mbr) + header(1, last, 2) + array)
        f.seek((last - array_sectors) * sector)
        f.write(array + header(last, 1, last - array_sectors))


def data_disk_script(upload: Upload | None) -> str:
    """Bash: the dstack data-disk image: a small GPT disk with one partition named dstack-data (the
    guest finds its data by that partition label, grows it to the disk and encrypts it). Fixed GUIDs,
    so the bytes never change."""
    name = f"data-disk-{DATA_IMAGE_VERSION}"
    lines = ["set -euo pipefail", f"{STEP}data-disk", 'work=$(mktemp -d)', 'trap \'rm -rf "$work"\' EXIT']
    if upload is not None:
        lines += [f"object={shlex.quote(f'gs://{upload.bucket}/{upload.prefix}/{name}/disk.tar.gz')}",
                  'if gcloud storage objects describe "$object" >/dev/null 2>&1; then',
                  '  echo "$object already exists"', "  exit 0", "fi"]
    lines += [
        "# shellcheck disable=SC2016 # a Python program, single-quoted on purpose",
        f"python3 -c {shlex.quote(_gpt_program())} \"$work/disk.raw\"",
        'tar --format=oldgnu -S --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner '
        '-C "$work" -cf - disk.raw | gzip -n -9 > "$work/disk.tar.gz"',
        'sha=$(sha256sum "$work/disk.tar.gz" | cut -d" " -f1)',
    ]
    if upload is not None:
        lines += ['gcloud storage cp --no-clobber "$work/disk.tar.gz" "$object" >&2', 'echo "$object $sha"']
    else:
        lines += ['cp "$work/disk.tar.gz" "$OUT_DIR/disk.tar.gz"', 'echo "$OUT_DIR/disk.tar.gz $sha"']
    return "\n".join(lines) + "\n"


def _gpt_program() -> str:
    call = (f"write_gpt(sys.argv[1], {DATA_IMAGE_BYTES}, {DATA_PARTITION_LABEL!r}, {DATA_DISK_GUID!r}, "
            f"{DATA_PART_GUID!r}, {LINUX_DATA_TYPE!r})")
    return "import sys\n" + inspect.getsource(write_gpt) + call + "\n"


def data_image_url(upload: Upload) -> str:
    return f"gs://{upload.bucket}/{upload.prefix}/data-disk-{DATA_IMAGE_VERSION}/disk.tar.gz"


def node_files(*, app_compose: bytes, kms_urls: list[str], gateway_urls: list[str], app_id: str | None,
               seed: str, os_image_hash: str | None, cpu_count: int | None, memory_bytes: int | None,
               user_config: str | None) -> dict[str, bytes]:
    """Every file of one node's configuration disk, byte for byte."""
    files = {
        APP_COMPOSE: app_compose,
        SYS_CONFIG: sys_config(kms_urls=kms_urls, gateway_urls=gateway_urls, pccs_url="", docker_registry=None,
                               os_image_hash=os_image_hash, cpu_count=cpu_count, memory_bytes=memory_bytes),
        INSTANCE_INFO: instance_info(app_id=app_id, seed=seed),
    }
    if user_config:
        files[USER_CONFIG] = user_config.encode()
    check_files(files)
    return files
