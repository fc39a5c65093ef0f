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

# App identity: one vocabulary for stack outputs, measurements, the diff and the docs. The app id
# is what a KMS derives an app's keys from (and, without a KMS, what names its identity).
IDENTITY_PINNED = "pinned"  # kms.appId is written to .instance_info: the same across compose changes
IDENTITY_COMPOSE = "compose"  # none pinned: the guest takes the compose hash's first 20 bytes, so every
#                              compose change is a new app id (new keys), with or without a KMS
IDENTITY_REPORTED = "reported"  # Phala Cloud writes the app-compose and assigns the id: known after deploy
IDENTITIES = (IDENTITY_PINNED, IDENTITY_COMPOSE, IDENTITY_REPORTED)
REPORTED_BY_PHALA = "reported by Phala Cloud after deploy"

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
class GuestRelease:
    """What the dstack-util of one or more dstack guest releases emits into RTMR3, read at a named
    source commit (``source``: repository@commit:path). Every field is a fact of that source; a
    release whose code differs in any of them gets its own entry, so upstream drift (a dropped or
    added event, another payload rule) can never hide behind a series name."""

    name: str  # "0.5.6-0.5.11", "0.6.0.a2": the profile's version
    releases: tuple[str, ...]  # exact versions (tags without "v") this entry stands for
    source: str
    os_image_hash_event: bool  # KMS: os-image-hash = the KMS's answer, after GetAppKey
    storage_fs_event: bool
    app_id_event: str  # "instance-info": .instance_info's app_id in every mode (else compose-derived);
    #                    "compose-unless-kms": compose-derived without a KMS whatever .instance_info says
    key_providers: tuple[str, ...]
    tpm_provider_id: str | None = None  # "app-key": hex(app key public DER), known only at boot
    instance_binding: str | None = None  # "gcp-vtpm-ak": instance-id also hashes the vTPM AK (GCP)
    gcp_runtime_pcr: int | None = None  # on GCP the same events also extend this vTPM PCR (sha256)
    gcp_vm_config_os_image_hash: str | None = None  # what the pinned verifier compares it with on GCP
    emit_event: bool = True  # the guest agent serves EmitEvent (apps extend RTMR3 through it)
    vectors: tuple[str, ...] = ()  # tests/vectors files whose RTMR3 a profile of this release replays
    no_vector: str = ""  # why no replay vector exists, when ``vectors`` is empty


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
    release: GuestRelease | None = None

    @property
    def name(self) -> str:
        return "/".join(p for p in (self.recipe, self.dstack_version, self.key_provider) if p)

    @property
    def has_dstack_events(self) -> bool:
        return bool(self.boot_events)

    @property
    def source(self) -> str:
        return self.release.source if self.release else ""


# The ``name`` a guest writes into its key-provider event, per app-compose key provider (``tpm``
# only from the dstack OS 0.6.0.a2 on; v0.5.11 refuses it).
KEY_PROVIDER_EVENT_NAMES = {"none": "none", "local": "local-sgx", "kms": "kms", "tpm": "tpm"}

_BEFORE_KEYS = ("system-preparing", "app-id", "compose-hash", "instance-id", "boot-mr-done")
_SYSTEM = "dstack-util/src/system_setup.rs"

