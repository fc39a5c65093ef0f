"""``fleet verify``: the vectors verify, and every kind of tampering or bad input is caught and named."""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleet.attest import measure
from fleet.attest import verify

ROOT = Path(__file__).resolve().parent.parent
VECTORS = Path(__file__).parent / "vectors"
LOCALNET_PATH = VECTORS / "near-mpc-tcb-info.json"
QUOTE_SET = VECTORS / "near-mpc-quote-set"
QUOTE_ARGS = ["--quote", str(QUOTE_SET / "quote.json"), "--collateral", str(QUOTE_SET / "collateral.json")]
INSIDE_WINDOW = "2026-08-20T00:00:00Z"  # the vector collateral is current 2026-08-13 .. 2026-09-11
AFTER_WINDOW = "2026-10-20T00:00:00Z"
LOCAL_PROVIDER_ID = "6b5ed02e549a1c30aaa8e3171a045f1f449b0017353ef595e78e39c348c98d01"
LOCALNET_IMAGE = "sha256:6a5700fccbb3facddd1f3934f4976c4dcefc176c4aac28cd2fd035984b368980"
QUOTE_SET_IMAGE = "sha256:564a5aebc33495d5610626d23cb9e3da8e9d531d0edff9e38aa1ccaf059c15d3"


def localnet() -> dict:
    return json.loads(LOCALNET_PATH.read_text())


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = verify.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_process(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", "import sys; from fleet.attest.verify import main; sys.exit(main(sys.argv[1:]))", *argv],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )


def write(tmp_path: Path, document, name: str = "tcb.json") -> str:
    path = tmp_path / name
    path.write_text(document if isinstance(document, str) else json.dumps(document))
    return str(path)


def summary(out: str) -> str:
    return out.strip().splitlines()[-1]


def event_index(tcb: dict, name: str) -> int:
    return next(i for i, e in enumerate(tcb["event_log"]) if e["imr"] == 3 and e["event"] == name)


def runtime_event(name: str, payload: bytes) -> dict:
    """A dstack v1 runtime event, its digest written out from the formula: SHA384(le32(0x08000001) ||
    ":" || name || ":" || payload)."""
    digest = hashlib.sha384((0x08000001).to_bytes(4, "little") + b":" + name.encode() + b":" + payload)
    return {"imr": 3, "event_type": 134217729, "event": name, "event_payload": payload.hex(),
            "digest": digest.hexdigest()}


# ---------------------------------------------------------------------------------------------
# The vectors verify


def test_localnet_tcb_info_verifies():
    result = run_process("--tcb-info", str(LOCALNET_PATH))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert "rtmr3 replay = TcbInfo" in result.stdout
    assert localnet()["rtmr3"] in result.stdout
    assert summary(result.stdout).startswith("verify: all")


def test_quote_set_verifies_up_to_date_inside_the_collateral_window():
    result = run_process("--tcb-info", str(QUOTE_SET / "tcb_info.json"), *QUOTE_ARGS, "--at", INSIDE_WINDOW)
    assert result.returncode == 0, result.stdout + result.stderr
    table = result.stdout[result.stdout.index("check "):]
    rows = {line.split()[0] + " " + line.split()[1]: line for line in table.splitlines() if line.strip()}
    assert "UpToDate; advisories: none" in rows["TCB status"]
    for register in ("rtmr0", "rtmr1", "rtmr2", "rtmr3"):
        assert f"{register} replay = quote" in result.stdout
    assert "mrtd TcbInfo = quote" in result.stdout


def test_expired_collateral_is_reported_as_expiry_not_forgery(capsys):
    code, out, err = run(capsys, "--tcb-info", str(QUOTE_SET / "tcb_info.json"), *QUOTE_ARGS,
                         "--at", AFTER_WINDOW)
    assert code == 1 and err == ""
    assert "collateral expired at/for 2026-10-20T00:00:00Z" in out
    assert summary(out) == "verify: 1 check(s) failed: quote collateral"
    signature = next(line for line in out.splitlines() if line.startswith("quote signature"))
    assert signature.rstrip().endswith("ok") and "invalid" not in signature
    status = next(line for line in out.splitlines() if line.startswith("TCB status"))
    assert "UpToDate; advisories: none (at 2026-08-13T10:45:38Z)" in status and "not checked" in status


def test_collateral_before_its_issue_date_is_not_yet_valid(capsys):
    code, out, _ = run(capsys, "--tcb-info", str(QUOTE_SET / "tcb_info.json"), *QUOTE_ARGS,
                       "--at", "2026-08-01T00:00:00Z")
    assert code == 1 and "collateral not yet valid at/for 2026-08-01T00:00:00Z" in out


def test_unix_seconds_are_accepted_for_at(capsys):
    code, out, _ = run(capsys, "--tcb-info", str(QUOTE_SET / "tcb_info.json"), *QUOTE_ARGS,
                       "--at", "1787184000")  # 2026-08-20T00:00:00Z
    assert code == 0 and "valid at 2026-08-20T00:00:00Z" in out


def test_a_forged_quote_signature_is_not_called_expiry(tmp_path, capsys):
    quote = json.loads((QUOTE_SET / "quote.json").read_text())
    quote[100] ^= 1  # inside the TD report the QE signed
    path = write(tmp_path, quote, "quote.json")
    code, out, _ = run(capsys, "--tcb-info", str(QUOTE_SET / "tcb_info.json"), "--quote", path,
                       "--collateral", str(QUOTE_SET / "collateral.json"), "--at", INSIDE_WINDOW)
    assert code == 1
    assert "quote signature" in summary(out) and "expired" not in out


def test_event_log_given_as_a_json_string_verifies(tmp_path, capsys):
    tcb = localnet()
    tcb["event_log"] = json.dumps(tcb["event_log"])
    code, out, _ = run(capsys, "--tcb-info", write(tmp_path, tcb))
    assert code == 0, out


def test_info_response_wrapping_the_tcb_info_verifies(tmp_path, capsys):
    code, out, _ = run(capsys, "--tcb-info", write(tmp_path, {"app_id": "x", "tcb_info": json.dumps(localnet())}))
    assert code == 0, out


def test_quote_given_as_binary_or_hex_is_parsed(tmp_path, capsys):
    raw = bytes(json.loads((QUOTE_SET / "quote.json").read_text()))
    for name, data in (("quote.bin", raw), ("quote.hex", raw.hex().encode())):
        path = tmp_path / name
        path.write_bytes(data)
        code, out, _ = run(capsys, "--tcb-info", str(QUOTE_SET / "tcb_info.json"), "--quote", str(path),
                           "--collateral", str(QUOTE_SET / "collateral.json"), "--at", INSIDE_WINDOW)
        assert code == 0, out


# ---------------------------------------------------------------------------------------------
# Tampering


def flip_payload_bit(tcb: dict) -> None:
    event = tcb["event_log"][event_index(tcb, "compose-hash")]
    payload = bytearray.fromhex(event["event_payload"])
    payload[0] ^= 0x01
    event["event_payload"] = payload.hex()


def forge_consistent_payload(tcb: dict) -> None:
    """A changed payload with its digest recomputed: only the replay can catch it."""
    index = event_index(tcb, "storage-fs")
    tcb["event_log"][index] = runtime_event("storage-fs", b"ext4")


def reorder(tcb: dict) -> None:
    first, second = event_index(tcb, "instance-id"), event_index(tcb, "boot-mr-done")
    log = tcb["event_log"]
    log[first], log[second] = log[second], log[first]


def drop(tcb: dict) -> None:
    del tcb["event_log"][event_index(tcb, "boot-mr-done")]


def change_compose(tcb: dict) -> None:
    tcb["app_compose"] = tcb["app_compose"].replace('"secure_time": false', '"secure_time": true ')


def wrong_rtmr3(tcb: dict) -> None:
    tcb["rtmr3"] = "00" + tcb["rtmr3"][2:]


@pytest.mark.parametrize(
    ("tamper", "failed"),
    [
        (flip_payload_bit, ["digest of event #2 compose-hash", "rtmr3 replay = TcbInfo", "compose-hash event"]),
        (forge_consistent_payload, ["rtmr3 replay = TcbInfo"]),
        (reorder, ["rtmr3 replay = TcbInfo"]),
        (drop, ["rtmr3 replay = TcbInfo"]),
        (change_compose, ["compose_hash = sha256(app_compose)", "compose-hash event", "app-id event"]),
        (wrong_rtmr3, ["rtmr3 replay = TcbInfo"]),
    ],
    ids=lambda value: getattr(value, "__name__", None),
)
def test_tampering_is_detected_and_named(tmp_path, capsys, tamper, failed):
    tcb = localnet()
    tamper(tcb)
    code, out, err = run(capsys, "--tcb-info", write(tmp_path, tcb))
    assert code == 1 and err == ""
    assert summary(out) == f"verify: {len(failed)} check(s) failed: {', '.join(failed)}"


def test_a_quote_of_another_td_is_detected(capsys):
    code, out, _ = run(capsys, "--tcb-info", str(LOCALNET_PATH), *QUOTE_ARGS, "--at", INSIDE_WINDOW)
    assert code == 1
    assert summary(out) == "verify: 1 check(s) failed: rtmr3 replay = quote"


def test_a_tcb_info_whose_registers_differ_from_the_quote_is_detected(tmp_path, capsys):
    tcb = json.loads((QUOTE_SET / "tcb_info.json").read_text())
    tcb["mrtd"] = "11" * 48
    code, out, _ = run(capsys, "--tcb-info", write(tmp_path, tcb), *QUOTE_ARGS, "--at", INSIDE_WINDOW)
    assert code == 1 and summary(out) == "verify: 1 check(s) failed: mrtd TcbInfo = quote"


def test_a_foreign_event_in_a_firmware_register_is_detected(tmp_path, capsys):
    tcb = json.loads((QUOTE_SET / "tcb_info.json").read_text())
    tcb["event_log"].insert(0, {"imr": 1, "event_type": 4, "digest": "22" * 48, "event": "", "event_payload": ""})
    code, out, _ = run(capsys, "--tcb-info", write(tmp_path, tcb), *QUOTE_ARGS, "--at", INSIDE_WINDOW)
    assert code == 1
    assert summary(out) == "verify: 2 check(s) failed: rtmr1 replay = TcbInfo, rtmr1 replay = quote"


def test_report_data_is_compared_with_the_quote(capsys):
    quoted = "0001e4faaedae8199148eb0fe1cc9a52ecbb09045014a11342b85ed8bd727a03ceb03ccb16857e2ba693145050f84cb2f758"
    args = ["--tcb-info", str(QUOTE_SET / "tcb_info.json"), *QUOTE_ARGS, "--at", INSIDE_WINDOW]
    assert run(capsys, *args, "--report-data", quoted)[0] == 0
    code, out, _ = run(capsys, *args, "--report-data", "ff" + quoted[2:])
    assert code == 1 and summary(out).endswith("quote report_data")


def test_other_event_types_under_imr_3_stay_out_of_the_rtmr3_replay(tmp_path, capsys):
    tcb = localnet()
    tcb["event_log"].insert(0, {"imr": 3, "event_type": 4, "digest": "33" * 48, "event": "",
                                "event_payload": ""})
    code, out, _ = run(capsys, "--tcb-info", write(tmp_path, tcb))
    assert code == 0, out
    assert "imr 3 events of other types" in out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_single_bit_flip_in_the_rtmr3_log_fails(data):
    tcb = localnet()
    events = [e for e in tcb["event_log"] if e["imr"] == 3]
    event = data.draw(st.sampled_from(events))
    key = data.draw(st.sampled_from(["digest", "event_payload"] if event["event_payload"] else ["digest"]))
    value = bytearray.fromhex(event[key])
    bit = data.draw(st.integers(0, len(value) * 8 - 1))
    value[bit // 8] ^= 1 << (bit % 8)
    event[key] = value.hex()
    assert verify.failed(verify.verify_attestation(verify.parse_tcb_info(tcb)))


# ---------------------------------------------------------------------------------------------
# KMS mode, from the formula


KMS_APP_ID = "d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f607"  # an app contract address, as the KMS assigns it
KMS_ROOT_KEY = "3059301306072a8648ce3d020106082a8648ce3d030107034200" + "04" + "ab" * 64
INSTANCE_SEED = bytes(range(20))
OS_IMAGE_HASH = hashlib.sha256(b"sha256sum.txt of a built image").hexdigest()


def kms_tcb_info() -> tuple[dict, str]:
    compose = json.dumps({"manifest_version": 2, "name": "kms-app", "runner": "docker-compose",
                          "docker_compose_file": "services: {}\n", "kms_enabled": True,
                          "no_instance_id": False}, indent=4)
    compose_hash = hashlib.sha256(compose.encode()).digest()
    events = [
        runtime_event("system-preparing", b""),
        runtime_event("app-id", bytes.fromhex(KMS_APP_ID)),
        runtime_event("compose-hash", compose_hash),
        runtime_event("instance-id", hashlib.sha256(INSTANCE_SEED + bytes.fromhex(KMS_APP_ID)).digest()[:20]),
        runtime_event("boot-mr-done", b""),
        runtime_event("os-image-hash", bytes.fromhex(OS_IMAGE_HASH)),
        runtime_event("key-provider", json.dumps({"name": "kms", "id": KMS_ROOT_KEY},
                                                 separators=(",", ":")).encode()),
        runtime_event("storage-fs", b"zfs"),
        runtime_event("system-ready", b""),
    ]
    register = bytes(48)
    for event in events:
        register = hashlib.sha384(register + bytes.fromhex(event["digest"])).digest()
    return {"rtmr3": register.hex(), "compose_hash": compose_hash.hex(), "app_compose": compose,
            "os_image_hash": OS_IMAGE_HASH, "event_log": events}, compose


def kms_expectation(compose: str, **overrides) -> dict:
    arguments = dict(dstack_version="0.5.11", app_id=KMS_APP_ID, key_provider_id=KMS_ROOT_KEY,
                     instance_id_seed=INSTANCE_SEED, os_image_hash=OS_IMAGE_HASH) | overrides
    return measure.expected_measurements(compose.encode(), **arguments)


def write_plan(tmp_path: Path, measurements: dict) -> str:
    return write(tmp_path, {"project": "dstack-fleet", "stack": "dev", "measurements": measurements}, "plan.json")


def test_kms_mode_log_verifies_and_leaves_app_id_to_the_plan(tmp_path, capsys):
    tcb, _ = kms_tcb_info()
    code, out, _ = run(capsys, "--tcb-info", write(tmp_path, tcb))
    assert code == 0, out
    app_id_row = next(line for line in out.splitlines() if line.startswith("app-id event"))
    assert KMS_APP_ID in app_id_row and "not checked (KMS mode: compare with --plan)" in app_id_row


def test_kms_mode_log_matches_its_plan(tmp_path, capsys):
    tcb, compose = kms_tcb_info()
    plan = write_plan(tmp_path, {"kms-app": kms_expectation(compose)})
    code, out, _ = run(capsys, "--tcb-info", write(tmp_path, tcb), "--plan", plan, "--target", "kms-app")
    assert code == 0, out
    for row in ("plan app-id", "plan os-image-hash (event)", "plan key-provider id", "plan boot event order",
                "plan boot event payloads"):
        assert next(line for line in out.splitlines() if line.startswith(row)).rstrip().endswith("ok"), row
    assert "not checked (known at boot)" in next(line for line in out.splitlines() if line.startswith("plan rtmr3"))


@pytest.mark.parametrize(
    ("overrides", "failed"),
    [
        ({"app_id": "ff" * 20}, ["plan app-id", "plan boot event payloads"]),
        ({"os_image_hash": "ee" * 32}, ["plan os-image-hash (event)", "plan boot event payloads"]),
        ({"key_provider_id": "aa" * 20}, ["plan key-provider id", "plan boot event payloads"]),
    ],
)
def test_kms_mode_log_against_a_different_plan_fails(tmp_path, capsys, overrides, failed):
    tcb, compose = kms_tcb_info()
    plan = write_plan(tmp_path, {"kms-app": kms_expectation(compose, **overrides)})
    code, out, _ = run(capsys, "--tcb-info", write(tmp_path, tcb), "--plan", plan, "--target", "kms-app")
    assert code == 1
    assert summary(out) == f"verify: {len(failed)} check(s) failed: {', '.join(failed)}"


def test_kms_mode_app_id_is_not_taken_from_the_compose_hash(tmp_path, capsys):
    tcb, _ = kms_tcb_info()
    payloads = {e["event"]: e["event_payload"] for e in tcb["event_log"]}
    assert payloads["app-id"] != tcb["compose_hash"][:40]
    code, _, _ = run(capsys, "--tcb-info", write(tmp_path, tcb))
    assert code == 0


# ---------------------------------------------------------------------------------------------
# The plan


def localnet_expectation(**overrides) -> dict:
    arguments = dict(dstack_version="0.5.8", key_provider_id=LOCAL_PROVIDER_ID,
                     image_digests={"mpc-image-digest": LOCALNET_IMAGE}, machine_type="c3-standard-4") | overrides
    return measure.expected_measurements(localnet()["app_compose"].encode(), **arguments)


def test_matching_plan_holds(tmp_path, capsys):
    plan = write_plan(tmp_path, {"mpc-0": localnet_expectation(os_image_hash=measure.PENDING_BUILD)})
    code, out, _ = run(capsys, "--tcb-info", str(LOCALNET_PATH), "--plan", plan, "--target", "mpc-0")
    assert code == 0, out
    assert "plan rtmr3" in out and "plan mpc-image-digest" in out
    # the localnet TcbInfo reports no os_image_hash
    assert "not checked (the guest reports no os-image-hash)" in out


def test_pending_and_boot_time_values_are_skipped(tmp_path, capsys):
    expectation = localnet_expectation(image_digests={"mpc-image-digest": measure.PENDING_BUILD})
    expectation["app_id"] = measure.KNOWN_AT_BOOT
    tcb_info = json.loads((QUOTE_SET / "tcb_info.json").read_text())
    expectation["compose_hash"] = tcb_info["compose_hash"]
    expectation["os_image_hash"] = measure.PENDING_BUILD
    plan = write_plan(tmp_path, {"mpc-0": expectation})
    code, out, _ = run(capsys, "--tcb-info", str(LOCALNET_PATH), "--plan", plan, "--target", "mpc-0")
    assert "not checked (pending build)" in next(l for l in out.splitlines() if l.startswith("plan mpc-image-digest"))
    assert "not checked (pending build)" in next(l for l in out.splitlines() if l.startswith("plan rtmr3"))
    assert "not checked (known at boot)" in next(l for l in out.splitlines() if l.startswith("plan app-id"))
    assert code == 1 and summary(out) == "verify: 1 check(s) failed: plan compose-hash"


@pytest.mark.parametrize(
    ("change", "failed"),
    [
        ({"image_digests": {"mpc-image-digest": "sha256:" + "00" * 32}},
         ["plan mpc-image-digest", "plan rtmr3"]),
        ({"key_provider_id": "00" * 32}, ["plan key-provider id", "plan boot event payloads", "plan rtmr3"]),
    ],
)
def test_mismatching_plan_fails_naming_the_check(tmp_path, capsys, change, failed):
    plan = write_plan(tmp_path, {"mpc-0": localnet_expectation(**change)})
    code, out, _ = run(capsys, "--tcb-info", str(LOCALNET_PATH), "--plan", plan, "--target", "mpc-0")
    assert code == 1
    assert summary(out) == f"verify: {len(failed)} check(s) failed: {', '.join(failed)}"


def test_plan_os_image_hash_is_compared_with_the_reported_one(tmp_path, capsys):
    tcb = QUOTE_SET / "tcb_info.json"
    reported = json.loads(tcb.read_text())["os_image_hash"]
    for planned, code_wanted in ((reported, 0), ("ab" * 32, 1)):
        expectation = measure.expected_measurements(
            json.loads(tcb.read_text())["app_compose"].encode(), dstack_version="0.5.8",
            key_provider_id=LOCAL_PROVIDER_ID, os_image_hash=planned,
            image_digests={"mpc-image-digest": QUOTE_SET_IMAGE})
        plan = write_plan(tmp_path, {"mpc-0": expectation})
        code, out, _ = run(capsys, "--tcb-info", str(tcb), "--plan", plan, "--target", "mpc-0")
        assert code == code_wanted, out
        assert "plan os-image-hash (TcbInfo field, unmeasured)" in out


def test_an_overlay_target_expects_no_dstack_events(tmp_path, capsys):
    plan = write_plan(tmp_path, {"overlay-0": measure.overlay_measurements(machine_type="c3-standard-4")})
    code, out, _ = run(capsys, "--tcb-info", str(LOCALNET_PATH), "--plan", plan, "--target", "overlay-0")
    assert code == 1 and summary(out) == "verify: 1 check(s) failed: plan: no dstack events"


def test_unknown_target_lists_the_known_ones(tmp_path, capsys):
    plan = write_plan(tmp_path, {"mpc-0": localnet_expectation(), "mpc-1": localnet_expectation()})
    code, out, err = run(capsys, "--tcb-info", str(LOCALNET_PATH), "--plan", plan, "--target", "mpc-9")
    assert code == 2 and out == ""
    assert err.strip() == "error: --target 'mpc-9' is not in the plan's measurements; known targets: mpc-0, mpc-1"


# ---------------------------------------------------------------------------------------------
# Bad input: exit 2, one line, no traceback


def missing(key):
    def edit(tcb):
        del tcb[key]
    return edit


def set_field(key, value):
    def edit(tcb):
        tcb[key] = value
    return edit


def set_event(index, key, value):
    def edit(tcb):
        tcb["event_log"][index][key] = value
    return edit


def v2_compose(tcb):
    compose = json.loads(tcb["app_compose"])
    compose["event_log_version"] = 2
    tcb["app_compose"] = json.dumps(compose, indent=4)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (missing("event_log"), "missing event_log"),
        (missing("app_compose"), "missing app_compose"),
        (set_field("rtmr3", "xyz"), "rtmr3 is not 96 hex characters"),
        (set_field("compose_hash", "ab"), "compose_hash is not 64 hex characters"),
        (set_field("app_compose", "not json"), "app_compose is not JSON"),
        (set_field("event_log", {"a": 1}), "event_log is not a list"),
        (set_event(1, "event_payload", "zz"), r"event_log\[1\].event_payload is not hex"),
        (set_event(2, "imr", "three"), r"event_log\[2\].imr"),
        (v2_compose, "event_log_version 2 digests are not supported yet"),
        (set_event(0, "version", 2), r"event_log\[0\] is a v2 event.*not supported yet"),
    ],
)
def test_malformed_tcb_info_exits_2_with_one_line(tmp_path, capsys, edit, message):
    tcb = localnet()
    edit(tcb)
    code, out, err = run(capsys, "--tcb-info", write(tmp_path, tcb))
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ")
    assert re.search(message, err), err


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"tcb": "{not json"}, "is not JSON"),
        ({"quote": json.loads((QUOTE_SET / "quote.json").read_text())[:600]}, "not a quote dcap-qvl can parse"),
        ({"quote": [1, 2, 300]}, "other than bytes"),
        ({"quote": "not a quote at all"}, "18 bytes is too short for a quote"),
        ({"collateral": "[1]"}, "not Intel PCS collateral"),
        ({"collateral": "{oops"}, "is not JSON"),
        ({"at": "next tuesday"}, "--at 'next tuesday' is not ISO-8601"),
        ({"plan": {"resources": []}}, "no 'measurements' object"),
    ],
)
def test_malformed_files_exit_2_with_one_line(tmp_path, files, message):
    tcb = write(tmp_path, files["tcb"]) if "tcb" in files else str(QUOTE_SET / "tcb_info.json")
    quote = write(tmp_path, files["quote"], "quote.json") if "quote" in files else str(QUOTE_SET / "quote.json")
    collateral = (write(tmp_path, files["collateral"], "collateral.json") if "collateral" in files
                  else str(QUOTE_SET / "collateral.json"))
    argv = ["--tcb-info", tcb, "--quote", quote, "--collateral", collateral, "--at", files.get("at", INSIDE_WINDOW)]
    if "plan" in files:
        argv += ["--plan", write(tmp_path, files["plan"], "plan.json"), "--target", "x"]
    result = run_process(*argv)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stdout == "" and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--tcb-info", "/nonexistent/tcb.json"], "--tcb-info /nonexistent/tcb.json: cannot read it"),
        (["--tcb-info", str(LOCALNET_PATH), "--collateral", str(QUOTE_SET / "collateral.json")],
         "--collateral needs --quote"),
        (["--tcb-info", str(LOCALNET_PATH), "--plan", "plan.json"], "--plan and --target go together"),
        (["--tcb-info", str(LOCALNET_PATH), "--quote", str(QUOTE_SET / "quote.json"), "--at", INSIDE_WINDOW],
         "--at needs --collateral"),
    ],
)
def test_inconsistent_options_exit_2(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == "" and err.strip() == err.strip().splitlines()[0]
    assert message in err


def test_v2_log_is_refused_through_the_process(tmp_path):
    tcb = localnet()
    v2_compose(tcb)
    result = run_process("--tcb-info", write(tmp_path, tcb))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "event_log_version 2 digests are not supported yet" in result.stderr


# ---------------------------------------------------------------------------------------------
# Wiring


def test_add_parser_registers_verify_on_another_cli(capsys):
    parser = argparse.ArgumentParser(prog="python -m fleet")
    parser.add_argument("--debug", action="store_true")
    verify.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["verify", "--tcb-info", str(LOCALNET_PATH)])
    assert args.func is verify.run
    assert args.func(args) == 0
    assert "check" in capsys.readouterr().out


def test_table_has_the_four_columns(capsys):
    checks = verify.verify_attestation(verify.read_tcb_info(str(LOCALNET_PATH)))
    header = verify.render_table(checks).splitlines()[0].split()
    assert header == ["check", "expected", "actual", "result"]
    assert not verify.failed(checks)
    tampered = copy.deepcopy(checks) + [verify.Check("x", "a", "b", False, "why")]
    assert verify.render_table(tampered).splitlines()[-2].endswith("MISMATCH: why")
