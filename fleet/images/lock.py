"""``images.lock.json``: what builds produced, keyed by their input hash.

The lock file is the seam between the images stack (builds write it) and env stacks (they read it):
every hash a measurement depends on is known at plan time, and prod runs exactly the bytes that
were built and tested. An image or container a stack needs but the lock does not hold is *pending*:
the plan shows ``pending build`` where its hashes would be, and ``up`` refuses it in staging and
prod. Values are never invented: an entry is written by ``make lock`` from a build's outputs, or by
hand from a published release, with ``source`` saying which.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from fleet.config.files import write_atomic
from fleet.config.problems import ConfigError, Problem
from fleet.config.validation import problems_from

LOCK_FILE = "images.lock.json"
LOCK_VERSION = 1
PENDING = "pending build"


def _hex(length: int, what: str):
    def check(value: str) -> str:
        if len(value) != length or any(c not in "0123456789abcdef" for c in value):
            raise ValueError(f"{value!r} is not {what} ({length} lowercase hex digits)")
        return value

    return AfterValidator(check)


def _gcs_url(value: str) -> str:
    if not value.startswith("gs://") or "/" not in value[5:]:
        raise ValueError(f"{value!r} is not a gs://bucket/object URL")
    return value


def _digest(value: str) -> str:
    body = value[len("sha256:"):]
    if not value.startswith("sha256:") or len(body) != 64 or any(c not in "0123456789abcdef" for c in body):
        raise ValueError(f"{value!r} is not a sha256:<64 lowercase hex> digest")
    return value


Sha256 = Annotated[str, _hex(64, "a sha256")]
Sha384 = Annotated[str, _hex(96, "a sha384")]
Digest = Annotated[str, AfterValidator(_digest)]
GcsUrl = Annotated[str, AfterValidator(_gcs_url)]


class LockModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Artifact(LockModel):
    url: GcsUrl = Field(description="gs:// URL of the disk.raw tarball.")
    generation: str = Field(pattern=r"^[0-9]+$", description="GCS object generation; a replaced object has a new one.")
    crc32c: str = Field(pattern=r"^[A-Za-z0-9+/]{6}==$", description="GCS crc32c of the object (base64).")
    sha256: Sha256 = Field(description="SHA-256 of the tarball bytes.")

    def https_url(self) -> str:
        """The form ``gcp.compute.Image.raw_disk.source`` documents."""
        return "https://storage.googleapis.com/" + self.url[len("gs://"):]


class BootInputs(LockModel):
    """What the image contributes to RTMR1 and RTMR2 on GCP (``fleet.images.bootinputs`` on the
    build host; ``fleet.attest.bootchain`` turns them into expected registers)."""

    gpt_event_sha384: Sha384 = Field(description="SHA-384 of the boot disk's UEFI_GPT_DATA.")
    uki_authenticode_sha384: Sha384 = Field(description="Authenticode SHA-384 of EFI/BOOT/BOOTX64.EFI.")
    uki_authenticode_sha256: Sha256 = Field(description="Authenticode SHA-256 of the UKI (the vTPM's PCR2 event).")
    kernel_authenticode_sha384: Sha384 = Field(description="Authenticode SHA-384 of the UKI's .linux section.")
    cmdline_sha384: Sha384 = Field(description="SHA-384 of the .cmdline as UTF-16LE with a NUL.")
    initrd_sha384: Sha384 = Field(description="SHA-384 of the .initrd section.")
    stub_version: int | None = Field(None, description="systemd-stub version from .sdmagic, if any.")
    pe_sections_sha384: Sha384 | None = Field(
        None, description="RTMR2 after systemd-stub (>= 256) measured the UKI's sections; None when it does not.")


class ImageEntry(LockModel):
    recipe: str = Field(description="Recipe that built it.")
    label: str = Field(description="Human label (recipe version, upstream tag).")
    artifact: Artifact
    os_image_hash: Sha256 | None = Field(None, description="dstack os-image-hash (sha256 of sha256sum.txt).")
    rootfs_hash: str | None = Field(None, description="dm-verity root hash of the rootfs (dstack.rootfs_hash).")
    uki_hash: str | None = Field(None, description="Authenticode hash of the UKI, where the recipe makes one.")
    kernel_cmdline: str | None = Field(None, description="The UKI's final kernel command line (overrides and the "
                                       "rootfs hash and size included), where the recipe makes one.")
    source: str = Field(description="Where these values come from: a build of the images stack, or a release URL.")
    built_at: str | None = Field(None, description="When the build finished (ISO 8601).")
    boot: BootInputs | None = Field(None, description="Hashes of the boot path, for the expected RTMR1 and RTMR2.")


class ContainerEntry(LockModel):
    image: str = Field(description="Repository the image was pushed to, without tag or digest.")
    digest: Digest = Field(description="sha256: digest.")
    digest_kind: Literal["manifest", "image-id"] = Field(
        description="manifest: registry manifest digest (pull by digest); image-id: config digest (docker inspect .Id).")
    source: str = Field(description="Where the digest comes from.")


class FailedBuild(LockModel):
    """A build that ended without outputs: its host was deleted and its log kept in the bucket. The
    images stack does not start it again until the entry is removed (a reviewed change), so a build
    that fails every time does not bill a large VM on every run."""

    recipe: str = Field(description="Recipe of the build.")
    reason: str = Field(description="What the build reported (failure.txt), or that it ran past its timeout.")
    log: str = Field(description="gs:// URL of the build log, kept in the image bucket.")
    at: str = Field(description="When the failure was collected (ISO 8601, UTC).")


class LockFile(LockModel):
    version: Literal[1] = Field(description="Schema version of this file.")
    images: dict[Sha256, ImageEntry] = Field(default_factory=dict, description="Disk images by build input hash.")
    containers: dict[Sha256, ContainerEntry] = Field(
        default_factory=dict, description="Container images by build input hash.")
    failed: dict[Sha256, FailedBuild] = Field(
        default_factory=dict, description="Image builds that failed, by input hash; remove an entry to retry it.")

    def image(self, input_hash: str) -> ImageEntry | None:
        return self.images.get(input_hash)

    def container(self, input_hash: str) -> ContainerEntry | None:
        return self.containers.get(input_hash)

    def to_json(self) -> str:
        data = self.model_dump(mode="json", exclude_none=True)
        if not data["failed"]:
            del data["failed"]  # absent until a build fails: lock files written before it stay as they were
        return json.dumps(data, indent=2, sort_keys=True) + "\n"


def load(root: Path) -> LockFile:
    """Read and validate the lock file; a missing file is an empty lock (everything pending)."""
    path = root / LOCK_FILE
    if not path.exists():
        return LockFile(version=LOCK_VERSION)
    return parse(path.read_text(encoding="utf-8"), source=LOCK_FILE)


def parse(text: str, *, source: str = LOCK_FILE) -> LockFile:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError([Problem(source, "", f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}")]) from None
    if not isinstance(data, dict):
        raise ConfigError([Problem(source, "", "must be a JSON object with 'version', 'images' and 'containers'")])
    if data.get("version") != LOCK_VERSION:
        raise ConfigError([Problem(source, "version", f"must be {LOCK_VERSION} (got {data.get('version')!r}); "
                                   "regenerate the file with `make lock`")])
    try:
        return LockFile.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(problems_from(exc, root=LockFile, source=source, prefix="")) from None


class LockConflict(Exception):
    """A build produced different bytes for inputs the lock already records."""


def merge(current: LockFile, outputs: dict, *, replace: bool = False) -> tuple[LockFile, list[str]]:
    """Merge the images stack's ``lockEntries`` output (or ``python -m fleet collect``'s file) into
    the lock. Returns the new lock and a line per added or changed entry. Existing entries are
    kept: a lock only grows, so every version an env stack still declares stays resolvable. A
    failure is recorded only for a hash that has no image; an image recorded later clears it."""
    entries = outputs.get("lockEntries", outputs)
    if not isinstance(entries, dict) or not set(entries) <= {"images", "containers", "failed"}:
        raise ConfigError([Problem("images stack outputs", "lockEntries",
                                   "must be an object with 'images', 'containers' and/or 'failed'")])
    data = current.model_dump(mode="json", exclude_none=True)
    data.setdefault("failed", {})
    changes: list[str] = []
    for section in ("images", "containers"):
        for key, entry in sorted((entries.get(section) or {}).items()):
            old = data[section].get(key)
            if old == entry:
                continue
            if old is not None and not replace:
                raise LockConflict(
                    f"{section}.{key} is already locked with different values; the same inputs produced different "
                    "outputs (a non-reproducible build or a replaced object). Investigate, then rerun with --replace")
            data[section][key] = entry
            changes.append(f"{'changed' if old else 'added'} {section}.{key}")
            if section == "images" and data["failed"].pop(key, None) is not None:
                changes.append(f"cleared failed.{key}")
    for key, entry in sorted((entries.get("failed") or {}).items()):
        if key in data["images"] or data["failed"].get(key) == entry:
            continue
        changes.append(f"{'changed' if key in data['failed'] else 'added'} failed.{key}")
        data["failed"][key] = entry
    merged = parse(json.dumps(data), source="merged lock")
    return merged, changes


def write(root: Path, lock_file: LockFile) -> None:
    """Replace the lock file in one rename (``fleet.config.files``): a failed or interrupted
    ``make lock`` leaves the previous lock, never a truncated one that env stacks would read as
    every image pending. The file is committed, so it keeps the usual mode 0644."""
    write_atomic(root / LOCK_FILE, lock_file.to_json(), mode=0o644)
