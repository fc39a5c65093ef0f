"""Compose text and app-compose.json bytes: the NEAR vector byte for byte, vmm-cli field sets per
dstack release, the pinned YAML emitter and its golden files, the NEAR launcher, kettle and mkosi.

``python -m tests.test_compose`` rewrites the golden files under ``tests/golden/compose/``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from dstack_sdk import get_compose_hash
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from ruamel.yaml import YAML

from fleet.attest import measure
from fleet.apps.compose import (
    KNOWN_DSTACK_RELEASES,
    MIB,
    NEAR_LAUNCHERS,
    AppComposeSettings,
    ComposeError,
    ComposeSpec,
    KeyProvider,
    KettleManifest,
    MpcUpgradeKind,
    NearLauncher,
    Serialization,
    ServiceSpec,
    app_compose_fields,
    build_app_compose,
    classify_mpc_upgrade,
    compose_document,
    dump_yaml,
    kettle_app,
    kettle_pre_launch_script,
    near_launcher_compose,
    near_user_config,
    parse_compose,
    parse_near_user_config,
    render_compose,
)
from fleet.apps.imageref import DigestKind, ImageDigest, parse_image_ref

ROOT = Path(__file__).resolve().parent.parent
VECTORS = ROOT / "tests" / "vectors"
GOLDEN = ROOT / "tests" / "golden" / "compose"
# The launcher compose of near/mpc commit 45424d4cf, extracted byte for byte from the
# `docker_compose_file` field of near-mpc-tcb-info.json's `app_compose`; it is the user compose
# taken verbatim.
NEAR_COMPOSE_FIXTURE = VECTORS / "near-mpc-launcher-compose.yaml"

DIGEST_A = "sha256:" + hashlib.sha256(b"image a").hexdigest()
DIGEST_B = "sha256:" + hashlib.sha256(b"image b").hexdigest()
# A stand-in manifest digest for the mkosi app: the real one comes from the registry at push time.
MKOSI_MANIFEST_DIGEST = "sha256:" + hashlib.sha256(b"simple-mkosi-app manifest stand-in").hexdigest()
# Seed 004: the image as pushed, tagged with the sha256 of the mkosi tar (not a registry digest).
MKOSI_SEED_IMAGE = ("docker.io/socrates1024/simple-mkosi-app:"
                    "75d2b9a8612f8f5ee08163b30cd8c9c3f8708c1026da621d0636bd98899db5e6")
MKOSI_SEED_COMPOSE = """\
services:
  simple-mkosi-app:
    image: docker.io/socrates1024/simple-mkosi-app:75d2b9a8612f8f5ee08163b30cd8c9c3f8708c1026da621d0636bd98899db5e6
    ports:
      - "3000:3000"
    restart: "no"
    working_dir: /opt/app
    command: ["/usr/bin/node", "/opt/app/server.js"]
