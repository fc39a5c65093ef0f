"""The mock harness: engine-faithful URNs, every option and dependency, secrets, unknowns, and
failures inside apply() in either pass."""

from __future__ import annotations

from pathlib import Path

import pulumi
import pulumi_gcp as gcp
import pytest
from pulumi.runtime import mocks as pulumi_mocks

from fleet.plan import offline
from fleet.plan.harness import DuplicateUrnError, engine_urn, run_program
from fleet.config.values import SECRET_MARK, UNKNOWN, Secret, display


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "Pulumi.yaml").write_text("name: demo\nruntime: python\n")
    return tmp_path


class Outer(pulumi.ComponentResource):
    def __init__(self, name, opts=None):
        super().__init__("demo:index:Outer", name, {}, opts)
        self.inner = Inner(f"{name}-inner", pulumi.ResourceOptions(parent=self))
        self.register_outputs({"link": self.inner.net.self_link})


class Inner(pulumi.ComponentResource):
    def __init__(self, name, opts=None):
        super().__init__("demo:index:Inner", name, {}, opts)
        self.net = gcp.compute.Network(f"{name}-net", auto_create_subnetworks=False,
                                       opts=pulumi.ResourceOptions(parent=self))
        self.register_outputs({})


def test_urns_three_levels_deep_match_the_engine(root):
    seen = {}

    def program():
        outer = Outer("a")
        seen["sdk"] = pulumi.resource.create_urn("a-inner-net", "gcp:compute/network:Network", parent=outer.inner)
        pulumi.export("sdk_urn", seen["sdk"])

    run = run_program(root, stack="s", config={}, preview=False, program=program)
    urns = [r.urn for r in run.resources]
    expected = ("urn:pulumi:s::demo::demo:index:Outer$demo:index:Inner$gcp:compute/network:Network::a-inner-net")
    assert expected in urns
    assert run.outputs["sdk_urn"] == expected
    assert "urn:pulumi:s::demo::demo:index:Outer::a" in urns  # no pulumi:pulumi:Stack$ prefix
    # the stock mock monitor keeps only the last parent type (why the harness overrides it)
    stock = pulumi_mocks.MockMonitor(None)
    assert "Outer$" not in stock.make_urn("urn:pulumi:s::demo::demo:index:Outer$demo:index:Inner::x", "t:m:R", "n")
    assert engine_urn("s", "demo", "urn:pulumi:s::demo::demo:index:Outer$demo:index:Inner::x", "t:m:R", "n") == (
        "urn:pulumi:s::demo::demo:index:Outer$demo:index:Inner$t:m:R::n")


def test_component_records_parent_custom_and_outputs(root):
    run = run_program(root, stack="s", config={}, preview=False, program=lambda: Outer("a"))
    by = run.by_urn()
    outer = by["urn:pulumi:s::demo::demo:index:Outer::a"]
    inner = by["urn:pulumi:s::demo::demo:index:Outer$demo:index:Inner::a-inner"]
    assert outer.custom is False and outer.parent is None
    assert inner.parent == outer.urn
    assert outer.outputs == {"link": "https://www.googleapis.com/compute/v1/projects/demo/global/networks/a-inner-net"}


def test_duplicate_urn_fails(root):
    def program():
        gcp.compute.Network("same", auto_create_subnetworks=False)
        gcp.compute.Network("same", auto_create_subnetworks=False)

    with pytest.raises(Exception) as info:
        run_program(root, stack="s", config={}, preview=True, program=program)
    assert isinstance(info.value, DuplicateUrnError) or "duplicate URN" in str(info.value)


def test_options_are_captured(root):
    def program():
        gcp.compute.Network("plain", auto_create_subnetworks=False)
        gcp.compute.Network("opts", auto_create_subnetworks=False, opts=pulumi.ResourceOptions(
            protect=True, retain_on_delete=True, delete_before_replace=True,
            ignore_changes=["description"], replace_on_changes=["mtu"]))

    run = run_program(root, stack="s", config={}, preview=True, program=program)
    by = {r.name: r for r in run.resources}
    assert by["plain"].options == {"protect": None, "retainOnDelete": None, "deleteBeforeReplace": None,
                                   "ignoreChanges": [], "replaceOnChanges": [], "import": None}
    assert by["opts"].options == {"protect": True, "retainOnDelete": True, "deleteBeforeReplace": True,
                                  "ignoreChanges": ["description"], "replaceOnChanges": ["mtu"], "import": None}


