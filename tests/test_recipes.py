"""Recipes: pinned upstreams as data, the input hash, and one clear line per bad input."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import re
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fleet.images import versions as fleet_images
from fleet.images import recipes
from fleet.stacks.load import load_config
from fleet.images.recipes import BuildInputError, build_spec, builds_to_run, input_hash, validate_build

from .conftest import ROOT

COMMIT = "3eb04cad11664a381227d77a469e68bca7e94c30"
SOURCE_BUILD = {"recipe": "tplus-overlay", "guest": {"source": {
    "repository": "https://github.com/tpluslabs/tplus-examples", "commit": COMMIT, "workspace": "dstack-helios-tdx",
    "binary": "light_client", "features": ["quic", "tdx"]}}}
BINARY_BUILD = {"recipe": "tplus-overlay", "guest": {"binary": {"url": "https://example.org/guest", "sha256": "a" * 64}}}
DSTACK_BUILD = {"recipe": "dstack-os", "version": "0.6.0.a2"}
INIT = "#!/bin/sh\necho overlay\n"
DERIVED = {"init_script_sha256": hashlib.sha256(INIT.encode()).hexdigest(),
           "table_key_version": ("projects/acme-tee-ops/locations/us-central1/keyRings/fleet-stack-secrets/"
                                 "cryptoKeys/fleet-overlay-tables/cryptoKeyVersions/1")}


# ---- pins ---------------------------------------------------------------------------------------------------

def all_upstreams() -> list[recipes.Upstream]:
    return list(recipes.TPLUS_UPSTREAMS) + [r.upstream for r in recipes.DSTACK_OS_RELEASES.values()]


@pytest.mark.parametrize("upstream", all_upstreams(), ids=lambda u: f"{u.name}@{u.ref}")
def test_every_upstream_is_a_commit_with_its_provenance(upstream):
    assert re.fullmatch(r"[0-9a-f]{40}", upstream.commit)
    assert upstream.repository.startswith("https://") and upstream.ref and upstream.ref != upstream.commit
    assert upstream.ref in upstream.pinned_from and re.search(r"20[0-9]{2}-[0-9]{2}-[0-9]{2}", upstream.pinned_from)


def test_tplus_layout_follows_the_manifest_with_parents_fetched_first():
    paths = [u.path for u in recipes.TPLUS_UPSTREAMS]
    assert len(set(paths)) == len(paths)
    for i, path in enumerate(paths):
        parents = [p for p in paths if path.startswith(p + "/")]
        assert all(paths.index(p) < i for p in parents)
    by_name = {u.name: u for u in recipes.TPLUS_UPSTREAMS}
    assert by_name["yocto-manifests"].commit == "c27ff30d6c35f299f7b27d51d368d4e402057cc6"
    assert by_name["meta-dstack"].commit == "185fe293e534a135db68d865a85c1abb25a0bb17"
    # get-modular.sh replaces the manifest's meta-confidential-compute@main with ref v3
    assert by_name["meta-confidential-compute"].ref == "v3"
    assert {u.ref for u in recipes.TPLUS_UPSTREAMS if u.name in ("poky", "meta-openembedded",
                                                                 "meta-virtualization")} == {"scarthgap"}


def test_the_guest_installs_where_the_init_script_starts_it():
    from fleet.nodes import initscript

    assert initscript.DAEMON == f"/usr/bin/{recipes.TPLUS_GUEST_NAME}"


def test_dstack_release_reads_the_parameters_of_its_version():
    release = recipes.DSTACK_OS_RELEASES["0.6.0.a2"]
    assert release.upstream.repository == "https://github.com/Dstack-TEE/meta-dstack"
    # initramfs init (dstack.rootfs_device), dstack-prepare.sh (dstack.data_device), dstack-util
    # parse_dstack_options (dstack.storage_fs), and the kernel patch list: linux-yocto%.bbappend adds
    # 0001-x86-tdx-select-dma-direct-remap.patch on tdx, which makes the kernel honour coherent_pool=
    # (seed 001's coherent_pool=8M).
    assert sorted(release.cmdline) == ["coherent_pool", "dstack.data_device", "dstack.rootfs_device",
                                       "dstack.storage_fs"]
    assert "0001-x86-tdx-select-dma-direct-remap.patch" in release.cmdline["coherent_pool"].read_by
    assert recipes.validate_build({**DSTACK_BUILD, "cmdlineOverrides": {"coherent_pool": "8M"}}, key="img") == []
    assert recipes.RECIPE_OUTPUTS["tplus-overlay"] == ()


def test_the_final_command_line_records_the_overrides():
    # dstack-uki.bb at meta-dstack v0.6.0.a2: cmdline = UKI_CMDLINE_BASE (to which the build appends the
    # overrides) + " dstack.rootfs_hash=<ROOT_HASH> dstack.rootfs_size=<DATA_SIZE>"
    release = recipes.DSTACK_OS_RELEASES["0.6.0.a2"]
    base = ("console=ttyS0 init=/init panic=1 net.ifnames=0 biosdevname=0 mce=off oops=panic pci=noearly "
            "pci=nommconf random.trust_cpu=y random.trust_bootloader=n tsc=reliable no-kvmclock")
    overrides = {"coherent_pool": "8M", "dstack.data_device": "PARTLABEL=dstack-data"}
    spec = recipes.build_spec("img", {**DSTACK_BUILD, "cmdlineOverrides": overrides})
    assert spec.kernel_cmdline == (base + " coherent_pool=8M dstack.data_device=PARTLABEL=dstack-data "
                                   "dstack.rootfs_hash=<rootfs_hash> dstack.rootfs_size=<rootfs_size>")
    assert release.kernel_cmdline((), "ab" * 32, "1024") == base + f" dstack.rootfs_hash={'ab' * 32} dstack.rootfs_size=1024"


# ---- the input hash -----------------------------------------------------------------------------------------------

names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_", min_size=1, max_size=12)
hexes = st.text(alphabet="0123456789abcdef", min_size=40, max_size=40)
guests = st.one_of(
    st.fixed_dictionaries({"binary": st.fixed_dictionaries({
        "url": st.one_of(names.map(lambda n: f"https://example.org/{n}"), names.map(lambda n: f"bin/{n}")),
        "sha256": st.text(alphabet="0123456789abcdef", min_size=64, max_size=64)})}),
    st.fixed_dictionaries({"source": st.fixed_dictionaries({
        "repository": names.map(lambda n: f"https://github.com/acme/{n}"), "commit": hexes, "workspace": names,
        "binary": names, "features": st.lists(names, max_size=3)})}),
)
build_inputs = st.one_of(
    st.fixed_dictionaries({"recipe": st.just("tplus-overlay"), "guest": guests},
                          optional={"prod": st.booleans()}),
    st.fixed_dictionaries({"recipe": st.just("dstack-os"), "version": st.sampled_from(["0.6.0.a2", "0.5.11"])},
                          optional={"cmdlineOverrides": st.dictionaries(
                              st.sampled_from(["dstack.data_device", "dstack.rootfs_device"]),
                              names.map(lambda n: f"/dev/{n}"), max_size=2)}),
)
derived = st.dictionaries(st.just("init_script_sha256"), st.text(alphabet="0123456789abcdef", min_size=64,
                                                                   max_size=64), max_size=1)


@settings(max_examples=400, deadline=None)
@given(build_inputs, derived, build_inputs, derived)
@example(DSTACK_BUILD, {}, dict(reversed(list(DSTACK_BUILD.items()))), {})
@example(SOURCE_BUILD, DERIVED, SOURCE_BUILD, {})
def test_input_hash_changes_if_and_only_if_an_input_changes(a, da, b, db):
    same = recipes.canonical_json([a, da]) == recipes.canonical_json([b, db])
    assert (input_hash(a["recipe"], a, da) == input_hash(b["recipe"], b, db)) == same


@settings(max_examples=200, deadline=None)
@given(build_inputs, derived, st.data())
def test_any_single_change_changes_the_hash_and_key_order_does_not(inputs, extra, data):
    digest = input_hash(inputs["recipe"], inputs, extra)
    reordered = dict(reversed(list(inputs.items())))
    assert input_hash(inputs["recipe"], reordered, extra) == digest
    changed = copy.deepcopy(inputs)
    path = data.draw(st.sampled_from(list(_leaves(changed))))
    _set(changed, path, _other(_get(changed, path)))
    assert input_hash(changed["recipe"], changed, extra) != digest
    init = extra.get("init_script_sha256", "")
    assert input_hash(inputs["recipe"], inputs, {"init_script_sha256": init + "0"}) != digest


def _leaves(value, path=()):
    if isinstance(value, dict):
        for k, v in value.items():
            if k != "recipe":
                yield from _leaves(v, path + (k,))
    else:
        yield path


def _get(value, path):
    for k in path:
        value = value[k]
    return value


def _set(value, path, new):
    for k in path[:-1]:
        value = value[k]
    value[path[-1]] = new


def _other(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, list):
        return value + ["x"]
    return value + "0" if isinstance(value, str) else value


def test_pinned_upstreams_and_toolchain_are_part_of_the_hash(monkeypatch):
    before = {name: input_hash(b["recipe"], b) for name, b in
              (("tplus", SOURCE_BUILD), ("binary", BINARY_BUILD), ("dstack", DSTACK_BUILD))}
    moved = tuple(dataclasses.replace(u, commit="0" * 40) if u.name == "poky" else u for u in recipes.TPLUS_UPSTREAMS)
    monkeypatch.setattr(recipes, "TPLUS_UPSTREAMS", moved)
    assert input_hash("tplus-overlay", SOURCE_BUILD) != before["tplus"]
    assert input_hash("dstack-os", DSTACK_BUILD) == before["dstack"]
    monkeypatch.setattr(recipes, "RUST_TOOLCHAIN", "1.99.0")
    monkeypatch.setattr(recipes, "TPLUS_UPSTREAMS", moved)
    document = recipes.input_document("tplus-overlay", SOURCE_BUILD)
    assert document["toolchain"] == {"rust": "1.99.0", "target": "x86_64-unknown-linux-musl"}
    assert recipes.input_document("tplus-overlay", BINARY_BUILD)["toolchain"] == {}  # a prebuilt binary is its sha256
    release = recipes.DSTACK_OS_RELEASES["0.6.0.a2"]
    monkeypatch.setitem(recipes.DSTACK_OS_RELEASES, "0.6.0.a2", dataclasses.replace(
        release, upstream=dataclasses.replace(release.upstream, commit="1" * 40)))
    assert input_hash("dstack-os", DSTACK_BUILD) != before["dstack"]


def test_the_shipped_stacks_image_validates_and_hashes_like_the_plan():
    _, config = load_config(ROOT, "prod")
    source = config.fleet.images["overlay-3eb04ca"]
    inputs = fleet_images.build_inputs(source)
    assert validate_build(inputs, key="overlay-3eb04ca", root=ROOT) == []
    spec = build_spec("overlay-3eb04ca", inputs, DERIVED, init_script=INIT)
    assert spec.input_hash == input_hash("tplus-overlay", inputs, DERIVED)
    assert isinstance(spec.guest, recipes.GuestSource) and spec.guest.features == ("quic", "tdx")
    assert spec.prod is True and spec.config_path == "dstack-fleet:images.overlay-3eb04ca.build"


# ---- bad input: one line per problem, naming the key ---------------------------------------------------------------

P = "dstack-fleet:images.img.build"


def _with(base: dict, path: str, value) -> dict:
    data = copy.deepcopy(base)
    keys = path.split(".")
    target = data
    for k in keys[:-1]:
        target = target.setdefault(k, {})
    if value is None:
        del target[keys[-1]]
    else:
        target[keys[-1]] = value
    return data


@pytest.mark.parametrize("inputs,path,message", [
    (_with(SOURCE_BUILD, "guest.source.commit", "main"), f"{P}.guest.source.commit",
     "'main' is a branch or tag, which moves; a build needs a commit SHA (40 hex digits): "
     "`git ls-remote https://github.com/tpluslabs/tplus-examples main`"),
    (_with(SOURCE_BUILD, "guest.source.commit", "v1.2.0"), f"{P}.guest.source.commit", "'v1.2.0' is a branch or tag"),
    (_with(SOURCE_BUILD, "guest.source.commit", "3eb04ca"), f"{P}.guest.source.commit",
     "'3eb04ca' is an abbreviated commit; give all 40 hex digits"),
    (_with(BINARY_BUILD, "guest.binary.sha256", None), f"{P}.guest.binary.sha256",
     "is required: the build verifies the binary against it"),
    (_with(BINARY_BUILD, "guest.binary.sha256", "abc123"), f"{P}.guest.binary.sha256",
     "'abc123' is not a sha256 (64 lowercase hex digits); compute it with `sha256sum FILE`"),
    (_with(BINARY_BUILD, "guest.binary.sha256", "A" * 64), f"{P}.guest.binary.sha256", "write it in lowercase"),
    (_with(BINARY_BUILD, "guest.binary.sha256", "sha256:" + "a" * 64), f"{P}.guest.binary.sha256",
     "drop the 'sha256:' prefix"),
    (_with(BINARY_BUILD, "guest.binary.url", "http://example.org/guest"), f"{P}.guest.binary.url", "use https://"),
    (_with(BINARY_BUILD, "guest.binary.url", "/home/me/guest"), f"{P}.guest.binary.url",
     "must be relative to the repository, not absolute"),
    (_with(BINARY_BUILD, "guest.binary.url", "../outside/guest"), f"{P}.guest.binary.url",
     "must stay inside the repository"),
    (_with(BINARY_BUILD, "guest.binary.url", "bin/missing-guest"), f"{P}.guest.binary.url",
     "file 'bin/missing-guest' not found in the repository"),
    (_with(BINARY_BUILD, "guest.source", SOURCE_BUILD["guest"]["source"]), f"{P}.guest", "set exactly one of"),
    (_with(SOURCE_BUILD, "guest.source.features", ["quic", "tdx; rm -rf /"]), f"{P}.guest.source.features[1]",
     "is not a Cargo feature name"),
    ({"recipe": "meta-dstack"}, f"{P}.recipe", "unknown recipe 'meta-dstack'; known recipes: dstack-os, tplus-overlay"),
    ({"version": "0.6.0.a2"}, f"{P}.recipe", "is required; one of dstack-os, tplus-overlay"),
    (_with(DSTACK_BUILD, "version", "0.5.11"), f"{P}.version",
     "dstack OS 0.5.11 has no pinned build with GCP (UKI) output here; pinned: 0.6.0.a2"),
    (_with(DSTACK_BUILD, "version", "master"), f"{P}.version", "'master' is not a release version"),
    ({**DSTACK_BUILD, "cmdlineOverrides": {"dstack.rootfs_hash": "ab" * 32}}, f'{P}.cmdlineOverrides["dstack.rootfs_hash"]',
     "dstack.rootfs_hash is a build output (the rootfs hash of the built image), not an input: remove it"),
    ({**DSTACK_BUILD, "cmdlineOverrides": {"rootfs_size": "1024"}}, f'{P}.cmdlineOverrides["rootfs_size"]',
     "rootfs_size is a build output"),
    ({**DSTACK_BUILD, "rootfsHash": "ab" * 32}, f"{P}.rootfsHash", "rootfsHash is a build output"),
    ({**DSTACK_BUILD, "cmdlineOverrides": {"dstack.data_dev": "/dev/sdb"}}, f'{P}.cmdlineOverrides["dstack.data_dev"]',
     "dstack.data_dev is not read by the pinned dstack OS (an older README's name); did you mean dstack.data_device?"),
    ({**DSTACK_BUILD, "cmdlineOverrides": {"coherent_pool": "8 M"}}, f'{P}.cmdlineOverrides["coherent_pool"]',
     "'8 M' is not a value for coherent_pool: use a size such as 8M"),
    ({**DSTACK_BUILD, "cmdlineOverrides": {"swiotlb": "65536"}}, f'{P}.cmdlineOverrides["swiotlb"]',
     "not a parameter the pinned dstack OS or its kernel patches are known to honour; allowed: coherent_pool, "
     "dstack.data_device, dstack.rootfs_device, dstack.storage_fs"),
    ({**DSTACK_BUILD, "cmdlineOverrides": {"console": "ttyS1"}}, f'{P}.cmdlineOverrides["console"]',
     "the pinned dstack OS sets console=ttyS0 itself (Dstack-TEE/meta-dstack@86be7d60252f82ff1c9c8ac2a083d0a2e08c7a9e:"
     "meta-dstack/recipes-core/images/dstack-uki.bb"),
    ({**DSTACK_BUILD, "cmdlineOverrides": {"init": "/bin/sh"}}, f'{P}.cmdlineOverrides["init"]',
     "the pinned dstack OS sets init=/init itself"),
    ({**DSTACK_BUILD, "cmdlineOverrides": {"dstack.storage_encrypted": "0"}},
     f'{P}.cmdlineOverrides["dstack.storage_encrypted"]', "refused: off leaves the data disk unencrypted"),
    ({**DSTACK_BUILD, "cmdlineOverrides": {"dstack.storage_fs": "btrfs"}}, f'{P}.cmdlineOverrides["dstack.storage_fs"]',
     "'btrfs' is not a value for dstack.storage_fs: use zfs or ext4"),
    ({**DSTACK_BUILD, "cmdlineOverrides": {"dstack.rootfs_device": "/dev/sda2 dstack.rootfs_hash=00"}},
     f'{P}.cmdlineOverrides["dstack.rootfs_device"]', "is not a value for dstack.rootfs_device"),
    ({**DSTACK_BUILD, "cmdlineOverrides": {"dstack.rootfs_device": "PARTUUID=" + "0" * 36}},
     f'{P}.cmdlineOverrides["dstack.rootfs_device"]', "use /dev/... or PARTLABEL=<label> (no spaces"),
    ({**DSTACK_BUILD, "guest": BINARY_BUILD["guest"]}, f"{P}.guest",
     "unknown key for recipe dstack-os; known: recipe, version, cmdlineOverrides"),
])
def test_bad_build_inputs_give_one_clear_line(inputs, path, message):
    problems = validate_build(inputs, key="img", root=ROOT)
    assert [p for p, _ in problems] == [path], problems
    assert message in problems[0][1] and "\n" not in problems[0][1]


def test_good_inputs_have_no_problems():
    assert validate_build(SOURCE_BUILD, key="a") == []
    assert validate_build(BINARY_BUILD, key="a") == []
    assert validate_build({**DSTACK_BUILD, "cmdlineOverrides": {
        "dstack.data_device": "PARTUUID=12345678-1234-1234-1234-123456789abc",
        "dstack.rootfs_device": "PARTLABEL=dstack-rootfs"}}, key="a") == []
    assert validate_build(_with(BINARY_BUILD, "guest.binary.url", "README.md"), key="a", root=ROOT) == []


def test_every_problem_is_reported_at_once():
    bad = {"recipe": "tplus-overlay", "prod": "yes", "guest": {"source": {
        "repository": "git@github.com:acme/x", "commit": "main", "workspace": "/abs", "binary": "a b"}}}
    paths = [p for p, _ in validate_build(bad, key="img")]
    assert paths == [f"{P}.prod", f"{P}.guest.source.repository", f"{P}.guest.source.commit",
                     f"{P}.guest.source.workspace", f"{P}.guest.source.binary"]
    with pytest.raises(BuildInputError) as info:
        build_spec("img", bad)
    assert len(info.value.problems) == 5


# ---- a validated build ----------------------------------------------------------------------------------------

def test_tplus_build_needs_the_overlay_init_script_it_was_hashed_with():
    with pytest.raises(BuildInputError, match="bakes the overlay's init script"):
        build_spec("img", SOURCE_BUILD, {})
    with pytest.raises(BuildInputError, match="table-signing public key"):
        build_spec("img", SOURCE_BUILD, {"init_script_sha256": DERIVED["init_script_sha256"]}, init_script=INIT)
    with pytest.raises(ValueError, match="does not match its derived sha256"):
        build_spec("img", SOURCE_BUILD, DERIVED, init_script=INIT + "# edited\n")
    spec = build_spec("img", SOURCE_BUILD, DERIVED, init_script=INIT)
    assert spec.label == (f"tplus-overlay: tpluslabs/meta-dstack@185fe293e534, guest tplus-examples@{COMMIT[:12]} "
                          f"light_client, init {DERIVED['init_script_sha256'][:12]}")
    assert spec.upstreams == recipes.TPLUS_UPSTREAMS and spec.outputs == ()


def test_dstack_build_describes_its_release_and_overrides():
    spec = build_spec("d", {**DSTACK_BUILD, "cmdlineOverrides": {"dstack.data_device": "/dev/sdb"}})
    assert spec.release is recipes.DSTACK_OS_RELEASES["0.6.0.a2"]
    assert spec.cmdline_overrides == (("dstack.data_device", "/dev/sdb"),)
    assert spec.outputs == ("os_image_hash", "rootfs_hash", "uki_hash")
    assert "Dstack-TEE/meta-dstack v0.6.0.a2 (86be7d60252f)" in spec.label


def test_identical_inputs_share_one_build_and_locked_hashes_are_not_built():
    a = build_spec("overlay-a", SOURCE_BUILD, DERIVED, init_script=INIT)
    b = build_spec("overlay-b", SOURCE_BUILD, DERIVED, init_script=INIT)
    c = build_spec("dstack", DSTACK_BUILD)
    d = build_spec("dstack-next", {**DSTACK_BUILD, "cmdlineOverrides": {"dstack.data_device": "/dev/sdb"}})
    runs = builds_to_run([a, b, c, d], locked=[c.input_hash])
    assert sorted(r.input_hash for r in runs) == sorted({a.input_hash, d.input_hash})
    (shared,) = [r for r in runs if r.input_hash == a.input_hash]
    assert shared.keys == ("overlay-a", "overlay-b")
    assert builds_to_run([a, b, c, d], locked=[a.input_hash, c.input_hash, d.input_hash]) == []


def test_repository_path_guest_is_checked_against_the_checkout(tmp_path: Path):
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "guest").write_bytes(b"x")
    inputs = _with(BINARY_BUILD, "guest.binary.url", "bin/guest")
    assert validate_build(inputs, key="a", root=tmp_path) == []
    assert validate_build(inputs, key="a", root=tmp_path / "elsewhere")[0][1] == "file 'bin/guest' not found in the repository"
