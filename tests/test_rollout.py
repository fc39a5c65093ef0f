"""Rollout safety where changes land: `make up` checks the real CLI's preview and refuses, `make
rollout` applies a large change in attestation-gated waves. The CLI is a stateful fake on PATH
(tests/fake_pulumi.py) fed preview documents made from two offline plans (the deployed revision and
the change); the nodes' attestations come from a local server serving the NEAR vector."""

from __future__ import annotations

import copy
import http.server
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fleet.cli import rollout
from fleet.config.problems import ConfigError
from fleet.plan import allowlists
from fleet.plan import preview as previews
from fleet.plan.planner import build_plan
from fleet.stacks.load import load_config

from . import fake_gcloud
from .conftest import ROOT
from .fake_pulumi import PreviewBuilder, calls, install
from .pccs_stub import serve
from .test_images import lock_all, two_versions
from .test_deploy import initialised

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
    # stack files as the operator leaves them after the first-time steps (KMS secrets provider, encryptedkey)
    initialised(project, stack, stack, change=before)
    lock_all(project, stack)
    deployed = plan_of(project, stack)
    initialised(project, stack, stack, change=after)
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
    # --show-replacement-steps adds create-replacement and delete-replaced to a replacement
    # (pulumi/pulumi 1b5949891b pkg/backend/display/display.go shouldShow); one node, one count
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
    # the refreshed instance's currentStatus (pulumi-gcp 10.2.0 pulumi_gcp/compute/instance.py current_status:
    # PROVISIONING, STAGING, RUNNING, STOPPING, SUSPENDING, SUSPENDED, REPAIRING, TERMINATED)
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


def test_a_refresh_that_finds_a_node_down_is_its_status_not_a_change(project):
    """The digest shows a refresh that saw a difference as an ``update`` of outputs
    (pkg/backend/display/json.go ShowPreviewDigest), before the program's own step."""
    deployed, planned = plans(project, nothing, nothing)
    builder = PreviewBuilder(planned, deployed)
    urn = builder.urn("overlay-3", INSTANCE)
    builder.down(urn, "TERMINATED")
    document = builder.document()
    for index, entry in enumerate(document["steps"]):
        if entry["urn"] == urn and entry["op"] == "refresh":
            document["steps"][index] = {**entry, "op": "update", "diffReasons": ["currentStatus"],
                                        "detailedDiff": {"currentStatus": {"kind": "update", "inputDiff": False}}}
    for entry in document["steps"]:
        if entry["urn"] == urn and entry["op"] == "same":
            entry["oldState"]["outputs"]["currentStatus"] = "TERMINATED"
    found = previews.analyze(previews.parse(json.dumps(document)), previews.fleet_view(planned), [])
    node = found.nodes["overlay-3"]
    assert node.down and node.status == "TERMINATED" and not node.effects
    assert found.preview.changed_urns() == []
    assert previews.summary_lines(found)[0] == ("group overlay (overlay, maxUnavailable 1): 0 of 5 node(s) disrupted, "
                                                "1 down now (overlay-3 TERMINATED)")


def test_no_change_takes_every_overlay_member_down_not_even_acknowledged(project):
    # the configuration refuses a maxUnavailable that reaches every member; the live check holds anyway
    def overlay_of_three(config):
        config["dstack-fleet:nodes"][0].update(count=3, maxUnavailable=2)

    def all_three(config):
        overlay_of_three(config)
        two_versions(config)
        config["dstack-fleet:nodes"][0].pop("imageOverrides")
    deployed, planned = plans(project, overlay_of_three, all_three)
    found = analysis(deployed, planned)
    findings = previews.check(found, tier="dev", identities=[], waves=False)
    overlay = next(f for f in findings if not f.ackable)
    assert overlay.subject == "overlay" and "shared secret" in overlay.message
    assert previews.refusals(findings, {"group:overlay"})[0] == [overlay]  # acknowledging the group is not enough
    # waves keep a member up: at most two nodes per wave, and never all three
    assert previews.check(found, tier="dev", identities=[], waves=True) == []
    first = previews.next_wave(found)
    assert 1 <= len(first) <= 2 and set(first) < {"overlay-0", "overlay-1", "overlay-2"}


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
    # Explicit targets, not --target-dependents: the engine would follow the new image to every instance
    # booting it (pulumi/pulumi 1b5949891b pkg/resource/deploy/step_generator.go isTargetedForUpdate), and a
    # targeted instance needing an untargeted create fails the update ("untargeted create", same file)
    deployed, planned = plans(project, nothing, two_versions)
    found = analysis(deployed, planned)
    # by ordinal, the genesis node overlay-0 last, as `fleet diff` lists the waves
    assert previews.next_wave(found) == ["overlay-1"]
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
    # near/mpc b0b6b7167e89 crates/contract/src/api/tee_measurements.rs (vote_code_hash has no removal);
    # Dstack-TEE/dstack 312dc605 kms/auth-eth/contracts/DstackApp.sol addComposeHash/removeComposeHash
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


# ---- make up: the live preview first ----------------------------------------------------------------


@pytest.fixture
def cli(tmp_path):
    """The fake CLI's directory; ``install`` it with a document."""
    return tmp_path / "fake"


def test_make_up_refuses_three_nodes_of_a_max_unavailable_1_group_without_calling_up(project, cli):
    deployed, planned = plans(project, nothing, two_versions)
    env = {**install(cli, ROOT, PreviewBuilder(planned, deployed).document()), **BACKEND}
    result = make("up", project.root, env)
    assert result.returncode != 0
    assert "error: make up prod refused: group overlay would have 3 node(s) down at once" in result.stderr
    assert "acknowledge with ACK=group:overlay" in result.stderr and "make rollout STACK=prod" in result.stderr
    assert calls(cli, "up") == []
    (preview,) = calls(cli, "preview")
    assert {"--json", "--refresh", "--show-sames", "--show-replacement-steps"} <= set(preview["argv"])
    assert preview["backend"] == BACKEND["PULUMI_BACKEND_URL"]
    # named, the same change is applied
    result = make("up", project.root, env, "ACK=group:overlay")
    assert result.returncode == 0, result.stderr
    (up,) = calls(cli, "up")
    assert up["targets"] == [] and "--yes" in up["argv"]
    assert "acknowledged: group overlay would have 3 node(s) down" in result.stdout


