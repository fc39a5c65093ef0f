"""Google's vTPM certificate authority: the roots and intermediates that issue the certificates of
GCE vTPM attestation keys (AKs), and the check that an AK certificate chains to one of the roots.

GCE gives every vTPM an AK and a certificate for it: the AK is a primary key of the endorsement
hierarchy made from the template in NV index 0x01c10001 (RSA) or 0x01c10003 (ECC), its certificate is
in 0x01c10000 or 0x01c10002 (google/go-tpm-tools at 67670e5c021a24f2366eb1808db2659211af5eb2,
``client/keys.go`` ``GceAttestationKeyRSA``/``GceAttestationKeyECC``, ``client/handles.go``).
go-tpm-tools keeps Google's CA certificates in ``server/ca-certs/`` and checks an AK certificate
against them with Go's x509 (``server/verify.go`` ``VerifyAKCert``: any extended key usage, the
TPM's critical subjectAltName accepted). The certificates below are those files, byte for byte
(``tests/vectors/gcp/go-tpm-tools/`` holds the copies a test compares them with):

* ``tpm_ek_root_1`` ("tpm_ek_v1_cloud_host_root", 2018-2118) and its intermediates
  ``tpm_ek_intermediate_2`` (2020) and ``tpm_ek_intermediate_3`` (2021);
* ``gcp_ek_ak_ca_root`` ("EK/AK CA Root", Google Cloud CAS, 2022-2122) and its intermediate
  ``gcp_ek_ak_ca_intermediate_v3``.

The path is checked explicitly, as RFC 5280 section 6.1 asks of these certificates: each one is
signed by the next and names it as its issuer, each is valid at the given time, each issuer is a CA
that may sign certificates (basicConstraints cA and pathLenConstraint, keyUsage keyCertSign), the
path ends at a root pinned here (the last signature checked with the pinned root's key, so a
look-alike with the same name is refused), and no certificate carries a critical extension this
check does not process. The end certificate must be an AK's: keyUsage digitalSignature (an EK certificate from the same CA has keyEncipherment only) and,
if it lists extended key usages, TCG's tcg-kp-AIKCertificate (2.23.133.8.1). cryptography's own
verifier is not used: its client and server profiles demand a clientAuth or serverAuth extended key
usage, which AK certificates do not have. Revocation is not checked: the certificates name CRLs,
and this check runs offline.
"""

from __future__ import annotations

import base64
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import cached_property

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtensionOID, NameOID

AIK_CERTIFICATE = x509.ObjectIdentifier("2.23.133.8.1")  # TCG tcg-kp-AIKCertificate
GCE_INSTANCE_INFO = x509.ObjectIdentifier("1.3.6.1.4.1.11129.2.1.21")  # go-tpm-tools server/verify.go
UNDERSTOOD_CRITICAL = {ExtensionOID.BASIC_CONSTRAINTS, ExtensionOID.KEY_USAGE, ExtensionOID.EXTENDED_KEY_USAGE,
                       ExtensionOID.SUBJECT_ALTERNATIVE_NAME}
MAX_PATH = 5


