"""The images workflow's two halves, played end to end against fakes.

The steps' own `run:` scripts run, in the order the workflow runs them, against: a fake `pulumi`
that applies the offline plan of the images stack to a state file (and so creates and deletes
resources as a real `pulumi up` would), a fake `gcloud storage` over a directory (the bucket), fake
build hosts that finish (or fail) the way the build script does, `make collect`, `make lock`, and a
fake `gh` for the lock pull request. It ends with the lock entry recorded and the build host deleted.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .conftest import ROOT
from .test_deploy import ENCRYPTED_KEY
from .test_buildscript import FAKE_GCLOUD, RECORD
from .test_workflows import FAKE_GH, executable, github_bash, step_named, workflow

FAKE_PULUMI = """#!{python}
import atexit, json, os, shutil, subprocess, sys, tempfile
args = sys.argv[1:]
cloud = os.environ["FAKE_CLOUD"]
with open(os.path.join(cloud, "pulumi.log"), "a") as log:
    log.write(json.dumps(args) + "\\n")
if args == ["version"]:
    print("v" + open(os.path.join(os.environ["FLEET_ROOT"], ".pulumi-version")).read().strip())
    sys.exit(0)
root = args[args.index("--cwd") + 1] if "--cwd" in args else os.getcwd()
if "select" in args:
    sys.exit(0)
if args[:2] == ["stack", "output"] or args[2:4] == ["stack", "output"]:
    # container builds ran where `up` ran; this play is about the image builds
    print(json.dumps({{"lockEntries": {{"containers": {{}}}}}}))
    sys.exit(0)
if "export" in args:  # the checkpoint format of `pulumi stack export`, from what this fake up recorded
    stack = args[args.index("--stack") + 1]
    state_file = os.path.join(cloud, "state-" + stack + ".json")
    state = json.load(open(state_file)) if os.path.exists(state_file) else {{}}
    print(json.dumps({{"version": 3, "deployment": {{"resources": [
        {{"urn": u, "type": r["type"], "custom": True, "inputs": r["inputs"], "outputs": r["inputs"]}}
        for u, r in sorted(state.items())]}}}}))
    sys.exit(0)
if "up" in args:
    stack = args[args.index("--stack") + 1]
    plan_dir = tempfile.mkdtemp()
    atexit.register(shutil.rmtree, plan_dir, True)
    plan_file = os.path.join(plan_dir, "plan.json")
    subprocess.run([sys.executable, "-m", "fleet", "--root", root, "plan", "--stack", stack, "--json", plan_file],
                   check=True, stdout=subprocess.DEVNULL, cwd=os.environ["FLEET_CODE"])
    wanted = {{r["urn"]: r for r in json.load(open(plan_file))["resources"]}}
    state_file = os.path.join(cloud, "state-" + stack + ".json")
    state = json.load(open(state_file)) if os.path.exists(state_file) else {{}}
    for urn in sorted(set(state) - set(wanted)):
        with open(os.path.join(cloud, "events.jsonl"), "a") as log:
            log.write(json.dumps({{"op": "delete", "urn": urn, "type": state[urn]["type"]}}) + "\\n")
        if state[urn]["type"] == "gcp:compute/instance:Instance":
            os.remove(os.path.join(cloud, "instances", state[urn]["inputs"]["name"] + ".json"))
    for urn in sorted(set(wanted) - set(state)):
        r = wanted[urn]
        with open(os.path.join(cloud, "events.jsonl"), "a") as log:
            log.write(json.dumps({{"op": "create", "urn": urn, "type": r["type"]}}) + "\\n")
        if r["type"] == "gcp:compute/instance:Instance":
            os.makedirs(os.path.join(cloud, "instances"), exist_ok=True)
            json.dump(r["inputs"], open(os.path.join(cloud, "instances", r["inputs"]["name"] + ".json"), "w"))
    json.dump({{u: {{"type": r["type"], "inputs": r["inputs"]}} for u, r in wanted.items()}}, open(state_file, "w"))
    sys.exit(0)
