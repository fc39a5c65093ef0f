"""The images stack builds exactly what the env stacks declare and the lock lacks, and its outputs
flow through `make lock` into the env stacks."""

from __future__ import annotations

import json

import pytest

from fleet.images import lock as fleet_lock
from fleet.nodes import boot_images
from fleet.plan.planner import build_plan
from fleet.config.values import reveal
from tests.plans import shipped_plan

from .conftest import ROOT


def env_input_hashes(root):
    from fleet.images import versions as fleet_images
    from fleet.gcp.naming import Namer
    from fleet.stacks.load import load_config

    out = {}
    for stack in ("dev", "staging", "prod"):
        _, config = load_config(root, stack)
        namer = Namer(config.fleet.name_prefix, stack, config.gcp.project)
        for key, version in boot_images.resolve_for_stack(config, fleet_lock.load(root), namer).items():
            if version.origin == "build":
                out[(stack, key)] = version.content_hash
    return out


def test_one_build_host_per_input_hash_the_env_stacks_declare():
    plan = shipped_plan("images")
    hosts = [r for r in plan.resources if r.type == "dstack-fleet:images:BuildHost"]
    wanted = set(env_input_hashes(ROOT).values())
    assert {r.name for r in hosts} == {f"build-{h[:12]}" for h in wanted}
    assert set(plan.outputs["builds"]["images"]) == wanted
    for r in plan.resources:
        if r.type == "gcp:compute/instance:Instance":
            assert "accessConfigs" not in r.inputs["networkInterfaces"][0]
            assert "cloud-platform" not in json.dumps(r.inputs["serviceAccount"])
            assert r.inputs["bootDisk"]["initializeParams"]["image"].startswith("projects/ubuntu-os-cloud/global/images/")
    assert [r.name for r in plan.resources if r.type == "docker:index/image:Image"] == [
        "container-hello", "container-kettle-launcher"]


def test_an_mkosi_container_is_built_by_a_step_keyed_by_the_hash_the_env_stack_looks_up():
    from fleet.apps import plans as fleet_apps
    from fleet.images import mkosibuild
    from fleet.stacks.load import load_config

    _, dev = load_config(ROOT, "dev")
    origin, wanted = fleet_apps.container_build_hash(ROOT, "simple-app", dev.fleet.containers["simple-app"])
    assert origin == "mkosi"
    plan = shipped_plan("images")
    (component,) = [r for r in plan.resources if r.type == "dstack-fleet:images:MkosiImage"]
    (step,) = [r for r in plan.resources if r.type == "command:local:Command" and r.parent == component.urn]
    assert step.inputs["triggers"] == [wanted]
    assert step.inputs["interpreter"] == ["/bin/bash", "-c"]
    assert mkosibuild.STEP_MARK + mkosibuild.STEP in step.inputs["create"].splitlines()
    assert f"readonly INPUT_HASH={wanted}" in step.inputs["create"]
    assert plan.outputs["builds"]["containers"][wanted]["builder"] == "mkosi"
    # the update pass parses the step's stdout (an offline stand-in of the real shape) into a lock entry
    entry = reveal(plan.update_run.outputs["lockEntries"])["containers"][wanted]
    assert entry["image"] == "us-central1-docker.pkg.dev/acme-tee-ops/fleet/simple-app"
    assert entry["digest_kind"] == "manifest" and entry["digest"].startswith("sha256:")
    assert fleet_lock.ContainerEntry.model_validate(entry)


def test_lock_entries_flow_into_the_env_stacks(project):
    images = build_plan(project.root, "images")
    entries = reveal(images.update_run.outputs["lockEntries"])
    merged, changes = fleet_lock.merge(fleet_lock.load(project.root), {"lockEntries": entries})
    assert len(changes) == len(set(env_input_hashes(project.root).values())) + 3  # + hello, kettle-launcher, simple-app
    fleet_lock.write(project.root, merged)
    # built and locked: the images stack no longer builds them ...
    again = build_plan(project.root, "images")
    assert not [r for r in again.resources if r.type == "dstack-fleet:images:BuildHost"]
    assert not [r for r in again.resources if r.type in ("docker:index/image:Image", "dstack-fleet:images:MkosiImage")]
    # ... and the env stacks create GCP images from the locked artifacts
    prod = build_plan(project.root, "prod")
    assert prod.outputs["images"]["overlay-3eb04ca"]["status"] == "built"
    assert [r for r in prod.resources if r.type == "gcp:compute/image:Image" and r.name.startswith("image-")]
    dev = build_plan(project.root, "dev")
    assert dev.outputs["apps"]["hello-dev"]["pending"] == []
    assert dev.outputs["apps"]["simple-mkosi-dev"]["pending"] == []
    (simple,) = [e for e in entries["containers"].values() if e["image"].endswith("/simple-app")]
    assert dev.outputs["apps"]["simple-mkosi-dev"]["images"] == {
        "services.simple-mkosi-app.image": f"{simple['image']}@{simple['digest']}"}
    # with its image built, the Phala app is deployed, and its identity is what Phala reports
    assert dev.outputs["appTargets"]["hello-dev"]["values"] == "reported"
    assert [r for r in dev.resources if r.type == "command:local:Command" and r.name.startswith("hello-dev")]


