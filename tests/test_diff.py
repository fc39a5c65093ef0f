"""fleet diff: Markdown of two offline plans, the base planned with its own code."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fleet.plan import diff
from fleet.plan.planner import build_plan

from .conftest import ROOT
from .test_images import lock_all

GOLDEN_DIFF = ROOT / "tests" / "golden" / "diff"


def doc(plan) -> dict:
    return json.loads(plan.to_json())


def compare(base_doc, head_doc, stack="prod", ref="base"):
    return diff.compare(stack, ref, diff.PlanResult(base_doc), head_doc)


@pytest.fixture(scope="module")
def prod_doc():
    return json.loads((ROOT / "tests" / "golden" / "prod.plan.json").read_text())


def new_machine_type(prod_doc, group: str):
    """``prod_doc`` with every instance of ``group`` on another machine type (each of them stops)."""
    head = copy.deepcopy(prod_doc)
    for r in head["resources"]:
        if r["type"] == "gcp:compute/instance:Instance" and r["inputs"]["labels"]["group"] == group:
            r["inputs"]["machineType"] = "c3-standard-22"
    return head


def known_change(prod_doc):
    """The golden example: the overlay group's machine type changes (every overlay node stops)."""
    return new_machine_type(prod_doc, "overlay")


BAKED_PROD = ROOT / "tests" / "vectors" / "prod-baked-overlay.plan.json"  # prod before signed tables (f8a08f7)


def golden_diff_files() -> dict[Path, str]:
    prod_doc = json.loads((ROOT / "tests" / "golden" / "prod.plan.json").read_text())
    baked = json.loads(BAKED_PROD.read_text())
    return {GOLDEN_DIFF / "prod-machine-type.md": compare(prod_doc, known_change(prod_doc)).markdown,
            GOLDEN_DIFF / "prod-signed-tables.md": compare(baked, prod_doc, ref="f8a08f7").markdown}


def test_golden_markdown_for_a_known_change():
    for path, text in golden_diff_files().items():
        assert path.exists() and path.read_text() == text, f"{path.name} is stale: review and run `make golden`"


def test_no_change_is_one_line(prod_doc):
    report = compare(prod_doc, prod_doc)
    assert report.markdown.splitlines()[-1] == (
        "No change to stack `prod` (resources, outputs and expected measurements are identical).")
    assert report.exit_code == 0 and not report.changed


def test_a_whole_group_stopped_in_prod_fails_naming_it_and_a_step_that_works(prod_doc):
    report = compare(prod_doc, known_change(prod_doc))
    assert report.exit_code == 1
    assert report.failures == [
        "group overlay would take 5 node(s) down at once (overlay-0, overlay-1, overlay-2, overlay-3, overlay-4); "
        "maxUnavailable is 1: roll it with `make rollout STACK=prod`: 5 wave(s) of targeted updates, each once the "
        "last one's nodes are healthy and verified, in this order: overlay-1, overlay-2, overlay-3, overlay-4, "
        "overlay-0 (by hand: the commands under 'Rollout waves', then the rest with `make up`)",
        "the change takes every member of the overlay down at once (overlay-0, overlay-1, overlay-2, overlay-3, "
        "overlay-4): its shared secret lives only in running members and would be lost for good; roll it in waves"]
    assert "| `overlay` | 1 | - | overlay-0, overlay-1, overlay-2, overlay-3, overlay-4 | - | - | over the limit |" \
        in report.markdown
    # each node exactly once, the genesis node last, each wave a targeted update of that node alone
    waves = report.markdown.split("### Rollout waves", 1)[1].split("###", 1)[0]
    commands = [line.strip() for line in waves.splitlines() if line.strip().startswith("python -m fleet deploy up")]
    urn = "urn:pulumi:prod::dstack-fleet::dstack-fleet:nodes:OverlayNode$gcp:compute/instance:Instance::overlay-{}"
    assert commands == [f"python -m fleet deploy up --stack prod '--pulumi-arg=--target={urn.format(n)}'"
                        for n in (1, 2, 3, 4, 0)]
    # what a shell hands the CLI: the URN intact (it holds a `$`)
    echoed = subprocess.run(["sh", "-c", commands[0].replace("python -m fleet deploy up", "printf '%s\\n'")],
                            capture_output=True, text=True).stdout.splitlines()
    assert echoed == ["--stack", "prod", f"--pulumi-arg=--target={urn.format(1)}"]
    assert "the genesis node `overlay-0` goes last" in waves


