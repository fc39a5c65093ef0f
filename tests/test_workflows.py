"""The GitHub workflows: schema, zizmor, pinned actions, permissions, the fork-safe comment path,
the deploy order; and the shell steps run against stand-ins for `fleet diff` and `gh`."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fleet.stacks.load import load_config

from .conftest import ROOT

WORKFLOWS = ROOT / ".github" / "workflows"
PINS = json.loads((ROOT / ".github" / "actions-pins.json").read_text())
BIN = Path(sys.executable).parent  # check-jsonschema, zizmor and shellcheck come with the venv
ENV_STACKS = ["dev", "staging", "prod"]
FILES = sorted(WORKFLOWS.glob("*.yml"))

# Every job's permissions, exactly: widening one is a reviewed change to this table.
PERMISSIONS = {
    ("preview", "offline"): {"contents": "read"},
    ("preview", "cloud-preview"): {"contents": "read", "id-token": "write", "pull-requests": "write"},
    ("pr-comment", "comment"): {"actions": "read", "contents": "read", "pull-requests": "write"},
    ("images", "start"): {"contents": "read", "id-token": "write"},
    ("images", "collect"): {"contents": "read", "id-token": "write"},
    # writes through a GitHub App's token (its pull requests start workflows), not the job's
    ("images", "lock-pr"): {"contents": "read"},
    ("deploy", "dev"): {"contents": "read", "id-token": "write"},
    ("deploy", "staging"): {"contents": "read", "id-token": "write"},
    ("deploy", "prod"): {"contents": "read", "id-token": "write"},
    ("drift", "drift"): {"contents": "read", "id-token": "write"},
}


def load(path: Path) -> dict:
    document = yaml.safe_load(path.read_text())
    # YAML 1.1 reads the key `on` as the boolean True.
    if True in document:
        document["on"] = document.pop(True)
    return document


def workflow(name: str) -> dict:
    return load(WORKFLOWS / f"{name}.yml")


def steps(job: dict) -> list[dict]:
    return job.get("steps", [])


def action(step: dict) -> str | None:
    """``owner/repo`` of a step's action, without path or ref."""
    uses = step.get("uses")
    return "/".join(uses.split("@")[0].split("/")[:2]) if uses else None


def only_step(job: dict, name: str) -> dict:
    found = [s for s in steps(job) if action(s) == name]
    assert len(found) == 1, f"expected one {name} step, found {len(found)}"
    return found[0]


def run_scripts() -> list[tuple[str, str, str]]:
    return [(path.stem, job_id, step["run"])
            for path in FILES for job_id, job in load(path)["jobs"].items()
            for step in steps(job) if "run" in step]


def test_the_five_workflows_exist():
    assert {p.stem for p in FILES} == {"preview", "pr-comment", "images", "deploy", "drift"}


# --- external checkers ------------------------------------------------------------------------