def test_make_up_applies_a_change_within_the_rules(project, cli):
    def one(config):
        two_versions(config)
        config["dstack-fleet:nodes"][0]["imageOverrides"] = {i: "overlay-3eb04ca" for i in range(1, 5)}
    deployed, planned = plans(project, nothing, one)
    env = {**install(cli, ROOT, PreviewBuilder(planned, deployed).document()), **BACKEND}
    result = fleet(project.root, "deploy", "up", "--stack", "prod", env=env)
    assert result.returncode == 0, result.stderr
    assert "group overlay (overlay, maxUnavailable 1): 1 of 5 node(s) disrupted" in result.stdout
    assert [c["command"] for c in calls(cli)][-2:] == [["preview"], ["up"]]


def test_a_failing_or_unreadable_preview_applies_nothing(project, cli):
    deployed, planned = plans(project, nothing, nothing)
    document = PreviewBuilder(planned, deployed).document()
    document["diagnostics"] = [{"urn": "", "message": "mandatory policy violation: tdx-only", "severity": "error"}]
    env = {**install(cli, ROOT, document), **BACKEND, "FAKE_PULUMI_PREVIEW_EXIT": "255"}
    result = fleet(project.root, "deploy", "up", "--stack", "prod", env=env)
    assert result.returncode == 255
    assert "the live preview failed (exit 255): mandatory policy violation: tdx-only; nothing was applied" in result.stderr
    env.pop("FAKE_PULUMI_PREVIEW_EXIT")
    env["FAKE_PULUMI_PREVIEW_TEXT"] = "Previewing update (prod):"
    result = fleet(project.root, "deploy", "up", "--stack", "prod", env=env)
    assert result.returncode == 2 and "printed no JSON document" in result.stderr
    assert calls(cli, "up") == []


def test_a_prod_identity_change_needs_its_acknowledgement_on_make_up(project, cli):
    def public_logs(config):
        config["dstack-fleet:apps"][0]["settings"]["publicLogs"] = False
    deployed, planned = plans(project, nothing, public_logs)
    env = {**install(cli, ROOT, PreviewBuilder(planned, deployed).document()), **BACKEND}
    result = fleet(project.root, "deploy", "up", "--stack", "prod", "--ack", "group:apps", env=env)
    assert result.returncode == 1
    assert "app:mpc-prod would get a new identity" in result.stderr and "ACK=identity:app:mpc-prod" in result.stderr
    result = fleet(project.root, "deploy", "up", "--stack", "prod", "--ack", "group:apps",
                   "--ack", "identity:app:mpc-prod", env=env)
    assert result.returncode == 0, result.stderr
    assert len(calls(cli, "up")) == 1


# ---- make rollout -----------------------------------------------------------------------------------


class Attestations:
    """The nodes' endpoints: /<node>/info and /<node>/quote answer what ``served`` holds, and every
    request is logged next to the fake CLI's calls, so their order can be checked.

    ``node(key)`` is that node as its own server, the way an IAP tunnel reaches it: the guest agent's
    ``/prpc/Info?json``, an app's ``/quote`` and the light client's ``/attest`` answer (and are
    logged as) ``/<node>/info``, ``/<node>/quote`` and ``/<node>/attest``."""

    ON_THE_NODE = {"/prpc/Info?json": "info", "/quote": "quote", "/attest": "attest"}

    def __init__(self, log: Path):
        self.served: dict[str, bytes] = {}
        self.answer = lambda path: self.served.get(path)
        self.log = log
        self.servers: list[http.server.ThreadingHTTPServer] = []
        self.nodes: dict[str, str] = {}

    def _server(self, key: str | None) -> http.server.ThreadingHTTPServer:
        log, attestations = self.log, self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                path = self.path if key is None else f"/{key}/{attestations.ON_THE_NODE.get(self.path, self.path)}"
                body = attestations.answer(path)
                with open(log, "a") as f:
                    f.write(json.dumps({"who": "node", "path": path, "time": time.time()}) + "\n")
                self.send_response(200 if body is not None else 404)
                self.end_headers()
                self.wfile.write(body or b"")

            def log_message(self, *args):
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self.servers.append(server)
        return server

    def __enter__(self):
        self.server = self._server(None)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        return self

    def node(self, key: str) -> str:
        """``host:port`` of the node's own server (what a tunnel to any of its ports reaches)."""
        if key not in self.nodes:
            self.nodes[key] = "127.0.0.1:%d" % self._server(key).server_address[1]
        return self.nodes[key]

    def __exit__(self, *exc):
        for server in self.servers:
            server.shutdown()

    def serve(self, node: str, info: bytes = TCB_INFO, quote: bytes = QUOTE) -> None:
        self.served[f"/{node}/info"], self.served[f"/{node}/quote"] = info, quote


def tampered_quote() -> bytes:
    forged = json.loads(QUOTE)
    forged[100] ^= 1  # inside the TD report the quoting enclave signed
    return json.dumps(forged).encode()


def quote_set_expectation() -> dict:
    from .test_verify_step import quote_set_expectation as expected

    return expected()


