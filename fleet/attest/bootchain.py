"""Expected MRTD and RTMR0-2 of a TDX guest on GCP, from recorded inputs only.

Nobody publishes these for custom images: Google endorses MRTDs but no RTMRs
(google/gce-tcb-verifier#73) and dstack does not compare MRTD/RTMR0-2 on GCP
(Dstack-TEE/dstack#1296). They are computable offline:

* **MRTD** is the firmware's: one value per GCE firmware release (``FIRMWARES``, a dated table).
* **RTMR0** is the platform: the TD HOB (the firmware's HOB template with the VM's memory),
  the firmware's configuration volume (CFV), the Secure Boot variables the instance was created
  with, a separator, the machine shape's three ACPI events, BootOrder and one Boot#### variable per
  disk.
* **RTMR1** is the boot path: the EFI application call, a separator, the GPT of the boot disk,
  the UKI's and its kernel's Authenticode SHA-384, and the two ExitBootServices actions.
* **RTMR2** is what the kernel's EFI stub measures: the command line (UTF-16LE, NUL-terminated)
  and the initrd, after the UKI's section events when systemd-stub measures them (>= 256).

Formulas: Easy-TEE/attest ``crates/measure/src/dcap/gcp.rs``, ``dcap/mod.rs``,
``dcap/firmware.rs``, ``dcap/secure_boot.rs`` at 17d6d8b34c21db581da1a4829b2a9c0a113dd19d (MIT).
Constants: flashbots/dstack-mr-gcp ``internal/consts.go`` at b16e08b32b3dc8f1af7087e12f9970dc91a0b9a0
(Apache-2.0), flashbots/attested-tls ``crates/attestation/test-assets/gcp-tdx-firmware-1782809233226668671.yaml``
(added in e99e89a6292eb543143974bf2567e90d2d9daa8a, MIT) and the vTPM log of a dstack boot on GCE
(Dstack-TEE/dstack ``cc-eventlog/samples/tpm_eventlog.bin``, CC0-1.0), whose SHA-384 bank holds
the same UEFI variable and ACPI digests the firmware extends into RTMR0. Every value is tested
byte for byte: the flashbots GCP quote's RTMR0-2 reproduce from its inputs.
"""

from __future__ import annotations

import hashlib
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from fleet.gcp import tdx

GIB = 1 << 30
PENDING_BUILD = "pending build"
ZERO = bytes(48)

CALLING_EFI_APP = b"Calling EFI Application from Boot Option"
EXIT_BOOT_SERVICES = b"Exit Boot Services Invocation"
EXIT_BOOT_SERVICES_SUCCESS = b"Exit Boot Services Returned with Success"
SEPARATOR = b"\x00\x00\x00\x00"


def sha384(data: bytes) -> bytes:
    return hashlib.sha384(data).digest()


def extend(register: bytes, digest: bytes) -> bytes:
    return hashlib.sha384(register + digest).digest()


@dataclass(frozen=True)
class Step:
    """One extension of a register: what was measured, and its SHA-384 digest."""

    what: str
    digest: bytes

    def to_json(self) -> dict[str, str]:
        return {"event": self.what, "digest": self.digest.hex()}


def replay(steps: Sequence[Step]) -> bytes:
    value = ZERO
    for step in steps:
        value = extend(value, step.digest)
    return value


# ---------------------------------------------------------------------------------------------
# The TD HOB


@dataclass(frozen=True)
class HobTemplate:
    """GCE's TD HOB with a placeholder for the memory above ``ram_threshold`` (Easy-TEE/attest
    ``HobTemplate::digest``: the little-endian u64 at ``length_offset`` is RAM - threshold)."""

    data: bytes
    length_offset: int
    ram_threshold: int

    def digest(self, ram_bytes: int) -> bytes:
        if ram_bytes < self.ram_threshold:
            raise ValueError(f"{ram_bytes} bytes of RAM is below the firmware's {self.ram_threshold}-byte threshold")
        data = bytearray(self.data)
        data[self.length_offset:self.length_offset + 8] = (ram_bytes - self.ram_threshold).to_bytes(8, "little")
        return sha384(bytes(data))