def stop_apps(prod_doc):
    return new_machine_type(prod_doc, "apps")


def test_the_same_change_outside_prod_is_reported_but_passes(prod_doc):
    base, head = copy.deepcopy(prod_doc), stop_apps(prod_doc)
    base["tier"] = head["tier"] = "dev"
    report = compare(base, head, stack="dev")
    assert report.exit_code == 0 and "over the limit" in report.markdown
    assert compare(prod_doc, stop_apps(prod_doc)).exit_code == 1


def test_taking_the_whole_overlay_down_fails_in_every_tier(prod_doc):
    base, head = copy.deepcopy(prod_doc), known_change(prod_doc)
    base["tier"] = head["tier"] = "dev"
    report = compare(base, head, stack="dev")
    assert report.exit_code == 1 and report.failures == [
        "the change takes every member of the overlay down at once (overlay-0, overlay-1, overlay-2, overlay-3, "
        "overlay-4): its shared secret lives only in running members and would be lost for good; roll it in waves"]


def test_adding_a_node_shows_topology_and_peers_in_full(project):
    def grow(c):
        c["dstack-fleet:nodes"][0]["count"] = 6

    base = doc(build_plan(project.root, "prod"))
    project.mutate("prod", "prod", grow)
    report = compare(base, doc(build_plan(project.root, "prod")))
    assert ("| `overlay-5` | added | `us-central1-c` | `10.30.0.15` | `10.30.0.10:5000, 10.30.0.11:5000, "
            "10.30.0.12:5000, 10.30.0.13:5000, 10.30.0.14:5000` |") in report.markdown
    assert "| `overlay-0` | changed: peers | `us-central1-a` | `10.30.0.10` | added `10.30.0.15:5000` |" in report.markdown
    assert "**create** `overlay-5`" in report.markdown and "**replace**" not in report.markdown
    assert "Running members that keep the older table until their next restart: overlay-0, overlay-1, overlay-2, " \
           "overlay-3, overlay-4" in report.markdown
    assert report.exit_code == 0 and report.failures == []


def test_peers_removed_and_added_are_listed_in_full():
    a = {"nodes": {"x-0": {"zone": "z", "address": "10.0.0.10", "peers": [f"10.0.0.{i}:5000" for i in range(11, 40)]}}}
    b = {"nodes": {"x-0": {"zone": "z", "address": "10.0.0.10",
                           "peers": [f"10.0.0.{i}:5000" for i in range(12, 40)] + ["10.0.0.99:5000"]}}}
    (row,) = diff.topology_rows(a, b)
    assert row.endswith("| added `10.0.0.99:5000`; removed `10.0.0.11:5000` |")  # not cut at 60 characters


def test_measurement_and_identity_changes_appear(prod_doc):
    base, head = copy.deepcopy(prod_doc), copy.deepcopy(prod_doc)
    base["measurements"] = {"app:wallet": {"app_id": "a" * 40, "compose_hash": "1" * 64, "stateful": True,
                                           "identity": "compose"}}
    head["measurements"] = {"app:wallet": {"app_id": "b" * 40, "compose_hash": "2" * 64, "stateful": True,
                                           "identity": "compose"}}
    report = compare(base, head)
    assert "### App identity changes" in report.markdown and "### Expected measurements" in report.markdown
    assert "| `app:wallet.compose_hash` |" in report.markdown
    assert any("app app:wallet would get a new identity" in f for f in report.failures)
    # a KMS with a pinned app id keeps the identity across compose changes: no failure...
    base["measurements"]["app:wallet"]["identity"] = "pinned"
    head["measurements"]["app:wallet"].update(identity="pinned", app_id="a" * 40)
    assert not any("new identity" in f for f in compare(base, head).failures)
    # ...but changing the pinned id itself is a new identity, stable or not
    head["measurements"]["app:wallet"]["app_id"] = "c" * 40
    assert any("app app:wallet would get a new identity" in f for f in compare(base, head).failures)


