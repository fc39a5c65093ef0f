"""``fleet verify --tpm-attestation``: a real GCE vTPM quote authenticates its event log, and every
kind of tampering, a foreign AK certificate, a stale or future time, a wrong nonce and malformed
input are caught.

The real vectors come from google/go-tpm-tools at 67670e5c021a24f2366eb1808db2659211af5eb2
(tests/vectors/gcp/README.md): ``internal/test/attestations/gce-cos-85-nonce9009.pb`` and
``gce-cos-85-no-nonce.pb`` (added in 7350267e, recorded on a GCE VM running COS 85), Google's CA
certificates from ``server/ca-certs/`` and GCE AK/EK certificates from ``internal/test/certificates/``.
Fixtures built here (foreign CAs, ECC and RSA-PSS quotes) are labelled as constructed."""

from __future__ import annotations

import hashlib
import struct
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from fleet.attest import gotpm, tcg, tpmquote, vtpm, vtpmca

from .test_bootchain import TPM_LOG
from .test_verify_gcp import big, check_exit_2, last, row, run

GO_TPM_TOOLS = Path(__file__).parent / "vectors" / "gcp" / "go-tpm-tools"
NONCE9009 = GO_TPM_TOOLS / "gce-cos-85-nonce9009.pb"  # upstream server/verify_test.go: Nonce []byte{0x90, 0x09}
NO_NONCE = GO_TPM_TOOLS / "gce-cos-85-no-nonce.pb"  # upstream: Nonce nil
# The COS 85 AK certificate (field ak_cert of both files) is valid 2021-08-31T23:11:05Z .. 2051-08-24T23:16:05Z.
INSIDE = "2026-08-20T00:00:00Z"
BEFORE = "2021-08-31T23:00:00Z"
AFTER = "2051-08-25T00:00:00Z"
# Google's intermediate and root names have CNs longer than X.520's 64 characters; copying them warns.
pytestmark = pytest.mark.filterwarnings("ignore:Attribute's length must be:UserWarning")
AUTHENTICATED = "authenticated (AK chains to Google vTPM root tpm_ek_root_1)"
QUOTE_ROWS = ("vTPM AK certificate", "vTPM AK certificate key = ak_pub", "vTPM quote signer = ak_pub",
              "vTPM AK attributes", "vTPM quote magic", "vTPM quote signature", "vTPM quote nonce",
              "vTPM quote PCR selection", "vTPM quote PCR digest (SHA256)", "vTPM log replay = quoted PCRs")


# ---------------------------------------------------------------------------------------------
# Re-encoding an Attestation (protobuf wire format) to tamper with one part


def _varint(value: int) -> bytes:
    out = b""
    while True:
        byte, value = value & 0x7F, value >> 7
        out += bytes([byte | (0x80 if value else 0)])
        if not value:
            return out


def encode(fields: list[tuple[int, int, int | bytes]]) -> bytes:
    out = b""
    for number, wire, value in fields:
        out += _varint(number << 3 | wire)
        if wire == 0:
            assert isinstance(value, int)
            out += _varint(value)
        else:
            assert isinstance(value, bytes) and wire == 2
            out += _varint(len(value)) + value
    return out


def replace(data: bytes, number: int, values: list[bytes]) -> bytes:
    """The message with every field ``number`` replaced by ``values`` (none: removed)."""
    fields = [f for f in gotpm._fields(data, "test") if f[0] != number]
    return encode(fields + [(number, 2, v) for v in values])


def with_quote(data: bytes, bank: int, change) -> bytes:
    """The Attestation with ``change(fields of the quote over bank)`` applied to that quote."""
    out = []
    for number, wire, value in gotpm._fields(data, "test"):
        if number == 2 and isinstance(value, bytes):
            quote_fields = gotpm._fields(value, "quote")
            pcrs = dict((n, v) for n, _, v in gotpm._fields(next(v for n, _, v in quote_fields if n == 3), "pcrs")
                        if n == 1)
            if pcrs.get(1) == bank:
                value = encode(change(quote_fields))
        out.append((number, wire, value))
    return encode(out)


def quote_part(fields, number: int, transform) -> list:
    return [(n, w, transform(v) if n == number else v) for n, w, v in fields]


def flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1:]


def write(tmp_path: Path, data: bytes, name: str = "attestation.pb") -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


SHA256 = tpmquote.HASH_IDS["sha256"]


def attestation() -> gotpm.Attestation:
    return gotpm.parse(NONCE9009.read_bytes(), "test")


# ---------------------------------------------------------------------------------------------
# The real attestation


def test_the_carried_ca_certificates_are_go_tpm_tools_files_byte_for_byte():
    """fleet.attest.vtpmca pins google/go-tpm-tools 67670e5c server/ca-certs/*, copied to the vectors."""
    for known in (*vtpmca.ROOTS, *vtpmca.INTERMEDIATES):
        vector = GO_TPM_TOOLS / Path(known.path).name
        assert known.der == vector.read_bytes() and hashlib.sha256(known.der).hexdigest() == known.sha256
    assert [k.name for k in vtpmca.ROOTS] == ["tpm_ek_root_1", "gcp_ek_ak_ca_root"]


@pytest.mark.parametrize("path", [NONCE9009, NO_NONCE])
def test_the_recorded_logs_replay_to_the_quoted_pcrs_of_every_bank(path):
    """go-tpm-tools 7350267e internal/test/attestations/*.pb: quotes over SHA-1, SHA-256 and SHA-384,
    and the log extends PCRs 0-9, each of which replays to the quoted value in every bank."""
    parsed = gotpm.parse(path.read_bytes(), str(path))
    log = tcg.parse(parsed.event_log, allow_padding=False)
    assert [tpmquote.hash_name(q.hash) for q in parsed.quotes] == ["sha1", "sha256", "sha384"]
    for quote in parsed.quotes:
        replayed = log.replay(tpmquote.hash_name(quote.hash))
        assert sorted(replayed) == list(range(10)) and sorted(quote.pcrs) == list(range(24))
        assert all(quote.pcrs[pcr] == value for pcr, value in replayed.items())


def test_the_real_gce_attestation_authenticates_its_log(capsys):
    code, out, _ = run(capsys, "--tpm-attestation", str(NONCE9009), "--tpm-nonce", "9009", "--at", INSIDE)
    for name in QUOTE_ROWS:
        assert row(out, name).endswith(" ok"), row(out, name)
    assert AUTHENTICATED in row(out, "vTPM log authenticity") and row(out, "vTPM log authenticity").endswith(" ok")
    assert ("AK certificate <- tpm_ek_intermediate_2 <- tpm_ek_root_1; instance cos-test (id 6797026933021542085), "
            "project google.com:wuale-gcp-testing (117478743145), zone us-central1-a") in row(out, "vTPM AK certificate")
    assert "10 PCRs match" in row(out, "vTPM log replay = quoted PCRs")
    assert "vTPM quote (SHA-256 bank):" in out and "extraData     9009" in out
    # The only failure is the log's own: COS 85's firmware logged events #24 and #41
    # (EV_EFI_VARIABLE_AUTHORITY, 1083 bytes) with a digest of their first 1082 bytes.
    assert code == 1 and last(out) == "verify: 1 check(s) failed: vTPM event data"
    assert "events #24, #41 differ" in row(out, "vTPM event data")


def test_an_attestation_without_a_nonce_is_authentic_but_not_fresh(capsys):
    code, out, _ = run(capsys, "--tpm-attestation", str(NO_NONCE), "--at", INSIDE)
    assert "not checked (no --tpm-nonce: whether the quote is fresh is not checked)" in row(out, "vTPM quote nonce")
    assert AUTHENTICATED in row(out, "vTPM log authenticity")


def test_without_a_tpm_attestation_the_log_is_replayed_not_authenticated(capsys):
    _, out, _ = run(capsys, "--tpm-event-log", str(TPM_LOG))
    assert "not checked (replayed, not authenticated: no TPM quote (--tpm-attestation))" in row(
        out, "vTPM log authenticity")


