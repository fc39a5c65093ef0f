"""Generated build scripts, the outputs contract and the build host's plan.

A build is one bash script per recipe (``build_script``), generated from a validated
``recipes.BuildSpec``. Every value is assigned once at the top with ``shlex.quote``; the functions
below only use them as ``"$VARIABLE"``, so no path, URL or label can become a command. The script:

1. exits 0 at once when ``outputs.json`` already exists for its input hash (a rebooted build host,
   a rerun): unchanged inputs never rebuild;
2. on a build host (``remote``) installs the host packages and runs the build as an unprivileged
   user (bitbake refuses root, and dstack's reproducible build runs Docker as the calling user);
3. gets the guest (a prebuilt binary verified against its sha256 before anything else happens, or a
   ``cargo build`` for the musl target at a pinned commit) and fetches every upstream at its pinned
   commit;
4. ``tplus-overlay``: installs the guest, the overlay's init script and the public half of the
   fleet's table-signing key (fetched from Cloud KMS by its key version, checked to be EC P-256)
   into meta-dstack's ``dstack-sync`` recipe (rewriting ``BINARY`` and ``SRC_URI``, which upstream
   points at its prebuilt ``mini-server``, and adding the tools the init script needs as the
   recipe's runtime dependencies), performs ``get-modular.sh``'s steps at the pins and ``bitbake``s
   the image, twice, in two complete trees (``tree-a``, ``tree-b``: their own build directories and
   shared state, only the source downloads shared), and publishes nothing when the two disks differ;
   ``dstack-os``: applies kernel command-line overrides to the UKI recipe and runs the release's own
   ``repro-build.sh`` (build-a, build-b, compare), then compares the published files itself, because
   the release's ``check.sh`` accepts differing images when the rootfs matches and never compares
   ``disk.raw``; and records what the image contributes to RTMR1 and RTMR2 on GCP
   (``fleet.images.bootinputs`` on ``disk.raw``, kept as ``boot`` in the lock entry);
5. packs ``disk.raw`` as GCE wants it (only ``disk.raw``, ``tar --format=oldgnu -S``) with fixed
   order, times and owners and ``gzip -n``, so the same disk gives the same tarball bytes. GCE imports
   a raw disk only in whole GiB: a GPT disk (the release's ``mkimage.sh`` aligns to MiB) is first
   padded, sparse, with its GPT rewritten for the padded size (``pad_gpt_disk``), and the packer
   refuses any other ``disk.raw`` that is not a whole number of GiB;
6. uploads ``disk.tar.gz``, ``disk.tar.gz.sha256`` and ``build.log`` to ``gs://<bucket>/<input
   hash>/``, reads the object's generation and crc32c back, and writes ``outputs.json`` last (made by
   Python's ``json``); on failure it uploads the log and ``failure.txt`` instead. A build host also
   writes ``started.json`` when it starts, so ``python -m fleet collect`` can tell a build that runs
   from one that never started and one that ran past its timeout;
7. on a build host, powers the VM off (``shutdown -h now``) whatever happened, so it stops billing
   compute; the host itself (and its large disk) is deleted by the images stack once
   ``python -m fleet collect`` has verified the outputs in the bucket (or recorded the failure).

``local`` mode runs the same script on the operator's machine: artifacts go to a local directory,
and to the bucket too when one is given.

Nothing waits for a build where ``pulumi up`` runs (a build takes longer than a CI job may run):
``fleet.stacks.collect`` reads the bucket later, and ``parse_outputs`` turns ``outputs.json`` into a
lock-file entry.

What cannot be checked here: a real Yocto or dstack build (hours, network, a large disk), real GCS
semantics (generation and crc32c come from ``gcloud storage objects describe``) and the Ubuntu
packages' names on the boot image the operator pins. The tests run every script against stand-in
tools for everything else.
"""

from __future__ import annotations

import base64
import hashlib
import inspect
import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError

from fleet.images import bootinputs, recipes
from fleet.images.lock import ImageEntry
from fleet.gcp.naming import Namer, label_value
from fleet.images.recipes import BuildSpec, GuestBinary, GuestSource
from fleet.project.bootstrap import key_version_flags

Mode = Literal["remote", "local"]

STEP_MARK = "# dstack-fleet:step="
BUILD_USER = "dstack-fleet-build"
REMOTE_WORK_ROOT = "/var/lib/dstack-fleet-build"
GUEST_UPLOAD_NAME = "inputs/guest"
# Files of a dstack OS build that are published or hashed, compared between build-a and build-b.
DSTACK_COMPARED = ("disk.raw", "digest.txt", "sha256sum.txt", "metadata.json", "auth_hash.txt")
DSTACK_REQUIRED = ("disk.raw", "digest.txt", "sha256sum.txt", "metadata.json")
# get-modular.sh's `bitbake-layers add-layer` calls, in its order (it also adds the top
# meta-openembedded directory, which is not a layer and fails there unnoticed).
TPLUS_EXTRA_LAYERS = ("./meta-openembedded/meta-oe/", "./meta-openembedded/meta-python/",
                      "./meta-openembedded/meta-networking", "./meta-openembedded/meta-filesystems/",
                      "meta-virtualization")
UPSTREAM_BINARY_LINE = 'BINARY = "mini-server"'
TABLE_KEY_FILE = "table-key.pem"  # in the dstack-sync recipe; installed at recipes.TABLE_KEY_PATH
UPSTREAM_SRC_URI_LINE = 'SRC_URI += "file://${BINARY}"'
# Instance metadata values are limited to 256 KiB.
METADATA_VALUE_LIMIT = 256 * 1024


class BuildScriptError(ValueError):
    """A script cannot be generated for these settings."""


def q(value: object) -> str:
    return shlex.quote(str(value))


def _array(name: str, values: tuple[str, ...] | list[str]) -> str:
    return f"readonly {name}=({' '.join(q(v) for v in values)})"


def _assign(name: str, value: object) -> str:
    return f"readonly {name}={q(value)}"


def artifact_prefix(bucket: str, input_hash: str) -> str:
    return f"gs://{bucket}/{input_hash}"


_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")
_SAFE_CMDLINE = re.compile(r"^[A-Za-z0-9._:+/=-]+$")
_WORK_DIR_RE = re.compile(r"^/[A-Za-z0-9._+/-]+$")


# ---- the build script ------------------------------------------------------------------------------

