"""``python -m fleet measurements``: the plan's expected registers as a flashbots measurements file
and as NEAR MPC vote arguments; both read back, and the shared examples round-trip."""

from __future__ import annotations

import copy
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from fleet.attest import exports
from fleet.plan.planner import build_plan

from .test_expectations import BOOT, lock_dstack_image

ROOT = Path(__file__).resolve().parent.parent
GCP = Path(__file__).parent / "vectors" / "gcp"
NEAR_058 = json.loads((GCP / "near-mpc-0.5.8-tcb_info.prod.json").read_text())
LAUNCHER_058 = "84c7537a2f84d3477eac2e5ef3ba0765b5d688f86096947eea4744ce25b27054"
MPC_058 = "e2ef71c220158f9ee19a265d583647eedb4e0cd7ca37021fbf0ab34e3d214ed0"


@pytest.mark.parametrize("name", ["flashbots-measurements.json", "flashbots-measurements_2.json",
                                  "buildernet_measurements.json"])
def test_flashbots_examples_round_trip(name):
    original = json.loads((GCP / name).read_text())
    parsed = exports.parse_flashbots((GCP / name).read_text())
    assert parsed == original
    assert json.loads(exports.render_flashbots(parsed)) == original
    assert exports.parse_flashbots(exports.render_flashbots(parsed)) == original


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d[2]["measurements"]["0"].update(expected="abc"), "is not 96 lowercase hex characters"),
        (lambda d: d[2].update(attestation_type="sgx"), "'sgx' is not one of"),
        (lambda d: d[2]["measurements"].update({"x": {"expected": "00" * 48}}), "register indexes are decimal"),
        (lambda d: d[2]["measurements"].update({"1": {"expected_any": []}}), "expected {'expected': hex}"),
        (lambda d: d[0].update(extra=1), "an entry has measurement_id, attestation_type and measurements only"),
    ],
)
def test_a_malformed_measurements_file_is_named(edit, message):
    document = json.loads((GCP / "flashbots-measurements.json").read_text())
    edit(document)
    with pytest.raises(exports.ExportError, match=message):
        exports.parse_flashbots(json.dumps(document))


@pytest.fixture
def built_plan(project):
    """The dev stack with its dstack image built (boot inputs recorded in the lock)."""
    lock_dstack_image(project, BOOT)
    return json.loads(build_plan(project.root, "dev").to_json())


def test_flashbots_export_of_a_plan(built_plan):
    entries, notes = exports.flashbots(built_plan)
    text = exports.render_flashbots(entries)
    assert exports.parse_flashbots(text) == entries
    apps = built_plan["measurements"]["node:apps-0"]["registers"]
    by_id = {e["measurement_id"]: e for e in entries}
    # the app and its node share the registers: one entry names both
    entry = by_id["dstack-fleet/dev/app:mpc-dev+1/gce-2026-04"]
    assert entry["attestation_type"] == "dcap-tdx"
    assert entry["measurements"] == {
        "0": {"expected_any": [apps["firmware"]["gce-2026-04"]["mrtd"]]},
        "1": {"expected_any": [apps["firmware"]["gce-2026-04"]["rtmr0"]]},
        "2": {"expected_any": [apps["rtmr1"]]}, "3": {"expected_any": [apps["rtmr2"]]}}
    assert not any("overlay" in i for i in by_id)  # RTMR1/2 of the tplus image are not predicted
    assert "node:overlay-0 on gce-2026-04: left out, rtmr1, rtmr2 not predicted" in " ".join(notes)
    partial, _ = exports.flashbots(built_plan, partial=True)
    overlay = next(e for e in partial if e["measurement_id"] == "dstack-fleet/dev/node:overlay-0+1/gce-2026-04")
    assert sorted(overlay["measurements"]) == ["0", "1"]


