"""Measurements a dstack guest will report, computed from exact bytes before anything is deployed.

RTMR3 events follow dstack v0.5.x and the dstack OS 0.6.0.a2 (``cc-eventlog/src/runtime_events.rs``,
v1 digests in both). A *measurement profile*, keyed by (recipe, dstack version, key provider), says
which events a guest emits and in which order; payloads we cannot know before the guest boots are
marked as such. A profile's version is a series (``0.5``: every 0.5.x) or one exact pre-release
(``0.6.0.a2``), whose events need not match the final release.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any


RUNTIME_EVENT_TYPE = 0x08000001  # 134217729: dstack's runtime events; not a TCG event type
RTMR_SIZE = 48
KNOWN_AT_BOOT = "known at boot"
PENDING_BUILD = "pending build"
MARKERS = (KNOWN_AT_BOOT, PENDING_BUILD)

# A payload is its exact bytes, or one of MARKERS when the bytes cannot be known before boot.
Payload = bytes | str

_HEX64 = re.compile(r"[0-9a-f]{64}")
_SHA256SUM_LINE = re.compile(r"[0-9a-fA-F]{64} [ *]\S.*")


class UnknownProfile(ValueError):
    """No measurement profile for a (recipe, dstack version, key provider)."""


# ---------------------------------------------------------------------------------------------
# Digests and replay


def event_digest(event: str, payload: bytes) -> bytes:
    """dstack's v1 runtime-event digest: SHA384(le32(type) || ":" || name || ":" || payload).

    dstack v0.5.x hashes ``to_ne_bytes()`` of the type; TDX guests are little-endian, and later
    releases spell it ``to_le_bytes()``. The SDKs have no helper for this digest.
    """
    preimage = RUNTIME_EVENT_TYPE.to_bytes(4, "little") + b":" + event.encode("utf-8") + b":" + payload
    return hashlib.sha384(preimage).digest()


def event_digest_sha256(event: str, payload: bytes) -> bytes:
    """The same preimage as ``event_digest`` under SHA-256: what a GCP guest extends into vTPM
    PCR 14 (``RuntimeEvent::sha256_digest``, dstack-attest ``emit_runtime_event``)."""
    preimage = RUNTIME_EVENT_TYPE.to_bytes(4, "little") + b":" + event.encode("utf-8") + b":" + payload
    return hashlib.sha256(preimage).digest()


def replay(digests: Iterable[bytes]) -> bytes:
    """A register's value after extending 48 zero bytes with ``digests`` in order.

    dstack-sdk's ``replay_rtmr`` matches the vectors, including the zero padding of digests
    shorter than 48 bytes that dstack's Rust SDK applies. Imported here, not at the top: the SDK
    brings an HTTP client along, which a plan without dstack apps does not need.
    """
    from dstack_sdk.dstack_client import replay_rtmr

    return bytes.fromhex(replay_rtmr([d.hex() for d in digests]))


# ---------------------------------------------------------------------------------------------
# Identity and payloads


def compose_hash(app_compose: bytes) -> str:
    """SHA-256 over the exact app-compose.json bytes the guest reads (no normalization)."""
    return hashlib.sha256(app_compose).hexdigest()


def app_id_from_compose_hash(compose_hash_hex: str) -> str:
    """Without a KMS, dstack's app-id is the first 20 bytes of the compose hash (40 hex chars)."""
    return compose_hash_hex[:40]


def replay_sha256(digests: Iterable[bytes]) -> bytes:
    """A SHA-256 register (GCP vTPM PCR 14) after extending 32 zero bytes with ``digests`` in
    order, as dstack's verifier replays it (``cc_eventlog::replay_events::<Sha256>``)."""
    register = bytes(32)
    for digest in digests:
        if len(digest) != 32:
            raise ValueError(f"a SHA-256 digest is 32 bytes, got {len(digest)}")
        register = hashlib.sha256(register + digest).digest()
    return register