def build_script(spec: BuildSpec, *, mode: Mode, bucket: str | None, work_dir: str | None = None,
                 output_dir: str | None = None, guest_location: str | None = None) -> str:
    """The bash build script of ``spec``.

    ``remote``: runs as a build host's startup script and needs ``bucket``. ``local``: runs on the
    operator's machine, writes artifacts to ``output_dir`` and uploads them only when ``bucket`` is
    set. ``guest_location`` replaces a guest binary's repository path: the ``gs://`` object the
    build host reads (the component uploads it) or the absolute path of the file (local mode)."""
    if spec.recipe not in recipes.RECIPE_REVISIONS:
        raise BuildScriptError(f"unknown recipe {spec.recipe!r}")
    if mode == "remote" and not bucket:
        raise BuildScriptError("a build host publishes to a bucket: set the artifact bucket")
    if mode == "local" and not output_dir:
        raise BuildScriptError("a local build needs an output directory")
    if bucket and not _BUCKET_RE.match(bucket):
        raise BuildScriptError(f"{bucket!r} is not a GCS bucket name")
    if mode == "remote":
        work_dir = work_dir or f"{REMOTE_WORK_ROOT}/{spec.input_hash}"
        dist, log = f"{work_dir}/dist", f"{work_dir}/build.log"
    else:
        assert output_dir is not None
        work_dir = work_dir or f"{output_dir}/work"
        dist, log = output_dir, f"{output_dir}/build.log"
    if not _WORK_DIR_RE.match(work_dir):
        # bitbake refuses a build directory with spaces, and the upstream setup and repro-build scripts
        # expand paths unquoted: the tree must live at a plain path, wherever the results go
        raise BuildScriptError(f"work directory {work_dir!r}: the upstream build tools need an absolute path of "
                               "letters, digits and . _ + - / only; pass another work directory")
    prefix = artifact_prefix(bucket, spec.input_hash) if bucket else ""
    source = (f"dstack-fleet {mode} build of input hash {spec.input_hash}"
              + (f"; build log {prefix}/build.log" if prefix else ""))
    header = [
        "#!/bin/bash",
        f"# dstack-fleet build of recipe {spec.recipe}, input hash {spec.input_hash}.",
        "# Generated by fleet/buildscript.py: every value is assigned once below, quoted, and only ever",
        "# used as \"$VARIABLE\" by the functions that follow.",
        "# shellcheck disable=SC2016 # the values are literal data, single-quoted on purpose",
        "set -euo pipefail",
        "umask 022",
        "export LC_ALL=C.UTF-8 LANG=C.UTF-8 TZ=UTC",
        "",
        _assign("INPUT_HASH", spec.input_hash),
        _assign("RECIPE", spec.recipe),
        _assign("CONFIG_PATH", spec.config_path),
        _assign("LABEL", spec.label),
        _assign("SOURCE", source),
        _assign("MODE", mode),
        _assign("BUCKET", bucket or ""),
        _assign("PREFIX", prefix),
        _assign("WORK_DIR", work_dir),
        _assign("DIST", dist),
        _assign("BUILD_LOG", log),
        _assign("BUILD_USER", BUILD_USER),
        'readonly IMAGE_DIR="$WORK_DIR/image" SELF="$WORK_DIR/build.sh" BUILD_HOME="$WORK_DIR/home"',
        _array("HOST_PACKAGES", _host_packages(spec)),
        _array("UPSTREAM_NAMES", [u.name for u in spec.upstreams]),
        _array("UPSTREAM_REPOSITORIES", [u.repository for u in spec.upstreams]),
        _array("UPSTREAM_COMMITS", [u.commit for u in spec.upstreams]),
        _array("UPSTREAM_REFS", [u.ref for u in spec.upstreams]),
        _array("UPSTREAM_PATHS", [u.path for u in spec.upstreams]),
        _assign("UPSTREAMS_JSON", json.dumps({u.name: {"repository": u.repository, "commit": u.commit, "ref": u.ref}
                                              for u in spec.upstreams}, sort_keys=True)),
        _assign("CMDLINE_OVERRIDES_JSON", json.dumps(dict(spec.cmdline_overrides), sort_keys=True)),
        _assign("KERNEL_CMDLINE", spec.kernel_cmdline or ""),
        _assign("OUTPUTS_PROGRAM", OUTPUTS_PROGRAM),
        _assign("STARTED_PROGRAM", STARTED_PROGRAM),
        _assign("PAD_PROGRAM", PAD_PROGRAM),
        _assign("RAW_DISK_MULTIPLE", str(RAW_DISK_MULTIPLE)),
    ]
    if spec.recipe == "tplus-overlay":
        header += _tplus_values(spec, guest_location)
        body = COMMON_FUNCTIONS + TPLUS_FUNCTIONS
    else:
        header += _dstack_values(spec)
        body = COMMON_FUNCTIONS + DSTACK_OS_FUNCTIONS
    return "\n".join(header) + "\n" + body + MAIN


def _host_packages(spec: BuildSpec) -> tuple[str, ...]:
    packages = recipes.BUILD_HOST_DEFAULTS[spec.recipe].packages
    if isinstance(spec.guest, GuestSource):
        packages += recipes.RUST_PACKAGES
    return tuple(sorted(set(packages)))


def _tplus_values(spec: BuildSpec, guest_location: str | None) -> list[str]:
    assert spec.init_script is not None and spec.guest is not None
    init = spec.init_script.encode("utf-8")
    lines = [
        _assign("TREE_NAME", "tree"),  # the two builds run in tree-a and tree-b
        _assign("IMAGE", recipes.TPLUS_IMAGE),
        _assign("MACHINE", recipes.TPLUS_MACHINE),
        _assign("GUEST_NAME", recipes.TPLUS_GUEST_NAME),
        _assign("UPSTREAM_BINARY_LINE", UPSTREAM_BINARY_LINE),
        _assign("UPSTREAM_SRC_URI_LINE", UPSTREAM_SRC_URI_LINE),
        _assign("BINARY_LINE", f'BINARY = "{recipes.TPLUS_GUEST_NAME}"'),
        _assign("SRC_URI_LINE", f'SRC_URI += "file://{recipes.TPLUS_GUEST_NAME}"'),
        _assign("LOCAL_CONF_PATCH", "prod-patches/local.conf.patch" if spec.prod else "patches/local.conf.patch"),
        _array("EXTRA_LAYERS", TPLUS_EXTRA_LAYERS),
        _assign("INIT_SCRIPT_SHA256", hashlib.sha256(init).hexdigest()),
        _assign("INIT_SCRIPT_BASE64", base64.b64encode(init).decode("ascii")),
        *_table_key_values(spec),
    ]
    guest = spec.guest
    if isinstance(guest, GuestBinary):
        location = guest_location or guest.url
        if guest.is_path and guest_location is None:
            raise BuildScriptError(f"{spec.config_path}.guest.binary.url is a repository path: give the build its "
                                   "location (the uploaded gs:// object, or the absolute path in local mode)")
        lines += [_assign("GUEST_KIND", "binary"), _assign("GUEST_URL", location),
                  _assign("GUEST_SHA256", guest.sha256)]
    else:
        lines += [_assign("GUEST_KIND", "source"), _assign("GUEST_REPOSITORY", guest.repository),
                  _assign("GUEST_COMMIT", guest.commit), _assign("GUEST_WORKSPACE", guest.workspace),
                  _assign("GUEST_CARGO_BINARY", guest.binary), _assign("GUEST_FEATURES", ",".join(guest.features)),
                  _assign("RUST_TOOLCHAIN", recipes.RUST_TOOLCHAIN), _assign("MUSL_TARGET", recipes.MUSL_TARGET)]
    return lines