# flashbots/attested-tls gcp-tdx-firmware-1782809233226668671.yaml ``hob`` (GCE firmware of
# 2026-06-30). With 16, 32, 88 and 176 GiB it gives exactly dstack-mr-gcp's TdHobHash of
# c3-standard-4/8/22/44, which dstack-mr-gcp uses for every firmware it knows, and Easy-TEE/attest's
# firmware test finds the same four digests for the March and April 2026 firmware.
GCE_HOB = HobTemplate(
    data=bytes.fromhex(
        "01003800000000000900000000000000000000000000000000000000000000000000000000000000000000000000000048928000"
        "0000000003003000000000000000000000000000000000000000000000000000070000000000e2ff0000000000001e0000000000"
        "03003000000000000000000000000000000000000000000000000000070000000000e0ff00000000000002000000000003003000"
        "00000000000000000000000000000000000000000000000007000000000081000000000000000100000000000300300000000000"
        "00000000000000000000000000000000000000000700000000b08000000000000020000000000000030030000000000000000000"
        "00000000000000000000000000000000070000000090800000000000002000000000000003003000000000000000000000000000"
        "00000000000000000000000007000000000080000000000000600000000000000300300000000000000000000000000000000000"
        "00000000070000000700001000000000000000000000800000000000030030000000000000000000000000000000000000000000"
        "07000000070000100060800000000000003000000000000003003000000000000000000000000000000000000000000007000000"
        "0700001000d080000000000000300000000000000300300000000000000000000000000000000000000000000700000007000010"
        "000082000000000000007ebf00000000030030000000000000000000000000000000000000000000070000000700001000000000"
        "010000000000000000000000"
    ),
    length_offset=576,
    ram_threshold=3 * GIB,
)


# ---------------------------------------------------------------------------------------------
# Firmware releases


@dataclass(frozen=True)
class Firmware:
    """One GCE TDX firmware release."""

    name: str
    seen: str  # when it was first recorded in the sources below
    mrtd: str
    firmware_sha384: str | None  # the .fd object name under gs://gce_tcb_integrity/ovmf_x64_csm
    cfv: str | None  # SHA-384 of the configuration firmware volume (RTMR0's second event)
    acpi: str  # which ACPI sets (ACPI_SETS) GCE serves with it
    pcr0: str | None  # the vTPM's SHA-256 PCR0 on this firmware, where a log shows it
    source: str
    hob: HobTemplate = GCE_HOB