def instance_id(instance_id_seed: bytes, app_id_hex: str, platform_binding: bytes = b"") -> str:
    """sha256(instance_id_seed || app_id || platform_binding)[:20], hex. dstack v0.5.x has no
    binding; the dstack OS 0.6.0.a2 on GCP appends ``gcp_instance_binding`` of the VM's vTPM
    attestation key. (With ``no_instance_id`` the guest uses an empty id instead.)"""
    return hashlib.sha256(instance_id_seed + bytes.fromhex(app_id_hex) + platform_binding).digest()[:20].hex()


def gcp_instance_binding(ak_pub_area: bytes) -> bytes:
    """dstack OS 0.6.0.a2 ``platform_instance_binding`` on GCP: sha256 of the marshaled TPMT_PUBLIC
    of the vTPM's pre-provisioned attestation key (ECC, else RSA), recreated from the per-VM
    endorsement seed: stable across reboots of one VM, new for every VM, readable only inside it."""
    if not ak_pub_area:
        raise ValueError("the vTPM attestation key public area is empty; the guest refuses to boot then")
    return hashlib.sha256(ak_pub_area).digest()


def key_provider_payload(name: str, provider_id: str) -> bytes:
    """``serde_json::to_vec(&KeyProviderInfo { name, id })``: compact, name before id, UTF-8."""
    return json.dumps({"name": name, "id": provider_id}, separators=(",", ":"), ensure_ascii=False).encode()


def storage_fs_payload(storage_fs: str) -> bytes:
    if storage_fs not in ("zfs", "ext4"):
        raise ValueError(f"storage_fs {storage_fs!r} is not one dstack supports; use 'zfs' or 'ext4'")
    return storage_fs.encode("ascii")


def os_image_hash_from_sha256sum(sha256sum_txt: str | bytes) -> str:
    """dstack's os-image-hash: sha256 over the image's ``sha256sum.txt`` (= ``digest.txt``)."""
    data = sha256sum_txt.encode("utf-8") if isinstance(sha256sum_txt, str) else sha256sum_txt
    lines = data.decode("utf-8", errors="replace").splitlines()
    bad = [n for n, line in enumerate(lines, 1) if line and not _SHA256SUM_LINE.fullmatch(line)]
    if bad or not any(lines):
        raise ValueError(
            f"not a sha256sum.txt (line {bad[0] if bad else 1} is not '<64 hex>  <file name>'); "
            "pass the file from the image build output unchanged"
        )
    return hashlib.sha256(data).hexdigest()


def sha256_digest_hex(digest: str) -> str:
    """``sha256:<hex>`` or ``<hex>`` -> 64 lowercase hex chars."""
    value = digest.removeprefix("sha256:").lower()
    if not _HEX64.fullmatch(value):
        raise ValueError(f"{digest!r} is not a sha256 digest ('sha256:' followed by 64 hex chars)")
    return value


def mpc_image_digest_payload(digest: str) -> bytes:
    """The NEAR MPC launcher's ``mpc-image-digest`` event: the 32 raw digest bytes (the vector's
    event_payload is the digest's hex, so the payload is not the hex text)."""
    return bytes.fromhex(sha256_digest_hex(digest))


# App events a launcher emits after ``system-ready``: event name -> payload from an image digest.
APP_EVENT_PAYLOADS: dict[str, Callable[[str], bytes]] = {
    "mpc-image-digest": mpc_image_digest_payload,
}


def key_provider_kind(app_compose: Mapping[str, Any]) -> str:
    """dstack's ``AppCompose::key_provider()``: explicit ``key_provider`` wins, then
    ``kms_enabled``, then ``local_key_provider_enabled``; otherwise none."""
    explicit = app_compose.get("key_provider")
    if explicit:
        return str(explicit)
    if app_compose.get("kms_enabled"):
        return "kms"
    if app_compose.get("local_key_provider_enabled"):
        return "local"
    return "none"


def event_log_version(app_compose: Mapping[str, Any]) -> int:
    version = app_compose.get("event_log_version", 1)
    return version if isinstance(version, int) else -1


# ---------------------------------------------------------------------------------------------
# Profiles


