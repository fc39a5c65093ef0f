"""The dstack configuration disk: exact files, a reproducible DSTACKSHR ext4 image read back with
debugfs, the dstack-data GPT image, and config changes that never touch the data disk."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import struct
import subprocess
import tarfile
import zlib
from pathlib import Path

import pytest

from fleet.plan import changes
from fleet.apps import configdisk as cd
from fleet.plan.planner import build_plan

from .conftest import ROOT

pytestmark = pytest.mark.skipif(shutil.which("mke2fs") is None or shutil.which("debugfs") is None,
                                reason="e2fsprogs (mke2fs, debugfs) is required; install the e2fsprogs package")

FILES = {
    cd.APP_COMPOSE: b'{\n    "manifest_version": 2,\n    "name": "x \\u00e9 $(id)"\n}',
    cd.SYS_CONFIG: cd.sys_config(kms_urls=["https://kms.example"], gateway_urls=[], pccs_url="",
                                 docker_registry=None, os_image_hash="a" * 64, cpu_count=4, memory_bytes=16 << 30),
    cd.INSTANCE_INFO: cd.instance_info(app_id="b" * 40, seed=cd.instance_seed("dev", "apps-0")),
    cd.USER_CONFIG: b"MPC_IMAGE_TAGS=latest\n",
}


def build(tmp_path: Path, files=FILES, name="out") -> Path:
    out = tmp_path / name
    out.mkdir()
    result = subprocess.run(["bash", "-c", cd.build_script(files, None)], input=cd.bundle(files), text=True,
                            capture_output=True, env=dict(os.environ, OUT_DIR=str(out)))
    assert result.returncode == 0, result.stderr
    return out / "disk.tar.gz"


def raw_of(tarball: Path, tmp_path: Path) -> Path:
    with tarfile.open(tarball) as tar:
        assert tar.getnames() == ["disk.raw"]
        member = tar.getmember("disk.raw")
        assert member.mtime == 0 and member.uid == 0
        tar.extractall(tmp_path / "x", filter="data")
    return tmp_path / "x" / "disk.raw"


def debugfs(raw: Path, request: str) -> str:
    return subprocess.run(["debugfs", "-R", request, str(raw)], capture_output=True, text=True, check=True).stdout


def test_image_holds_exactly_the_rendered_files_with_the_right_label(tmp_path):
    raw = raw_of(build(tmp_path), tmp_path)
    names = {line.split()[-1] for line in debugfs(raw, "ls -l /").splitlines() if line.strip()}
    assert names - {".", "..", "lost+found"} == set(FILES)
    for name, data in FILES.items():
        assert subprocess.run(["debugfs", "-R", f"cat /{name}", str(raw)], capture_output=True,
                              check=True).stdout == data
    label = subprocess.run(["e2label", str(raw)], capture_output=True, text=True, check=True).stdout.strip()
    assert label == cd.LABEL


def test_two_builds_are_byte_identical_and_a_change_is_not(tmp_path):
    first, second = build(tmp_path, name="a"), build(tmp_path, name="b")
    assert first.read_bytes() == second.read_bytes()
    changed = dict(FILES, **{cd.USER_CONFIG: b"MPC_IMAGE_TAGS=next\n"})
    assert build(tmp_path, changed, name="c").read_bytes() != first.read_bytes()
    assert cd.content_hash(changed) != cd.content_hash(FILES)


def test_size_limits_and_unknown_files():
    with pytest.raises(cd.ConfigDiskError, match="is required"):
        cd.check_files({cd.SYS_CONFIG: b"{}"})
    with pytest.raises(cd.ConfigDiskError, match=".sys-config.json is 40000 bytes; the guest accepts at most 32768"):
        cd.check_files({cd.APP_COMPOSE: b"{}", cd.SYS_CONFIG: b"x" * 40000})
    with pytest.raises(cd.ConfigDiskError, match="not a file the guest reads"):
        cd.check_files({cd.APP_COMPOSE: b"{}", cd.SYS_CONFIG: b"{}", "extra": b""})


def test_sys_config_and_instance_info_formats():
    sys_config = json.loads(FILES[cd.SYS_CONFIG])
    assert sys_config["kms_urls"] == ["https://kms.example"] and isinstance(sys_config["vm_config"], str)
    assert json.loads(sys_config["vm_config"]) == {"spec_version": 2, "os_image_hash": "a" * 64, "cpu_count": 4,
                                                   "memory_size": 16 << 30}
    assert json.loads(FILES[cd.INSTANCE_INFO]) == {"app_id": "b" * 40, "instance_id_seed": cd.instance_seed("dev", "apps-0")}
    assert cd.instance_seed("dev", "apps-0") != cd.instance_seed("dev", "apps-1")


FAKE_GCLOUD = """#!/bin/sh
# objects describe OBJ -> exit 1 unless present; cp SRC DST -> copy into the fake bucket dir
case "$2" in
  objects) test -e "$FAKE_BUCKET/$(echo "$4" | tr '/' '_')" ;;
  cp) cp "$4" "$FAKE_BUCKET/$(echo "$5" | tr '/' '_')" ;;
