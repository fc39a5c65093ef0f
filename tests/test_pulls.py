"""Pulls that work: every image a node or CVM runs can be pulled by it, and the plan says from where.

GCE dstack nodes pull Docker Hub images through the bootstrap's mirror and built images from the app
registry, after the measured pre-launch script logged Docker in with the node's own service-account
token; Phala Cloud pulls anonymously, so an app's built images go to the public-read repository it
opted in to (fleet/apps/pulls.py cites the pinned dstack source this follows)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from fleet.apps import pulls
from fleet.apps.imageref import parse_image_ref
from fleet.plan.planner import build_plan

from .conftest import ROOT

REGISTRIES = pulls.Registries(app="us-central1-docker.pkg.dev/acme-tee-ops/fleet",
                              mirror="us-central1-docker.pkg.dev/acme-tee-ops/fleet-dockerhub",
                              public="us-central1-docker.pkg.dev/acme-tee-ops/fleet-public")
DIGEST = "sha256:" + "1f" * 32


@pytest.mark.parametrize("reference,expected", [
    (f"nginx@{DIGEST}", f"us-central1-docker.pkg.dev/acme-tee-ops/fleet-dockerhub/library/nginx@{DIGEST}"),
    (f"docker.io/nearone/mpc-launcher@{DIGEST}",
     f"us-central1-docker.pkg.dev/acme-tee-ops/fleet-dockerhub/nearone/mpc-launcher@{DIGEST}"),
    (f"nearone/mpc-node:v1@{DIGEST}",
     f"us-central1-docker.pkg.dev/acme-tee-ops/fleet-dockerhub/nearone/mpc-node:v1@{DIGEST}"),
    (f"ghcr.io/acme/tool@{DIGEST}", f"ghcr.io/acme/tool@{DIGEST}"),
    (f"us-central1-docker.pkg.dev/acme-tee-ops/fleet/hello@{DIGEST}",
     f"us-central1-docker.pkg.dev/acme-tee-ops/fleet/hello@{DIGEST}"),
])
def test_docker_hub_images_go_through_the_mirror_with_the_same_digest(reference, expected):
    assert str(pulls.through_mirror(parse_image_ref(reference), REGISTRIES)) == expected


@pytest.mark.parametrize("target,reference,source,auth", [
    ("gce", f"us-central1-docker.pkg.dev/acme-tee-ops/fleet-dockerhub/library/nginx@{DIGEST}", "docker-hub-mirror",
     pulls.NODE_AUTH),
    ("gce", f"us-central1-docker.pkg.dev/acme-tee-ops/fleet/hello@{DIGEST}", "app-registry", pulls.NODE_AUTH),
    ("gce", f"ghcr.io/acme/tool@{DIGEST}", "direct", pulls.ANONYMOUS),
    ("phala", f"us-central1-docker.pkg.dev/acme-tee-ops/fleet-public/hello@{DIGEST}", "public-app-registry",
     pulls.ANONYMOUS),
    ("phala", f"us-central1-docker.pkg.dev/acme-tee-ops/fleet/hello@{DIGEST}", "app-registry",
     "none available to this target"),
    ("phala", f"docker.io/library/nginx@{DIGEST}", "direct", pulls.ANONYMOUS),
])
def test_each_pull_says_where_from_and_how(target, reference, source, auth):
    pull = pulls.route("services.x.image", reference, target, REGISTRIES)
    assert (pull.source, pull.auth) == (source, auth)


FAKE = """#!{python}
import json, os, sys
with open(os.environ["CALLS"], "a") as log:
    log.write(json.dumps({{"tool": os.path.basename(sys.argv[0]), "argv": sys.argv[1:],
                          "stdin": sys.stdin.read() if os.path.basename(sys.argv[0]) == "docker" else None}}) + "\\n")
if os.path.basename(sys.argv[0]) == "curl":
    print(json.dumps({{"access_token": "ya29.node-token", "expires_in": 3599, "token_type": "Bearer"}}))
