"""Every GCP node's expected MRTD and RTMR0-2 in the plan, and ``fleet verify --plan --target``
checking each register it has against them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fleet.attest import bootchain, verify
from fleet.images import recipes, versions
from fleet.plan.planner import build_plan
from fleet.stacks import expectations
from fleet.stacks.load import load_config

from .test_bootchain import FLASHBOTS, FLASHBOTS_BOOT, flashbots_ccel
from .test_verify_gcp import COLLATERAL, INSIDE, QUOTE

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "golden"
UKI_SHA256 = "9ab14a46f858662a89adc102d2a57a13f52f75c1769d65a4c34edbbfc8855f0f"
BOOT = {**FLASHBOTS_BOOT, "uki_authenticode_sha256": UKI_SHA256, "stub_version": 255}


def instances(plan: dict) -> dict[str, dict]:
    return {r["name"]: r for r in plan["resources"] if r["type"] == "gcp:compute/instance:Instance"}


@pytest.mark.parametrize("stack", ["dev", "staging", "prod"])
def test_extra_disks_are_the_planned_instances_attached_disks(stack):
    """RTMR0 has a Boot#### variable per disk: the count the expectation assumes is the count the
    plan attaches (data disk, and a dstack node's configuration disk)."""
    plan = json.loads((GOLDEN / f"{stack}.plan.json").read_text())
    nodes = {k.removeprefix("node:"): v for k, v in plan["measurements"].items() if k.startswith("node:")}
    assert nodes
    for key, instance in instances(plan).items():
        expected = nodes[key]["registers"]["platform"]["extra_disks"]
        attached = instance["inputs"]["attachedDisks"]
        assert len(attached) == expected, key


def test_shipped_plans_state_mrtd_and_rtmr0_for_every_node():
    plan = json.loads((GOLDEN / "dev.plan.json").read_text())
    overlay = plan["measurements"]["node:overlay-0"]["registers"]
    dstack = plan["measurements"]["node:apps-0"]["registers"]
    for registers in (overlay, dstack):
        assert registers["mrtd"] == sorted(f.mrtd for f in bootchain.FIRMWARES)
        assert len(registers["firmware"]["gce-2026-04"]["rtmr0"]) == 96
    # the shipped dstack image is a pending build: RTMR1/2 wait for it, the tplus recipe records none
    assert dstack["rtmr1"] == dstack["rtmr2"] == "pending build"
    assert overlay["rtmr1"] == overlay["rtmr2"] == "missing inputs"
    assert any(m.startswith("rtmr1: the tplus-overlay recipe records no boot inputs") for m in overlay["missing"])
    assert plan["measurements"]["app:mpc-dev"]["registers"] == dstack


def lock_dstack_image(project, boot: dict | None) -> str:
    _, config = load_config(project.root, "dev")
    source = config.fleet.images["dstack-0-6-0-a2"]
    digest = recipes.input_hash("dstack-os", versions.build_inputs(source), {})
    entry = {"recipe": "dstack-os", "label": "dstack OS 0.6.0.a2 (test fixture)", "source": "test fixture",
             "artifact": {"url": f"gs://acme-images/{digest}/disk.tar.gz", "generation": "1", "crc32c": "AAAAAA==",
                          "sha256": "1" * 64},
             "os_image_hash": "2" * 64, "rootfs_hash": "3" * 64, "uki_hash": UKI_SHA256}
    if boot is not None:
        entry["boot"] = boot
    (project.root / "images.lock.json").write_text(json.dumps({"version": 1, "images": {digest: entry}}))
    return digest


def test_a_built_dstack_image_gives_rtmr1_and_rtmr2(project):
    lock_dstack_image(project, BOOT)
    plan = build_plan(project.root, "dev")
    node = plan.measurements["node:apps-0"]
    registers = node["registers"]
    assert registers["rtmr1"] == bootchain.replay(bootchain.rtmr1_steps(BOOT)).hex() == FLASHBOTS["rtmr1"]
    assert registers["rtmr2"] == FLASHBOTS["rtmr2"]
    assert node["uki_hash"] == UKI_SHA256
    assert registers["boot"] == BOOT
    assert not any(m.startswith(("rtmr1", "rtmr2")) for m in registers["missing"])
    assert plan.measurements["app:mpc-dev"]["registers"]["rtmr1"] == FLASHBOTS["rtmr1"]


def test_a_lock_entry_without_boot_inputs_names_them(project):
    digest = lock_dstack_image(project, None)
    plan = build_plan(project.root, "dev")
    registers = plan.measurements["node:apps-0"]["registers"]
    assert registers["rtmr1"] == "missing inputs"
    assert f"rtmr1: images.lock.json entry {digest} has no 'boot' inputs (built before they were recorded); " \
           "rebuild it or add them" in registers["missing"]


# ---------------------------------------------------------------------------------------------
# verify --plan --target: every register


def flashbots_target(**change) -> dict:
    """A plan target for the flashbots VM (c3-standard-4, one further disk, its empty key set)."""
    registers = bootchain.expected_registers("c3-standard-4", extra_disks=1, boot=FLASHBOTS_BOOT, keyset="empty")
    registers["boot"] = FLASHBOTS_BOOT
    registers.update(change)
    return {"kind": "dstack-node", "machine_type": "c3-standard-4", "registers": registers, "uki_hash": None}


def plan_file(tmp_path: Path, target: dict) -> str:
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"measurements": {"node:gcp-0": target}}))
    return str(path)


