"""Rollout safety where changes land: `make up` checks the real CLI's preview and refuses, `make
rollout` applies a large change in attestation-gated waves. The CLI is a stateful fake on PATH
(tests/fake_pulumi.py) fed preview documents made from two offline plans (the deployed revision and
the change); the nodes' attestations come from a local server serving the NEAR vector."""

from __future__ import annotations

import copy
import http.server
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from fleet.cli import rollout
from fleet.config.problems import ConfigError
from fleet.plan import allowlists
from fleet.plan import preview as previews
from fleet.plan.planner import build_plan
from fleet.stacks.load import load_config

from .conftest import ROOT
from .fake_pulumi import PreviewBuilder, calls, install
from .pccs_stub import serve
from .test_images import lock_all, two_versions

QUOTE_SET = ROOT / "tests" / "vectors" / "near-mpc-quote-set"
TCB_INFO = (QUOTE_SET / "tcb_info.json").read_bytes()
QUOTE = (QUOTE_SET / "quote.json").read_bytes()
INSIDE_WINDOW = "2026-08-20T00:00:00Z"  # the quote set's collateral is current 2026-08-13 .. 2026-09-12
INSTANCE = "gcp:compute/instance:Instance"
BACKEND = {"PULUMI_BACKEND_URL": "gs://acme-tee-bootstrap-fleet-state", "FLEET_UP_YES": "1"}


def plan_of(project, stack: str = "prod") -> dict:
    return json.loads(build_plan(project.root, stack, passes="preview").to_json())


def plans(project, before, after, stack: str = "prod") -> tuple[dict, dict]:
    """(deployed, planned): the plan of the stack as ``before`` leaves it, then as ``after`` does."""
    project.mutate(stack, stack, before)
    lock_all(project, stack)
    deployed = plan_of(project, stack)
    project.mutate(stack, stack, after)
    lock_all(project, stack)
    return deployed, plan_of(project, stack)


def nothing(config):
    pass


def analysis(deployed: dict, planned: dict, builder=None) -> previews.Analysis:
    builder = builder or PreviewBuilder(planned, deployed)
    preview = previews.parse(json.dumps(builder.document()))
    return previews.analyze(preview, previews.fleet_view(planned), [])


def fleet(root: Path, *args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fleet", "--root", str(root), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def make(target: str, root: Path, env: dict, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-s", target, "STACK=prod", "PY_DEPS=", f"PY={sys.executable}",
                           f"FLEET_ROOT={root}", *extra], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


# ---- reading the CLI's document ---------------------------------------------------------------------


def test_a_preview_that_is_not_the_cli_document_is_refused_in_one_line():
    with pytest.raises(previews.PreviewError, match="printed no JSON document"):
        previews.parse("Previewing update (prod):\n")
    with pytest.raises(previews.PreviewError, match=r"steps\[0\] has no op and urn"):
        previews.parse('{"steps": [{"urn": "x"}]}')
    with pytest.raises(previews.PreviewError, match=r"steps\[0\].detailedDiff"):
        previews.parse('{"steps": [{"op": "update", "urn": "x", "detailedDiff": []}]}')


def test_nodes_are_counted_by_urn_not_by_step(project):
    deployed, planned = plans(project, nothing, two_versions)
    document = PreviewBuilder(planned, deployed).document()
    replaced = [s for s in document["steps"] if s["urn"].endswith("::overlay-0") and s["op"] != "refresh"
                and s["urn"].split("::")[2].endswith("Instance")]
    assert [s["op"] for s in replaced] == ["replace", "create-replacement", "delete-replaced"]
    assert document["changeSummary"]["replace"] == 3 and isinstance(document["duration"], int)
    found = analysis(deployed, planned)
    group = found.groups["overlay"]
    assert [n.key for n in group.disrupted] == ["overlay-0", "overlay-1", "overlay-2"]
    assert group.nodes[0].effects["replace"] == ["bootDisk.initializeParams.image"] and group.nodes[0].status == "RUNNING"
    # the new image version is a change outside every node
    outside = found.outside()
    assert len(outside) == 3 and all("dstack-fleet:images:GcpImage" in u for u in outside)
    assert len({previews.urn_name(u).removesuffix("-integrity") for u in outside}) == 1


def test_over_max_unavailable_is_refused_and_an_acknowledgement_names_it(project):
    deployed, planned = plans(project, nothing, two_versions)
    findings = previews.check(analysis(deployed, planned), tier="prod", identities=[], waves=False)
    (finding,) = findings
    assert finding.subject == "group:overlay" and finding.ackable
    assert "group overlay would have 3 node(s) down at once" in finding.message and "maxUnavailable is 1" in finding.message
    refused, acked = previews.refusals(findings, {"group:apps"})
    assert refused == [finding] and acked == []
    refused, acked = previews.refusals(findings, {"group:overlay"})
    assert refused == [] and acked == [finding]
    # in waves the same change is allowed: one node at a time
    assert previews.check(analysis(deployed, planned), tier="prod", identities=[], waves=True) == []