def test_another_boots_log_is_not_authenticated_by_the_quote(capsys):
    """dstack's GCE vTPM log (a TDX boot) against the COS 85 quote: its PCRs are not the quoted ones."""
    code, out, _ = run(capsys, "--tpm-event-log", str(TPM_LOG), "--tpm-attestation", str(NONCE9009), "--at", INSIDE)
    assert code == 1
    assert "MISMATCH: the event log is not the log of the quoted boot" in row(out, "vTPM log replay = quoted PCRs")
    # PCR 3 and 6 hold only a separator in both boots, so they agree; PCR 8 and 10 have no events.
    assert "PCR 0-2,4-5,7,9,11 differ" in row(out, "vTPM log replay = quoted PCRs")
    assert "not authenticated: vTPM log replay = quoted PCRs" in row(out, "vTPM log authenticity")
    assert "(replayed, not authenticated)" in row(out, "vTPM PCR0 (GCE firmware)")


# ---------------------------------------------------------------------------------------------
# Tampering


def authenticity(out: str) -> str:
    return row(out, "vTPM log authenticity")


def test_a_tampered_quote_byte_breaks_the_signature(capsys, tmp_path):
    # TPMS_ATTEST: magic 4, type 2, qualifiedSigner 2+34, extraData 2+2, then clock (8 bytes) at 46.
    data = with_quote(NONCE9009.read_bytes(), SHA256, lambda f: quote_part(f, 1, lambda q: flip(q, 53)))
    code, out, _ = run(capsys, "--tpm-attestation", write(tmp_path, data), "--tpm-nonce", "9009", "--at", INSIDE)
    assert code == 1
    assert "MISMATCH: the signature does not verify with the attestation key" in row(out, "vTPM quote signature")
    assert "not authenticated: vTPM quote signature " in authenticity(out)
    assert "MISMATCH: replayed, not authenticated" in authenticity(out)


def test_a_tampered_extra_data_byte_breaks_signature_and_nonce(capsys, tmp_path):
    data = with_quote(NONCE9009.read_bytes(), SHA256, lambda f: quote_part(f, 1, lambda q: flip(q, 45)))
    _, out, _ = run(capsys, "--tpm-attestation", write(tmp_path, data), "--tpm-nonce", "9009", "--at", INSIDE)
    assert "not authenticated: vTPM quote signature, vTPM quote nonce " in authenticity(out)


def test_a_tampered_signature_fails(capsys, tmp_path):
    data = with_quote(NONCE9009.read_bytes(), SHA256, lambda f: quote_part(f, 2, lambda s: flip(s, len(s) - 1)))
    code, out, _ = run(capsys, "--tpm-attestation", write(tmp_path, data), "--tpm-nonce", "9009", "--at", INSIDE)
    assert code == 1 and "MISMATCH" in row(out, "vTPM quote signature")
    assert "not authenticated: vTPM quote signature " in authenticity(out)


def test_a_changed_pcr_value_fails_digest_and_replay(capsys, tmp_path):
    def change(fields):
        def pcrs(message: bytes) -> bytes:
            out = []
            for number, wire, value in gotpm._fields(message, "pcrs"):
                if number == 2 and isinstance(value, bytes):
                    entry = dict((n, v) for n, _, v in gotpm._fields(value, "entry"))
                    if entry.get(1, 0) == 0:  # PCR 0 (proto3 leaves key 0 out)
                        value = encode([(2, 2, flip(entry[2], 0))])
                out.append((number, wire, value))
            return encode(out)
        return quote_part(fields, 3, pcrs)

    data = with_quote(NONCE9009.read_bytes(), SHA256, change)
    code, out, _ = run(capsys, "--tpm-attestation", write(tmp_path, data), "--tpm-nonce", "9009", "--at", INSIDE)
    assert code == 1
    assert "MISMATCH: the PCR values are not the ones the TPM quoted" in row(out, "vTPM quote PCR digest (SHA256)")
    assert "PCR 0 differ" in row(out, "vTPM log replay = quoted PCRs")
    assert "not authenticated: vTPM quote PCR digest (SHA256), vTPM log replay = quoted PCRs " in authenticity(out)


