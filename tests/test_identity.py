"""Stable identity: a node's URN, address, zone and disk never move when something else changes."""

from __future__ import annotations

import pytest

from fleet.plan.planner import build_plan

INSTANCE = "gcp:compute/instance:Instance"


def node_facts(plan) -> dict[str, dict]:
    """Per node key: its instance URN, address, zone and data-disk URN and name."""
    facts: dict[str, dict] = {}
    for r in plan.resources:
        if r.type == INSTANCE:
            facts.setdefault(r.name, {})["instance"] = (r.urn, r.inputs["zone"], r.inputs["name"])
        elif r.type == "gcp:compute/address:Address" and r.name.endswith("-address"):
            facts.setdefault(r.name[: -len("-address")], {})["address"] = (r.urn, r.inputs["address"])
        elif r.type == "gcp:compute/disk:Disk":
            facts.setdefault(r.name[: -len("-data")], {})["disk"] = (r.urn, r.inputs["name"], r.inputs["zone"])
    return facts


def second_group(count=2, offset=100):
    return {"name": "second", "kind": "overlay", "count": count, "zones": ["us-central1-b", "us-central1-c"],
            "addresses": {"offset": offset}, "image": "overlay-3eb04ca"}


def assert_unmoved(before, after, keys):
    for key in keys:
        assert after[key] == before[key], f"node {key} moved"


@pytest.fixture
def base(project):
    project.mutate("prod", "base", lambda c: c["dstack-fleet:nodes"].append(second_group()))
    return node_facts(build_plan(project.root, "base"))


def test_growing_another_group_moves_no_node(project, base):
    project.mutate("prod", "base", lambda c: c["dstack-fleet:nodes"].append(second_group(count=7)))
    after = node_facts(build_plan(project.root, "base"))
    assert_unmoved(base, after, base)
    assert {"second-2", "second-6"} <= set(after)


def test_growing_the_first_group_moves_no_node(project, base):
    def change(c):
        c["dstack-fleet:nodes"][0]["count"] = 8
        c["dstack-fleet:nodes"].append(second_group())

    project.mutate("prod", "base", change)
    after = node_facts(build_plan(project.root, "base"))
    assert_unmoved(base, after, base)
    assert {"overlay-5", "overlay-7"} <= set(after)


def test_retiring_a_middle_node_moves_no_other_node(project, base):
    def change(c):
        c["dstack-fleet:nodes"][0]["retired"] = [2]
        c["dstack-fleet:nodes"].append(second_group())

    project.mutate("prod", "base", change)
    after = node_facts(build_plan(project.root, "base"))
    assert "overlay-2" not in after
    assert_unmoved(base, after, [k for k in base if k != "overlay-2"])


def test_appending_a_zone_with_first_ordinal_moves_no_node(project, base):
    def change(c):
        c["dstack-fleet:nodes"].append(dict(second_group(), zones=[
            "us-central1-b", "us-central1-c", {"zone": "us-central1-a", "firstOrdinal": 2}], count=4))

    project.mutate("prod", "base", change)
    after = node_facts(build_plan(project.root, "base"))
    assert_unmoved(base, after, base)
    zones = {k: after[k]["instance"][1] for k in ("second-2", "second-3")}
    assert "us-central1-a" in zones.values()  # new ordinals use the appended zone


def test_reordering_zones_would_move_nodes(project, base):
    def change(c):
        c["dstack-fleet:nodes"].append(second_group())
        c["dstack-fleet:nodes"][0]["zones"] = ["us-central1-a", "us-central1-c", "us-central1-b"]  # reordered

    project.mutate("prod", "base", change)
    after = node_facts(build_plan(project.root, "base"))
    assert after["overlay-1"]["instance"][1] != base["overlay-1"]["instance"][1]


def test_zone_comes_from_the_ordinal_not_the_count(project):
    plan = build_plan(project.root, "prod")
    facts = node_facts(plan)
    zones = [facts[f"overlay-{n}"]["instance"][1] for n in range(5)]
    assert zones == ["us-central1-a", "us-central1-b", "us-central1-c", "us-central1-a", "us-central1-b"]
    addresses = [facts[f"overlay-{n}"]["address"][1] for n in range(5)]
    assert addresses == [f"10.30.0.{10 + n}" for n in range(5)]


def test_instances_depend_on_their_own_address_and_disk(project):
    plan = build_plan(project.root, "prod")
    by_name = {r.name: r for r in plan.resources}
    for n in range(5):
        instance = next(r for r in plan.resources if r.type == INSTANCE and r.name == f"overlay-{n}")
        assert by_name[f"overlay-{n}-address"].urn in instance.dependencies
        assert by_name[f"overlay-{n}-data"].urn in instance.dependencies
        assert instance.options["deleteBeforeReplace"] is True and not instance.options["protect"]


def test_pinned_addresses(project):
    pins = ["10.30.1.5", "10.30.1.9", "10.30.2.1", "10.30.2.2", "10.30.2.3"]
    project.mutate("prod", "pinned", lambda c: c["dstack-fleet:nodes"][0].update(addresses={"pins": pins}))
    facts = node_facts(build_plan(project.root, "pinned"))
    assert [facts[f"overlay-{n}"]["address"][1] for n in range(5)] == pins
