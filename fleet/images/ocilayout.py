"""A root-filesystem tar (mkosi's ``Format=tar`` output) as a deterministic OCI image layout.

``podman import`` stamps the time of the import into the image, so the same tree gives a new image
every time. This module writes the image itself, and every byte of it is a function of its inputs:

* **the layer** is the tar re-packed, always: members sorted by name, every mtime set to
  ``SOURCE_DATE_EPOCH``, user and group *names* cleared (numeric ids and modes are kept: they are
  part of the tree, and mkosi already maps an unprivileged build to root), only ``SCHILY.xattr.*``
  extended attributes kept (minus ``security.selinux``, which runtimes relabel), hard links pointing
  at the first of their names in that order, the root entry and ``./`` prefixes dropped, written as
  POSIX pax by Python's ``tarfile``, then gzip-compressed with ``gzip -n`` semantics (no name, mtime
  0, level 6). The input is never used as is, even when it happens to be normalized already:
  mkosi's ``make_tar`` (v25.3 ``mkosi/archive.py``) runs GNU tar without ``--sort=name``, so member
  order follows the build tree's ``readdir`` order, and its pax headers depend on the host's tar;
  checking for normalization costs the same pass as re-packing, and one code path is one thing to
  trust;
* **the image config** (``architecture: amd64``, ``os: linux``, ``rootfs.diff_ids`` = sha256 of the
  uncompressed layer, ``config`` from the arguments, ``created`` from ``SOURCE_DATE_EPOCH``, a fixed
  ``history``), **the manifest** (OCI media types), ``index.json`` and ``oci-layout``, every JSON
  document as ``json.dumps(sort_keys=True, separators=(",", ":"))``.

``build_layout`` returns the manifest digest (what the registry reports after a push that keeps
digests, and what pulls by digest use) and the config digest (the image ID, ``docker image inspect
.Id``). Same inputs, same bytes, same digests. Two caveats on "same": the layer's gzip bytes are
zlib's deflate output, and the uncompressed layer is CPython ``tarfile``'s pax encoding, so the
manifest digest is stable for one Python and zlib build (the project's virtualenv on one machine);
the image ID depends only on the uncompressed layer and the config.

Standard library only: ``python -m fleet.ocilayout --rootfs-tar … --out …`` runs in a generated
build step and prints ``{"image_id": …, "manifest_digest": …}``.
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import hashlib
import json
import os
import re
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from fleet.config import ports

# Bump when the normalization or the documents change: it is part of a build's input hash.
LAYOUT_VERSION = 1

MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
REF_NAME = "org.opencontainers.image.ref.name"
LAYOUT_FILE_VERSION = "1.0.0"
ARCHITECTURE, OS = "amd64", "linux"
GZIP_LEVEL = 6
HISTORY_CREATED_BY = "dstack-fleet: root filesystem tar re-packed as one layer (fleet/ocilayout.py)"
KEPT_XATTR_PREFIX = "SCHILY.xattr."
DROPPED_XATTRS = frozenset({"SCHILY.xattr.security.selinux"})
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_CHUNK = 1 << 20

ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


class LayoutError(ValueError):
    """The input cannot become an image (a one-line reason)."""


@dataclass(frozen=True)
class ImageSettings:
    """The image config's ``config`` object. Empty fields are left out of the document."""

    cmd: tuple[str, ...] = ()
    entrypoint: tuple[str, ...] = ()
    working_dir: str | None = None
    env: tuple[str, ...] = ()  # "NAME=value", in the order given
    exposed_ports: tuple[str, ...] = ()  # "3000/tcp"; "3000" means tcp

    def document(self) -> dict[str, Any]:
        for item in self.env:
            name, sep, _ = item.partition("=")
            if not sep or not ENV_NAME.fullmatch(name):
                raise LayoutError(f"environment entry {item!r} is not NAME=value")
        if self.working_dir is not None and not self.working_dir.startswith("/"):
            raise LayoutError(f"working directory {self.working_dir!r} is not an absolute path")
        config: dict[str, Any] = {}
        if self.cmd:
            config["Cmd"] = list(self.cmd)
        if self.entrypoint:
            config["Entrypoint"] = list(self.entrypoint)
        if self.working_dir:
            config["WorkingDir"] = self.working_dir
        if self.env:
            config["Env"] = list(self.env)
        if self.exposed_ports:
            config["ExposedPorts"] = {port_key(p): {} for p in self.exposed_ports}
        return config


@dataclass(frozen=True)
class Layout:
    manifest_digest: str  # sha256:… of the manifest: what the registry reports and pulls use
    image_id: str  # sha256:… of the image config
    diff_id: str  # sha256:… of the uncompressed layer
    layer_digest: str  # sha256:… of the gzip-compressed layer blob
    layer_size: int
    config_size: int
    manifest_size: int

    def summary(self) -> dict[str, str]:
        return {"manifest_digest": self.manifest_digest, "image_id": self.image_id}


def canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def port_key(value: str) -> str:
    try:
        return ports.port_key(value)
    except ValueError as exc:
        raise LayoutError(str(exc)) from None