def three_apps(url: str):
    def change(config):
        config["dstack-fleet:nodes"][1]["count"] = 3
        config["dstack-fleet:rollout"] = {"groups": {"apps": {"infoUrl": url + "/{key}/info",
                                                              "quoteUrl": url + "/{key}/quote"}},
                                          "healthTimeoutSeconds": 5, "pollSeconds": 1}
    return change


def new_os_image(config):
    image = copy.deepcopy(config["dstack-fleet:images"]["dstack-0-6-0-a2"])
    image["build"]["cmdlineOverrides"] = {"dstack.storage_fs": "ext4"}
    config["dstack-fleet:images"]["dstack-next"] = image
    config["dstack-fleet:nodes"][1]["image"] = "dstack-next"


def next_os(url: str):
    def change(config):
        three_apps(url)(config)
        new_os_image(config)
    return change


def apps_upgrade(project, cli, tmp_path, pccs: str, deployed_change, planned_change) -> tuple[dict, Path, dict]:
    """prod's apps group deployed as ``deployed_change`` and planned as ``planned_change`` (a new dstack
    OS image), with the NEAR vector's expectation for the app: the plan, its file and the environment
    of the fake CLI answering with the preview between the two."""
    deployed, planned = plans(project, deployed_change, planned_change)
    # the app the vector attests, deployed and planned alike (its identity does not change) but for
    # the OS image hash a KMS allows: the vector's is new
    deployed["measurements"]["app:mpc-prod"] = {**quote_set_expectation(), "os_image_hash": "11" * 32}
    planned["measurements"]["app:mpc-prod"] = {**quote_set_expectation(),
                                               "os_image_hash": json.loads(TCB_INFO)["os_image_hash"]}
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps(planned))
    env = {**install(cli, ROOT, PreviewBuilder(planned, deployed).document()), **BACKEND,
           "FLEET_PCCS_URL": pccs, "FLEET_VERIFY_AT": INSIDE_WINDOW, "FLEET_EVIDENCE_DIR": str(tmp_path / "ev")}
    return planned, plan_file, env


@pytest.fixture
def os_upgrade(project, cli, tmp_path):
    """prod with a three-node apps group moving to a new dstack OS image, the fake CLI, the nodes'
    endpoints, a PCCS and a plan whose expectation for the app is the NEAR vector's."""
    with Attestations(cli.parent / "nodes.jsonl") as nodes, serve(QUOTE_SET / "collateral.json") as (pccs, asked):
        _, plan_file, env = apps_upgrade(project, cli, tmp_path, pccs, three_apps(nodes.url), next_os(nodes.url))
        yield nodes, env, plan_file, asked


