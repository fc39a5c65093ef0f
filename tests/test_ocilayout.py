"""The deterministic OCI image layout made from a root-filesystem tar: a valid layout, the same bytes
for the same tree whatever the tar's member order, times or owner names, and new digests for a new
command or new content."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleet.images import ocilayout as ol

from .conftest import ROOT

EPOCH = 1701475200  # seed 004's SourceDateEpoch
SETTINGS = ol.ImageSettings(cmd=("/usr/bin/node", "/opt/app/server.js"), working_dir="/opt/app",
                            env=("NODE_ENV=production", "PATH=/usr/bin:/bin"), exposed_ports=("3000",))

# (name, kind, payload, mode, uid, gid): a small root filesystem as mkosi's tar holds it
TREE = [
    (".", "dir", None, 0o755, 0, 0),
    ("./etc", "dir", None, 0o755, 0, 0),
    ("./etc/hostname", "file", b"app\n", 0o644, 0, 0),
    ("./opt", "dir", None, 0o755, 0, 0),
    ("./opt/app", "dir", None, 0o755, 0, 0),
    ("./opt/app/server.js", "file", b"console.log('hi')\n", 0o644, 0, 0),
    ("./usr", "dir", None, 0o755, 0, 0),
    ("./usr/bin", "dir", None, 0o755, 0, 0),
    ("./usr/bin/node", "file", b"\x7fELF node", 0o755, 0, 0),
    ("./usr/bin/nodejs", "symlink", "node", 0o777, 0, 0),
    ("./usr/bin/su", "file", b"\x7fELF su", 0o4755, 0, 0),
    ("./var", "dir", None, 0o755, 0, 0),
    ("./var/lib", "dir", None, 0o755, 0, 0),
    ("./var/lib/app", "dir", None, 0o750, 101, 102),
]


def tar_bytes(tree=TREE, *, mtime=lambda name: 1_700_000_000, uname="root", pax=None, fmt=tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, kind, payload, mode, uid, gid in tree:
            info = tarfile.TarInfo(name)
            info.mode, info.uid, info.gid, info.uname, info.gname = mode, uid, gid, uname, uname
            info.mtime = mtime(name)
            info.pax_headers = dict((pax or {}).get(name, {}))
            if kind == "dir":
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, payload
                tar.addfile(info)
            elif kind == "hardlink":
                info.type, info.linkname = tarfile.LNKTYPE, payload
                tar.addfile(info)
            else:
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def write_tar(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def build(tmp_path: Path, data: bytes, name: str = "out", settings=SETTINGS, epoch=EPOCH, tag="t1"):
    rootfs = write_tar(tmp_path / f"{name}.tar", data)
    out = tmp_path / name
    return ol.build_layout(rootfs, out, settings=settings, source_date_epoch=epoch, tag=tag), out


def files_of(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def blob(out: Path, digest: str) -> bytes:
    algorithm, hexdigest = digest.split(":")
    assert algorithm == "sha256"
    return (out / "blobs" / "sha256" / hexdigest).read_bytes()


def layer_members(out: Path, layout: ol.Layout) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob(out, layout.layer_digest)))) as tar:
        return tar.getmembers()


# ---- a valid layout ---------------------------------------------------------------------------------------------

def test_layout_is_a_valid_oci_image_layout(tmp_path):
    layout, out = build(tmp_path, tar_bytes())
    files = files_of(out)
    assert json.loads(files["oci-layout"]) == {"imageLayoutVersion": "1.0.0"}
    blobs = {name for name in files if name.startswith("blobs/")}
    assert len(blobs) == 3  # layer, config, manifest; nothing else
    for name in blobs:
        assert name == "blobs/sha256/" + hashlib.sha256(files[name]).hexdigest()
    index = json.loads(files["index.json"])
    assert index["schemaVersion"] == 2 and index["mediaType"] == ol.MEDIA_INDEX
    [entry] = index["manifests"]
    assert entry["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert entry["digest"] == layout.manifest_digest
    assert entry["annotations"] == {"org.opencontainers.image.ref.name": "t1"}
    manifest_bytes = blob(out, layout.manifest_digest)
    assert entry["size"] == len(manifest_bytes) == layout.manifest_size
    manifest = json.loads(manifest_bytes)
    assert manifest["schemaVersion"] == 2 and manifest["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert manifest["config"]["mediaType"] == "application/vnd.oci.image.config.v1+json"
    assert manifest["config"]["digest"] == layout.image_id
    assert manifest["config"]["size"] == len(blob(out, layout.image_id))
    [layer] = manifest["layers"]
    assert layer["mediaType"] == "application/vnd.oci.image.layer.v1.tar+gzip"
    assert layer["digest"] == layout.layer_digest and layer["size"] == len(blob(out, layout.layer_digest))
    config = json.loads(blob(out, layout.image_id))
    uncompressed = gzip.decompress(blob(out, layout.layer_digest))
    assert config["rootfs"] == {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(uncompressed).hexdigest()]}
    assert layout.diff_id == config["rootfs"]["diff_ids"][0]


def test_every_json_document_is_canonical(tmp_path):
    layout, out = build(tmp_path, tar_bytes())
    for data in (blob(out, layout.manifest_digest), blob(out, layout.image_id), (out / "index.json").read_bytes(),
                 (out / "oci-layout").read_bytes()):
        assert data == json.dumps(json.loads(data), sort_keys=True, separators=(",", ":")).encode()


def test_image_config_carries_the_settings_and_fixed_times(tmp_path):
    layout, out = build(tmp_path, tar_bytes())
    config = json.loads(blob(out, layout.image_id))
    assert config["architecture"] == "amd64" and config["os"] == "linux"
    assert config["created"] == "2023-12-02T00:00:00Z"
    assert config["config"] == {"Cmd": ["/usr/bin/node", "/opt/app/server.js"], "WorkingDir": "/opt/app",
                                "Env": ["NODE_ENV=production", "PATH=/usr/bin:/bin"],
                                "ExposedPorts": {"3000/tcp": {}}}
    assert config["history"] == [{"created": "2023-12-02T00:00:00Z", "created_by": ol.HISTORY_CREATED_BY}]
    assert layout.summary() == {"manifest_digest": layout.manifest_digest, "image_id": layout.image_id}


def test_gzip_header_has_no_name_and_no_time(tmp_path):
    layout, out = build(tmp_path, tar_bytes())
    data = blob(out, layout.layer_digest)
    assert data[:3] == b"\x1f\x8b\x08"
    flags, mtime = data[3], int.from_bytes(data[4:8], "little")
    assert flags & 0x08 == 0, "FNAME set: the file name is in the gzip header"
    assert mtime == 0


def test_layer_is_normalized(tmp_path):
    pax = {"./usr/bin/node": {"SCHILY.xattr.security.capability": "\x01\x00\x00\x02\x00\x20\x00\x00",
                              "SCHILY.xattr.security.selinux": "system_u:object_r:bin_t:s0",
                              "SCHILY.acl.access": "user::rwx", "atime": "1700000001.5"}}
    layout, out = build(tmp_path, tar_bytes(uname="builder", pax=pax))
    members = layer_members(out, layout)
    names = [m.name for m in members]
    assert names == sorted(names)
    assert names[0] == "etc" and "." not in names and not any(n.startswith(("./", "/")) for n in names)
    assert {m.mtime for m in members} == {EPOCH}
    assert {(m.uname, m.gname) for m in members} == {("", "")}
    by_name = {m.name: m for m in members}
    assert (by_name["var/lib/app"].uid, by_name["var/lib/app"].gid, by_name["var/lib/app"].mode) == (101, 102, 0o750)
    assert by_name["usr/bin/su"].mode == 0o4755
    assert by_name["usr/bin/nodejs"].issym() and by_name["usr/bin/nodejs"].linkname == "node"
    node = by_name["usr/bin/node"]
    assert node.pax_headers == {"SCHILY.xattr.security.capability": "\x01\x00\x00\x02\x00\x20\x00\x00"}
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob(out, layout.layer_digest)))) as tar:
        assert tar.extractfile("opt/app/server.js").read() == b"console.log('hi')\n"


def test_binary_xattrs_survive_the_repack(tmp_path):
    raw = bytes([1, 0, 0, 2, 0x20, 0, 0, 0, 0xff, 0xfe, 0, 0])  # not UTF-8
    pax = {"./usr/bin/node": {"SCHILY.xattr.security.capability": raw.decode("utf-8", "surrogateescape")}}
    layout, out = build(tmp_path, tar_bytes(pax=pax))
    node = next(m for m in layer_members(out, layout) if m.name == "usr/bin/node")
    assert node.pax_headers["SCHILY.xattr.security.capability"].encode("utf-8", "surrogateescape") == raw


def test_hard_links_point_at_the_first_name_whatever_the_input_order(tmp_path):
    later_first = TREE + [("./usr/bin/zz-node", "hardlink", "./usr/bin/node", 0o755, 0, 0),
                          ("./usr/bin/aa-node", "hardlink", "./usr/bin/node", 0o755, 0, 0)]
    layout, out = build(tmp_path, tar_bytes(later_first), "a")
    members = {m.name: m for m in layer_members(out, layout)}
    assert members["usr/bin/aa-node"].isreg() and members["usr/bin/aa-node"].size == len(b"\x7fELF node")
    for name in ("usr/bin/node", "usr/bin/zz-node"):
        assert members[name].islnk() and members[name].linkname == "usr/bin/aa-node"
    # the same tree archived the other way round (aa-node carries the data, the others link to it)
    other = [e for e in TREE if e[0] != "./usr/bin/node"] + [
        ("./usr/bin/aa-node", "file", b"\x7fELF node", 0o755, 0, 0),
        ("./usr/bin/zz-node", "hardlink", "./usr/bin/aa-node", 0o755, 0, 0),
        ("./usr/bin/node", "hardlink", "./usr/bin/aa-node", 0o755, 0, 0)]
    other_dirs_first = sorted(other, key=lambda e: e[1] != "dir")
    layout_b, _ = build(tmp_path, tar_bytes(other_dirs_first), "b")
    assert layout_b == layout


# ---- the same bytes -----------------------------------------------------------------------------------------

def test_two_runs_are_byte_identical(tmp_path):
    data = tar_bytes()
    first, out_a = build(tmp_path, data, "a")
    second, out_b = build(tmp_path, data, "b")
    assert first == second
    assert files_of(out_a) == files_of(out_b)


def test_member_order_times_owner_names_and_tar_format_do_not_matter(tmp_path):
    reference, out_ref = build(tmp_path, tar_bytes(), "ref")
    shuffled = list(reversed(TREE))
    variants = {
        "order": tar_bytes(shuffled),
        "mtimes": tar_bytes(mtime=lambda name: 1_600_000_000 + len(name) * 977),
        "names": tar_bytes(uname="someone"),
        "gnu": tar_bytes(fmt=tarfile.GNU_FORMAT),
        "pax-times": tar_bytes(pax={"./etc/hostname": {"atime": "1.5", "ctime": "2.5", "mtime": "1700000000.25"}}),
    }
    for name, data in variants.items():
        layout, out = build(tmp_path, data, name)
        assert layout == reference, name
        assert files_of(out) == files_of(out_ref), name


def test_gnu_tar_archive_in_mkosi_style_gives_the_same_image_as_our_tar(tmp_path):
    """An archive made the way mkosi v25.3's make_tar makes it (GNU tar, pax, xattrs, no sorting)."""
    if shutil.which("tar") is None:
        pytest.skip("GNU tar is not installed")
    root = tmp_path / "root"
    for name, kind, payload, mode, _, _ in TREE:
        path = root / name
        if kind == "dir":
            path.mkdir(parents=True, exist_ok=True)
        elif kind == "symlink":
            path.symlink_to(payload)
        else:
            path.write_bytes(payload)
    for name, kind, _, mode, _, _ in reversed(TREE):
        if kind != "symlink":
            os.chmod(root / name, mode)
    gnu = tmp_path / "gnu.tar"
    subprocess.run(["tar", "--create", "--file", str(gnu), "--directory", str(root), "--xattrs",
                    "--pax-option=delete=atime,delete=ctime,delete=mtime", "--sparse", "--owner=root:0",
                    "--group=root:0", "."], check=True)
    layout = ol.build_layout(gnu, tmp_path / "gnu", settings=SETTINGS, source_date_epoch=EPOCH)
    # our TREE has one directory owned by 101:102; GNU tar here archived everything as root
    same_tree = [e if e[0] != "./var/lib/app" else (e[0], e[1], e[2], e[3], 0, 0) for e in TREE]
    ours = ol.build_layout(write_tar(tmp_path / "ours.tar", tar_bytes(same_tree)), tmp_path / "ours",
                           settings=SETTINGS, source_date_epoch=EPOCH)
    assert layout == ours