def test_workflows_match_the_github_workflow_schema():
    result = subprocess.run(
        [str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.github-workflows", *map(str, FILES)],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_schema_check_catches_a_broken_workflow(tmp_path):
    broken = tmp_path / "broken.yml"
    document = workflow("drift")
    document["jobs"]["drift"]["stepz"] = document["jobs"]["drift"].pop("steps")
    broken.write_text(yaml.safe_dump(document))
    result = subprocess.run(
        [str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.github-workflows", str(broken)],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode == 1 and "stepz" in result.stdout


def zizmor(*args: str) -> list[dict]:
    result = subprocess.run(
        [str(BIN / "zizmor"), "--offline", "--no-config", "--format", "json", *args, str(WORKFLOWS)],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode in (0, 14), result.stderr  # 14: findings (asserted below)
    return json.loads(result.stdout)


def test_zizmor_reports_nothing():
    assert zizmor() == []
    assert zizmor("--pedantic") == []


def test_the_only_zizmor_ignore_is_the_justified_workflow_run_trigger():
    findings = {(f["ident"], Path(f["locations"][0]["symbolic"]["key"]["Local"]["verbatim_path"]).name)
                for f in zizmor("--no-ignores")}
    assert findings == {("dangerous-triggers", "pr-comment.yml")}
    ignores = [line for path in FILES for line in path.read_text().splitlines() if "zizmor: ignore" in line]
    assert len(ignores) == 1
    assert re.search(r"zizmor: ignore\[dangerous-triggers\] \S+( \S+){3,}", ignores[0]), "say why"


def test_run_scripts_pass_shellcheck(tmp_path):
    for index, (name, job_id, script) in enumerate(run_scripts()):
        path = tmp_path / f"{name}-{job_id}-{index}.sh"
        path.write_text("#!/usr/bin/env bash\nset -eo pipefail\n" + script)
        result = subprocess.run([str(BIN / "shellcheck"), "--shell=bash", str(path)],
                                capture_output=True, text=True, check=False)
        assert result.returncode == 0, f"{name}/{job_id}:\n{result.stdout}"


# --- pinned actions ---------------------------------------------------------------------------

USES_LINE = re.compile(r"^\s*(?:-\s+)?uses:\s*(?P<ref>\S+)(?P<rest>.*)$")
PINNED = re.compile(r"(?P<repo>[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+)(?:/[^@]+)?@(?P<sha>[0-9a-f]{40})")


def uses_lines() -> list[tuple[str, str, str]]:
    return [(path.name, m["ref"], m["rest"].strip())
            for path in FILES for line in path.read_text().splitlines() if (m := USES_LINE.match(line))]


def test_every_action_is_pinned_to_the_commit_in_the_table():
    lines = uses_lines()
    assert lines
    for name, ref, comment in lines:
        match = PINNED.fullmatch(ref)
        assert match, f"{name}: {ref} is not owner/repo@<40-hex commit>"
        pin = PINS.get(match["repo"])
        assert pin, f"{name}: {match['repo']} is not in .github/actions-pins.json"
        assert match["sha"] == pin["sha"], f"{name}: {ref} differs from the table"
        assert comment == f"# {pin['tag']}", f"{name}: {ref} must be followed by '# {pin['tag']}'"


def test_parsed_uses_are_all_on_checked_lines():
    """Nothing reaches `uses:` in a form the line check above does not see."""
    textual = {ref for _, ref, _ in uses_lines()}
    for path in FILES:
        for job in load(path)["jobs"].values():
            assert "uses" not in job, "reusable workflows would need their own pin check"
            for step in steps(job):
                if "uses" in step:
                    assert step["uses"] in textual


def test_pins_table_is_well_formed_and_fully_used():
    used = {PINNED.fullmatch(ref)["repo"] for _, ref, _ in uses_lines()}
    assert set(PINS) == used
    for repo, pin in PINS.items():
        assert set(pin) == {"sha", "tag"}
        assert re.fullmatch(r"[0-9a-f]{40}", pin["sha"]), repo
        assert re.fullmatch(r"v\d+\.\d+\.\d+", pin["tag"]), f"{repo}: pin a release, not a moving tag"


# --- hardening rules --------------------------------------------------------------------------


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_permissions_are_empty_by_default_and_exact_per_job(path):
    document = load(path)
    assert document.get("permissions") == {}
    for job_id, job in document["jobs"].items():
        assert "permissions" in job, f"{path.name}: job {job_id} has no explicit permissions"
        assert job["permissions"] == PERMISSIONS[(path.stem, job_id)], f"{path.name}: {job_id}"


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_jobs_have_timeouts_and_checkouts_keep_no_credentials(path):
    for job_id, job in load(path)["jobs"].items():
        assert isinstance(job.get("timeout-minutes"), int), f"{path.name}: {job_id} has no timeout"
        for step in steps(job):
            if action(step) == "actions/checkout":
                assert step.get("with", {}).get("persist-credentials") is False, f"{path.name}: {job_id}"


def test_no_run_script_interpolates_expressions():
    """Values reach scripts through `env:`; `${{ }}` inside `run:` is a script-injection hole."""
    scripts = run_scripts()
    assert scripts
    for name, job_id, script in scripts:
        assert "${{" not in script, f"{name}/{job_id}: {script[:80]}"


def test_no_workflow_uses_stored_secrets_or_a_passphrase():
    """Google Cloud through Workload Identity Federation, stack secrets through gcpkms://. The one
    stored secret is the lock pull-request App's key, in its own GitHub environment, handed only to
    the action that turns it into a one-hour installation token."""
    for path in FILES:
        text = path.read_text()
        for forbidden in ("PULUMI_CONFIG_PASSPHRASE", "PULUMI_ACCESS_TOKEN", "credentials_json"):
            assert forbidden not in text, f"{path.name}: {forbidden}"
        uses = re.findall(r"secrets\.[A-Za-z0-9_]+", text)
        assert uses == (["secrets.LOCK_PR_APP_PRIVATE_KEY"] if path.stem == "images" else []), path.name
    job = workflow("images")["jobs"]["lock-pr"]
    assert job["environment"] == "images-lock"
    mint = only_step(job, "actions/create-github-app-token")
    assert mint["with"]["private-key"] == "${{ secrets.LOCK_PR_APP_PRIVATE_KEY }}"


def test_google_auth_is_federated_with_the_right_identity():
    expected = {"preview": "GCP_PREVIEW_SERVICE_ACCOUNT", "drift": "GCP_DRIFT_SERVICE_ACCOUNT",
                "deploy": "GCP_DEPLOY_SERVICE_ACCOUNT", "images": "GCP_DEPLOY_SERVICE_ACCOUNT"}
    seen = set()
    for path in FILES:
        for job_id, job in load(path)["jobs"].items():
            for step in steps(job):
                if action(step) != "google-github-actions/auth":
                    continue
                seen.add(path.stem)
                # the images jobs also take a short-lived access token for the registry login
                extra = {"token_format": "access_token"} if path.stem == "images" else {}
                assert step["with"] == {
                    "workload_identity_provider": "${{ vars.GCP_WIF_PROVIDER }}",
                    "service_account": f"${{{{ vars.{expected[path.stem]} }}}}", **extra,
                }
                assert job["permissions"].get("id-token") == "write"
                if expected[path.stem] in ("GCP_DEPLOY_SERVICE_ACCOUNT", "GCP_DRIFT_SERVICE_ACCOUNT"):
                    # the variable is set per GitHub environment, and the environment scopes the token
                    assert job.get("environment"), f"{path.name}: {job_id}"
    assert seen == set(expected)


# --- the fork-safe pull-request path ----------------------------------------------------------


def test_pull_request_checks_never_run_with_the_base_repository_token():
    for path in FILES:
        assert "pull_request_target" not in load(path)["on"], path.name
    on = workflow("preview")["on"]
    assert set(on) == {"pull_request"}


def test_offline_job_is_read_only_and_credential_free():
    offline = workflow("preview")["jobs"]["offline"]
    assert offline["permissions"] == {"contents": "read"}
    assert "environment" not in offline and "if" not in offline  # forks included
    assert not [s for s in steps(offline) if action(s) == "google-github-actions/auth"]
    checkout = only_step(offline, "actions/checkout")
    assert checkout["with"]["fetch-depth"] == 0  # the diff plans the base commit too


def test_cloud_preview_runs_only_for_branches_of_this_repository():
    job = workflow("preview")["jobs"]["cloud-preview"]
    assert job["if"] == "github.event.pull_request.head.repo.full_name == github.repository"
    # prod is previewed only by its deploy identity: the preview identity holds no prod key
    assert job["strategy"]["matrix"]["stack"] == ["dev", "staging"]
    names = [action(s) or s.get("run") for s in steps(job)]
    assert names.index("make venv") < names.index("pulumi/actions")  # the action installs nothing
    preview = only_step(job, "pulumi/actions")["with"]
    assert preview == {
        "command": "preview", "stack-name": "${{ matrix.stack }}", "work-dir": ".",
        "cloud-url": "${{ vars.PULUMI_BACKEND_URL }}", "pulumi-version-file": ".pulumi-version",
        "policyPacks": "policies", "policyPackConfigs": "${{ runner.temp }}/policy-config.json",
        "comment-on-pr": True, "diff": True,
    }


def test_cloud_preview_passes_the_generated_policy_pack_config_of_its_stack(tmp_path):
    """Without it the pack ran every rule as mandatory prod rules, and dev and staging previews failed."""
    job = workflow("preview")["jobs"]["cloud-preview"]
    names = [action(s) or s.get("run") for s in steps(job)]
    (config_step,) = [s for s in steps(job) if "policy-config" in s.get("run", "")]
    assert names.index("make venv") < names.index(config_step["run"]) < names.index("pulumi/actions")
    assert config_step["env"] == {"STACK": "${{ matrix.stack }}"}
    # the step, run as the runner runs it, writes exactly the document make preview passes
    from fleet.policy.rules import pack_config_for

    for stack in ENV_STACKS:
        result = subprocess.run(["bash", "-e", "-c", config_step["run"]], cwd=ROOT, capture_output=True, text=True,
                                env=dict(os.environ, STACK=stack, RUNNER_TEMP=str(tmp_path)))
        assert result.returncode == 0, result.stderr
        written = json.loads((tmp_path / "policy-config.json").read_text())
        assert written == pack_config_for(load_config(ROOT, stack)[1])
        assert written["data-safety"]["tier"] == stack
        assert written["all"] == ("advisory" if stack == "dev" else "mandatory")


def test_deploy_jobs_provide_an_authenticated_gcloud_before_up():
    """The program runs gcloud where `pulumi up` runs (config-disk uploads, the reset after a new
    configuration disk): each deploy job sets it up after authenticating, before `make up`."""
    for stack, job in workflow("deploy")["jobs"].items():
        names = [action(s) or s.get("run") for s in steps(job)]
        assert (names.index("google-github-actions/auth") < names.index("google-github-actions/setup-gcloud")
                < names.index('make "$DEPLOY" STACK="$STACK" ACK="$ACK"')), stack
        assert only_step(job, "google-github-actions/setup-gcloud")["with"] == {"version": ">= 363.0.0"}


def test_deploy_rollouts_reach_the_nodes_through_iap_with_that_gcloud():
    """GitHub-hosted runners cannot reach the nodes' internal addresses: the stacks the workflow rolls
    read their nodes through IAP TCP forwarding, with the gcloud set up (and authenticated) before the
    rollout, and no REACH override in the workflow."""
    jobs = workflow("deploy")["jobs"]
    for stack, job in jobs.items():
        if "rollout" not in job["env"]["DEPLOY"]:
            continue
        assert load_config(ROOT, stack)[1].fleet.rollout.reach == "iap", stack
        names = [action(s) or s.get("run") for s in steps(job)]
        assert names.index("google-github-actions/setup-gcloud") < names.index('make "$DEPLOY" STACK="$STACK" ACK="$ACK"')
        assert "REACH" not in json.dumps(job)
    assert [s for s, j in jobs.items() if j["env"]["DEPLOY"] == "rollout"] == ["staging", "prod"]


def test_only_the_poster_can_write_to_pull_requests_among_workflow_run_jobs():
    writers = [(path.stem, job_id) for path in FILES if "workflow_run" in load(path)["on"]
               for job_id, job in load(path)["jobs"].items()
               if job["permissions"].get("pull-requests") == "write"]
    assert writers == [("pr-comment", "comment")]


def test_poster_reads_the_preview_artifact_as_data_from_the_default_branch():
    preview, poster = workflow("preview"), workflow("pr-comment")
    trigger = poster["on"]["workflow_run"]
    assert trigger == {"workflows": [preview["name"]], "types": ["completed"]}
    job = poster["jobs"]["comment"]
    assert "github.event.workflow_run.event == 'pull_request'" in job["if"]

    checkout = only_step(job, "actions/checkout")["with"]
    assert not {"ref", "repository"} & set(checkout), "the default branch, never the PR head"

    upload = only_step(preview["jobs"]["offline"], "actions/upload-artifact")["with"]
    download = only_step(job, "actions/download-artifact")["with"]
    assert download["name"] == upload["name"] == "pr-plan"
    assert download["run-id"] == "${{ github.event.workflow_run.id }}"
    assert download["github-token"] == "${{ github.token }}"
    assert download["path"].startswith("${{ runner.temp }}/"), "outside the checkout"

    assert {action(s) for s in steps(job)} - {None} == {
        "actions/checkout", "actions/setup-python", "actions/download-artifact"}
    (post,) = [s for s in steps(job) if "run" in s]
    assert post["run"].split()[:4] == ["python", "-m", "fleet", "comment"]
    assert '--sha "$HEAD_SHA"' in post["run"] and '--dir "$PLAN_DIR"' in post["run"]
    assert post["env"]["HEAD_SHA"] == "${{ github.event.workflow_run.head_sha }}"
    assert post["env"]["PLAN_DIR"] == download["path"]
    assert post["env"]["GITHUB_TOKEN"] == "${{ github.token }}"


# --- deploy, images, drift --------------------------------------------------------------------


def test_deploy_goes_dev_then_staging_then_prod():
    document = workflow("deploy")
    assert document["on"]["push"] == {"branches": ["main"]} and "workflow_dispatch" in document["on"]
    jobs = document["jobs"]
    assert list(jobs) == ENV_STACKS
    assert "needs" not in jobs["dev"]
    assert jobs["staging"]["needs"] == "dev" and jobs["prod"]["needs"] == "staging"
    for stack, job in jobs.items():
        assert job["environment"] == stack
        assert job["concurrency"] == {"group": f"deploy-{stack}", "cancel-in-progress": False}
        assert job["env"]["STACK"] == stack and job["env"]["FLEET_UP_YES"] == "1"
        assert job["env"]["PULUMI_BACKEND_URL"] == "${{ vars.PULUMI_BACKEND_URL }}"
        runs = [s["run"] for s in steps(job) if "run" in s]
        assert runs[-2:] == ['make "$DEPLOY" STACK="$STACK" ACK="$ACK"', 'make gc STACK="$STACK" GC_APPLY=1']
        assert only_step(job, "pulumi/actions")["with"] == {"pulumi-version-file": ".pulumi-version"}


def test_deploy_rolls_staging_and_prod_in_gated_waves_and_keeps_the_evidence():
    document = workflow("deploy")
    jobs = document["jobs"]
    # dev in one checked up; staging and prod in waves, each gated on fleet verify (make rollout)
    # (a manual run may roll dev too: `up` refuses an overlay image upgrade, which takes every member down)
    assert {stack: job["env"]["DEPLOY"] for stack, job in jobs.items()} == {
        "dev": "${{ inputs.dev == 'rollout' && 'rollout' || 'up' }}", "staging": "rollout", "prod": "rollout"}
    dev = document["on"]["workflow_dispatch"]["inputs"]["dev"]
    assert dev["type"] == "choice" and dev["options"] == ["up", "rollout"] and dev["default"] == "up"
    for target in ("up", "rollout"):
        dry = subprocess.run(["make", "-n", target, "STACK=prod", "ACK=group:overlay", "PY_DEPS="],
                             capture_output=True, text=True, cwd=ROOT, check=True).stdout.split()
        verb = ["deploy", "up"] if target == "up" else ["rollout"]
        at = dry.index("fleet") + 1
        assert dry[at:at + len(verb) + 4] == [*verb, "--stack", "prod", "--ack", "'group:overlay'"]
    # an acknowledgement is an operator's input of a manual run, reaching the script through env only
    assert document["on"]["workflow_dispatch"]["inputs"]["ack"]["type"] == "string"
    for stack, job in jobs.items():
        assert job["env"]["ACK"] == "${{ inputs.ack }}"
        (evidence,) = [s for s in steps(job) if action(s) == "actions/upload-artifact"]
        assert evidence["if"] == "always()" and evidence["with"]["path"] == ".fleet-evidence/"
        names = [s.get("name", "") for s in steps(job)]
        assert names.index(evidence["name"]) == names.index("pulumi up (dev) or rollout in waves (staging, prod)") + 1
    assert jobs["prod"]["timeout-minutes"] >= 240 and jobs["staging"]["timeout-minutes"] >= 240


def test_images_starts_builds_on_push_and_collects_them_on_a_schedule():
    document = workflow("images")
    assert set(document["on"]) == {"push", "schedule", "workflow_dispatch"}
    assert document["concurrency"] == {"group": "images", "cancel-in-progress": False}
    start, collect, lock_pr = (document["jobs"][j] for j in ("start", "collect", "lock-pr"))
    assert "github.event_name != 'schedule'" in start["if"] and "github.event_name != 'push'" in collect["if"]
    # a GitHub-hosted job stops at 6 h; neither half waits for a build
    assert start["timeout-minutes"] <= 120 and collect["timeout-minutes"] <= 120
    start_runs = [s["run"] for s in steps(start) if "run" in s]
    assert start_runs[-1] == "make up STACK=images" and not any("make lock" in r for r in start_runs)
    runs = [s["run"] for s in steps(collect) if "run" in s]
    collect_at = next(i for i, r in enumerate(runs) if r.startswith("make collect"))
    lock_at = next(i for i, r in enumerate(runs) if "make lock OUTPUTS=" in r)
    assert collect_at < lock_at < runs.index("make up STACK=images") < runs.index("make gc STACK=images GC_APPLY=1")
    assert lock_pr["needs"] == "collect"
    assert not [s for s in steps(lock_pr) if action(s) in ("google-github-actions/auth", "pulumi/actions")]
    for job in (start, collect):
        assert job["env"]["FLEET_UP_YES"] == "1" and job["environment"] == "images"


def test_images_toolchains_are_pinned_and_checked_before_anything_builds():
    from fleet.images import mkosibuild

    for job_id in ("start", "collect"):
        job = workflow("images")["jobs"][job_id]
        (mkosi,) = [s for s in steps(job) if action(s) == "actions/checkout" and s["with"].get("repository")]
        assert mkosi["with"]["repository"] == "systemd/mkosi" and mkosi["with"]["ref"] == mkosibuild.MKOSI_COMMIT
        install = step_named("images", job_id, "Install mkosi and skopeo")
        assert install["env"]["SKOPEO_APT_VERSION"] == mkosibuild.SKOPEO_APT_VERSION
        assert f'test "$(git -C .tools/mkosi rev-parse HEAD)" = {mkosibuild.MKOSI_COMMIT}' in install["run"]
        assert "kernel.apparmor_restrict_unprivileged_userns=0" in install["run"]
        assert install["run"].rstrip().endswith(".venv/bin/python -m fleet toolchain mkosi skopeo")
        names = [s.get("name", "") for s in steps(job)]
        assert names.index(install["name"]) < names.index("Log in to Artifact Registry")
        login = step_named("images", job_id, "Log in to Artifact Registry")
        assert login["env"] == {"ACCESS_TOKEN": "${{ steps.auth.outputs.access_token }}"}
        assert "--password-stdin" in login["run"]  # never on the command line


def test_deploy_installs_the_pinned_phala_cli_and_checks_it():
    job = workflow("deploy")["jobs"]["dev"]
    runs = [s["run"] for s in steps(job) if "run" in s]
    install = next(r for r in runs if "npm ci" in r)
    assert "npm ci --prefix tools/phala --ignore-scripts" in install
    assert runs.index(install) < runs.index(".venv/bin/python -m fleet toolchain phala") < runs.index(
        'make "$DEPLOY" STACK="$STACK" ACK="$ACK"')


def test_the_comment_poster_installs_nothing():
    """`python -m fleet comment` imports only the standard library (tests/test_prcomment.py runs it so)."""
    job = workflow("pr-comment")["jobs"]["comment"]
    runs = [s["run"] for s in steps(job) if "run" in s]
    assert not any("make" in r.split() or "pip" in r or ".venv" in r for r in runs)


def plan_reads(stack: str) -> set[str]:
    """Every file of this repository an offline plan of ``stack`` opens or imports."""
    probe = r"""
import json, runpy, sys
opened = set()
sys.addaudithook(lambda event, args: opened.add(args[0]) if event == "open" and isinstance(args[0], str) else None)
sys.argv = ["fleet", "plan", "--stack", sys.argv[1]]
try:
    runpy.run_module("fleet", run_name="__main__", alter_sys=True)
except SystemExit:
    pass
opened |= {m.__file__ for m in list(sys.modules.values()) if getattr(m, "__file__", None)}
sys.stderr.write("\nOPENED" + json.dumps(sorted(opened)))
"""
    result = subprocess.run([sys.executable, "-c", probe, stack], cwd=ROOT, capture_output=True, text=True,
                            check=False)
    assert "OPENED" in result.stderr, result.stderr[-2000:]
    paths = json.loads(result.stderr.rsplit("OPENED", 1)[1])
    out = set()
    for raw in paths:
        path = (ROOT / raw).resolve() if not os.path.isabs(raw) else Path(raw).resolve()
        if path.is_file() and path.is_relative_to(ROOT) and ".venv" not in path.relative_to(ROOT).parts:
            out.add(path.relative_to(ROOT).as_posix())
    return out


def github_glob(pattern: str) -> re.Pattern:
    """GitHub's path filter syntax: `**` crosses directories, `*` does not."""
    return re.compile(".*".join("[^/]*".join(re.escape(part) for part in piece.split("*"))
                                for piece in pattern.split("**")))


def test_images_path_filters_cover_every_file_an_images_plan_reads():
    filters = [github_glob(p) for p in workflow("images")["on"]["push"]["paths"]]
    read = plan_reads("images")
    assert {"stacks/Pulumi.dev.yaml", "stacks/Pulumi.images.yaml", "images.lock.json",
            "apps/simple-mkosi-app/mkosi.conf", "fleet/images/recipes.py", "components/buildhost.py"} <= read
    uncovered = sorted(f for f in read if not any(g.fullmatch(f) for g in filters))
    assert uncovered == []


def test_drift_refreshes_each_env_stack_and_expects_no_changes():
    document = workflow("drift")
    assert document["on"]["schedule"] and "workflow_dispatch" in document["on"]
    job = document["jobs"]["drift"]
    assert job["strategy"]["matrix"]["stack"] == ENV_STACKS and job["strategy"]["fail-fast"] is False
    # Its own GitHub environment (the bootstrap stack's github.driftEnvironment default), the only
    # one the drift identity accepts: it decrypts prod, which the pull-request preview identity never
    # may. The environment has no required reviewers (an unattended check must not wait for
    # approval), only the main-branch deployment rule.
    _, bootstrap = load_config(ROOT, "bootstrap")
    assert job["environment"] == bootstrap.fleet.github.drift_environment == "drift"
    runs = [s["run"] for s in steps(job) if "run" in s]
    assert runs[0] == "make venv"
    assert runs[-1].startswith(
        'pulumi preview --stack "$STACK" --refresh --expect-no-changes --non-interactive')


# --- the shell steps, run ---------------------------------------------------------------------


def step_named(name: str, job_id: str, prefix: str) -> dict:
    (step,) = [s for s in steps(workflow(name)["jobs"][job_id]) if s.get("name", "").startswith(prefix)]
    return step


def executable(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def github_bash(script: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """As GitHub runs `shell: bash`."""
    return subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", script],
                          cwd=cwd, env={**os.environ, **env}, capture_output=True, text=True, check=False)


FAKE_FLEET = """#!{python}
import json, os, sys
args = sys.argv[1:]
assert args[:3] == ["-m", "fleet", "diff"], args
opts = dict(zip(args[3::2], args[4::2]))
codes = json.loads(os.environ["FAKE_DIFF_CODES"])
with open(os.environ["FAKE_DIFF_LOG"], "a") as log:
    log.write(json.dumps(opts) + "\\n")
code = codes.get(opts["--stack"], 0)
if code in (0, 1):
    with open(opts["--output"], "w") as out:
        out.write("## " + opts["--stack"] + " diff\\n")
sys.exit(code)
"""


@pytest.mark.parametrize("codes, failed", [
    ({}, []),
    ({"staging": 1, "prod": 3}, ["staging", "prod"]),
    ({"dev": 2}, ["dev"]),
])
def test_offline_diff_step_diffs_every_stack_before_failing(tmp_path, codes, failed):
    step = step_named("preview", "offline", "Diff the offline plans")
    executable(tmp_path / ".venv/bin/python", FAKE_FLEET.format(python=sys.executable))
    summary, log = tmp_path / "summary.md", tmp_path / "calls.jsonl"
    env = {"GITHUB_STEP_SUMMARY": str(summary), "FAKE_DIFF_LOG": str(log),
           "FAKE_DIFF_CODES": json.dumps(codes), "BASE_SHA": "f" * 40}
    assert set(step["env"]) == {"BASE_SHA"}
    result = github_bash(step["run"], tmp_path, env)

    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert [c["--stack"] for c in calls] == ENV_STACKS
    assert {c["--base"] for c in calls} == {"f" * 40}
    assert (result.returncode != 0) == bool(failed)
    for stack in ENV_STACKS:
        text = (tmp_path / "pr-plan" / f"diff-{stack}.md").read_text()
        assert text in summary.read_text()
        if codes.get(stack, 0) > 1:  # the stand-in writes nothing then
            assert f"exited with code {codes[stack]}" in text
        assert (f"::error title=fleet diff {stack}::" in result.stdout) == (stack in failed)


def test_recorded_commit_is_what_the_poster_checks(tmp_path):
    step = step_named("preview", "offline", "Record the commit")
    (tmp_path / "pr-plan").mkdir()
    (tmp_path / ".venv/bin").mkdir(parents=True)
    (tmp_path / ".venv/bin/python").symlink_to(sys.executable)
    sha = "c" * 40
    result = github_bash(step["run"], tmp_path, {"HEAD_SHA": sha, "PR_NUMBER": "42"})
    assert result.returncode == 0, result.stderr
    from fleet.plan.prcomment import InputError, read_hint

    assert read_hint(tmp_path / "pr-plan", sha) == 42
    with pytest.raises(InputError):
        read_hint(tmp_path / "pr-plan", "d" * 40)


FAKE_GH = """#!{python}
import json, os, sys
args = sys.argv[1:]
body = json.load(open(args[args.index("--input") + 1])) if "--input" in args else None
with open(os.environ["FAKE_GH_LOG"], "a") as log:
    log.write(json.dumps({{"argv": args, "body": body}}) + "\\n")
"""


@pytest.fixture
def lock_repo(tmp_path):
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid", "-C", str(repo)]
    subprocess.run(git + ["init", "-q"], check=True)
    (repo / "images.lock.json").write_text('{"images": {"old": 1}}\n')
    subprocess.run(git + ["add", "images.lock.json"], check=True)
    subprocess.run(git + ["commit", "-q", "-m", "lock"], check=True)
    head = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    blob = subprocess.run(git + ["rev-parse", "HEAD:images.lock.json"],
                          capture_output=True, text=True, check=True).stdout.strip()
    executable(tmp_path / "bin/gh", FAKE_GH.format(python=sys.executable))
    artifact = tmp_path / "images-lock"
    artifact.mkdir()
    (artifact / "changes.txt").write_text("added images." + "a" * 64 + "\n")
    (tmp_path / "runner-temp").mkdir()
    env = {"PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "FAKE_GH_LOG": str(tmp_path / "gh.jsonl"),
           "GH_REPO": "acme/dstack-fleet", "BASE_BRANCH": "main", "GITHUB_SHA": head,
           "GITHUB_RUN_ID": "77", "GITHUB_RUN_ATTEMPT": "1", "GITHUB_SERVER_URL": "https://github.com",
           "ARTIFACT": str(artifact), "RUNNER_TEMP": str(tmp_path / "runner-temp")}
    return repo, env, blob


def gh_calls(env) -> list[dict]:
    path = Path(env["FAKE_GH_LOG"])
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_lock_pr_step_commits_through_the_api_from_files_and_opens_a_pull_request(lock_repo):
    repo, env, blob = lock_repo
    new_lock = '{"images": {"new": 2}}\n' + " " * 300_000  # larger than one command-line argument may be
    (Path(env["ARTIFACT"]) / "images.lock.json").write_text(new_lock)
    step = step_named("images", "lock-pr", "Open a pull request")
    assert set(step["env"]) == {"GH_TOKEN", "GH_REPO", "BASE_BRANCH", "ARTIFACT"}
    assert step["env"]["GH_TOKEN"] == "${{ steps.app-token.outputs.token }}"
    result = github_bash(step["run"], repo, env)
    assert result.returncode == 0, result.stderr
    create_ref, put, pr = gh_calls(env)
    for call in (create_ref, put, pr):
        assert "--input" in call["argv"] and not any(a.startswith(("-f", "content=")) for a in call["argv"])
    assert create_ref["argv"][:4] == ["api", "--method", "POST", "repos/acme/dstack-fleet/git/refs"]
    assert create_ref["body"] == {"ref": "refs/heads/images-lock/77-1", "sha": env["GITHUB_SHA"]}
    assert put["argv"][:4] == ["api", "--method", "PUT", "repos/acme/dstack-fleet/contents/images.lock.json"]
    assert put["body"]["branch"] == "images-lock/77-1" and put["body"]["sha"] == blob
    import base64

    assert base64.b64decode(put["body"]["content"]).decode() == new_lock
    assert pr["argv"][:4] == ["api", "--method", "POST", "repos/acme/dstack-fleet/pulls"]
    assert pr["body"]["head"] == "images-lock/77-1" and pr["body"]["base"] == "main"
    assert "added images." + "a" * 64 in pr["body"]["body"]


def test_lock_pr_step_does_nothing_when_the_lock_is_unchanged(lock_repo):
    repo, env, _ = lock_repo
    shutil.copy(repo / "images.lock.json", Path(env["ARTIFACT"]) / "images.lock.json")
    result = github_bash(step_named("images", "lock-pr", "Open a pull request")["run"], repo, env)
    assert result.returncode == 0 and "unchanged" in result.stdout
    assert gh_calls(env) == []
