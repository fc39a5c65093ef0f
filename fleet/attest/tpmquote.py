"""TPM 2.0 quotes: the TPMS_ATTEST a TPM signs in TPM2_Quote, its TPMT_SIGNATURE, the signing key's
TPMT_PUBLIC, and what ties them together.

References (TCG "Trusted Platform Module Library", Family 2.0, Level 00 Revision 01.59):

* Part 2 (Structures): 6.2 TPM_GENERATED (``TPM_GENERATED_VALUE`` 0xff544347), 6.3 TPM_ALG_ID,
  6.4 TPM_ECC_CURVE, 6.9 TPM_ST (``TPM_ST_ATTEST_QUOTE`` 0x8018), 7.4 TPM_RH
  (``TPM_RH_ENDORSEMENT`` 0x4000000B), 8.3 TPMA_OBJECT, 10.5.3 TPM2B_NAME, 10.6.2
  TPMS_PCR_SELECTION, 10.9.7 TPML_PCR_SELECTION, 10.11.1 TPMS_CLOCK_INFO, 10.12.4 TPMS_QUOTE_INFO
  ("pcrDigest: digest of the selected PCR using the hash of the signing key"), 10.12.12 TPMS_ATTEST,
  11.1.7 TPMT_SYM_DEF_OBJECT, 11.2.3.3 TPMT_KDF_SCHEME, 11.2.4.2 TPMT_RSA_SCHEME, 11.2.5.6
  TPMT_ECC_SCHEME, 11.3.1 TPMS_SIGNATURE_RSA, 11.3.2 TPMS_SIGNATURE_ECC, 11.3.4 TPMT_SIGNATURE,
  12.2.3.5 TPMS_RSA_PARMS (an exponent of 0 means 65537), 12.2.3.6 TPMS_ECC_PARMS, 12.2.4 TPMT_PUBLIC.
  Every integer is big-endian; a TPM2B is a UINT16 size and that many bytes.
* Part 1 (Architecture), "Names": an object's Name is nameAlg || H_nameAlg(TPMT_PUBLIC); its
  Qualified Name is nameAlg || H_nameAlg(QN of its parent || Name), and a hierarchy's QN is its
  handle (the reference code, Part 4 ``Object.c`` ``ComputeQualifiedName``). A quote's
  ``qualifiedSigner`` is the signing key's QN.
* Part 3 (Commands), TPM2_Quote: the PCR digest is computed with the hash of the signing scheme
  (its reference code ``Quote.c``, as of revision 01.16: "This hash algorithm is used to compute PCR
  digest").

The checks follow google/go-tpm-tools at 67670e5c021a24f2366eb1808db2659211af5eb2 ``quote/quote.go``
``Verify`` (signature by the trusted key, TPM_GENERATED_VALUE, a quote, extraData equal to the nonce,
the PCR values' selection and digest; SHA-256/384/512 signatures only) and ``internal/pcrs.go``
``PCRDigest`` (the selected PCR values in ascending order, hashed). Parsing reads untrusted bytes:
every size is checked against what is left and against the structure's maximum, so a malformed
structure is a ``TpmStructureError`` naming the field and offset.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

TPM_GENERATED_VALUE = 0xFF544347
TPM_ST_ATTEST_QUOTE = 0x8018
TPM_RH_ENDORSEMENT = 0x4000000B

ALG_RSA, ALG_ECC, ALG_NULL = 0x0001, 0x0023, 0x0010
ALG_RSASSA, ALG_RSAPSS, ALG_ECDSA, ALG_ECDAA = 0x0014, 0x0016, 0x0018, 0x001A
HASHES = {0x0004: "sha1", 0x000B: "sha256", 0x000C: "sha384", 0x000D: "sha512"}
HASH_IDS = {name: alg for alg, name in HASHES.items()}
# go-tpm-tools quote/quote.go SignatureHashAlgs: a quote signed over SHA-1 is not accepted.
SIGNATURE_HASHES = ("sha256", "sha384", "sha512")
_HASH_OBJECTS = {"sha256": hashes.SHA256, "sha384": hashes.SHA384, "sha512": hashes.SHA512}
SCHEMES = {ALG_RSASSA: "RSASSA", ALG_RSAPSS: "RSAPSS", ALG_ECDSA: "ECDSA"}
CURVES: dict[int, type[ec.EllipticCurve]] = {0x0003: ec.SECP256R1, 0x0004: ec.SECP384R1, 0x0005: ec.SECP521R1}

# TPMA_OBJECT bits (Part 2, 8.3)
FIXED_TPM, FIXED_PARENT, SENSITIVE_DATA_ORIGIN = 1 << 1, 1 << 4, 1 << 5
RESTRICTED, DECRYPT, SIGN = 1 << 16, 1 << 17, 1 << 18
ATTRIBUTE_NAMES = {1: "fixedTPM", 2: "stClear", 4: "fixedParent", 5: "sensitiveDataOrigin", 6: "userWithAuth",
                   7: "adminWithPolicy", 10: "noDA", 11: "encryptedDuplication", 16: "restricted", 17: "decrypt",
                   18: "sign", 19: "x509sign"}
# An attestation key: its private part never leaves the TPM (fixedTPM) and, being a restricted
# signing key, it signs only digests the TPM made itself, so it cannot sign a forged TPMS_ATTEST.
AK_ATTRIBUTES = FIXED_TPM | RESTRICTED | SIGN

# Sizes (Part 2: TPMU_HA is at most a SHA-512 digest; TPMU_NAME a TPMT_HA; RSA keys up to 4096 bits)
MAX_DIGEST = 64
MAX_NAME = 2 + MAX_DIGEST
MAX_RSA_BYTES = 512
MAX_ECC_BYTES = 66
MAX_PCR_SELECT = 8  # sizeofSelect: PC Client TPMs have 3 (24 PCRs)
MAX_BANKS = 16


class TpmStructureError(ValueError):
    """Bytes that are not the TPM structure they should be."""


class _Reader:
    def __init__(self, data: bytes, what: str) -> None:
        self.data, self.offset, self.what = data, 0, what

    def take(self, size: int, field: str) -> bytes:
        left = len(self.data) - self.offset
        if size > left:
            raise TpmStructureError(f"{self.what}: {field} at offset {self.offset} needs {size} bytes but {left} "
                                    "are left; it is truncated")
        out = self.data[self.offset:self.offset + size]
        self.offset += size
        return out

    def u8(self, field: str) -> int:
        return self.take(1, field)[0]

    def u16(self, field: str) -> int:
        return int(struct.unpack(">H", self.take(2, field))[0])

    def u32(self, field: str) -> int:
        return int(struct.unpack(">I", self.take(4, field))[0])

    def u64(self, field: str) -> int:
        return int(struct.unpack(">Q", self.take(8, field))[0])

    def sized(self, field: str, limit: int) -> bytes:
        start = self.offset
        size = self.u16(f"{field} size")
        if size > limit:
            raise TpmStructureError(f"{self.what}: {field} at offset {start} claims {size} bytes, more than its "
                                    f"{limit}")
        return self.take(size, field)

    def end(self) -> None:
        if self.offset != len(self.data):
            raise TpmStructureError(f"{self.what}: {len(self.data) - self.offset} bytes follow the structure "
                                    f"(it ends at offset {self.offset})")


def hash_name(alg: int) -> str:
    return HASHES.get(alg, f"0x{alg:04x}")


# ---------------------------------------------------------------------------------------------
# TPMS_ATTEST of a quote


@dataclass(frozen=True)
class PcrSelection:
    hash: int
    pcrs: tuple[int, ...]  # ascending

    def describe(self) -> str:
        return f"{hash_name(self.hash)}:{_ranges(self.pcrs)}"


@dataclass(frozen=True)
class Attest:
    magic: int
    type: int
    qualified_signer: bytes
    extra_data: bytes
    clock: int
    reset_count: int
    restart_count: int
    safe: int
    firmware_version: int
    selections: tuple[PcrSelection, ...]
    pcr_digest: bytes


def parse_attest(data: bytes) -> Attest:
    """A TPMS_ATTEST whose type is TPM_ST_ATTEST_QUOTE. The magic is kept, not judged: a wrong one
    is a failed check. Another type is an error, since its attested part is not a TPMS_QUOTE_INFO."""
    r = _Reader(data, "TPMS_ATTEST")
    magic = r.u32("magic")
    kind = r.u16("type")
    if kind != TPM_ST_ATTEST_QUOTE:
        raise TpmStructureError(f"TPMS_ATTEST: type 0x{kind:04x} is not a quote (TPM_ST_ATTEST_QUOTE, 0x8018)")
    signer = r.sized("qualifiedSigner", MAX_NAME)
    extra = r.sized("extraData", MAX_NAME)
    clock, reset, restart, safe = r.u64("clock"), r.u32("resetCount"), r.u32("restartCount"), r.u8("safe")
    firmware = r.u64("firmwareVersion")
    count = r.u32("pcrSelect count")
    if count > MAX_BANKS:
        raise TpmStructureError(f"TPMS_ATTEST: {count} PCR selections, more than a TPM has banks")
    selections = []
    for _ in range(count):
        alg = r.u16("pcrSelections.hash")
        size = r.u8("sizeofSelect")
        if size > MAX_PCR_SELECT:
            raise TpmStructureError(f"TPMS_ATTEST: a PCR selection of {size} bytes (at most {MAX_PCR_SELECT})")
        bitmap = r.take(size, "pcrSelect")
        selections.append(PcrSelection(alg, tuple(8 * i + bit for i, byte in enumerate(bitmap)
                                                   for bit in range(8) if byte >> bit & 1)))
    digest = r.sized("pcrDigest", MAX_DIGEST)
    r.end()
    return Attest(magic, kind, signer, extra, clock, reset, restart, safe, firmware, tuple(selections), digest)


def pcr_digest(selections: tuple[PcrSelection, ...], values: Mapping[tuple[int, int], bytes], algorithm: str) -> bytes:
    """H(the selected PCR values, bank by bank in selection order, each bank's PCRs ascending):
    TPMS_QUOTE_INFO.pcrDigest as the TPM computes it; ``values`` maps (bank, PCR) to the value."""
    h = hashlib.new(algorithm)
    for selection in selections:
        for pcr in selection.pcrs:
            h.update(values[(selection.hash, pcr)])
    return h.digest()


# ---------------------------------------------------------------------------------------------
# TPMT_SIGNATURE


@dataclass(frozen=True)
class Signature:
    scheme: int
    hash: int
    rsa: bytes = b""
    r: bytes = b""
    s: bytes = b""

    def describe(self) -> str:
        return f"{SCHEMES.get(self.scheme, hex(self.scheme))}-{hash_name(self.hash).upper()}"


def parse_signature(data: bytes) -> Signature:
    r = _Reader(data, "TPMT_SIGNATURE")
    scheme = r.u16("sigAlg")
    if scheme in (ALG_RSASSA, ALG_RSAPSS):
        alg = r.u16("hash")
        signature = Signature(scheme, alg, rsa=r.sized("sig", MAX_RSA_BYTES))
    elif scheme == ALG_ECDSA:
        alg = r.u16("hash")
        signature = Signature(scheme, alg, r=r.sized("signatureR", MAX_ECC_BYTES), s=r.sized("signatureS", MAX_ECC_BYTES))
    elif scheme == ALG_NULL:
        raise TpmStructureError("TPMT_SIGNATURE: the quote is unsigned (TPM_ALG_NULL)")
    else:
        raise TpmStructureError(f"TPMT_SIGNATURE: scheme 0x{scheme:04x} is not RSASSA, RSAPSS or ECDSA")
    r.end()
    return signature


# ---------------------------------------------------------------------------------------------
# TPMT_PUBLIC


PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey


@dataclass(frozen=True)
class Public:
    raw: bytes
    type: int
    name_alg: int
    attributes: int
    key: PublicKey

    def name(self) -> bytes:
        """nameAlg || H_nameAlg(TPMT_PUBLIC)."""
        return struct.pack(">H", self.name_alg) + hashlib.new(HASHES[self.name_alg], self.raw).digest()

    def qualified_name(self, parent_qn: bytes) -> bytes:
        return struct.pack(">H", self.name_alg) + hashlib.new(HASHES[self.name_alg], parent_qn + self.name()).digest()

    def primary_qualified_name(self, hierarchy: int = TPM_RH_ENDORSEMENT) -> bytes:
        """The QN of this key as a primary key of ``hierarchy`` (whose QN is its handle)."""
        return self.qualified_name(struct.pack(">I", hierarchy))

    def describe_attributes(self) -> str:
        return ", ".join(name for bit, name in ATTRIBUTE_NAMES.items() if self.attributes >> bit & 1) or "none"

    def describe(self) -> str:
        if isinstance(self.key, rsa.RSAPublicKey):
            return f"RSA-{self.key.key_size}"
        return f"ECC {self.key.curve.name}"


def _symmetric(r: _Reader) -> None:
    if r.u16("symmetric.algorithm") != ALG_NULL:
        r.u16("symmetric.keyBits")
        r.u16("symmetric.mode")


def parse_public(data: bytes) -> Public:
    r = _Reader(data, "TPMT_PUBLIC")
    kind = r.u16("type")
    name_alg = r.u16("nameAlg")
    if name_alg not in HASHES:
        raise TpmStructureError(f"TPMT_PUBLIC: nameAlg 0x{name_alg:04x} is not SHA-1, SHA-256, SHA-384 or SHA-512")
    attributes = r.u32("objectAttributes")
    r.sized("authPolicy", MAX_DIGEST)
    key: PublicKey
    if kind == ALG_RSA:
        _symmetric(r)
        if r.u16("scheme") != ALG_NULL:
            r.u16("scheme.hashAlg")
        bits = r.u16("keyBits")
        exponent = r.u32("exponent") or 65537
        modulus = r.sized("unique.rsa", MAX_RSA_BYTES)
        if not modulus or len(modulus) * 8 != bits:
            raise TpmStructureError(f"TPMT_PUBLIC: a {len(modulus) * 8}-bit modulus for a {bits}-bit RSA key")
        try:
            key = rsa.RSAPublicNumbers(exponent, int.from_bytes(modulus, "big")).public_key()
        except ValueError as exc:
            raise TpmStructureError(f"TPMT_PUBLIC: not an RSA public key ({exc})") from None
    elif kind == ALG_ECC:
        _symmetric(r)
        scheme = r.u16("scheme")
        if scheme != ALG_NULL:
            r.u16("scheme.hashAlg")
            if scheme == ALG_ECDAA:
                r.u16("scheme.count")
        curve_id = r.u16("curveID")
        if r.u16("kdf.scheme") != ALG_NULL:
            r.u16("kdf.hashAlg")
        x, y = r.sized("unique.x", MAX_ECC_BYTES), r.sized("unique.y", MAX_ECC_BYTES)
        curve = CURVES.get(curve_id)
        if curve is None:
            raise TpmStructureError(f"TPMT_PUBLIC: ECC curve 0x{curve_id:04x} is not NIST P-256, P-384 or P-521")
        try:
            key = ec.EllipticCurvePublicNumbers(int.from_bytes(x, "big"), int.from_bytes(y, "big"),
                                                curve()).public_key()
        except ValueError:
            raise TpmStructureError(f"TPMT_PUBLIC: the point is not on {curve.name}") from None
    else:
        raise TpmStructureError(f"TPMT_PUBLIC: key type 0x{kind:04x} is not RSA or ECC")
    r.end()
    return Public(data, kind, name_alg, attributes, key)


# ---------------------------------------------------------------------------------------------
# Signature verification


def verify_signature(key: PublicKey, signature: Signature, message: bytes) -> str | None:
    """None when ``signature`` is ``key``'s signature over ``message``, else why not."""
    algorithm = hash_name(signature.hash)
    if algorithm not in SIGNATURE_HASHES:
        return f"signed over {algorithm.upper()}; only SHA-256, SHA-384 and SHA-512 signatures count"
    digest = _HASH_OBJECTS[algorithm]()
    try:
        if signature.scheme in (ALG_RSASSA, ALG_RSAPSS):
            if not isinstance(key, rsa.RSAPublicKey):
                return "an RSA signature, but the attestation key is an ECC key"
            pad = (padding.PKCS1v15() if signature.scheme == ALG_RSASSA
                   else padding.PSS(mgf=padding.MGF1(digest), salt_length=padding.PSS.AUTO))
            key.verify(signature.rsa, message, pad, digest)
        elif signature.scheme == ALG_ECDSA:
            if not isinstance(key, ec.EllipticCurvePublicKey):
                return "an ECDSA signature, but the attestation key is an RSA key"
            der = encode_dss_signature(int.from_bytes(signature.r, "big"), int.from_bytes(signature.s, "big"))
            key.verify(der, message, ec.ECDSA(digest))
        else:
            return f"scheme 0x{signature.scheme:04x} is not supported"
    except InvalidSignature:
        return "the signature does not verify with the attestation key"
    return None


def same_key(a: PublicKey, b: object) -> bool:
    """Whether two public keys are the same key (go-tpm-tools ``internal.PubKeysEqual``)."""
    if isinstance(a, rsa.RSAPublicKey) and isinstance(b, rsa.RSAPublicKey):
        return a.public_numbers() == b.public_numbers()
    if isinstance(a, ec.EllipticCurvePublicKey) and isinstance(b, ec.EllipticCurvePublicKey):
        return a.curve.name == b.curve.name and a.public_numbers() == b.public_numbers()
    return False


def _ranges(values: tuple[int, ...]) -> str:
    """0,1,2,3,7 -> '0-3,7'."""
    runs: list[list[int]] = []
    for value in values:
        if runs and runs[-1][1] == value - 1:
            runs[-1][1] = value
        else:
            runs.append([value, value])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs) or "none"