def test_near_votes_of_a_plan(built_plan):
    document = exports.near_votes(built_plan)
    text = exports.render_near_votes(document)
    assert exports.parse_near_votes(text) == json.loads(text)
    app = document["apps"]["mpc-dev"]
    measurement = built_plan["measurements"]["app:mpc-dev"]
    provider = next(e["digest"] for e in measurement["rtmr3_events"] if e["event"] == "key-provider")
    [vote] = app["vote_add_os_measurement"]
    assert vote["firmware"] == "gce-2026-04"
    assert vote["measurement"] == {
        "mrtd": measurement["registers"]["firmware"]["gce-2026-04"]["mrtd"],
        "rtmr0": measurement["registers"]["firmware"]["gce-2026-04"]["rtmr0"],
        "rtmr1": measurement["registers"]["rtmr1"], "rtmr2": measurement["registers"]["rtmr2"],
        "key_provider_event_digest": provider}
    assert app["vote_code_hash"] == {"code_hash": measurement["image_digests"]["mpc-image-digest"]}
    launcher = built_plan["outputs"]["apps"]["mpc-dev"]["images"]["services.launcher.image"].rsplit(":", 1)[1]
    assert app["vote_add_launcher_hash"] == {"launcher_hash": launcher}
    assert document["contract"]["commit"] == "b0b6b7167e89c015ad59bfb4b0bbc78fcc8432cc"
    broken = copy.deepcopy(document)
    broken["apps"]["mpc-dev"]["vote_add_os_measurement"][0]["measurement"]["rtmr1"] = "XYZ"
    with pytest.raises(exports.ExportError, match="rtmr1: not 96 lowercase hex"):
        exports.parse_near_votes(json.dumps(broken))


def test_near_058_compose_hash_reproduces_from_its_template_commit():
    """near/mpc #2343: the contract renders the launcher template of its commit with the two image
    hashes; the 0.5.8 TcbInfo's docker_compose_file is that rendering of the d6944d1b template."""
    template = (GCP / "near-mpc-launcher_docker_compose.d6944d1b.yaml.template").read_text()
    rendered = exports.launcher_compose(LAUNCHER_058, MPC_058, template)
    assert rendered == json.loads(NEAR_058["app_compose"])["docker_compose_file"]
    assert hashlib.sha256(rendered.encode()).hexdigest() == \
        "e6ebc4608d0b0b59e741bd0ec87cfba28fc0e7b4ab5a8db5b9d7e08c61a1f7ae"
    # the contract commit we pin mounts the shared volume read-write: another compose hash
    assert exports.launcher_compose(LAUNCHER_058, MPC_058) != rendered


def test_near_058_os_measurement_is_the_contracts_default():
    """crates/include-measurements turns tcb_info.json into the contract's ExpectedMeasurements:
    MRTD, RTMR0-2 and the key-provider event's digest."""
    provider = next(e["digest"] for e in NEAR_058["event_log"] if e["event"] == "key-provider")
    vote = exports.os_measurement({k: NEAR_058[k] for k in ("mrtd", "rtmr0", "rtmr1", "rtmr2")}, provider)
    m = vote["measurement"]
    assert (m["mrtd"][:8], m["mrtd"][-4:]) == ("f06dfda6", "7077")
    assert (m["rtmr0"][:8], m["rtmr0"][-4:]) == ("e673be2f", "7f46")
    assert (m["rtmr1"][:8], m["rtmr1"][-4:]) == ("b598fde9", "532f")
    assert (m["rtmr2"][:8], m["rtmr2"][-4:]) == ("9284cde2", "80cf")
    assert (m["key_provider_event_digest"][:8], m["key_provider_event_digest"][-6:]) == ("61ce56b6", "a414a8")
    document = {"contract": exports.NEAR_CONTRACT, "apps": {"x": {"vote_add_os_measurement": [vote]}}}
    assert exports.parse_near_votes(json.dumps(document)) == document


@pytest.mark.parametrize("fmt", ["flashbots", "near-votes"])
def test_the_command_writes_what_it_can_read(tmp_path, fmt):
    out = tmp_path / "export.json"
    result = subprocess.run([sys.executable, "-m", "fleet", "measurements", "--stack", "dev", "--format", fmt,
                             "--output", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and "Traceback" not in result.stderr
    text = out.read_text()
    parsed = exports.parse_flashbots(text) if fmt == "flashbots" else exports.parse_near_votes(text)
    assert parsed is not None
    assert "note: " in result.stderr  # the shipped dstack image is pending: what is left out is said


def test_the_command_refuses_an_unknown_stack():
    result = subprocess.run([sys.executable, "-m", "fleet", "measurements", "--stack", "nope", "--format",
                             "flashbots"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 2 and "Traceback" not in result.stderr
