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
        dstack_version="0.5.8",  # NEAR's vectors log storage-fs, which dstack emits from v0.5.5 on
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
    assert expected["profile"] == "dstack-os/0.5.6-0.5.11/local"
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
    compose = kms_compose()
    expected = measure.expected_measurements(compose, dstack_version="0.5.11",
                                             os_image_hash=measure.PENDING_BUILD)
    events = {e["event"]: e for e in expected["rtmr3_events"]}
    assert expected["profile"] == "dstack-os/0.5.6-0.5.11/kms"
    # v0.5.11 system_setup.rs measure_app_info: a KMS app emits .instance_info's app_id, which the
    # guest fills with the truncated compose hash when the deployment leaves it empty.
    derived = hashlib.sha256(compose).hexdigest()[:40]
    assert expected["app_id"] == events["app-id"]["payload"] == derived
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
    assert expected["profile"] == "dstack-os/0.5.6-0.5.11/none"
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
        ("dstack-os", "0.6.0", "local", r"no measurement profile for dstack-os 0\.6\.0; known releases: 0\.5\.0.*"
                                        r"0\.5\.11, 0\.6\.0\.a2\."),
        ("dstack-os", "0.5.11", "tpm", "key provider 'tpm'.*known: kms, local, none"),
        ("dstack-os", "latest", "local", "no measurement profile for dstack-os latest; known releases"),
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
    ("0.6.0", "none", r"dstack-os 0\.6\.0; known releases: .*0\.6\.0\.a2\."),
    ("0.6.0.a1", "none", r"dstack-os 0\.6\.0\.a1; known releases: .*0\.6\.0\.a2\."),
    ("0.6.1", "kms", r"known releases: .*0\.5\.11, 0\.6\.0\.a2\."),
    ("0.5.12", "none", r"no measurement profile for dstack-os 0\.5\.12; known releases"),
    ("0.6.0.a2", "nitro", r"key provider 'nitro' on dstack-os 0\.6\.0\.a2; known: kms, local, none, tpm"),
    ("0.5.11", "tpm", r"key provider 'tpm' on dstack-os 0\.5\.6-0\.5\.11; known: kms, local, none"),
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


# -- profiles per release, each replaying real vectors ---------------------------------------------

def _vector_events(name: str) -> tuple[list[dict], str]:
    """(RTMR3 events, the RTMR3 they replay to) of a vector file under tests/vectors."""
    document = json.loads((VECTORS / name).read_text())
    if "quote" in document:  # a guest agent GetQuote response: RTMR3 from the TD report in the quote
        quote = bytes.fromhex(document["quote"])
        events = json.loads(document["event_log"])
        # TDX quote v4: 48-byte header, then the TD report; RTMR3 is its 10th 48-byte register field
        return [e for e in events if e["imr"] == 3], quote[520:568].hex()
    return [e for e in document["event_log"] if e["imr"] == 3], document["rtmr3"]


def _profile_replay(profile: measure.MeasurementProfile, logged: list[dict]) -> str:
    """Replay the profile's prediction for the vector's app, taking from the log only what the profile
    itself says a booted guest alone knows (its markers) and the inputs a deployment supplies."""
    payloads = {e["event"]: e["event_payload"] for e in logged}
    compose_hash = payloads["compose-hash"]
    provider = json.loads(bytes.fromhex(payloads["key-provider"]))
    app_events = [e for e in logged[[e["event"] for e in logged].index("system-ready") + 1:]]
    events = measure.expected_events(
        profile, compose_hash_hex=compose_hash, app_id=None, no_instance_id=payloads["instance-id"] == "",
        key_provider_id=provider["id"], storage_fs=bytes.fromhex(payloads["storage-fs"]).decode(),
        os_image_hash=payloads.get("os-image-hash"),
        image_digests={e["event"]: "sha256:" + e["event_payload"] for e in app_events})
    digests = []
    for event in events:
        payload = event.payload
        if isinstance(payload, str):  # known at boot: the vector's value
            if event.event not in payloads:
                continue  # an optional event (mr-kms) this boot did not emit
            payload = bytes.fromhex(payloads[event.event])
        digests.append(measure.event_digest(event.event, payload))
    return measure.replay(digests).hex()


@pytest.mark.parametrize("release", measure.GUEST_RELEASES, ids=lambda r: r.name)
def test_every_release_names_its_source_commit_and_a_vector_or_why_not(release):
    assert re.fullmatch(r"Dstack-TEE/dstack@[0-9a-f]{40}:dstack-util/src/system_setup\.rs.*", release.source)
    assert release.vectors or release.no_vector
    for name in release.vectors:
        assert (VECTORS / name).is_file(), name
    for provider in release.key_providers:
        assert measure.measurement_profile("dstack-os", release.releases[-1], provider).source == release.source


@pytest.mark.parametrize(("release", "vector"), [(r, v) for r in measure.GUEST_RELEASES for v in r.vectors],
                         ids=lambda x: getattr(x, "name", x))
def test_each_profile_replays_its_vectors(release, vector):
    logged, rtmr3 = _vector_events(vector)
    name = json.loads(bytes.fromhex(next(e["event_payload"] for e in logged if e["event"] == "key-provider")))["name"]
    provider = {"local-sgx": "local"}.get(name, name)
    profile = measure.measurement_profile("dstack-os", release.releases[-1], provider)
    assert [e["event"] for e in logged if e["event"] in profile.boot_events] == [
        e for e in profile.boot_events if e in {x["event"] for x in logged}]
    assert _profile_replay(profile, logged) == rtmr3