sys.exit("fake pulumi: unsupported " + " ".join(args))
"""

# A build host that finishes: what the build script leaves in the bucket, through the same gcloud
# calls (outputs.json last), with the lock entry's fields as the script's OUTPUTS_PROGRAM writes them.
FAKE_HOST = RECORD + r'''
import hashlib, subprocess, tempfile
instance = json.load(open(sys.argv[1]))
script = instance["metadata"]["startup-script"]
values = {}
for line in script.splitlines():
    if line.startswith("readonly ") and "=" in line and "(" not in line.split("=", 1)[1][:1]:
        import shlex
        name, value = line[len("readonly "):].split("=", 1)
        try:
            values[name] = shlex.split(value)[0] if value else ""
        except (ValueError, IndexError):
            pass
prefix, digest, recipe = values["PREFIX"], values["INPUT_HASH"], values["RECIPE"]
work = tempfile.mkdtemp()
import atexit, shutil
atexit.register(shutil.rmtree, work, True)
def put(name, data):
    path = os.path.join(work, name)
    open(path, "wb").write(data)
    subprocess.run(["gcloud", "storage", "cp", path, prefix + "/" + name], check=True)
put("started.json", json.dumps({"started_at": "2026-03-01T10:00:00Z"}).encode())
put("build.log", b"built twice, identical\n")
if os.environ.get("FAKE_HOST_FAILS") == recipe:
    put("failure.txt", b"build of input hash " + digest.encode() + b" failed with exit status 1; see build.log\n")
    sys.exit(0)
tarball = b"disk.raw tarball of " + digest.encode()
put("disk.tar.gz", tarball)
sha = hashlib.sha256(tarball).hexdigest()
put("disk.tar.gz.sha256", (sha + "  disk.tar.gz\n").encode())
described = subprocess.run(["gcloud", "storage", "objects", "describe", prefix + "/disk.tar.gz",
                            "--format=value(generation,crc32c_hash)"], capture_output=True, text=True, check=True)
generation, crc = described.stdout.split()
document = {"inputHash": digest, "recipe": recipe, "label": values["LABEL"], "source": values["SOURCE"],
            "built_at": "2026-03-01T11:00:00Z",
            "artifact": {"url": prefix + "/disk.tar.gz", "generation": generation, "crc32c": crc, "sha256": sha},
            "details": {"mode": "remote"}}
if recipe == "dstack-os":
    document.update(os_image_hash=hashlib.sha256(b"sha256sum.txt").hexdigest(), rootfs_hash="5e" * 32)
put("outputs.json", json.dumps(document, indent=2, sort_keys=True).encode())
'''


@pytest.fixture
def play(tmp_path, project):
    """The project copy (its stacks and lock), fakes on PATH, and the environment the steps see."""
    # the steps run in the checkout, here the project copy; its code and .venv are this repository's
    shutil.copy(ROOT / "Makefile", project.root / "Makefile")
    (project.root / ".venv").symlink_to(ROOT / ".venv")
    # an images stack initialised once by the operator (docs/operations.md, "First time in a new GCP project")
    stack_file = project.root / "stacks" / "Pulumi.images.yaml"
    document = yaml.safe_load(stack_file.read_text())
    document["encryptedkey"] = ENCRYPTED_KEY
    stack_file.write_text(yaml.safe_dump(document, sort_keys=False))
    cloud, bin_dir, gcs, temp = (tmp_path / d for d in ("cloud", "bin", "gcs", "runner-temp"))
    for d in (cloud, bin_dir, gcs, temp):
        d.mkdir()
    executable(bin_dir / "pulumi", FAKE_PULUMI.format(python=sys.executable))
    executable(bin_dir / "gcloud", f"#!{sys.executable}\n{FAKE_GCLOUD}")
    executable(bin_dir / "fake-build-host", f"#!{sys.executable}\n{FAKE_HOST}")
    executable(bin_dir / "gh", FAKE_GH.format(python=sys.executable))
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_CLOUD": str(cloud), "FAKE_GCS": str(gcs),
           "STUB_LOG": str(tmp_path / "stub.log"), "FAKE_GH_LOG": str(tmp_path / "gh.jsonl"),
           "FLEET_ROOT": str(project.root), "FLEET_CODE": str(ROOT), "PYTHONPATH": str(ROOT), "PY_DEPS": "",
           "PULUMI_BACKEND_URL": "gs://acme-tee-ops-fleet-state", "FLEET_UP_YES": "1", "RUNNER_TEMP": str(temp),
           "GITHUB_SHA": "0" * 40, "GITHUB_RUN_ID": "91", "GITHUB_RUN_ATTEMPT": "1",
           "GITHUB_SERVER_URL": "https://github.com", "GH_REPO": "acme/dstack-fleet", "BASE_BRANCH": "main"}
    return project.root, cloud, env


def run_step(job: str, name: str, env: dict) -> subprocess.CompletedProcess:
    step = step_named("images", job, name)
    result = github_bash(step["run"], Path(env["FLEET_ROOT"]), env)
    assert result.returncode == 0, f"{job}/{name}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def instances(cloud: Path) -> dict[str, dict]:
    folder = cloud / "instances"
    return {p.stem: json.loads(p.read_text()) for p in folder.glob("*.json")} if folder.is_dir() else {}


def events(cloud: Path) -> list[dict]:
    path = cloud / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_start_then_collect_ends_with_lock_entries_and_deleted_hosts(play):
    root, cloud, env = play
    env = {**env, "FAKE_HOST_FAILS": "tplus-overlay"}  # every overlay build fails, every dstack-os build finishes

    # --- start: `make up STACK=images` creates one build host per missing build, and returns
    run_step("start", "pulumi up", env)
    hosts = instances(cloud)
    recipes = {h["labels"]["recipe"] for h in hosts.values()}
    assert recipes == {"tplus-overlay", "dstack-os"} and len(hosts) >= 2

    # a collect before any host finished records nothing and deletes nothing
    run_step("collect", "Collect finished", env)
    assert json.loads((Path(env["RUNNER_TEMP"]) / "collected.json").read_text()) == {
        "lockEntries": {"images": {}, "failed": {}}}

    # --- the hosts run (hours later): each leaves its outputs, or its failure and log, in the bucket
    for path in sorted((cloud / "instances").glob("*.json")):
        subprocess.run(["fake-build-host", str(path)], env={**os.environ, **env}, check=True)

    # --- collect: verify in the bucket, record in the lock, delete the collected hosts
    collected = run_step("collect", "Collect finished", env).stdout
    assert "finished: dstack-os" in collected and "failed: tplus-overlay" in collected
    run_step("collect", "Record them", env)
    lock = json.loads((root / "images.lock.json").read_text())
    built = {h["labels"]["input_hash"]: h for h in hosts.values() if h["labels"]["recipe"] == "dstack-os"}
    failed = {h["labels"]["input_hash"]: h for h in hosts.values() if h["labels"]["recipe"] == "tplus-overlay"}
    assert {k[:32] for k in lock["images"]} == set(built)
    for digest, entry in lock["images"].items():
        assert entry["artifact"]["url"] == f"gs://acme-tee-ops-fleet-images/{digest}/disk.tar.gz"
        assert entry["recipe"] == "dstack-os" and entry["os_image_hash"]
    assert {k[:32] for k in lock["failed"]} == set(failed)
    for digest, entry in lock["failed"].items():
        assert entry["log"] == f"gs://acme-tee-ops-fleet-images/{digest}/build.log"  # kept in the bucket
        assert (Path(env["FAKE_GCS"]) / "objects" / "acme-tee-ops-fleet-images" / digest / "build.log").exists()

    before = set(instances(cloud))
    run_step("collect", "Delete the collected build hosts", env)
    assert instances(cloud) == {}, "every collected host (finished or failed) is deleted"
    deleted = {e["urn"].rsplit("::", 1)[1] for e in events(cloud)
               if e["op"] == "delete" and e["type"] == "gcp:compute/instance:Instance"}
    assert {h["name"] for h in hosts.values()} == before and len(deleted) == len(before)
    assert not [e for e in events(cloud) if e["op"] == "delete" and "storage" in e["type"]]  # artifacts stay

    # --- a later start builds nothing again: built and failed hashes are both settled
    run_step("start", "pulumi up", env)
    assert instances(cloud) == {}

    # --- lock-pr proposes exactly the collected lock, from files
    artifact = root / "lock-pr"
    assert (artifact / "images.lock.json").read_text() == (root / "images.lock.json").read_text()
    # lock-pr runs in a fresh checkout of main: the lock as it was before this collect
    shutil.copy(ROOT / "images.lock.json", root / "images.lock.json")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid", "-C", str(root)]
    subprocess.run(git + ["init", "-q"], check=True)
    subprocess.run(git + ["add", "images.lock.json"], check=True)
    subprocess.run(git + ["commit", "-q", "-m", "main"], check=True)
    head = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    run_step("lock-pr", "Open a pull request", {**env, "ARTIFACT": str(artifact), "GITHUB_SHA": head})
    calls = [json.loads(line) for line in Path(env["FAKE_GH_LOG"]).read_text().splitlines()]
    put = next(c for c in calls if c["argv"][2] == "PUT")
    import base64

    assert json.loads(base64.b64decode(put["body"]["content"])) == lock
    pull = next(c for c in calls if c["argv"][3].endswith("/pulls"))
    assert "added images." in pull["body"]["body"] and "added failed." in pull["body"]["body"]
