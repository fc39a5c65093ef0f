"""`fleet diff` fails (exit 1) on every weakening of a staging or prod stack, and the plan refuses
what prod must never have. Each case is a real change to a shipped stack file, planned offline and
compared with the golden plan of that stack (the base revision's plan)."""

from __future__ import annotations

import copy
import json

import pytest

from fleet.config.problems import ConfigError
from fleet.plan import changes, diff, safety
from fleet.plan.planner import build_plan

from .conftest import ROOT

NS = "dstack-fleet:"


def golden(stack: str) -> dict:
    return json.loads((ROOT / "tests" / "golden" / f"{stack}.plan.json").read_text())


def diff_after(project, stack: str, change) -> diff.DiffReport:
    project.mutate(stack, stack, change)
    head = json.loads(build_plan(project.root, stack).to_json())
    return diff.compare(stack, "base", diff.PlanResult(golden(stack)), head)


def app(c, target):
    return next(a for a in c[NS + "apps"] if a["target"] == target)


def rename_prod_app(c):
    app(c, "gce")["name"] = "mpc2"


WEAKENINGS = [
    ("prod", lambda c: c.update({NS + "tier": "staging"}), [
        "the tier goes from prod to staging",
        "overlay-0-data (Disk) loses protect, retainOnDelete, deletionPolicy PREVENT",
        "overlay-0-address (Address) loses protect, retainOnDelete, deletionPolicy PREVENT",
        "daily snapshots of data disks are turned off"]),
    ("prod", lambda c: c.update({NS + "policy": {"enforcement": {"tdx-only": "advisory"}}}),
     ["policy tdx-only goes from mandatory to advisory in prod"]),
    ("staging", lambda c: c.update({NS + "policy": {"enforcement": {"pinned-digests": "disabled"}}}),
     ["policy pinned-digests goes from mandatory to disabled in staging"]),
    ("prod", lambda c: c.update({NS + "tdx": {"extraZones": ["us-central1-f"]}}),
     ["the TDX zones widen: us-central1-f added (dstack-fleet:tdx.extraZones)"]),
    ("prod", lambda c: c.update({NS + "tdx": {"extraMachineTypes": ["n2-standard-8"]}}),
     ["the TDX machine types widen: n2-standard-8 added (dstack-fleet:tdx.extraMachineTypes)"]),
    ("prod", lambda c: c.update({NS + "policy": {"allowedImages": [
        "projects/ubuntu-os-cloud/global/images/ubuntu-2404-tdx-v20250805"]}}),
     ["the boot images allowed besides the stack's own widen: projects/ubuntu-os-cloud/global/images/"
      "ubuntu-2404-tdx-v20250805 added (dstack-fleet:policy.allowedImages)"]),
    ("prod", rename_prod_app, ["stateful app app:mpc-prod is removed or renamed"]),
    ("prod", lambda c: app(c, "gce").update(stateful=False), ["app app:mpc-prod is no longer marked stateful"]),
    ("prod", lambda c: c[NS + "nodes"][0].update(dataDiskGb=100), [
        "data at risk: overlay-0: Disk replace", "data at risk: overlay-4: Disk replace"]),
    ("staging", lambda c: c[NS + "nodes"][0].update(dataDiskGb=20), ["data at risk: overlay-0: Disk replace"]),
    ("staging", lambda c: c.update({NS + "tier": "dev"}), ["the tier goes from staging to dev"]),
]


@pytest.mark.parametrize("stack, change, expected", WEAKENINGS, ids=[
    "prod-to-staging", "prod-rule-advisory", "staging-rule-disabled", "extra-zones", "extra-machine-types",
    "allowed-images", "stateful-app-renamed", "stateful-flipped-off", "prod-disk-shrunk", "staging-disk-shrunk",
    "staging-to-dev"])
def test_every_weakening_fails_the_diff(project, stack, change, expected):
    report = diff_after(project, stack, change)
    assert report.exit_code == 1
    for message in expected:
        assert any(f.startswith(message) for f in report.failures), (message, report.failures)
    assert "**Mandatory checks failed:**" in report.markdown


def test_a_stateful_app_flipped_off_with_a_new_compose_still_fails(project):
    """Turning stateful off in the same change does not let the new identity through."""
    def flip_and_change(c):
        app(c, "gce").update(stateful=False)
        app(c, "gce")["settings"]["publicLogs"] = False  # a measured setting: a new compose hash

    report = diff_after(project, "prod", flip_and_change)
    assert any(f.startswith("app app:mpc-prod would get a new identity") for f in report.failures), report.failures


def test_growing_a_disk_is_live_and_passes(project):
    report = diff_after(project, "prod", lambda c: c[NS + "nodes"][0].update(dataDiskGb=300))
    assert not any("data at risk" in f for f in report.failures)
    assert "**update live** `overlay-0-data`" in report.markdown


def test_a_strengthening_passes(project):
    report = diff_after(project, "staging", lambda c: c.update({NS + "snapshots": True}))
    assert report.exit_code == 0 and "| `snapshots` | `false` | `true` |" in report.markdown


@pytest.mark.parametrize("change, key, message", [
    (lambda c: c.update({NS + "policy": {"enforcement": {"tdx-only": "disabled"}}}), "policy.enforcement.tdx-only",
     "prod never disables a policy rule"),
    (lambda c: c.update({NS + "policy": {"enforcement": {"pinned-digests": "disabled"}}}),
     "policy.enforcement.pinned-digests", "prod never disables a policy rule"),
    (lambda c: c.update({NS + "snapshots": False}), "snapshots", "prod always snapshots its data disks"),
])
def test_the_plan_refuses_what_prod_must_never_have(project, change, key, message):
    from fleet.stacks.load import load_config

    project.mutate("prod", "prod", change)
    with pytest.raises(ConfigError) as info:
        load_config(project.root, "prod")
    assert any(f"{NS}{key}: {message}" in line for line in info.value.lines()), info.value.lines()


def test_the_same_changes_in_dev_pass():
    base, head = golden("dev"), copy.deepcopy(golden("dev"))
    head["safety"]["enforcement"]["tdx-only"] = "disabled"
    head["safety"]["extraZones"] = ["us-central1-f"]
    assert safety.weakenings(base, head) == []


def test_a_base_plan_from_older_code_is_read_from_its_resources():
    """A plan without a safety section (made before it existed): snapshots and the tier's default
    enforcement come from what it shows."""
    base, head = golden("prod"), golden("prod")
    del base["safety"]
    head["safety"]["snapshots"] = False
    head["safety"]["enforcement"]["data-safety"] = "advisory"
    assert safety.weakenings(base, head) == ["policy data-safety goes from mandatory to advisory in prod",
                                             "daily snapshots of data disks are turned off"]


def test_a_shrunk_disk_is_a_replacement_on_gcp():
    old = {"urn": "u", "type": "gcp:compute/disk:Disk", "inputs": {"size": 200}}
    assert changes.classify(old, dict(old, inputs={"size": 100})).action == "replace"
    assert changes.classify(old, dict(old, inputs={"size": 300})).action == "live"


def test_data_at_risk_is_mandatory_in_prod_only():
    risky = ["overlay-0: Disk replace", "overlay-0: Address replace"]
    assert safety.data_weakenings("prod", risky) == ["data at risk: overlay-0: Disk replace",
                                                     "data at risk: overlay-0: Address replace"]
    assert safety.data_weakenings("staging", risky) == ["data at risk: overlay-0: Disk replace"]
    assert safety.data_weakenings("dev", risky) == []
