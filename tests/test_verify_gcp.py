"""``fleet verify`` on GCP: a plain TDX quote without a TcbInfo, Intel's TCB status taken seriously,
the CC event log and the vTPM log as lanes, and bad input bounded to exit 2.

Vectors and their sources: tests/vectors/gcp/README.md."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import dcap_qvl
import pytest

from fleet.attest import quote as quotes
from fleet.attest import verify

from .pccs_stub import serve
from .test_bootchain import COS_CCEL, FLASHBOTS, TPM_LOG, flashbots_ccel

ROOT = Path(__file__).resolve().parent.parent
GCP = Path(__file__).parent / "vectors" / "gcp"
QUOTE = GCP / "flashbots-gcp-tdx-quote.bin"
COLLATERAL = GCP / "flashbots-gcp-tdx-collateral.json"
# The collateral is current 2026-06-30T08:12:19Z .. 2026-07-30T07:53:47Z (TCB info and QE identity).
INSIDE = "2026-06-30T08:47:13Z"  # the upstream test's time, 1782809233
BEFORE = "2026-06-30T08:00:00Z"
AFTER = "2026-07-30T08:00:00Z"
SAMPLE = GCP / "dcap-qvl-sample-tdx-quote.bin"
NEAR_COLLATERAL = Path(__file__).parent / "vectors" / "near-mpc-quote-set" / "collateral.json"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = verify.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def row(out: str, name: str) -> str:
    return next(line for line in out.splitlines() if line.startswith(name + " "))


def last(out: str) -> str:
    return out.strip().splitlines()[-1]


def b4_collateral(tmp_path: Path) -> str:
    """Intel's 2026-08-13 collateral for FMSPC B0C06F000000 without the NEAR machine's PCK chain."""
    document = json.loads(NEAR_COLLATERAL.read_text())
    document.pop("pck_certificate_chain")
    path = tmp_path / "b0c06f.json"
    path.write_text(json.dumps(document))
    return str(path)


# ---------------------------------------------------------------------------------------------
# A plain quote


def test_gcp_quote_verifies_up_to_date_without_a_tcb_info():
    result = subprocess.run([sys.executable, "-m", "fleet", "verify", "--quote", str(QUOTE), "--collateral",
                             str(COLLATERAL), "--at", INSIDE], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for register, value in FLASHBOTS.items():
        assert f"  {register:<13} {value}" in out
    assert "  report_data   " + "0" * 128 in out and "FMSPC 00806F050000" in out
    assert "UpToDate; advisories: none" in row(out, "TCB status") and row(out, "TCB status").endswith("ok")
    assert row(out, "TDX module TCB").endswith("ok") and "TDX_01 SVN 13" in row(out, "TDX module TCB")
    assert last(out) == "verify: all 5 checks hold (0 not checked)"


@pytest.mark.parametrize(("at", "state"), [(BEFORE, "not yet valid"), (AFTER, "expired")])
def test_gcp_quote_fails_outside_its_collaterals_window(capsys, at, state):
    code, out, _ = run(capsys, "--quote", str(QUOTE), "--collateral", str(COLLATERAL), "--at", at)
    assert code == 1
    assert f"collateral {state} at/for" in row(out, "quote collateral")
    assert last(out) == "verify: 1 check(s) failed: quote collateral"
    assert row(out, "quote signature").endswith("ok")  # stale, not forged


def test_a_forged_quote_is_refused(tmp_path, capsys):
    data = bytearray(QUOTE.read_bytes())
    data[48 + 136] ^= 1  # a byte of MRTD in the TD report the quoting enclave signed
    forged = tmp_path / "forged.bin"
    forged.write_bytes(bytes(data))
    code, out, _ = run(capsys, "--quote", str(forged), "--collateral", str(COLLATERAL), "--at", INSIDE)
    assert code == 1 and "quote signature" in last(out) and "invalid" in row(out, "quote signature")


@pytest.mark.parametrize("form", ["binary", "hex", "0xhex", "base64", "json-array", "getquote", "json-base64"])
def test_every_quote_encoding_reads_the_same(tmp_path, capsys, form):
    raw = QUOTE.read_bytes()
    encoded = {
        "binary": raw, "hex": raw.hex().encode(), "0xhex": b"0x" + raw.hex().encode() + b"\n",
        "base64": base64.b64encode(raw) + b"\n", "json-array": json.dumps(list(raw)).encode(),
        "getquote": json.dumps({"quote": raw.hex(), "event_log": "[]"}).encode(),
        "json-base64": json.dumps(base64.b64encode(raw).decode()).encode(),
    }[form]
    path = tmp_path / "quote"
    path.write_bytes(encoded)
    code, out, err = run(capsys, "--quote", str(path), "--collateral", str(COLLATERAL), "--at", INSIDE)
    assert code == 0, out + err
    assert f"  mrtd          {FLASHBOTS['mrtd']}" in out


def test_a_version_5_quote_is_read(capsys):
    code, out, _ = run(capsys, "--quote", str(GCP / "dcap-qvl-sample-tdx-quote-v5.bin"))
    assert "TDX, version 5, FMSPC 90C06F000000" in out
    assert "no --collateral" in row(out, "quote signature") and code == 0


def test_out_of_date_is_refused_unless_accepted(tmp_path, capsys):
    collateral = b4_collateral(tmp_path)
    code, out, _ = run(capsys, "--quote", str(SAMPLE), "--collateral", collateral, "--at", "2026-08-20T00:00:00Z")
    assert code == 1
    status = row(out, "TCB status")
    assert "OutOfDate; advisories: INTEL-SA-01192, INTEL-SA-01245, INTEL-SA-01312, INTEL-SA-01313" in status
    assert "MISMATCH" in status and "--accept-tcb-status" in status
    assert "TDX_01 SVN 6: OutOfDate" in row(out, "TDX module TCB") and "MISMATCH" in row(out, "TDX module TCB")
    assert row(out, "quote signature").endswith("ok")
    code, out, _ = run(capsys, "--quote", str(SAMPLE), "--collateral", collateral, "--at", "2026-08-20T00:00:00Z",
                       "--accept-tcb-status", "OutOfDate")
    assert code == 0, out
    assert row(out, "TCB status").split()[2:5] == ["UpToDate", "or", "OutOfDate"]


def test_module_identity_is_checked_against_the_collateral(tmp_path, capsys):
    """dcap-qvl 0.7.0 is not relied on for this (Phala-Network/dcap-qvl#124): the module's signer,
    attributes and TCB level come from the collateral's tdxModuleIdentities."""
    document = json.loads(COLLATERAL.read_text())
    tcb_info = json.loads(document["tcb_info"])
    without = dict(tcb_info, tdxModuleIdentities=[m for m in tcb_info["tdxModuleIdentities"] if m["id"] != "TDX_01"])
    edited = dcap_qvl.QuoteCollateralV3.from_json(json.dumps(dict(document, tcb_info=json.dumps(without))))
    checks = quotes.module_identity_checks(quotes.parse(QUOTE.read_bytes()), edited, ("UpToDate",))
    assert [(c.name, c.holds) for c in checks] == [("TDX module identity", False)]
    signer = dict(tcb_info, tdxModuleIdentities=[dict(m, mrsigner="ab" * 48) for m in tcb_info["tdxModuleIdentities"]])
    edited = dcap_qvl.QuoteCollateralV3.from_json(json.dumps(dict(document, tcb_info=json.dumps(signer))))
    checks = {c.name: c for c in quotes.module_identity_checks(quotes.parse(QUOTE.read_bytes()), edited, ("UpToDate",))}
    assert checks["TDX module signer"].holds is False


def test_collateral_is_fetched_and_kept_as_evidence(tmp_path, capsys):
    kept = tmp_path / "evidence" / "collateral.json"
    kept.parent.mkdir()
    with serve(COLLATERAL) as (url, asked):
        code, out, err = run(capsys, "--quote", str(QUOTE), "--pccs-url", url, "--collateral", str(kept), "--at", INSIDE)
    assert code == 0, out + err
    assert any(p.endswith("/tdx/certification/v4/tcb") for p in asked)
    fetched = json.loads(kept.read_text())
    assert fetched["tcb_info"] == json.loads(COLLATERAL.read_text())["tcb_info"]
    assert "pck_certificate_chain" in fetched  # what the quote embeds, kept with the rest


# ---------------------------------------------------------------------------------------------
# Event log lanes


def test_ccel_replays_to_the_quote(tmp_path, capsys):
    path = tmp_path / "CCEL"
    path.write_bytes(flashbots_ccel())
    code, out, _ = run(capsys, "--quote", str(QUOTE), "--collateral", str(COLLATERAL), "--at", INSIDE, "--ccel", str(path))
    assert code == 0, out
    for register in ("rtmr0", "rtmr1", "rtmr2"):
        assert row(out, f"{register} CCEL replay = quote").endswith("ok")
    assert "CC event log (register, event, SHA-384 prefix):" in out and "RTMR0 #1" in out


def test_a_ccel_of_another_boot_is_caught(capsys):
    code, out, _ = run(capsys, "--quote", str(QUOTE), "--ccel", str(COS_CCEL))
    assert code == 1
    assert "MISMATCH: the event log is not the log of this TD's boot" in row(out, "rtmr0 CCEL replay = quote")


def test_vtpm_log_lane(capsys):
    uki = "9ab14a46f858662a89adc102d2a57a13f52f75c1769d65a4c34edbbfc8855f0f"
    code, out, _ = run(capsys, "--tpm-event-log", str(TPM_LOG), "--uki-hash", uki)
    assert code == 0
    assert "vTPM event log (PCR, event, SHA-256 prefix):" in out and "PCR0  #3   EV_S_CRTM_VERSION" in out
    assert "replayed, not authenticated" in row(out, "vTPM log authenticity")
    code, out, _ = run(capsys, "--tpm-event-log", str(TPM_LOG), "--uki-hash", "0" * 64)
    assert code == 1 and "MISMATCH" in row(out, "vTPM PCR2 UKI event")


# ---------------------------------------------------------------------------------------------
# Bad input: exit 2, one line


def check_exit_2(argv: list[str], message: str) -> None:
    result = subprocess.run([sys.executable, "-m", "fleet", "verify", *argv], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stdout == "" and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: ["--quote", big(p, 2 * 1024 * 1024)], "larger than 1048576 bytes"),
        (lambda p: ["--ccel", big(p, 17 * 1024 * 1024)], "larger than 16777216 bytes"),
        (lambda p: ["--quote", write(p, b"[" * 100000)], "nests JSON deeper"),
        (lambda p: ["--tcb-info", write(p, b'{"a":' * 50000)], "nests JSON deeper"),
        (lambda p: ["--quote", str(QUOTE), "--plan", write(p, b"[" * 100000), "--target", "x"], "nests JSON deeper"),
        (lambda p: ["--quote", str(QUOTE), "--collateral", str(COLLATERAL), "--at", "3000-01-01T00:00:00Z"],
         "outside 2000..2100"),
        (lambda p: ["--quote", str(QUOTE), "--collateral", str(COLLATERAL), "--at", "999999999999"], "outside 2000..2100"),
        (lambda p: ["--ccel", write(p, b"\x00" * 64)], "does not open with a 'Spec ID Event03'"),
        (lambda p: ["--tpm-event-log", write(p, COS_CCEL.read_bytes())], "neither an event nor 0xFF padding"),
        (lambda p: ["--quote", write(p, QUOTE.read_bytes()[:200])], "not a quote dcap-qvl can parse"),
        (lambda p: ["--quote", write(p, b"\x03\x00" + QUOTE.read_bytes()[2:])], "version 3 quote"),
        (lambda p: [], "nothing to verify"),
        (lambda p: ["--quote", str(QUOTE), "--accept-tcb-status", "Fine"], "is not a TCB status"),
        (lambda p: ["--tpm-event-log", str(TPM_LOG), "--uki-hash", "xyz"], "--uki-hash is not a SHA-256"),
        (lambda p: ["--quote", str(QUOTE), "--pccs-url", "http://127.0.0.1:9"], "--pccs-url needs --quote and"),
        (lambda p: ["--quote", str(QUOTE), "--pccs-url", "http://127.0.0.1:9", "--collateral", str(p / "c.json")],
         "could not fetch collateral"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, make, message):
    check_exit_2(make(tmp_path), message)


def big(directory: Path, size: int) -> str:
    path = directory / "big"
    with path.open("wb") as handle:
        handle.truncate(size)
    return str(path)


def write(directory: Path, data: bytes) -> str:
    path = directory / "input"
    path.write_bytes(data)
    return str(path)


def test_intel_pcs_root_crl_comes_from_the_roots_distribution_point():
    """Intel's PCS serves no rootcacrl: the root certificate of the chain names where it is."""
    chain = json.loads(COLLATERAL.read_text())["qe_identity_issuer_chain"]
    assert quotes._crl_distribution_point(chain) == "https://certificates.trustedservices.intel.com/IntelSGXRootCA.der"