# Read one tag at a time in Dstack-TEE/dstack (dstack-util/src/system_setup.rs: measure_app_info,
# request_app_keys*, verify_app, setup_fs). Emission order is the same in all of them:
# measure_app_info's five events, then (KMS only) mr-kms while the KMS's RA-TLS certificate is
# checked (only when it carries an attestation) and os-image-hash after GetAppKey, then
# key-provider, then (0.5.5 on) storage-fs, then system-ready.
GUEST_RELEASES: tuple[GuestRelease, ...] = (
    GuestRelease(
        "0.5.0", ("0.5.0",), f"Dstack-TEE/dstack@ce6e88d0401408949787f7beb0c5427e7456780a:{_SYSTEM}",
        os_image_hash_event=False, storage_fs_event=False, app_id_event="instance-info",
        key_providers=("kms", "local", "none"),
        no_vector="no published RTMR3 log of a 0.5.0 guest was found; read from source only"),
    GuestRelease(
        "0.5.1-0.5.4", ("0.5.1", "0.5.2", "0.5.3", "0.5.4"),
        f"Dstack-TEE/dstack@3e4e462cac2a57c204698d2443d252d13e75cd29:{_SYSTEM} (v0.5.4; v0.5.1 "
        "be9d0476 emits the same)",
        os_image_hash_event=True, storage_fs_event=False, app_id_event="instance-info",
        key_providers=("kms", "local", "none"),
        no_vector="no published RTMR3 log of a 0.5.1-0.5.4 guest was found; read from source only"),
    GuestRelease(
        "0.5.5", ("0.5.5",), f"Dstack-TEE/dstack@7bf1843a8ddf877fbaebb9898a7f27a19a49ab73:{_SYSTEM}",
        os_image_hash_event=True, storage_fs_event=True, app_id_event="instance-info",
        key_providers=("kms", "local", "none"),
        # NEAR's localnet vectors do not name their dstack release; they log storage-fs (0.5.5 on)
        vectors=("near-mpc-tcb-info.json", "near-mpc-quote-set/tcb_info.json")),
    GuestRelease(
        "0.5.6-0.5.11", ("0.5.6", "0.5.7", "0.5.8", "0.5.9", "0.5.10", "0.5.11"),
        f"Dstack-TEE/dstack@40eaf35e6b3f112998d01569f2a26110baab123b:{_SYSTEM} (v0.5.11; v0.5.6 "
        "3a456dd6 and v0.5.8 368c62e7 emit the same)",
        os_image_hash_event=True, storage_fs_event=True, app_id_event="compose-unless-kms",
        key_providers=("kms", "local", "none"),
        vectors=("near-mpc-tcb-info.json", "near-mpc-quote-set/tcb_info.json",
                 "near-mpc-os-0.5.8/tcb_info.prod.json")),
    # The dstack OS 0.6.0.a2 (Dstack-TEE/meta-dstack tag v0.6.0.a2, commit
    # 86be7d60252f82ff1c9c8ac2a083d0a2e08c7a9e) builds dstack-util and the guest agent from its `dstack`
    # submodule: Dstack-TEE/dstack f1ba0a22 (2026-06-11, "feat(dstack-util): mix gcp vTPM AK pubkey into
    # instance_id"), 261 commits after v0.5.11, untagged. There measure_app_info emits
    # instance_info.app_id in every mode (the compose-derived value when it is empty); instance_id =
    # sha256(seed || app_id || sha256(GCP vTPM AK public area))[:20]; the tpm key provider works and
    # names hex(app key public DER); emit_runtime_event (dstack-attest/src/lib.rs) also extends vTPM
    # PCR 14 on GCP; AppCompose has no event_log_version (v1 digests only); verifier/src/
    # verification.rs verify_os_image_hash_for_gcp_tdx compares vm_config.os_image_hash with the UKI
    # Authenticode hash in PCR 2's event log.
    GuestRelease(
        "0.6.0.a2", ("0.6.0.a2",), f"Dstack-TEE/dstack@f1ba0a22a961e8bdae110c7b1a796bc56dfd10a8:{_SYSTEM}",
        os_image_hash_event=True, storage_fs_event=True, app_id_event="instance-info",
        key_providers=("kms", "local", "none", "tpm"), tpm_provider_id="app-key",
        instance_binding="gcp-vtpm-ak", gcp_runtime_pcr=14, gcp_vm_config_os_image_hash="uki-authenticode",
        # dstack 0.6.0 TDX "lite" fixture, captured by Dstack-TEE/dstack 02bb2476 (2026-06-29) from a
        # guest whose dstack-util emits these events in this order (bare metal: no vTPM binding).
        vectors=("dstack-0.6.0-tdx-lite/tdx-lite-getquote.json",)),
)

# Upstream changes after every release above, which a new profile must encode (Dstack-TEE/dstack):
# EmitEvent removed from the guest agent (10898e63, 2026-07-11, #768); the tpm key-provider event
# names an empty id (#777, 2026-07-14); mr-kms no longer emitted (a454b8b4, #1007, 2026-08-06);
# app-compose `event_log_version: 2` selects JCS digests (next branch). None is in a release here.
UPSTREAM_DRIFT = {
    "EmitEvent removed": "Dstack-TEE/dstack 10898e63 (2026-07-11, #768)",
    "tpm key-provider id empty": "Dstack-TEE/dstack #777 (2026-07-14)",
    "mr-kms removed": "Dstack-TEE/dstack a454b8b4 (2026-08-06, #1007)",
    "event_log_version 2": "Dstack-TEE/dstack next: cc-eventlog/src/runtime_events.rs v2 (JCS) digests",
}

