"""The boot path's hashes a dstack OS build records (fleet/images/bootinputs.py): GPT event,
Authenticode of the UKI and its kernel, command line and initrd, from disk.raw alone; and the
build script puts them into outputs.json and the lock file."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from fleet.attest import bootchain, tcg
from fleet.images import bootinputs, buildscript
from fleet.images.buildscript import BOOT_INPUTS_PROGRAM, parse_outputs

from .pe_fixture import fat16, gpt_disk, pe
from .test_bootchain import TPM_LOG
from .test_buildscript import PY, dstack_spec, local_script, tools  # noqa: F401 - the fixture

KERNEL = pe([(".text", b"kernel code " * 64), (".data", b"\x01" * 300)])
UKI_SECTIONS = [(".osrel", b"ID=dstack\nVERSION_ID=0.6.0\n"), (".cmdline", b"console=ttyS0 dstack.rootfs_hash=ab\x00"),
                (".linux", KERNEL), (".initrd", b"\x1f\x8b initramfs " * 40), (".uname", b"6.9.0"),
                (".sdmagic", b"#### LoaderInfo: systemd-stub 255.13 ####\x00")]
# Authenticode of the fixtures as osslsigncode 2.9 reports it ("Current message digest" of a copy
# signed with a throw-away key): the test below recomputes it wherever osslsigncode is installed.
UKI = pe(UKI_SECTIONS)


def osslsigncode_digest(tmp_path: Path, image: bytes, algorithm: str) -> str:
    """The Authenticode digest osslsigncode computes, read from a copy it signed."""
    tool = shutil.which("osslsigncode")
    openssl = shutil.which("openssl")
    if tool is None or openssl is None:
        pytest.skip("osslsigncode or openssl is not installed")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    if not key.exists():
        subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                        str(cert), "-days", "1", "-subj", "/CN=fixture"], check=True, capture_output=True)
    unsigned, signed = tmp_path / "in.efi", tmp_path / "out.efi"
    unsigned.write_bytes(image)
    signed.unlink(missing_ok=True)
    subprocess.run([tool, "sign", "-certs", str(cert), "-key", str(key), "-h", algorithm, "-in", str(unsigned),
                    "-out", str(signed)], check=True, capture_output=True)
    result = subprocess.run([tool, "verify", "-in", str(signed)], capture_output=True, text=True)
    line = next(ln for ln in result.stdout.splitlines() if ln.startswith("Current message digest"))
    return line.split(":")[1].strip().lower()


@pytest.mark.parametrize("image", ["uki", "kernel", "with-trailer"])
@pytest.mark.parametrize("algorithm", ["sha384", "sha256"])
def test_authenticode_is_osslsigncodes(tmp_path, image, algorithm):
    data = {"uki": UKI, "kernel": KERNEL, "with-trailer": pe(UKI_SECTIONS, trailer=b"appended" * 8)}[image]
    assert bootinputs.authenticode(data, algorithm).hex() == osslsigncode_digest(tmp_path, data, algorithm)


def test_authenticode_skips_checksum_and_certificate_table_only():
    base = bootinputs.authenticode(UKI, "sha384")
    layout = bootinputs.pe_layout(UKI)
    checksum = bytearray(UKI)
    checksum[layout["checksum"]] ^= 0xFF
    assert bootinputs.authenticode(bytes(checksum), "sha384") == base
    section = bytearray(UKI)
    section[layout["sections"][0]["raw_pointer"]] ^= 0xFF
    assert bootinputs.authenticode(bytes(section), "sha384") != base


def test_uki_inputs_follow_the_formulas():
    inputs = bootinputs.uki_inputs(UKI)
    assert inputs["kernel_authenticode_sha384"] == bootinputs.authenticode(KERNEL, "sha384").hex()
    # the command line as the stub hands it to Linux: UTF-16LE with one NUL, its own NUL dropped
    assert inputs["cmdline_sha384"] == hashlib.sha384("console=ttyS0 dstack.rootfs_hash=ab\x00".encode("utf-16-le")).hexdigest()
    assert inputs["initrd_sha384"] == hashlib.sha384(b"\x1f\x8b initramfs " * 40).hexdigest()
    assert inputs["stub_version"] == 255 and inputs["pe_sections_sha384"] is None
    newer = pe([*UKI_SECTIONS[:-1], (".sdmagic", b"#### LoaderInfo: systemd-stub 256.7 ####")])
    sections = bootinputs.uki_inputs(newer)["pe_sections_sha384"]
    by_name = dict(UKI_SECTIONS)
    expected = bootchain.pe_sections_register([(n, by_name[n]) for n in (".linux", ".osrel", ".cmdline", ".initrd",
                                                                          ".uname")])
    assert sections == expected.hex()


def test_sections_are_measured_as_loaded():
    """Memory beyond a section's raw data is zeros up to its virtual size; raw padding past the
    virtual size is not part of it."""
    data = pe([(".linux", KERNEL), (".cmdline", b"x"), (".initrd", b"abc")], virtual_sizes={".initrd": 8})
    assert bootinputs.uki_inputs(data)["initrd_sha384"] == hashlib.sha384(b"abc" + b"\x00" * 5).hexdigest()


def test_disk_inputs_read_the_uki_from_the_esp(tmp_path):
    disk = tmp_path / "disk.raw"
    disk.write_bytes(gpt_disk(fat16({("EFI", "BOOT", "BOOTX64.EFI"): UKI, ("EFI", "README.TXT"): b"x"})))
    inputs = bootinputs.disk_inputs(str(disk))
    assert {k: v for k, v in inputs.items() if k != "gpt_event_sha384"} == bootinputs.uki_inputs(UKI)
    with disk.open("rb") as handle:
        event, partitions = bootinputs.gpt(handle)
    assert inputs["gpt_event_sha384"] == hashlib.sha384(event).hexdigest()
    assert len(event) == 92 + 8 + 128 and partitions[0][1] == 2048
    result = subprocess.run([sys.executable, "-c", BOOT_INPUTS_PROGRAM, str(disk)], capture_output=True, text=True)
    assert result.returncode == 0 and json.loads(result.stdout) == inputs


def test_gpt_event_is_what_ovmf_measured():
    """The GPT event of dstack's GCE boot (vTPM log event 27, data and digest): a disk with that
    header and those entries gives the same UEFI_GPT_DATA, empty entries left out."""
    log = tcg.parse(TPM_LOG.read_bytes())
    logged = next(e for e in log.events if e.event_type == 0x80000006)
    header, count = logged.data[:92], struct.unpack_from("<Q", logged.data, 92)[0]
    entries = logged.data[100:]
    disk = bytearray(40 * 512)
    disk[512:604] = header
    disk[1024:1024 + len(entries)] = entries
    import io

    event, partitions = bootinputs.gpt(io.BytesIO(bytes(disk)))
    assert event == logged.data and len(partitions) == count == 2
    assert hashlib.sha384(event).digest() == logged.digests["sha384"]


@pytest.mark.parametrize(
    ("disk", "message"),
    [
        (lambda: b"\x00" * 4096, "no GPT header"),
        (lambda: gpt_disk(b"\x00" * 512 * 64), "no FAT boot sector"),
        (lambda: gpt_disk(fat16({("EFI", "README.TXT"): b"x"})), "EFI/BOOT is not on the EFI system partition"),
        (lambda: gpt_disk(fat16({("EFI", "BOOT", "BOOTX64.EFI"): b"not a PE"})), "no MZ header"),
        (lambda: gpt_disk(fat16({("EFI", "BOOT", "BOOTX64.EFI"): pe([(".linux", KERNEL)])})),
         "no .cmdline, .initrd section"),
    ],
)
def test_images_without_a_uki_are_named(tmp_path, disk, message):
    path = tmp_path / "disk.raw"
    path.write_bytes(disk())
    with pytest.raises(bootinputs.BootInputError, match=message):
        bootinputs.disk_inputs(str(path))
    result = subprocess.run([sys.executable, "-c", BOOT_INPUTS_PROGRAM, str(path)], capture_output=True, text=True)
    assert result.returncode == 1 and "boot inputs not recorded" in result.stderr


def test_the_program_is_self_contained():
    """It runs on the build host with python3 alone: nothing from fleet, nothing outside the stdlib."""
    imports = [line.split()[1] for line in BOOT_INPUTS_PROGRAM.splitlines() if line.startswith(("import ", "from "))]
    assert set(imports) <= {"__future__", "hashlib", "json", "os", "struct", "sys"}


# ---- through the build script ---------------------------------------------------------------------------------

REPRO_WITH_DISK = f"""#!{PY}
import os, shutil, subprocess, sys
here = os.path.dirname(os.path.abspath(__file__))
subprocess.run([sys.executable, os.path.join(here, "stand-in-repro.py")], check=True)
for build in ("build-a", "build-b"):
    out = os.path.join(here, build, "images", "dstack-0.6.0.a2")
    shutil.copyfile(os.environ["FIXTURE_DISK"], os.path.join(out, "disk.raw"))
    open(os.path.join(out, "auth_hash.txt"), "w").write(os.environ["FIXTURE_AUTH_HASH"] + "\\n")