def run(capsys, *argv: str) -> tuple[int, str]:
    code = verify.main(list(argv))
    return code, capsys.readouterr().out


def row(out: str, name: str) -> str:
    return next(line for line in out.splitlines() if line.startswith(name))


def test_verify_checks_every_register_against_the_plan(tmp_path, capsys):
    code, out = run(capsys, "--quote", str(QUOTE), "--collateral", str(COLLATERAL), "--at", INSIDE,
                    "--plan", plan_file(tmp_path, flashbots_target()), "--target", "node:gcp-0")
    assert code == 0, out
    assert row(out, "plan mrtd (GCE firmware)").rstrip().endswith("ok") and "= gce-2026-06" in out
    for name in ("plan rtmr0 (gce-2026-06)", "plan rtmr1", "plan rtmr2"):
        assert row(out, name).rstrip().endswith("ok"), name


@pytest.mark.parametrize(
    ("change", "failed"),
    [
        ({"rtmr1": "00" * 48}, "plan rtmr1"),
        ({"firmware": {"gce-2026-04": {"mrtd": "11" * 48, "rtmr0": "22" * 48}}}, "plan mrtd (GCE firmware)"),
    ],
)
def test_verify_names_the_register_that_differs(tmp_path, capsys, change, failed):
    code, out = run(capsys, "--quote", str(QUOTE), "--plan", plan_file(tmp_path, flashbots_target(**change)),
                    "--target", "node:gcp-0")
    assert code == 1 and out.strip().splitlines()[-1] == f"verify: 1 check(s) failed: {failed}"


def test_a_differing_rtmr0_points_at_the_event_in_the_ccel(tmp_path, capsys):
    """The plan expects GCE's default Secure Boot keys; the flashbots VM had none: the CCEL shows
    which event differs."""
    target = flashbots_target()
    default_keys = bootchain.expected_registers("c3-standard-4", extra_disks=1, boot=FLASHBOTS_BOOT)
    target["registers"]["firmware"] = default_keys["firmware"]
    target["registers"]["platform"] = default_keys["platform"]
    ccel = tmp_path / "CCEL"
    ccel.write_bytes(flashbots_ccel())
    code, out = run(capsys, "--quote", str(QUOTE), "--ccel", str(ccel), "--plan", plan_file(tmp_path, target),
                    "--target", "node:gcp-0")
    assert code == 1
    assert "event 4 of RTMR0: expected PK (gce-default-2025-11)" in row(out, "plan rtmr0 (gce-2026-06)")


def test_a_target_without_planned_values_fails(tmp_path, capsys):
    """A pending build leaves nothing to compare: that is a failure, never a pass."""
    pending = {"kind": "dstack-node", "registers": bootchain.expected_registers(
        "n2-standard-4", extra_disks=1, boot=None, pending=True)}
    pending["registers"]["firmware"] = {}
    code, out = run(capsys, "--quote", str(QUOTE), "--plan", plan_file(tmp_path, pending), "--target", "node:gcp-0")
    assert code == 1 and out.strip().splitlines()[-1] == "verify: 1 check(s) failed: plan values"
    assert "nothing about this guest was verified" in row(out, "plan values")


def test_missing_inputs_are_shown_as_the_reason_not_checked(tmp_path, capsys):
    target = flashbots_target(rtmr1="missing inputs", missing=["rtmr1: kernel_authenticode_sha384 (not recorded)"])
    code, out = run(capsys, "--quote", str(QUOTE), "--plan", plan_file(tmp_path, target), "--target", "node:gcp-0")
    assert code == 0
    assert "not checked (missing inputs: kernel_authenticode_sha384 (not recorded))" in row(out, "plan rtmr1")


def test_expectations_cache_hands_out_copies():
    first = json.loads(expectations._registers("c3-standard-4", 1, None, False, "x"))
    first["rtmr1"] = "changed"
    assert json.loads(expectations._registers("c3-standard-4", 1, None, False, "x"))["rtmr1"] == "missing inputs"