# ---------------------------------------------------------------------------------------------
# docker builds: no None sent to the provider, and never a push to a tag the registry already holds


def hello_resources(plan):
    component = next(r for r in plan.resources if r.type == "dstack-fleet:images:RegistryImage")
    children = {r.type: r for r in plan.resources if r.parent == component.urn}
    return children["docker:index/image:Image"], children["command:local:Command"]


def with_build_settings(project, **settings):
    project.mutate("dev", "dev", lambda c: c["dstack-fleet:containers"]["hello"]["docker"].update(settings))


def test_docker_build_inputs_hold_only_what_is_set(project):
    """Before: `args: null` and `target: null` reached pulumi-docker."""
    image, _ = hello_resources(shipped_plan("images"))
    assert image.inputs["build"] == {"context": "apps/hello", "dockerfile": "apps/hello/Dockerfile",
                                     "platform": "linux/amd64"}
    assert None not in image.inputs.values() and None not in image.inputs["build"].values()
    with_build_settings(project, args={"VERSION": "1"}, target="runtime")
    image, _ = hello_resources(build_plan(project.root, "images"))
    assert image.inputs["build"]["args"] == {"VERSION": "1"} and image.inputs["build"]["target"] == "runtime"


def test_every_docker_build_pushes_to_a_tag_of_its_own(project, tmp_path):
    """The registry's tags are immutable and a Docker build is not reproducible: a rebuild of the same input
    hash (state lost, the resource replaced) pushing to the first build's tag would be refused. The tag is
    the input hash plus a nonce made once per build and kept in state."""
    import subprocess

    from fleet.images import dockerbuild

    plan = shipped_plan("images")
    image, step = hello_resources(plan)
    input_hash = next(r for r in plan.resources if r.type == "dstack-fleet:images:RegistryImage").inputs["inputHash"]
    assert str(image.inputs["imageName"]) == "<computed>"  # a new build's tag is made when it runs
    assert step.inputs["triggers"][0] == input_hash  # any new build input makes a new nonce ...
    assert json.loads(step.inputs["triggers"][1]) == image.inputs["build"]  # ... so a new tag
    # the step prints a fresh nonce every time it runs (a new resource after lost state runs it again)
    nonces = {subprocess.run(["/bin/bash", "-c", step.inputs["create"]], capture_output=True, text=True,
                             check=True).stdout for _ in range(3)}
    assert len(nonces) == 3
    tags = {dockerbuild.push_tag(input_hash, n) for n in nonces}
    assert all(t.startswith(input_hash[:32] + "-") and dockerbuild.TAG_RE.fullmatch(t) for t in tags)
    # the update pass pushes to <repository>:<input hash[:32]>-<nonce>; the lock gets the pushed digest
    pushed = plan.update_run.by_urn()[image.urn].inputs["imageName"]
    repository, _, tag = pushed.rpartition(":")
    assert repository == "us-central1-docker.pkg.dev/acme-tee-ops/fleet/hello"
    assert tag.startswith(input_hash[:32] + "-") and dockerbuild.NONCE_RE.fullmatch(tag.rsplit("-", 1)[1])
    entry = reveal(plan.update_run.outputs["lockEntries"])["containers"][input_hash]
    assert entry["image"] == repository and entry["digest"].startswith("sha256:")
    # a changed build setting is a new nonce step (replaced through its triggers)
    with_build_settings(project, target="runtime")
    _, changed = hello_resources(build_plan(project.root, "images"))
    assert changed.inputs["triggers"] != step.inputs["triggers"]
    with pytest.raises(dockerbuild.DockerBuildError, match="not 8 hex digits"):
        dockerbuild.push_tag(input_hash, "oops")