"""


def test_the_login_script_logs_docker_in_with_the_metadata_token_and_leaves_nothing_behind(tmp_path):
    script = pulls.login_script("us-central1-docker.pkg.dev")
    assert script == script.strip()  # vmm-cli strips the pre-launch script: no whitespace around it
    shellcheck = Path(sys.executable).parent / "shellcheck"  # comes with the venv
    lint = subprocess.run([str(shellcheck), "-s", "bash", "-"], input=script, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout
    for tool in ("curl", "docker"):
        path = tmp_path / tool
        path.write_text(FAKE.format(python=sys.executable))
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    env = {"PATH": f"{tmp_path}:{os.environ['PATH']}", "CALLS": str(tmp_path / "calls.jsonl")}
    # app-compose.sh sources the pre-launch script into its own shell
    result = subprocess.run(["bash", "-c", f"source <(printf '%s' \"$SCRIPT\"); declare -F | grep -c dstack_fleet || true"],
                            env={**env, "SCRIPT": script}, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "0", result.stderr
    curl, docker = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    assert curl["argv"][-1] == pulls.METADATA_TOKEN_URL and "Metadata-Flavor: Google" in curl["argv"]
    assert docker["argv"] == ["login", "--username", "oauth2accesstoken", "--password-stdin",
                              "https://us-central1-docker.pkg.dev"]
    assert docker["stdin"] == "ya29.node-token"  # the token never reaches a command line


@pytest.fixture(scope="module")
def dev_plan():
    return build_plan(ROOT, "dev")


def test_the_gce_app_pulls_through_the_mirror_after_the_measured_login(dev_plan):
    (config_step,) = [r for r in dev_plan.resources if r.type == "command:local:Command"
                      and r.name.startswith("apps-0-config-") and r.name.endswith("-build")]
    files = {name: __import__("base64").b64decode(data).decode()
             for name, data in json.loads(config_step.inputs["stdin"]).items()}
    app_compose = json.loads(files["app-compose.json"])
    mirror = "us-central1-docker.pkg.dev/acme-tee-ops/fleet-dockerhub/nearone/mpc-launcher@sha256:"
    assert mirror in app_compose["docker_compose_file"] and "image: docker.io" not in app_compose["docker_compose_file"]
    assert app_compose["pre_launch_script"] == pulls.login_script("us-central1-docker.pkg.dev")
    # the mirror cannot be Docker's registry-mirrors (no credentials, other URL layout): left unset
    assert "docker_registry" not in json.loads(files[".sys-config.json"])
    paths = dev_plan.outputs["pulls"]["app:mpc-dev"]
    assert paths["target"] == "gce" and paths["nodes"] == ["apps-0"]
    assert paths["images"]["services.launcher.image"] == {"image": mirror + "1f54b55bad22c45067228a9262bc6377e393ca1a07edb64e691e80704f49b74e",
                                                          "from": "docker-hub-mirror", "auth": pulls.NODE_AUTH}
    # the MPC node image is pulled by the launcher itself, from Docker Hub by default
    assert paths["images"]["launcher: nearMpc.mpcImage"]["from"] == "direct (the launcher pulls it)"


def test_phala_apps_pull_their_built_images_from_the_public_repository(dev_plan):
    for app, key in (("hello-dev", "hello"), ("simple-mkosi-dev", "simple-app")):
        pull = dev_plan.outputs["pulls"][f"app:{app}"]["images"][f"containers.{key}"]
        assert pull == {"image": f"us-central1-docker.pkg.dev/acme-tee-ops/fleet-public/{key}@(pending build)",
                        "from": "public-app-registry", "auth": pulls.ANONYMOUS}
    images = build_plan(ROOT, "images")
    repositories = {c["key"]: c["repository"] for c in images.outputs["builds"]["containers"].values()}
    assert repositories["hello"] == "us-central1-docker.pkg.dev/acme-tee-ops/fleet-public/hello"


def test_a_phala_app_with_built_images_must_opt_in_to_publishing_them(project):
    from fleet.config.problems import ConfigError
    from fleet.stacks.load import load_config

    def change(config):
        for app in config["dstack-fleet:apps"]:
            if app["target"] == "phala":
                app["phala"].pop("publicImages")
    project.mutate("dev", "dev", change)
    with pytest.raises(ConfigError) as info:
        load_config(project.root, "dev")
    lines = [line for line in info.value.lines() if ".phala.publicImages" in line]
    assert len(lines) == 2 and "cannot read the private registry" in lines[0]


def test_publishing_is_another_build_so_a_private_image_is_never_relabelled(project):
    from fleet.apps import plans
    from fleet.stacks.load import load_config

    _, config = load_config(project.root, "dev")
    source = config.fleet.containers["hello"]
    assert plans.container_build_hash(project.root, "hello", source)[1] != plans.container_build_hash(
        project.root, "hello", source, public=True)[1]


def test_an_app_that_pulls_docker_hub_directly_keeps_its_compose_and_needs_no_login():
    """prod's stateful app keeps the references it was deployed with (dockerHub: direct): the mirror
    would be named in its measured compose and give it a new identity."""
    prod = build_plan(ROOT, "prod")
    paths = prod.outputs["pulls"]["app:mpc-prod"]
    assert paths["nodes"] == ["apps-0", "apps-1"]
    launcher = paths["images"]["services.launcher.image"]
    assert launcher["from"] == "direct" and launcher["auth"] == pulls.ANONYMOUS
    assert launcher["image"].startswith("docker.io/nearone/mpc-launcher@sha256:")
    for step in [r for r in prod.resources if r.name.endswith("-build") and "-config-" in r.name]:
        files = json.loads(step.inputs["stdin"])
        app_compose = json.loads(__import__("base64").b64decode(files["app-compose.json"]))
        assert "pre_launch_script" not in app_compose