def test_nodes_already_down_count_toward_the_limit(project):
    def one(config):
        two_versions(config)
        config["dstack-fleet:nodes"][0]["imageOverrides"] = {1: "overlay-3eb04ca", 2: "overlay-3eb04ca",
                                                            3: "overlay-3eb04ca", 4: "overlay-3eb04ca"}
    deployed, planned = plans(project, nothing, one)
    builder = PreviewBuilder(planned, deployed)
    assert previews.check(analysis(deployed, planned, builder), tier="prod", identities=[], waves=False) == []
    builder.down(builder.urn("overlay-3", INSTANCE), "TERMINATED")  # a node down that the change does not touch
    (finding,) = previews.check(analysis(deployed, planned, builder), tier="prod", identities=[], waves=False)
    assert "2 node(s) down at once" in finding.message and "already down: overlay-3 (TERMINATED)" in finding.message
    # in waves nothing fits: the one node allowed down is down already
    (stuck,) = previews.check(analysis(deployed, planned, builder), tier="prod", identities=[], waves=True)
    assert "no wave fits" in stuck.message and not stuck.ackable
    # replacing the node that is down costs nothing
    builder = PreviewBuilder(planned, deployed)
    builder.down(builder.urn("overlay-0", INSTANCE), "TERMINATED")
    assert previews.check(analysis(deployed, planned, builder), tier="prod", identities=[], waves=False) == []


def test_no_change_takes_every_overlay_member_down_not_even_acknowledged(project):
    def overlay_of_two(config):
        config["dstack-fleet:nodes"][0].update(count=2, maxUnavailable=2)

    def both(config):
        overlay_of_two(config)
        two_versions(config)
        config["dstack-fleet:nodes"][0].pop("imageOverrides")
    deployed, planned = plans(project, overlay_of_two, both)
    found = analysis(deployed, planned)
    findings = previews.check(found, tier="dev", identities=[], waves=False)
    (overlay,) = findings
    assert overlay.subject == "overlay" and not overlay.ackable and "shared secret" in overlay.message
    assert previews.refusals(findings, {"group:overlay"})[0] == [overlay]
    # waves keep a member up: one node per wave although maxUnavailable is 2
    assert previews.check(found, tier="dev", identities=[], waves=True) == []
    assert previews.next_wave(found) == ["overlay-0"]


def test_a_prod_app_given_a_new_identity_is_refused_unless_acknowledged(project):
    def public_logs(config):
        config["dstack-fleet:apps"][0]["settings"]["publicLogs"] = False
    deployed, planned = plans(project, nothing, public_logs)
    identities = previews.app_identities(deployed["measurements"], planned["measurements"])
    found = analysis(deployed, planned)
    findings = previews.check(found, tier="prod", identities=identities, waves=False)
    subjects = {f.subject for f in findings}
    assert "identity:app:mpc-prod" in subjects
    # the config disk changes on both nodes of the apps group: both would be reset at once
    assert [n.key for n in found.groups["apps"].disrupted] == ["apps-0", "apps-1"]
    assert found.nodes["apps-0"].effects.keys() >= {"reset"}
    assert "group:apps" in subjects
    refused, _ = previews.refusals(findings, {"identity:app:mpc-prod", "group:apps"})
    assert refused == []
    assert previews.identity_findings(identities, "staging") == []


def test_acknowledgements_are_names_or_an_error():
    acks, problems = previews.parse_acks(["group:overlay, identity:app:mpc-prod", ""])
    assert acks == {"group:overlay", "identity:app:mpc-prod"} and problems == []
    _, problems = previews.parse_acks(["overlay"])
    assert problems == ["acknowledgement 'overlay' names nothing: use group:<group> or identity:app:<app>"]


# ---- waves ------------------------------------------------------------------------------------------


def test_a_wave_targets_its_node_the_new_image_and_nothing_of_another_node(project):
    deployed, planned = plans(project, nothing, two_versions)
    found = analysis(deployed, planned)
    assert previews.next_wave(found) == ["overlay-0"]
    wave = previews.wave_targets(found, ["overlay-0"])
    names = {previews.urn_name(u) for u in wave.targets}
    assert {"overlay-0", "overlay-0-data", "overlay-0-address", "overlay-0-snapshots"} <= names
    assert not {n for n in names if n.startswith(("overlay-1", "overlay-2", "overlay-3", "apps"))}
    new_image = [u for u in wave.targets if ":GcpImage" in u]
    assert len(new_image) == 3 and set(new_image) == set(wave.extras)  # component, integrity check, image
    assert found.nodes["overlay-0"].urn in wave.targets
    assert found.preview.ops(found.nodes["overlay-0"].urn) == {"same"}  # the component itself does not change


