"""A TDX quote on its own: reading it in any form a guest hands it out, its registers, and its
signature chain and TCB status checked with Intel's collateral (dcap-qvl).

dcap-qvl's ``verify`` fails only on a broken chain, bad collateral or a ``Revoked`` TCB: it returns
``OutOfDate`` and ``ConfigurationNeeded`` platforms as verified (``TcbStatus::is_valid``,
Phala-Network/dcap-qvl#125). So the status is checked here against an explicit list (``UpToDate``
unless the operator accepts more), advisories are named, and the TDX module's identity is checked
against the collateral's ``tdxModule``/``tdxModuleIdentities`` the way Intel's QVL does
(Phala-Network/dcap-qvl#124): MR_SIGNER_SEAM and the masked SEAM attributes must be Intel's, and the
module's SVN (TEE_TCB_SVN[0]) selects the module's TCB level for its version (TEE_TCB_SVN[1]).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import dcap_qvl

from fleet.attest.checks import Check, InputError, iso, load_json, one_line, parse_time, read_bytes

MAX_QUOTE_FILE = 1024 * 1024  # a TDX quote with its certificate chain is about 5-10 KB
SUPPORTED_VERSIONS = (4, 5)
DEFAULT_TCB_STATUSES = ("UpToDate",)
TCB_STATUSES = ("UpToDate", "SWHardeningNeeded", "ConfigurationNeeded", "ConfigurationAndSWHardeningNeeded",
                "OutOfDate", "OutOfDateConfigurationNeeded")
SIGNATURE, GENUINE = "quote signature", "valid chain to Intel's root"
_COLLATERAL_TIME_ERROR = re.compile(r"expired|in the future|not yet valid|notvalidyet", re.IGNORECASE)
_HEX = re.compile(r"(?:[0-9a-fA-F]{2})*")
_BASE64 = re.compile(r"[A-Za-z0-9+/]+={0,2}")


# ---------------------------------------------------------------------------------------------
# Reading


def decode_quote(data: bytes, source: str = "quote") -> bytes:
    """Raw binary, hex (bare or ``0x``), base64, a JSON array of bytes, or a JSON string/object
    holding one of those under ``quote`` (dstack's GetQuote response)."""
    text = data.strip()
    if text[:1] in (b"[", b"{", b'"'):
        value = load_json(text, source, "pass the quote as binary, hex, base64 or a JSON array of bytes")
        if isinstance(value, dict):
            value = value.get("quote")
        if isinstance(value, list):
            if not all(isinstance(b, int) and not isinstance(b, bool) and 0 <= b <= 255 for b in value):
                raise InputError(f"{source}: the JSON array holds something other than bytes 0-255")
            return bytes(value)
        if isinstance(value, str):
            return _decode_text(value.encode("ascii", errors="replace"), source) or b""
        raise InputError(f"{source}: expected a JSON array of bytes or a hex or base64 string")
    return _decode_text(text, source) or data


def _decode_text(text: bytes, source: str) -> bytes | None:
    """Hex or base64 text, or None when it is neither (then it is raw binary)."""
    try:
        ascii_text = text.decode("ascii")
    except UnicodeDecodeError:
        return None
    body = ascii_text.removeprefix("0x")
    if body and _HEX.fullmatch(body):
        return bytes.fromhex(body)
    compact = "".join(ascii_text.split())
    if compact and len(compact) % 4 == 0 and _BASE64.fullmatch(compact):
        try:
            decoded = base64.b64decode(compact, validate=True)
        except binascii.Error:
            return None
        if decoded[:2] in (b"\x04\x00", b"\x05\x00"):
            return decoded
    return None


def parse(raw: bytes, source: str = "quote") -> Any:
    """dcap-qvl's parsed quote; only TDX quotes of versions 4 and 5."""
    if len(raw) < 48:
        raise InputError(f"{source}: {len(raw)} bytes is too short for a quote; is it complete?")
    version = int.from_bytes(raw[:2], "little")
    if version not in SUPPORTED_VERSIONS:
        raise InputError(f"{source}: a version {version} quote; TDX quotes of version 4 and 5 are supported")
    try:
        quote = dcap_qvl.parse_quote(raw)
    except ValueError as exc:
        raise InputError(f"{source}: not a quote dcap-qvl can parse ({one_line(exc)}); is it complete?") from None
    if not quote.is_tdx():
        raise InputError(f"{source}: a {quote.quote_type()} quote, not a TDX quote")
    return quote


def read(path: str, option: str = "--quote") -> bytes:
    return decode_quote(read_bytes(path, option, MAX_QUOTE_FILE), f"{option} {path}")


def registers(quote: Any) -> dict[str, str]:
    report = quote.report
    return {"mrtd": report.mr_td.hex(), "rtmr0": report.rt_mr0.hex(), "rtmr1": report.rt_mr1.hex(),
            "rtmr2": report.rt_mr2.hex(), "rtmr3": report.rt_mr3.hex()}


def summary(quote: Any) -> list[tuple[str, str]]:
    """What a quote says, for the operator to read (``verify`` prints it before its checks)."""
    report = quote.report
    try:
        fmspc = quote.fmspc()
    except ValueError:
        fmspc = "(no PCK certificate in the quote)"
    rows = [("quote", f"TDX, version {quote.header.version}, FMSPC {fmspc}"),
            *registers(quote).items(),
            ("report_data", report.report_data.hex()),
            ("mr_config_id", report.mr_config_id.hex()),
            ("mr_seam", report.mr_seam.hex()),
            ("tee_tcb_svn", report.tee_tcb_svn.hex()),
            ("td_attributes", report.td_attributes.hex()),
            ("xfam", report.xfam.hex())]
    return rows


# ---------------------------------------------------------------------------------------------
# Collateral


def read_collateral(path: str) -> dcap_qvl.QuoteCollateralV3:
    data = read_bytes(path, "--collateral", MAX_QUOTE_FILE)
    return parse_collateral(data, f"--collateral {path}")


def parse_collateral(data: bytes, source: str) -> dcap_qvl.QuoteCollateralV3:
    load_json(data, source, "pass Intel PCS collateral JSON as dcap-qvl writes it")
    try:
        return dcap_qvl.QuoteCollateralV3.from_json(data.decode("utf-8"))
    except ValueError as exc:
        raise InputError(f"{source}: not Intel PCS collateral ({one_line(exc)}); fetch it with dcap-qvl for this "
                         "quote") from None


_FETCH_TIMEOUT = 30
_MAX_COLLATERAL_PART = 4 * 1024 * 1024


def _get(url: str) -> tuple[bytes, Any]:
    request = urllib.request.Request(url, headers={"User-Agent": "dstack-fleet-verify"})
    with urllib.request.urlopen(request, timeout=_FETCH_TIMEOUT) as response:  # noqa: S310 - https or a PCCS
        body = response.read(_MAX_COLLATERAL_PART + 1)
        if len(body) > _MAX_COLLATERAL_PART:
            raise ValueError(f"{url} answered with more than {_MAX_COLLATERAL_PART} bytes")
        return body, response.headers


def _header(headers: Any, *names: str) -> str:
    for name in names:
        value = headers.get(name)
        if value:
            return urllib.parse.unquote(value)
    raise ValueError(f"the answer has no {names[0]} header")


def _signed_part(body: bytes, key: str) -> tuple[str, str]:
    """The JSON text of ``key`` exactly as sent (Intel signed those bytes) and its signature."""
    text = body.decode("utf-8")
    document = json.loads(text)
    match = re.search(r'"' + key + r'"\s*:\s*', text)
    if match is None or not isinstance(document, dict) or key not in document:
        raise ValueError(f"the answer has no {key}")
    _, end = json.JSONDecoder().raw_decode(text, match.end())
    return text[match.end():end], str(document["signature"])


def _crl_distribution_point(chain_pem: str) -> str:
    from cryptography import x509

    root = x509.load_pem_x509_certificates(chain_pem.encode())[-1]
    points = root.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    return next(name.value for point in points for name in point.full_name or []
                if isinstance(name, x509.UniformResourceIdentifier))


def fetch_collateral(raw: bytes, pccs_url: str) -> dcap_qvl.QuoteCollateralV3:
    """Intel's collateral for this quote from a PCCS or Intel's PCS (network), over the PCS v4 API
    as dcap-qvl's ``CollateralClient`` asks for it (Phala-Network/dcap-qvl ``src/collateral.rs``
    ``PcsEndpoints`` and ``fetch_for_fmspc_without_pck_chain`` at 9bffe30b): PCK CRL of the quote's
    CA, TCB info of its FMSPC, QE identity, and the root CA CRL (a PCCS serves it hex-encoded;
    Intel's PCS does not serve it, so it comes from the root certificate's distribution point).
    dcap-qvl's own ``get_collateral`` is not used: its async runtime crashes the interpreter at
    exit now and then."""
    quote = parse(raw, "--quote")
    base = pccs_url.rstrip("/").removesuffix("/sgx/certification/v4").removesuffix("/tdx/certification/v4")
    try:
        fmspc, ca, chain = quote.fmspc(), quote.ca(), (quote.cert_chain_pem_bytes() or b"").decode()
        crl, headers = _get(f"{base}/sgx/certification/v4/pckcrl?ca={ca}&encoding=der")
        crl_chain = _header(headers, "SGX-PCK-CRL-Issuer-Chain")
        body, headers = _get(f"{base}/tdx/certification/v4/tcb?fmspc={fmspc}")
        tcb_chain = _header(headers, "TCB-Info-Issuer-Chain", "SGX-TCB-Info-Issuer-Chain")
        tcb_info, tcb_signature = _signed_part(body, "tcbInfo")
        body, headers = _get(f"{base}/tdx/certification/v4/qe/identity?update=standard")
        qe_chain = _header(headers, "SGX-Enclave-Identity-Issuer-Chain")
        qe_identity, qe_signature = _signed_part(body, "enclaveIdentity")
        if base.startswith(dcap_qvl.INTEL_PCS_URL):
            root_crl, _ = _get(_crl_distribution_point(qe_chain))
        else:
            root_crl = bytes.fromhex(_get(f"{base}/sgx/certification/v4/rootcacrl")[0].decode("ascii").strip())
        document = {
            "pck_crl_issuer_chain": crl_chain, "root_ca_crl": root_crl.hex(), "pck_crl": crl.hex(),
            "tcb_info_issuer_chain": tcb_chain, "tcb_info": tcb_info, "tcb_info_signature": tcb_signature,
            "qe_identity_issuer_chain": qe_chain, "qe_identity": qe_identity, "qe_identity_signature": qe_signature,
            "pck_certificate_chain": chain or None,
        }
        return dcap_qvl.QuoteCollateralV3.from_json(json.dumps(document))
    except (OSError, ValueError, UnicodeDecodeError, StopIteration, KeyError) as exc:
        raise InputError(f"--pccs-url {pccs_url}: could not fetch collateral for this quote ({one_line(exc)})") \
            from None


def collateral_window(collateral: dcap_qvl.QuoteCollateralV3) -> tuple[int, int] | None:
    """The span in which Intel's TCB info and QE identity are both current."""
    try:
        documents = [json.loads(collateral.tcb_info), json.loads(collateral.qe_identity)]
        starts = [parse_time(d["issueDate"]) for d in documents]
        ends = [parse_time(d["nextUpdate"]) for d in documents]
    except (ValueError, KeyError, TypeError, InputError):
        return None
    return (max(starts), min(ends)) if max(starts) < min(ends) else None


# ---------------------------------------------------------------------------------------------
# Checks


def _dcap_verify(raw: bytes, collateral: dcap_qvl.QuoteCollateralV3, at: int) -> tuple[Any, str]:
    """dcap-qvl's report, or None and its error in one line."""
    try:
        return dcap_qvl.verify(raw, collateral, at), ""
    except ValueError as exc:
        return None, one_line(exc).removeprefix("Verification failed: ")


def _tcb_status(report: Any, accepted: Sequence[str], at: int, *, current: bool) -> Check:
    actual = f"{report.status}; advisories: {', '.join(report.advisory_ids) or 'none'}"
    if not current:
        return Check("TCB status", " or ".join(accepted), f"{actual} (at {iso(at)})", None,
                     "as of the collateral's issue date only")
    note = ("the platform's TCB is not accepted; update the host's TCB, or accept the status explicitly with "
            "--accept-tcb-status after reading the advisories")
    return Check("TCB status", " or ".join(accepted), actual, report.status in accepted, note)


def signature_checks(raw: bytes, collateral: dcap_qvl.QuoteCollateralV3, at: int,
                     accepted: Sequence[str]) -> list[Check]:
    """The chain to Intel's root, the collateral's validity at ``at`` and the TCB status. Stale
    collateral is told apart from a forgery by verifying once more when it was current."""
    report, error = _dcap_verify(raw, collateral, at)
    if report is not None:
        return [Check(SIGNATURE, GENUINE, f"valid at {iso(at)}", True), _tcb_status(report, accepted, at, current=True)]
    if not _COLLATERAL_TIME_ERROR.search(error):
        return [Check(SIGNATURE, GENUINE, f"invalid: {error}", False,
                      "the quote, its certificates or this collateral do not verify")]
    state = "not yet valid" if re.search(r"future|not yet", error, re.IGNORECASE) else "expired"
    stale = Check("quote collateral", f"current at {iso(at)}", f"collateral {state} at/for {iso(at)}: {error}",
                  False, "fetch current collateral for this quote (not a sign of a forged quote)")
    window = collateral_window(collateral)
    if window is None:
        return [Check(SIGNATURE, GENUINE, "", None, "the collateral is current at no time"), stale]
    report, error = _dcap_verify(raw, collateral, window[0])
    if report is not None:
        return [Check(SIGNATURE, GENUINE, f"valid with this collateral at {iso(window[0])}", True), stale,
                _tcb_status(report, accepted, window[0], current=False)]
    if _COLLATERAL_TIME_ERROR.search(error):
        return [Check(SIGNATURE, GENUINE, error, None, f"not all collateral is current at {iso(window[0])}"), stale]
    return [Check(SIGNATURE, GENUINE, f"invalid: {error}", False,
                  f"checked at {iso(window[0])}, when the collateral was current"), stale]


@dataclass(frozen=True)
class ModuleIdentity:
    id: str
    mrsigner: str
    attributes: int
    mask: int
    levels: list[dict[str, Any]]


def _module_identity(tcb_info: dict[str, Any], version: int) -> ModuleIdentity | None:
    """The collateral's identity of TDX module major ``version`` (Intel QVL: ``TDX_%02X``), or for
    version 0 the base ``tdxModule`` entry (whose TCB is in the platform's levels)."""
    if version == 0:
        base = tcb_info.get("tdxModule")
        if not isinstance(base, dict):
            return None
        return ModuleIdentity("tdxModule", str(base.get("mrsigner", "")).lower(), int(base.get("attributes", "0"), 16),
                              int(base.get("attributesMask", "0"), 16), [])
    wanted = f"TDX_{version:02X}"
    for entry in tcb_info.get("tdxModuleIdentities") or []:
        if isinstance(entry, dict) and str(entry.get("id", "")).upper() == wanted:
            return ModuleIdentity(wanted, str(entry.get("mrsigner", "")).lower(), int(entry.get("attributes", "0"), 16),
                                  int(entry.get("attributesMask", "0"), 16), list(entry.get("tcbLevels") or []))
    return None


def module_identity_checks(quote: Any, collateral: dcap_qvl.QuoteCollateralV3, accepted: Sequence[str]) -> list[Check]:
    report = quote.report
    svn, version = report.tee_tcb_svn[0], report.tee_tcb_svn[1]
    try:
        tcb_info = json.loads(collateral.tcb_info)
        identity = _module_identity(tcb_info, version)
    except (ValueError, TypeError):
        return [Check("TDX module identity", "in Intel's TCB info", "", False, "the collateral's TCB info is unreadable")]
    if identity is None:
        return [Check("TDX module identity", f"TDX_{version:02X} in Intel's TCB info", "absent", False,
                      "Intel's collateral does not know this TDX module version")]
    signer = report.mr_signer_seam.hex()
    attributes = int.from_bytes(report.seam_attributes, "little")
    checks = [
        Check("TDX module signer", identity.mrsigner, signer, signer == identity.mrsigner,
              "the TDX module is not signed by Intel's module key"),
        Check("TDX module attributes", f"{identity.attributes & identity.mask:016x} (mask {identity.mask:016x})",
              f"{attributes & identity.mask:016x}", attributes & identity.mask == identity.attributes & identity.mask,
              "SEAM attributes differ from Intel's"),
    ]
    if identity.levels:
        level = next((lv for lv in identity.levels
                      if isinstance(lv, dict) and svn >= int((lv.get("tcb") or {}).get("isvsvn", 1 << 30))), None)
        if level is None:
            checks.append(Check("TDX module TCB", f"{identity.id} with a known SVN", f"SVN {svn}", False,
                                "below every level Intel lists for this module"))
        else:
            status = str(level.get("tcbStatus"))
            advisories = ", ".join(level.get("advisoryIDs") or []) or "none"
            checks.append(Check("TDX module TCB", " or ".join(accepted),
                                f"{identity.id} SVN {svn}: {status}; advisories: {advisories}", status in accepted,
                                "the TDX module is out of date; accept explicitly with --accept-tcb-status"))
    return checks


def check_statuses(statuses: Sequence[str]) -> tuple[str, ...]:
    unknown = [s for s in statuses if s not in TCB_STATUSES]
    if unknown:
        raise InputError(f"--accept-tcb-status {unknown[0]!r} is not a TCB status; use one of {', '.join(TCB_STATUSES)}")
    return tuple(dict.fromkeys(("UpToDate", *statuses)))