def test_a_wrong_nonce_fails(capsys):
    code, out, _ = run(capsys, "--tpm-attestation", str(NONCE9009), "--tpm-nonce", "9008", "--at", INSIDE)
    assert code == 1
    assert "MISMATCH: the quote was not made for this nonce" in row(out, "vTPM quote nonce")
    assert "not authenticated: vTPM quote nonce " in authenticity(out)
    _, out, _ = run(capsys, "--tpm-attestation", str(NO_NONCE), "--tpm-nonce", "9009", "--at", INSIDE)
    assert "9009" in row(out, "vTPM quote nonce") and "(empty)" in row(out, "vTPM quote nonce")
    assert "MISMATCH" in row(out, "vTPM quote nonce")


@pytest.mark.parametrize("moment", [BEFORE, AFTER])
def test_a_time_outside_the_certificate_validity_fails(capsys, moment):
    code, out, _ = run(capsys, "--tpm-attestation", str(NONCE9009), "--tpm-nonce", "9009", "--at", moment)
    assert code == 1
    assert (f"MISMATCH: the AK certificate is valid 2021-08-31T23:11:05Z .. 2051-08-24T23:16:05Z, not at {moment}"
            in row(out, "vTPM AK certificate"))
    assert "not authenticated: vTPM AK certificate " in authenticity(out)


# Constructed: CAs and certificates made here, none of them Google's.

def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(subject: x509.Name, public_key, issuer: x509.Name, signer, *, ca: bool) -> x509.Certificate:
    now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
               .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(days=3650))
               .not_valid_after(now + timedelta(days=3650))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=not ca, content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False, key_cert_sign=ca,
                                            crl_sign=ca, encipher_only=False, decipher_only=False), critical=True))
    return builder.sign(signer, hashes.SHA256())


def _der(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.DER)


def _ak_key():
    return tpmquote.parse_public(attestation().ak_pub).key


def _foreign_ca_cert():
    """A foreign CA that copies the name of Google's tpm_ek_intermediate_2, certifying the real AK key."""
    google = x509.load_der_x509_certificate((GO_TPM_TOOLS / "tpm_ek_intermediate_2.crt").read_bytes())
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca = _certificate(google.subject, key.public_key(), google.subject, key, ca=True)
    return _certificate(_name("cos-test"), _ak_key(), ca.subject, key, ca=False), ca


def test_an_ak_certificate_from_a_foreign_ca_is_refused(capsys, tmp_path):
    leaf, ca = _foreign_ca_cert()
    data = replace(replace(NONCE9009.read_bytes(), 6, [_der(leaf)]), 7, [_der(ca)])
    code, out, _ = run(capsys, "--tpm-attestation", write(tmp_path, data), "--tpm-nonce", "9009", "--at", INSIDE)
    assert code == 1
    assert "is not signed by a Google vTPM CA" in row(out, "vTPM AK certificate")
    assert row(out, "vTPM AK certificate key = ak_pub").endswith(" ok")  # the key is the real AK's
    assert row(out, "vTPM quote signature").endswith(" ok")
    assert "not authenticated: vTPM AK certificate " in authenticity(out)


def test_a_self_signed_ak_certificate_is_refused(capsys, tmp_path):
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = _certificate(_name("self"), key.public_key(), _name("self"), key, ca=False)
    data = replace(NONCE9009.read_bytes(), 6, [_der(leaf)])
    code, out, _ = run(capsys, "--tpm-attestation", write(tmp_path, data), "--tpm-nonce", "9009", "--at", INSIDE)
    assert code == 1
    assert "MISMATCH: the AK certificate is not signed by a Google vTPM CA" in row(out, "vTPM AK certificate")
    assert "MISMATCH: the certificate is not for the key that signed the quote" in row(
        out, "vTPM AK certificate key = ak_pub")
    assert "not authenticated: vTPM AK certificate, vTPM AK certificate key = ak_pub " in authenticity(out)


def test_a_google_ek_certificate_does_not_pass_as_an_ak_certificate(capsys, tmp_path):
    """go-tpm-tools 629c6acc internal/test/certificates/pca_tpm_rsa_enc_cert.pem: a real GCE EK
    certificate (keyEncipherment only) under Google's CAS root."""
    ek = x509.load_pem_x509_certificate((GO_TPM_TOOLS / "pca_tpm_rsa_enc_cert.pem").read_bytes())
    data = replace(NONCE9009.read_bytes(), 6, [_der(ek)])
    _, out, _ = run(capsys, "--tpm-attestation", write(tmp_path, data), "--tpm-nonce", "9009", "--at", INSIDE)
    assert "its keyUsage lacks digitalSignature (an EK certificate?)" in row(out, "vTPM AK certificate")
    assert "AK certificate <- gcp_ek_ak_ca_intermediate_v3 <- gcp_ek_ak_ca_root" in row(out, "vTPM AK certificate")


