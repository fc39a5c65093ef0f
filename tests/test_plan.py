"""The offline plan of every stack: both passes, JSON shape, byte stability, golden URNs, secrets."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import fleet.nodes.network
from fleet.plan.planner import PlanFailed, build_plan, render_markdown, render_text
from fleet.config.stackfile import available_stacks
from fleet.config.values import UNKNOWN, contains_unknown
from tests.plans import shipped_plan

from .conftest import ROOT
from .regenerate import golden_files

STACKS = available_stacks(ROOT)


@pytest.fixture(scope="module")
def plans():
    return {stack: shipped_plan(stack) for stack in STACKS}


def test_shipped_stacks(plans):
    assert {"dev", "staging", "prod", "images"} <= set(plans)


@pytest.mark.parametrize("stack", STACKS)
def test_plan_json_shape(plans, stack):
    document = json.loads(plans[stack].to_json())
    assert document["project"] == "dstack-fleet" and document["stack"] == stack
    assert {"resources", "outputs", "measurements", "violations"} <= set(document)
    assert document["resources"], "every stack plans at least its network"
    for r in document["resources"]:
        assert set(r) == {"urn", "type", "name", "parent", "custom", "inputs", "dependencies",
                          "propertyDependencies", "options"}
        assert set(r["options"]) >= {"protect", "retainOnDelete", "deleteBeforeReplace", "ignoreChanges",
                                     "replaceOnChanges"}
        assert r["urn"].startswith(f"urn:pulumi:{stack}::dstack-fleet::")
        assert r["urn"].endswith("::" + r["name"])
    urns = [r["urn"] for r in document["resources"]]
    assert urns == sorted(urns) and len(set(urns)) == len(urns)


@pytest.mark.parametrize("stack", STACKS)
def test_plan_json_is_byte_identical_across_runs(plans, stack):
    assert build_plan(ROOT, stack).to_json() == plans[stack].to_json()


@pytest.mark.parametrize("stack", STACKS)
def test_update_pass_resolves_every_computed_input(plans, stack):
    """Every value unknown in the preview pass has a stand-in in the update pass, so no input and
    no dependency edge is silently dropped (a mock that returned nothing would drop them)."""
    plan = plans[stack]
    update = plan.update_run.by_urn()
    assert set(update) == {r.urn for r in plan.resources}
    for r in plan.resources:
        u = update[r.urn]
        assert not contains_unknown(u.inputs), r.urn
        assert _paths(u.inputs) >= _paths(r.inputs), r.urn
        assert u.dependencies == r.dependencies, r.urn
    assert not contains_unknown(plan.update_run.outputs)


def _paths(value, prefix=""):
    out = set()
    if isinstance(value, dict):
        for k, v in value.items():
            out.add(f"{prefix}.{k}")
            out |= _paths(v, f"{prefix}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out |= _paths(v, f"{prefix}[{i}]")
    return out


def test_preview_pass_keeps_provider_values_unknown(plans):
    network = next(r for r in plans["dev"].resources if r.type == "gcp:compute/subnetwork:Subnetwork")
    assert network.inputs["network"] is UNKNOWN
    assert plans["dev"].outputs["network"] is UNKNOWN


def test_seeded_exception_inside_a_component_apply_fails_the_plan(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("seeded failure in describe_subnets")

    # components.network binds the function at import: patch it there first, so that importing it
    # here does not bind (and later "restore") the broken one
    monkeypatch.setattr("components.network.describe_subnets", broken, raising=False)
    monkeypatch.setattr(fleet.nodes.network, "describe_subnets", broken)
    with pytest.raises(PlanFailed) as info:
        build_plan(ROOT, "dev")
    assert info.value.phase == "update"
    assert "seeded failure in describe_subnets" in str(info.value)


@pytest.mark.parametrize("stack", STACKS)
def test_golden_files_are_current(stack):
    files = {path.name: text for path, text in golden_files(ROOT, [stack], shipped_plan).items()}
    for name in (f"{stack}.urns", f"{stack}.plan.json"):
        committed = (ROOT / "tests" / "golden" / name)
        assert committed.exists(), f"tests/golden/{name} is missing: run `make golden`"
        assert committed.read_text() == files[name], (
            f"tests/golden/{name} is stale: a change renamed, added or removed resources or changed "
            "their inputs. Review the difference and run `make golden`.")


def test_canary_secret_never_appears_in_plan_text_or_json(project):
    """The canary is a real input of a resource (the Phala API key in the deploy step's environment),
    so a leak anywhere in the plan would show it."""
    import json as _json

    from fleet.config.values import Secret, reveal

    from .conftest import lock_hello_container

    canary = "canary-5b8f0e2d-must-not-leak"
    lock_hello_container(project)
    plan = build_plan(project.root, "dev", secret_overrides={"dstack-fleet:secrets": {"phalaApiKey": canary}})
    carriers = [r for r in plan.resources if canary in _json.dumps(reveal(r.inputs), default=str)]
    assert carriers, "the canary must reach a resource for this test to mean anything"
    assert all(any(isinstance(v, Secret) for v in r.inputs.get("environment", {}).values()) for r in carriers)
    assert canary not in plan.to_json()
    assert canary not in render_text(plan)
    assert canary not in render_markdown(plan)
    assert all(canary not in w for w in plan.warnings)


def test_text_output_shows_the_tree_counts_and_outputs(plans):
    text = render_text(plans["dev"])
    assert "├─ network  (dstack-fleet:network:Network)" in text
    assert "│  ├─ fw-deny-all-ingress  (gcp:compute/firewall:Firewall)" in text
    assert "Counts by type:" in text and "gcp:compute/subnetwork:Subnetwork" in text
    assert '"network": "<computed>"' not in text  # the outputs' JSON only with --verbose
    assert '"network": "<computed>"' in render_text(plans["dev"], verbose=True)


def test_a_reviewer_sees_every_node_within_the_first_80_lines_of_prod(plans):
    lines = render_text(plans["prod"]).splitlines()
    start = lines.index("Nodes (7):")
    table = lines[start + 1:start + 9]
    assert start + 8 < 80
    assert table[0].split() == ["group", "#", "zone", "address", "image", "status", "peers", "expected", "measurements"]
    overlay0 = next(line.split() for line in table if line.split()[:2] == ["overlay", "0"])
    node = plans["prod"].outputs["nodes"]["overlay-0"]
    assert overlay0[2:6] == [node["zone"], node["address"], node["image"], node["imageStatus"]]
    assert overlay0[6] == str(len(node["peers"]))


def test_repeated_components_are_one_line_unless_verbose(plans):
    text, verbose = render_text(plans["prod"]), render_text(plans["prod"], verbose=True)
    assert "overlay-0  (dstack-fleet:nodes:OverlayNode)  5 resources: apply-table, address, data, snapshots, overlay-0" in text
    assert "overlay-0-address  (gcp:compute/address:Address)" not in text
    assert "overlay-0-address  (gcp:compute/address:Address)" in verbose


def test_identical_findings_are_one_line_with_a_count_and_the_names(plans):
    plan = plans["prod"]
    pending = [v for v in plan.violations if v["message"].startswith("pending:")]
    assert len(pending) == 7
    lines = [line for line in render_text(plan).splitlines() if "tdx-only" in line]
    assert len(lines) == 1 and lines[0].startswith("  - [advisory] tdx-only ×7: pending:")
    assert lines[0].endswith("apps-0, apps-1, overlay-0, overlay-1, overlay-2, overlay-3, overlay-4")


def test_markdown_output(plans):
    md = render_markdown(plans["prod"])
    assert md.startswith("## dstack-fleet plan: `prod`")
    assert "| `gcp:compute/network:Network` | 1 |" in md
    sections = [line for line in md.splitlines() if line.startswith("### ")]
    assert sections == ["### Resources", "### Nodes", "### Apps", "### Warnings", "### Policy violations"]
    assert "| advisory | tdx-only | 7: `apps-0`, `apps-1`," in md


def test_make_plan_dev_prints_the_tree():
    result = subprocess.run(["make", "-s", "plan", "STACK=dev", "PY_DEPS=", f"PY={sys.executable}"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "dstack-fleet plan: stack dev" in result.stdout
    assert "(dstack-fleet:network:Network)" in result.stdout


def test_make_plan_prod_writes_json(tmp_path):
    out = tmp_path / "prod.json"
    result = subprocess.run(["make", "-s", "plan", "STACK=prod", f"PLAN_JSON={out}", "PY_DEPS=",
                             f"PY={sys.executable}"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    document = json.loads(out.read_text())
    assert {"project", "stack", "resources", "outputs", "measurements", "violations"} <= set(document)
    assert document["stack"] == "prod"


def test_make_plan_unknown_stack_exits_2():
    result = subprocess.run(["make", "-s", "plan", "STACK=nosuchstack", "PY_DEPS=", f"PY={sys.executable}"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2
    assert "stacks/Pulumi.nosuchstack.yaml: no such stack file" in result.stderr
    assert "Traceback" not in result.stderr


def test_make_plan_exits_1_on_a_mandatory_violation_naming_rule_and_resource(project):
    """A prebuilt GCE image is accepted by the config but not known to be TDX-capable: tdx-only,
    mandatory in prod, fails the plan with exit 1 (make passes the tool's own code through)."""
    def change(c):
        c["dstack-fleet:images"]["legacy"] = {"prebuilt": {"image": {
            "selfLink": "projects/acme-legacy/global/images/overlay-v1"}}}
        c["dstack-fleet:nodes"][0]["imageOverrides"] = {0: "legacy"}

    project.mutate("prod", "prod", change)
    result = subprocess.run(["make", "-s", "plan", "STACK=prod", f"FLEET_ROOT={project.root}", "PY_DEPS=",
                             f"PY={sys.executable}"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr
    assert "[mandatory] tdx-only: urn:pulumi:prod::dstack-fleet::dstack-fleet:nodes:OverlayNode" in result.stdout
    assert "::overlay-0:" in result.stdout