@settings(max_examples=40, deadline=None)
@given(order=st.permutations(range(len(TREE))),
       mtimes=st.lists(st.integers(min_value=0, max_value=2**33 - 1), min_size=len(TREE), max_size=len(TREE)))
def test_digests_are_stable_under_permutation_of_members(tmp_path_factory, order, mtimes):
    tmp = tmp_path_factory.mktemp("perm")
    reference = ol.build_layout(write_tar(tmp / "ref.tar", tar_bytes()), tmp / "ref", settings=SETTINGS,
                                source_date_epoch=EPOCH)
    times = dict(zip((e[0] for e in TREE), mtimes))
    permuted = tar_bytes([TREE[i] for i in order], mtime=lambda name: times[name])
    layout = ol.build_layout(write_tar(tmp / "perm.tar", permuted), tmp / "perm", settings=SETTINGS,
                             source_date_epoch=EPOCH)
    assert layout == reference


# ---- new inputs, new digests ---------------------------------------------------------------------------------

def test_changing_the_command_changes_the_digests_but_not_the_layer(tmp_path):
    base, _ = build(tmp_path, tar_bytes(), "a")
    other = ol.ImageSettings(cmd=("/usr/bin/node", "/opt/app/other.js"), working_dir="/opt/app",
                             env=SETTINGS.env, exposed_ports=SETTINGS.exposed_ports)
    changed, _ = build(tmp_path, tar_bytes(), "b", settings=other)
    assert changed.manifest_digest != base.manifest_digest and changed.image_id != base.image_id
    assert changed.layer_digest == base.layer_digest and changed.diff_id == base.diff_id