def test_an_attestation_without_an_ak_certificate_is_not_authenticated(capsys, tmp_path):
    data = replace(NONCE9009.read_bytes(), 6, [])
    code, out, _ = run(capsys, "--tpm-attestation", write(tmp_path, data), "--tpm-nonce", "9009", "--at", INSIDE)
    assert code == 1 and "none in the attestation" in row(out, "vTPM AK certificate")


def test_another_ak_pub_is_caught_three_ways(capsys, tmp_path):
    """ak_pub swapped for another RSA key: the certificate, the quote's signer and the signature disagree."""
    parsed = attestation()
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    raw = parsed.ak_pub
    modulus = key.public_numbers().n.to_bytes(256, "big")
    swapped = raw[:-256] + modulus
    data = replace(NONCE9009.read_bytes(), 1, [swapped])
    _, out, _ = run(capsys, "--tpm-attestation", write(tmp_path, data), "--tpm-nonce", "9009", "--at", INSIDE)
    assert ("not authenticated: vTPM AK certificate key = ak_pub, vTPM quote signer = ak_pub, vTPM quote signature "
            in authenticity(out))


# ---------------------------------------------------------------------------------------------
# The Google CA check on its own (real certificates, go-tpm-tools 629c6acc internal/test/certificates/)


@pytest.mark.parametrize(("name", "root", "path"), [
    ("pca_tpm_rsa_sign_cert.pem", "gcp_ek_ak_ca_root", "AK certificate <- gcp_ek_ak_ca_intermediate_v3 <- gcp_ek_ak_ca_root"),
    ("pca_tpm_ecc_sign_cert.pem", "gcp_ek_ak_ca_root", "AK certificate <- gcp_ek_ak_ca_intermediate_v3 <- gcp_ek_ak_ca_root"),
    ("uca_tpm_ecc_sign_cert.pem", "tpm_ek_root_1", "AK certificate <- tpm_ek_intermediate_3 <- tpm_ek_root_1"),
])
def test_gce_ak_certificates_of_both_hierarchies_chain(name, root, path):
    """Upstream server/verify_test.go TestValidateAKGCEAndGetGCEInstanceInfo verifies these with the
    same roots and intermediates."""
    certificate = x509.load_pem_x509_certificate((GO_TPM_TOOLS / name).read_bytes())
    chain = vtpmca.verify_ak_certificate(certificate, [], datetime(2026, 8, 20, tzinfo=timezone.utc))
    assert (chain.root, chain.problem, chain.describe()) == (root, None, path)
    assert "project google.com:wuale-gcp-testing (117478743145), zone us-central1-a" in vtpmca.instance(certificate)


def test_a_look_alike_root_is_refused():
    """Constructed: a self-signed CA with the exact name of tpm_ek_root_1, and an AK certificate from it."""
    google = vtpmca.ROOTS[0].certificate
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    fake_root = _certificate(google.subject, key.public_key(), google.subject, key, ca=True)
    leaf = _certificate(_name("ak"), _ak_key(), fake_root.subject, key, ca=False)
    chain = vtpmca.verify_ak_certificate(leaf, [fake_root], datetime(2026, 8, 20, tzinfo=timezone.utc))
    assert chain.root is None and "is not signed by a Google vTPM CA" in (chain.problem or "")


# ---------------------------------------------------------------------------------------------
# TPM structures on their own (constructed keys and quotes: ECDSA and RSA-PSS have no real vector)


def _tpm2b(data: bytes) -> bytes:
    return struct.pack(">H", len(data)) + data


def _ecc_public(key: ec.EllipticCurvePublicKey) -> bytes:
    numbers = key.public_numbers()
    return (struct.pack(">HHI", tpmquote.ALG_ECC, 0x000B, 0x00050072) + _tpm2b(b"")
            + struct.pack(">HHHHH", tpmquote.ALG_NULL, tpmquote.ALG_ECDSA, 0x000B, 0x0003, tpmquote.ALG_NULL)
            + _tpm2b(numbers.x.to_bytes(32, "big")) + _tpm2b(numbers.y.to_bytes(32, "big")))