def _table_key_values(spec: BuildSpec) -> list[str]:
    """The key version whose public key goes into the image, and the lines the dstack-sync recipe
    gains: the key file, installed where the init script reads it, and the packages the init script
    calls (runtime dependencies of dstack-sync, so they land in the initramfs the node runs)."""
    try:
        number, where = key_version_flags(spec.table_key_version or "")
    except ValueError:
        raise BuildScriptError(f"{spec.config_path}: no table-signing key version for the overlay image") from None
    directory = recipes.TABLE_KEY_PATH.rsplit("/", 1)[0].replace("/etc", "${sysconfdir}", 1)
    append = "\n".join([
        "",
        "# dstack-fleet: the fleet's table-signing public key and the tools the init script calls",
        f'SRC_URI += "file://{TABLE_KEY_FILE}"',
        f'RDEPENDS:${{PN}} += "{" ".join(recipes.TPLUS_IMAGE_PACKAGES)}"',
        "do_install:append() {",
        f"    install -d ${{D}}{directory}",
        f"    install -m 0644 ${{WORKDIR}}/{TABLE_KEY_FILE} ${{D}}{directory}/{TABLE_KEY_FILE}",
        "}",
    ])
    return [
        _assign("TABLE_KEY_VERSION", spec.table_key_version),
        _array("TABLE_KEY_WHERE", where),
        _assign("TABLE_KEY_NUMBER", number),
        _assign("TABLE_KEY_FILE", TABLE_KEY_FILE),
        _assign("RECIPE_APPEND", append),
    ]


def _dstack_values(spec: BuildSpec) -> list[str]:
    release = spec.release
    assert release is not None
    overrides = [f"{name}={value}" for name, value in spec.cmdline_overrides]
    for item in overrides:  # validated in recipes already; a bitbake string must never see a quote or space
        if not _SAFE_CMDLINE.match(item):
            raise BuildScriptError(f"unsafe kernel command-line override {item!r}")
    append = f'UKI_CMDLINE_BASE:append = " {" ".join(overrides)}"' if overrides else ""
    return [
        _assign("DSTACK_VERSION", release.version),
        _assign("DIST_NAME", release.dist_name),
        _assign("UKI_CMDLINE_APPEND", append),
        _array("COMPARED_FILES", DSTACK_COMPARED),
        _array("REQUIRED_FILES", DSTACK_REQUIRED),
        _assign("BOOT_INPUTS_PROGRAM", BOOT_INPUTS_PROGRAM),
    ]


# Run on disk.raw after the build (stdlib only): the hashes the expected RTMR1 and RTMR2 need.
BOOT_INPUTS_PROGRAM = Path(bootinputs.__file__).read_text(encoding="utf-8")


# GCE creates an image from a raw disk only in whole GB (2**30 bytes) increments (Google's "Manually import
# boot disks", quoted in rancher/os#1998 and rancher/elemental-toolkit#406). flashbots/dstack-mr-gcp
# (b16e08b, internal/gpt.go) computes the measured GPT of its GCP images for a disk rounded up to whole
# GiB with the backup header in the last LBA: the GPT header is measured (UEFI_GPT_DATA), so it must be
# written for the size the disk is imported at. Dstack-TEE/meta-dstack v0.6.0.a2 mkimage.sh
# (build_uki_disk_image) aligns disk.raw to 1 MiB only.
RAW_DISK_MULTIPLE = 1024 ** 3