"""
KETTLE_MANIFEST_BYTES = json.dumps({
    "app": "https://gist.githubusercontent.com/raykyri/0123456789abcdef/raw/app.ts",
    "sha256": hashlib.sha256(b"export default {}\n").hexdigest(),
}).encode()


@pytest.fixture(scope="module")
def vector() -> dict:
    return json.loads((VECTORS / "near-mpc-tcb-info.json").read_text())


def near_settings(docker_compose_file: str, name: str) -> AppComposeSettings:
    """What NEAR's deploy-launcher.sh passes to `vmm-cli.py compose` with the local-sgx provider:
    --local-key-provider --public-logs --public-sysinfo --no-instance-id."""
    return AppComposeSettings(
        name=name,
        docker_compose_file=docker_compose_file,
        key_provider=KeyProvider.LOCAL,
        public_logs=True,
        public_sysinfo=True,
        no_instance_id=True,
    )


def vector_event(vector: dict, name: str) -> str:
    return next(e["event_payload"] for e in vector["event_log"] if e["event"] == name)


# -- the NEAR vector -------------------------------------------------------------------------------

def test_fixture_is_the_vector_compose(vector):
    assert NEAR_COMPOSE_FIXTURE.read_bytes().decode() == json.loads(vector["app_compose"])["docker_compose_file"]


def test_near_vector_rebuilt_byte_for_byte(vector):
    compose_text = NEAR_COMPOSE_FIXTURE.read_bytes().decode("utf-8")
    app = build_app_compose(near_settings(compose_text, "mpc-localnet-one-node-1774945636"),
                            dstack_version="0.5.11", serialization=Serialization.VMM_CLI)
    assert app.data == vector["app_compose"].encode("utf-8")
    assert app.compose_hash == vector["compose_hash"] == vector_event(vector, "compose-hash")
    assert app.compose_hash.startswith("cb9b2d62")
    assert app.app_id == "cb9b2d6204f5e44238b75f69e3a3069550734c0d" == vector_event(vector, "app-id")


def test_near_vector_matches_vmm_cli_from_0_5_4_only(vector):
    """secure_time false and key_provider_id "" date the bytes: vmm-cli 0.5.0-0.5.3 always wrote
    secure_time true and 0.5.1-0.5.3 wrote key_provider_id null; 0.4.2 wrote neither field."""
    settings = near_settings(NEAR_COMPOSE_FIXTURE.read_text(), "mpc-localnet-one-node-1774945636")
    matching = []
    for version in KNOWN_DSTACK_RELEASES:
        try:
            data = build_app_compose(settings, dstack_version=version).data
        except ComposeError as exc:
            assert [p for p, _ in exc.problems] == ["secure_time"]
            continue
        if data == vector["app_compose"].encode():
            matching.append(version)
    assert matching == [v for v in KNOWN_DSTACK_RELEASES if tuple(map(int, v.split("."))) >= (0, 5, 4)]


def test_near_vector_normalized_form_is_what_the_sdk_hashes(vector):
    settings = near_settings(NEAR_COMPOSE_FIXTURE.read_text(), "mpc-localnet-one-node-1774945636")
    normalized = build_app_compose(settings, dstack_version="0.5.11", serialization=Serialization.NORMALIZED)
    assert normalized.compose_hash == get_compose_hash(json.loads(vector["app_compose"]))
    assert normalized.compose_hash != vector["compose_hash"], "the VMM hashes vmm-cli's bytes, not the normal form"
    assert json.loads(normalized.data) == json.loads(vector["app_compose"])


def test_near_compose_is_pinned_and_carries_the_measured_launcher_settings():
    compose = parse_compose(NEAR_COMPOSE_FIXTURE.read_text())
    assert [(path, str(ref)) for path, ref in compose.images] == [
        ("services.launcher.image",
         "nearone/mpc-launcher@sha256:1f54b55bad22c45067228a9262bc6377e393ca1a07edb64e691e80704f49b74e")]
    environment = compose.environment("launcher")
    assert environment["DOCKER_CONTENT_TRUST"] == "1"
    assert environment["PLATFORM"] == "TEE"
    assert ImageDigest.parse(environment["DEFAULT_IMAGE_DIGEST"], DigestKind.MANIFEST).hex == (
        "6a5700fccbb3facddd1f3934f4976c4dcefc176c4aac28cd2fd035984b368980")
    assert compose.text == NEAR_COMPOSE_FIXTURE.read_text()


def test_near_launcher_generator_gives_the_vector_configuration(vector):
    fixture = parse_compose(NEAR_COMPOSE_FIXTURE.read_text())
    environment = fixture.environment("launcher")
    spec = near_launcher_compose(
        fixture.images[0][1],
        ImageDigest.parse(environment["DEFAULT_IMAGE_DIGEST"], DigestKind.MANIFEST),
        launcher=NearLauncher.RUST,
    )
    text = render_compose(spec)
    expected = dict(fixture.document)
    expected.pop("version")  # obsolete in compose v2
    assert yaml.safe_load(text) == expected
    # Same settings, other bytes: a node registering with NEAR's contract must use the contract's
    # template text verbatim, because the contract hashes the compose bytes.
    assert text != fixture.text
    assert parse_compose(text).environment("launcher") == environment


def test_near_launcher_generator_requires_the_digest_kind_the_launcher_compares():
    launcher = parse_image_ref(f"nearone/mpc-launcher@{DIGEST_A}")
    manifest = ImageDigest.parse(DIGEST_B, DigestKind.MANIFEST)
    image_id = ImageDigest.parse(DIGEST_B, DigestKind.IMAGE_ID)
    assert NEAR_LAUNCHERS[NearLauncher.PYTHON].compares is DigestKind.IMAGE_ID
    assert NEAR_LAUNCHERS[NearLauncher.RUST].compares is DigestKind.MANIFEST
    with pytest.raises(ComposeError, match="docker image inspect"):
        near_launcher_compose(launcher, manifest, launcher=NearLauncher.PYTHON)
    with pytest.raises(ComposeError, match="docker pull"):
        near_launcher_compose(launcher, image_id, launcher=NearLauncher.RUST)
    python = compose_document(near_launcher_compose(launcher, image_id, launcher=NearLauncher.PYTHON))
    assert f"DEFAULT_IMAGE_DIGEST={DIGEST_B}" in python["services"]["launcher"]["environment"]
    with pytest.raises(ComposeError, match="tag"):
        near_launcher_compose(parse_image_ref("nearone/mpc-launcher:latest"), image_id)


# -- app-compose field sets --------------------------------------------------------------------------

def simple_compose(image: str = f"nginx@{DIGEST_A}") -> str:
    return f"services:\n  web:\n    image: {image}\n"


def test_field_order_of_vmm_cli_0_5_11_with_every_option():
    settings = AppComposeSettings(
        name="app", docker_compose_file=simple_compose(), key_provider=KeyProvider.KMS, key_provider_id="ab12",
        write_key_provider=True, allowed_envs=("API_KEY",), pre_launch_script="echo ready", swap_size=4096 * MIB,
        public_tcbinfo=False, init_script="true", storage_fs="ext4",
    )
    fields = app_compose_fields(settings, "0.5.11")
    assert list(fields) == [
        "manifest_version", "name", "runner", "docker_compose_file", "kms_enabled", "gateway_enabled",
        "local_key_provider_enabled", "key_provider_id", "public_logs", "public_sysinfo", "allowed_envs",
        "no_instance_id", "secure_time", "key_provider", "pre_launch_script", "swap_size",
        "public_tcbinfo", "init_script", "storage_fs",
    ]
    assert (fields["kms_enabled"], fields["local_key_provider_enabled"], fields["key_provider"]) == (True, False, "kms")
    assert fields["swap_size"] == 4294967296 and fields["allowed_envs"] == ["API_KEY"]


def test_unset_fields_stay_absent_and_change_the_hash_when_set():
    base = AppComposeSettings(name="app", docker_compose_file=simple_compose())
    fields = app_compose_fields(base, "0.5.11")
    for absent in ("key_provider", "pre_launch_script", "swap_size", "public_tcbinfo", "init_script", "storage_fs"):
        assert absent not in fields
    hashes = {build_app_compose(base, dstack_version="0.5.11").compose_hash}
    for change in ({"public_tcbinfo": True}, {"storage_fs": "zfs"}, {"swap_size": MIB}, {"write_key_provider": True}):
        settings = AppComposeSettings(name="app", docker_compose_file=simple_compose(), **change)
        hashes.add(build_app_compose(settings, dstack_version="0.5.11").compose_hash)
    assert len(hashes) == 5, "each field, even at the guest's default value, is part of the hashed bytes"


@pytest.mark.parametrize("change,version,field", [
    ({"write_key_provider": True}, "0.5.5", "write_key_provider"),
    ({"swap_size": MIB}, "0.5.4", "swap_size"),
    ({"storage_fs": "ext4"}, "0.5.4", "storage_fs"),
    ({"init_script": "true"}, "0.5.4", "init_script"),
    ({"public_tcbinfo": True}, "0.5.0", "public_tcbinfo"),
    ({"pre_launch_script": "true"}, "0.5.0", "pre_launch_script"),
    ({"key_provider": KeyProvider.LOCAL, "key_provider_id": "ab"}, "0.4.2", "key_provider_id"),
    ({"secure_time": True}, "0.4.2", "secure_time"),
    ({"secure_time": False}, "0.5.3", "secure_time"),
])
def test_settings_a_release_cannot_express_are_refused(change, version, field):
    settings = AppComposeSettings(name="app", docker_compose_file=simple_compose(), **change)
    with pytest.raises(ComposeError) as info:
        app_compose_fields(settings, version)
    assert field in [p for p, _ in info.value.problems]
    assert version in str(info.value)


def test_older_releases_write_their_own_quirks():
    settings = AppComposeSettings(name="café", docker_compose_file=simple_compose(), secure_time=True)
    assert app_compose_fields(settings, "0.5.2")["key_provider_id"] is None
    assert app_compose_fields(settings, "0.5.4")["key_provider_id"] == ""
    assert "key_provider_id" not in app_compose_fields(
        AppComposeSettings(name="café", docker_compose_file=simple_compose()), "0.4.2")
    assert b'"caf\\u00e9"' in build_app_compose(settings, dstack_version="0.5.1").data
    assert '"café"'.encode() in build_app_compose(settings, dstack_version="0.5.2").data


def test_unknown_release_is_refused():
    with pytest.raises(ComposeError, match="0.5.11"):
        app_compose_fields(AppComposeSettings(name="app", docker_compose_file=simple_compose()), "0.6.0")


def test_every_settings_problem_is_reported_at_once_with_its_path():
    settings = AppComposeSettings(
        name="", docker_compose_file=simple_compose("nginx:latest"), key_provider=KeyProvider.NONE,
        key_provider_id="zz", allowed_envs=("OK", "not valid"), pre_launch_script="echo hi\n", swap_size=1000,
        storage_fs="btrfs", runner="bash",
    )
    with pytest.raises(ComposeError) as info:
        build_app_compose(settings, dstack_version="0.5.11")
    paths = [p for p, _ in info.value.problems]
    assert set(paths) == {"name", "runner", "key_provider_id", "allowed_envs", "allowed_envs[1]",
                          "pre_launch_script", "storage_fs", "swap_size", "docker_compose_file.services.web.image"}
    messages = dict(info.value.problems)
    assert "kms" in messages["allowed_envs"]
    assert "strip" in messages["pre_launch_script"]
    lines = info.value.as_problems("stacks/Pulumi.dev.yaml", "dstack-fleet:apps[0]")
    assert str(lines[0]).startswith("stacks/Pulumi.dev.yaml: dstack-fleet:apps[0].")


def test_kms_app_id_without_a_pinned_id_is_the_compose_hash_prefix_too():
    # Dstack-TEE/dstack v0.5.11 (40eaf35e) dstack-util/src/system_setup.rs measure_app_info: an empty
    # .instance_info app_id becomes the truncated compose hash before the KMS path reads it.
    settings = AppComposeSettings(name="app", docker_compose_file=simple_compose(), key_provider=KeyProvider.KMS,
                                  allowed_envs=("TOKEN",))
    app = build_app_compose(settings, dstack_version="0.5.11")
    assert app.app_id == measure.compose_hash(app.data)[:40]
    local = build_app_compose(AppComposeSettings(name="app", docker_compose_file=simple_compose()),
                              dstack_version="0.5.11")
    assert local.app_id == measure.compose_hash(local.data)[:40]


@given(
    name=st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=20),
    compose_extra=st.text(st.characters(blacklist_categories=("Cs",)), max_size=30),
    key_provider=st.sampled_from(list(KeyProvider)),
    flags=st.lists(st.booleans(), min_size=6, max_size=6),
    script=st.none() | st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=30),
)
@settings(max_examples=60, deadline=None)
def test_normalized_bytes_hash_like_the_dstack_sdk(name, compose_extra, key_provider, flags, script):
    compose_text = simple_compose() + "# " + compose_extra.replace("\r", " ").replace("\n", " ") + "\n"
    script = script.strip() or None if script else None
    settings = AppComposeSettings(
        name=name, docker_compose_file=compose_text, key_provider=key_provider, write_key_provider=flags[0],
        gateway_enabled=flags[1], public_logs=flags[2], public_sysinfo=flags[3], no_instance_id=flags[4],
        secure_time=flags[5], pre_launch_script=script, public_tcbinfo=flags[0], swap_size=MIB if flags[1] else 0,
    )
    try:
        normalized = build_app_compose(settings, dstack_version="0.5.11", serialization=Serialization.NORMALIZED)
    except ComposeError as exc:
        # e.g. a comment that breaks the YAML: refused with one-line problems, never a traceback;
        # rejected as an example, so hypothesis's health check fails the test if most examples are
        assert exc.problems and all("\n" not in message for _, message in exc.problems)
        assume(False)
    vmm_cli = build_app_compose(settings, dstack_version="0.5.11")
    assert normalized.compose_hash == get_compose_hash(dict(normalized.fields))
    assert json.loads(vmm_cli.data) == json.loads(normalized.data) == dict(normalized.fields)


# -- user compose, verbatim ------------------------------------------------------------------------

BAD_COMPOSES = [
    ("services:\n  app:\n    build: .\n", {"services.app.build"}),
    (f"services:\n  app:\n    build: .\n    image: app@{DIGEST_A}\n", {"services.app.build"}),
    ("services:\n  app:\n    command: [sleep, '1']\n", {"services.app.image"}),
    ("services:\n  app:\n    image: ${IMAGE}\n", {"services.app.image"}),
    (f"services:\n  app:\n    image: app@sha256:${{DIGEST}}\n", {"services.app.image"}),
    ("services:\n  app:\n    image: nginx:1.25\n", {"services.app.image"}),
    ("services:\n  app:\n    image: registry:5000/app\n", {"services.app.image"}),
    (f"services:\n  app:\n    image: app@{DIGEST_A.upper().replace('SHA256', 'sha256')}\n", {"services.app.image"}),
    ("services:\n  app:\n    image: 12\n", {"services.app.image"}),
    ("services:\n  app: just-a-string\n", {"services.app"}),
    (f"include:\n  - other.yaml\nservices:\n  app:\n    image: app@{DIGEST_A}\n", {"include"}),
    (f"services:\n  app:\n    image: app@{DIGEST_A}\n    extends:\n      file: base.yaml\n      service: b\n",
     {"services.app.extends.file"}),
    # PyYAML would keep the second value silently; both the duplicate and that value are reported
    (f"services:\n  app:\n    image: app@{DIGEST_A}\n    image: nginx:latest\n", {"", "services.app.image"}),
    ("services:\n  app:\n    image: \"a\x08\"\n", {""}),
    ("volumes: {}\n", {"services"}),
    ("- a\n- b\n", {""}),
    ("services:\n  app:\n    image: [unclosed\n", {""}),
    ("services:\n  app: !reset null\n", {""}),
]


@pytest.mark.parametrize("text,paths", BAD_COMPOSES)
def test_bad_user_compose_is_refused_with_paths(text, paths):
    with pytest.raises(ComposeError) as info:
        parse_compose(text)
    assert {p for p, _ in info.value.problems} == paths


def test_all_compose_problems_at_once_with_fixes():
    text = ("services:\n"
            "  a:\n    build: ./a\n"
            "  b:\n    image: ${B_IMAGE}\n"
            "  c:\n    image: c:latest\n"
            f"  d:\n    image: d@{DIGEST_A}\n")
    with pytest.raises(ComposeError) as info:
        parse_compose(text)
    messages = dict(info.value.problems)
    assert set(messages) == {"services.a.build", "services.b.image", "services.c.image"}
    assert "--build" in messages["services.a.build"] and "push" in messages["services.a.build"]
    assert "literally" in messages["services.b.image"]
    assert "@sha256:<64 hex>" in messages["services.c.image"]
    assert str(info.value).splitlines()[0].startswith("services.a.build: ")


def test_user_compose_is_kept_verbatim():
    text = f"# comment kept\nservices:\n  web:   # odd spacing kept\n    image: 'web@{DIGEST_A}'\n    environment:\n      N: 1\n      T: true\n      E:\n"
    compose = parse_compose(text)
    assert compose.text is text
    assert compose.environment("web") == {"N": "1", "T": "true", "E": None}
    settings = AppComposeSettings(name="app", docker_compose_file=text)
    assert json.loads(build_app_compose(settings, dstack_version="0.5.11").data)["docker_compose_file"] == text


# -- the pinned emitter ----------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["3000:3000", "22:22", "no", "No", "off", "on", "yes", "y", "n", "true", "null",
                                   "~", "", "1.0", "1e3", "0o17", "0x1f", "1_000", ".inf", "2001-12-14", "=", "<<",
                                   "-", "- a", "a: b", "a #b", "#x", "*alias", "&anchor", "!tag", "%x", "@x", "`x",
                                   "a:", " a", "a ", "{a}", "[a]", "'", '"', "|", ">", "é", "a\nb", "a\\b", "${VAR}"])
def test_values_yaml_would_reinterpret_are_double_quoted(value):
    text = dump_yaml({"k": value})
    assert text.startswith('k: "'), text
    assert yaml.safe_load(text) == {"k": value}
    assert YAML(typ="safe", pure=True).load(text) == {"k": value}


@pytest.mark.parametrize("value", ["/opt/app", "no-new-privileges:true", "KEY=value", "nginx@" + DIGEST_A,
                                   "/tapp:/tapp:ro", "unless-stopped", "a.b_c-d+e", "x1"])
def test_plain_values_stay_plain(value):
    assert dump_yaml({"k": value}) == f"k: {value}\n"


HOSTILE = st.one_of(
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=40),
    st.sampled_from(["3000:3000", "no", "on", "${VAR}", "$VAR", "a: b", "# c", "*a", "&a", "!a", "\\", "\"'",
                     "line\nbreak", "tab\there", "trailing ", "\u2028", "\x85", "\ufeff", "\x00x", "0o17", "~", "-"]),
)


@given(env_values=st.lists(HOSTILE, min_size=1, max_size=4), args=st.lists(HOSTILE, max_size=4),
       as_mapping=st.booleans(), working_dir=HOSTILE)
@settings(max_examples=150, deadline=None)
def test_hostile_strings_round_trip_and_render_byte_stably(env_values, args, as_mapping, working_dir):
    environment = {f"V{i}": v for i, v in enumerate(env_values)}
    service = ServiceSpec(
        name="app",
        image=parse_image_ref(f"app@{DIGEST_A}"),
        environment=environment if as_mapping else [f"{k}={v}" for k, v in environment.items()],
        command=args,
        working_dir=working_dir,
    )
    spec = ComposeSpec((service,))
    try:
        document = compose_document(spec)
    except ComposeError as exc:
        assert all(("NUL" in m or "line break" in m or "empty" in m) for _, m in exc.problems)
        assume(False)  # checked; counted as rejected so that most examples exercise the bytes below
    first, second = render_compose(spec), render_compose(spec)
    assert first == second
    assert yaml.safe_load(first) == document
    assert YAML(typ="safe", pure=True).load(first) == document
    assert parse_compose(first).images[0][0] == "services.app.image"


def test_spec_problems_are_reported_at_once():
    pinned = parse_image_ref(f"app@{DIGEST_A}")
    spec = ComposeSpec(
        (
            ServiceSpec("web", parse_image_ref("nginx:1.25")),
            ServiceSpec("web", pinned),
            ServiceSpec("bad name", pinned),
            ServiceSpec("db", pinned, command="postgres -c x", restart="sometimes", volumes=["data:/var/lib"],
                        environment=["A=1", "A=2", "B=\x00"]),
        ),
    )
    with pytest.raises(ComposeError) as info:
        compose_document(spec)
    assert {p for p, _ in info.value.problems} == {
        "services.web.image", "services.web", "services[2]", "services.db.command", "services.db.restart",
        "services.db.volumes[0]", "services.db.environment[1]", "services.db.environment[2]",
    }


# -- the mkosi app (seed 004) ----------------------------------------------------------------------

def mkosi_spec() -> ComposeSpec:
    image = parse_image_ref(f"{MKOSI_SEED_IMAGE}@{MKOSI_MANIFEST_DIGEST}")
    return ComposeSpec((ServiceSpec(
        name="simple-mkosi-app",
        image=image,
        ports=["3000:3000"],
        restart="no",
        working_dir="/opt/app",
        command=["/usr/bin/node", "/opt/app/server.js"],
    ),))


def test_mkosi_seed_compose_generated():
    generated = yaml.safe_load(render_compose(mkosi_spec()))
    seed = yaml.safe_load(MKOSI_SEED_COMPOSE)
    seed["services"]["simple-mkosi-app"]["image"] += f"@{MKOSI_MANIFEST_DIGEST}"
    assert generated == seed
    assert '- "3000:3000"' in render_compose(mkosi_spec()) and 'restart: "no"' in render_compose(mkosi_spec())


def test_mkosi_seed_image_is_only_tagged():
    with pytest.raises(ComposeError) as info:
        parse_compose(MKOSI_SEED_COMPOSE)
    assert "tag :75d2b9a8" in str(info.value)


# -- NEAR user config and upgrades -----------------------------------------------------------------

def test_near_user_config_round_trips_through_the_launchers_parser():
    values = {"MPC_IMAGE_NAME": "nearone/mpc-node", "MPC_IMAGE_TAGS": "main-9515e18,latest",
              "MPC_REGISTRY": "registry.hub.docker.com", "MPC_HASH_OVERRIDE": DIGEST_B,
              "MPC_ACCOUNT_ID": "node.testnet", "RUST_LOG": "info,mpc=debug", "PORTS": "8080:8080,24567:24567"}
    text = near_user_config(values)
    assert text.splitlines()[0] == "MPC_IMAGE_NAME=nearone/mpc-node"
    assert parse_near_user_config(text) == values


def test_near_user_config_refuses_what_the_launcher_would_misread_or_must_be_measured():
    values = {"PLATFORM": "TEE", "DEFAULT_IMAGE_DIGEST": DIGEST_A, "LAUNCHER_IMAGE_TAGS": "latest",
              "MPC_ACCOUNT_SK": "ed25519:x", "HOME": "/root", "MPC_ENV": "testnet\nMPC_HASH_OVERRIDE=x",
              "MPC_CONTRACT_ID": " v1.signer ", "MPC_HASH_OVERRIDE": DIGEST_A.upper().replace("SHA256", "sha256"),
              "MPC_IMAGE_TAGS": "a, b", "RUST_LOG": "LD_PRELOAD=/x.so"}
    with pytest.raises(ComposeError) as info:
        near_user_config(values)
    messages = dict(info.value.problems)
    assert set(messages) == set(values)
    assert "measured" in messages["PLATFORM"] and "measured" in messages["DEFAULT_IMAGE_DIGEST"]
    assert "MPC_IMAGE_TAGS" in messages["LAUNCHER_IMAGE_TAGS"]
    assert "line break" in messages["MPC_ENV"]
    with pytest.raises(ComposeError, match="toml"):
        near_user_config({"MPC_IMAGE_NAME": "x"}, launcher=NearLauncher.RUST)


def near_app_compose(default_digest: str) -> bytes:
    launcher = parse_image_ref(f"nearone/mpc-launcher@{DIGEST_A}")
    spec = near_launcher_compose(launcher, ImageDigest.parse(default_digest, DigestKind.IMAGE_ID))
    settings = near_settings(render_compose(spec), "mpc-node-1")
    return build_app_compose(settings, dstack_version="0.5.11").data


def test_mpc_upgrade_by_hash_override_keeps_identity():
    compose = near_app_compose(DIGEST_A)
    before = near_user_config({"MPC_IMAGE_TAGS": "v1"})
    after = near_user_config({"MPC_IMAGE_TAGS": "v1", "MPC_HASH_OVERRIDE": DIGEST_B})
    upgrade = classify_mpc_upgrade(compose, compose, before, after)
    assert upgrade.kind is MpcUpgradeKind.HASH_OVERRIDE and upgrade.keeps_identity
    assert upgrade.changed_user_config_keys == ("MPC_HASH_OVERRIDE",)
    assert classify_mpc_upgrade(compose, compose, before, near_user_config({"MPC_IMAGE_TAGS": "v2"})).kind is (
        MpcUpgradeKind.USER_CONFIG)
    assert classify_mpc_upgrade(compose, compose, before, before).kind is MpcUpgradeKind.UNCHANGED


def test_mpc_upgrade_by_new_compose_is_a_new_identity():
    before, after = near_app_compose(DIGEST_A), near_app_compose(DIGEST_B)
    upgrade = classify_mpc_upgrade(before, after)
    assert upgrade.kind is MpcUpgradeKind.NEW_COMPOSE and not upgrade.keeps_identity
    assert measure.app_id_from_compose_hash(upgrade.compose_hash_before) != (
        measure.app_id_from_compose_hash(upgrade.compose_hash_after))
    assert "vote" in upgrade.summary


# -- kettle ----------------------------------------------------------------------------------------

def kettle_manifest(url: str = "https://gist.githubusercontent.com/raykyri/0123/raw/manifest.json") -> KettleManifest:
    return KettleManifest.from_bytes(url, KETTLE_MANIFEST_BYTES)


def kettle_launcher():
    return parse_image_ref(f"ghcr.io/canvasxyz/kettle-launcher@{DIGEST_A}")


def test_kettle_manifest_is_pinned_by_its_bytes():
    manifest = kettle_manifest()
    assert manifest.sha256 == hashlib.sha256(KETTLE_MANIFEST_BYTES).hexdigest()
    assert manifest.app_sha256 == json.loads(KETTLE_MANIFEST_BYTES)["sha256"]
    assert manifest.verified and manifest.warnings == ()
    plain = kettle_manifest("http://example.org/manifest.json")
    assert not plain.verified and "http://" in plain.warnings[0]


@pytest.mark.parametrize("url,data,path", [
    ("https://x.org/m.json", b'{"app": "https://x.org/app.ts"}', "manifest.sha256"),
    ("https://x.org/m.json", b'{"app": "https://x.org/app.ts", "sha256": "abc"}', "manifest.sha256"),
    ("https://x.org/m.json", b'{"sha256": "' + b"a" * 64 + b'"}', "manifest.app"),
    ("https://x.org/m.json", b"not json", "manifest"),
    ("https://x.org/m.json", b'{"app": "file:///tmp/app.ts", "sha256": "' + b"a" * 64 + b'"}', "manifest.app"),
    ("file:///srv/manifest.json", KETTLE_MANIFEST_BYTES, "url"),
    ("https://x.org/$HOME/m.json", KETTLE_MANIFEST_BYTES, "url"),
])
def test_kettle_manifest_without_verifiable_hashes_is_refused(url, data, path):
    with pytest.raises(ComposeError) as info:
        KettleManifest.from_bytes(url, data)
    assert path in [p for p, _ in info.value.problems]


def test_kettle_compose_measures_the_manifest_literally():
    app = kettle_app(kettle_launcher(), kettle_manifest())
    compose = parse_compose(app.compose_text)
    environment = compose.environment("kettle")
    assert environment["KETTLE_MANIFEST_URL"] == app.manifest.url
    assert environment["KETTLE_MANIFEST_SHA256"] == hashlib.sha256(KETTLE_MANIFEST_BYTES).hexdigest()
    assert environment["KETTLE_APP_SHA256"] == app.manifest.app_sha256
    assert environment["KETTLE_MANIFEST"] == "/kettle/manifest.local.json"
    assert "/dstack/kettle:/kettle:ro" in compose.services["kettle"]["volumes"]
    settings = AppComposeSettings(name="kettle", docker_compose_file=app.compose_text,
                                  pre_launch_script=app.pre_launch_script)
    fields = app_compose_fields(settings, "0.5.11")
    assert fields["pre_launch_script"] == app.pre_launch_script
    assert app.manifest.sha256 in fields["pre_launch_script"] and app.manifest.sha256 in fields["docker_compose_file"]


def test_kettle_pre_launch_script_passes_shellcheck():
    shellcheck = shutil.which("shellcheck", path=str(Path(sys.executable).parent)) or shutil.which("shellcheck")
    script = kettle_app(kettle_launcher(), kettle_manifest()).pre_launch_script
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    result = subprocess.run([shellcheck, "-s", "bash", "-"], input=script, text=True, capture_output=True)
    assert result.returncode == 0, result.stdout


FAKE_CURL = """#!/bin/sh
# fake curl: serves $FAKE_WEB/<host><path> for the URL (last argument), writes it to --output
out=""; url=""
while [ $# -gt 0 ]; do
  case "$1" in --output) out="$2"; shift 2;; *) url="$1"; shift;; esac