def created(source_date_epoch: int) -> str:
    if source_date_epoch < 0:
        raise LayoutError(f"SOURCE_DATE_EPOCH {source_date_epoch} is negative")
    when = datetime.datetime.fromtimestamp(source_date_epoch, tz=datetime.timezone.utc)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


# ---- the layer ----------------------------------------------------------------------------------------------

class _Counting:
    """A write-only stream that hashes and counts what passes through to ``sink`` (if any)."""

    def __init__(self, sink: BinaryIO | None = None):
        self.sink, self.sha256, self.size = sink, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.size += len(data)
        if self.sink is not None:
            self.sink.write(data)
        return len(data)

    def flush(self) -> None:
        if self.sink is not None:
            self.sink.flush()

    @property
    def digest(self) -> str:
        return "sha256:" + self.sha256.hexdigest()


def member_name(name: str) -> str:
    """``./usr//bin/`` -> ``usr/bin``; the root itself -> ``""``. A ``..`` component is refused."""
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise LayoutError(f"tar member {name!r} points outside the root filesystem")
    return "/".join(parts)


_REGULAR = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE, tarfile.GNUTYPE_SPARSE)
_KEPT_TYPES = (tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE)


def _open(rootfs_tar: Path) -> tarfile.TarFile:
    try:
        with open(rootfs_tar, "rb") as f:
            head = f.read(4)
    except OSError as exc:
        raise LayoutError(f"{rootfs_tar}: {exc.strerror or exc}") from None
    if head == ZSTD_MAGIC:
        raise LayoutError(f"{rootfs_tar} is zstd-compressed; build it uncompressed (mkosi --compress-output=no)")
    try:
        return tarfile.open(rootfs_tar, "r:*")
    except (tarfile.TarError, OSError) as exc:
        raise LayoutError(f"{rootfs_tar} is not a tar archive ({exc})") from None


def _plan_members(members: list[tarfile.TarInfo]) -> list[tuple[str, tarfile.TarInfo, str | None]]:
    """(name, source member, hard-link target or None) for every output entry, sorted by name.

    A later member of the same name replaces an earlier one, as extraction would. The members of a
    hard-link group are written as one regular entry under the group's first name, and links to it."""
    final: dict[str, tarfile.TarInfo] = {}
    for member in members:
        name = member_name(member.name)
        if name:
            final[name] = member
    groups: dict[str, list[str]] = {}
    for name, member in final.items():
        if not member.islnk():
            continue
        target, seen = member_name(member.linkname), {name}
        while target in final and final[target].islnk() and target not in seen:
            seen.add(target)
            target = member_name(final[target].linkname)
        if target not in final or final[target].islnk():
            raise LayoutError(f"hard link {name!r} points to {member.linkname!r}, which the archive does not hold")
        groups.setdefault(target, []).append(name)
    planned: list[tuple[str, tarfile.TarInfo, str | None]] = []
    grouped: set[str] = set()
    for target, links in groups.items():
        names = sorted([target, *links])
        grouped.update(names)
        planned.append((names[0], final[target], None))
        planned += [(other, final[target], names[0]) for other in names[1:]]
    planned += [(name, member, None) for name, member in final.items() if name not in grouped]
    return sorted(planned, key=lambda entry: entry[0])


def _xattrs(member: tarfile.TarInfo) -> dict[str, str]:
    return {key: member.pax_headers[key] for key in sorted(member.pax_headers)
            if key.startswith(KEPT_XATTR_PREFIX) and key not in DROPPED_XATTRS}


def _entry(name: str, source: tarfile.TarInfo, link_to: str | None, mtime: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mode = source.mode & 0o7777
    info.uid, info.gid, info.uname, info.gname = source.uid, source.gid, "", ""
    info.mtime = mtime
    if link_to is not None:
        info.type, info.linkname = tarfile.LNKTYPE, link_to
        return info
    if source.type in _REGULAR:
        info.type, info.size = tarfile.REGTYPE, source.size
    elif source.type in _KEPT_TYPES:
        info.type = source.type
        if source.issym():
            info.linkname = source.linkname
        if source.ischr() or source.isblk():
            info.devmajor, info.devminor = source.devmajor, source.devminor
    else:
        raise LayoutError(f"tar member {source.name!r} has type {source.type!r}, which a layer cannot hold")
    info.pax_headers = _xattrs(source)
    return info


def write_layer(rootfs_tar: Path, out: BinaryIO, *, source_date_epoch: int) -> None:
    """Write the normalized, uncompressed layer of ``rootfs_tar`` to ``out``."""
    created(source_date_epoch)
    with _open(rootfs_tar) as src:
        try:
            planned = _plan_members(src.getmembers())
        except tarfile.TarError as exc:
            raise LayoutError(f"{rootfs_tar}: unreadable tar ({exc})") from None
        with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT, encoding="utf-8") as dst:
            for name, source, link_to in planned:
                info = _entry(name, source, link_to, source_date_epoch)
                if info.isreg():
                    data = src.extractfile(source)
                    assert data is not None
                    dst.addfile(info, data)
                else:
                    dst.addfile(info)