FIRMWARES: tuple[Firmware, ...] = (
    Firmware(
        name="gce-2025", seen="2025-12-19", acpi="before 2026-03",
        mrtd="a5844e88897b70c318bef929ef4dfd6c7304c52c4bc9c3f39132f0fdccecf3eb5bab70110ee42a12509a31c037288694",
        firmware_sha384="ff11d313b462e2c7b08143f54785f77f71f55f71673d934c8e209c086294548c8c61eff4b3a9dd0708e3e5d79e163f39",
        cfv=None, pcr0="0cca9ec161b09288802e5a112255d21340ed5b797f5fe29cecccfd8f67b9f802",
        source="dstack-mr-gcp consts.go FirmwareMRTDs[0]; named by the SP800-155 event of dstack's GCE vTPM log "
               "(cc-eventlog/samples/tpm_eventlog.bin, added 2025-12-19), whose PCR0 is the pinned verifier's "
               "EXPECTED_PCR0 (Dstack-TEE/dstack f1ba0a22 verifier/src/verification.rs). CFV not published",
    ),
    Firmware(
        name="gce-2026-03", seen="2026-03-13", acpi="2026-03",
        mrtd="8370d8f6d02f2d13e211e91c93fde923049522b241425a29a7bf0071ef49b250af4ef49d852fa3e10065d1b51dfce8fb",
        firmware_sha384="afa88de3952c1b3f696fb5c526493742ff25131848bd769305c69166103a53790d010ffb34149b5f428df6eaa39a2749",
        cfv="16a03d3d47d197945e85080880f6af2d87355f3d1eae2e27295d286e2ce7da3df4128d5d20a31d4c2cb3b20e91aecbca",
        pcr0=None,
        source="dstack-mr-gcp consts.go FirmwareMRTDs[1]; CFV from Easy-TEE/attest dcap/firmware.rs check_gcp_firmware "
               "('March 2026 firmware')",
    ),
    Firmware(
        name="gce-2026-04", seen="2026-04-14", acpi="2026-04",
        mrtd="feb7486608382c1ff0e15b4648ddc0acea6ca974eb53e3529f4c4bd5ffbaa20bf335cb75965cea65fe473aed9647c162",
        firmware_sha384="f53fdf89544e1e6d785eee42d0a4bb38e26b36e951be537ac22114d210f2d5239eba243dd71991afe8345e7020974a46",
        cfv="9cb6bf09aea7b4acb8549e328d0edd6f15defc0b00d744bb9fb5bab0962bc5c70f69d233e96dbc7c1105ba085781dc88",
        pcr0=None,
        source="dstack-mr-gcp consts.go FirmwareMRTDs[2]; CFV from Easy-TEE/attest dcap/firmware.rs check_gcp_firmware "
               "('April 2026 firmware')",
    ),
    Firmware(
        name="gce-2026-06", seen="2026-06-30", acpi="2026-06",
        mrtd="9bf86e6280ec4282b8b5822d8166410a456cdb720109aa799f0011fa63df1de3ee5e35e293fc410c061433163acb03a6",
        firmware_sha384=None,
        cfv="d10d31022a1ef32ee501f31745257f84e7c753a8b79a3fdb82ffda9dc57684a1cfefba3edcdabc8b4ea791c17dd8a02b",
        pcr0=None,
        source="flashbots/attested-tls gcp-tdx-firmware-1782809233226668671.yaml (mrtd, cfv, hob), the MRTD of the "
               "GCP quote gcp-tdx-1782809233226668671 taken 2026-06-30; firmware object name not recorded",
    ),
)


FIRMWARES_BY_NAME = {f.name: f for f in FIRMWARES}


def firmware_by_pcr0(pcr0: str) -> Firmware | None:
    return next((f for f in FIRMWARES if f.pcr0 is not None and f.pcr0 == pcr0.lower()), None)


# ---------------------------------------------------------------------------------------------
# ACPI tables per machine shape and firmware


@dataclass(frozen=True)
class AcpiSet:
    loader: str
    rsdp: str
    tables: str
    source: str