done
echo "$url" >> "$FAKE_WEB/requests"
file="$FAKE_WEB/$(printf '%s' "$url" | sed -e 's|^[a-z]*://||')"
[ -f "$file" ] || { echo "curl: (22) 404 $url" >&2; exit 22; }
cp "$file" "$out"
"""


def run_sourced(script: str, tmp_path: Path, web: dict[str, bytes]) -> tuple[subprocess.CompletedProcess, Path]:
    """Source the script as dstack's app-compose.sh does, then mark where containers would start."""
    bin_dir, web_dir = tmp_path / "bin", tmp_path / "web"
    bin_dir.mkdir()
    web_dir.mkdir()
    (bin_dir / "curl").write_text(FAKE_CURL)
    (bin_dir / "curl").chmod(0o755)
    for path, data in web.items():
        (web_dir / path).parent.mkdir(parents=True, exist_ok=True)
        (web_dir / path).write_bytes(data)
    (tmp_path / "pre.sh").write_text(script)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_WEB": str(web_dir)}
    result = subprocess.run(["bash", "-c", f'cd "{tmp_path}" && source pre.sh && echo STARTING-CONTAINERS'],
                            env=env, capture_output=True, text=True, timeout=30)
    return result, tmp_path / "verified"


APP_SOURCE = b"export default {}\n"