def test_dependencies_implicit_and_through_components(root):
    def program():
        outer = Outer("a")
        net = gcp.compute.Network("n", auto_create_subnetworks=False)
        gcp.compute.Subnetwork("sub", network=net.id, ip_cidr_range="10.0.0.0/24", region="us-central1",
                               opts=pulumi.ResourceOptions(depends_on=[outer]))

    for preview in (True, False):
        run = run_program(root, stack="s", config={}, preview=preview, program=program)
        sub = {r.name: r for r in run.resources}["sub"]
        assert sub.dependencies == sorted([
            "urn:pulumi:s::demo::gcp:compute/network:Network::n",
            "urn:pulumi:s::demo::demo:index:Outer$demo:index:Inner$gcp:compute/network:Network::a-inner-net",
        ])
        assert sub.property_dependencies["network"] == ["urn:pulumi:s::demo::gcp:compute/network:Network::n"]


def test_preview_leaves_computed_outputs_unknown_and_update_fills_them(root):
    def program():
        net = gcp.compute.Network("n", name="net-a", auto_create_subnetworks=False)
        gcp.compute.Subnetwork("sub", network=net.self_link, ip_cidr_range="10.0.0.0/24", region="us-central1")
        pulumi.export("link", net.self_link)
        pulumi.export("name", net.name)

    preview = run_program(root, stack="s", config={}, preview=True, program=program)
    update = run_program(root, stack="s", config={}, preview=False, program=program)
    assert preview.outputs == {"link": UNKNOWN, "name": "net-a"}
    assert {r.name: r for r in preview.resources}["sub"].inputs["network"] is UNKNOWN
    link = "https://www.googleapis.com/compute/v1/projects/demo/global/networks/net-a"
    assert update.outputs == {"link": link, "name": "net-a"}
    assert {r.name: r for r in update.resources}["sub"].inputs["network"] == link
    again = run_program(root, stack="s", config={}, preview=False, program=program)
    assert [r.inputs for r in again.resources] == [r.inputs for r in update.resources]


def test_exception_in_apply_on_known_value_fails_both_passes(root):
    def program():
        net = gcp.compute.Network("n", name="net-a", auto_create_subnetworks=False)
        net.name.apply(lambda _: (_ for _ in ()).throw(ValueError("boom in apply")))

    for preview in (True, False):
        with pytest.raises(ValueError, match="boom in apply"):
            run_program(root, stack="s", config={}, preview=preview, program=program)


def test_exception_in_apply_on_computed_value_fails_the_update_pass(root):
    """In preview an apply over an unknown never runs, which is why the plan has an update pass."""
    def program():
        net = gcp.compute.Network("n", name="net-a", auto_create_subnetworks=False)
        net.self_link.apply(lambda _: (_ for _ in ()).throw(ValueError("boom on self link")))

    run_program(root, stack="s", config={}, preview=True, program=program)
    with pytest.raises(ValueError, match="boom on self link"):
        run_program(root, stack="s", config={}, preview=False, program=program)


def test_secrets_are_marked_and_never_displayed(root):
    canary = "canary-1d3e-secret"

    def program():
        net = gcp.compute.Network("n", name="net-a", description=pulumi.Output.secret(canary),
                                  auto_create_subnetworks=False)
        pulumi.export("secret", pulumi.Output.secret(canary))
        pulumi.export("derived", net.description)

    run = run_program(root, stack="s", config={}, preview=True, program=program)
    net = run.resources[0]
    assert net.inputs["description"] == Secret(canary)
    assert display(net.inputs)["description"] == SECRET_MARK
    assert display(run.outputs) == {"secret": SECRET_MARK, "derived": SECRET_MARK}
    assert canary not in repr(display(run.outputs)) + repr(display(net.inputs))


def test_resource_type_without_offline_entry_fails_loudly(root):
    def program():
        gcp.pubsub.Topic("t")

    run_program(root, stack="s", config={}, preview=True, program=program)  # preview needs no stand-ins
    assert "gcp:pubsub/topic:Topic" not in offline.COMPUTED
    with pytest.raises(Exception, match="has no entry in fleet/plan/offline.py COMPUTED"):
        run_program(root, stack="s", config={}, preview=False, program=program)


def test_logged_errors_fail_the_run(root):
    from fleet.plan.harness import ProgramError

    def program():
        pulumi.log.error("something is wrong")

    with pytest.raises(ProgramError, match="something is wrong"):
        run_program(root, stack="s", config={}, preview=True, program=program)


def test_warnings_are_collected(root):
    run = run_program(root, stack="s", config={}, preview=True, program=lambda: pulumi.log.warn("heads up"))
    assert run.warnings == ["heads up"]


def test_config_and_settings_are_fresh_per_run(root):
    def program():
        pulumi.export("v", pulumi.Config("demo").get("value"))

    first = run_program(root, stack="one", config={"demo:value": "1"}, preview=True, program=program)
    second = run_program(root, stack="two", config={}, preview=True, program=program)
    assert first.outputs == {"v": "1"} and "v" not in second.outputs or second.outputs["v"] is None
    assert all(r.urn.startswith("urn:pulumi:two::") for r in second.resources)