def test_truncation_keeps_the_comment_under_the_limit():
    text = "## title\n\n```\n" + ("x" * 99 + "\n") * 2000 + "```\n"
    cut = diff.truncate(text)
    assert len(cut.encode()) <= diff.COMMENT_LIMIT and cut.endswith(diff.TRUNCATION_NOTE)
    assert cut.count("```") % 2 == 0
    assert diff.truncate("short\n") == "short\n"


def test_canary_secret_never_appears_in_the_markdown(project):
    canary = "canary-77c1-diff-must-not-leak"
    base = doc(build_plan(project.root, "prod"))
    head = doc(build_plan(project.root, "prod", secret_overrides={"dstack-fleet:secrets": {"token": canary}}))
    head["resources"][0]["inputs"]["description"] = "[secret]"
    assert canary not in compare(base, head).markdown


def test_make_diff_against_head_says_no_change():
    result = subprocess.run(["make", "-s", "diff", "STACK=dev", "BASE=HEAD", "PY_DEPS=", f"PY={sys.executable}"],
                            cwd=ROOT, capture_output=True, text=True)
    if "No change" not in result.stdout and result.returncode == 0:
        pytest.skip("the working tree differs from HEAD")
    assert result.returncode == 0, result.stderr
    assert "No change to stack `dev`" in result.stdout