def test_kettle_pre_launch_script_installs_the_verified_app(tmp_path):
    manifest = kettle_manifest()
    script = kettle_pre_launch_script(manifest, host_dir=str(tmp_path / "verified"))
    result, verified = run_sourced(script, tmp_path, {
        "gist.githubusercontent.com/raykyri/0123/raw/manifest.json": KETTLE_MANIFEST_BYTES,
        "gist.githubusercontent.com/raykyri/0123456789abcdef/raw/app.ts": APP_SOURCE,
    })
    assert result.returncode == 0 and "STARTING-CONTAINERS" in result.stdout, result.stderr
    assert (verified / "app.ts").read_bytes() == APP_SOURCE
    assert json.loads((verified / "manifest.local.json").read_text()) == {
        "app": "file:///kettle/app.ts", "sha256": hashlib.sha256(APP_SOURCE).hexdigest()}


@pytest.mark.parametrize("web", [
    {"gist.githubusercontent.com/raykyri/0123/raw/manifest.json": KETTLE_MANIFEST_BYTES + b" ",
     "gist.githubusercontent.com/raykyri/0123456789abcdef/raw/app.ts": APP_SOURCE},
    {"gist.githubusercontent.com/raykyri/0123/raw/manifest.json": KETTLE_MANIFEST_BYTES,
     "gist.githubusercontent.com/raykyri/0123456789abcdef/raw/app.ts": APP_SOURCE + b"steal()\n"},
    {"gist.githubusercontent.com/raykyri/0123/raw/manifest.json": KETTLE_MANIFEST_BYTES},
    {},
], ids=["manifest-changed", "app-changed", "app-missing", "offline"])
def test_kettle_pre_launch_script_refuses_to_start(tmp_path, web):
    script = kettle_pre_launch_script(kettle_manifest(), host_dir=str(tmp_path / "verified"))
    result, verified = run_sourced(script, tmp_path, web)
    assert result.returncode == 1 and "STARTING-CONTAINERS" not in result.stdout
    assert "not starting containers" in result.stderr
    assert not verified.exists()