def timeline(cli: Path) -> list[str]:
    """The fake CLI's ups and the nodes' requests in the order they happened: "up apps-0", "/apps-0/quote"."""
    entries = []
    for path in (cli / "calls.jsonl", cli.parent / "nodes.jsonl"):
        entries += [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    out = []
    for entry in sorted(entries, key=lambda e: e["time"]):
        if entry["who"] == "node":
            out.append(entry["path"])
        elif entry["who"] == "pulumi" and entry["command"] == ["up"]:
            nodes = sorted({n for n in map(previews.urn_name, entry["targets"]) if re.fullmatch(r"[a-z]+-\d+", n)})
            out.append("up " + (",".join(nodes) if entry["targets"] else "(all)"))
    return out


def test_make_rollout_applies_three_waves_each_after_the_previous_verified(project, cli, os_upgrade, tmp_path):
    nodes, env, plan_file, asked = os_upgrade
    for node in ("apps-0", "apps-1", "apps-2"):
        nodes.serve(node)
    result = make("rollout", project.root, env, f"VERIFY_PLAN={plan_file}")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stderr  # make rollout streams the rollout's output as it runs
    targeted = [c for c in calls(cli, "up") if c["targets"]]
    assert len(targeted) == 3
    for index, up in enumerate(targeted):
        names = {previews.urn_name(u) for u in up["targets"]}
        assert f"apps-{index}" in names and f"apps-{index}-apply-config" in names
        assert not {n for n in names if n.startswith(tuple(f"apps-{i}" for i in range(3) if i != index))}
        assert "--target-dependents" not in up["argv"] and "--yes" in up["argv"]
    assert sum(":GcpImage" in u for u in targeted[0]["targets"]) == 3  # the new OS image, with the first wave
    assert not any(":GcpImage" in u for u in targeted[1]["targets"] + targeted[2]["targets"])
    # each wave's up comes after the previous wave's node was read and verified
    assert timeline(cli) == ["/apps-0/info",  # reachable from here, before anything changes
                             "up apps-0", "/apps-0/info", "/apps-0/quote", "/apps-0/info", "/apps-0/quote",
                             "up apps-1", "/apps-1/info", "/apps-1/quote", "/apps-1/info", "/apps-1/quote",
                             "up apps-2", "/apps-2/info", "/apps-2/quote", "/apps-2/info", "/apps-2/quote"]
    for index in range(3):
        assert f"apps-{index} app:mpc-prod: verify: all" in out
    assert any(p.endswith("/tcb") for p in asked)  # collateral fetched at each gate, kept as evidence
    kept = sorted((tmp_path / "ev").glob("rollout-prod-*/wave-*/app-mpc-prod/*/collateral.json"))
    assert [p.parts[-4] for p in kept] == ["wave-1", "wave-2", "wave-3"]
    assert "rollout of prod done: 3 wave(s)" in out
    # the allow-list: the new value before the first wave, the old one out after the last
    add = out.index("DstackKms.addOsImageHash \"0x" + json.loads(TCB_INFO)["os_image_hash"])
    remove = out.index("DstackKms.removeOsImageHash \"0x" + "11" * 32)
    assert add < out.index("wave 1: apps: apps-0") < out.index("wave 3: apps: apps-2") < remove


def test_a_tampered_attestation_stops_the_rollout_after_the_first_wave(project, cli, os_upgrade):
    nodes, env, plan_file, _ = os_upgrade
    nodes.serve("apps-0", quote=tampered_quote())
    for node in ("apps-1", "apps-2"):
        nodes.serve(node)
    result = make("rollout", project.root, env, f"VERIFY_PLAN={plan_file}")
    assert result.returncode == 1, result.stdout + result.stderr  # make passes the rollout's own 1 on
    err = result.stderr  # all of the rollout's output, streamed
    (up,) = calls(cli, "up")  # waves 2 and 3 untouched, nothing applied after
    assert {previews.urn_name(u) for u in up["targets"]} & {"apps-0", "apps-1", "apps-2"} == {"apps-0"}
    assert "apps-0 app:mpc-prod: verify: 1 check(s) failed: quote signature" in err
    assert "    quote signature: MISMATCH" in err
    assert "rollout stopped at wave 1 (apps: apps-0): apps-0 failed its attestation gate" in err
    assert "wave 1 (apps: apps-0): applied, not verified" in err and "untouched: apps-1, apps-2" in err
    assert "To resume once the cause is fixed: make rollout STACK=prod" in err and "To roll back: revert" in err
    assert "/apps-1/" not in "".join(timeline(cli))

    # resumed as it is: the node that failed is verified again before any wave, and stops it again
    result = fleet(project.root, "rollout", "--stack", "prod", "--plan", str(plan_file), env=env)
    assert result.returncode == 1 and len(calls(cli, "up")) == 1
    assert "rollout stopped before the first wave: apps-0 does not verify against the plan" in result.stderr
    assert "untouched: apps-1, apps-2" in result.stderr

    # fixed (the node now runs what the plan says): the rollout continues where it stopped
    nodes.serve("apps-0")
    result = fleet(project.root, "rollout", "--stack", "prod", "--plan", str(plan_file), env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "before the first wave: verifying the nodes this change leaves as they are (apps-0)" in result.stdout
    assert "wave 1: apps: apps-1" in result.stdout and "wave 2: apps: apps-2" in result.stdout
    assert [sorted({previews.urn_name(u) for u in c["targets"]} & {"apps-0", "apps-1", "apps-2"})
            for c in calls(cli, "up")] == [["apps-0"], ["apps-1"], ["apps-2"]]


def test_a_node_that_never_comes_back_stops_its_wave_at_the_health_wait(project, cli, os_upgrade):
    nodes, env, plan_file, _ = os_upgrade
    for node in ("apps-0", "apps-1", "apps-2"):
        nodes.serve(node)
    served = nodes.answer
    nodes.answer = lambda path: None if path.startswith("/apps-0/") and calls(cli, "up") else served(path)
    result = fleet(project.root, "rollout", "--stack", "prod", "--plan", str(plan_file), env=env)
    assert result.returncode == 1
    assert "rollout stopped at wave 1 (apps: apps-0): health: apps-0 not healthy after 5s" in result.stderr
    assert "untouched: apps-1, apps-2" in result.stderr
    assert len(calls(cli, "up")) == 1


def test_nodes_that_cannot_be_reached_from_here_are_not_rolled(project, cli, os_upgrade):
    """Where the nodes do not answer (a runner outside their network), nothing starts."""
    nodes, env, plan_file, _ = os_upgrade
    result = fleet(project.root, "rollout", "--stack", "prod", "--plan", str(plan_file), env=env)
    assert result.returncode == 1
    assert "error: no node of group apps answers from here" in result.stderr and "nothing was applied" in result.stderr
    assert calls(cli, "up") == []


def test_a_dstack_group_without_a_quote_url_is_refused_before_anything_runs(project, cli):
    deployed, planned = plans(project, nothing, lambda c: c["dstack-fleet:apps"][0]["settings"].update(publicLogs=False))
    env = {**install(cli, ROOT, PreviewBuilder(planned, deployed).document()), **BACKEND}
    result = fleet(project.root, "rollout", "--stack", "prod", "--ack", "identity:app:mpc-prod", env=env)
    assert result.returncode == 2
    assert "error: dstack-fleet:rollout.groups.apps.quoteUrl: required to roll group apps" in result.stderr
    assert calls(cli, "up") == []


def test_rollout_refuses_an_unacknowledged_prod_identity_change(project, cli):
    deployed, planned = plans(project, nothing, lambda c: c["dstack-fleet:apps"][0]["settings"].update(publicLogs=False))
    env = {**install(cli, ROOT, PreviewBuilder(planned, deployed).document()), **BACKEND}
    result = fleet(project.root, "rollout", "--stack", "prod", env=env)
    assert result.returncode == 1 and "make rollout prod refused: app:mpc-prod would get a new identity" in result.stderr
    assert calls(cli, "up") == []


# ---- the overlay gate -------------------------------------------------------------------------------

SHARED = "02" + "ab" * 32
OTHER = "03" + "cd" * 32


def attest(pubkey: str, quote: str = "00") -> bytes:
    """The light client's answer: a JSON string holding the JSON object (helios.rs get_attestation_handler)."""
    return json.dumps(json.dumps({"quote": quote, "pubkey": pubkey})).encode()


def overlay_gate(project, answers: dict[str, bytes], tmp_path) -> rollout.Gate:
    project.mutate("prod", "prod", lambda c: c.update({"dstack-fleet:rollout": {"healthTimeoutSeconds": 2,
                                                                                  "pollSeconds": 1}}))
    lock_all(project, "prod")
    _, config = load_config(project.root, "prod")
    plan = plan_of(project)

    def fetch(url: str) -> bytes:
        address = url.split("//")[1].split(":")[0]
        key = next(k for k, n in plan["outputs"]["nodes"].items() if n["address"] == address)
        if key not in answers:
            raise OSError("connection refused")
        return answers[key]

    assert plan["outputs"]["nodes"]["overlay-0"]["address"] == "10.30.0.10"  # http://{address}:3032/attest
    return rollout.Gate(root=project.root, config=config, plan=plan, evidence=tmp_path / "ev",
                        env={"PATH": "/usr/bin:/bin"}, fetcher=fetch, sleep=lambda s: None)


def test_an_overlay_node_is_healthy_only_once_it_holds_the_overlays_secret(project, tmp_path):
    # tplus-examples 3eb04cad dstack-helios-tdx/light-client/src/helios.rs: the API on port 3032 starts
    # after the secret arrives; /attest's pubkey is the shared secret's public key
    answers = {"overlay-1": attest(SHARED), "overlay-2": attest(SHARED)}
    gate = overlay_gate(project, answers, tmp_path)
    assert gate.read_overlay_key(["overlay-1", "overlay-2", "overlay-3"]) == SHARED
    # not answering yet: the light client serves /attest only after it received the secret
    assert "not healthy after 2s" in gate.health("overlay-0", "overlay")
    answers["overlay-0"] = attest(OTHER)
    reason = gate.health("overlay-0", "overlay")
    assert "overlay-0 holds a different secret" in reason and "founded a new overlay" in reason
    answers["overlay-0"] = attest(SHARED)
    assert gate.health("overlay-0", "overlay") is None


def test_the_overlays_members_must_agree_and_answer(project, tmp_path):
    gate = overlay_gate(project, {"overlay-1": attest(SHARED), "overlay-2": attest(OTHER)}, tmp_path)
    with pytest.raises(rollout.Stopped, match="report different shared keys"):
        gate.read_overlay_key(["overlay-1", "overlay-2"])
    gate = overlay_gate(project, {}, tmp_path)
    with pytest.raises(rollout.Stopped, match="no member of the overlay outside this wave answers on /attest"):
        gate.read_overlay_key(["overlay-1"])


def test_an_overlay_quote_must_be_bound_to_the_shared_key(project, tmp_path):
    # tplus-examples 3eb04cad dstack-helios-tdx/mocks/src/lib.rs test_verify_quote: report_data is
    # SHA-256("register" || hex(pubkey)) zero-padded to 64 bytes
    quote = bytes(json.loads(QUOTE)).hex()
    gate = overlay_gate(project, {"overlay-0": attest(SHARED, quote)}, tmp_path)
    gate.overlay_key = SHARED
    with serve(QUOTE_SET / "collateral.json") as (pccs, _):
        gate.env.update(FLEET_PCCS_URL=pccs, FLEET_VERIFY_AT=INSIDE_WINDOW)
        result = gate.verify("overlay-0", "overlay", tmp_path / "ev" / "wave-1")
    assert not result.ok
    # the genuine quote of another TD does not carry SHA-256("register" || hex(pubkey))
    expected = __import__("hashlib").sha256(b"register" + SHARED.encode()).hexdigest()
    assert rollout.report_data(SHARED) == expected
    (kept,) = (tmp_path / "ev" / "wave-1" / "node-overlay-0").iterdir()
    table = (kept / "result.txt").read_text()
    assert "MISMATCH: the quote was not made for this report data" in next(
        l for l in table.splitlines() if l.startswith("quote report_data"))
    assert "    quote report_data: MISMATCH: the quote was not made for this report data" in result.lines
    assert next(l for l in table.splitlines() if l.startswith("quote signature")).rstrip().endswith("ok")
    assert sorted(p.name for p in kept.iterdir()) == ["attest.json", "collateral.json", "plan.json", "quote.txt",
                                                      "result.txt"]
    assert any(l.strip().endswith("  collateral.json") for l in result.lines)  # its sha256, in the output


def test_an_overlay_rolls_one_node_at_a_time_each_holding_the_shared_secret(project, cli, tmp_path, monkeypatch,
                                                                            capsys):
    """The overlay's orchestration: the shared key read from the members outside each wave before its
    up, the new node healthy only with that key. (A real quote over the key is not available offline,
    so this gate's verification is a recorder; tests above run fleet verify on the overlay path.)"""
    with Attestations(cli.parent / "nodes.jsonl") as nodes:
        def endpoints(config):
            config["dstack-fleet:rollout"] = {"groups": {"overlay": {"attestUrl": nodes.url + "/{key}/attest"}},
                                              "healthTimeoutSeconds": 2, "pollSeconds": 1}

        def rolled(config):
            endpoints(config)
            two_versions(config)
        deployed, planned = plans(project, endpoints, rolled)
        env = install(cli, ROOT, PreviewBuilder(planned, deployed).document())
        urns = {k: PreviewBuilder(planned).urn(k, INSTANCE) for k in planned["outputs"]["nodes"]}

        def answer(path: str):
            key = path.split("/")[1]
            applied = json.loads((cli / "applied.json").read_text()) if (cli / "applied.json").exists() else []
            # overlay-2 comes back from its replacement with a secret of its own
            return attest(OTHER if key == "overlay-2" and urns[key] in applied else SHARED)
        nodes.answer = answer
        for name, value in {**env, **BACKEND}.items():
            monkeypatch.setenv(name, value)
        verified = []

        class Recorder(rollout.Gate):
            def verify(self, key, kind, where):
                verified.append(key)
                return rollout.GateResult(True, [f"{key}: recorded"])

        code = rollout.run(project.root, "prod", [], gate_factory=Recorder)
    assert code == 1
    # before anything: the members the change leaves alone; then overlay-1's wave, verified (by ordinal,
    # the genesis node overlay-0 last, as `fleet diff` lists the waves)
    assert verified == ["overlay-3", "overlay-4", "overlay-1"]
    ups = [sorted({previews.urn_name(u) for u in c["targets"]} & set(urns)) for c in calls(cli, "up")]
    assert ups == [["overlay-1"], ["overlay-2"]]
    out, err = capsys.readouterr()
    assert timeline(cli) == [
        "/overlay-3/attest",  # the key, from a member left alone
        "/overlay-0/attest", "/overlay-2/attest", "/overlay-3/attest", "/overlay-4/attest",  # wave 1's reference
        "up overlay-1", "/overlay-1/attest",  # healthy: answers with the shared key
        "/overlay-0/attest", "/overlay-1/attest", "/overlay-3/attest", "/overlay-4/attest",  # wave 2's reference
        "up overlay-2", "/overlay-2/attest"]
    assert "overlay-1: healthy and holds the overlay's shared secret" in out
    assert ("rollout stopped at wave 2 (overlay: overlay-2): health: overlay-2 holds a different secret "
            "(public key 03cdcdcdcdcdcdcd…, the overlay's is 02ababababababab…): it founded a new overlay") in err
    assert "untouched: overlay-0" in err


# ---- reaching nodes through IAP TCP forwarding --------------------------------------------------------

# The deploy workflow's runners are outside the VPC: with dstack-fleet:rollout.reach iap, every read of
# a node goes through `gcloud compute start-iap-tunnel INSTANCE PORT --local-host-port=127.0.0.1:N
# --zone=ZONE --project=PROJECT` (tests/fake_gcloud.py forwards it to the node's own server).
IAP_ROLLOUT = {"reach": "iap", "groups": {"apps": {"quoteUrl": "http://{address}:8080/quote"}},
               "healthTimeoutSeconds": 5, "pollSeconds": 1}


def three_apps_through_iap(config):
    config["dstack-fleet:nodes"][1]["count"] = 3
    config["dstack-fleet:rollout"] = copy.deepcopy(IAP_ROLLOUT)


def next_os_through_iap(config):
    three_apps_through_iap(config)
    new_os_image(config)


def routes(plan: dict, nodes: Attestations, group: str, ports: tuple[str, ...]) -> dict:
    """What the fake gcloud knows: each instance of the plan's group, in its zone and project, with
    ``ports`` forwarded to the node's own server."""
    projects = {r["name"]: r["inputs"]["project"] for r in plan["resources"] if r["type"] == INSTANCE}
    return {"instances": {node["name"]: {"zone": node["zone"], "project": projects[key],
                                         "ports": {port: nodes.node(key) for port in ports}}
                          for key, node in plan["outputs"]["nodes"].items() if node["group"] == group}}


@pytest.fixture
def iap_upgrade(project, cli, tmp_path):
    """``os_upgrade`` with the nodes read through IAP: prod's three-node apps group moving to a new
    dstack OS image, its guest agents (8090) and app quotes (8080) reached only through the tunnel."""
    with Attestations(cli.parent / "nodes.jsonl") as nodes, serve(QUOTE_SET / "collateral.json") as (pccs, _):
        planned, plan_file, env = apps_upgrade(project, cli, tmp_path, pccs, three_apps_through_iap,
                                               next_os_through_iap)
        fake_gcloud.set_routes(cli, routes(planned, nodes, "apps", ("8090", "8080")))
        yield nodes, env, plan_file, planned


def no_tunnel_left(cli: Path) -> None:
    """Neither a tunnel's wrapper nor its forwarder runs (a signalled process gets a moment to exit)."""
    started = fake_gcloud.calls(cli)
    assert started
    deadline = time.monotonic() + 5
    while True:
        left = [(c["argv"][2], c["argv"][3], pid) for c in started for pid in (c["pid"], c["wrapper"])
                if fake_gcloud.alive(pid)]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert left == [], "tunnel processes outlived the rollout"


def test_a_rollout_through_iap_tunnels_to_each_node_and_verifies_through_it(project, cli, iap_upgrade):
    nodes, env, plan_file, planned = iap_upgrade
    for node in ("apps-0", "apps-1", "apps-2"):
        nodes.serve(node)
    result = make("rollout", project.root, env, f"VERIFY_PLAN={plan_file}")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stderr
    assert "reading nodes through IAP TCP forwarding" in out and "(project acme-tee-prod)" in out
    # every tunnel names the node's instance, zone and project as the plan has them, one port each
    node_of = {n["name"]: (k, n) for k, n in planned["outputs"]["nodes"].items()}
    opened: dict[str, set[str]] = {}
    for t in fake_gcloud.tunnels(cli):
        key, node = node_of[t["instance"]]
        assert (t["zone"], t["project"]) == (node["zone"], "acme-tee-prod"), t
        assert re.fullmatch(r"127\.0\.0\.1:\d+", t["local-host-port"]), t
        opened.setdefault(key, set()).add(t["port"])
    assert opened == {"apps-0": {"8090", "8080"}, "apps-1": {"8090", "8080"}, "apps-2": {"8090", "8080"}}
    assert {c["argv"][2] for c in fake_gcloud.calls(cli)} == {"fleet-prod-apps-0", "fleet-prod-apps-1",
                                                              "fleet-prod-apps-2"}
    # the same gates as a direct rollout, each node read through its tunnels only
    assert timeline(cli) == ["/apps-0/info",
                             "up apps-0", "/apps-0/info", "/apps-0/quote", "/apps-0/info", "/apps-0/quote",
                             "up apps-1", "/apps-1/info", "/apps-1/quote", "/apps-1/info", "/apps-1/quote",
                             "up apps-2", "/apps-2/info", "/apps-2/quote", "/apps-2/info", "/apps-2/quote"]
    for index in range(3):
        assert f"apps-{index} app:mpc-prod: verify: all" in out
    assert "rollout of prod done: 3 wave(s)" in out
    no_tunnel_left(cli)


def test_a_tampered_attestation_through_the_tunnel_stops_after_the_first_wave(project, cli, iap_upgrade):
    nodes, env, plan_file, _ = iap_upgrade
    nodes.serve("apps-0", quote=tampered_quote())
    for node in ("apps-1", "apps-2"):
        nodes.serve(node)
    result = make("rollout", project.root, env, f"VERIFY_PLAN={plan_file}")
    assert result.returncode == 1, result.stdout + result.stderr
    err = result.stderr
    (up,) = calls(cli, "up")
    assert {previews.urn_name(u) for u in up["targets"]} & {"apps-0", "apps-1", "apps-2"} == {"apps-0"}
    assert "apps-0 app:mpc-prod: verify: 1 check(s) failed: quote signature" in err
    assert "rollout stopped at wave 1 (apps: apps-0): apps-0 failed its attestation gate" in err
    assert "untouched: apps-1, apps-2" in err
    assert {t["instance"] for t in fake_gcloud.tunnels(cli)} == {"fleet-prod-apps-0"}  # apps-0 answered first
    no_tunnel_left(cli)


def test_a_denied_tunnel_is_one_line_and_applies_nothing(project, cli, iap_upgrade):
    # gcloud's own words when the identity lacks roles/iap.tunnelResourceAccessor (IAP error 4033)
    nodes, env, plan_file, planned = iap_upgrade
    for node in ("apps-0", "apps-1", "apps-2"):
        nodes.serve(node)
    fake_gcloud.set_routes(cli, {**routes(planned, nodes, "apps", ("8090", "8080")),
                                 "fail": {"*": "While checking if a connection can be made: Error while connecting "
                                               "[4033: 'not authorized']."}})
    result = fleet(project.root, "rollout", "--stack", "prod", "--plan", str(plan_file), env=env)
    assert result.returncode == 1, result.stdout + result.stderr
    (line,) = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert line.startswith("error: no node of group apps answers through IAP (")
    assert "apps-0 (fleet-prod-apps-0 tcp/8090 through IAP): gcloud compute start-iap-tunnel exited 1: ERROR: " \
           "(gcloud.compute.start-iap-tunnel) While checking if a connection can be made: Error while connecting " \
           "[4033: 'not authorized']." in line
    assert "roles/iap.tunnelResourceAccessor on acme-tee-prod" in line and line.endswith("nothing was applied")
    assert calls(cli, "up") == [] and "/apps-" not in "".join(timeline(cli))
    no_tunnel_left(cli)


def test_a_tunnel_that_never_listens_stops_its_wave_and_applies_no_further_one(project, cli, iap_upgrade):
    nodes, env, plan_file, planned = iap_upgrade
    for node in ("apps-0", "apps-1", "apps-2"):
        nodes.serve(node)
    fake_gcloud.set_routes(cli, {**routes(planned, nodes, "apps", ("8090", "8080")), "hang": ["fleet-prod-apps-0"]})
    result = fleet(project.root, "rollout", "--stack", "prod", "--plan", str(plan_file), env=env)
    assert result.returncode == 1, result.stdout + result.stderr
    (line,) = [ln for ln in result.stderr.splitlines() if ln.startswith("rollout stopped")]
    assert line.startswith("rollout stopped at wave 1 (apps: apps-0): health: apps-0 not healthy after 5s: ")
    assert re.search(r"apps-0 \(fleet-prod-apps-0 tcp/8090 through IAP\): the IAP tunnel did not listen on "
                     r"127\.0\.0\.1:\d+ within 5s \(gcloud: Testing if tunnel connection works\.\)", line), line
    assert "untouched: apps-1, apps-2" in result.stderr
    assert [sorted({previews.urn_name(u) for u in c["targets"]} & {"apps-0", "apps-1", "apps-2"})
            for c in calls(cli, "up")] == [["apps-0"]]
    no_tunnel_left(cli)


def test_without_gcloud_an_iap_rollout_does_not_start(project, cli, iap_upgrade, tmp_path):
    _, env, plan_file, _ = iap_upgrade
    empty = tmp_path / "no-gcloud"
    empty.mkdir()
    result = fleet(project.root, "rollout", "--stack", "prod", "--plan", str(plan_file),
                   env={**env, "PATH": str(empty)})
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.splitlines() == [
        "error: reaching nodes through IAP needs the Google Cloud CLI and gcloud is not on PATH (install it, "
        "authenticate it, or run where the nodes are reachable with REACH=direct); nothing was applied"]
    assert calls(cli) == [] and fake_gcloud.calls(cli) == []


def test_an_iap_stack_is_read_directly_for_one_run(project, cli, iap_upgrade):
    # a runner inside the VPC: the nodes' own addresses (unreachable here), no tunnel
    nodes, env, plan_file, _ = iap_upgrade
    result = make("rollout", project.root, env, f"VERIFY_PLAN={plan_file}", "REACH=direct")
    assert result.returncode == 1
    assert "error: no node of group apps answers from here (http://10.30.0.40:8090/prpc/Info?json: " in result.stderr
    assert fake_gcloud.calls(cli) == [] and calls(cli, "up") == []


def test_a_direct_stack_read_through_iap_for_one_run_needs_urls_of_the_node(project, cli, os_upgrade):
    nodes, env, plan_file, _ = os_upgrade  # its templates name the test's server, not the nodes
    result = make("rollout", project.root, env, f"VERIFY_PLAN={plan_file}", "REACH=iap")
    assert result.returncode == 2
    lines = [ln for ln in result.stderr.splitlines() if not re.match(r"make(\[\d+\])?: ", ln)]
    assert len(lines) == 2 and all(ln.endswith("; nothing was applied") for ln in lines), lines
    for field, line in zip(("infoUrl", "quoteUrl"), lines):
        assert line.startswith(f"error: stacks/Pulumi.prod.yaml: dstack-fleet:rollout.groups.apps.{field}: "
                               "'http://127.0.0.1:") and "cannot be read through IAP" in line
    assert calls(cli) == [] and fake_gcloud.calls(cli) == []


def test_iap_refuses_a_template_that_does_not_read_the_node_itself(project):
    def gateway(config):
        config["dstack-fleet:rollout"] = {"reach": "iap", "groups": {
            "apps": {"quoteUrl": "https://{key}-8080.gateway.example/quote", "infoUrl": "http://{address}:8090/x"},
            "overlay": {"attestUrl": "http://10.0.0.1:3032/attest"}}}
    project.mutate("prod", "gateway", gateway)
    with pytest.raises(ConfigError) as caught:
        load_config(project.root, "gateway")
    lines = caught.value.lines()
    assert [l.split(": ", 1)[1] for l in lines] == [
        "dstack-fleet:rollout.groups.apps.quoteUrl: 'https://{key}-8080.gateway.example/quote' cannot be read through "
        "IAP (rollout.reach iap): a tunnel reaches a port of the node itself over plain http, so write "
        "http://{address}:PORT/... (or {name} as the host)",
        "dstack-fleet:rollout.groups.overlay.attestUrl: 'http://10.0.0.1:3032/attest' cannot be read through IAP "
        "(rollout.reach iap): a tunnel reaches a port of the node itself over plain http, so write "
        "http://{address}:PORT/... (or {name} as the host)"]
    # read directly, the same templates are fine
    project.mutate("prod", "direct", lambda c: (gateway(c), c["dstack-fleet:rollout"].update(reach="direct")))
    load_config(project.root, "direct")


def test_an_overlay_member_is_read_through_its_tunnel_on_the_light_clients_port(project, cli, tmp_path):
    from fleet.cli import tunnel

    with Attestations(cli.parent / "nodes.jsonl") as nodes:
        nodes.served["/overlay-1/attest"] = attest(SHARED)
        env = install(cli, ROOT)
        gate = overlay_gate(project, {}, tmp_path)
        gate.fetcher = rollout.fetch
        known = routes(gate.plan, nodes, "overlay", ("3032",))
        known["instances"]["fleet-prod-overlay-2"]["ports"] = {}  # its light client does not listen yet
        fake_gcloud.set_routes(cli, known)
        gate.reach = tunnel.Iap(project="acme-tee-prod", timeout=5, env=env)
        assert gate.read_overlay_key(["overlay-1"]) == SHARED
        with pytest.raises(rollout.Stopped, match=r"overlay-2 \(http://10\.30\.0\.12:3032/attest\): overlay-2 "
                                                  r"\(fleet-prod-overlay-2 tcp/3032 through IAP\): gcloud compute "
                                                  r"start-iap-tunnel exited 1: .*4003: 'failed to connect to backend'"):
            gate.read_overlay_key(["overlay-2"])
    assert [(t["instance"], t["port"], t["zone"]) for t in fake_gcloud.tunnels(cli)] == [
        ("fleet-prod-overlay-1", "3032", gate.plan["outputs"]["nodes"]["overlay-1"]["zone"]),
        ("fleet-prod-overlay-2", "3032", gate.plan["outputs"]["nodes"]["overlay-2"]["zone"])]
    assert timeline(cli) == ["/overlay-1/attest"]
    no_tunnel_left(cli)


def test_a_tunnel_is_stopped_with_its_whole_process_group_also_when_the_read_fails(cli, tmp_path):
    from fleet.cli import tunnel

    with Attestations(cli.parent / "nodes.jsonl") as nodes:
        nodes.served["/n-0/info"] = b"{}"
        env = {**os.environ, **fake_gcloud.install(cli, ROOT, {"instances": {"n-0": {
            "zone": "z-a", "project": "p", "ports": {"8090": nodes.node("n-0")}}}})}
        env["PATH"] = f"{cli / 'bin'}:{env['PATH']}"
        reach = tunnel.Iap(project="p", timeout=5, env=env)
        with pytest.raises(RuntimeError):
            with reach.urls("n-0", {"name": "n-0", "zone": "z-a"}, ["http://10.0.0.9:8090/prpc/Info?json"]) as (url,):
                assert re.fullmatch(r"http://127\.0\.0\.1:\d+/prpc/Info\?json", url)
                assert rollout.fetch(url) == b"{}"
                raise RuntimeError("the read failed")
    (call,) = fake_gcloud.calls(cli)
    assert call["argv"][:4] == ["compute", "start-iap-tunnel", "n-0", "8090"]
    assert call["argv"][5:] == ["--zone=z-a", "--project=p"] and call["argv"][4].startswith("--local-host-port=127.0.0.1:")
    assert call["wrapper"] != call["pid"]  # the wrapper stayed the parent, and both are gone
    no_tunnel_left(cli)


def test_a_terminated_rollout_stops_its_open_tunnel(project, cli, iap_upgrade):
    """SIGTERM (a job's time limit) unwinds the rollout like an error: the tunnel it waits on goes too."""
    nodes, env, plan_file, planned = iap_upgrade
    fake_gcloud.set_routes(cli, {**routes(planned, nodes, "apps", ("8090", "8080")), "hang": ["*"]})
    process = subprocess.Popen([sys.executable, "-m", "fleet", "--root", str(project.root), "rollout", "--stack",
                                "prod", "--plan", str(plan_file)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not fake_gcloud.calls(cli) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert fake_gcloud.calls(cli), "no tunnel was started"
    time.sleep(0.5)
    process.terminate()
    _, err = process.communicate(timeout=60)
    assert process.returncode == 128 + 15, err
    assert calls(cli, "up") == []
    no_tunnel_left(cli)