@contextmanager
def _quiet() -> Iterator[None]:
    """Google's intermediate names have CNs longer than X.520's 64 characters, which cryptography
    reports as a warning on every parse; it is not a problem here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


@dataclass(frozen=True)
class Known:
    name: str  # the go-tpm-tools file's stem
    path: str  # its path in google/go-tpm-tools
    sha256: str  # of the DER bytes
    der_base64: str

    @cached_property
    def der(self) -> bytes:
        return base64.b64decode(self.der_base64)

    @cached_property
    def certificate(self) -> x509.Certificate:
        return x509.load_der_x509_certificate(self.der)


_TPM_EK_ROOT_1 = Known(
    "tpm_ek_root_1", "server/ca-certs/tpm_ek_root_1.cer",
    "9bd5285f8fb18502a7947e621ffd470266f49fcd3b73e19a190f690ad32a7caf",
    "".join((
        "MIIGfzCCBGegAwIBAgIQbw4ksY2+TlOMT5bDqCZawTANBgkqhkiG9w0BAQsFADCBvjELMAkGA1UEBhMCVVMxEzARBgNVBAgT",
        "CkNhbGlmb3JuaWExFjAUBgNVBAcTDU1vdW50YWluIFZpZXcxEzARBgNVBAoTCkdvb2dsZSBMTEMxDjAMBgNVBAsTBUNsb3Vk",
        "MV0wWwYDVQQDDFR0cG1fZWtfdjFfY2xvdWRfaG9zdF9yb290LXNpZ25lci0wLTIwMTgtMDQtMDZUMTA6NTg6MjYtMDc6MDAg",
        "SzoxLCAxOlB3MDAzSHNGWU80OjA6MTgwIBcNMTgwNDA2MTc1ODI2WhgPMjExODA0MDYxODU4MjZaMIG+MQswCQYDVQQGEwJV",
        "UzETMBEGA1UECBMKQ2FsaWZvcm5pYTEWMBQGA1UEBxMNTW91bnRhaW4gVmlldzETMBEGA1UEChMKR29vZ2xlIExMQzEOMAwG",
        "A1UECxMFQ2xvdWQxXTBbBgNVBAMMVHRwbV9la192MV9jbG91ZF9ob3N0X3Jvb3Qtc2lnbmVyLTAtMjAxOC0wNC0wNlQxMDo1",
        "ODoyNi0wNzowMCBLOjEsIDE6UHcwMDNIc0ZZTzQ6MDoxODCCAiIwDQYJKoZIhvcNAQEBBQADggIPADCCAgoCggIBAPvCO6Tu",
        "V/jpJ4auYVo+9DKtdsC7EP5pXtyXwvbnCj2kT+8JPGb++tOJylihDSO2BNrtqVukkiV8dXYY0MQNufPinSnBZP7s1RXN4F99",
        "k0tSI3e5TI2DwRFBV0jcu7rYZlzx3mO1ltNp/9UVA3zxLz663SPnoBBUUNlXnY90JudOLfwXNP68KiCt/YIG7XrIRMY8iXNF",
        "rTS9BIlaLb+LIgmh29FN/YcQsXsAyum835FoULcDLqzrTjA+3rfRvQLwrq5QsJcEVuZYVRQS5td4RbRDz4GLQzHtRT0DSe89",
        "aFAndaK8h4i/WLDoOI8SJ8B8m+VvOWDYnx/7qP6NsCnicVg7BQzYqAtlTTHUzi5Nd2p7Hc3FbbqYU74EdNTtFAwDsI95N0f+",
        "LC3wRK1xvGgaRSdnJeklhNVsdO00TDkmAVdkkK+o7Pij2Ss2ywW9uRH5gnosnfswiWxAe9LvwJfBr4MNtha7evAwcvqkRvBJ",
        "Fgd+AVugOuwOCC3rHFEquaoUWpNrvSBFMVooWgs0fMMcStYYj+vRd9aNDtgHsbgSQvCFDmo91lcqRFcwYqDf8JmQwZO9yYOz",
        "jb/73MBsxRzuXpeQ9/L/SrIgL3zS7LLTybbQ3LJO592vz+sEk6/P/IOZSGPSh5NLVLSzjHfUuMR60hJ8zGo34QHJ/p1m6aHf",
        "k52hAgMBAAGjdTBzMA4GA1UdDwEB/wQEAwIBhjAQBgNVHSUECTAHBgVngQUIATAPBgNVHRMBAf8EBTADAQH/MB0GA1UdDgQW",
        "BBRl9OTmqvb9WtKInKhTVfcAjgj3pTAfBgNVHSMEGDAWgBRl9OTmqvb9WtKInKhTVfcAjgj3pTANBgkqhkiG9w0BAQsFAAOC",
        "AgEAJY6404gcN0hetPP/wdmL8fullQHfro3Jw5V311MFlkFEHpHS0+Bhg+Brt2J3D9CVpsAhmU5Wy8CrdZ25dh8vRp27Ki5z",
        "aq3VWnyQSt0zjIGwez7WMbq4ky5SfMlkmM5XvE1Boi99P6K4Qi2pJdU1JA4yYi6aiTz6A7iG7df769VokOD1Q4LIccD5MLUy",
        "s+ptnbn30e1VmteBrHagrYUpedUUTzBo2050DoQLPTuGRBsQBnBkMD2N+yrj6Nov4YufKPQUklu3PtLxdjZMa3U7Yd+Aw2WJ",
        "JgD4xu0OH4SYfnnguaSX20njyi8tXNxkhelXGMQt85YCuoYE5nBMDLQ0M0jsz0abUHjYavlHsVTxwPNWxUFONI3+tDdy9ZWX",
        "whYDRg/C+z7IvcrO9hcnghmJ7a1lX1oTHCah9bjTqz5w+cccx/nXHXpMglcACXJXE7LlvO3VeStT+57cPuIfpRO7dRbce1O8",
        "qfnGH4Sk0LNmJai6OfFU/5499lvPdWbwChdLwaTFu/2Hs/Tq4bXvi9nHk0WSIQbPuUsFACRUf1U+NhyF7Ly6vWkI2cV3fI2w",
        "N1gQ2YgOiESSNE50dof8LyJ6RO97aQqAkW0Qeqj7xfL2+U6qlCQNNp4gSbBegysrcGNZKz/iBmmWoNvicw9mpPQqHnLv60Iv",
        "Rumxby/n617o/jU=",
    )),
)
_GCP_EK_AK_CA_ROOT = Known(
    "gcp_ek_ak_ca_root", "server/ca-certs/gcp_ek_ak_ca_root.crt",
    "594759594b9b61524f6c8ef668f7177f7b9066bc0674f2f49fe9e052be78beb2",
    "".join((
        "MIIGATCCA+mgAwIBAgIUAKZdpPnjKPOANcOnPU9yQyvfFdwwDQYJKoZIhvcNAQELBQAwfjELMAkGA1UEBhMCVVMxEzARBgNV",
        "BAgTCkNhbGlmb3JuaWExFjAUBgNVBAcTDU1vdW50YWluIFZpZXcxEzARBgNVBAoTCkdvb2dsZSBMTEMxFTATBgNVBAsTDEdv",
        "b2dsZSBDbG91ZDEWMBQGA1UEAxMNRUsvQUsgQ0EgUm9vdDAgFw0yMjA3MDgwMDQwMzRaGA8yMTIyMDcwODA1NTcyM1owfjEL",
        "MAkGA1UEBhMCVVMxEzARBgNVBAgTCkNhbGlmb3JuaWExFjAUBgNVBAcTDU1vdW50YWluIFZpZXcxEzARBgNVBAoTCkdvb2ds",
        "ZSBMTEMxFTATBgNVBAsTDEdvb2dsZSBDbG91ZDEWMBQGA1UEAxMNRUsvQUsgQ0EgUm9vdDCCAiIwDQYJKoZIhvcNAQEBBQAD",
        "ggIPADCCAgoCggIBAJ0l9VCoyJZLSol8KyhNpbS7pBnuicE6ptrdtxAWIR2TnLxSgxNFiR7drtofxI0ruceoCIpsa9NHIKrz",
        "3sM/N/E8mFNHiJAuyVf3pPpmDpLJZQ1qe8yHkpGSs3Kj3s5YYWtEecCVfzNs4MtKvGfA+WKB49A6Noi8R9R1GonLIN6wSXX3",
        "kP1ibRn0NGgdqgfgRe5HC3kKAhjZ6scT8Eb1SGlaByGzE5WoGTnNbyifkyx9oUZxXVJsqv2q611W3apbPxcgev8z5JXQUbrr",
        "Q7EbO0StK1DsKRsKLuD+YLxjrBRQ4UeIN5WHp6G0vgYiOptHm6YKZxQemO/kVMLRzsm1AYH7eNOFekcBIKRjSqpk5m4ud04q",
        "um6f0hBj3iE/Pe+DvIbVhLh9ItAunISGQPA9dYEgfA/qWir+pU7LV3phpLeGhull8G/zYmQhF3heg0buIR70aavzT8iLAQrx",
        "VMNRZJEGMwIN/tq8YiT3+3EZIcSqq6GAGjiuVw3NIsXC3+CuSJGQ5GbDp49Lc6VWPHeWeFvwSUGgxKXq5r1+PRsoYgK6S4hh",
        "ecgXEX5c7Rta6TcFlEFb0XK9fpy1dr89LeFGxUBpdDvKxDRLMm3FQen8rmR/PSReEcJsaqbUP/q7Pc7k0RfF9Mb6AfPZfnqg",
        "pYJQ+IFSr9EjRSW1wPcL03zoTP47AgMBAAGjdTBzMA4GA1UdDwEB/wQEAwIBBjAQBgNVHSUECTAHBgVngQUIATAPBgNVHRMB",
        "Af8EBTADAQH/MB0GA1UdDgQWBBRJ50pbVin1nXm3pjA8A7KP5xTdTDAfBgNVHSMEGDAWgBRJ50pbVin1nXm3pjA8A7KP5xTd",
        "TDANBgkqhkiG9w0BAQsFAAOCAgEAlfHRvOB3CJoLTl1YG/AvjGoZkpNMyp5X5je1ICCQ68b296En9hIUlcYY/+nuEPSPUjDA",
        "3izwJ8DAfV4REgpQzqoh6XhR3TgyfHXjJ6DC7puzEgtzF1+wHShUpBoe3HKuL4WhB3rvwk2SEsudBu92o9BuBjcDJ/GW5GRt",
        "pD/H71HAE8rI9jJ41nS0FvkkjaX0glsntMVUXiwcta8GI0QOE2ijsJBwk41uQGt0YOj2SGlEwNAC5DBTB5kZ7+6X9xGE6/c+",
        "M3TAA0ONoX18rNfif94cCx/mPYOs8pUkANRAQ4aTRBvpBrryGT8R1ahTBkMeRQG3tdsLHRT8fJCFUANd5WLWsi83005y/WuM",
        "z8/gFKc0PL+F+MubCsJ1ODPTRscH93QlS4zEMg5hDAIks+fDoRJ2QiROqo7GAqbTc7STKfGcr9+pa63na7f3oy1sZPWPdxB8",
        "tx5z3lghiPP3ktQx/yK/1Fwf1hgxJHFy/2UcaGuOXRRRTPyEnppZp82Kigs9aPHWtaVm2/LrXX2fvT9iM/k0CovNAj8rztHx",
        "sUEoA0xJnSOJNPpe9PRdjsTj7/u3Xu6hQLNNidBHgI3Hcmi704HMMd/3yZ424OOrS32ylpeU1oeQHFrLE6hYX4/ttMETbmES",
        "IKd2rTgstPotSvkuB5TljbKYPR+lq7hQav16U4E=",
    )),
)
_TPM_EK_INTERMEDIATE_2 = Known(
    "tpm_ek_intermediate_2", "server/ca-certs/tpm_ek_intermediate_2.crt",
    "5d8dbcf8c8053dd8ffad711b6219355032b7122c34cac0f90ccb49def69ec504",
    "".join((
        "MIIGFDCCA/ygAwIBAgIQKGFud4l+Tma/3sf58QMTrDANBgkqhkiG9w0BAQsFADCBvjELMAkGA1UEBhMCVVMxEzARBgNVBAgT",
        "CkNhbGlmb3JuaWExFjAUBgNVBAcTDU1vdW50YWluIFZpZXcxEzARBgNVBAoTCkdvb2dsZSBMTEMxDjAMBgNVBAsTBUNsb3Vk",
        "MV0wWwYDVQQDDFR0cG1fZWtfdjFfY2xvdWRfaG9zdF9yb290LXNpZ25lci0wLTIwMTgtMDQtMDZUMTA6NTg6MjYtMDc6MDAg",
        "SzoxLCAxOlB3MDAzSHNGWU80OjA6MTgwIBcNMjAxMDIyMjEwMjA4WhgPMjEyMDEwMjIyMTAyMDhaMIG5MQswCQYDVQQGEwJV",
        "UzETMBEGA1UECBMKQ2FsaWZvcm5pYTEWMBQGA1UEBxMNTW91bnRhaW4gVmlldzETMBEGA1UEChMKR29vZ2xlIExMQzEOMAwG",
        "A1UECxMFQ2xvdWQxWDBWBgNVBAMMT3RwbV9la192MV9jbG91ZF9ob3N0LXNpZ25lci0wLTIwMjAtMTAtMjJUMTQ6MDI6MDgt",
        "MDc6MDAgSzoxLCAyOkhCTnBBM1RQQWJNOjA6MTgwggEiMA0GCSqGSIb3DQEBAQUAA4IBDwAwggEKAoIBAQC04DIsQSkrbQCB",
        "4/7EV2BDEXZzBBBUVDaF/yuDzxzdMNuxkdNbB/cSbKbSc4+gI+4NLIn/qZA37KzWAd8PSviF2zFgC+ZF4m4wr7J5830n4OkA",
        "BqfdtP368ROI1b5Ue1avugNfeHUI2Tz1YIflDlXlnotNMT4O4SIMug9sfBFjnwINbivDu3gUP803vfXDCsTcndKA7WgN5jXD",
        "EAfdP1EZtugODsCxSjvcveKr30ORmCg776N+bt+Q+YQeQxFxWF6eIDG8u4BPk9p/mXXIfqQMd+WprWEt1pdvQFURoieAN2hx",
        "EkoL959oFiva69vAjTU8HqaAb16uWhWSQayH0lXbAgMBAAGjggENMIIBCTAOBgNVHQ8BAf8EBAMCAQYwEAYDVR0lBAkwBwYF",
        "Z4EFCAEwEgYDVR0TAQH/BAgwBgEB/wIBADAdBgNVHQ4EFgQUE81xuliyClGjKA5luZaeux0NEZMwHwYDVR0jBBgwFoAUZfTk",
        "5qr2/VrSiJyoU1X3AI4I96UwTQYIKwYBBQUHAQEEQTA/MD0GCCsGAQUFBzAChjFodHRwOi8vcGtpLmdvb2cvY2xvdWRfaW50",
        "ZWdyaXR5L3RwbV9la19yb290XzEuY3J0MEIGA1UdHwQ7MDkwN6A1oDOGMWh0dHA6Ly9wa2kuZ29vZy9jbG91ZF9pbnRlZ3Jp",
        "dHkvdHBtX2VrX3Jvb3RfMS5jcmwwDQYJKoZIhvcNAQELBQADggIBAJDz1ozb36GhNkcflz77qNXW/I6TqBN7VUMJy5zVXxIx",
        "LHDayU6mJGizriQkncDmnWY8/NUgroXKIyURBsB2sNI41KcQFi+ScYRGKuGkiLt/0huxA0njCLIOyAcDN6oaph8Eo7rCL5Md",
        "hA9uMxnHMgWVWjnpgYKVMui6lakEcpek2ngNMpSHe7VxmM2L/56ucQblvIma00ANC6NAi+QOFuyoqrmZhXjj0w/p2yO5W38j",
        "p/tcPX38FZ6uZpD3iYAfBgRc4yrvUF4J2UUlF3xBL0uQI3G96uh0OcBzAA4KFMRBfsZR4rfgbAhCRq/LZ0NAIhb9ndOkHYl0",
        "/6TyQFqSt77v8E+w2mwzAsYp/jAAu7IF8s0WMcZPTBKgMk9iRoVRAU7r6sJcqfhumx7o8H57k+90bpAZjZsBHLj/OWFQDK6T",
        "BrxL9kXtZ8eL6c+M7o5Mx3mCzqjjp5fEe/K5Dr2NhzcU31TTGdRz/2t7eFMjP1ylsNCXSHNB7yoA1oUcWKo6nuitUPxLjiiv",
        "j6cvhMPsJLRpMJQN78k2VF7osri73l1Df22ELkWz6tvvb6O6Dh3fWCeKP713B/+JRv4XJ10wPL1StRDE8vl/mi+hyc/c7QGe",
        "uRoYdmKu5xti9IxtaxZaZJqCXm4C7BdS6w7bUa6T6smyKpXcL4iX/vx2v7Ym67AG",
    )),
)
_TPM_EK_INTERMEDIATE_3 = Known(
    "tpm_ek_intermediate_3", "server/ca-certs/tpm_ek_intermediate_3.crt",
    "7132b6ea71101f6c51bb58f98c3798c19b65be510eca0344318900510b593178",
    "".join((
        "MIIGFDCCA/ygAwIBAgIQdPr3fPH3QMiVke9TGXN5dzANBgkqhkiG9w0BAQsFADCBvjELMAkGA1UEBhMCVVMxEzARBgNVBAgT",
        "CkNhbGlmb3JuaWExFjAUBgNVBAcTDU1vdW50YWluIFZpZXcxEzARBgNVBAoTCkdvb2dsZSBMTEMxDjAMBgNVBAsTBUNsb3Vk",
        "MV0wWwYDVQQDDFR0cG1fZWtfdjFfY2xvdWRfaG9zdF9yb290LXNpZ25lci0wLTIwMTgtMDQtMDZUMTA6NTg6MjYtMDc6MDAg",
        "SzoxLCAxOlB3MDAzSHNGWU80OjA6MTgwIBcNMjExMDEyMTEyMjExWhgPMjEyMTEwMTIxMTIyMTFaMIG5MQswCQYDVQQGEwJV",
        "UzETMBEGA1UECBMKQ2FsaWZvcm5pYTEWMBQGA1UEBxMNTW91bnRhaW4gVmlldzETMBEGA1UEChMKR29vZ2xlIExMQzEOMAwG",
        "A1UECxMFQ2xvdWQxWDBWBgNVBAMMT3RwbV9la192MV9jbG91ZF9ob3N0LXNpZ25lci0wLTIwMjEtMTAtMTJUMDQ6MjI6MTEt",
        "MDc6MDAgSzoxLCAzOm5idmFHWkZMY3VjOjA6MTgwggEiMA0GCSqGSIb3DQEBAQUAA4IBDwAwggEKAoIBAQDvM90hFR7OBvS/",
        "U82Lw7hkWEsf0ut9rnvTaKHNK1Si+swztPBgGU7/RveNRxVFgU6q5NZh/jnG1xl5H9D+1zHuThKOekQ7axUXpdcPtN3CXp+w",
        "kgkOTdZgbnn4jnDQibwyBQMuzfP+8jR8rcpAS5PGwpyr50IjgJB0428hrOr1hkfGs2OQ23eqcSGCniJtnnEkmNxijOAqvAoU",
        "anFWLmpEgNqLqSXohSFVMoS6VtiKHfC45vb0RNkzSozEDnjC7qY9nnaBC4bweMgYTQeqjX/L+5ZPzYLPUTDuyD8/R3AiZlc6",
        "FlTkzK1avnPUg4D5SRx8gMoHr5meZ67g3HsnE9TzAgMBAAGjggENMIIBCTAOBgNVHQ8BAf8EBAMCAQYwEAYDVR0lBAkwBwYF",
        "Z4EFCAEwEgYDVR0TAQH/BAgwBgEB/wIBADAdBgNVHQ4EFgQUZwjEdxH91YeE0ywda02Xg2CEJYAwHwYDVR0jBBgwFoAUZfTk",
        "5qr2/VrSiJyoU1X3AI4I96UwTQYIKwYBBQUHAQEEQTA/MD0GCCsGAQUFBzAChjFodHRwOi8vcGtpLmdvb2cvY2xvdWRfaW50",
        "ZWdyaXR5L3RwbV9la19yb290XzEuY3J0MEIGA1UdHwQ7MDkwN6A1oDOGMWh0dHA6Ly9wa2kuZ29vZy9jbG91ZF9pbnRlZ3Jp",
        "dHkvdHBtX2VrX3Jvb3RfMS5jcmwwDQYJKoZIhvcNAQELBQADggIBANz3sNr/tCAuov2t/76tSL0l5kvShhsXuvZd3TTUD0lk",
        "cUfVCDBSKD1C3us/MSl5CFEcZFs1PO3nkh6LzJZAgyiUcsMNv1VgPBofeTAXEzPdtgZoSTLW12e75zc2likR7CCVCZV9h6Po",
        "wR7FCNwBCMi6xt28Xp1SwL3OwrT+uPTDZYCcr7zPZhnwkB+Dm89TpCyCquXoic50dN2Uj3Js8ybEEWpkrEPR3d4nQwqIGuoZ",
        "Qcb4lwdfmDGRvRb1UUWUiGNk5XwJ74sCM6W3NTeq4ixgpKterqtVBenRrpfcNsgBw/eeLImdCCfCETWuHLHnZHxyirOAWxCI",
        "5zGObkezG62JiFlveFnTKf6C4UtK7oofSzVR8w75T+xPXXGx3OfR1zV4ry3n3lEQRa7T/Fp80B4/SSTH0sBbR5Gylzni+Abg",
        "A5pkrU7HN4xFRHpdPWEhQzf4llqxOhyr9qO0WIAuFgYEVlYDOdxK6+VOwbc/3jd0en9SsOyIAovlpyrtoCS62fNk2ZozBLKp",
        "Ba/57xS8pdjHZ6pl32ZbQ75IOY4L8tt+2oDRxsCSB+z1XoRaHbZ/t38GKZvmOfekj6Ey2keiyS/iYLV/hOxYo7ugXdovF+iE",
        "6i16LFkoaWWXiy7MJcWxlanbldRnAwntSucAsnV1jW7XJnod7bPwgdoIkIBuT6Hd",
    )),
)
_GCP_EK_AK_CA_INTERMEDIATE_V3 = Known(
    "gcp_ek_ak_ca_intermediate_v3", "server/ca-certs/gcp_ek_ak_ca_intermediate_v3.crt",
    "c84de8116dfaf5a908f21e810487791f5437e206d00ad8025050cca6bd2ff627",
    "".join((
        "MIIHIjCCBQqgAwIBAgITZ2viLuozn1JgaG2giK96ZF5cPzANBgkqhkiG9w0BAQsFADB+MQswCQYDVQQGEwJVUzETMBEGA1UE",
        "CBMKQ2FsaWZvcm5pYTEWMBQGA1UEBxMNTW91bnRhaW4gVmlldzETMBEGA1UEChMKR29vZ2xlIExMQzEVMBMGA1UECxMMR29v",
        "Z2xlIENsb3VkMRYwFAYDVQQDEw1FSy9BSyBDQSBSb290MCAXDTIyMDgyMzIyMjYyOVoYDzIxMjIwNzA4MDU1NzIzWjCBhjEL",
        "MAkGA1UEBhMCVVMxEzARBgNVBAgTCkNhbGlmb3JuaWExFjAUBgNVBAcTDU1vdW50YWluIFZpZXcxEzARBgNVBAoTCkdvb2ds",
        "ZSBMTEMxFTATBgNVBAsTDEdvb2dsZSBDbG91ZDEeMBwGA1UEAxMVRUsvQUsgQ0EgSW50ZXJtZWRpYXRlMIICIjANBgkqhkiG",
        "9w0BAQEFAAOCAg8AMIICCgKCAgEAoGMe14Bhqh9kWnHW0VnqNl+Iake9KUANTgC12z+8ULqciIvDoiw0ezQ1fP/pwKhNRxcV",
        "wP5+JgbJJluZw1lu1uV5trLs5yA/Er9CfVGX8CQF1TB7Zfv6Hf7hv7lv7eE986rda1oM55hJXEt0L3BvWfVpPibBloktSqqb",
        "SVzrBJrtSFi9P+Hhku6Bw6Zt1T/8/z6OVdMbPNEhbPtCGFxmwyzKfb3wWU2YCIzZd7h53pV0ea1VJL3iGmRBJhC3Rkwvs3Qc",
        "SZYYENft6x42jWSK/t2WrrZknP2Q67OFlhVL/gMo0NJ6bczovY03yRTnoDcN6YXKqlc7iwPdUJn86jJHPL2s9KCWR/UDUGtb",
        "4PqZSaHQXA58N/tZSyQ48T0v+ar9CYVVAIOV93VJDn13j0lZLax1bAkbzl0I7il1S+W2wEVx+K3WUf/29aBhRLZ3Ddkyj/Ta",
        "8HxhMXpdOciddEXh2G4o/WaQAh3XCW8FGkKXjW8Ao7kBDBbpmCvlRvOtTBWetx9dIOGzUkX53s3R1soUvMeZAP8208fe06+T",
        "Oj+k7Mcn5qY1XuALzAKhZlR9hGw1pjKEIUCKTJbfL+L2QDdP7OS2Kc2mBVQAcLu9PmaG++OZoVTlUrGd/6DBfKTEsN+aytWo",
        "CRkJKu8kTWYyaMhXAYD1C4yp5xLQMKyFImNXumUCAwEAAaOCAYwwggGIMA4GA1UdDwEB/wQEAwIBBjAQBgNVHSUECTAHBgVn",
        "gQUIATAPBgNVHRMBAf8EBTADAQH/MB0GA1UdDgQWBBTpZnNUZ2Yb791lv+XoXOORC5sFUjAfBgNVHSMEGDAWgBRJ50pbVin1",
        "nXm3pjA8A7KP5xTdTDCBjQYIKwYBBQUHAQEEgYAwfjB8BggrBgEFBQcwAoZwaHR0cDovL3ByaXZhdGVjYS1jb250ZW50LTYy",
        "ZDcxNzczLTAwMDAtMjFkYS04NTJlLWY0ZjVlODBkNzc3OC5zdG9yYWdlLmdvb2dsZWFwaXMuY29tLzAzMmJmOWQzOWRiNGZh",
        "MDZhYWRlL2NhLmNydDCBggYDVR0fBHsweTB3oHWgc4ZxaHR0cDovL3ByaXZhdGVjYS1jb250ZW50LTYyZDcxNzczLTAwMDAt",
        "MjFkYS04NTJlLWY0ZjVlODBkNzc3OC5zdG9yYWdlLmdvb2dsZWFwaXMuY29tLzAzMmJmOWQzOWRiNGZhMDZhYWRlL2NybC5j",
        "cmwwDQYJKoZIhvcNAQELBQADggIBAJOunRNQRR4hxBRpzVWhAaSftC7mwvvys+p6ZmUpbYAObjsaxRX+aucZF2jofS1VDPQy",
        "7j0aj8wTIhz0qv6jEvkMZH/E5fb2rC/SSiqui51RwiTWi7Ry2XMuAbgG2suCirTL6O/iYed6vyJf07iysMK0o0bEeChEh3XP",
        "QNrl+Dcdrff4fUG6SGGgx0IXWJHD9qqU895rYXCyFhJe+QCtPHg/HnYX//yGlm7xhESYl0hgEVCITvu0YjNlKoBEiBMtHk0B",
        "HCeFkUm+pBydOjSl0BHUJs3UAJXuaYDp/CjpnnYfRo8EF2Xy5/bCqFU+jrjYLz1xbOh28H4kNudZ3KV9jQoM+lDqmeM7rq79",
        "r5ie1XfpC21tjxcAJktmxJP1hRpOtWoVtSJFLj05avqpDwt6AWDq2azquN7gjZFF/vNB6fbK+w/Yi7ArSLyo2z18vABWNEiV",
        "032NG0jrXXYWoc6l8bfXUxwG6Ntkj2L8p35ynxjR0mA73l7z920iBAl6rp15FfoR3LSzo1l+VaucnrWcnHow/kEFGqjtP8uE",
        "mzQc5Rq+5Xd5/64jEcomGKNh+6b0gY3Y67q2NlrFa6Fo9vfzDwqdYSYzENb/PR3uGFhkvoJzTWFXdsVypk0frMsX1chdbHOM",
        "4jzDNhHAbQNumH82E8avyKjepIf+EPC61pmPeRHX",
    )),
)

ROOTS = (_TPM_EK_ROOT_1, _GCP_EK_AK_CA_ROOT)
INTERMEDIATES = (_TPM_EK_INTERMEDIATE_2, _TPM_EK_INTERMEDIATE_3, _GCP_EK_AK_CA_INTERMEDIATE_V3)
KNOWN = {k.der: k for k in (*ROOTS, *INTERMEDIATES)}


def load(der: bytes) -> x509.Certificate:
    """A DER certificate with its extensions parsed, or ``ValueError``."""
    with _quiet():
        certificate = x509.load_der_x509_certificate(der)
        certificate.extensions  # noqa: B018 - parsed now, so a malformed extension is bad input here
        certificate.subject  # noqa: B018
        certificate.issuer  # noqa: B018
    return certificate


def label(certificate: x509.Certificate) -> str:
    """A known CA's name, else the certificate's common name, else its serial number."""
    der = certificate.public_bytes(Encoding.DER)
    if der in KNOWN:
        return KNOWN[der].name
    with _quiet():
        names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    name = str(names[0].value) if names else ""
    return name[:60] or f"serial {certificate.serial_number:x}"


@dataclass(frozen=True)
class Chain:
    path: tuple[x509.Certificate, ...]  # the AK certificate first; a pinned root last when it chains
    root: str | None  # the pinned root's name when every check holds
    problem: str | None

    def describe(self) -> str:
        return " <- ".join(["AK certificate", *(label(c) for c in self.path[1:])])


def _issued_by(certificate: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        certificate.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def _extension(certificate: x509.Certificate, kind: type[x509.ExtensionType]) -> x509.ExtensionType | None:
    try:
        return certificate.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def _stamp(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _problem(path: Sequence[x509.Certificate], at: datetime) -> str | None:
    for certificate in path:
        name = "the AK certificate" if certificate is path[0] else label(certificate)
        start, end = certificate.not_valid_before_utc, certificate.not_valid_after_utc
        if not start <= at <= end:
            return f"{name} is valid {_stamp(start)} .. {_stamp(end)}, not at {_stamp(at)}"
        unknown = [e.oid.dotted_string for e in certificate.extensions
                   if e.critical and e.oid not in UNDERSTOOD_CRITICAL]
        if unknown:
            return f"{name} has critical extensions this check does not process: {', '.join(unknown)}"
    for below, issuer in enumerate(path[1:]):
        name = label(issuer)
        constraints = _extension(issuer, x509.BasicConstraints)
        if not isinstance(constraints, x509.BasicConstraints) or not constraints.ca:
            return f"{name} is not a CA certificate (basicConstraints), yet it signed the next one"
        if constraints.path_length is not None and below > constraints.path_length:
            return f"{name} allows {constraints.path_length} intermediates below it, the path has {below}"
        usage = _extension(issuer, x509.KeyUsage)
        if isinstance(usage, x509.KeyUsage) and not usage.key_cert_sign:
            return f"{name} may not sign certificates (keyUsage without keyCertSign)"
    leaf = path[0]
    constraints = _extension(leaf, x509.BasicConstraints)
    if isinstance(constraints, x509.BasicConstraints) and constraints.ca:
        return "the AK certificate is a CA certificate"
    usage = _extension(leaf, x509.KeyUsage)
    if not isinstance(usage, x509.KeyUsage) or not usage.digital_signature:
        return "the certificate is not an AK certificate: its keyUsage lacks digitalSignature (an EK certificate?)"
    purposes = _extension(leaf, x509.ExtendedKeyUsage)
    if isinstance(purposes, x509.ExtendedKeyUsage) and AIK_CERTIFICATE not in purposes:
        return "the certificate is not an AK certificate: its extended key usage lacks tcg-kp-AIKCertificate"
    return None


def verify_ak_certificate(certificate: x509.Certificate, intermediates: Sequence[x509.Certificate],
                          at: datetime) -> Chain:
    """The path from ``certificate`` to a pinned Google vTPM root through ``intermediates`` (the
    attestation's) and the known ones, with every check of the module docstring."""
    pool = [*intermediates, *(k.certificate for k in INTERMEDIATES)]
    path = [certificate]
    with _quiet():
        while True:
            current = path[-1]
            root = next((k for k in ROOTS if _issued_by(current, k.certificate)), None)
            if root is not None:
                path.append(root.certificate)
                problem = _problem(path, at)
                return Chain(tuple(path), None if problem else root.name, problem)
            if len(path) >= MAX_PATH:
                return Chain(tuple(path), None, f"no Google vTPM root within {MAX_PATH} certificates")
            issuer = next((c for c in pool if c not in path and _issued_by(current, c)), None)
            if issuer is None:
                name = "the AK certificate" if current is certificate else label(current)
                return Chain(tuple(path), None, f"{name} is not signed by a Google vTPM CA (it names "
                                                f"{current.issuer.rfc4514_string()[:100]!r} as its issuer)")
            path.append(issuer)


# ---------------------------------------------------------------------------------------------
# The GCE instance an AK certificate names


def _tlv(data: bytes, offset: int) -> tuple[int, bytes, int]:
    """One DER tag, its contents and where the next one starts."""
    if offset + 2 > len(data):
        raise ValueError("truncated")
    tag, length = data[offset], data[offset + 1]
    offset += 2
    if length & 0x80:
        count = length & 0x7F
        if not 1 <= count <= 3 or offset + count > len(data):
            raise ValueError("bad length")
        length, offset = int.from_bytes(data[offset:offset + count], "big"), offset + count
    if offset + length > len(data):
        raise ValueError("truncated")
    return tag, data[offset:offset + length], offset + length


def _sequence(data: bytes) -> list[tuple[int, bytes]]:
    items, offset = [], 0
    while offset < len(data):
        tag, value, offset = _tlv(data, offset)
        items.append((tag, value))
    return items


def instance(certificate: x509.Certificate) -> str | None:
    """The GCE instance in the AK certificate's extension 1.3.6.1.4.1.11129.2.1.21, readable:
    SEQUENCE { zone UTF8String, projectNumber INTEGER, projectId UTF8String, instanceId INTEGER,
    instanceName UTF8String, [0] EXPLICIT SEQUENCE { [0] securityVersion, [1] isProduction } }
    (go-tpm-tools ``server/verify.go`` ``gceInstanceInfo``, which trusts it only when isProduction)."""
    try:
        value = certificate.extensions.get_extension_for_oid(GCE_INSTANCE_INFO).value
    except x509.ExtensionNotFound:
        return None
    raw = value.value if isinstance(value, x509.UnrecognizedExtension) else b""
    try:
        tag, body, end = _tlv(raw, 0)
        items = _sequence(body)
        if tag != 0x30 or end != len(raw) or [t for t, _ in items[:5]] != [0x0C, 0x02, 0x0C, 0x02, 0x0C]:
            raise ValueError("not the GCE instance structure")
        zone, project_number, project, instance_id, name = (
            v.decode("utf-8") if t == 0x0C else str(int.from_bytes(v, "big", signed=True)) for t, v in items[:5])
        production = False
        if len(items) > 5 and items[5][0] == 0xA0:
            _, properties, _ = _tlv(items[5][1], 0)
            for tag, inner in _sequence(properties):
                if tag == 0xA1:
                    _, flag, _ = _tlv(inner, 0)
                    production = flag not in (b"", b"\x00")
    except (ValueError, UnicodeDecodeError):
        return "(an unreadable GCE instance extension)"
    text = f"instance {name} (id {instance_id}), project {project} ({project_number}), zone {zone}"
    return text if production else text + ", not marked production"