def test_kettle_pre_launch_script_quotes_hostile_urls(tmp_path):
    url = "https://evil.example/m.json?a=';>pwned;'&b=`>pwned2`&c=\"|>pwned3;\\"
    hostile = KettleManifest(url, hashlib.sha256(b"m").hexdigest(), "https://evil.example/a.ts", "0" * 64)
    script = kettle_pre_launch_script(hostile, host_dir=str(tmp_path / "verified"))
    result, _ = run_sourced(script, tmp_path, {})
    assert result.returncode == 1
    assert not list(tmp_path.rglob("pwned*"))
    assert (tmp_path / "web" / "requests").read_text().splitlines() == [hostile.url]


# -- golden files ----------------------------------------------------------------------------------

def golden_compose_files() -> dict[str, str]:
    """Generated bytes fixed in tests/golden/compose/: the emitter is part of the measurement."""
    kettle = kettle_app(kettle_launcher(), kettle_manifest())
    mpc_launcher = parse_image_ref(f"nearone/mpc-launcher@{DIGEST_A}")
    near = render_compose(near_launcher_compose(mpc_launcher, ImageDigest.parse(DIGEST_B, DigestKind.IMAGE_ID)))
    mkosi = render_compose(mkosi_spec())
    mkosi_app = build_app_compose(AppComposeSettings(name="simple-mkosi-app", docker_compose_file=mkosi,
                                                     gateway_enabled=True, public_logs=True, public_sysinfo=True),
                                  dstack_version="0.5.11")
    return {
        "mkosi-app.yaml": mkosi,
        "mkosi-app.app-compose.json": mkosi_app.text,
        "near-launcher.yaml": near,
        "kettle.yaml": kettle.compose_text,
        "kettle-pre-launch.sh": kettle.pre_launch_script,
    }


