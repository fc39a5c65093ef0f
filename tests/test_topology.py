"""Peer lists per topology, the genesis rule, and overlay config errors."""

from __future__ import annotations

import json

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
    assert {n["delivery"] for n in nodes.values()} == {"signed"}
    assert len({n["zone"] for n in nodes.values()}) >= 2
    assert plan.outputs["overlay"]["genesis"] == "overlay-0"


def firewall(plan) -> dict[str, dict]:
    return {r.name: r.inputs for r in plan.resources if r.type == "gcp:compute/firewall:Firewall"}


def test_mesh_firewall_opens_the_overlay_port_between_members_only():
    plan = shipped_plan("prod")
    rules = firewall(plan)
    rule = rules["fw-overlay-peers"]
    assert rule["allows"] == [{"protocol": "udp", "ports": ["5000"]}]
    assert rule["sourceTags"] == rule["targetTags"] == ["fleet-prod-overlay-members"]  # mesh: every pair is an edge
    assert "sourceRanges" not in rule
    instances = {r.name: r for r in plan.resources if r.type == "gcp:compute/instance:Instance"}
    assert "fleet-prod-overlay-members" in instances["overlay-0"].inputs["tags"]
    assert "fleet-prod-overlay-members" not in instances["apps-0"].inputs["tags"]  # dstack nodes stay out


@pytest.mark.parametrize("stack", ["dev", "staging", "prod"])
def test_the_setup_port_is_never_opened_and_the_api_only_through_iap(stack):
    rules = firewall(shipped_plan(stack))
    allowed = {(a["protocol"], port) for r in rules.values() for a in r.get("allows") or [] for port in a.get("ports", [])}
    assert ("tcp", "40080") not in allowed and ("udp", "40080") not in allowed
    (api,) = [r for r in rules.values() if any("3032" in a.get("ports", []) for a in r.get("allows") or [])]
    # IAP TCP forwarding's range (cloud.google.com/iap/docs/using-tcp-forwarding): fleet verify's path
    assert api["sourceRanges"] == ["35.235.240.0/20"] and "sourceTags" not in api
    assert api["targetTags"] == [f"fleet-{stack}-overlay-members"]


@pytest.mark.parametrize("stack", ["dev", "staging", "prod"])
def test_dstack_nodes_admit_the_guest_agent_only_through_iap_and_only_to_their_group(stack):
    # the guest agent's public API on 8090 (Dstack-TEE/dstack guest-agent/dstack.toml [external]); make
    # rollout reads it through IAP TCP forwarding, whose connections come from 35.235.240.0/20
    plan = shipped_plan(stack)
    rules = firewall(plan)
    agent = {name: r for name, r in rules.items() if any("8090" in a.get("ports", []) for a in r.get("allows") or [])}
    instances = [r for r in plan.resources if r.type == "gcp:compute/instance:Instance"]
    groups = sorted({n["group"] for n in plan.outputs["nodes"].values() if n["kind"] == "dstack"})
    assert sorted(agent) == [f"fw-dstack-api-iap-{g}" for g in groups]
    for group in groups:
        rule = agent[f"fw-dstack-api-iap-{group}"]
        assert rule["allows"] == [{"protocol": "tcp", "ports": ["8090"]}] and rule["direction"] == "INGRESS"
        assert rule["sourceRanges"] == ["35.235.240.0/20"] and "sourceTags" not in rule
        (tag,) = rule["targetTags"]
        carriers = {i.name for i in instances if tag in i.inputs["tags"]}
        # every planned instance of the group (a node waiting for its image has none yet), nothing else
        assert carriers == {i.name for i in instances if plan.outputs["nodes"][i.name]["group"] == group}
        assert all(plan.outputs["nodes"][k]["kind"] == "dstack" for k in carriers)
    assert any(agent.values()) == bool(groups)


def test_a_quote_url_on_the_node_opens_its_port_to_iap_too_and_a_gateway_url_nothing(project):
    from fleet.gcp.naming import Namer
    from fleet.nodes.specs import dstack_ingress

    def rollout(quote):
        def change(config):
            config["dstack-fleet:rollout"] = {"reach": "direct", "groups": {"apps": {"quoteUrl": quote}}}
        return change
    project.mutate("prod", "quote", rollout("http://{address}:8080/quote"))
    _, config = load_config(project.root, "quote")
    (rule,) = dstack_ingress(config, Namer("fleet", "quote", config.gcp.project))
    assert (rule.ports, rule.source_ranges, rule.target_tags) == ((8080, 8090), ("35.235.240.0/20",),
                                                                  ("fleet-quote-grp-apps",))
    project.mutate("prod", "gateway", rollout("https://{key}-8080.gateway.example/quote"))
    _, config = load_config(project.root, "gateway")
    (rule,) = dstack_ingress(config, Namer("fleet", "gateway", config.gcp.project))
    assert rule.ports == (8090,)


