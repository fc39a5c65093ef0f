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


def read_at(path: Path, offset: int, length: int) -> bytes:
    with path.open("rb") as f:
        f.seek(offset)
        return f.read(length)


def parse_gpt(raw: Path, lba: int) -> dict:
    """The GPT header at ``lba`` and its partition array, checked as UEFI 2.x defines them (CRC32 of the
    92-byte header with its own CRC zeroed, CRC32 of the array)."""
    header = read_at(raw, lba * 512, 92)
    assert header[:8] == b"EFI PART"
    zeroed = header[:16] + b"\0\0\0\0" + header[20:]
    assert struct.unpack("<I", header[16:20])[0] == zlib.crc32(zeroed)
    current, backup, first_usable, last_usable = struct.unpack("<QQQQ", header[24:56])
    array_lba, count, size, array_crc = struct.unpack("<QIII", header[72:92])
    array = read_at(raw, array_lba * 512, count * size)
    assert array_crc == zlib.crc32(array)
    first, last = struct.unpack("<QQ", array[32:48])
    return {"current": current, "backup": backup, "first_usable": first_usable, "last_usable": last_usable,
            "array_lba": array_lba, "partition": (first, last),
            "name": array[56:128].decode("utf-16-le").rstrip("\0"), "array": array}


def test_data_disk_image_is_a_whole_gib_gpt_with_one_dstack_data_partition(tmp_path):
    images = []
    for name in ("a", "b"):
        out = tmp_path / name
        out.mkdir()
        result = subprocess.run(["bash", "-c", cd.data_disk_script(None)], capture_output=True, text=True,
                                env=dict(os.environ, OUT_DIR=str(out)))
        assert result.returncode == 0, result.stderr
        images.append((out / "disk.tar.gz").read_bytes())
    assert images[0] == images[1]
    assert len(images[0]) < 64 * 1024  # sparse in the tarball: a GiB of zeros costs nothing
    raw = raw_of(tmp_path / "a" / "disk.tar.gz", tmp_path)
    size = raw.stat().st_size
    assert size == cd.DATA_IMAGE_BYTES == 1 << 30 and size % cd.GIB == 0  # what GCE imports
    last_lba = size // 512 - 1
    mbr = read_at(raw, 0, 512)
    assert mbr[510:512] == b"\x55\xaa" and mbr[450] == 0xEE
    assert struct.unpack("<I", mbr[458:462])[0] == last_lba  # the protective MBR covers the padded disk
    primary, backup = parse_gpt(raw, 1), parse_gpt(raw, last_lba)
    # written for the padded size: the backup header is the last LBA, each header points at the other
    assert (primary["current"], primary["backup"]) == (1, last_lba)
    assert (backup["current"], backup["backup"]) == (last_lba, 1)
    assert backup["array_lba"] == last_lba - 32 and primary["array_lba"] == 2
    assert primary["array"] == backup["array"]
    assert primary["last_usable"] == backup["last_usable"] == last_lba - 33
    assert primary["partition"] == (2048, last_lba - 33)  # one partition up to the end of the padded disk
    assert primary["name"] == cd.DATA_PARTITION_LABEL
    if shutil.which("sgdisk"):  # an independent reader, where installed
        verify = subprocess.run(["sgdisk", "-v", str(raw)], capture_output=True, text=True)
        assert "No problems found" in verify.stdout, verify.stdout


def test_config_disk_is_padded_to_a_whole_gib_and_stays_readable(tmp_path):
    tarball = build(tmp_path)
    assert tarball.stat().st_size < 64 * 1024
    raw = raw_of(tarball, tmp_path)
    assert raw.stat().st_size == cd.GIB
    assert raw.stat().st_blocks * 512 < 16 * 1024 * 1024  # the padding is a hole, not written zeros
    label = subprocess.run(["e2label", str(raw)], capture_output=True, text=True, check=True).stdout.strip()
    assert label == cd.LABEL
    assert subprocess.run(["debugfs", "-R", f"cat /{cd.APP_COMPOSE}", str(raw)], capture_output=True,
                          check=True).stdout == FILES[cd.APP_COMPOSE]
    # the filesystem keeps its own size; only the disk is padded
    blocks = subprocess.run(["dumpe2fs", "-h", str(raw)], capture_output=True, text=True, check=True).stdout
    fields = dict(line.split(":", 1) for line in blocks.splitlines() if ":" in line)
    fs_bytes = int(fields["Block count"]) * int(fields["Block size"])
    assert fs_bytes == cd.image_mib(FILES) * cd.MIB < cd.GIB


def test_padding_rounds_up_to_whole_gib():
    assert cd.padded_bytes(1) == cd.GIB and cd.padded_bytes(cd.GIB) == cd.GIB
    assert cd.padded_bytes(cd.GIB + 1) == 2 * cd.GIB and cd.padded_bytes(0) == cd.GIB
    big = {cd.APP_COMPOSE: b"x" * (50 * cd.MIB), cd.SYS_CONFIG: b"{}", cd.USER_CONFIG: b"y" * (50 * cd.MIB)}
    script = cd.build_script(big, None)
    assert f"truncate -s {cd.GIB} " in script and f"truncate -s {cd.image_mib(big)}M " in script


def test_object_paths_are_new_for_padded_disks():
    """An unpadded object an earlier run uploaded (GCE refused to import it) is never reused: the steps
    skip objects that exist, so the padded layout has its own paths."""
    upload = cd.Upload("acme-images", "config-disks/dev")
    assert upload.object_url("d" * 64) == f"gs://acme-images/config-disks/dev/{'d' * 64}/gib/disk.tar.gz"
    assert cd.data_image_url(upload) == "gs://acme-images/config-disks/dev/data-disk-v2/disk.tar.gz"
    assert "data-disk-v2/disk.tar.gz" in cd.data_disk_script(upload)


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


def test_the_reset_onto_a_new_config_disk_waits_for_the_cloud_nat():
    """The reset guest pulls its containers through the region's Cloud NAT (no external address): the
    reset runs after the NAT exists (before, it could run first on a new stack)."""
    from tests.plans import shipped_plan

    plan = shipped_plan("dev")
    (reset,) = [r for r in plan.resources if r.name == "apps-0-apply-config"]
    (nat,) = [r for r in plan.resources if r.type == "gcp:compute/routerNat:RouterNat"]
    (instance,) = [r for r in plan.resources if r.type == "gcp:compute/instance:Instance" and r.name == "apps-0"]
    assert nat.urn in reset.dependencies and instance.urn in reset.dependencies
    assert reset.inputs["update"].startswith("gcloud compute instances reset fleet-dev-apps-0 ")
