"""The Docker build step, run for real against stand-in `docker` and `skopeo`: an existing immutable tag
is resolved to its digest and nothing is pushed; otherwise one build, one push, and the registry's
digest must be the one buildx pushed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fleet.config.schema import DockerBuildContainer
from fleet.images import dockerbuild, mkosibuild

from .conftest import ROOT

REPOSITORY = "us-central1-docker.pkg.dev/acme-tee-ops/fleet/hello"
INPUT_HASH = "ab" * 32
PUSHED = "sha256:" + "5" * 64

FAKE_DOCKER = f"""#!{sys.executable}
import json, os, sys
argv = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(json.dumps(["docker", *argv]) + "\\n")
assert argv[:2] == ["buildx", "build"], argv
metadata = next(a for a in argv if a.startswith("--metadata-file")) and argv[argv.index("--metadata-file") + 1]
with open(metadata, "w") as f:
    json.dump({{"containerimage.digest": os.environ["FAKE_PUSHED"], "image.name": argv[argv.index("--tag") + 1]}}, f)
open(os.environ["FAKE_STATE"], "w").write(os.environ.get("FAKE_REGISTRY_AFTER") or os.environ["FAKE_PUSHED"])
"""

FAKE_SKOPEO = f"""#!{sys.executable}
import json, os, sys
argv = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(json.dumps(["skopeo", *argv]) + "\\n")
assert "inspect" in argv and "--no-tags" in argv and argv[-1].startswith("docker://"), argv
state = os.environ["FAKE_STATE"]
if not os.path.exists(state):
    sys.exit("FATA[0000] Error parsing image name: reading manifest: manifest unknown")
print(open(state).read())
"""


@pytest.fixture
def rig(tmp_path):
    root = tmp_path / "project"
    (root / "apps" / "hello").mkdir(parents=True)
    (root / "apps" / "hello" / "Dockerfile").write_text("FROM scratch\n")
    (root / "fleet").symlink_to(ROOT / "fleet")
    (root / ".venv").symlink_to(ROOT / ".venv")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("docker", FAKE_DOCKER), ("skopeo", FAKE_SKOPEO)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_LOG=str(tmp_path / "log.jsonl"),
               FAKE_STATE=str(tmp_path / "registry"), FAKE_PUSHED=PUSHED, TMPDIR=str(tmp_path))

    def run(build: DockerBuildContainer, **extra: str):
        script = dockerbuild.step_script(build, key="hello", input_hash=INPUT_HASH, repository=REPOSITORY)
        result = subprocess.run(["bash", "-c", script], cwd=root, env={**env, **extra}, capture_output=True, text=True)
        log = tmp_path / "log.jsonl"
        calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        return result, calls

    return run, tmp_path


def build(**changes) -> DockerBuildContainer:
    return DockerBuildContainer.model_validate({"context": "apps/hello", **changes})


def test_a_new_tag_is_built_once_pushed_and_checked_against_the_registry(rig):
    run, _ = rig
    result, calls = run(build(args={"VERSION": "1 2"}, target="app"))
    assert result.returncode == 0, result.stderr
    entry = mkosibuild.parse_step_stdout(result.stdout)
    assert entry == {"image": REPOSITORY, "digest": PUSHED, "digest_kind": "manifest",
                     "source": f"images stack docker build of apps/hello (input hash {INPUT_HASH})"}
    inspect, docker, after = calls
    assert inspect[0] == after[0] == "skopeo" and inspect[-1] == f"docker://{REPOSITORY}:{INPUT_HASH[:32]}"
    assert docker[:6] == ["docker", "buildx", "build", "--platform", "linux/amd64", "--file"]
    for flag in ("--build-arg=VERSION=1 2", "--target=app", "--provenance=false", "--sbom=false", "--push"):
        assert flag in docker
    assert docker[docker.index("--tag") + 1] == f"{REPOSITORY}:{INPUT_HASH[:32]}" and docker[-1] == "apps/hello"


def test_an_existing_immutable_tag_is_resolved_to_its_digest_and_not_pushed_again(rig):
    run, tmp = rig
    existing = "sha256:" + "7" * 64
    (tmp / "registry").write_text(existing)
    result, calls = run(build())
    assert result.returncode == 0, result.stderr
    entry = mkosibuild.parse_step_stdout(result.stdout)
    assert entry["digest"] == existing and "an existing immutable tag" in entry["source"]
    assert [c[0] for c in calls] == ["skopeo"]  # no docker call at all


def test_a_registry_that_reports_another_digest_gives_no_lock_entry(rig):
    run, _ = rig
    result, _ = run(build(), FAKE_REGISTRY_AFTER="sha256:" + "9" * 64)
    assert result.returncode != 0 and result.stdout == ""
    assert "the registry reports sha256:" + "9" * 64 in result.stderr and "no lock entry" in result.stderr


def test_the_step_passes_shellcheck_and_quotes_hostile_values():
    hostile = build(args={"X": "$(reboot)'; rm -rf /"})
    script = dockerbuild.step_script(hostile, key="hello", input_hash=INPUT_HASH, repository=REPOSITORY)
    lint = subprocess.run([str(Path(sys.executable).parent / "shellcheck"), "-s", "bash", "-"], input=script,
                          capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout
    assert "--build-arg=X=$(reboot)'\"'\"'; rm -rf /'" in script
    with pytest.raises(dockerbuild.DockerBuildError):
        dockerbuild.step_script(build(), key="hello", input_hash="x", repository=REPOSITORY)
