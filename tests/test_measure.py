"""Expected measurements, checked byte for byte against the NEAR MPC vectors in tests/vectors."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleet.attest import measure

VECTORS = Path(__file__).parent / "vectors"
LOCALNET = json.loads((VECTORS / "near-mpc-tcb-info.json").read_text())
QUOTE_SET = json.loads((VECTORS / "near-mpc-quote-set" / "tcb_info.json").read_text())
# The local (SGX) key provider's measurement, as both vectors' key-provider events carry it.
LOCAL_PROVIDER_ID = "6b5ed02e549a1c30aaa8e3171a045f1f449b0017353ef595e78e39c348c98d01"


def rtmr3_events(tcb_info: dict) -> list[dict]:
    return [e for e in tcb_info["event_log"] if e["imr"] == 3]


def launcher_digest(tcb_info: dict) -> str:
    """The MPC image digest the launcher pins in the measured compose (DEFAULT_IMAGE_DIGEST)."""
    return re.search(r"DEFAULT_IMAGE_DIGEST=(sha256:[0-9a-f]{64})", tcb_info["app_compose"]).group(1)


def vector_expectation(tcb_info: dict, **overrides) -> dict:
    arguments = dict(
        dstack_version="0.5.4",
        key_provider_id=LOCAL_PROVIDER_ID,
        image_digests={"mpc-image-digest": launcher_digest(tcb_info)},
        machine_type="c3-standard-4",
    )
    return measure.expected_measurements(tcb_info["app_compose"].encode(), **(arguments | overrides))


@pytest.mark.parametrize("tcb_info", [LOCALNET, QUOTE_SET], ids=["localnet", "quote-set"])
def test_every_vector_event_digest_is_recomputed(tcb_info):
    for event in rtmr3_events(tcb_info):
        assert event["event_type"] == measure.RUNTIME_EVENT_TYPE
        digest = measure.event_digest(event["event"], bytes.fromhex(event["event_payload"]))
        assert digest.hex() == event["digest"], event["event"]


@pytest.mark.parametrize("tcb_info", [LOCALNET, QUOTE_SET], ids=["localnet", "quote-set"])
def test_replay_reaches_the_vector_rtmr3(tcb_info):
    digests = [bytes.fromhex(e["digest"]) for e in rtmr3_events(tcb_info)]
    assert measure.replay(digests).hex() == tcb_info["rtmr3"]
    assert measure.replay(digests[:-1]).hex() != tcb_info["rtmr3"]


def test_firmware_registers_replay_from_logged_digests():
    for index in range(3):
        digests = [bytes.fromhex(e["digest"]) for e in QUOTE_SET["event_log"] if e["imr"] == index]
        assert digests
        assert measure.replay(digests).hex() == QUOTE_SET[f"rtmr{index}"]


def test_replay_starts_from_zero_and_pads_short_digests():
    assert measure.replay([]) == bytes(48)
    short = b"\x01\x02"
    assert measure.replay([short]) == hashlib.sha384(bytes(48) + short.ljust(48, b"\0")).digest()


@given(st.lists(st.binary(min_size=48, max_size=48), max_size=6))
def test_replay_is_the_extend_chain(digests):
    register = bytes(48)
    for digest in digests:
        register = hashlib.sha384(register + digest).digest()
    assert measure.replay(digests) == register


@pytest.mark.parametrize("tcb_info", [LOCALNET, QUOTE_SET], ids=["localnet", "quote-set"])
def test_compose_hash_and_app_id_match_the_vector(tcb_info):
    events = {e["event"]: e["event_payload"] for e in rtmr3_events(tcb_info)}
    digest = measure.compose_hash(tcb_info["app_compose"].encode())
    assert digest == tcb_info["compose_hash"] == events["compose-hash"]
    assert measure.app_id_from_compose_hash(digest) == events["app-id"]


def test_payload_encoders_match_the_vector_bytes():
    events = {e["event"]: bytes.fromhex(e["event_payload"]) for e in rtmr3_events(LOCALNET)}
    assert measure.key_provider_payload("local-sgx", LOCAL_PROVIDER_ID) == events["key-provider"]
    assert measure.storage_fs_payload("zfs") == events["storage-fs"]
    assert measure.mpc_image_digest_payload(launcher_digest(LOCALNET)) == events["mpc-image-digest"]
    assert measure.key_provider_payload("none", "") == b'{"name":"none","id":""}'


@pytest.mark.parametrize("bad", ["sha256:abc", "sha512:" + "0" * 64, "g" * 64, ""])
def test_image_digests_must_be_sha256(bad):
    with pytest.raises(ValueError, match="not a sha256 digest"):
        measure.mpc_image_digest_payload(bad)


def test_storage_fs_rejects_what_dstack_rejects():
    assert measure.storage_fs_payload("ext4") == b"ext4"
    with pytest.raises(ValueError, match="zfs.*ext4"):
        measure.storage_fs_payload("btrfs")


def test_instance_id_is_seed_then_app_id():
    seed, app_id = bytes(range(20)), "ab" * 20
    expected = hashlib.sha256(seed + bytes.fromhex(app_id)).hexdigest()[:40]
    assert measure.instance_id(seed, app_id) == expected
    assert measure.instance_id(seed, "cd" * 20) != expected


def test_os_image_hash_is_the_hash_of_sha256sum_txt():
    text = f"{'a' * 64}  bzImage\n{'b' * 64}  initramfs.cpio.gz\n{'c' * 64}  metadata.json\n"
    assert measure.os_image_hash_from_sha256sum(text) == hashlib.sha256(text.encode()).hexdigest()
    assert measure.os_image_hash_from_sha256sum(text.encode()) == hashlib.sha256(text.encode()).hexdigest()
    assert measure.os_image_hash_from_sha256sum(text) != measure.os_image_hash_from_sha256sum(text.rstrip("\n"))


@pytest.mark.parametrize("text", ["", "not a checksum\n", f"{'a' * 63}  bzImage\n"])
def test_os_image_hash_rejects_other_text(text):
    with pytest.raises(ValueError, match="sha256sum.txt"):
        measure.os_image_hash_from_sha256sum(text)


@pytest.mark.parametrize("tcb_info", [LOCALNET, QUOTE_SET], ids=["localnet", "quote-set"])
def test_local_profile_predicts_the_vector_byte_for_byte(tcb_info):
    expected = vector_expectation(tcb_info)
    assert expected["profile"] == "dstack-os/0.5/local"
    logged = [{"event": e["event"], "payload": e["event_payload"], "digest": e["digest"]}
              for e in rtmr3_events(tcb_info)]
    assert expected["rtmr3_events"] == logged
    assert expected["rtmr3"] == tcb_info["rtmr3"]
    assert expected["key_provider"] == {"name": "local-sgx", "id": LOCAL_PROVIDER_ID}


def test_expected_measurements_shape():
    expected = vector_expectation(QUOTE_SET, os_image_hash=QUOTE_SET["os_image_hash"])
    assert list(expected) == ["kind", "profile", "app_id", "compose_hash", "os_image_hash", "key_provider",
                              "image_digests", "rtmr3_events", "rtmr3", "machine_type"]
    assert expected["kind"] == "dstack-app"
    assert re.fullmatch("[0-9a-f]{40}", expected["app_id"])
    assert re.fullmatch("[0-9a-f]{64}", expected["compose_hash"])
    assert expected["os_image_hash"] == QUOTE_SET["os_image_hash"]
    assert expected["image_digests"] == {"mpc-image-digest": launcher_digest(QUOTE_SET).removeprefix("sha256:")}
    assert expected["machine_type"] == "c3-standard-4"
    assert all(set(e) == {"event", "payload", "digest"} for e in expected["rtmr3_events"])
    assert json.loads(json.dumps(expected)) == expected


def test_order_of_v05_events_per_key_provider():
    def names(key_provider):
        return measure.measurement_profile("dstack-os", "0.5.11", key_provider).boot_events

    common_head = ("system-preparing", "app-id", "compose-hash", "instance-id", "boot-mr-done")
    common_tail = ("key-provider", "storage-fs", "system-ready")
    assert names("local") == names("none") == common_head + common_tail
    assert names("kms") == common_head + ("mr-kms", "os-image-hash") + common_tail
    assert measure.measurement_profile("dstack-os", "0.5.11", "kms").optional_events == {"mr-kms"}


def kms_compose(**fields) -> bytes:
    compose = {"manifest_version": 2, "name": "kms-app", "runner": "docker-compose",
               "docker_compose_file": "services: {}\n", "kms_enabled": True, "no_instance_id": False} | fields
    return json.dumps(compose, indent=4).encode()


def test_kms_profile_marks_values_only_the_boot_knows():
    expected = measure.expected_measurements(kms_compose(), dstack_version="0.5.11",
                                             os_image_hash=measure.PENDING_BUILD)
    events = {e["event"]: e for e in expected["rtmr3_events"]}
    assert expected["profile"] == "dstack-os/0.5/kms"
    assert expected["app_id"] == "known at boot"
    assert events["app-id"]["payload"] == events["app-id"]["digest"] == "known at boot"
    assert events["mr-kms"]["payload"] == "known at boot"
    assert events["instance-id"]["payload"] == "known at boot"
    assert events["os-image-hash"]["payload"] == "pending build"
    assert expected["os_image_hash"] == "pending build"
    assert expected["key_provider"] == {"name": "kms", "id": "known at boot"}
    assert expected["rtmr3"] == "known at boot"


def test_kms_profile_with_pinned_identity_predicts_app_and_instance_id():
    app_id, seed = "11" * 20, bytes(20)
    expected = measure.expected_measurements(kms_compose(), dstack_version="0.5.11", app_id=app_id,
                                             instance_id_seed=seed, key_provider_id="ab" * 8,
                                             os_image_hash="cd" * 32)
    events = {e["event"]: e["payload"] for e in expected["rtmr3_events"]}
    assert expected["app_id"] == events["app-id"] == app_id
    assert events["instance-id"] == measure.instance_id(seed, app_id)
    assert events["os-image-hash"] == "cd" * 32
    assert bytes.fromhex(events["key-provider"]) == b'{"name":"kms","id":"' + b"ab" * 8 + b'"}'


def test_instance_id_without_key_provider_is_random_per_boot():
    compose = kms_compose(kms_enabled=False)
    expected = measure.expected_measurements(compose, dstack_version="0.5.11", instance_id_seed=bytes(20))
    events = {e["event"]: e["payload"] for e in expected["rtmr3_events"]}
    assert expected["profile"] == "dstack-os/0.5/none"
    assert events["instance-id"] == "known at boot"
    assert events["key-provider"] == measure.key_provider_payload("none", "").hex()
    assert expected["rtmr3"] == "known at boot"
    fixed = measure.expected_measurements(kms_compose(kms_enabled=False, no_instance_id=True),
                                          dstack_version="0.5.11")
    assert re.fullmatch("[0-9a-f]{96}", fixed["rtmr3"])


def test_a_pending_image_leaves_rtmr3_pending():
    expected = vector_expectation(LOCALNET, image_digests={"mpc-image-digest": measure.PENDING_BUILD})
    assert expected["rtmr3_events"][-1] == {"event": "mpc-image-digest", "payload": "pending build",
                                            "digest": "pending build"}
    assert expected["rtmr3"] == "pending build"


def test_storage_fs_comes_from_the_compose():
    compose = kms_compose(kms_enabled=False, no_instance_id=True, storage_fs="ext4")
    events = measure.expected_measurements(compose, dstack_version="0.5.11")["rtmr3_events"]
    assert {"event": "storage-fs", "payload": b"ext4".hex()}.items() <= next(
        e for e in events if e["event"] == "storage-fs").items()


def test_overlay_nodes_have_no_dstack_events():
    profile = measure.measurement_profile("tplus-overlay")
    assert not profile.has_dstack_events and profile.boot_events == ()
    node = measure.overlay_measurements(os_image_hash="ab" * 32, machine_type="c3-standard-4")
    assert node["kind"] == "overlay-node" and node["profile"] == "tplus-overlay"
    assert node["rtmr3_events"] == [] and node["rtmr3"] is None and node["app_id"] is None


@pytest.mark.parametrize(
    ("recipe", "version", "provider", "message"),
    [
        ("meta-dstack", "0.5.11", "local", "no measurement profile for recipe 'meta-dstack'; known: dstack-os"),
        ("dstack-os", "0.6.0", "local", r"no measurement profile for dstack-os 0\.6\.0.*known: 0\.5"),
        ("dstack-os", "0.5.11", "tpm", "key provider 'tpm'.*known: kms, local, none"),
        ("dstack-os", "latest", "local", "not a version"),
        ("dstack-os", None, "local", "needs a dstack version"),
    ],
)
def test_unknown_profiles_are_refused_clearly(recipe, version, provider, message):
    with pytest.raises(measure.UnknownProfile, match=message):
        measure.measurement_profile(recipe, version, provider)


def test_profile_names_round_trip():
    for profile in measure.PROFILES.values():
        assert measure.profile_by_name(profile.name) is profile
    assert measure.profile_by_name("dstack-os/9.9/local") is None


def test_v2_event_logs_are_refused():
    compose = kms_compose(event_log_version=2)
    with pytest.raises(measure.UnknownProfile, match="event_log_version"):
        measure.expected_measurements(compose, dstack_version="0.5.11")


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"os_image_hash": "ABC"}, "os_image_hash"),
        ({"key_provider_id": "xyz"}, "key_provider_id"),
        ({"app_id": "1234"}, "app_id '1234' is not 40 lowercase hex"),
        ({"recipe": "tplus-overlay"}, "runs no dstack app"),
        ({"image_digests": {"other-digest": "sha256:" + "0" * 64}}, "no payload rule for app event 'other-digest'"),
    ],
)
def test_bad_expectation_inputs_are_named(arguments, message):
    with pytest.raises(ValueError, match=message):
        vector_expectation(LOCALNET, **arguments)


def test_non_json_compose_is_refused():
    with pytest.raises(ValueError, match="not JSON"):
        measure.expected_measurements(b"name: app\n", dstack_version="0.5.11")


@given(st.text(max_size=30), st.text(alphabet="0123456789abcdef", max_size=40))
def test_key_provider_payload_is_compact_json_name_first(name, provider_id):
    payload = measure.key_provider_payload(name, provider_id)
    assert list(json.loads(payload).items()) == [("name", name), ("id", provider_id)]
    encoded_name = json.dumps(name, ensure_ascii=False).encode()
    assert payload == b'{"name":' + encoded_name + b',"id":"' + provider_id.encode() + b'"}'


# -- the dstack OS 0.6.0.a2 ------------------------------------------------------------------------
# Source: Dstack-TEE/meta-dstack tag v0.6.0.a2 (commit 86be7d60252f82ff1c9c8ac2a083d0a2e08c7a9e) builds
# dstack-util from its `dstack` submodule, Dstack-TEE/dstack commit f1ba0a22a961e8bdae110c7b1a796bc56dfd10a8.
# Paths below are in that commit.

V06 = "0.6.0.a2"


def v06_compose(**fields) -> bytes:
    return kms_compose(**({"kms_enabled": False} | fields))


def test_v06a2_profiles_keep_the_v05_event_order():
    # dstack-util/src/system_setup.rs: measure_app_info emits system-preparing, app-id, compose-hash,
    # instance-id, boot-mr-done; request_app_keys_from_kms_url mr-kms (attested KMS cert only) and
    # os-image-hash; verify_app key-provider; setup_fs storage-fs, then system-ready. No init-script-hash.
    head = ("system-preparing", "app-id", "compose-hash", "instance-id", "boot-mr-done")
    tail = ("key-provider", "storage-fs", "system-ready")
    profiles = {kp: measure.measurement_profile("dstack-os", V06, kp) for kp in ("none", "local", "kms", "tpm")}
    for kp in ("none", "local", "tpm"):
        assert profiles[kp].boot_events == head + tail, kp
        assert profiles[kp].optional_events == frozenset()
    assert profiles["kms"].boot_events == head + ("mr-kms", "os-image-hash") + tail
    assert profiles["kms"].optional_events == {"mr-kms"}
    assert {kp: p.key_provider_name for kp, p in profiles.items()} == {
        "none": "none", "local": "local-sgx", "kms": "kms", "tpm": "tpm"}  # verify_app's KeyProviderInfo names
    assert all(p.instance_id_binds_platform and p.app_id_from_instance_info for p in profiles.values())
    assert {p.gcp_runtime_pcr for p in profiles.values()} == {14}  # dstack-attest attestation.rs tpm_runtime_pcr
    assert profiles["tpm"].name == "dstack-os/0.6.0.a2/tpm"
    assert measure.measurement_profile("dstack-os", "v0.6.0.a2", "kms") is profiles["kms"]
    v05 = measure.measurement_profile("dstack-os", "0.5.11", "none")
    assert not (v05.instance_id_binds_platform or v05.app_id_from_instance_info) and v05.gcp_runtime_pcr is None


@pytest.mark.parametrize(("version", "provider", "message"), [
    ("0.6.0", "none", r"dstack-os 0\.6\.0 \(series 0\.6\); known: 0\.5, 0\.6\.0\.a2"),
    ("0.6.0.a1", "none", r"dstack-os 0\.6\.0\.a1 .*known: 0\.5, 0\.6\.0\.a2"),
    ("0.6.1", "kms", "known: 0.5, 0.6.0.a2"),
    ("0.6.0.a2", "nitro", r"key provider 'nitro' on dstack-os 0\.6\.0\.a2; known: kms, local, none, tpm"),
    ("0.5.11", "tpm", r"key provider 'tpm' on dstack-os 0\.5; known: kms, local, none"),
])
def test_the_pre_release_profile_stands_only_for_itself(version, provider, message):
    with pytest.raises(measure.UnknownProfile, match=message):
        measure.measurement_profile("dstack-os", version, provider)


def test_v06a2_digest_is_v1_computed_by_hand():
    # cc-eventlog/src/runtime_events.rs (unchanged from v0.5.11): SHA384(type.to_ne_bytes() || ":" ||
    # event || ":" || payload), type 0x08000001, little-endian on TDX.
    preimage = bytes.fromhex("01000008" "3a" "73746f726167652d6673" "3a" "65787434")  # ":storage-fs:ext4"
    assert preimage == b"\x01\x00\x00\x08:storage-fs:ext4"
    digest = ("94eb1c817c35f570ca895b48b46e656e696d1a126581e70022f6f93a8c64d026"
              "ece224c6bffbe3bfdfe00bb3447adcd0")
    assert hashlib.sha384(preimage).hexdigest() == digest
    expected = measure.expected_measurements(v06_compose(no_instance_id=True, storage_fs="ext4"), dstack_version=V06)
    storage = next(e for e in expected["rtmr3_events"] if e["event"] == "storage-fs")
    assert storage == {"event": "storage-fs", "payload": "65787434", "digest": digest}
    # The same formula reproduces the NEAR vector's storage-fs digest (a 0.5.4 guest).
    logged = next(e for e in rtmr3_events(LOCALNET) if e["event"] == "storage-fs")
    assert measure.event_digest("storage-fs", b"zfs").hex() == logged["digest"]


def test_v06a2_without_instance_id_predicts_rtmr3_and_pcr14():
    compose = v06_compose(no_instance_id=True)
    expected = measure.expected_measurements(compose, dstack_version=V06)
    assert expected["profile"] == "dstack-os/0.6.0.a2/none"
    hash_hex = hashlib.sha256(compose).hexdigest()
    payloads = [("system-preparing", b""), ("app-id", bytes.fromhex(hash_hex[:40])),
                ("compose-hash", bytes.fromhex(hash_hex)), ("instance-id", b""), ("boot-mr-done", b""),
                ("key-provider", b'{"name":"none","id":""}'), ("storage-fs", b"zfs"), ("system-ready", b"")]
    assert [(e["event"], bytes.fromhex(e["payload"])) for e in expected["rtmr3_events"]] == payloads
    register = bytes(48)
    for name, payload in payloads:
        register = hashlib.sha384(register + hashlib.sha384(b"\x01\x00\x00\x08:" + name.encode() + b":" + payload)
                                  .digest()).digest()
    assert expected["rtmr3"] == register.hex()
    # dstack-attest/src/lib.rs emit_runtime_event: on GCP the sha256 digest of the same preimage also
    # extends vTPM PCR 14; dstack-attest/src/attestation.rs replays it from 32 zero bytes.
    pcr = bytes(32)
    for name, payload in payloads:
        pcr = hashlib.sha256(pcr + hashlib.sha256(b"\x01\x00\x00\x08:" + name.encode() + b":" + payload)
                             .digest()).digest()
    events = [measure.ExpectedEvent(name, payload) for name, payload in payloads]
    assert measure.expected_runtime_pcr(events) == pcr.hex()
    assert measure.expected_runtime_pcr(events[:-1]) != pcr.hex()
    assert measure.expected_runtime_pcr(events + [measure.ExpectedEvent("x", measure.PENDING_BUILD)]) == (
        "pending build")


def test_v06a2_instance_id_binds_the_gcp_vtpm_key():
    # system_setup.rs measure_app_info + platform_instance_binding: sha256(seed || app_id ||
    # sha256(AK TPMT_PUBLIC))[:20] on GCP. The AK lives in the VM's vTPM, so no seed makes it predictable.
    seed, app_id, ak_pub = bytes(range(20)), "ab" * 20, b"\x00\x23\x00\x0b" + bytes(60)
    binding = hashlib.sha256(ak_pub).digest()
    assert measure.gcp_instance_binding(ak_pub) == binding
    by_hand = hashlib.sha256(seed + bytes.fromhex(app_id) + binding).digest()[:20].hex()
    assert measure.instance_id(seed, app_id, binding) == by_hand != measure.instance_id(seed, app_id)
    with pytest.raises(ValueError, match="public area is empty"):
        measure.gcp_instance_binding(b"")
    pinned = dict(app_id="11" * 20, instance_id_seed=bytes(20), key_provider_id="ab" * 8, os_image_hash="cd" * 32)
    v05 = measure.expected_measurements(kms_compose(), dstack_version="0.5.11", **pinned)
    v06 = measure.expected_measurements(kms_compose(), dstack_version=V06, **pinned)
    instance = {e["event"]: e["payload"] for e in v06["rtmr3_events"]}["instance-id"]
    assert instance == "known at boot" and v06["rtmr3"] == "known at boot"
    assert {e["event"]: e["payload"] for e in v05["rtmr3_events"]}["instance-id"] == (
        measure.instance_id(bytes(20), "11" * 20))


def test_v06a2_emits_a_pinned_app_id_without_kms():
    # system_setup.rs measure_app_info emits instance_info.app_id in every mode (v0.5.11 emitted the
    # compose-derived value unless kms_enabled); docs/security/cvm-boundaries.md says the same.
    compose, pinned = v06_compose(no_instance_id=True), "22" * 20
    v06 = measure.expected_measurements(compose, dstack_version=V06, app_id=pinned)
    v05 = measure.expected_measurements(compose, dstack_version="0.5.11", app_id=pinned)
    derived = hashlib.sha256(compose).hexdigest()[:40]
    assert v06["app_id"] == {e["event"]: e["payload"] for e in v06["rtmr3_events"]}["app-id"] == pinned
    assert v05["app_id"] == {e["event"]: e["payload"] for e in v05["rtmr3_events"]}["app-id"] == derived
    unpinned = measure.expected_measurements(compose, dstack_version=V06)
    assert unpinned["app_id"] == derived and unpinned["rtmr3"] != v06["rtmr3"]


def test_v06a2_tpm_provider_id_is_known_only_at_boot():
    # system_setup.rs verify_app: KeyProviderInfo("tpm", hex(pubkey)), the app key derived from a seed
    # generate_tpm_app_keys seals in the vTPM; dstack-types/src/lib.rs reads `"key_provider": "tpm"`.
    compose = v06_compose(key_provider="tpm")
    expected = measure.expected_measurements(compose, dstack_version=V06)
    events = {e["event"]: e["payload"] for e in expected["rtmr3_events"]}
    assert expected["profile"] == "dstack-os/0.6.0.a2/tpm"
    assert expected["key_provider"] == {"name": "tpm", "id": "known at boot"}
    assert events["key-provider"] == events["instance-id"] == "known at boot"
    assert "os-image-hash" not in events and "mr-kms" not in events
    known = measure.expected_measurements(compose, dstack_version=V06, key_provider_id="3059" + "00" * 4)
    assert bytes.fromhex(next(e["payload"] for e in known["rtmr3_events"] if e["event"] == "key-provider")) == (
        b'{"name":"tpm","id":"305900000000"}')
    with pytest.raises(measure.UnknownProfile, match="key provider 'tpm'"):
        measure.expected_measurements(compose, dstack_version="0.5.11")


def test_v06a2_refuses_v2_event_logs_it_would_not_write():
    # dstack-types/src/lib.rs AppCompose has no event_log_version: the guest logs v1 whatever it says.
    with pytest.raises(measure.UnknownProfile, match="event_log_version 2.*0.6.0.a2 ignore the field"):
        measure.expected_measurements(v06_compose(event_log_version=2), dstack_version=V06)
    explicit_v1 = measure.expected_measurements(v06_compose(event_log_version=1, no_instance_id=True),
                                                dstack_version=V06)
    assert re.fullmatch("[0-9a-f]{96}", explicit_v1["rtmr3"])