def test_star_firewall_follows_its_edges():
    # staging: a star of four; the hub (genesis) dials every spoke, every spoke dials the hub
    rules = firewall(shipped_plan("staging"))
    peers = {k: v for k, v in rules.items() if k.startswith("fw-overlay-peers")}
    assert peers["fw-overlay-peers-overlay-0"]["targetTags"] == ["fleet-staging-ovl-overlay-0"]
    assert peers["fw-overlay-peers-overlay-0"]["sourceRanges"] == ["10.20.0.11/32", "10.20.0.12/32", "10.20.0.13/32"]
    assert peers["fw-overlay-peers-overlay-1"]["targetTags"] == [f"fleet-staging-ovl-overlay-{n}" for n in (1, 2, 3)]
    assert peers["fw-overlay-peers-overlay-1"]["sourceRanges"] == ["10.20.0.10/32"]
    assert len(peers) == 2 and all("sourceTags" not in r for r in peers.values())


def test_ring_and_explicit_firewall_admit_exactly_the_dialers():
    from fleet.gcp.naming import Namer
    from fleet.nodes.specs import overlay_ingress

    namer = Namer("fleet", "x", "p")
    ring = overlay_ingress(plan_of("ring"), namer)
    admitted = {i.target_tags: set(i.source_ranges) for i in ring if i.key.startswith("overlay-peers")}
    # in a ring of four, a-0 and a-2 are dialed by a-1 and a-3, and the other way round: two rules
    assert admitted == {("fleet-x-ovl-a-0", "fleet-x-ovl-a-2"): {"10.0.0.11/32", "10.0.0.13/32"},
                        ("fleet-x-ovl-a-1", "fleet-x-ovl-a-3"): {"10.0.0.10/32", "10.0.0.12/32"}}
    explicit = overlay_ingress(plan_of("explicit", explicit={"a-1": ["a-0"], "a-2": ["a-1"], "a-3": ["a-1"]}), namer)
    admitted = {i.target_tags: set(i.source_ranges) for i in explicit if i.key.startswith("overlay-peers")}
    # a-0 is dialed by a-1 only, a-1 by a-2 and a-3; nobody dials a-2 or a-3, so nothing admits traffic to them
    assert admitted == {("fleet-x-ovl-a-0",): {"10.0.0.11/32"}, ("fleet-x-ovl-a-1",): {"10.0.0.12/32", "10.0.0.13/32"}}


def test_big_rings_split_rules_within_gcp_limits():
    from fleet.gcp.naming import Namer
    from fleet.nodes import specs

    keys = [f"a-{i}" for i in range(600)]
    star = OverlayPlan(port=5000, protocol="udp", topology="star", delivery="signed", interface="argv",
                       setup_port=40080, execution_rpc=None, genesis="a-0",
                       members=tuple(Member(k, f"10.1.{i // 250}.{i % 250 + 2}") for i, k in enumerate(keys)),
                       peers=peer_keys("star", keys, "a-0", {}))
    rules = [i for i in specs.overlay_ingress(star, Namer("fleet", "x", "p")) if i.key.startswith("overlay-peers")]
    assert all(len(r.source_ranges) <= specs.MAX_SOURCE_RANGES and len(r.target_tags) <= specs.MAX_TARGET_TAGS
               for r in rules)
    hub = [r for r in rules if r.target_tags == ("fleet-x-ovl-a-0",)]
    assert sum(len(r.source_ranges) for r in hub) == 599 and len({r.key for r in rules}) == len(rules)
    assert sum(len(r.target_tags) for r in rules if r not in hub) == 599


