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
    # docker builds are a generated step (fleet/images/dockerbuild.py), not pulumi-docker's Image
    assert not [r for r in plan.resources if r.type == "docker:index/image:Image"]
    steps = {r.name: r for r in plan.resources if r.name.endswith("-docker") and r.type == "command:local:Command"}
    assert set(steps) == {"container-hello-docker", "container-kettle-launcher-docker"}
    assert "# dstack-fleet:step=docker-build" in steps["container-hello-docker"].inputs["create"].splitlines()


def test_an_mkosi_container_is_built_by_a_step_keyed_by_the_hash_the_env_stack_looks_up():
    from fleet.apps import plans as fleet_apps
    from fleet.images import mkosibuild
    from fleet.stacks.load import load_config

    _, dev = load_config(ROOT, "dev")
    # dev's Phala app publishes it (phala.publicImages): the public build of these inputs
    assert "simple-app" in fleet_apps.public_container_keys(dev)
    origin, wanted = fleet_apps.container_build_hash(ROOT, "simple-app", dev.fleet.containers["simple-app"],
                                                     public=True)
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
    assert entry["image"] == "us-central1-docker.pkg.dev/acme-tee-ops/fleet-public/simple-app"
    assert entry["digest_kind"] == "manifest" and entry["digest"].startswith("sha256:")
    assert fleet_lock.ContainerEntry.model_validate(entry)


def test_lock_entries_flow_into_the_env_stacks(project):
    from fleet.stacks import collect
    from fleet.stacks.load import load_config

    from .test_collect import MemoryBucket, finish

    images = build_plan(project.root, "images")
    entries = reveal(images.update_run.outputs["lockEntries"])  # containers: built where pulumi runs
    # image builds: every build host finished; collect verifies them in the bucket
    _, config = load_config(project.root, "images")
    hosts, bucket = collect.hosts_of(config, project.root, fleet_lock.load(project.root)), MemoryBucket()
    for host in hosts:
        finish(bucket, host)
    collected = collect.lock_outputs(collect.collect(hosts, bucket))
    entries.update(collected["lockEntries"])
    merged, changes = fleet_lock.merge(fleet_lock.load(project.root), {"lockEntries": entries})
    assert len(changes) == len(set(env_input_hashes(project.root).values())) + 3  # + hello, kettle-launcher, simple-app
    fleet_lock.write(project.root, merged)
    # built and locked: the images stack no longer builds them ...
    again = build_plan(project.root, "images")
    assert not [r for r in again.resources if r.type == "dstack-fleet:images:BuildHost"]
    assert not [r for r in again.resources if r.type in ("dstack-fleet:images:RegistryImage",
                                                         "dstack-fleet:images:MkosiImage")]
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
