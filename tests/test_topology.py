"""Peer lists per topology, the genesis rule, and overlay config errors."""

from __future__ import annotations

import pytest

from fleet.plan.planner import build_plan
from fleet.stacks.load import load_config
from fleet.config.problems import ConfigError
from fleet.nodes.topology import Member, OverlayPlan, peer_keys, reachable_from_genesis
from fleet.config.values import contains_unknown
from tests.plans import shipped_plan

KEYS = ["a-0", "a-1", "a-2", "a-3"]


def test_mesh():
    peers = peer_keys("mesh", KEYS, "a-0", {})
    assert peers["a-2"] == ("a-0", "a-1", "a-3")
    assert all(k not in v for k, v in peers.items())


def test_ring():
    peers = peer_keys("ring", KEYS, "a-0", {})
    assert peers == {"a-0": ("a-3", "a-1"), "a-1": ("a-0", "a-2"), "a-2": ("a-1", "a-3"), "a-3": ("a-2", "a-0")}
    assert peer_keys("ring", ["x-0", "x-1"], "x-0", {}) == {"x-0": ("x-1",), "x-1": ("x-0",)}
    assert peer_keys("ring", ["x-0"], "x-0", {}) == {"x-0": ()}


def test_star_has_one_genesis_hub():
    peers = peer_keys("star", KEYS, "a-1", {})
    assert peers["a-1"] == ("a-0", "a-2", "a-3")
    assert all(peers[k] == ("a-1",) for k in KEYS if k != "a-1")


def plan_of(topology, genesis="a-0", explicit=None):
    return OverlayPlan(port=5000, protocol="udp", topology=topology, delivery="baked", interface="argv",
                       setup_port=40080, execution_rpc=None, genesis=genesis,
                       members=tuple(Member(k, f"10.0.0.{i + 10}") for i, k in enumerate(KEYS)),
                       peers=peer_keys(topology, KEYS, genesis, explicit or {}))


@pytest.mark.parametrize("topology", ["mesh", "ring", "star"])
def test_only_the_genesis_node_starts_without_peers_and_only_when_founding(topology):
    plan = plan_of(topology)
    assert plan.first_boot_peers("a-0") == []
    for key in KEYS:
        assert plan.peer_endpoints(key), f"{key} restarts without peers"
        if key != "a-0":
            assert plan.first_boot_peers(key) == plan.peer_endpoints(key)
    assert reachable_from_genesis(plan) == set(KEYS)


def test_explicit_topology_reachability():
    plan = plan_of("explicit", explicit={"a-1": ["a-0"], "a-2": ["a-1"], "a-3": []})
    assert reachable_from_genesis(plan) == {"a-0", "a-1", "a-2"}


def test_node_outputs_show_every_peer_list_at_plan_time():
    plan = build_plan(__import__("tests.conftest", fromlist=["ROOT"]).ROOT, "prod")
    nodes = {k: v for k, v in plan.outputs["nodes"].items() if v["kind"] == "overlay"}
    assert len(nodes) == 5 and not contains_unknown(plan.outputs["nodes"])
    assert nodes["overlay-3"]["peers"] == ["10.30.0.10:5000", "10.30.0.11:5000", "10.30.0.12:5000",
                                           "10.30.0.14:5000"]
    assert {n["delivery"] for n in nodes.values()} == {"baked"}
    assert len({n["zone"] for n in nodes.values()}) >= 2
    assert plan.outputs["overlay"]["genesis"] == "overlay-0"


def test_firewall_opens_only_the_overlay_port_between_overlay_nodes():
    from tests.conftest import ROOT

    plan = shipped_plan("prod")
    (rule,) = [r for r in plan.resources if r.name == "fw-overlay-peers"]
    assert rule.inputs["allows"] == [{"protocol": "udp", "ports": ["5000"]}]
    assert rule.inputs["sourceTags"] == rule.inputs["targetTags"] == ["fleet-prod-overlay-members"]
    assert "sourceRanges" not in rule.inputs
    instances = {r.name: r for r in plan.resources if r.type == "gcp:compute/instance:Instance"}
    assert "fleet-prod-overlay-members" in instances["overlay-0"].inputs["tags"]
    assert "fleet-prod-overlay-members" not in instances["apps-0"].inputs["tags"]  # dstack nodes stay out


@pytest.mark.parametrize("change,path,message", [
    (lambda o: o.update(topology="explicit", peers={"overlay-1": ["overlay-9"]}),
     "dstack-fleet:overlay.peers.overlay-1[0]", "'overlay-9' is not an overlay node"),
    (lambda o: o.update(topology="explicit", peers={"ghost-0": ["overlay-0"]}),
     "dstack-fleet:overlay.peers.ghost-0", "'ghost-0' is not an overlay node"),
    (lambda o: o.update(topology="explicit", peers={"overlay-1": ["overlay-0"]}),
     "dstack-fleet:overlay.peers", "cannot reach the genesis node"),
    (lambda o: o.update(port=0), "dstack-fleet:overlay.port", "must be at least 1 (got 0)"),
    (lambda o: o.update(port=65536), "dstack-fleet:overlay.port", "must be at most 65535 (got 65536)"),
    (lambda o: o.update(delivery="metadata"), "dstack-fleet:overlay.delivery", "refused in prod"),
    (lambda o: o.update(genesis="overlay-7"), "dstack-fleet:overlay.genesis", "'overlay-7' is not an overlay node"),
    (lambda o: o.pop("executionRpc"), "dstack-fleet:overlay.executionRpc", "is required by the setup interface"),
    (lambda o: o.update(setupPort=5000), "dstack-fleet:overlay.setupPort", "equals the overlay port"),
    (lambda o: o.update(topology="hypercube"), "dstack-fleet:overlay.topology", "must be one of"),
])
def test_overlay_config_errors(project, change, path, message):
    project.mutate("prod", "badoverlay", lambda c: change(c["dstack-fleet:overlay"]))
    with pytest.raises(ConfigError) as info:
        load_config(project.root, "badoverlay")
    lines = [l for l in info.value.lines() if f": {path}: " in l]
    assert lines and any(message in l for l in lines), info.value.lines()


def test_metadata_delivery_is_allowed_outside_prod_and_marked(project):
    from tests.conftest import ROOT

    plan = shipped_plan("dev")
    assert plan.outputs["overlay"]["delivery"] == "metadata"
    instance = next(r for r in plan.resources if r.type == "gcp:compute/instance:Instance" and r.name == "overlay-0")
    assert instance.inputs["metadata"]["overlay-genesis"] in ("true", "false")
    assert instance.options["replaceOnChanges"] == ["metadata"]