@pytest.mark.parametrize("change,path,message", [
    (lambda o: o.update(topology="explicit", peers={"overlay-1": ["overlay-9"]}),
     "dstack-fleet:overlay.peers.overlay-1[0]", "'overlay-9' is not an overlay node"),
    (lambda o: o.update(topology="explicit", peers={"ghost-0": ["overlay-0"]}),
     "dstack-fleet:overlay.peers.ghost-0", "'ghost-0' is not an overlay node"),
    (lambda o: o.update(topology="explicit", peers={"overlay-1": ["overlay-0"]}),
     "dstack-fleet:overlay.peers", "cannot reach the genesis node"),
    (lambda o: o.update(port=0), "dstack-fleet:overlay.port", "must be at least 1 (got 0)"),
    (lambda o: o.update(port=65536), "dstack-fleet:overlay.port", "must be at most 65535 (got 65536)"),
    (lambda o: o.update(delivery="unsigned"), "dstack-fleet:overlay.delivery", "must be one of"),
    (lambda o: o.update(executionRpc="https://mainnet.infura.io/v3/0123456789abcdef0123456789abcdef"),
     "dstack-fleet:overlay.executionRpc", "looks like an API key"),
    (lambda o: o.update(executionRpc="https://rpc.example/?apikey=x"), "dstack-fleet:overlay.executionRpc",
     "looks like a credential"),
    (lambda o: o.update(executionRpc="https://user:pw@rpc.example"), "dstack-fleet:overlay.executionRpc",
     "carries credentials"),
    (lambda o: o.update(port=3032), "dstack-fleet:overlay.port", "one of the light client's own ports"),
    (lambda o: o.update(genesis="overlay-7"), "dstack-fleet:overlay.genesis", "'overlay-7' is not an overlay node"),
    (lambda o: o.pop("executionRpc"), "dstack-fleet:overlay.executionRpc", "is required by the setup interface"),
    (lambda o: o.update(setupPort=5000), "dstack-fleet:overlay.setupPort", "equals the overlay port"),
    (lambda o: o.update(topology="hypercube"), "dstack-fleet:overlay.topology", "must be one of"),
])
def test_overlay_config_errors(project, change, path, message):
    project.mutate("prod", "badoverlay", lambda c: change(c["dstack-fleet:overlay"]))
    project.assert_config_error("badoverlay", path, message)


@pytest.mark.parametrize("change,path,message", [
    (lambda c: c["dstack-fleet:network"].update(publicIngress=[{"port": 40080, "reason": "x", "groups": ["overlay"]}]),
     "dstack-fleet:network.publicIngress[0].port", "unauthenticated setup endpoint"),
    (lambda c: c["dstack-fleet:network"].update(publicIngress=[{"port": 3032, "reason": "x", "groups": ["overlay"]}]),
     "dstack-fleet:network.publicIngress[0].port", "reached through IAP only"),
    (lambda c: c["dstack-fleet:nodes"][0].update(maxUnavailable=5), "dstack-fleet:nodes[0].maxUnavailable",
     "every one of the overlay's 5 members down at once"),
    # the dstack guest agent's API, like the light client's, is reached through IAP only
    (lambda c: c["dstack-fleet:network"].update(publicIngress=[{"port": 8090, "reason": "x", "groups": ["apps"]}]),
     "dstack-fleet:network.publicIngress[0].port", "the dstack guest agent's API (reached through IAP only) on dstack "
     "groups apps"),
])
def test_overlay_safety_errors(project, change, path, message):
    project.mutate("prod", "badoverlay", change)
    project.assert_config_error("badoverlay", path, message)


def test_a_keyless_rpc_passes():
    from fleet.nodes.checks import rpc_key_problem

    for url in ("https://ethereum-rpc.publicnode.com", "https://ethereum-sepolia-rpc.publicnode.com",
                "http://10.0.0.5:8545/", "https://rpc.example/eth/mainnet"):
        assert rpc_key_problem(url) is None, url
    assert rpc_key_problem("https://eth-mainnet.g.alchemy.com/v2/aBcD1234eFgH5678iJkL") is not None


def test_a_member_table_too_big_for_one_metadata_value_is_refused(project):
    def huge(c):
        c["dstack-fleet:network"]["subnets"]["us-central1"] = "10.30.0.0/16"
        group = c["dstack-fleet:nodes"][0]
        group.update(count=1000, addresses={"offset": 10})
        peers = {f"overlay-{i}": [f"overlay-{j}" for j in range(1000) if j != i][:40] for i in range(1000)}
        c["dstack-fleet:overlay"].update(topology="explicit", peers=peers)
        c["dstack-fleet:nodes"][1]["addresses"] = {"offset": 2000}

    project.mutate("prod", "huge", huge)
    with pytest.raises(ConfigError) as info:
        load_config(project.root, "huge")
    assert any(": dstack-fleet:overlay: the signed member table would be" in l and "at most 262144" in l
               for l in info.value.lines()), info.value.lines()