@dataclass(frozen=True)
class MeasurementProfile:
    recipe: str
    dstack_version: str | None
    key_provider: str | None
    boot_events: tuple[str, ...]  # RTMR3 events before app events, in emission order
    optional_events: frozenset[str] = frozenset()  # may be absent (mr-kms: only with an attested KMS cert)
    key_provider_name: str | None = None  # the ``name`` in the key-provider event payload
    instance_id_binds_platform: bool = False  # instance-id also binds a per-VM key: unknown before boot
    app_id_from_instance_info: bool = False  # app-id event is .instance_info's app_id in every mode
    gcp_runtime_pcr: int | None = None  # on GCP the same events also extend this vTPM PCR (sha256)
    note: str = ""

    @property
    def name(self) -> str:
        return "/".join(p for p in (self.recipe, self.dstack_version, self.key_provider) if p)

    @property
    def has_dstack_events(self) -> bool:
        return bool(self.boot_events)


# The ``name`` a guest writes into its key-provider event, per app-compose key provider (``tpm``
# only from the dstack OS 0.6.0.a2 on; v0.5.11 refuses it).
KEY_PROVIDER_EVENT_NAMES = {"none": "none", "local": "local-sgx", "kms": "kms", "tpm": "tpm"}

_V05_BEFORE_KEYS = ("system-preparing", "app-id", "compose-hash", "instance-id", "boot-mr-done")
_V05_AFTER_KEYS = ("key-provider", "storage-fs", "system-ready")
_V05_KMS_ONLY = ("mr-kms", "os-image-hash")

# Source: dstack v0.5.11 dstack-util/src/system_setup.rs (measure_app_info, request_app_keys,
# verify_app, setup_fs). v0.5.x all emit the same sequence; the local key provider is SGX-based.
PROFILES: dict[tuple[str, str, str], MeasurementProfile] = {
    ("dstack-os", "0.5", "none"): MeasurementProfile(
        "dstack-os", "0.5", "none", _V05_BEFORE_KEYS + _V05_AFTER_KEYS,
        key_provider_name=KEY_PROVIDER_EVENT_NAMES["none"],
        note="no key provider: instance_id_seed is random on every boot",
    ),
    ("dstack-os", "0.5", "local"): MeasurementProfile(
        "dstack-os", "0.5", "local", _V05_BEFORE_KEYS + _V05_AFTER_KEYS,
        key_provider_name=KEY_PROVIDER_EVENT_NAMES["local"],
        note="local key provider (SGX); its id is the provider enclave's measurement",
    ),
    ("dstack-os", "0.5", "kms"): MeasurementProfile(
        "dstack-os", "0.5", "kms", _V05_BEFORE_KEYS + _V05_KMS_ONLY + _V05_AFTER_KEYS,
        optional_events=frozenset({"mr-kms"}), key_provider_name=KEY_PROVIDER_EVENT_NAMES["kms"],
        note="KMS: app-id comes from the KMS (app contract), mr-kms from the KMS certificate",
    ),
}

