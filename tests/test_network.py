"""The network: custom subnets per region, NAT egress, and ingress only where declared."""

from __future__ import annotations

import pytest

from fleet.stacks import load as fleet_config
from fleet.gcp.naming import Namer
from fleet.nodes.network import Ingress, network_spec, public_ingress
from fleet.plan.planner import build_plan
from tests.plans import shipped_plan

from .conftest import ROOT, stack_config


def _config(raw, stack="prod"):
    return fleet_config.load(raw, stack=stack, source=f"stacks/Pulumi.{stack}.yaml")


def test_ingress_without_source_or_target_is_refused():
    with pytest.raises(ValueError, match="no source"):
        Ingress(key="x", description="", protocol="tcp", ports=(1,), target_tags=("a",))
    with pytest.raises(ValueError, match="no target tags"):
        Ingress(key="x", description="", protocol="tcp", ports=(1,), target_tags=(), source_tags=("a",))


def test_only_declared_ingress_and_a_logged_deny_all():
    raw = stack_config("prod")
    config = _config(raw)
    namer = Namer("fleet", "prod", config.gcp.project)
    declared = Ingress(key="peers", description="peers", protocol="udp", ports=(5000,),
                       target_tags=("fleet-prod-overlay",), source_tags=("fleet-prod-overlay",))
    spec = network_spec(config, namer, [declared])
    allows = [r for r in spec.rules if r.action == "allow"]
    denies = [r for r in spec.rules if r.action == "deny"]
    assert [r.key for r in allows] == ["fw-peers"]
    assert allows[0].source_ranges == () and allows[0].source_tags == ("fleet-prod-overlay",)
    assert len(denies) == 1 and denies[0].source_ranges == ("0.0.0.0/0",) and denies[0].log
    assert denies[0].priority > max(r.priority for r in allows)


def test_public_ingress_only_for_declared_ports():
    raw = stack_config("prod")
    raw["dstack-fleet:network"]["publicIngress"] = [{"port": 443, "reason": "app TLS", "groups": ["overlay"]}]
    config = _config(raw)
    rules = public_ingress(config, Namer("fleet", "prod", config.gcp.project))
    assert [(r.ports, r.source_ranges, r.target_tags) for r in rules] == [
        ((443,), ("0.0.0.0/0",), ("fleet-prod-grp-overlay",))]


def test_one_subnet_router_and_nat_per_region_in_the_plan():
    plan = shipped_plan("prod")
    subnets = [r for r in plan.resources if r.type == "gcp:compute/subnetwork:Subnetwork"]
    nats = [r for r in plan.resources if r.type == "gcp:compute/routerNat:RouterNat"]
    assert [s.inputs["region"] for s in subnets] == ["us-central1"]
    assert all(s.inputs["privateIpGoogleAccess"] is True for s in subnets)
    assert [n.inputs["region"] for n in nats] == ["us-central1"]
    assert nats[0].inputs["sourceSubnetworkIpRangesToNat"] == "LIST_OF_SUBNETWORKS"
    vpc = next(r for r in plan.resources if r.type == "gcp:compute/network:Network")
    assert vpc.inputs["autoCreateSubnetworks"] is False
    for fw in (r for r in plan.resources if r.type == "gcp:compute/firewall:Firewall"):
        if "allows" in fw.inputs:
            assert "0.0.0.0/0" not in fw.inputs.get("sourceRanges", [])


def test_a_second_region_gets_its_own_subnet_and_nat(project):
    def change(c):
        c["dstack-fleet:network"]["subnets"]["europe-west4"] = "10.31.0.0/20"
        c["dstack-fleet:nodes"].append({"name": "eu", "kind": "overlay", "count": 2, "zones": ["europe-west4-a"],
                                        "addresses": {"offset": 10}, "image": "overlay-3eb04ca"})

    project.mutate("prod", "tworegions", change)
    plan = build_plan(project.root, "tworegions")
    nats = sorted(r.inputs["region"] for r in plan.resources if r.type == "gcp:compute/routerNat:RouterNat")
    assert nats == ["europe-west4", "us-central1"]