def test_changing_content_or_epoch_changes_the_digests(tmp_path):
    base, _ = build(tmp_path, tar_bytes(), "a")
    tree = [e if e[0] != "./etc/hostname" else (e[0], e[1], b"other\n", e[3], e[4], e[5]) for e in TREE]
    content, _ = build(tmp_path, tar_bytes(tree), "b")
    assert content.diff_id != base.diff_id and content.manifest_digest != base.manifest_digest
    epoch, _ = build(tmp_path, tar_bytes(), "c", epoch=EPOCH + 1)
    assert epoch.diff_id != base.diff_id and epoch.image_id != base.image_id


def test_the_tag_is_only_in_index_json(tmp_path):
    a, out_a = build(tmp_path, tar_bytes(), "a", tag="one")
    b, out_b = build(tmp_path, tar_bytes(), "b", tag="two")
    assert a == b
    differing = {k for k in files_of(out_a) if files_of(out_a)[k] != files_of(out_b)[k]}
    assert differing == {"index.json"}


# ---- refusals -------------------------------------------------------------------------------------------------

def test_refusals(tmp_path):
    escaping = tar_bytes([(".", "dir", None, 0o755, 0, 0), ("./../etc/passwd", "file", b"x", 0o644, 0, 0)])
    with pytest.raises(ol.LayoutError, match="points outside the root filesystem"):
        build(tmp_path, escaping, "escape")
    dangling = tar_bytes([("./a", "hardlink", "./missing", 0o644, 0, 0)])
    with pytest.raises(ol.LayoutError, match="which the archive does not hold"):
        build(tmp_path, dangling, "dangling")
    with pytest.raises(ol.LayoutError, match="zstd-compressed"):
        build(tmp_path, b"\x28\xb5\x2f\xfd" + bytes(100), "zstd")
    with pytest.raises(ol.LayoutError, match="not a tar archive"):
        build(tmp_path, b"not a tar at all" * 100, "garbage")
    with pytest.raises(ol.LayoutError, match="is not an absolute path"):
        build(tmp_path, tar_bytes(), "wd", settings=ol.ImageSettings(cmd=("x",), working_dir="opt"))
    with pytest.raises(ol.LayoutError, match="not NAME=value"):
        build(tmp_path, tar_bytes(), "env", settings=ol.ImageSettings(cmd=("x",), env=("1BAD=x",)))
    with pytest.raises(ol.LayoutError, match="exposed port"):
        build(tmp_path, tar_bytes(), "port", settings=ol.ImageSettings(cmd=("x",), exposed_ports=("70000",)))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ol.LayoutError, match="is not an empty directory"):
        build(tmp_path, tar_bytes(), "full")