@pytest.mark.parametrize("name", sorted(golden_compose_files()))
def test_golden_compose_bytes(name):
    path = GOLDEN / name
    assert path.exists(), f"missing {path.relative_to(ROOT)}; run python -m tests.test_compose"
    assert golden_compose_files()[name] == path.read_text(encoding="utf-8"), (
        f"{path.relative_to(ROOT)} differs: a changed emitter or spec changes compose hashes and app identities; "
        "if intended, run python -m tests.test_compose")


def test_golden_directory_has_no_strays():
    assert {p.name for p in GOLDEN.iterdir()} == set(golden_compose_files())


if __name__ == "__main__":
    GOLDEN.mkdir(parents=True, exist_ok=True)
    for file_name, content in golden_compose_files().items():
        (GOLDEN / file_name).write_text(content, encoding="utf-8")
        print(f"wrote {(GOLDEN / file_name).relative_to(ROOT)}")


# -- the dstack OS 0.6.0.a2 ------------------------------------------------------------------------
# Dstack-TEE/meta-dstack tag v0.6.0.a2 (86be7d60252f82ff1c9c8ac2a083d0a2e08c7a9e) pins the `dstack` submodule
# at Dstack-TEE/dstack f1ba0a22a961e8bdae110c7b1a796bc56dfd10a8. Its vmm/src/vmm-cli.py create_app_compose
# is v0.5.11's; the only change is `compose --key-provider` choices ["none", "kms", "local", "tpm"].