_MR_GCP = "dstack-mr-gcp consts.go machineConfigurations"
ACPI_SETS: dict[tuple[str, str], AcpiSet] = {
    ("c3-standard-4", "before 2026-03"): AcpiSet(
        "f29e022d067da7289c935eec2477c46032f2e0659a11e658f0ae05068aea420189e77e302b715084dacc7c0c4c118ea6",
        "509dcfe10beb5d470c40f25e30895370948831b9cf79db15d977e7bba8eb42f7200212071ad8b19d6011759779eced5a",
        "0f0b426cbd5bd9c2a4a5e640e6c4556b8df071dcc973dcf95465ae5514c0eba6dc960a6b7b21d29099cada75dc1b46d5",
        f"{_MR_GCP} (Pre-March 2026 firmware); the same three ACPI DATA events are in dstack's vTPM log"),
    ("c3-standard-4", "2026-03"): AcpiSet(
        "02d9b85e7df1e92d15d85988b161fdf60626bff433af8055f367b134260d59f6a0dab0965254627aecb1367373d74b3a",
        "ba3706e632a5cb239f1c85febafcfeadebdfe3ed1a4d716d46387ad0803b4c4a7fecbcad2c05cd390e5f4f3548e303dc",
        "d221bae226ed9811ec5977c8f15dbe8c97ff80d67bbd4246d5ecf60f7c61081e597e18df601a657a46cbdeb773ab8f88",
        f"{_MR_GCP} (March 2026 firmware, mripper 2026-03-13)"),
    ("c3-standard-4", "2026-04"): AcpiSet(
        "595afd922c90ebbe335c7973d0bd3ffcc7820b41f81929ad80b3b5e919b51fc07c0ff23ebb14088563e2b2886412415c",
        "f877abf8389a35d12290902a3d769a970bbbc16dc6fc568817c09fd6534c2752f3bcff8c2afeb65f8be93e248e58052d",
        "7605e3e2cad7be3aff8d19dba4fbaf8b12b3322cf9d1afdd1587ec75c12588c628595008b49243d58843ed0e1bad63e9",
        f"{_MR_GCP} (April 2026 firmware, mripper 2026-04-14)"),
    ("c3-standard-4", "2026-06"): AcpiSet(
        "f60c35e53bb21b4675cfa8db310ec88e38cd369d8d463acdde815122fa8b893b8896a5783b538856693ed7645ddb897e",
        "509dcfe10beb5d470c40f25e30895370948831b9cf79db15d977e7bba8eb42f7200212071ad8b19d6011759779eced5a",
        "0bb0afa008873bdc20dee0f741da7896c2bfeee94ae52e9bdbf94bc87c32d04a4b1f1d824490f1dae574ff6d4e4bb0b3",
        "flashbots/attested-tls crates/attestation/src/gcp.rs gcp_portable_platform_metadata (16 GiB VM of 2026-06-30; "
        "the shape is not named there, c3-standard-4 is our inference from its memory)"),
    ("c3-standard-8", "2026-04"): AcpiSet(
        "817ed5d198c9f02b43cab233916b71c0a02b7c27507dc2331a619bf314635a4d82f52a69dc29ce2490694b1058147cd8",
        "98ee59933be736e33f9d2d5be7777c9f30fdf93056a4893638f559c130bfe852d63d5559b2e72f5e1b7e48f35657b8c4",
        "7d11e4c6983fbf869814962a69bac39a6cd5947467841de602a169af3f9a77974ee740f62336a94bf694f056476fa32d",
        f"{_MR_GCP} (April 2026 firmware, mripper 2026-06-10)"),
    ("c3-standard-22", "2026-03"): AcpiSet(
        "29342ab42c2814109d694110d1c9a7558e08c7c87e478b348fc4944fcae2105c708813dc0a01fd29a2189d760d41ad03",
        "440eef6064096f13201108d30c9b466c0c6b6ed207c8028f7425442c164e80080d8a9bbb6f6b56be48fdf2c830d99f86",
        "2a42acbb09b7d0e59b59e09f775cb5b7748d0906d87bb886cf87081b6aa1213e42bb745e1ac19064c0cea19a6cfa5aeb",
        f"{_MR_GCP} (March 2026 firmware, mripper 2026-03-13)"),
    ("c3-standard-22", "2026-04"): AcpiSet(
        "e604eb632926426ea42bf22c97845e499b116d9988d163897c06595c501d924ba4b32600df960a70482c5e7665fde31f",
        "fa3427613d7ea513391e308dd91f254d52744131e080d01e5c09c170e897edef34afb1f83efea74d6729bdad929032bf",
        "b9d101b755cf100437205fa4cdec9660e451d31d3707eba607d5e2aea8cd76976f71a9ede56d091787e7a81189b3a549",
        f"{_MR_GCP} (April 2026 firmware, mripper 2026-04-14)"),
    ("c3-standard-44", "before 2026-03"): AcpiSet(
        "8b8256b4dd618ea330a3c499fd211b9fa681b8205c470013b9c13ca3263c5da5b2e253f89ee0ca5111a41f8054856df3",
        "c104e3179249648403077f70784b26c9844394177179145e28844b2dc7e40b34d0fad0ba22b3a3cef00197d2bd58f4c4",
        "c4ae73d7e84f15aa17f7fcf50c83b2846e7e6628cff7f993531b6d8de129bd84359e234feeaf5e4c4a4c87a167161960",
        f"{_MR_GCP} (Pre-March 2026 firmware)"),
    ("c3-standard-44", "2026-03"): AcpiSet(
        "0fb22ea8315f50939d88e835e425b083b4e87c5a738b6b09e03191d0583bba7e35091de84770ce643bd17828c96a50e6",
        "eb2ecd4e4ff962f12888ed1e0209437d1c1dbd9cce050286e10dd79b33d000075bd4287b6066c482a1d4851c07485e97",
        "0381c7a53b1fa332467e6ea7240fb38b8ea5e6740af0b5c496c8d66e0647da7706b6e149b9fd00c420572b419ffc9608",
        f"{_MR_GCP} (March 2026 firmware, mripper 2026-03-13)"),
    ("c3-standard-44", "2026-04"): AcpiSet(
        "7a40e09ee7fe41bac83bf518a611f2d223bd433189e0757cc9893646a850b77578266ff53652f38f2b28b91e3471e708",
        "f1466ad49807c50b0df671c155c03a85abce04aad460c8a078f412299056834b3dc3bcbb8b0816d86997eedc21bce1e0",
        "71f14359dc15c2ba4f9c31fcc04f75d57849d3c0476ab72aef4dbff02182ff8eb7c18dd8d89cc6def235dc2c56a6ee49",
        f"{_MR_GCP} (April 2026 firmware, mripper 2026-04-14)"),
}