def test_a_dstack_app_change_rolls_per_node_with_its_config_disk_and_reset(project):
    def public_logs(config):
        config["dstack-fleet:apps"][0]["settings"]["publicLogs"] = False
    deployed, planned = plans(project, nothing, public_logs)
    found = analysis(deployed, planned)
    assert previews.next_wave(found) == ["apps-0"]
    wave = previews.wave_targets(found, ["apps-0"])
    ops = {u: "/".join(sorted(found.preview.ops(u) - {"refresh"})) for u in wave.targets}
    config = sorted((previews.urn_type(u), o) for u, o in ops.items() if "-config-" in previews.urn_name(u))
    # the new version of the configuration disk (bundle build, image, disk) and the old one's removal
    assert config == sorted([(t, op) for op in ("create", "delete") for t in (
        "dstack-fleet:nodes:ConfigDisk", "command:local:Command", "gcp:compute/image:Image", "gcp:compute/disk:Disk")])
    by_name = {(previews.urn_type(u), previews.urn_name(u)): o for u, o in ops.items()}
    assert by_name[("command:local:Command", "apps-0-apply-config")] == "update"  # the reset
    assert by_name[(INSTANCE, "apps-0")] == "update"  # the new disk attached
    assert found.nodes["apps-0"].effects.keys() == {"stop", "reset"}
    assert not [u for u in ops if previews.urn_name(u).startswith("apps-1")]


def test_a_wave_refuses_to_split_nodes_that_depend_on_each_other(project):
    deployed, planned = plans(project, nothing, two_versions)
    builder = PreviewBuilder(planned, deployed)
    document = builder.document()
    one = builder.urn("overlay-1", INSTANCE)
    zero = builder.urn("overlay-0", INSTANCE)
    for step in document["steps"]:
        if step["urn"] == one and step.get("newState"):
            step["newState"].setdefault("dependencies", []).append(zero)
    found = previews.analyze(previews.parse(json.dumps(document)), previews.fleet_view(planned), [])
    with pytest.raises(previews.WaveError, match="cannot be rolled apart"):
        previews.wave_targets(found, ["overlay-0"])


# ---- allow-lists ------------------------------------------------------------------------------------


def test_allow_list_values_are_added_before_and_removed_after_in_exact_form(project):
    def new_mpc(config):
        config["dstack-fleet:containers"]["mpc-node"]["external"]["digest"] = "sha256:" + "ab" * 32
    deployed, planned = plans(project, nothing, new_mpc)
    change = allowlists.compare(allowlists.deployed_document(PreviewBuilder(planned, deployed).deployed_outputs,
                                                             "prod"), planned)
    assert [(e.method, e.argument) for e in change.add if e.method == "vote_code_hash"] == \
        [("vote_code_hash", {"code_hash": "ab" * 32})]
    assert [(e.method, e.argument) for e in change.remove if e.method == "vote_code_hash"] == \
        [("vote_code_hash", {"code_hash": "6a5700fccbb3facddd1f3934f4976c4dcefc176c4aac28cd2fd035984b368980"})]
    # the launcher is unchanged: neither added nor removed
    assert not [e for e in change.add + change.remove if e.method == "vote_add_launcher_hash"]
    before, after = "\n".join(change.before_lines()), "\n".join(change.after_lines())
    assert before.startswith("Allow-lists: add these before the first wave")
    assert 'NEAR MPC contract, app mpc-prod: vote_code_hash {"code_hash": "' + "ab" * 32 + '"}' in before
    assert "no removal call; it expires with the contract's tee_upgrade_deadline_duration_seconds" in after
    # the measured compose names the MPC image: a KMS allows the new compose hash first
    kms = [e for e in change.add if e.method == "DstackApp.addComposeHash"]
    assert kms and kms[0].argument == "0x" + planned["measurements"]["app:mpc-prod"]["compose_hash"]
    assert "DstackApp.removeComposeHash" in after


# ---- rollout settings -------------------------------------------------------------------------------


def test_rollout_settings_name_real_groups_and_known_placeholders(project):
    project.mutate("prod", "bad", lambda c: c.update({"dstack-fleet:rollout": {"groups": {
        "nope": {"attestUrl": "http://{address}/attest"},
        "overlay": {"infoUrl": "http://{address}:8090/"},
        "apps": {"quoteUrl": "http://{addr}:8080/quote"}}}}))
    with pytest.raises(ConfigError) as caught:
        load_config(project.root, "bad")
    lines = caught.value.lines()
    assert any(l.endswith("dstack-fleet:rollout.groups.nope: no node group is named 'nope' (groups: apps, overlay)")
               for l in lines)
    assert any(l.endswith("dstack-fleet:rollout.groups.overlay.infoUrl: group overlay is kind overlay: it takes "
                          "attestUrl") for l in lines)
    assert any("dstack-fleet:rollout.groups.apps.quoteUrl: unknown placeholder {addr}" in l for l in lines)