def _attest(public: tpmquote.Public, nonce: bytes, values: dict[int, bytes]) -> bytes:
    digest = hashlib.sha256(b"".join(values[p] for p in sorted(values))).digest()
    bitmap = bytearray(3)
    for pcr in values:
        bitmap[pcr // 8] |= 1 << pcr % 8
    return (struct.pack(">IH", tpmquote.TPM_GENERATED_VALUE, tpmquote.TPM_ST_ATTEST_QUOTE)
            + _tpm2b(public.primary_qualified_name()) + _tpm2b(nonce) + struct.pack(">QIIBQ", 1, 2, 3, 1, 4)
            + struct.pack(">IHB", 1, 0x000B, 3) + bytes(bitmap) + _tpm2b(digest))


def test_an_ecdsa_quote_verifies_and_its_parts_parse():
    key = ec.generate_private_key(ec.SECP256R1())
    public = tpmquote.parse_public(_ecc_public(key.public_key()))
    assert tpmquote.same_key(public.key, key.public_key()) and public.describe() == "ECC secp256r1"
    values = {0: bytes(32), 2: b"\x02" * 32, 7: b"\x07" * 32}
    message = _attest(public, b"nonce", values)
    attest = tpmquote.parse_attest(message)
    assert attest.extra_data == b"nonce" and attest.selections == (tpmquote.PcrSelection(0x000B, (0, 2, 7)),)
    assert attest.qualified_signer == public.primary_qualified_name()
    assert tpmquote.pcr_digest(attest.selections, {(0x000B, p): v for p, v in values.items()}, "sha256") == \
        attest.pcr_digest
    r, s = decode_dss_signature(key.sign(message, ec.ECDSA(hashes.SHA256())))
    raw = struct.pack(">HH", tpmquote.ALG_ECDSA, 0x000B) + _tpm2b(r.to_bytes(32, "big")) + _tpm2b(s.to_bytes(32, "big"))
    signature = tpmquote.parse_signature(raw)
    assert tpmquote.verify_signature(public.key, signature, message) is None
    assert tpmquote.verify_signature(public.key, signature, flip(message, 50)) == \
        "the signature does not verify with the attestation key"


def test_rsa_pss_and_the_hash_rules():
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    message = b"quoted"
    pss = key.sign(message, padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48), hashes.SHA384())
    signature = tpmquote.parse_signature(struct.pack(">HH", tpmquote.ALG_RSAPSS, 0x000C) + _tpm2b(pss))
    assert tpmquote.verify_signature(key.public_key(), signature, message) is None
    sha1 = tpmquote.Signature(tpmquote.ALG_RSASSA, 0x0004, rsa=key.sign(message, padding.PKCS1v15(), hashes.SHA1()))
    assert "only SHA-256, SHA-384 and SHA-512 signatures count" in tpmquote.verify_signature(key.public_key(), sha1,
                                                                                            message)
    ecc = ec.generate_private_key(ec.SECP256R1()).public_key()
    assert "the attestation key is an ECC key" in tpmquote.verify_signature(ecc, signature, message)


@pytest.mark.parametrize(("data", "message"), [
    (b"", "magic at offset 0 needs 4 bytes"),
    (struct.pack(">IH", tpmquote.TPM_GENERATED_VALUE, 0x8017), "type 0x8017 is not a quote"),
    (struct.pack(">IHH", tpmquote.TPM_GENERATED_VALUE, 0x8018, 0xFFFF), "claims 65535 bytes, more than its 66"),
])
def test_malformed_tpms_attest(data, message):
    with pytest.raises(tpmquote.TpmStructureError, match=message):
        tpmquote.parse_attest(data)


# ---------------------------------------------------------------------------------------------
# Bad input: exit 2, one line


def _drop_sha256_quote(data: bytes) -> bytes:
    fields = gotpm._fields(data, "test")
    quotes = [v for n, _, v in fields if n == 2]
    return replace(data, 2, [q for q in quotes if isinstance(q, bytes) and gotpm._quote(q, "q").hash != SHA256])