esac
"""


def test_upload_is_content_addressed_and_skipped_when_present(tmp_path):
    bindir, bucket = tmp_path / "bin", tmp_path / "bucket"
    bindir.mkdir()
    bucket.mkdir()
    (bindir / "gcloud").write_text(FAKE_GCLOUD)
    (bindir / "gcloud").chmod(0o755)
    upload = cd.Upload("acme-images", "config-disks/dev")
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}", FAKE_BUCKET=str(bucket))
    script = cd.build_script(FILES, upload)
    first = subprocess.run(["bash", "-c", script], input=cd.bundle(FILES), text=True, capture_output=True, env=env)
    assert first.returncode == 0, first.stderr
    url = upload.object_url(cd.content_hash(FILES))
    assert first.stdout.startswith(url + " ")
    stored = bucket / url.replace("/", "_")
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == first.stdout.split()[1]
    again = subprocess.run(["bash", "-c", script], input=cd.bundle(FILES), text=True, capture_output=True, env=env)
    assert again.stdout.strip() == f"{url} already exists"


def test_scripts_pass_shellcheck(tmp_path):
    shellcheck = str(Path(os.sys.executable).parent / "shellcheck")
    for name, text in (("config", cd.build_script(FILES, cd.Upload("b", "p"))), ("data", cd.data_disk_script(None))):
        path = tmp_path / f"{name}.sh"
        path.write_text("#!/bin/bash\n" + text)
        result = subprocess.run([shellcheck, "-s", "bash", str(path)], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout


def test_data_disk_image_is_a_gpt_with_one_dstack_data_partition(tmp_path):
    images = []
    for name in ("a", "b"):
        out = tmp_path / name
        out.mkdir()
        result = subprocess.run(["bash", "-c", cd.data_disk_script(None)], capture_output=True, text=True,
                                env=dict(os.environ, OUT_DIR=str(out)))
        assert result.returncode == 0, result.stderr
        images.append((out / "disk.tar.gz").read_bytes())
    assert images[0] == images[1]
    raw = raw_of(tmp_path / "a" / "disk.tar.gz", tmp_path).read_bytes()
    assert raw[510:512] == b"\x55\xaa" and raw[450] == 0xEE
    header = raw[512:512 + 92]
    assert header[:8] == b"EFI PART"
    zeroed = header[:16] + b"\0\0\0\0" + header[20:]
    assert struct.unpack("<I", header[16:20])[0] == zlib.crc32(zeroed)
    entries = raw[1024:1024 + 128 * 128]
    assert struct.unpack("<I", header[88:92])[0] == zlib.crc32(entries)
    first_lba, last_lba = struct.unpack("<QQ", entries[32:48])
    assert first_lba == 2048 and last_lba > first_lba
    assert entries[56:128].decode("utf-16-le").rstrip("\0") == cd.DATA_PARTITION_LABEL
    backup = raw[-512:-512 + 8]
    assert backup == b"EFI PART"


def dstack_stack(public_logs: bool) -> dict:
    return {"config": {
        "gcp:project": "acme-tee-dev", "gcp:region": "us-central1",
        "dstack-fleet:role": "env", "dstack-fleet:tier": "prod",
        "dstack-fleet:bootstrap": {"project": "acme-tee-ops"},
        "dstack-fleet:network": {"subnets": {"us-central1": "10.10.0.0/20"}},
        "dstack-fleet:images": {"dstack": {"prebuilt": {"image": {
            "selfLink": "projects/acme-legacy/global/images/dstack-0-6-0",
            "expected": {"osImageHash": "c" * 64, "source": "test"}}}}},
        "dstack-fleet:nodes": [{"name": "apps", "kind": "dstack", "count": 2, "zones": ["us-central1-a"],
                                "addresses": {"offset": 10}, "image": "dstack", "maxUnavailable": 1}],
        "dstack-fleet:apps": [{"name": "mpc", "target": "gce", "nodes": "apps", "keyProvider": "none",
                               "composeFile": "compose.yaml", "settings": {"publicLogs": public_logs}}],
    }}


def test_config_change_replaces_the_config_disk_stops_the_node_and_spares_the_data_disk(project):
    import yaml

    (project.root / "compose.yaml").write_text(
        "services:\n  app:\n    image: docker.io/library/busybox@sha256:" + "d" * 64 + "\n")
    path = project.root / "stacks" / "Pulumi.dstack.yaml"
    path.write_text(yaml.safe_dump(dstack_stack(False)))
    before = json.loads(build_plan(project.root, "dstack").to_json())
    path.write_text(yaml.safe_dump(dstack_stack(True)))
    after_plan = build_plan(project.root, "dstack")
    after = json.loads(after_plan.to_json())
    groups = changes.rollout(before["resources"], after["resources"])
    assert groups["apps"].stopped == ["apps-0", "apps-1"] and groups["apps"].replaced == []
    assert groups["apps"].over_limit and groups["apps"].data_at_risk == []
    by_change = {c.urn.rsplit("::", 1)[1]: c.action for c in changes.diff(before["resources"], after["resources"])}
    assert by_change["apps-0-data"] == "none"
    assert any(name.startswith("apps-0-config-") and action == "create" for name, action in by_change.items())
    assert any(name.startswith("apps-0-config-") and action == "delete" for name, action in by_change.items())
    data = next(r for r in after["resources"] if r["name"] == "apps-0-data")
    assert data["options"]["ignoreChanges"] == ["image"] and data["options"]["protect"] is True
    instance = next(r for r in after_plan.resources if r.name == "apps-0")
    assert instance.inputs["shieldedInstanceConfig"]["enableVtpm"] is True
    assert [d["deviceName"] for d in instance.inputs["attachedDisks"]] == ["data", "dstack-config"]
    expected = after_plan.measurements["app:mpc-dstack"]
    assert expected["os_image_hash"] == "c" * 64 and expected["machine_type"] == "c3-standard-4"