"""


def test_a_dstack_build_records_its_boot_inputs_in_the_lock_entry(tools, tmp_path):  # noqa: F811 - fixture
    tools.use_dstack_upstream()
    repro = tools.upstreams / "meta-dstack" / "repro-build"
    (repro / "repro-build.sh").rename(repro / "stand-in-repro.py")
    (repro / "repro-build.sh").write_text(REPRO_WITH_DISK)
    (repro / "repro-build.sh").chmod(0o755)
    disk = tmp_path / "fixture-disk.raw"
    disk.write_bytes(gpt_disk(fat16({("EFI", "BOOT", "BOOTX64.EFI"): UKI})))
    spec = dstack_spec()
    auth = bootinputs.authenticode(UKI, "sha256").hex()
    result = tools.run(local_script(spec, tmp_path / "out"), FIXTURE_DISK=str(disk), FIXTURE_AUTH_HASH=auth)
    assert result.returncode == 0, result.stderr
    _, entry = parse_outputs(tools.object(f"{spec.input_hash}/outputs.json").read_text(),
                             expect_input_hash=spec.input_hash)
    # recorded from the disk GCE boots: padded to a whole GiB, its GPT (which OVMF measures) rewritten for it
    padded = tmp_path / "padded-disk.raw"
    shutil.copyfile(disk, padded)
    buildscript.pad_gpt_disk(str(padded), buildscript.RAW_DISK_MULTIPLE)
    assert entry["boot"] == {k: v for k, v in bootinputs.disk_inputs(str(padded)).items() if v is not None}
    assert entry["boot"]["gpt_event_sha384"] != bootinputs.disk_inputs(str(disk))["gpt_event_sha384"]
    assert entry["uki_hash"] == entry["boot"]["uki_authenticode_sha256"] == auth
    expected = bootchain.expected_registers("c3-standard-8", extra_disks=2, boot=entry["boot"])
    assert len(expected["rtmr1"]) == len(expected["rtmr2"]) == 96

    # auth_hash.txt that is not the UKI's: the build refuses to record either
    result = tools.run(local_script(spec, tmp_path / "out2", bucket=None), FIXTURE_DISK=str(disk),
                       FIXTURE_AUTH_HASH="a7" * 32)
    assert result.returncode != 0 and "different Authenticode hashes" in result.stderr


def test_a_dstack_build_without_a_uki_on_its_disk_records_no_boot_inputs(tools, tmp_path):  # noqa: F811
    tools.use_dstack_upstream()
    spec = dstack_spec()
    result = tools.run(local_script(spec, tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert "no boot inputs recorded" in result.stderr
    _, entry = parse_outputs(tools.object(f"{spec.input_hash}/outputs.json").read_text())
    assert "boot" not in entry