def every_option(**change) -> AppComposeSettings:
    return AppComposeSettings(**({
        "name": "app", "docker_compose_file": simple_compose(), "key_provider": KeyProvider.KMS,
        "key_provider_id": "ab12", "write_key_provider": True, "allowed_envs": ("API_KEY",),
        "pre_launch_script": "echo ready", "swap_size": 4096 * MIB, "public_tcbinfo": False, "init_script": "true",
        "storage_fs": "ext4"} | change))


def test_v06a2_writes_the_0_5_11_field_set_byte_for_byte(vector):
    for settings in (every_option(), AppComposeSettings(name="app", docker_compose_file=simple_compose()),
                     near_settings(NEAR_COMPOSE_FIXTURE.read_text(), "mpc-localnet-one-node-1774945636")):
        fields = app_compose_fields(settings, "0.6.0.a2")
        assert list(fields) == list(app_compose_fields(settings, "0.5.11"))
        assert build_app_compose(settings, dstack_version="0.6.0.a2").data == (
            build_app_compose(settings, dstack_version="0.5.11").data)
    near = build_app_compose(near_settings(NEAR_COMPOSE_FIXTURE.read_text(), "mpc-localnet-one-node-1774945636"),
                             dstack_version="0.6.0.a2")
    assert near.data == vector["app_compose"].encode("utf-8")