# The dstack OS 0.6.0.a2 (Dstack-TEE/meta-dstack tag v0.6.0.a2, commit 86be7d60252f82ff1c9c8ac2a083d0a2e08c7a9e)
# builds dstack-util and dstack-guest-agent from its `dstack` submodule (recipes-core/dstack-guest/
# dstack-guest.bb rsyncs ../../../dstack): Dstack-TEE/dstack commit
# f1ba0a22a961e8bdae110c7b1a796bc56dfd10a8 (2026-06-11, "feat(dstack-util): mix gcp vTPM AK pubkey into
# instance_id"), 261 commits after tag v0.5.11, untagged (its Cargo.toml still says 0.5.11). Read there:
# * dstack-util/src/system_setup.rs: the same emit_runtime_event calls in the same order as v0.5.11
#   (measure_app_info, request_app_keys_from_kms_url, verify_app, setup_fs); no init-script-hash.
#   Changed: measure_app_info emits instance_info.app_id (the compose-derived value only when
#   .instance_info has none) in every mode, where v0.5.11 forced the compose-derived value without a
#   KMS; instance_id = sha256(seed || app_id || platform_instance_binding())[:20], the binding being
#   sha256 of the GCP vTPM AK public area (None elsewhere); the tpm key provider works
#   (generate_tpm_app_keys; event {"name":"tpm","id":hex(app key public DER)}), v0.5.11 bailed.
# * cc-eventlog/src/runtime_events.rs: unchanged from v0.5.11, v1 digest only (to_ne_bytes).
# * dstack-attest/src/lib.rs: emit_runtime_event extends RTMR3 (sha384) and, on GCP
#   (AttestationMode::DstackGcpTdx, tpm_runtime_pcr = 14), vTPM PCR 14 with the sha256 digest.
# * dstack-types/src/lib.rs: identical to v0.5.11; AppCompose has no event_log_version field (serde
#   ignores it), KeyProviderKind is none/kms/local/tpm.
_V06A2 = "0.6.0.a2"
_V06A2_NOTE = "; instance-id binds the VM's vTPM attestation key on GCP, so it is known only at boot"
PROFILES.update({
    ("dstack-os", _V06A2, "none"): MeasurementProfile(
        "dstack-os", _V06A2, "none", _V05_BEFORE_KEYS + _V05_AFTER_KEYS,
        key_provider_name=KEY_PROVIDER_EVENT_NAMES["none"], instance_id_binds_platform=True,
        app_id_from_instance_info=True, gcp_runtime_pcr=14,
        note="no key provider: instance_id_seed is random on every boot" + _V06A2_NOTE,
    ),
    ("dstack-os", _V06A2, "local"): MeasurementProfile(
        "dstack-os", _V06A2, "local", _V05_BEFORE_KEYS + _V05_AFTER_KEYS,
        key_provider_name=KEY_PROVIDER_EVENT_NAMES["local"], instance_id_binds_platform=True,
        app_id_from_instance_info=True, gcp_runtime_pcr=14,
        note="local key provider (SGX, from the dstack VMM's host API; none on GCP)" + _V06A2_NOTE,
    ),
    ("dstack-os", _V06A2, "kms"): MeasurementProfile(
        "dstack-os", _V06A2, "kms", _V05_BEFORE_KEYS + _V05_KMS_ONLY + _V05_AFTER_KEYS,
        optional_events=frozenset({"mr-kms"}), key_provider_name=KEY_PROVIDER_EVENT_NAMES["kms"],
        instance_id_binds_platform=True, app_id_from_instance_info=True, gcp_runtime_pcr=14,
        note="KMS: app-id from .instance_info, mr-kms from the KMS certificate" + _V06A2_NOTE,
    ),
    ("dstack-os", _V06A2, "tpm"): MeasurementProfile(
        "dstack-os", _V06A2, "tpm", _V05_BEFORE_KEYS + _V05_AFTER_KEYS,
        key_provider_name=KEY_PROVIDER_EVENT_NAMES["tpm"], instance_id_binds_platform=True,
        app_id_from_instance_info=True, gcp_runtime_pcr=14,
        note="TPM key provider: keys from a seed sealed in the vTPM to PCRs 0, 2 and 14; its id, the "
             "app key's public key, is known only at boot" + _V06A2_NOTE,
    ),
})

OVERLAY_PROFILE = MeasurementProfile(
    "tplus-overlay", None, None, (), note="tplus overlay image: no dstack RTMR3 events at all",
)


def dstack_series(version: str) -> str:
    """``v0.5.11`` / ``0.5.4`` / ``0.5`` -> ``0.5``."""
    match = re.fullmatch(r"v?(\d+)\.(\d+)(?:\.\d+)?(?:[-.+].*)?", version.strip())
    if not match:
        raise UnknownProfile(f"dstack version {version!r} is not a version such as 0.5.11")
    return f"{match.group(1)}.{match.group(2)}"