@pytest.mark.parametrize("vector", ["near-mpc-tcb-info.json", "near-mpc-os-0.5.8/tcb_info.prod.json"])
def test_a_drifted_profile_fails_the_replay(vector):
    # dstack v0.5.1-v0.5.4 emit no storage-fs (v0.5.5 7bf1843a added it): their profile must not pass
    # for a guest that logs it, which the old single "0.5" series profile did.
    logged, rtmr3 = _vector_events(vector)
    old = measure.measurement_profile("dstack-os", "0.5.4", "local")
    assert "storage-fs" not in old.boot_events
    assert _profile_replay(old, logged) != rtmr3
    assert _profile_replay(measure.measurement_profile("dstack-os", "0.5.8", "local"), logged) == rtmr3


def test_the_0_6_0_vector_logs_the_vm_config_it_sent_its_kms():
    # Dstack-TEE/dstack 02bb2476 captured the fixture with vm_config.os_image_hash 07a2388c…; 53defce6
    # later edited the file's vm_config (to e6f5cfec…, sha256 of its checksum_file) but not its log.
    document = json.loads((VECTORS / "dstack-0.6.0-tdx-lite" / "tdx-lite-getquote.json").read_text())
    logged, _ = _vector_events("dstack-0.6.0-tdx-lite/tdx-lite-getquote.json")
    event = next(e["event_payload"] for e in logged if e["event"] == "os-image-hash")
    captured = "07a2388c7a6a1b6a646d443f1517990a4ec294471d63146cda9d56972765051d"
    assert event == captured != json.loads(document["vm_config"])["os_image_hash"]
    release = measure.guest_release("0.6.0.a2")
    assert measure.os_image_hash_event_payload(release, captured) == captured
    assert measure.os_image_hash_event_payload(measure.guest_release("0.5.0"), captured) is None
    assert [e["event"] for e in logged] == list(
        measure.measurement_profile("dstack-os", "0.6.0.a2", "kms").boot_events[:5]) + [
        "os-image-hash", "key-provider", "storage-fs", "system-ready"]  # mr-kms is optional


def test_releases_split_where_the_source_changes():
    def events(version):
        return measure.measurement_profile("dstack-os", version, "kms").boot_events
    assert "os-image-hash" not in events("0.5.0") and "storage-fs" not in events("0.5.0")  # v0.5.0 ce6e88d0
    assert "os-image-hash" in events("0.5.1") and "storage-fs" not in events("0.5.4")
    assert "storage-fs" in events("0.5.5") and events("0.5.5") == events("0.5.11") == events("0.6.0.a2")
    # v0.5.0-v0.5.5 emit .instance_info's app_id (bailing without a KMS when it is not the compose-derived
    # value); v0.5.6-v0.5.11 force the compose-derived value without a KMS; 0.6.0.a2 emits it in every mode.
    assert measure.guest_release("0.5.5").app_id_event == "instance-info"
    assert measure.guest_release("0.5.6").app_id_event == "compose-unless-kms"
    assert measure.guest_release("0.6.0.a2").app_id_event == "instance-info"
    assert measure.guest_release("0.6.0") is None and measure.guest_release("v0.5.11").name == "0.5.6-0.5.11"


def test_emit_event_exists_from_0_5_0_to_the_pinned_0_6_0_a2():
    # guest-agent/rpc/proto/agent_rpc.proto: EmitEvent added in f672c731 (2025-04-28), in v0.5.0 and
    # f1ba0a22 (0.6.0.a2); removed by 10898e63 (2026-07-11, #768), which no release here contains.
    assert "f672c731" in measure.EMIT_EVENT_SOURCE and "10898e63" in measure.EMIT_EVENT_SOURCE
    assert "2026-07-11" in measure.UPSTREAM_DRIFT["EmitEvent removed"]
    problem = measure.emit_event_problem("0.4.2")
    assert problem and "no EmitEvent" in problem and "0.5.0 or later" in problem
    assert all(measure.emit_event_problem(v) is None for r in measure.GUEST_RELEASES for v in r.releases)


def test_gce_vm_config_carries_the_uki_authenticode_hash():
    # Dstack-TEE/dstack f1ba0a22 verifier/src/verification.rs verify_os_image_hash_for_gcp_tdx compares
    # vm_config.os_image_hash with PCR 2's UKI event digest ("Event 28").
    a2, v05 = measure.guest_release("0.6.0.a2"), measure.guest_release("0.5.11")
    digest, uki = "aa" * 32, "bb" * 32
    assert measure.vm_config_os_image_hash(a2, target="gce", digest_txt=digest, uki_hash=uki) == uki
    assert measure.vm_config_os_image_hash(a2, target="vmm", digest_txt=digest, uki_hash=uki) == digest
    assert measure.vm_config_os_image_hash(v05, target="gce", digest_txt=digest, uki_hash=uki) == digest
    expected = measure.expected_measurements(kms_compose(), dstack_version="0.6.0.a2", os_image_hash=uki)
    events = {e["event"]: e["payload"] for e in expected["rtmr3_events"]}
    assert expected["os_image_hash"] == events["os-image-hash"] == uki


def test_storage_fs_falls_back_to_the_kernel_command_line():
    # f1ba0a22 system_setup.rs parse_dstack_options: dstack.storage_fs= on the command line, then
    # app-compose's storage_fs wins, default zfs.
    def fs(compose, cmdline=None):
        expected = measure.expected_measurements(compose, dstack_version="0.6.0.a2", cmdline_storage_fs=cmdline)
        return bytes.fromhex(next(e["payload"] for e in expected["rtmr3_events"] if e["event"] == "storage-fs"))
    plain = kms_compose(kms_enabled=False, no_instance_id=True)
    assert fs(plain) == b"zfs" and fs(plain, "ext4") == b"ext4"
    assert fs(kms_compose(kms_enabled=False, no_instance_id=True, storage_fs="zfs"), "ext4") == b"zfs"