@pytest.mark.parametrize("old", ["baked", "metadata"])
def test_old_delivery_names_are_aliases_of_signed_with_a_one_line_notice(project, old):
    project.mutate("prod", "alias", lambda c: c["dstack-fleet:overlay"].update(delivery=old))
    plan = build_plan(project.root, "alias")
    assert plan.outputs["overlay"]["delivery"] == "signed"
    notices = {w for w in plan.warnings if f"overlay.delivery '{old}' now means 'signed'" in w}
    assert len(notices) == 1 and "\n" not in next(iter(notices))
    assert not [w for w in shipped_plan("prod").warnings if "overlay.delivery" in w]


def test_members_get_the_signed_table_in_live_metadata():
    plan = shipped_plan("dev")
    instance = next(r for r in plan.resources if r.type == "gcp:compute/instance:Instance" and r.name == "overlay-0")
    assert {"overlay-table", "overlay-table-signature"} <= set(instance.inputs["metadata"])
    assert not {"overlay-peers", "overlay-setup", "overlay-genesis"} & set(instance.inputs["metadata"])
    assert not instance.options["replaceOnChanges"]  # a metadata change is live on GCE
    sign = next(r for r in plan.resources if r.name == "overlay-table-sign")
    assert "--founding" in sign.inputs["create"] and "--founding" not in sign.inputs["update"]


# ---- one image for every stack; membership and settings leave it alone ----------------------------------------

def test_dev_staging_and_prod_plan_the_same_overlay_image():
    hashes = {stack: shipped_plan(stack).outputs["images"]["overlay-3eb04ca"]["contentHash"]
              for stack in ("dev", "staging", "prod")}
    assert len(set(hashes.values())) == 1, hashes
    images = shipped_plan("images").outputs["builds"]["images"]
    overlay = [h for h, b in images.items() if b["recipe"] == "tplus-overlay"]
    assert overlay == [hashes["prod"]]  # built once, for all three


@pytest.mark.parametrize("change", [
    lambda c: c["dstack-fleet:nodes"][0].update(count=9),
    lambda c: c["dstack-fleet:overlay"].update(port=5001, topology="ring"),
    lambda c: c["dstack-fleet:overlay"].update(executionRpc="https://ethereum-sepolia-rpc.publicnode.com"),
    lambda c: c.update({"gcp:project": "acme-tee-elsewhere"}),
])
def test_membership_settings_and_environment_do_not_change_the_overlay_image(project, change):
    project.mutate("prod", "other", change)
    other = build_plan(project.root, "other").outputs["images"]["overlay-3eb04ca"]["contentHash"]
    assert other == shipped_plan("prod").outputs["images"]["overlay-3eb04ca"]["contentHash"]


def test_the_signing_step_follows_the_genesis_data_disk():
    plan = shipped_plan("prod")
    sign = next(r for r in plan.resources if r.name == "overlay-table-sign")
    genesis_disk = next(r.urn for r in plan.resources if r.name == "overlay-0-data")
    assert genesis_disk in sign.dependencies  # a new genesis disk changes the trigger: update, founding closed
    assert contains_unknown(sign.inputs["triggers"])  # the disk's id, known once GCP made it
    assert sign.inputs["stdin"].startswith("stack prod\nproject acme-tee-prod\n")


def test_a_port_change_resets_the_members_in_waves_and_replaces_none(project):
    from fleet.plan import changes

    base = json.loads(build_plan(project.root, "prod").to_json())
    project.mutate("prod", "prod", lambda c: c["dstack-fleet:overlay"].update(port=5001))
    head = json.loads(build_plan(project.root, "prod").to_json())
    groups = changes.rollout(base["resources"], head["resources"], base["outputs"], head["outputs"])
    g = groups["overlay"]
    assert g.replaced == [] and g.stopped == g.reset == [f"overlay-{n}" for n in range(5)]
    assert changes.waves(g, "overlay-0") == [["overlay-1"], ["overlay-2"], ["overlay-3"], ["overlay-4"], ["overlay-0"]]
    command = changes.wave_command(g, ["overlay-2"])
    assert command.endswith("'--pulumi-arg=--target=urn:pulumi:prod::dstack-fleet::dstack-fleet:nodes:OverlayNode$"
                            "command:local:Command::overlay-2-apply-table'")
    reset = next(r for r in head["resources"] if r["name"] == "overlay-2-apply-table")
    assert reset["inputs"]["update"] == ("gcloud compute instances reset fleet-prod-overlay-2 --zone us-central1-c "
                                         "--project acme-tee-prod --quiet")