def measurement_profile(recipe: str, dstack_version: str | None = None,
                        key_provider: str | None = None) -> MeasurementProfile:
    """The profile of a node or app; raises ``UnknownProfile`` naming what is known."""
    if recipe == OVERLAY_PROFILE.recipe:
        return OVERLAY_PROFILE
    recipes = sorted({r for r, _, _ in PROFILES} | {OVERLAY_PROFILE.recipe})
    if recipe not in recipes:
        raise UnknownProfile(f"no measurement profile for recipe {recipe!r}; known: {', '.join(recipes)}")
    if dstack_version is None:
        raise UnknownProfile(f"recipe {recipe!r} needs a dstack version (e.g. 0.5.11)")
    series = dstack_series(dstack_version)
    versions = sorted({v for r, v, _ in PROFILES if r == recipe})
    exact = dstack_version.strip().removeprefix("v")
    # An exact pre-release (0.6.0.a2) has its own profile; it never stands for its series.
    version = exact if exact in versions else series
    if version not in versions:
        raise UnknownProfile(
            f"no measurement profile for {recipe} {dstack_version} (series {series}); known: "
            f"{', '.join(versions)}. Newer releases change the RTMR3 events: add a profile first"
        )
    providers = sorted(p for r, v, p in PROFILES if (r, v) == (recipe, version))
    if key_provider not in providers:
        raise UnknownProfile(
            f"no measurement profile for key provider {key_provider!r} on {recipe} {version}; "
            f"known: {', '.join(providers)}"
        )
    return PROFILES[(recipe, version, key_provider)]


def profile_by_name(name: str) -> MeasurementProfile | None:
    """The profile a plan entry names (``dstack-os/0.5/local``), or None."""
    for profile in (*PROFILES.values(), OVERLAY_PROFILE):
        if profile.name == name:
            return profile
    return None


# ---------------------------------------------------------------------------------------------
# Expected events


@dataclass(frozen=True)
class ExpectedEvent:
    event: str
    payload: Payload

    @property
    def digest(self) -> bytes | str:
        return self.payload if isinstance(self.payload, str) else event_digest(self.event, self.payload)

    def to_json(self) -> dict[str, str]:
        digest = self.digest
        return {
            "event": self.event,
            "payload": self.payload if isinstance(self.payload, str) else self.payload.hex(),
            "digest": digest if isinstance(digest, str) else digest.hex(),
        }


def expected_rtmr3(events: Iterable[ExpectedEvent]) -> str:
    """Hex replay of ``events`` when every payload is known before boot; otherwise ``known at
    boot`` if any payload waits for the boot (no build can make it predictable), else ``pending
    build``."""
    events = list(events)
    markers = {e.payload for e in events if isinstance(e.payload, str)}
    if markers:
        return KNOWN_AT_BOOT if KNOWN_AT_BOOT in markers else PENDING_BUILD
    return replay(event_digest(e.event, e.payload) for e in events if isinstance(e.payload, bytes)).hex()


def expected_runtime_pcr(events: Iterable[ExpectedEvent]) -> str:
    """Like ``expected_rtmr3``, for the SHA-256 register a GCP guest extends with the same events
    (vTPM PCR 14; see ``MeasurementProfile.gcp_runtime_pcr``)."""
    events = list(events)
    markers = {e.payload for e in events if isinstance(e.payload, str)}
    if markers:
        return KNOWN_AT_BOOT if KNOWN_AT_BOOT in markers else PENDING_BUILD
    return replay_sha256(event_digest_sha256(e.event, e.payload) for e in events
                         if isinstance(e.payload, bytes)).hex()


def _hex_or_marker(value: str | None, length: int, what: str) -> Payload:
    if value is None:
        return KNOWN_AT_BOOT
    if value in MARKERS:
        return value
    if not re.fullmatch(f"[0-9a-f]{{{length}}}", value):
        raise ValueError(f"{what} {value!r} is not {length} lowercase hex chars")
    return bytes.fromhex(value)


