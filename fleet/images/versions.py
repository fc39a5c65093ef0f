"""GCP image versions of an env stack, resolved against the lock file.

Each version is its own ``gcp.compute.Image`` (logical name ``image-<hash12>``): a new version is a
new resource, the old one stays while any node uses it, and nothing is ever replaced in place
(replacing an image that instances boot from would first delete every one of them).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from typing import Literal

from fleet.config.schema import ImageSource, StackConfig
from fleet.images.lock import PENDING, Artifact, LockFile
from fleet.gcp.naming import Namer, label_value
from fleet.images import recipes

GUEST_OS_FEATURES = ("GVNIC", "TDX_CAPABLE", "UEFI_COMPATIBLE", "VIRTIO_SCSI_MULTIQUEUE")


@dataclass(frozen=True)
class ImageVersion:
    key: str
    origin: Literal["build", "tarball", "existing"]
    recipe: str | None
    content_hash: str | None  # build input hash, or the tarball's sha256
    status: Literal["built", "pending", "prebuilt"]
    logical_name: str | None  # Pulumi name of the Image we create (None for existing images)
    gcp_name: str | None
    description: str
    artifact: Artifact | None = None
    tarball_url: str | None = None  # prebuilt tarball (gs://)
    tarball_sha256: str | None = None
    existing_self_link: str | None = None
    hashes: dict[str, str | None] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    boot: dict[str, object] | None = None  # the lock's boot inputs (RTMR1/RTMR2 on GCP), when recorded

    @property
    def pending(self) -> bool:
        return self.status == "pending"

    @property
    def creates_image(self) -> bool:
        return self.status != "pending" and self.origin != "existing"

    @property
    def raw_disk_source(self) -> str | None:
        if self.artifact is not None:
            return self.artifact.https_url()
        if self.tarball_url is not None:
            return "https://storage.googleapis.com/" + self.tarball_url[len("gs://"):]
        return None

    def summary(self) -> dict[str, object]:
        """What the plan shows for the version (hashes or ``pending build``)."""
        return {
            "origin": self.origin,
            "recipe": self.recipe,
            "status": self.status,
            "contentHash": self.content_hash,
            "name": self.gcp_name or self.existing_self_link,
            **{k: (PENDING if self.pending else v) for k, v in self.hashes.items()},
        }


def build_inputs(source: ImageSource) -> dict[str, object]:
    assert source.build is not None
    return source.build.model_dump(mode="json", by_alias=True)


def resolve(config: StackConfig, lock: LockFile, namer: Namer,
            derived: dict[str, dict[str, str]] | None = None) -> dict[str, ImageVersion]:
    """Every declared image version, keyed by its config key."""
    out = {}
    for key, source in sorted(config.fleet.images.items()):
        out[key] = _resolve_one(key, source, lock, namer, (derived or {}).get(key, {}))
    return out


_CAMEL = {"artifact_sha256": "artifactSha256", "os_image_hash": "osImageHash", "rootfs_hash": "rootfsHash",
          "uki_hash": "ukiHash"}


def _hash_fields(values: dict[str, str | None], fields: tuple[str, ...]) -> dict[str, str | None]:
    return {_CAMEL[f]: values.get(f) for f in fields}


def _resolve_one(key: str, source: ImageSource, lock: LockFile, namer: Namer, derived: dict[str, str]) -> ImageVersion:
    if source.build is not None:
        recipe = source.build.recipe
        digest = recipes.input_hash(recipe, build_inputs(source), derived)
        entry = lock.image(digest)
        base = dict(
            key=key, origin="build", recipe=recipe, content_hash=digest,
            logical_name=f"image-{digest[:12]}", gcp_name=namer.name("img", digest[:12]),
            description=f"dstack-fleet image {key}: recipe {recipe}, input hash {digest}",
            labels=namer.labels(image_key=key, recipe=recipe, input_hash=label_value(digest[:32])),
        )
        fields = ("artifact_sha256",) + recipes.RECIPE_OUTPUTS[recipe]
        if entry is None:
            return ImageVersion(status="pending", hashes=_hash_fields({}, fields), **base)
        return ImageVersion(
            status="built", artifact=entry.artifact,
            hashes=_hash_fields({"artifact_sha256": entry.artifact.sha256, "os_image_hash": entry.os_image_hash,
                                 "rootfs_hash": entry.rootfs_hash, "uki_hash": entry.uki_hash}, fields),
            boot=entry.boot.model_dump(mode="json", exclude_none=True) if entry.boot is not None else None,
            **base,
        )
    assert source.prebuilt is not None
    expected = source.prebuilt.tarball.expected if source.prebuilt.tarball else source.prebuilt.image.expected
    hashes = _hash_fields(expected.model_dump() if expected else {}, ("os_image_hash", "rootfs_hash", "uki_hash"))
    if source.prebuilt.tarball is not None:
        tarball = source.prebuilt.tarball
        hashes = {"artifactSha256": tarball.sha256, **hashes}
        return ImageVersion(
            key=key, origin="tarball", recipe=None, content_hash=tarball.sha256, status="prebuilt",
            logical_name=f"image-{tarball.sha256[:12]}", gcp_name=namer.name("img", tarball.sha256[:12]),
            description=f"dstack-fleet image {key}: prebuilt tarball {tarball.url} sha256 {tarball.sha256}",
            tarball_url=tarball.url, tarball_sha256=tarball.sha256, hashes=hashes,
            labels=namer.labels(image_key=key, recipe="prebuilt", input_hash=label_value(tarball.sha256[:32])),
        )
    image = source.prebuilt.image
    link = image.self_link
    if not link.startswith("https://"):
        link = "https://www.googleapis.com/compute/v1/" + link
    return ImageVersion(
        key=key, origin="existing", recipe=None, content_hash=None, status="prebuilt", logical_name=None,
        gcp_name=None, description=f"existing image {link}", existing_self_link=link, hashes=hashes,
    )


def integrity_script(version: ImageVersion) -> str:
    """A bash step that runs before the image is created and stops the deploy when the GCS object
    is not the one the lock file (or the prebuilt config) names: a replaced object has a new
    generation and crc32c, so it can never silently become an image."""
    lines = ["set -euo pipefail"]
    if version.artifact is not None:
        a = version.artifact
        lines += [
            f"object={shlex.quote(a.url)}",
            f"want_generation={shlex.quote(a.generation)}",
            f"want_crc32c={shlex.quote(a.crc32c)}",
            'read -r generation crc32c < <(gcloud storage objects describe "$object" '
            "--format='value(generation,crc32c_hash)')",
            'if [ "$generation" != "$want_generation" ]; then',
            '  echo "integrity check failed: $object has generation $generation, the lock file says '
            '$want_generation (the object was replaced; rebuild and run make lock)" >&2',
            "  exit 1",
            "fi",
            'if [ "$crc32c" != "$want_crc32c" ]; then',
            '  echo "integrity check failed: $object has crc32c $crc32c, the lock file says $want_crc32c" >&2',
            "  exit 1",
            "fi",
            'echo "ok: $object generation $generation crc32c $crc32c"',
        ]
    elif version.tarball_url is not None:
        lines += [
            f"object={shlex.quote(version.tarball_url)}",
            f"want_sha256={shlex.quote(version.tarball_sha256 or '')}",
            'sha256=$(gcloud storage cat "$object" | sha256sum | cut -d" " -f1)',
            'if [ "$sha256" != "$want_sha256" ]; then',
            '  echo "integrity check failed: $object has sha256 $sha256, the config says $want_sha256" >&2',
            "  exit 1",
            "fi",
            'echo "ok: $object sha256 $sha256"',
        ]
    else:
        raise ValueError(f"image {version.key} has no object to check")
    return "\n".join(lines) + "\n"