# ---------------------------------------------------------------------------------------------
# UEFI variables


EFI_GLOBAL_VARIABLE = bytes.fromhex("61dfe48bca93d211aa0d00e098032b8c")
EFI_IMAGE_SECURITY_DATABASE = bytes.fromhex("cbb219d73a3d9645a3bcdad00e67656f")
# An EFI_SIGNATURE_LIST holding one minimal DER stub: what GCE's firmware reports for PK, KEK, db
# and dbx of the flashbots image (Easy-TEE/attest dcap/secure_boot.rs EMPTY_DER_SIG_LIST).
EMPTY_DER_SIGNATURE_LIST = bytes.fromhex(
    "a159c0a5e494a74a87b5ab155c2bf072" "34000000" "00000000" "18000000" "d2fa81d2888da44797925baa47bb1b89"
    "3082010a02820101")


def variable_digest(guid: bytes, name: str, value: bytes) -> bytes:
    """SHA-384 of a UEFI_VARIABLE_DATA: what EV_EFI_VARIABLE_DRIVER_CONFIG extends."""
    encoded = name.encode("utf-16-le")
    return sha384(guid + struct.pack("<QQ", len(encoded) // 2, len(value)) + encoded + value)


SECURE_BOOT_OFF = variable_digest(EFI_GLOBAL_VARIABLE, "SecureBoot", b"\x00")


@dataclass(frozen=True)
class KeySet:
    """PK, KEK, db and dbx as the firmware measures them (SHA-384 per variable event)."""

    name: str
    pk: str
    kek: str
    db: str
    dbx: str
    source: str


KEYSETS: dict[str, KeySet] = {
    # Images created without shielded_instance_initial_state get GCE's default keys; from
    # 2025-11-07 GCE's defaults include Microsoft's 2023 certificates (docs.cloud.google.com
    # compute/docs/security/ms-secure-boot-certificates-expiration). Digests: the SHA-384 bank of
    # events 6-9 of dstack's GCE vTPM log, which hold PK 'newpk', KEK with Microsoft KEK CA 2011 and
    # 2023, db with the 2011 and 2023 UEFI and Windows CAs, and a dbx of 183 hashes and 3 certificates.
    "gce-default-2025-11": KeySet(
        "gce-default-2025-11",
        pk="a763553c9606770cd3a5e607f8e0c1ef01cdf2555af753fa3a1f6afe43eb7b2a0af4a6f80fd8e4dd10459668f3b011e0",
        kek="fd111537e6c0f7ca64fd189ee784cde86214e8495dbc36cd0ccbb5006377d250ab352fe05378bac5a81fa3132c58851e",
        db="0968b4cf1dde5df9983f718588e67eca142ba481ba1e517e97c701e740641027ad891a7e9da539cae4e17df0a9d22322",
        dbx="4285252d954a0241a9788ee5c54ea6e0f1e0df7ff39c7c1ea81888cfd2d37a4b7888f38a2c0e0b6336df972ed6cbadd9",
        source="Dstack-TEE/dstack cc-eventlog/samples/tpm_eventlog.bin events 6-9 (SHA-384 bank)",
    ),
    # The flashbots image's variables (one empty DER stub each), as in the flashbots GCP quote.
    "empty": KeySet(
        "empty",
        pk=variable_digest(EFI_GLOBAL_VARIABLE, "PK", EMPTY_DER_SIGNATURE_LIST).hex(),
        kek=variable_digest(EFI_GLOBAL_VARIABLE, "KEK", EMPTY_DER_SIGNATURE_LIST).hex(),
        db=variable_digest(EFI_IMAGE_SECURITY_DATABASE, "db", EMPTY_DER_SIGNATURE_LIST).hex(),
        dbx=variable_digest(EFI_IMAGE_SECURITY_DATABASE, "dbx", EMPTY_DER_SIGNATURE_LIST).hex(),
        source="Easy-TEE/attest dcap/secure_boot.rs (EMPTY_DER_SIG_LIST); dstack-mr-gcp consts.go pkHash..dbxHash",
    ),
}
# Our images are created without shielded_instance_initial_state (components/images.py), on
# instances created after 2025-11-07.
DEFAULT_KEYSET = "gce-default-2025-11"

# Boot#### variables GCE's firmware creates: Boot0001 for the boot disk ("UEFI nvme_card-pd",
# NVMe namespace 1), Boot000<n+1> for the n-th further disk ("UEFI nvme_card-pd <n+1>"), Boot0000
# the firmware's UiApp. EV_EFI_VARIABLE_BOOT digests are of the variable's value alone. Observed in
# dstack's vTPM log (BootOrder 0001,0002,0003,0000: two further disks) and in Easy-TEE/attest
# gcp.rs BOOT_0001/0002/0000_HASH (one further disk); a node with more disks has Boot#### entries
# nobody has recorded yet.
BOOT_VARIABLES = {
    "Boot0001": "a25333c7aec2e0993034938c7f11893b3c2bcaf67e88c342a3d586f6f7fae2c6a1247a9ed86988080a6d4be497d4fbb6",
    "Boot0002": "9068065754ff3ae3dd58a5897535eeaf62a19a6757d82dd91349c41bae2e3f208e268abba2a4378bc5c8d1acf2fd260f",
    "Boot0003": "bf0c79530728b35b23e144594aec2af3e73aa5aeb76abb4e825de701e6f39cdf3b6724c07c1685dc9c3406c262033ac2",
    "Boot0000": "23ada07f5261f12f34a0bd8e46760962d6b4d576a416f1fea1c64bc656b1d28eacf7047ae6e967c58fd2a98bfa74c298",
}


def boot_order(extra_disks: int) -> list[int]:
    """Easy-TEE/attest gcp.rs ``boot_order_bytes``: 0001, one entry per further disk, 0000."""
    return [1, *range(2, 2 + extra_disks), 0]


# ---------------------------------------------------------------------------------------------
# Registers


class MissingInputs(ValueError):
    """A register cannot be predicted; ``missing`` names each recorded input it lacks."""

    def __init__(self, missing: Sequence[str]):
        super().__init__("; ".join(missing))
        self.missing = list(missing)


def rtmr0_steps(firmware: Firmware, machine_type: str, *, extra_disks: int, keyset: str = DEFAULT_KEYSET,
                acpi: AcpiSet | None = None, ram_bytes: int | None = None) -> list[Step]:
    """RTMR0's events (Easy-TEE/attest gcp.rs ``build_rtmr0``); raises ``MissingInputs``."""
    missing = []
    if ram_bytes is None:
        gib = tdx.memory_gib(machine_type)
        ram_bytes = gib * GIB if gib is not None else None
    if ram_bytes is None:
        missing.append(f"memory of machine type {machine_type} (fleet.gcp.tdx.memory_gib)")
    if firmware.cfv is None:
        missing.append(f"CFV digest of firmware {firmware.name} (not published)")
    acpi = acpi or ACPI_SETS.get((machine_type, firmware.acpi))
    if acpi is None:
        missing.append(f"ACPI digests of {machine_type} on firmware {firmware.name} (not recorded)")
    order = boot_order(extra_disks)
    unknown = [f"Boot{n:04X}" for n in order if f"Boot{n:04X}" not in BOOT_VARIABLES]
    if unknown:
        missing.append(f"{', '.join(unknown)} of a VM with {extra_disks} further disks (not recorded)")
    keys = KEYSETS.get(keyset)
    if keys is None:
        missing.append(f"Secure Boot key set {keyset!r} (known: {', '.join(KEYSETS)})")
    if missing:
        raise MissingInputs(missing)
    assert ram_bytes is not None and acpi is not None and keys is not None and firmware.cfv is not None
    steps = [
        Step(f"TD HOB ({ram_bytes // GIB} GiB)", firmware.hob.digest(ram_bytes)),
        Step(f"CFV of firmware {firmware.name}", bytes.fromhex(firmware.cfv)),
        Step("SecureBoot = 0", SECURE_BOOT_OFF),
        Step(f"PK ({keys.name})", bytes.fromhex(keys.pk)),
        Step(f"KEK ({keys.name})", bytes.fromhex(keys.kek)),
        Step(f"db ({keys.name})", bytes.fromhex(keys.db)),
        Step(f"dbx ({keys.name})", bytes.fromhex(keys.dbx)),
        Step("separator", sha384(SEPARATOR)),
        Step("ACPI DATA (loader)", bytes.fromhex(acpi.loader)),
        Step("ACPI DATA (RSDP)", bytes.fromhex(acpi.rsdp)),
        Step("ACPI DATA (tables)", bytes.fromhex(acpi.tables)),
        Step("BootOrder = " + ",".join(f"{n:04X}" for n in order), sha384(struct.pack(f"<{len(order)}H", *order))),
    ]
    steps += [Step(f"Boot{n:04X}", bytes.fromhex(BOOT_VARIABLES[f"Boot{n:04X}"])) for n in order]
    return steps


# What a build records for RTMR1 and RTMR2 (images.lock.json ``boot``), with what each is.
BOOT_INPUTS = {
    "gpt_event_sha384": "SHA-384 of the boot disk's UEFI_GPT_DATA (header and used partition entries)",
    "uki_authenticode_sha384": "Authenticode SHA-384 of the UKI (EFI/BOOT/BOOTX64.EFI)",
    "kernel_authenticode_sha384": "Authenticode SHA-384 of the UKI's .linux section",
    "cmdline_sha384": "SHA-384 of the UKI's .cmdline as UTF-16LE with a NUL",
    "initrd_sha384": "SHA-384 of the UKI's .initrd",
}
_HEX96 = re.compile(r"[0-9a-f]{96}")


def _boot_input(inputs: Mapping[str, object], key: str, missing: list[str]) -> bytes:
    value = inputs.get(key)
    if isinstance(value, str) and _HEX96.fullmatch(value):
        return bytes.fromhex(value)
    missing.append(f"{key} ({BOOT_INPUTS[key]})")
    return ZERO


def rtmr1_steps(inputs: Mapping[str, object]) -> list[Step]:
    """RTMR1's events (Easy-TEE/attest gcp.rs ``build_rtmr1``); raises ``MissingInputs``."""
    missing: list[str] = []
    gpt = _boot_input(inputs, "gpt_event_sha384", missing)
    uki = _boot_input(inputs, "uki_authenticode_sha384", missing)
    kernel = _boot_input(inputs, "kernel_authenticode_sha384", missing)
    if missing:
        raise MissingInputs(missing)
    return [
        Step("Calling EFI Application from Boot Option", sha384(CALLING_EFI_APP)),
        Step("separator", sha384(SEPARATOR)),
        Step("GPT of the boot disk", gpt),
        Step("UKI (Authenticode)", uki),
        Step("kernel (Authenticode)", kernel),
        Step("Exit Boot Services Invocation", sha384(EXIT_BOOT_SERVICES)),
        Step("Exit Boot Services Returned with Success", sha384(EXIT_BOOT_SERVICES_SUCCESS)),
    ]


def rtmr2_steps(inputs: Mapping[str, object]) -> list[Step]:
    """RTMR2's events (Easy-TEE/attest dcap/mod.rs ``build_rtmr2``): systemd-stub's section
    events when it measures them (recorded as the register they give, ``pe_sections_sha384``), then
    the command line and the initrd; raises ``MissingInputs``."""
    missing: list[str] = []
    cmdline = _boot_input(inputs, "cmdline_sha384", missing)
    initrd = _boot_input(inputs, "initrd_sha384", missing)
    if missing:
        raise MissingInputs(missing)
    return [Step("kernel command line (UTF-16LE)", cmdline), Step("initrd", initrd)]


def rtmr2_value(inputs: Mapping[str, object]) -> bytes:
    start = inputs.get("pe_sections_sha384")
    value = bytes.fromhex(start) if isinstance(start, str) and _HEX96.fullmatch(start) else ZERO
    for step in rtmr2_steps(inputs):
        value = extend(value, step.digest)
    return value


def pe_sections_register(sections: Sequence[tuple[str, bytes]]) -> bytes:
    """The register systemd-stub (>= 256) leaves after measuring a UKI's sections: per section, its
    NUL-terminated name, then its content (Easy-TEE/attest dcap/mod.rs ``pe_sections_hash``)."""
    value = ZERO
    for name, content in sections:
        value = extend(value, sha384(name.encode("ascii") + b"\x00"))
        value = extend(value, sha384(content))
    return value


# ---------------------------------------------------------------------------------------------
# A node's expectation


@dataclass
class Expected:
    """Expected registers of one GCP node, JSON-ready through ``to_json``."""

    machine_type: str
    extra_disks: int
    keyset: str
    firmware: dict[str, dict[str, object]] = field(default_factory=dict)
    rtmr1: str = ""
    rtmr2: str = ""
    missing: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return {
            "platform": {"machine_type": self.machine_type, "extra_disks": self.extra_disks,
                         "secure_boot_keys": self.keyset, "secure_boot": False},
            "firmware": self.firmware,
            "mrtd": sorted({str(f["mrtd"]) for f in self.firmware.values()}),
            "rtmr1": self.rtmr1,
            "rtmr2": self.rtmr2,
            "missing": self.missing,
        }


def expected_registers(machine_type: str, *, extra_disks: int, boot: Mapping[str, object] | None,
                       pending: bool = False, keyset: str = DEFAULT_KEYSET,
                       boot_missing: str | None = None) -> dict[str, object]:
    """MRTD and RTMR0 per known firmware, RTMR1 and RTMR2 from the image's recorded boot inputs.
    A register that cannot be predicted reads ``pending build`` (the image is not built yet) or
    ``missing inputs`` with every missing input named under ``missing``."""
    out = Expected(machine_type=machine_type, extra_disks=extra_disks, keyset=keyset)
    for firmware in FIRMWARES:
        entry: dict[str, object] = {"mrtd": firmware.mrtd, "seen": firmware.seen}
        try:
            entry["rtmr0"] = replay(rtmr0_steps(firmware, machine_type, extra_disks=extra_disks, keyset=keyset)).hex()
        except MissingInputs as exc:
            entry["rtmr0"] = "missing inputs"
            out.missing += [f"rtmr0 on {firmware.name}: {m}" for m in exc.missing]
        out.firmware[firmware.name] = entry
    if pending:
        out.rtmr1 = out.rtmr2 = PENDING_BUILD
        return out.to_json()
    for register, compute in (("rtmr1", lambda b: replay(rtmr1_steps(b))), ("rtmr2", rtmr2_value)):
        if boot is None:
            setattr(out, register, "missing inputs")
            out.missing.append(f"{register}: {boot_missing or 'the image records no boot inputs'}")
            continue
        try:
            setattr(out, register, compute(boot).hex())
        except MissingInputs as exc:
            setattr(out, register, "missing inputs")
            out.missing += [f"{register}: {m}" for m in exc.missing]
    return out.to_json()