def app_events(image_digests: Mapping[str, str]) -> list[ExpectedEvent]:
    """Events an app emits after ``system-ready``, from the image digests it announces."""
    events = []
    for name, digest in image_digests.items():
        if name not in APP_EVENT_PAYLOADS:
            raise ValueError(
                f"no payload rule for app event {name!r}; known: {', '.join(sorted(APP_EVENT_PAYLOADS))}"
            )
        payload = digest if digest in MARKERS else APP_EVENT_PAYLOADS[name](digest)
        events.append(ExpectedEvent(name, payload))
    return events


def expected_events(
    profile: MeasurementProfile,
    *,
    compose_hash_hex: str,
    app_id: str | None,
    no_instance_id: bool,
    instance_id_seed: bytes | None = None,
    key_provider_id: str | None = None,
    storage_fs: str = "zfs",
    os_image_hash: str | None = None,
    image_digests: Mapping[str, str] | None = None,
) -> list[ExpectedEvent]:
    """The RTMR3 events of one boot, in order. ``None`` for ``app_id`` (KMS), ``key_provider_id``
    or ``os_image_hash`` means the value is only known at boot; ``PENDING_BUILD`` that a build
    has not produced it yet."""
    if not profile.has_dstack_events:
        return []
    kms = profile.key_provider == "kms"
    compose_app_id = app_id_from_compose_hash(compose_hash_hex)
    # v0.5.x emits the compose-derived app-id unless the KMS assigns one; 0.6.0.a2 emits the
    # instance-info app-id in every mode. instance-id is derived from the instance-info app-id,
    # which defaults to the same compose-derived value.
    info_app_id = app_id or compose_app_id
    event_app_id = app_id if kms else info_app_id if profile.app_id_from_instance_info else compose_app_id
    if no_instance_id:
        instance: Payload = b""
    elif (
        profile.key_provider == "none"  # the seed is regenerated on every boot
        or profile.instance_id_binds_platform
        or instance_id_seed is None
        or info_app_id in MARKERS
    ):
        instance = KNOWN_AT_BOOT
    else:
        instance = bytes.fromhex(instance_id(instance_id_seed, info_app_id))
    if profile.key_provider == "none":
        provider_id: str | None = ""
    else:
        provider_id = key_provider_id
    provider: Payload = (
        provider_id if provider_id in MARKERS
        else KNOWN_AT_BOOT if provider_id is None
        else key_provider_payload(profile.key_provider_name or "", provider_id)
    )
    payloads: dict[str, Payload] = {
        "system-preparing": b"",
        "app-id": _hex_or_marker(event_app_id, 40, "app_id"),
        "compose-hash": bytes.fromhex(compose_hash_hex),
        "instance-id": instance,
        "boot-mr-done": b"",
        "mr-kms": KNOWN_AT_BOOT,
        "os-image-hash": _hex_or_marker(os_image_hash, 64, "os_image_hash") if kms else b"",
        "key-provider": provider,
        "storage-fs": storage_fs_payload(storage_fs),
        "system-ready": b"",
    }
    boot = [ExpectedEvent(name, payloads[name]) for name in profile.boot_events]
    return boot + app_events(image_digests or {})


def _measurement_json(
    profile: MeasurementProfile, *, kind: str, app_id: str | None, compose_hash_hex: str | None,
    os_image_hash: str | None, key_provider: dict[str, str] | None, image_digests: dict[str, str],
    events: list[ExpectedEvent], machine_type: str | None,
) -> dict[str, Any]:
    return {
        "kind": kind,
        "profile": profile.name,
        "app_id": app_id,
        "compose_hash": compose_hash_hex,
        "os_image_hash": os_image_hash,
        "key_provider": key_provider,
        "image_digests": image_digests,
        "rtmr3_events": [e.to_json() for e in events],
        "rtmr3": expected_rtmr3(events) if profile.has_dstack_events else None,
        "machine_type": machine_type,
    }