# ---- the layout ---------------------------------------------------------------------------------------------

def image_config(diff_id: str, settings: ImageSettings, source_date_epoch: int) -> bytes:
    when = created(source_date_epoch)
    return canonical({
        "architecture": ARCHITECTURE, "os": OS, "created": when, "config": settings.document(),
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created": when, "created_by": HISTORY_CREATED_BY}],
    })


def descriptor(media_type: str, data_digest: str, size: int, **extra: Any) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": data_digest, "size": size, **extra}


def image_manifest(config: bytes, layer_digest: str, layer_size: int) -> bytes:
    return canonical({
        "schemaVersion": 2, "mediaType": MEDIA_MANIFEST,
        "config": descriptor(MEDIA_CONFIG, sha256_digest(config), len(config)),
        "layers": [descriptor(MEDIA_LAYER, layer_digest, layer_size)],
    })


def image_index(manifest: bytes, tag: str) -> bytes:
    return canonical({
        "schemaVersion": 2, "mediaType": MEDIA_INDEX,
        "manifests": [descriptor(MEDIA_MANIFEST, sha256_digest(manifest), len(manifest),
                                 platform={"architecture": ARCHITECTURE, "os": OS}, annotations={REF_NAME: tag})],
    })


def _write_blob(blobs: Path, data: bytes) -> str:
    data_digest = sha256_digest(data)
    (blobs / data_digest.split(":", 1)[1]).write_bytes(data)
    return data_digest


def build_layout(rootfs_tar: Path, out: Path, *, settings: ImageSettings, source_date_epoch: int,
                 tag: str = "latest") -> Layout:
    """Write the OCI image layout of ``rootfs_tar`` into ``out`` (absent or empty)."""
    rootfs_tar, out = Path(rootfs_tar), Path(out)
    if not _TAG.fullmatch(tag):
        raise LayoutError(f"tag {tag!r} is not a valid image tag")
    settings.document()  # refuse bad settings before the long part
    created(source_date_epoch)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LayoutError(f"{out} exists and is not an empty directory")
    blobs = out / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    partial = blobs / ".layer.partial"
    try:
        with open(partial, "wb") as f:
            compressed = _Counting(f)
            with gzip.GzipFile(filename="", mode="wb", compresslevel=GZIP_LEVEL, fileobj=compressed,
                               mtime=0) as gz:
                uncompressed = _Counting(gz)
                write_layer(rootfs_tar, uncompressed, source_date_epoch=source_date_epoch)
        os.replace(partial, blobs / compressed.digest.split(":", 1)[1])
    finally:
        partial.unlink(missing_ok=True)
    config = image_config(uncompressed.digest, settings, source_date_epoch)
    manifest = image_manifest(config, compressed.digest, compressed.size)
    _write_blob(blobs, config)
    manifest_digest = _write_blob(blobs, manifest)
    (out / "index.json").write_bytes(image_index(manifest, tag))
    (out / "oci-layout").write_bytes(canonical({"imageLayoutVersion": LAYOUT_FILE_VERSION}))
    return Layout(manifest_digest=manifest_digest, image_id=sha256_digest(config), diff_id=uncompressed.digest,
                  layer_digest=compressed.digest, layer_size=compressed.size, config_size=len(config),
                  manifest_size=len(manifest))


# ---- command line -------------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fleet.ocilayout",
        description="Turn a root-filesystem tar into a deterministic OCI image layout; prints the manifest "
                    "digest and the image ID as JSON.")
    parser.add_argument("--rootfs-tar", required=True, type=Path, help="the root filesystem (uncompressed tar)")
    parser.add_argument("--out", required=True, type=Path, help="layout directory to create (absent or empty)")
    parser.add_argument("--tag", default="latest", help="ref name in index.json (skopeo's oci:DIR:TAG)")
    parser.add_argument("--cmd", action="append", default=[], metavar="ARG",
                        help="one Cmd element; repeat in order (use --cmd=ARG for an ARG starting with '-')")
    parser.add_argument("--entrypoint", action="append", default=[], metavar="ARG", help="one Entrypoint element")
    parser.add_argument("--workdir", help="WorkingDir (absolute)")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="one Env entry")
    parser.add_argument("--expose", action="append", default=[], metavar="PORT[/PROTO]", help="one exposed port")
    parser.add_argument("--source-date-epoch", type=int, default=os.environ.get("SOURCE_DATE_EPOCH"),
                        help="seconds since 1970 for every time in the image (default: $SOURCE_DATE_EPOCH)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.source_date_epoch is None:
        parser.error("--source-date-epoch is required (or set SOURCE_DATE_EPOCH)")
    settings = ImageSettings(cmd=tuple(args.cmd), entrypoint=tuple(args.entrypoint), working_dir=args.workdir,
                             env=tuple(args.env), exposed_ports=tuple(args.expose))
    try:
        layout = build_layout(args.rootfs_tar, args.out, settings=settings,
                              source_date_epoch=int(args.source_date_epoch), tag=args.tag)
    except LayoutError as exc:
        print(f"fleet.ocilayout: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(layout.summary(), sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