def pad_gpt_disk(path: str, multiple: int) -> int:
    """Grow the GPT disk image at ``path`` in place to a whole multiple of ``multiple`` bytes (the new
    bytes are a hole), and rewrite its GPT for the new size as ``sgdisk -e`` does: the backup partition
    array and header move to the end (backup header in the last LBA), the primary header's AlternateLBA
    and LastUsableLBA follow, both CRC32s are recomputed, the protective MBR spans the disk. Partitions
    and their data are untouched. Returns the new size. Exits with a message for a disk without a valid
    GPT. Standard library only and self-contained: the build step runs this same function's source."""
    import os
    import struct
    import sys
    import zlib

    sector = 512
    size = os.path.getsize(path)
    target = max(1, -(-size // multiple)) * multiple
    if size % sector:
        sys.exit(f"{path}: {size} bytes is not a whole number of 512-byte sectors")
    with open(path, "r+b") as f:
        f.seek(sector)
        primary = f.read(sector)
        if primary[:8] != b"EFI PART":
            sys.exit(f"{path}: no GPT header at LBA 1, so its size cannot be changed safely")
        header_size = struct.unpack_from("<I", primary, 12)[0]
        head = bytearray(primary[:header_size])
        stored_crc = struct.unpack_from("<I", head, 16)[0]
        struct.pack_into("<I", head, 16, 0)
        if zlib.crc32(head) != stored_crc:
            sys.exit(f"{path}: the primary GPT header's CRC32 does not match")
        _, old_backup, first_usable, _ = struct.unpack_from("<QQQQ", head, 24)
        array_lba, count, entry_size, array_crc = struct.unpack_from("<QIII", head, 72)
        array_bytes = count * entry_size
        array_sectors = -(-array_bytes // sector)
        f.seek(array_lba * sector)
        array = f.read(array_bytes)
        if zlib.crc32(array) != array_crc:
            sys.exit(f"{path}: the GPT partition array's CRC32 does not match")
        if target == size:
            return size
        last = target // sector - 1
        backup_array = last - array_sectors
        if old_backup * sector < size:  # the old backup structures: gone, as sgdisk -e leaves them
            f.seek((old_backup - array_sectors) * sector)
            f.write(bytes((array_sectors + 1) * sector))
        f.truncate(target)

        def header(current: int, other: int, entries: int) -> bytes:
            out = bytearray(head)
            struct.pack_into("<QQQQ", out, 24, current, other, first_usable, backup_array - 1)
            struct.pack_into("<Q", out, 72, entries)
            struct.pack_into("<I", out, 16, 0)
            struct.pack_into("<I", out, 16, zlib.crc32(out))
            return bytes(out).ljust(sector, b"\0")

        f.seek(sector)
        f.write(header(1, last, array_lba))
        f.seek(backup_array * sector)
        f.write(array.ljust(array_sectors * sector, b"\0") + header(last, 1, backup_array))
        f.seek(446 + 12)  # the protective MBR entry's size in sectors
        f.write(struct.pack("<I", min(last, 0xFFFFFFFF)))
    return target


PAD_PROGRAM = "import sys\n" + inspect.getsource(pad_gpt_disk) + "pad_gpt_disk(sys.argv[1], int(sys.argv[2]))\n"


# outputs.json is written by this Python program (run with python3 -c), never assembled by hand.
# It re-checks what it records: the os-image-hash is the sha256 of sha256sum.txt, the rootfs hash
# and size come from metadata.json's kernel command line.
OUTPUTS_PROGRAM = r'''
import hashlib, json, os, re, sys
a = dict(zip(sys.argv[1::2], sys.argv[2::2]))
def fail(message):
    sys.exit("outputs.json not written: " + message)
hex64 = re.compile(r"[0-9a-f]{64}")
def read(name, required=True):
    path = os.path.join(a["image_dir"], name)
    if not os.path.exists(path):
        if required:
            fail(name + " is missing from the build output")
        return None
    with open(path, "rb") as f:
        return f.read()
doc = {"inputHash": a["input_hash"], "recipe": a["recipe"], "label": a["label"], "source": a["source"],
       "built_at": a["built_at"]}
artifact = {"sha256": a["sha256"]}
if not hex64.fullmatch(a["sha256"]):
    fail("bad tarball sha256 " + repr(a["sha256"]))
if a["url"]:
    if not re.fullmatch(r"[0-9]+", a["generation"]) or not re.fullmatch(r"[A-Za-z0-9+/]{6}==", a["crc32c"]):
        fail("gcloud reported generation " + repr(a["generation"]) + " and crc32c " + repr(a["crc32c"]))
    artifact.update(url=a["url"], generation=a["generation"], crc32c=a["crc32c"])
else:
    artifact["file"] = a["artifact_file"]
doc["artifact"] = artifact
details = {"mode": a["mode"], "upstreams": json.loads(a["upstreams"]), "build_log": a["build_log"]}
if a["recipe"] == "tplus-overlay":
    details["guest_sha256"] = read("guest.sha256").decode().strip()
    details["table_key_sha256"] = read("table-key.sha256").decode().strip()
else:
    listing = read("sha256sum.txt")
    digest = read("digest.txt").decode().strip()
    if not hex64.fullmatch(digest):
        fail("digest.txt holds " + repr(digest) + ", not a sha256")
    if hashlib.sha256(listing).hexdigest() != digest:
        fail("digest.txt is not the sha256 of sha256sum.txt")
    metadata = json.loads(read("metadata.json"))
    cmdline = metadata.get("cmdline", "")
    params = dict(p.split("=", 1) for p in cmdline.split() if "=" in p)
    rootfs_hash = params.get("dstack.rootfs_hash", "")
    rootfs_size = params.get("dstack.rootfs_size", "")
    if not hex64.fullmatch(rootfs_hash) or not rootfs_size.isdigit():
        fail("metadata.json cmdline has no dstack.rootfs_hash/dstack.rootfs_size: " + repr(cmdline))
    doc["os_image_hash"] = digest
    doc["rootfs_hash"] = rootfs_hash
    # the UKI's final command line: the recipe's (overrides included) with this build's rootfs values;
    # metadata.json's line is the same without the overrides (mkimage.sh KARG0-2)
    final = a["kernel_cmdline"].replace("<rootfs_hash>", rootfs_hash).replace("<rootfs_size>", rootfs_size)
    if not set(cmdline.split()) <= set(final.split()):
        fail("metadata.json cmdline " + repr(cmdline) + " is not part of the expected UKI command line " + repr(final))
    doc["kernel_cmdline"] = final
    uki = read("auth_hash.txt", required=False)
    if uki is not None:
        uki = uki.decode().strip()
        if not hex64.fullmatch(uki):
            fail("auth_hash.txt holds " + repr(uki) + ", not a sha256")
        doc["uki_hash"] = uki
    details.update(rootfs_size=rootfs_size, kernel_cmdline=cmdline, dstack_version=metadata.get("version"),
                   cmdline_overrides=json.loads(a["cmdline_overrides"]))
    boot = read("boot.json", required=False)
    if boot is not None:
        doc["boot"] = json.loads(boot)
        if uki is not None and doc["boot"].get("uki_authenticode_sha256") != uki:
            fail("auth_hash.txt and the UKI on disk.raw have different Authenticode hashes")
doc["details"] = details
tmp = a["out"] + ".tmp"
with open(tmp, "w", encoding="utf-8") as f:
    json.dump(doc, f, indent=2, sort_keys=True)
    f.write("\n")
os.replace(tmp, a["out"])
'''

# started.json, written by Python's json: when a build host began this build (collect's timeout).
STARTED_PROGRAM = r'''
import json, sys
a = dict(zip(sys.argv[1::2], sys.argv[2::2]))
with open(a["out"], "w", encoding="utf-8") as f:
    json.dump({"inputHash": a["input_hash"], "recipe": a["recipe"], "started_at": a["started_at"]}, f, sort_keys=True)
    f.write("\n")
'''

COMMON_FUNCTIONS = r'''
log() { printf '[dstack-fleet build %s] %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

already_built() {
  if [ -n "$BUCKET" ]; then
    gcloud storage objects describe "$PREFIX/outputs.json" --format='value(name)' >/dev/null 2>&1
  else
    [ -f "$DIST/outputs.json" ]
  fi
}

verify_sha256() {  # FILE EXPECTED WHAT
  local actual
  actual=$(sha256sum -- "$1" | cut -d' ' -f1)
  if [ "$actual" != "$2" ]; then
    die "$3: sha256 is $actual but $2 is expected; the build stops"
  fi
}

expect_line() {  # FILE LINE: the pinned upstream must still hold exactly this line
  if [ "$(grep -cxF -- "$2" "$1" || true)" != 1 ]; then
    die "$1: expected exactly one line '$2'; has the pinned upstream changed?"
  fi
}

replace_line() {  # FILE OLD NEW
  expect_line "$1" "$2"
  awk -v old="$2" -v new="$3" '$0 == old { print new; next } { print }' "$1" > "$1.new"
  mv -- "$1.new" "$1"
  expect_line "$1" "$3"
}

fetch_upstream() {  # NAME REPOSITORY COMMIT REF DIR
  local name=$1 repository=$2 commit=$3 ref=$4 dir=$5 head
  log "fetching $name from $repository at $commit ($ref)"
  rm -rf -- "$dir"
  mkdir -p -- "$dir"
  git -C "$dir" init -q
  git -C "$dir" remote add origin "$repository"
  if ! git -C "$dir" fetch -q --depth 1 origin "$commit"; then
    log "$name: the server does not serve commit $commit by itself; fetching ${ref:-its branches}"
    if [ -n "$ref" ]; then git -C "$dir" fetch -q origin "$ref"; else git -C "$dir" fetch -q origin; fi
  fi
  git -C "$dir" checkout -q --detach "$commit"
  head=$(git -C "$dir" rev-parse HEAD)
  if [ "$head" != "$commit" ]; then
    die "$name: checked out $head, but the pin is $commit"
  fi
}

fetch_upstreams() {  # BASE_DIR: every pinned upstream, parents before the layers inside them
  local i
  for i in "${!UPSTREAM_NAMES[@]}"; do
    fetch_upstream "${UPSTREAM_NAMES[$i]}" "${UPSTREAM_REPOSITORIES[$i]}" "${UPSTREAM_COMMITS[$i]}" \
      "${UPSTREAM_REFS[$i]}" "$1/${UPSTREAM_PATHS[$i]}"
  done
}

fit_disk() {  # a GPT disk.raw grows to whole GiB (what GCE imports), its GPT rewritten for the new size;
  # the build phases run it as soon as disk.raw exists, before anything hashes it
  local size
  size=$(stat -c %s -- "$IMAGE_DIR/disk.raw")
  if [ $((size % RAW_DISK_MULTIPLE)) -ne 0 ] && [ "$(head -c 520 -- "$IMAGE_DIR/disk.raw" | tail -c 8)" = "EFI PART" ]; then
    log "disk.raw is $size bytes: padding it to a whole GiB and moving the backup GPT to the new end"
    python3 -c "$PAD_PROGRAM" "$IMAGE_DIR/disk.raw" "$RAW_DISK_MULTIPLE"
  fi
}

pack_disk() {  # $IMAGE_DIR/disk.raw -> $DIST/disk.tar.gz: what GCE imports, the same bytes every time
  local members size
  size=$(stat -c %s -- "$IMAGE_DIR/disk.raw")
  if [ $((size % RAW_DISK_MULTIPLE)) -ne 0 ]; then
    die "disk.raw is $size bytes, not a whole number of GiB ($RAW_DISK_MULTIPLE bytes); GCE imports raw disks only in whole GB, and this one has no GPT to rewrite for a padded size"
  fi
  chmod 0644 "$IMAGE_DIR/disk.raw"
  tar --format=oldgnu --sparse --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner \
    --mode=u=rw,go=r -C "$IMAGE_DIR" -cf - disk.raw | gzip -n > "$DIST/disk.tar.gz.tmp"
  mv -- "$DIST/disk.tar.gz.tmp" "$DIST/disk.tar.gz"
  members=$(tar -tzf "$DIST/disk.tar.gz")
  if [ "$members" != disk.raw ]; then
    die "the tarball holds '$members'; GCE needs exactly disk.raw"
  fi
}

publish() {
  local sha256 url='' generation='' crc32c='' described
  pack_disk
  sha256=$(sha256sum -- "$DIST/disk.tar.gz" | cut -d' ' -f1)
  printf '%s  disk.tar.gz\n' "$sha256" > "$DIST/disk.tar.gz.sha256"
  log "disk.tar.gz sha256 $sha256"
  if [ -n "$BUCKET" ]; then
    gcloud storage cp "$DIST/disk.tar.gz" "$PREFIX/disk.tar.gz"
    gcloud storage cp "$DIST/disk.tar.gz.sha256" "$PREFIX/disk.tar.gz.sha256"
    described=$(gcloud storage objects describe "$PREFIX/disk.tar.gz" --format='value(generation,crc32c_hash)')
    read -r generation crc32c <<< "$described"
    url="$PREFIX/disk.tar.gz"
    log "uploaded $url generation $generation crc32c $crc32c"
  fi
  python3 -c "$OUTPUTS_PROGRAM" out "$DIST/outputs.json" input_hash "$INPUT_HASH" recipe "$RECIPE" \
    label "$LABEL" source "$SOURCE" built_at "$(date -u +%Y-%m-%dT%H:%M:%SZ)" mode "$MODE" \
    sha256 "$sha256" url "$url" generation "$generation" crc32c "$crc32c" artifact_file "$DIST/disk.tar.gz" \
    image_dir "$IMAGE_DIR" upstreams "$UPSTREAMS_JSON" cmdline_overrides "$CMDLINE_OVERRIDES_JSON" \
    kernel_cmdline "$KERNEL_CMDLINE" build_log "${PREFIX:-$DIST}/build.log"
  if [ -n "$BUCKET" ]; then
    gcloud storage cp "$BUILD_LOG" "$PREFIX/build.log"
    # last: its presence is what says the build is complete
    gcloud storage cp "$DIST/outputs.json" "$PREFIX/outputs.json"
  fi
}

mark_started() {  # a build host records when it began, for python -m fleet collect
  python3 -c "$STARTED_PROGRAM" out "$DIST/started.json" input_hash "$INPUT_HASH" recipe "$RECIPE" \
    started_at "$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  gcloud storage cp "$DIST/started.json" "$PREFIX/started.json"
}

clear_failure() {
  rm -f -- "$DIST/failure.txt"
  if [ -n "$BUCKET" ]; then
    gcloud storage rm "$PREFIX/failure.txt" >/dev/null 2>&1 || true
  fi
}

record_failure() {  # STATUS
  printf 'build of input hash %s failed with exit status %s at %s; see build.log\n' \
    "$INPUT_HASH" "$1" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" > "$DIST/failure.txt"
  if [ -n "$BUCKET" ]; then
    gcloud storage cp "$BUILD_LOG" "$PREFIX/build.log"
    gcloud storage cp "$DIST/failure.txt" "$PREFIX/failure.txt"
  fi
}

power_off() {  # a build host stops billing as soon as its work is done, whatever the outcome
  if [ "$MODE" = remote ]; then
    log "powering off the build host"
    shutdown -h now || true
  fi
}

on_exit() {
  local status=$?
  trap - EXIT
  if [ "$status" -ne 0 ]; then
    log "the build failed (exit status $status)"
    record_failure "$status" || log "could not record the failure"
  fi
  power_off
  exit "$status"
}

prepare_host() {  # build host only: packages, and the unprivileged user the build runs as
  log "installing ${#HOST_PACKAGES[@]} host packages"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${HOST_PACKAGES[@]}"
  if ! id -u "$BUILD_USER" >/dev/null 2>&1; then
    useradd --system --no-create-home --shell /bin/bash "$BUILD_USER"
  fi
  mkdir -p -- "$BUILD_HOME"
  prepare_host_for_recipe
  chown -R "$BUILD_USER:" "$WORK_DIR"
  # the unprivileged phase runs this same script: from its file, else from the instance metadata
  if [ -r "${BASH_SOURCE[0]:-}" ]; then
    install -m 0755 "${BASH_SOURCE[0]}" "$SELF"
  else
    curl --fail --silent --show-error --header 'Metadata-Flavor: Google' --output "$SELF" \
      'http://metadata.google.internal/computeMetadata/v1/instance/attributes/startup-script'
    chmod 0755 "$SELF"
  fi
}

run_build_phase() {
  if [ "$MODE" = remote ]; then
    runuser -u "$BUILD_USER" -- env HOME="$BUILD_HOME" /bin/bash "$SELF" build-phase
  else
    build_phase
  fi
}
'''

TPLUS_FUNCTIONS = r'''
prepare_host_for_recipe() {
  # Ubuntu 24.04 forbids unprivileged user namespaces, which bitbake (scarthgap) uses
  if [ -e /proc/sys/kernel/apparmor_restrict_unprivileged_userns ]; then
    sysctl -w kernel.apparmor_restrict_unprivileged_userns=0
  fi
}

obtain_guest() {  # DEST: the light client, verified or built before anything else happens
  local dest=$1
  if [ "$GUEST_KIND" = binary ]; then
    log "fetching the guest binary $GUEST_URL"
    case "$GUEST_URL" in
      https://*) curl --fail --silent --show-error --location --proto '=https' --tlsv1.2 \
                   --output "$dest" "$GUEST_URL" ;;
      gs://*) gcloud storage cp "$GUEST_URL" "$dest" ;;
      *) cp -- "$GUEST_URL" "$dest" ;;
    esac
    verify_sha256 "$dest" "$GUEST_SHA256" "guest binary $GUEST_URL ($CONFIG_PATH.guest.binary.sha256)"
  else
    local features=()
    if [ -n "$GUEST_FEATURES" ]; then features=(--features "$GUEST_FEATURES"); fi
    fetch_upstream guest "$GUEST_REPOSITORY" "$GUEST_COMMIT" "" "$WORK_DIR/guest-src"
    rustup toolchain install "$RUST_TOOLCHAIN" --profile minimal --target "$MUSL_TARGET"
    log "building $GUEST_CARGO_BINARY for $MUSL_TARGET"
    (cd "$WORK_DIR/guest-src/$GUEST_WORKSPACE" &&
      CARGO_TARGET_DIR="$WORK_DIR/guest-target" cargo "+$RUST_TOOLCHAIN" build --locked --release \
        --target "$MUSL_TARGET" --no-default-features "${features[@]}" --bin "$GUEST_CARGO_BINARY")
    cp -- "$WORK_DIR/guest-target/$MUSL_TARGET/release/$GUEST_CARGO_BINARY" "$dest"
  fi
  sha256sum -- "$dest" | cut -d' ' -f1 > "$IMAGE_DIR/guest.sha256"
}

install_guest() {  # GUEST_FILE: into meta-dstack's dstack-sync recipe, with the overlay's init script
  local recipe_dir="$TREE/srcs/poky/meta-dstack/recipes-core/dstack-sync"
  rm -f -- "$recipe_dir/mini-server"
  install -m 0755 "$1" "$recipe_dir/$GUEST_NAME"
  printf '%s' "$INIT_SCRIPT_BASE64" | base64 -d > "$recipe_dir/init"
  verify_sha256 "$recipe_dir/init" "$INIT_SCRIPT_SHA256" "the overlay init script"
  # upstream installs its prebuilt mini-server: point BINARY and SRC_URI at the light client
  replace_line "$recipe_dir/dstack-sync.bb" "$UPSTREAM_BINARY_LINE" "$BINARY_LINE"
  replace_line "$recipe_dir/dstack-sync.bb" "$UPSTREAM_SRC_URI_LINE" "$SRC_URI_LINE"
  if grep -q mini-server "$recipe_dir/dstack-sync.bb"; then
    die "dstack-sync.bb still names mini-server"
  fi
}

install_table_key() {  # the public half of the fleet's table-signing key, read from Cloud KMS
  local recipe_dir="$TREE/srcs/poky/meta-dstack/recipes-core/dstack-sync"
  log "fetching the public key of $TABLE_KEY_VERSION"
  gcloud kms keys versions get-public-key "$TABLE_KEY_NUMBER" "${TABLE_KEY_WHERE[@]}" \
    --output-file "$recipe_dir/$TABLE_KEY_FILE"
  if ! openssl pkey -pubin -in "$recipe_dir/$TABLE_KEY_FILE" -noout -text 2>/dev/null | grep -q 'NIST CURVE: P-256'; then
    die "$TABLE_KEY_VERSION did not give an EC P-256 public key; the init script verifies tables with one"
  fi
  sha256sum -- "$recipe_dir/$TABLE_KEY_FILE" | cut -d' ' -f1 > "$IMAGE_DIR/table-key.sha256"
  printf '%s\n' "$RECIPE_APPEND" >> "$recipe_dir/dstack-sync.bb"
}

setup_layers() {  # flashbots' setup, then get-modular.sh's steps on the pinned checkouts
  local layer
  cd "$TREE"
  # the manifest's copyfile entries
  cp -- "$TREE/srcs/yocto-manifests/config_files/tdx-base/setup" "$TREE/setup"
  cp -- "$TREE/srcs/yocto-manifests/config_files/Makefile" "$TREE/Makefile"
  set +u  # oe-init-build-env reads unset variables
  # shellcheck source=/dev/null
  source ./setup
  set -u
  cd "$TREE/srcs/poky"
  bitbake-layers add-layer meta-dstack
  rm -rf meta-confidential-compute/recipes-core/cvm-*
  for layer in "${EXTRA_LAYERS[@]}"; do
    bitbake-layers add-layer "$layer"
  done
  mv meta-custom-podman/recipes-core/images/cvm-initramfs.bbappend \
    meta-custom-podman/recipes-core/images/core-image-minimal.bbappend
  bitbake-layers add-layer meta-custom-podman
  patch -N meta-confidential-compute/conf/distro/cvm.conf -i meta-dstack/patches/cvm.conf.patch
  # PROD drops debug-tweaks (get-modular.sh picks prod-patches/local.conf.patch when PROD=true)
  patch -N build/conf/local.conf -i "meta-dstack/$LOCAL_CONF_PATCH"
}

build_tree() {  # NAME: one complete tree at the pins, patched and built; its disk to $WORK_DIR/NAME.wic
  local built
  TREE="$WORK_DIR/$1"
  fetch_upstreams "$TREE"
  install_guest "$WORK_DIR/guest.bin"
  install_table_key
  setup_layers
  # the source downloads are checked by their recipes' checksums and may be shared; nothing else is
  printf 'DL_DIR = "%s"\n' "$WORK_DIR/downloads" >> "$TREE/srcs/poky/build/conf/local.conf"
  log "bitbake $IMAGE for $MACHINE in $1"
  bitbake "$IMAGE"
  built="${BUILDDIR:?oe-init-build-env set no BUILDDIR}/tmp/deploy/images/$MACHINE/$IMAGE-$MACHINE.rootfs.wic"
  if [ ! -e "$built" ]; then
    die "bitbake produced no $built"
  fi
  cp --sparse=always --dereference -- "$built" "$WORK_DIR/$1.wic"
}

build_phase() {
  local sha_a sha_b
  mkdir -p -- "$IMAGE_DIR"
  obtain_guest "$WORK_DIR/guest.bin"
  # two complete builds, each in a subshell (the setup script changes directory and environment)
  (build_tree "$TREE_NAME-a")
  (build_tree "$TREE_NAME-b")
  sha_a=$(sha256sum -- "$WORK_DIR/$TREE_NAME-a.wic" | cut -d' ' -f1)
  sha_b=$(sha256sum -- "$WORK_DIR/$TREE_NAME-b.wic" | cut -d' ' -f1)
  if ! cmp -s -- "$WORK_DIR/$TREE_NAME-a.wic" "$WORK_DIR/$TREE_NAME-b.wic"; then
    die "the two builds differ ($sha_a vs $sha_b), so the image is not reproducible; nothing is published"
  fi
  log "both builds are byte-identical: disk sha256 $sha_a"
  cp --sparse=always -- "$WORK_DIR/$TREE_NAME-a.wic" "$IMAGE_DIR/disk.raw"
  fit_disk
}
'''

DSTACK_OS_FUNCTIONS = r'''
prepare_host_for_recipe() {
  # the reproducible build runs Docker as the calling user
  usermod -aG docker "$BUILD_USER"
  systemctl start docker
}

apply_cmdline_overrides() {
  local uki="$TREE/meta-dstack/recipes-core/images/dstack-uki.bb"
  if [ -z "$UKI_CMDLINE_APPEND" ]; then
    return 0
  fi
  if ! grep -q '^UKI_CMDLINE_BASE = ' "$uki"; then
    die "$uki sets no UKI_CMDLINE_BASE; has the pinned upstream changed?"
  fi
  log "kernel command-line overrides: $UKI_CMDLINE_APPEND"
  printf '%s\n' "# dstack-fleet: $CONFIG_PATH.cmdlineOverrides" "$UKI_CMDLINE_APPEND" >> "$uki"
}

compare_builds() {  # the published files must be identical in build-a and build-b
  local a="$TREE/repro-build/build-a/images/$DIST_NAME-$DSTACK_VERSION"
  local b="$TREE/repro-build/build-b/images/$DIST_NAME-$DSTACK_VERSION"
  local name differ=0
  for name in "${REQUIRED_FILES[@]}"; do
    if [ ! -f "$a/$name" ]; then
      die "the build produced no $a/$name"
    fi
  done
  for name in "${COMPARED_FILES[@]}"; do
    if [ -e "$a/$name" ] || [ -e "$b/$name" ]; then
      if ! cmp -s -- "$a/$name" "$b/$name"; then
        log "build-a and build-b differ in $name"
        differ=1
      fi
    fi
  done
  if [ "$differ" != 0 ]; then
    die "the two builds differ, so the image is not reproducible; nothing is published"
  fi
  cp --sparse=always -- "$a/disk.raw" "$IMAGE_DIR/disk.raw"
  # padded before anything reads it: OVMF measures the GPT header GCE boots, the padded one
  fit_disk
  cp -- "$a/digest.txt" "$a/sha256sum.txt" "$a/metadata.json" "$IMAGE_DIR/"
  if [ -f "$a/auth_hash.txt" ]; then
    cp -- "$a/auth_hash.txt" "$IMAGE_DIR/"
  else
    log "the build computed no UKI Authenticode hash (auth_hash.txt)"
  fi
  # the boot path's hashes, for the expected RTMR1 and RTMR2 (fleet/images/bootinputs.py)
  if python3 -c "$BOOT_INPUTS_PROGRAM" "$IMAGE_DIR/disk.raw" > "$IMAGE_DIR/boot.json.tmp"; then
    mv -- "$IMAGE_DIR/boot.json.tmp" "$IMAGE_DIR/boot.json"
  else
    rm -f -- "$IMAGE_DIR/boot.json.tmp"
    log "no boot inputs recorded: RTMR1 and RTMR2 will be named as missing inputs"
  fi
}

build_phase() {
  mkdir -p -- "$IMAGE_DIR"
  fetch_upstreams "$WORK_DIR/src"
  TREE="$WORK_DIR/src/${UPSTREAM_PATHS[0]}"
  git -C "$TREE" submodule update --init --recursive
  apply_cmdline_overrides
  log "running the release's reproducible build: build-a, build-b, compare"
  "$TREE/repro-build/repro-build.sh"
  compare_builds
}
'''

MAIN = r'''
main() {
  case "${1:-all}" in
    all) ;;
    build-phase) build_phase; return ;;
    *) die "unknown phase '$1'" ;;
  esac
  mkdir -p -- "$WORK_DIR" "$DIST"
  if already_built; then
    log "outputs.json already exists for input hash $INPUT_HASH; nothing to build"
    power_off
    return 0
  fi
  exec > >(tee -a "$BUILD_LOG") 2> >(tee -a "$BUILD_LOG" >&2)
  trap on_exit EXIT
  log "building $LABEL"
  clear_failure
  if [ "$MODE" = remote ]; then
    mark_started
    prepare_host
  fi
  run_build_phase
  publish
  log "done: ${PREFIX:-$DIST}/outputs.json"
}

main "$@"
'''


# ---- the outputs contract ---------------------------------------------------------------------------

class OutputsError(ValueError):
    """``outputs.json`` does not hold what the lock file needs."""


_OUTPUT_KEYS = {"inputHash", "recipe", "label", "artifact", "os_image_hash", "rootfs_hash", "uki_hash", "source",
                "built_at", "details", "kernel_cmdline", "boot"}
_ENTRY_KEYS = ("recipe", "label", "artifact", "os_image_hash", "rootfs_hash", "uki_hash", "kernel_cmdline", "source",
               "built_at", "boot")


def parse_outputs(text: str, *, expect_input_hash: str | None = None) -> tuple[str, dict[str, Any]]:
    """``outputs.json`` of a build -> (input hash, the ``images.lock.json`` entry). Raises
    ``OutputsError`` with one line per problem."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise OutputsError(f"outputs.json is not JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    if not isinstance(data, dict):
        raise OutputsError("outputs.json must be a JSON object")
    problems = [f"{k}: unknown field of outputs.json" for k in sorted(set(data) - _OUTPUT_KEYS)]
    digest = data.get("inputHash")
    recipe = data.get("recipe")
    if not isinstance(digest, str) or not recipes.SHA256_RE.match(digest):
        problems.append(f"inputHash: {digest!r} is not a sha256")
    elif expect_input_hash is not None and digest != expect_input_hash:
        problems.append(f"inputHash: {digest} is not the input hash of this build ({expect_input_hash})")
    if recipe not in recipes.RECIPE_OUTPUTS:
        problems.append(f"recipe: unknown recipe {recipe!r}")
    else:
        produced = recipes.RECIPE_OUTPUTS[recipe]
        for name in ("os_image_hash", "rootfs_hash", "uki_hash"):
            if name in data and name not in produced:
                problems.append(f"{name}: a {recipe} build produces no {name}")
        for name in ("os_image_hash", "rootfs_hash"):
            if name in produced and name not in data:
                problems.append(f"{name}: is required from a {recipe} build")
    artifact = data.get("artifact")
    if isinstance(artifact, dict) and "url" not in artifact and "file" in artifact:
        problems.append(f"artifact: the tarball {artifact['file']} was built locally and never uploaded; "
                        "rerun the local build with a bucket to record it in the lock file")
    elif isinstance(artifact, dict) and isinstance(digest, str):
        wanted = f"/{digest}/disk.tar.gz"
        if not str(artifact.get("url", "")).endswith(wanted):
            problems.append(f"artifact.url: {artifact.get('url')!r} is not the tarball of input hash {digest} "
                            f"(gs://<bucket>{wanted})")
    if not problems:
        entry = {k: data[k] for k in _ENTRY_KEYS if k in data}
        try:
            return digest, ImageEntry.model_validate(entry).model_dump(mode="json", exclude_none=True)
        except ValidationError as exc:
            problems += [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
    raise OutputsError("; ".join(problems))


# ---- the build host's plan -------------------------------------------------------------------------

STORAGE_SCOPE = "https://www.googleapis.com/auth/devstorage.read_write"
LOGGING_SCOPE = "https://www.googleapis.com/auth/logging.write"
BUILD_HOST_SCOPES = (STORAGE_SCOPE, LOGGING_SCOPE)
FORBIDDEN_SCOPES = ("https://www.googleapis.com/auth/cloud-platform",)
_SELF_LINK = re.compile(
    r"^(https://www\.googleapis\.com/compute/v1/)?projects/[a-z][a-z0-9-]{4,28}[a-z0-9]/global/images/"
    r"[a-z]([-a-z0-9]*[a-z0-9])?$")
_ZONE = re.compile(r"^[a-z]+-[a-z]+[0-9]+-[a-z]$")
_MACHINE_TYPE = re.compile(r"^[a-z][a-z0-9]*-[a-z0-9-]+$")


@dataclass(frozen=True)
class BuildHostSettings:
    """The images stack's build-host settings (config ``dstack-fleet:buildHost``). ``None`` takes
    the recipe's default (``recipes.BUILD_HOST_DEFAULTS``)."""

    bucket: str
    zone: str
    boot_image: str  # a self link: a family moves, and the build host is a build input
    machine_type: str | None = None
    disk_gb: int | None = None
    disk_type: str = "pd-ssd"
    timeout_seconds: int | None = None
    poll_seconds: int = 60


def settings_problems(settings: BuildHostSettings, *, path: str = "dstack-fleet:buildHost") -> list[tuple[str, str]]:
    """One ``(key path, message)`` per problem of the build-host settings."""
    out = []
    if not _BUCKET_RE.match(settings.bucket):
        out.append((f"{path}.bucket", f"{settings.bucket!r} is not a GCS bucket name"))
    if not _ZONE.match(settings.zone):
        out.append((f"{path}.zone", f"{settings.zone!r} is not a zone such as us-central1-a"))
    if "/family/" in settings.boot_image:
        out.append((f"{path}.bootImage", f"{settings.boot_image!r} is an image family, which moves; pin the image by "
                                         "self link (projects/P/global/images/NAME)"))
    elif not _SELF_LINK.match(settings.boot_image):
        out.append((f"{path}.bootImage", f"{settings.boot_image!r} is not an image self link "
                                         "(projects/P/global/images/NAME)"))
    if settings.machine_type is not None and not _MACHINE_TYPE.match(settings.machine_type):
        out.append((f"{path}.machineType", f"{settings.machine_type!r} is not a machine type"))
    if settings.disk_gb is not None and not 50 <= settings.disk_gb <= 65536:
        out.append((f"{path}.diskGb", f"{settings.disk_gb} GB: a Yocto build needs at least 50 GB (and at most 65536)"))
    if settings.timeout_seconds is not None and settings.timeout_seconds < settings.poll_seconds:
        out.append((f"{path}.timeoutMinutes", "must be longer than the poll interval"))
    if settings.poll_seconds < 1:
        out.append((f"{path}.pollSeconds", "must be at least 1"))
    return out


@dataclass(frozen=True)
class GuestUpload:
    """A guest binary kept in the repository, uploaded next to the artifacts for the build host."""

    path: str  # relative to the repository (the Pulumi project directory)
    bucket: str
    object_name: str

    @property
    def url(self) -> str:
        return f"gs://{self.bucket}/{self.object_name}"


@dataclass(frozen=True)
class BuildHostPlan:
    logical_name: str  # Pulumi name prefix of the component's resources: build-<hash12>
    input_hash: str
    recipe: str
    instance_name: str
    description: str
    zone: str
    machine_type: str
    disk_gb: int
    disk_type: str
    boot_image: str
    scopes: tuple[str, ...]
    metadata: dict[str, str]
    labels: dict[str, str]
    bucket: str
    project: str
    guest_upload: GuestUpload | None = None
    timeout_seconds: int = 0
    keys: tuple[str, ...] = field(default_factory=tuple)

    @property
    def artifact_prefix(self) -> str:
        return artifact_prefix(self.bucket, self.input_hash)

    def serial_hint(self) -> str:
        """How to follow a running build (its log reaches the bucket only when it ends)."""
        return (f"gcloud compute instances get-serial-port-output {self.instance_name} --zone {self.zone} "
                f"--project {self.project}")


def plan_build_host(spec: BuildSpec, settings: BuildHostSettings, namer: Namer, *, project: str,
                    root: Any = None) -> BuildHostPlan:
    """Everything the ``BuildHost`` component creates for ``spec``, decided before any resource
    exists. ``root`` (a ``pathlib.Path``), when given, checks that a guest binary given as a repository
    path exists."""
    problems = settings_problems(settings)
    if problems:
        raise BuildScriptError("; ".join(f"{p}: {m}" for p, m in problems))
    defaults = recipes.BUILD_HOST_DEFAULTS[spec.recipe]
    short = spec.input_hash[:12]
    instance_name = namer.name("build", short)
    upload = None
    guest_location = None
    if isinstance(spec.guest, GuestBinary) and spec.guest.is_path:
        if root is not None and not (root / spec.guest.url).is_file():
            raise BuildScriptError(f"{spec.config_path}.guest.binary.url: file {spec.guest.url!r} not found in the "
                                   "repository")
        # relative to the project directory, where pulumi runs: the plan stays the same on every machine
        upload = GuestUpload(path=spec.guest.url, bucket=settings.bucket,
                             object_name=f"{spec.input_hash}/{GUEST_UPLOAD_NAME}")
        guest_location = upload.url
    script = build_script(spec, mode="remote", bucket=settings.bucket, guest_location=guest_location)
    if len(script.encode("utf-8")) > METADATA_VALUE_LIMIT:
        raise BuildScriptError(f"the build script of {spec.input_hash} is over the 256 KiB metadata limit")
    timeout = settings.timeout_seconds or defaults.timeout_seconds
    return BuildHostPlan(
        logical_name=f"build-{short}",
        input_hash=spec.input_hash,
        recipe=spec.recipe,
        instance_name=instance_name,
        description=f"dstack-fleet build host: recipe {spec.recipe}, input hash {spec.input_hash} "
                    f"(images {', '.join(spec.keys)}); powers itself off when done and is deleted once collected",
        zone=settings.zone,
        machine_type=settings.machine_type or defaults.machine_type,
        disk_gb=settings.disk_gb or defaults.disk_gb,
        disk_type=settings.disk_type,
        boot_image=settings.boot_image,
        scopes=BUILD_HOST_SCOPES,
        metadata={
            "startup-script": script,
            # the build's progress goes to Cloud Logging through the serial port; nothing logs in
            "serial-port-logging-enable": "TRUE",
            "serial-port-enable": "FALSE",
            "block-project-ssh-keys": "TRUE",
        },
        labels=namer.labels(role="build-host", recipe=spec.recipe, input_hash=label_value(spec.input_hash[:32])),
        bucket=settings.bucket,
        project=project,
        guest_upload=upload,
        timeout_seconds=timeout,
        keys=spec.keys,
    )