def test_unknown_base_revision_is_bad_input():
    result = subprocess.run([sys.executable, "-m", "fleet", "diff", "--stack", "dev", "--base", "no-such-ref-x"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and "unknown git revision 'no-such-ref-x'" in result.stderr


def tracked_copy(tmp: Path) -> Path:
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split("\0")
    repo = tmp / "repo"
    for name in filter(None, files):
        if name.startswith(("tests/", ".github/")):
            continue
        target = repo / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run(git + ["add", "-A"], cwd=repo, check=True)
    subprocess.run(git + ["commit", "-qm", "base"], cwd=repo, check=True)
    return repo


@pytest.fixture(scope="module")
def tracked_repo(tmp_path_factory):
    """One committed copy of the repository for this module's diffs; each test changes its working tree
    and the fixture below puts it back."""
    return tracked_copy(tmp_path_factory.mktemp("diff"))


@pytest.fixture
def repo(tracked_repo):
    yield tracked_repo
    subprocess.run(["git", "checkout", "-q", "--", "."], cwd=tracked_repo, check=True)
    subprocess.run(["git", "clean", "-qfd"], cwd=tracked_repo, check=True)


def test_the_base_revision_is_planned_with_its_own_code(repo):
    network = repo / "fleet" / "nodes" / "network.py"
    network.write_text(network.read_text().replace(
        'description=f"dstack-fleet network of stack {config.stack}"', 'description=f"fleet VPC {config.stack}"'))
    result = subprocess.run([sys.executable, "-m", "fleet", "diff", "--stack", "dev", "--base", "HEAD"], cwd=repo,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "**replace** `vpc`" in result.stdout  # a network's description forces a new network
    assert "`dstack-fleet network of stack dev`" in result.stdout and "`fleet VPC dev`" in result.stdout


def test_a_prod_change_that_replaces_the_whole_group_exits_1(repo):
    stack = repo / "stacks" / "Pulumi.prod.yaml"
    stack.write_text(stack.read_text().replace("machineType: c3-standard-8", "machineType: c3-standard-22"))
    result = subprocess.run([sys.executable, "-m", "fleet", "diff", "--stack", "prod", "--base", "HEAD"], cwd=repo,
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert "mandatory check failed: group overlay would take 5 node(s) down at once" in result.stderr


def test_app_changes_say_how_they_land(prod_doc):
    base, head = copy.deepcopy(prod_doc), copy.deepcopy(prod_doc)
    app = {"name": "mpc-prod", "identity": "compose", "composeHash": "1" * 64, "userConfigSha256": "a" * 64}
    base["outputs"]["apps"] = {"mpc-prod": app}
    head["outputs"]["apps"] = {"mpc-prod": dict(app, userConfigSha256="b" * 64)}
    assert "| `mpc-prod` | user config only: restart | kept |" in compare(base, head).markdown
    head["outputs"]["apps"] = {"mpc-prod": dict(app, composeHash="2" * 64)}
    assert "| `mpc-prod` | new compose | new identity |" in compare(base, head).markdown


def test_a_kms_app_without_a_pinned_id_follows_its_compose(prod_doc):
    base, head = copy.deepcopy(prod_doc), copy.deepcopy(prod_doc)
    m = {"kind": "dstack-app", "app_id": "known at boot", "compose_hash": "1" * 64, "identity": "derived",
         "stateful": True}
    base["measurements"] = {"app:mpc-prod": m}
    head["measurements"] = {"app:mpc-prod": dict(m, compose_hash="2" * 64)}
    assert any("app app:mpc-prod would get a new identity" in f for f in compare(base, head).failures)


def test_a_base_plan_in_the_old_words_is_not_an_identity_change(prod_doc):
    # Plans before the one vocabulary said "derived"/"stable" and showed a KMS app's id as "known at
    # boot"; the guest derives that id from the compose hash, so the same compose keeps the identity.
    base, head = copy.deepcopy(prod_doc), copy.deepcopy(prod_doc)
    base["measurements"] = {"app:mpc-prod": {"app_id": "known at boot", "compose_hash": "1" * 64,
                                             "identity": "derived", "stateful": True}}
    head["measurements"] = {"app:mpc-prod": {"app_id": "1" * 40, "compose_hash": "1" * 64,
                                             "identity": "compose", "stateful": True}}
    assert diff.identity_changes(base["measurements"], head["measurements"]) == []
    base["measurements"]["app:mpc-prod"].update(identity="stable", app_id="ab" * 20)
    head["measurements"]["app:mpc-prod"].update(identity="pinned", app_id="ab" * 20, compose_hash="2" * 64)
    assert diff.identity_changes(base["measurements"], head["measurements"]) == []


# ---- today's prod overlay moves from the baked image to the one without a member table -----------------------

def _targets(command: str) -> list[str]:
    import shlex

    return [part.split("=", 2)[2] for part in shlex.split(command) if part.startswith("--pulumi-arg=--target=")]


def test_moving_prod_off_the_baked_image_replaces_each_member_once_in_a_stated_order(prod_doc):
    baked = json.loads(BAKED_PROD.read_text())
    report = compare(baked, prod_doc, ref="f8a08f7")
    assert report.exit_code == 1  # five replacements at once: never in one `make up`
    assert any("in this order: overlay-1, overlay-2, overlay-3, overlay-4, overlay-0" in f for f in report.failures)
    waves = report.markdown.split("### Rollout waves", 1)[1].split("\n###", 1)[0]
    # the overlay group's waves (the dstack group's config-disk resets since that commit roll on their own)
    waves = waves.split("Group `overlay`", 1)[1]
    named = [line for line in waves.splitlines() if line[:1].isdigit()]
    assert named == [f"{i}. `overlay-{n}` (replaced):" for i, n in enumerate((1, 2, 3, 4, 0), start=1)]
    # a step that works: every wave targets its instance and everything that instance newly depends on
    # (Pulumi refuses a target whose new dependency is not targeted)
    head = {r["urn"]: r for r in prod_doc["resources"]}
    created = set(head) - {r["urn"] for r in baked["resources"]}
    commands = [line.strip() for line in waves.splitlines() if line.strip().startswith("python -m fleet deploy up")]
    assert len(commands) == 5
    for n, command in zip((1, 2, 3, 4, 0), commands):
        targets = set(_targets(command))
        instance = f"urn:pulumi:prod::dstack-fleet::dstack-fleet:nodes:OverlayNode$gcp:compute/instance:Instance::overlay-{n}"
        assert instance in targets
        needed, frontier = set(), [instance]
        while frontier:
            r = head[frontier.pop()]
            deps = set(r.get("dependencies") or []) | {d for v in (r.get("propertyDependencies") or {}).values() for d in v}
            for d in deps & created - needed:
                needed.add(d)
                frontier.append(d)
        assert needed <= targets, sorted(needed - targets)
        assert not any(t.endswith(f"Instance::overlay-{m}") for t in targets for m in range(5) if m != n)
    assert "urn:pulumi:prod::dstack-fleet::dstack-fleet:nodes:OverlayTable$command:local:Command::overlay-table-sign" \
        in _targets(commands[0])


def _make_diff(repo: Path, stack: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-s", "diff", f"STACK={stack}", "BASE=HEAD", "PY_DEPS=", f"PY={sys.executable}"],
                          cwd=repo, capture_output=True, text=True)


def test_adding_a_node_to_prods_overlay_takes_no_running_node_down_and_make_diff_exits_0(repo):
    stack = repo / "stacks" / "Pulumi.prod.yaml"
    stack.write_text(stack.read_text().replace("      count: 5\n", "      count: 6\n", 1))
    result = _make_diff(repo, "prod")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    out = result.stdout
    assert "| `overlay` | 1 | - | - | overlay-5 | - | ok |" in out
    assert "**replace**" not in out and "**update with stop**" not in out
    assert "\n- **update live** `overlay-table-sign` (command:local:Command)" in out  # the table, re-signed
    assert not [line for line in out.splitlines() if "apply-table" in line and "overlay-5" not in line]  # no reset


def test_adding_a_node_to_a_multi_region_mesh_takes_no_running_node_down(repo):
    import yaml

    def add_region(count: int) -> str:
        doc = yaml.safe_load((ROOT / "stacks" / "Pulumi.prod.yaml").read_text())
        config = doc["config"]
        config["dstack-fleet:network"]["subnets"]["europe-west4"] = "10.31.0.0/20"
        config["dstack-fleet:nodes"].append({
            "name": "overlay-eu", "kind": "overlay", "count": count, "machineType": "c3-standard-8",
            "zones": ["europe-west4-a", "europe-west4-b"], "dataDiskGb": 200, "addresses": {"offset": 10},
            "maxUnavailable": 1, "image": "overlay-3eb04ca"})
        return yaml.safe_dump(doc, sort_keys=False)

    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com"]
    stack = repo / "stacks" / "Pulumi.prod.yaml"
    stack.write_text(add_region(2))
    subprocess.run(git + ["commit", "-qam", "a second region"], cwd=repo, check=True)
    try:
        stack.write_text(add_region(3))
        result = _make_diff(repo, "prod")
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr
        out = result.stdout
        assert "| `overlay-eu` | 1 | - | - | overlay-eu-2 | - | ok |" in out
        assert "| `overlay` | 1 | - | - | - | - | ok |" in out
        assert "**replace**" not in out and "**update with stop**" not in out
        assert "| `overlay-0` | changed: peers | `us-central1-a` | `10.30.0.10` | added `10.31.0.12:5000` |" in out
    finally:
        subprocess.run(["git", "reset", "-q", "--hard", "HEAD~1"], cwd=repo, check=True)