def expected_measurements(
    app_compose: bytes,
    *,
    dstack_version: str,
    recipe: str = "dstack-os",
    os_image_hash: str | None = None,
    app_id: str | None = None,
    key_provider_id: str | None = None,
    instance_id_seed: bytes | None = None,
    storage_fs: str | None = None,
    image_digests: Mapping[str, str] | None = None,
    machine_type: str | None = None,
) -> dict[str, Any]:
    """What one dstack app reports, JSON-ready (the plan's ``measurements.<target>``).

    ``app_compose`` is the exact file the guest reads; the key provider, ``no_instance_id`` and
    ``storage_fs`` come from it. ``os_image_hash``: 64 hex, ``PENDING_BUILD`` before the image
    build ran, or None when not ours to know. ``app_id`` is the KMS-assigned app-id (None: known
    at boot). ``key_provider_id``: the KMS root key / local provider measurement, hex (None:
    known at boot). ``image_digests``: app event name -> ``sha256:...`` or ``PENDING_BUILD``.
    """
    try:
        compose = json.loads(app_compose)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"app-compose is not JSON ({exc})") from None
    if not isinstance(compose, dict):
        raise ValueError("app-compose is not a JSON object")
    if event_log_version(compose) != 1:
        raise UnknownProfile(
            f"app-compose sets event_log_version {compose.get('event_log_version')!r}; only v1 "
            "event digests are supported (dstack 0.5.x and 0.6.0.a2 ignore the field and log v1): "
            "remove event_log_version"
        )
    profile = measurement_profile(recipe, dstack_version, key_provider_kind(compose))
    if not profile.has_dstack_events:
        raise UnknownProfile(f"recipe {recipe!r} runs no dstack app; describe its nodes with overlay_measurements")
    if os_image_hash is not None:
        _hex_or_marker(os_image_hash, 64, "os_image_hash")
    if app_id is not None:
        _hex_or_marker(app_id, 40, "app_id")
    if key_provider_id is not None and key_provider_id not in MARKERS:
        if not re.fullmatch(r"(?:[0-9a-f]{2})*", key_provider_id):
            raise ValueError(f"key_provider_id {key_provider_id!r} is not lowercase hex")
        if profile.key_provider == "none" and key_provider_id:
            raise ValueError("app-compose selects no key provider, so key_provider_id must be empty or unset")
    hash_hex = compose_hash(app_compose)
    digests = {
        name: value if value in MARKERS else sha256_digest_hex(value)
        for name, value in (image_digests or {}).items()
    }
    events = expected_events(
        profile,
        compose_hash_hex=hash_hex,
        app_id=app_id,
        no_instance_id=bool(compose.get("no_instance_id", False)),
        instance_id_seed=instance_id_seed,
        key_provider_id=key_provider_id,
        storage_fs=storage_fs or compose.get("storage_fs") or "zfs",
        os_image_hash=os_image_hash,
        image_digests=digests,
    )
    by_name = {e.event: e for e in events}
    provider_event = by_name["key-provider"].payload
    provider_id = (
        json.loads(provider_event)["id"] if isinstance(provider_event, bytes) else provider_event
    )
    if profile.key_provider == "kms":
        reported_app_id = app_id if app_id is not None else KNOWN_AT_BOOT
    elif profile.app_id_from_instance_info and app_id is not None:
        reported_app_id = app_id
    else:
        reported_app_id = app_id_from_compose_hash(hash_hex)
    return _measurement_json(
        profile,
        kind="dstack-app",
        app_id=reported_app_id,
        compose_hash_hex=hash_hex,
        os_image_hash=os_image_hash,
        key_provider={"name": profile.key_provider_name or "", "id": provider_id},
        image_digests=digests,
        events=events,
        machine_type=machine_type,
    )


def overlay_measurements(*, os_image_hash: str | None = None, machine_type: str | None = None) -> dict[str, Any]:
    """A tplus overlay node: same shape, with no dstack identity and no RTMR3 events."""
    return _measurement_json(
        OVERLAY_PROFILE, kind="overlay-node", app_id=None, compose_hash_hex=None,
        os_image_hash=os_image_hash, key_provider=None, image_digests={}, events=[],
        machine_type=machine_type,
    )