# EmitEvent (guest-agent/rpc/proto/agent_rpc.proto), which launchers use to extend RTMR3: added in
# Dstack-TEE/dstack f672c731 (2025-04-28, first in v0.5.0), removed in 10898e63 (2026-07-11, #768).
EMIT_EVENT_SOURCE = ("Dstack-TEE/dstack f672c731 (2025-04-28) added EmitEvent, first released in v0.5.0; "
                     "10898e63 (2026-07-11, #768) removed it")
RELEASES_WITHOUT_EMIT_EVENT = ("0.4.2",)  # older than f672c731


def guest_release(version: str) -> GuestRelease | None:
    exact = version.strip().removeprefix("v")
    return next((r for r in GUEST_RELEASES if exact in r.releases), None)


def _profile(release: GuestRelease, key_provider: str) -> MeasurementProfile:
    kms = key_provider == "kms"
    events = _BEFORE_KEYS
    if kms:
        events += ("mr-kms",) + (("os-image-hash",) if release.os_image_hash_event else ())
    events += ("key-provider",) + (("storage-fs",) if release.storage_fs_event else ()) + ("system-ready",)
    notes = {
        "none": "no key provider: instance_id_seed is random on every boot",
        "local": "local key provider (SGX, from the dstack VMM's host API; none on GCP)",
        "kms": "KMS: app-id from .instance_info (compose-derived when empty), mr-kms from the KMS certificate",
        "tpm": "TPM key provider: keys from a seed sealed in the vTPM; its id, the app key's public key, is "
               "known only at boot",
    }
    binding = "; instance-id binds the VM's vTPM attestation key on GCP, so it is known only at boot" \
        if release.instance_binding else ""
    return MeasurementProfile(
        "dstack-os", release.name, key_provider, events,
        optional_events=frozenset({"mr-kms"}) if kms else frozenset(),
        key_provider_name=KEY_PROVIDER_EVENT_NAMES[key_provider],
        instance_id_binds_platform=release.instance_binding is not None,
        app_id_from_instance_info=release.app_id_event == "instance-info",
        gcp_runtime_pcr=release.gcp_runtime_pcr, note=notes[key_provider] + binding, release=release,
    )


PROFILES: dict[tuple[str, str, str], MeasurementProfile] = {
    ("dstack-os", release.name, kp): _profile(release, kp) for release in GUEST_RELEASES for kp in release.key_providers
}

OVERLAY_PROFILE = MeasurementProfile(
    "tplus-overlay", None, None, (), note="tplus overlay image: no dstack RTMR3 events at all",
)


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
    release = guest_release(dstack_version)
    if release is None:
        known = ", ".join(v for r in GUEST_RELEASES for v in r.releases)
        raise UnknownProfile(
            f"no measurement profile for {recipe} {dstack_version}; known releases: {known}. Each release's "
            "RTMR3 events are read from its own source: add a profile first"
        )
    providers = sorted(release.key_providers)
    if key_provider not in providers:
        raise UnknownProfile(
            f"no measurement profile for key provider {key_provider!r} on {recipe} {release.name}; "
            f"known: {', '.join(providers)}"
        )
    return PROFILES[(recipe, release.name, key_provider)]


def profile_by_name(name: str) -> MeasurementProfile | None:
    """The profile a plan entry names (``dstack-os/0.5.6-0.5.11/local``), or None."""
    for profile in (*PROFILES.values(), OVERLAY_PROFILE):
        if profile.name == name:
            return profile
    return None


def vm_config_os_image_hash(release: GuestRelease | None, *, target: str, digest_txt: str | None,
                            uki_hash: str | None) -> str | None:
    """``vm_config.os_image_hash`` a guest must carry. On GCE the pinned verifier
    (``verify_os_image_hash_for_gcp_tdx``, which the KMS runs when ``[core.image] verify`` is on)
    compares it with the UKI Authenticode hash of PCR 2's event log, so it is the lock's
    ``uki_hash``; elsewhere dstack's os-image-hash (``digest.txt``)."""
    if target == "gce" and release is not None and release.gcp_vm_config_os_image_hash == "uki-authenticode":
        return uki_hash
    return digest_txt