def _duplicate_pcr(data: bytes) -> bytes:
    def change(fields):
        def pcrs(message: bytes) -> bytes:
            parts = gotpm._fields(message, "pcrs")
            return encode(parts + [p for p in parts if p[0] == 2][:1])
        return quote_part(fields, 3, pcrs)
    return with_quote(data, SHA256, change)


def _retype(data: bytes) -> bytes:
    return with_quote(data, SHA256, lambda f: quote_part(f, 1, lambda q: q[:4] + b"\x80\x17" + q[6:]))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: ["--tpm-attestation", write(p, b"\xff" * 16)], "not a go-tpm-tools Attestation protobuf"),
        (lambda p: ["--tpm-attestation", write(p, b'ak_pub: "\\x00\\x01"\n')], "not a go-tpm-tools Attestation"),
        (lambda p: ["--tpm-attestation", write(p, NONCE9009.read_bytes()[:1000])], "claims"),
        (lambda p: ["--tpm-attestation", write(p, b"")], "the Attestation has no ak_pub, quotes"),
        (lambda p: ["--tpm-attestation", big(p, gotpm.MAX_ATTESTATION_BYTES + 1)], "larger than"),
        (lambda p: ["--tpm-attestation", write(p, replace(NONCE9009.read_bytes(), 1, [b"\x00\x01\x00\x0b\x00"]))],
         "ak_pub: TPMT_PUBLIC: objectAttributes at offset 4 needs 4 bytes but 1 are left"),
        (lambda p: ["--tpm-attestation", write(p, replace(NONCE9009.read_bytes(), 6, [b"not DER"]))],
         "ak_cert is not a DER X.509 certificate"),
        (lambda p: ["--tpm-attestation", write(p, _drop_sha256_quote(NONCE9009.read_bytes()))],
         "0 quotes over the SHA-256 PCR bank (the quotes are over: sha1, sha384)"),
        (lambda p: ["--tpm-attestation", write(p, _duplicate_pcr(NONCE9009.read_bytes()))], "is given twice"),
        (lambda p: ["--tpm-attestation", write(p, _retype(NONCE9009.read_bytes()))],
         "quotes[1]: TPMS_ATTEST: type 0x8017 is not a quote"),
        (lambda p: ["--tpm-attestation", write(p, with_quote(NONCE9009.read_bytes(), SHA256,
                                                              lambda f: quote_part(f, 1, lambda q: q[:60])))],
         "TPMS_ATTEST: restartCount at offset 58 needs 4 bytes but 2 are left"),
        (lambda p: ["--tpm-attestation", write(p, replace(NONCE9009.read_bytes(), 3, []))],
         "the attestation has no event log; pass the vTPM's log with --tpm-event-log"),
        (lambda p: ["--tpm-event-log", str(TPM_LOG), "--tpm-nonce", "9009"], "--tpm-nonce needs --tpm-attestation"),
        (lambda p: ["--tpm-attestation", str(NONCE9009), "--tpm-nonce", "xyz"], "--tpm-nonce is not hex"),
        (lambda p: ["--tpm-attestation", str(NONCE9009), "--tpm-nonce", ""], "--tpm-nonce is not hex of 1 to 64 bytes"),
        (lambda p: ["--tpm-attestation", write(p, b"\x08\x00" * 600_000)], "Attestation: more than 1000 fields"),
        (lambda p: ["--tpm-attestation", str(NONCE9009), "--at", "yesterday"], "is not ISO-8601"),
    ],
)
def test_bad_tpm_input_exits_2_with_one_line(tmp_path, make, message):
    check_exit_2(make(tmp_path), message)


def test_the_lane_reads_an_attestation_in_process(tmp_path):
    """The parsed evidence is what the checks see: the SHA-256 quote (the second of three)."""
    evidence = vtpm.read_attestation(str(NONCE9009))
    assert evidence.quote is evidence.attestation.quotes[1] and evidence.attest.extra_data == b"\x90\x09"
    assert evidence.signature.describe() == "RSASSA-SHA256" and evidence.ak.describe() == "RSA-2048"