def test_v06a2_writes_the_tpm_key_provider():
    settings = every_option(key_provider=KeyProvider.TPM, allowed_envs=(), key_provider_id="")
    fields = app_compose_fields(settings, "0.6.0.a2")
    assert (fields["kms_enabled"], fields["local_key_provider_enabled"], fields["key_provider"]) == (False, False, "tpm")
    assert list(fields).index("key_provider") == list(fields).index("secure_time") + 1
    app = build_app_compose(settings, dstack_version="0.6.0.a2")
    assert measure.key_provider_kind(json.loads(app.data)) == "tpm"
    assert app.app_id == measure.compose_hash(app.data)[:40]


@pytest.mark.parametrize(("change", "version", "path", "message"), [
    ({"write_key_provider": False}, "0.6.0.a2", "write_key_provider", "would read no key provider"),
    ({}, "0.5.11", "key_provider", "0.5.11 has no --key-provider tpm"),
    ({"allowed_envs": ("TOKEN",)}, "0.6.0.a2", "allowed_envs", "need key_provider kms"),
])
def test_tpm_settings_the_release_cannot_express_are_refused(change, version, path, message):
    settings = AppComposeSettings(**({"name": "app", "docker_compose_file": simple_compose(),
                                      "key_provider": KeyProvider.TPM, "write_key_provider": True} | change))
    with pytest.raises(ComposeError) as info:
        app_compose_fields(settings, version)
    assert message in dict(info.value.problems)[path]


@pytest.mark.parametrize("version", ["0.6.0", "0.6.0.a1", "v0.6.0.a2"])
def test_other_0_6_versions_are_refused(version):
    with pytest.raises(ComposeError, match="use one of .*0.5.11, 0.6.0.a2"):
        app_compose_fields(AppComposeSettings(name="app", docker_compose_file=simple_compose()), version)


def test_a_control_character_in_the_compose_is_one_line_naming_the_field():
    settings = AppComposeSettings(name="app", docker_compose_file=simple_compose() + "# \x1f\n")
    with pytest.raises(ComposeError) as info:
        build_app_compose(settings, dstack_version="0.5.11")
    ((path, message),) = info.value.problems
    assert path == "docker_compose_file"
    assert message.startswith("not valid YAML: unacceptable character #x001f") and "\n" not in message