def os_image_hash_event_payload(release: GuestRelease | None, vm_config_hash: str | None) -> str | None:
    """The RTMR3 ``os-image-hash`` payload of a KMS app: the KMS's GetAppKey answer, which in every
    release here is ``decode_vm_config(vm_config).os_image_hash`` of the vm_config the guest sent
    (kms/src/main_service.rs ``get_app_key``, dstack-attest/src/attestation.rs ``decode_app_info_ex``).
    The dstack 0.6.0 fixture shows the two differ once the file is edited after capture
    (Dstack-TEE/dstack 53defce6 rewrote vm_config.os_image_hash but not the event log)."""
    if release is not None and not release.os_image_hash_event:
        return None
    return vm_config_hash


def emit_event_problem(version: str) -> str | None:
    """Why an app that extends RTMR3 through the guest agent's EmitEvent cannot run on ``version``."""
    exact = version.strip().removeprefix("v")
    if exact in RELEASES_WITHOUT_EMIT_EVENT:
        return (f"dstack {exact} has no EmitEvent in its guest agent, which the launcher calls to extend RTMR3 "
                f"({EMIT_EVENT_SOURCE}); use 0.5.0 or later")
    release = guest_release(exact)
    if release is not None and not release.emit_event:
        return f"dstack {exact} removed EmitEvent ({EMIT_EVENT_SOURCE}); the launcher cannot extend RTMR3 there"
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
    """The RTMR3 events of one boot, in order. ``app_id`` is the app id deployed in
    ``.instance_info`` (None: none, so the guest derives it from the compose hash). ``None`` for
    ``key_provider_id`` or ``os_image_hash`` (the vm_config value the guest sends its KMS) means the
    value is only known at boot; ``PENDING_BUILD`` that a build has not produced it yet."""
    if not profile.has_dstack_events:
        return []
    kms = profile.key_provider == "kms"
    compose_app_id = app_id_from_compose_hash(compose_hash_hex)
    # .instance_info's app_id is what we deploy (a pinned id, else empty); the guest fills an empty
    # one with the compose-derived value. Releases with app_id_event "compose-unless-kms" emit the
    # compose-derived value without a KMS whatever .instance_info says. instance-id always hashes
    # the .instance_info value.
    info_app_id = app_id or compose_app_id
    event_app_id = info_app_id if kms or profile.app_id_from_instance_info else compose_app_id
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
    event_os_image_hash = os_image_hash_event_payload(profile.release, os_image_hash) if kms else None
    payloads: dict[str, Payload] = {
        "system-preparing": b"",
        "app-id": _hex_or_marker(event_app_id, 40, "app_id"),
        "compose-hash": bytes.fromhex(compose_hash_hex),
        "instance-id": instance,
        "boot-mr-done": b"",
        "mr-kms": KNOWN_AT_BOOT,
        "os-image-hash": _hex_or_marker(event_os_image_hash, 64, "os_image_hash") if kms else b"",
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
    cmdline_storage_fs: str | None = None,
    image_digests: Mapping[str, str] | None = None,
    machine_type: str | None = None,
) -> dict[str, Any]:
    """What one dstack app reports, JSON-ready (the plan's ``measurements.<target>``).

    ``app_compose`` is the exact file the guest reads; the key provider, ``no_instance_id`` and
    ``storage_fs`` come from it (else the image's ``dstack.storage_fs`` kernel parameter, else zfs:
    ``parse_dstack_options`` in system_setup.rs). ``os_image_hash``: the ``vm_config.os_image_hash``
    the guest carries (64 hex), ``PENDING_BUILD`` before the image build ran, or None when not ours
    to know. ``app_id``: the app id deployed in ``.instance_info`` (a pinned KMS app id; None: the
    guest derives it from the compose hash). ``key_provider_id``: the KMS root key / local provider
    measurement, hex (None: known at boot). ``image_digests``: app event name -> ``sha256:...`` or
    ``PENDING_BUILD``.
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
        storage_fs=storage_fs or compose.get("storage_fs") or cmdline_storage_fs or "zfs",
        os_image_hash=os_image_hash,
        image_digests=digests,
    )
    by_name = {e.event: e for e in events}
    provider_event = by_name["key-provider"].payload
    provider_id = (
        json.loads(provider_event)["id"] if isinstance(provider_event, bytes) else provider_event
    )
    reported_app_id = next(e.payload for e in events if e.event == "app-id")
    reported_app_id = reported_app_id.hex() if isinstance(reported_app_id, bytes) else reported_app_id
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