# ---- command line ---------------------------------------------------------------------------------------------

def run_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fleet.ocilayout", *args], capture_output=True, text=True, cwd=cwd,
                          env={k: v for k, v in os.environ.items() if k != "SOURCE_DATE_EPOCH"})


def test_command_line_prints_the_digests_of_the_api(tmp_path):
    rootfs = write_tar(tmp_path / "rootfs.tar", tar_bytes())
    result = run_cli("--rootfs-tar", str(rootfs), "--out", str(tmp_path / "cli"), "--tag", "t1",
                     "--cmd=/usr/bin/node", "--cmd", "/opt/app/server.js", "--workdir", "/opt/app",
                     "--env", "NODE_ENV=production", "--env=PATH=/usr/bin:/bin", "--expose", "3000",
                     "--source-date-epoch", str(EPOCH))
    assert result.returncode == 0, result.stderr
    api = ol.build_layout(rootfs, tmp_path / "api", settings=SETTINGS, source_date_epoch=EPOCH, tag="t1")
    assert json.loads(result.stdout) == {"manifest_digest": api.manifest_digest, "image_id": api.image_id}
    assert files_of(tmp_path / "cli") == files_of(tmp_path / "api")


def test_command_line_errors_are_one_line(tmp_path):
    rootfs = write_tar(tmp_path / "rootfs.tar", b"\x28\xb5\x2f\xfd" + bytes(64))
    result = run_cli("--rootfs-tar", str(rootfs), "--out", str(tmp_path / "o"), "--source-date-epoch", "0")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.strip().count("\n") == 0 and "zstd-compressed" in result.stderr
    missing = run_cli("--rootfs-tar", str(rootfs), "--out", str(tmp_path / "o2"))
    assert missing.returncode == 2 and "--source-date-epoch is required" in missing.stderr


@pytest.mark.skipif(shutil.which("skopeo") is None, reason="skopeo is not installed")
def test_skopeo_reads_the_layout_and_keeps_its_digest(tmp_path):
    """The real skopeo copies the layout (oci: to oci:, no registry) keeping the manifest digest."""
    layout, out = build(tmp_path, tar_bytes())
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"default": [{"type": "insecureAcceptAnything"}]}))
    result = subprocess.run(["skopeo", "--policy", str(policy), "copy", "--preserve-digests", "--digestfile",
                             str(tmp_path / "digest"), f"oci:{out}:t1", f"oci:{tmp_path / 'copy'}:t1"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "digest").read_text().strip() == layout.manifest_digest
    inspected = subprocess.run(["skopeo", "--policy", str(policy), "inspect", "--config", f"oci:{out}:t1"],
                               capture_output=True, text=True, check=True)
    assert json.loads(inspected.stdout)["config"]["Cmd"] == list(SETTINGS.cmd)
