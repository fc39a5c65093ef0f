"""GCP's boot chain, register by register: event logs parse and replay to the registers real TDX
guests reported, and MRTD and RTMR0-2 are predicted byte for byte from recorded inputs.

Sources of the formulas: Easy-TEE/attest crates/measure/src/dcap/gcp.rs at 17d6d8b3 (MIT);
constants: flashbots/dstack-mr-gcp internal/consts.go at b16e08b3 (Apache-2.0). Vectors:
tests/vectors/gcp/README.md.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from fleet.attest import bootchain, ccel, tcg, vtpm
from fleet.attest.checks import InputError

GCP = Path(__file__).parent / "vectors" / "gcp"
COS_CCEL = GCP / "go-eventlog-cos-113-intel-tdx-ccel.bin"
TPM_LOG = GCP / "dstack-gcp-tpm-eventlog.bin"
FLASHBOTS_QUOTE = GCP / "flashbots-gcp-tdx-quote.bin"
CONSTS = json.loads((GCP / "dstack-mr-gcp.consts.json").read_text())

# google/go-eventlog ccel/cceventlog_test.go COS113TDXPadded (b9c4e7a1), written as hex.
COS_RTMRS = {
    "rtmr0": "a4de2df23e9611299123ba4359c42a5e578b0f8488bf1bba8ef5606d9ea5d81c97c064b482a5eac537d166bd0f0f752d",
    "rtmr1": "0ee9366c928a77092f55e9e114c7394181fd264699155f0df77d23577618d5f650568a17d379355a07bd846e552f4e20",
    "rtmr2": "4969684dc87381fc3b3134176c8d8806eaf0a901859f5f70cfae8d17714b46c10a8de219048c9fc09f11f381a6fbe7c1",
}
# The flashbots quote's registers (read from the quote in test_flashbots_quote_registers below).
FLASHBOTS = {
    "mrtd": "9bf86e6280ec4282b8b5822d8166410a456cdb720109aa799f0011fa63df1de3ee5e35e293fc410c061433163acb03a6",
    "rtmr0": "8d2d6ad6e569271bace0ad7deab00245b6a951745c53dfe4590add762b55b9c91033ef9dc6153aaf7fb2d2fb1e4b952b",
    "rtmr1": "c89d429d47bf02018b2638504926ff17072db1fbf1c60b1c7b13908e8a3792b3d0e10e407fe93692022144cd1d6e51ad",
    "rtmr2": "9caa04c96af83d3c412d45d644e4570ed2530381d8d565452e0cfd2d7b09dfcbef49738f80e3070e23f150be4be5b942",
}
# The inputs of flashbots/attested-tls crates/attestation/src/gcp.rs gcp_portable_image_hashes and
# gcp_portable_platform_metadata (e99e89a6): a 16 GiB VM with one further disk, empty Secure Boot keys.
FLASHBOTS_BOOT = {
    "gpt_event_sha384": "488fa3f08aae01c1a46b497319e8a7d3b7335c9ff4f4d7fe6a3dd62c844b03de22157c0303be58f10e3152687778e68d",
    "uki_authenticode_sha384":
        "82500f977e16a1e3fd47db792ac9c9fdd69caa73d8e719fe4489416355f23f5d0863ad796febfc1241bc3e868c3649a6",
    "kernel_authenticode_sha384":
        "b2a6076ae199d325e553a5102cf1f4a18b5e67e36b33261ef20352052199ec5853b5133c0231b16f1198bb086f1cbfac",
    "cmdline_sha384": "e03b89abf354a38976537b7a9138fd312e4cbf73b61eebc44086491701b1d167b9f6cb97a922325866c93e0834723d87",
    "initrd_sha384": "99251a9997f552ce98364e3f7311ca47471e299b6fdb31226d738a10577959ab741cc2e7b8c268236153de568265d3f2",
}
FLASHBOTS_ACPI = bootchain.ACPI_SETS[("c3-standard-4", "2026-06")]
JUNE = bootchain.FIRMWARES_BY_NAME["gce-2026-06"]


def flashbots_rtmr0_steps():
    return bootchain.rtmr0_steps(JUNE, "c3-standard-4", extra_disks=1, keyset="empty")


def _variable(guid: bytes, name: str, value: bytes) -> bytes:
    encoded = name.encode("utf-16-le")
    return guid + struct.pack("<QQ", len(encoded) // 2, len(value)) + encoded + value


def _boot_variable_data() -> dict[str, bytes]:
    """The UEFI_VARIABLE_DATA of GCE's Boot#### variables, as dstack's vTPM log holds them."""
    log = tcg.parse(TPM_LOG.read_bytes())
    return {tcg.variable(e.data)[1]: e.data for e in log.events if e.event_type == 0x80000002}


def _image_load(length: int) -> bytes:
    """UEFI_IMAGE_LOAD_EVENT with an empty device path (its content is not part of the digest)."""
    return struct.pack("<QQQQ", 0, length, 0, 4) + b"\x7f\xff\x04\x00"


def flashbots_ccel() -> bytes:
    """A CCEL as GCE's firmware would write it for the flashbots VM, built from the vector's inputs.
    Ours, not a capture: events whose digest is the hash of their data carry that real data (the
    EFI actions, separators, Secure Boot variables, BootOrder and, from dstack's vTPM log, the
    Boot#### variables); the others carry descriptive data, except the GPT event, whose bytes the
    vector does not have, which is logged as an EV_IPL note of its digest."""
    empty = bootchain.EMPTY_DER_SIGNATURE_LIST
    boot_vars = _boot_variable_data()
    efi, db = bootchain.EFI_GLOBAL_VARIABLE, bootchain.EFI_IMAGE_SECURITY_DATABASE
    data = {
        "SecureBoot = 0": (0x80000001, _variable(efi, "SecureBoot", b"\x00")),
        "PK (empty)": (0x80000001, _variable(efi, "PK", empty)),
        "KEK (empty)": (0x80000001, _variable(efi, "KEK", empty)),
        "db (empty)": (0x80000001, _variable(db, "db", empty)),
        "dbx (empty)": (0x80000001, _variable(db, "dbx", empty)),
        "separator": (0x04, b"\x00\x00\x00\x00"),
        "BootOrder = 0001,0002,0000": (0x80000002, _variable(efi, "BootOrder", struct.pack("<3H", 1, 2, 0))),
        **{name: (0x80000002, boot_vars[name]) for name in ("Boot0001", "Boot0002", "Boot0000")},
        "Calling EFI Application from Boot Option": (0x80000007, bootchain.CALLING_EFI_APP),
        "Exit Boot Services Invocation": (0x80000007, bootchain.EXIT_BOOT_SERVICES),
        "Exit Boot Services Returned with Success": (0x80000007, bootchain.EXIT_BOOT_SERVICES_SUCCESS),
        "UKI (Authenticode)": (0x80000003, _image_load(1 << 24)),
        "kernel (Authenticode)": (0x80000003, _image_load(1 << 23)),
        "GPT of the boot disk": (0x0D, b"GPT event (data not in the vector)"),
        "kernel command line (UTF-16LE)": (0x06, struct.pack("<II", 0x8F3B22ED, 0)),
        "initrd": (0x06, struct.pack("<II", 0x8F3B22EC, 0)),
    }
    out = tcg.encode_spec_id(["sha384"])
    registers = [(1, flashbots_rtmr0_steps()), (2, bootchain.rtmr1_steps(FLASHBOTS_BOOT)),
                 (3, bootchain.rtmr2_steps(FLASHBOTS_BOOT))]
    for register, steps in registers:
        for step in steps:
            kind, body = data.get(step.what, (0x8000000A if "CFV" in step.what else 0x8000000B
                                              if "HOB" in step.what else 0x0A, step.what.encode()))
            out += tcg.encode_event(register, kind, {"sha384": step.digest}, body)
    return out + b"\xff" * 4096


# ---------------------------------------------------------------------------------------------
# Event logs


def test_real_gce_ccel_replays_to_the_registers_go_eventlog_records():
    data = COS_CCEL.read_bytes()
    assert len(data) == 262144 and data.endswith(b"\xff" * 1024)
    log = ccel.parse(data, "ccel")
    assert log.algorithms == {"sha384": 48} and log.padding == 262144 - 18101
    assert ccel.replayed(log) == COS_RTMRS
    assert not tcg.data_mismatches(log)


def test_real_ccel_events_read_as_what_they_are():
    lines = ccel.listing(ccel.parse(COS_CCEL.read_bytes(), "ccel"))
    text = "\n".join(lines)
    assert lines[0].startswith("RTMR0 #1   EV_EFI_HANDOFF_TABLES2: TdxTable")
    assert "firmware volume Fv(48DB5E17-707C-472D-91CD-1613E7EF51B0)" in text
    assert "SecureBoot = 0 (off)" in text and "BootOrder = 0001,0000" in text
    assert "Boot0001: 'UEFI nvme_card-pd'" in text and "\\EFI\\BOOT\\BOOTX64.EFI" in text
    assert "EV_IPL: kernel_cmdline: /syslinux/vmlinuz.A init=/usr/lib/systemd/systemd" in text
    assert "EV_EFI_GPT_EVENT: GPT of disk" in text


def test_padding_is_refused_where_a_log_must_not_have_it():
    with pytest.raises(tcg.EventLogError, match="neither an event nor 0xFF padding"):
        tcg.parse(COS_CCEL.read_bytes(), allow_padding=False)
    assert len(tcg.parse(COS_CCEL.read_bytes()[:18101], allow_padding=False).events) == 43


FIRST_EVENT = 32 + struct.unpack("<I", COS_CCEL.read_bytes()[28:32])[0]  # after the Spec ID event


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d[:FIRST_EVENT + 40], "truncated"),
        (lambda d: b"\x00" * 8 + d[8:], "does not open with a 'Spec ID Event03'"),
        (lambda d: d[:18101] + b"\x01\x02\x03", "trailing bytes"),
        (lambda d: d[:FIRST_EVENT + 8] + struct.pack("<I", 999) + d[FIRST_EVENT + 12:], "digests; the log declares 1"),
        (lambda d: d[:56] + struct.pack("<I", 99) + d[60:], "declares 99 algorithms"),
        (lambda d: b"", "needs 32 bytes"),
    ],
)
def test_malformed_logs_are_named_not_crashes(edit, message):
    with pytest.raises(InputError, match=message):
        ccel.parse(edit(COS_CCEL.read_bytes()), "--ccel x")


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=400))
def test_arbitrary_bytes_never_crash_the_parser(blob):
    for data in (blob, tcg.encode_spec_id(["sha384"]) + blob):
        try:
            tcg.parse(data)
        except tcg.EventLogError:
            pass


def test_a_vtpm_log_is_not_taken_for_a_ccel_and_a_ccel_not_for_a_vtpm_log():
    with pytest.raises(InputError, match="vTPM"):
        ccel.parse(tcg.encode_spec_id(["sha256"]), "--ccel x")
    with pytest.raises(InputError, match="no SHA-256 bank"):
        vtpm.parse(COS_CCEL.read_bytes()[:18101], "--tpm-event-log x")


def test_an_edited_event_description_is_caught():
    data = bytearray(COS_CCEL.read_bytes())
    at = data.index("UEFI nvme_card-pd".encode("utf-16-le"))
    data[at] ^= 0x20  # "uEFI", same digest
    log = ccel.parse(bytes(data), "ccel")
    assert ccel.replayed(log) == COS_RTMRS  # the digests are untouched ...
    assert [e.number for e in tcg.data_mismatches(log)] == [13]  # ... but the shown data is not measured


# ---------------------------------------------------------------------------------------------
# The vTPM lane


def test_dstack_vtpm_log_passes_the_pinned_verifiers_checks():
    """Dstack-TEE/dstack f1ba0a22 verifier/src/verification.rs verify_os_image_hash_for_gcp_tdx:
    PCR0 == EXPECTED_PCR0, the third PCR2 event == the UKI hash."""
    log = vtpm.parse(TPM_LOG.read_bytes(), "tpm")
    assert log.replay("sha256")[0].hex() == "0cca9ec161b09288802e5a112255d21340ed5b797f5fe29cecccfd8f67b9f802"
    assert log.replay("sha256")[2].hex() == "1f74355f18d9aab3a26faa060d2058726554207d040c63d25d501d97f5a41e0f"
    assert vtpm.firmware_object(log) == bootchain.FIRMWARES_BY_NAME["gce-2025"].firmware_sha384
    uki = "9ab14a46f858662a89adc102d2a57a13f52f75c1769d65a4c34edbbfc8855f0f"
    checks = {c.name: c for c in vtpm.checks(log, uki_hash=uki, quote_mrtd=None)}
    assert checks["vTPM PCR0 (GCE firmware)"].holds and "gce-2025" in checks["vTPM PCR0 (GCE firmware)"].actual
    assert checks["vTPM PCR2 UKI event"].holds
    assert "replayed, not authenticated" in checks["vTPM PCR2 UKI event"].actual
    assert checks["vTPM log authenticity"].holds is None
    assert "replayed, not authenticated" in checks["vTPM log authenticity"].note


def test_a_tampered_vtpm_log_fails():
    data = bytearray(TPM_LOG.read_bytes())
    log = vtpm.parse(bytes(data), "tpm")
    uki_event = vtpm.uki_event(log)
    # another UKI: its SHA-256 digest in the log
    at = data.index(uki_event.digests["sha256"], uki_event.offset)
    data[at] ^= 1
    tampered = vtpm.parse(bytes(data), "tpm")
    checks = {c.name: c for c in vtpm.checks(tampered, uki_hash=uki_event.digests["sha256"].hex(), quote_mrtd=None)}
    assert checks["vTPM PCR2 UKI event"].holds is False


def test_unknown_firmware_is_unknown_not_a_mismatch():
    data = bytearray(TPM_LOG.read_bytes())
    log = vtpm.parse(bytes(data), "tpm")
    version = log.events[2]  # EV_S_CRTM_VERSION "GCE Virtual Firmware v2", PCR0
    at = data.index(version.digests["sha256"], version.offset)
    data[at] ^= 1
    checks = {c.name: c for c in vtpm.checks(vtpm.parse(bytes(data), "tpm"), uki_hash=None, quote_mrtd=None)}
    assert checks["vTPM PCR0 (GCE firmware)"].holds is None
    assert checks["vTPM PCR0 (GCE firmware)"].note.startswith("unknown firmware")
    assert checks["vTPM event data"].holds is False  # the version string no longer hashes to its digest


def test_vtpm_firmware_and_the_quoted_mrtd_must_agree():
    log = vtpm.parse(TPM_LOG.read_bytes(), "tpm")
    checks = {c.name: c for c in vtpm.checks(log, uki_hash=None, quote_mrtd=FLASHBOTS["mrtd"])}
    assert checks["vTPM firmware = quote MRTD"].holds is False
    same = {c.name: c for c in vtpm.checks(log, uki_hash=None, quote_mrtd=bootchain.FIRMWARES_BY_NAME["gce-2025"].mrtd)}
    assert same["vTPM firmware = quote MRTD"].holds is True


# ---------------------------------------------------------------------------------------------
# Firmware table and constants


def test_hob_template_is_the_vectors_and_gives_dstack_mr_gcps_hob_per_shape():
    firmware = yaml.safe_load((GCP / "flashbots-gcp-tdx-firmware.yaml").read_text())
    assert bootchain.GCE_HOB.data.hex() == firmware["hob"]["bytes"]
    assert (bootchain.GCE_HOB.length_offset, bootchain.GCE_HOB.ram_threshold) == (
        firmware["hob"]["length_offset"], firmware["hob"]["ram_threshold"])
    assert JUNE.mrtd == firmware["mrtd"] and JUNE.cfv == firmware["cfv"]
    for shape, config in CONSTS["machine_configurations"].items():
        gib = {"c3-standard-4": 16, "c3-standard-8": 32, "c3-standard-22": 88, "c3-standard-44": 176}[shape]
        assert bootchain.GCE_HOB.digest(gib * bootchain.GIB).hex() == config["td_hob_sha384"], shape
    with pytest.raises(ValueError, match="below the firmware"):
        bootchain.GCE_HOB.digest(2 * bootchain.GIB)


def test_firmware_table_matches_dstack_mr_gcp():
    ours = {f.firmware_sha384: f.mrtd for f in bootchain.FIRMWARES if f.firmware_sha384}
    assert ours == {e["firmware_sha384"]: e["mrtd"] for e in CONSTS["firmware_mrtd"]}
    assert len({f.mrtd for f in bootchain.FIRMWARES}) == len(bootchain.FIRMWARES)
    assert [f.seen for f in bootchain.FIRMWARES] == sorted(f.seen for f in bootchain.FIRMWARES)


def test_acpi_sets_match_dstack_mr_gcp():
    period = {"Pre-March 2026 firmware": "before 2026-03", "March 2026": "2026-03", "April 2026": "2026-04"}
    for shape, config in CONSTS["machine_configurations"].items():
        for entry in config["acpi_sets"]:
            key = next(v for k, v in period.items() if entry["comment"].startswith(k))
            ours = bootchain.ACPI_SETS[(shape, key)]
            assert (ours.loader, ours.rsdp, ours.tables) == (entry["acpi_loader"], entry["acpi_rsdp"],
                                                             entry["acpi_tables"]), (shape, key)


def test_variable_digests_are_the_formula_and_the_vtpm_logs():
    """Easy-TEE/attest secure_boot.rs driver_config_event_digests, and the dstack vTPM log's
    SHA-384 bank for GCE's default keys and the Boot#### variables."""
    empty = bootchain.KEYSETS["empty"]
    consts = CONSTS["secure_boot_var_sha384"]
    assert bootchain.SECURE_BOOT_OFF.hex() == consts["secureBoot"]
    assert (empty.pk, empty.kek, empty.db, empty.dbx) == (consts["pk"], consts["kek"], consts["db"], consts["dbx"])
    log = tcg.parse(TPM_LOG.read_bytes())
    variables = {tcg.variable(e.data)[1]: e for e in log.events if e.event_type in (0x80000001, 0x80000002)}
    default = bootchain.KEYSETS["gce-default-2025-11"]
    for name, digest in (("PK", default.pk), ("KEK", default.kek), ("db", default.db), ("dbx", default.dbx)):
        event = variables[name]
        assert event.digests["sha384"].hex() == digest
        assert hashlib.sha384(event.data).hexdigest() == digest  # the digest is of the whole UEFI_VARIABLE_DATA
    assert variables["SecureBoot"].digests["sha384"] == bootchain.SECURE_BOOT_OFF
    for name, digest in bootchain.BOOT_VARIABLES.items():
        assert variables[name].digests["sha384"].hex() == digest, name
    assert consts and CONSTS["boot_var_sha384"] == {k: v for k, v in bootchain.BOOT_VARIABLES.items() if k != "Boot0003"}
    order = variables["BootOrder"]
    assert order.digests["sha384"] == hashlib.sha384(struct.pack("<4H", *bootchain.boot_order(2))).digest()


# ---------------------------------------------------------------------------------------------
# Prediction, byte for byte


def test_flashbots_quote_registers():
    from fleet.attest import quote

    assert {k: v for k, v in quote.registers(quote.parse(FLASHBOTS_QUOTE.read_bytes())).items()
            if k != "rtmr3"} == FLASHBOTS


def test_flashbots_rtmr0_to_2_reproduce_from_their_inputs():
    assert bootchain.replay(flashbots_rtmr0_steps()).hex() == FLASHBOTS["rtmr0"]
    assert bootchain.replay(bootchain.rtmr1_steps(FLASHBOTS_BOOT)).hex() == FLASHBOTS["rtmr1"]
    assert bootchain.rtmr2_value(FLASHBOTS_BOOT).hex() == FLASHBOTS["rtmr2"]
    assert JUNE.mrtd == FLASHBOTS["mrtd"]


def test_every_input_moves_the_registers():
    base = bootchain.replay(flashbots_rtmr0_steps())
    other_ram = bootchain.rtmr0_steps(JUNE, "c3-standard-4", extra_disks=1, keyset="empty", ram_bytes=32 * bootchain.GIB)
    assert bootchain.replay(other_ram) != base
    assert bootchain.replay(bootchain.rtmr0_steps(JUNE, "c3-standard-4", extra_disks=1)) != base  # default keys
    with pytest.raises(bootchain.MissingInputs, match="Boot0004"):
        bootchain.rtmr0_steps(JUNE, "c3-standard-4", extra_disks=3)
    for key in FLASHBOTS_BOOT:
        changed = dict(FLASHBOTS_BOOT, **{key: "00" * 48})
        assert (bootchain.replay(bootchain.rtmr1_steps(changed)).hex(), bootchain.rtmr2_value(changed).hex()) != (
            FLASHBOTS["rtmr1"], FLASHBOTS["rtmr2"]), key


def test_flashbots_ccel_fixture_replays_to_the_quote():
    log = ccel.parse(flashbots_ccel(), "fixture")
    assert not tcg.data_mismatches(log)
    assert ccel.replayed(log) == {k: FLASHBOTS[k] for k in ("rtmr0", "rtmr1", "rtmr2")}
    assert ccel.first_difference(log, "rtmr0", flashbots_rtmr0_steps()) == "every expected event is in the log"
    other = bootchain.rtmr0_steps(JUNE, "c3-standard-4", extra_disks=1)  # GCE default keys instead
    assert ccel.first_difference(log, "rtmr0", other).startswith("event 4 of RTMR0: expected PK (gce-default-2025-11)")


def test_missing_inputs_are_named():
    expected = bootchain.expected_registers("c3-standard-8", extra_disks=2, boot=None)
    assert expected["rtmr1"] == expected["rtmr2"] == "missing inputs"
    assert "rtmr1: the image records no boot inputs" in expected["missing"]
    assert expected["firmware"]["gce-2025"]["rtmr0"] == "missing inputs"
    assert "rtmr0 on gce-2025: CFV digest of firmware gce-2025 (not published)" in expected["missing"]
    assert len(expected["firmware"]["gce-2026-04"]["rtmr0"]) == 96  # ACPI of c3-standard-8 is known for April
    assert sorted(expected["mrtd"]) == sorted(f.mrtd for f in bootchain.FIRMWARES)
    partial = bootchain.expected_registers("c3-standard-4", extra_disks=1, boot={"cmdline_sha384": "ab" * 48})
    assert "rtmr2: initrd_sha384 (SHA-384 of the UKI's .initrd)" in partial["missing"]
    pending = bootchain.expected_registers("c3-standard-4", extra_disks=1, boot=None, pending=True)
    assert pending["rtmr1"] == pending["rtmr2"] == "pending build"
    unknown = bootchain.expected_registers("n2-standard-4", extra_disks=1, boot=None)
    assert any("memory of machine type n2-standard-4" in m for m in unknown["missing"])


def test_pe_sections_start_rtmr2():
    sections = [(".linux", b"kernel"), (".cmdline", b"console=ttyS0")]
    start = bootchain.pe_sections_register(sections)
    manual = bootchain.ZERO
    for name, content in sections:
        manual = bootchain.extend(manual, hashlib.sha384(name.encode() + b"\x00").digest())
        manual = bootchain.extend(manual, hashlib.sha384(content).digest())
    assert start == manual
    with_sections = dict(FLASHBOTS_BOOT, pe_sections_sha384=start.hex())
    assert bootchain.rtmr2_value(with_sections) == bootchain.extend(
        bootchain.extend(start, bytes.fromhex(FLASHBOTS_BOOT["cmdline_sha384"])),
        bytes.fromhex(FLASHBOTS_BOOT["initrd_sha384"]))
