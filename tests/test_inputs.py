"""Configuration mistakes that used to end the program run ("the program failed", exit 3) or pass
unseen: each is now one line naming its key, exit 2 (fleet.stacks.inputs, fleet.config.grammar)."""

from __future__ import annotations

import os

import pytest

from fleet.cli.main import main
from fleet.stacks.inputs import dockerfile_bases, mirror_problems

from .conftest import stack_config

NS = "dstack-fleet:"


def plan_problems(capsys, project, base: str, change, name: str = "broken") -> list[str]:
    project.mutate(base, name, change)
    code = main(["--root", str(project.root), "plan", "--stack", name])
    err = capsys.readouterr().err
    assert "Traceback" not in err and "program failed" not in err, err
    assert code == 2, err
    lines = err.splitlines()
    assert lines and all(line.startswith(f"stacks/Pulumi.{name}.yaml: ") for line in lines), lines
    return lines


def app(c, target):
    return next(a for a in c[NS + "apps"] if a["target"] == target)


# (stack, change, key, message): every one of these failed inside the program run before
EXIT_3_BEFORE = [
    ("dev", lambda c: c[NS + "labels"].update(stack="x"), "labels", "are set by the program"),
    ("dev", lambda c: app(c, "gce").update(dstackVersion="0.4.0"), "apps[0].dstackVersion",
     "'0.4.0' is not a dstack release whose app-compose format is known"),
    ("staging", lambda c: app(c, "vmm").update(dstackVersion="9.9.9"), "apps[0].dstackVersion", "is not a dstack"),
    ("staging", lambda c: app(c, "vmm")["vmm"].update(ports=["tcp:0:0"]), "apps[0].vmm.ports[0]",
     "'0' is not a port number (1-65535)"),
    ("staging", lambda c: app(c, "vmm")["vmm"].update(ports=["nope"]), "apps[0].vmm.ports[0]", "expected protocol"),
    ("images", lambda c: c.update({NS + "buildFor": ["nope"]}), "buildFor[0]", "stack 'nope': stacks/Pulumi.nope.yaml: "
     "no such stack file"),
    ("images", lambda c: c.update({NS + "buildFor": ["bootstrap"]}), "buildFor[0]", "has role 'bootstrap'"),
    ("images", lambda c: c.pop(NS + "network"), "network", "is required for the images stack"),
    ("images", lambda c: c[NS + "buildHost"]["recipes"]["tplus-overlay"].update(machineType="-h"),
     "buildHost.recipes.tplus-overlay.machineType", "is not a machine type name"),
    ("images", lambda c: c[NS + "buildHost"].update(pollSeconds=10**6), "buildHost",
     "recipes.tplus-overlay.timeoutMinutes must be longer than pollSeconds"),
    ("images", lambda c: c[NS + "buildHost"]["recipes"]["tplus-overlay"].update(diskGb=10**12),
     "buildHost.recipes.tplus-overlay.diskGb", "must be at most 65536"),
    ("prod", lambda c: c[NS + "containers"]["mpc-node"]["external"].update(image="tcp:0:0"),
     "containers.mpc-node.external.image", "repository 'tcp:0' is not a path of lower-case letters"),
    ("prod", lambda c: c[NS + "containers"]["mpc-node"]["external"].update(image="x" * 300),
     "containers.mpc-node.external.image", "the repository name is 300 characters"),
    ("dev", lambda c: c[NS + "containers"]["hello"]["docker"].update(context="apps/missing"),
     "containers.hello.docker.context", "apps/missing: no such directory in the repository"),
    ("dev", lambda c: c[NS + "containers"]["hello"]["docker"].update(context="x" * 300),
     "containers.hello.docker.context", "longer than a file system allows"),
    ("dev", lambda c: c[NS + "containers"]["simple-app"]["mkosi"].update(directory="x" * 300),
     "containers.simple-app.mkosi.directory", "longer than a file system allows"),
    # a release whose app-compose needs a setting the app does not have: found by fleet.apps.compose
    ("dev", lambda c: app(c, "gce").update(dstackVersion="0.5.0"), "apps[0].settings.secureTime",
     "vmm-cli 0.5.0 always writes secure_time: true"),
    # found by the program itself (only it knows every logical name): still bad input, not a failure
    ("prod", lambda c: c.update({NS + "adopt": {"overlay-0-dta": "projects/x/zones/y/disks/z"}}),
     "adopt.overlay-0-dta", "names no resource of this stack; use the logical names shown by `make plan`"),
]


@pytest.mark.parametrize("stack, change, key, message", EXIT_3_BEFORE, ids=[c[2] for c in EXIT_3_BEFORE])
def test_mistakes_that_failed_the_program_are_configuration_errors(capsys, project, stack, change, key, message):
    lines = plan_problems(capsys, project, stack, change)
    assert any(f": {NS}{key}: " in line and message in line for line in lines), lines


# the hostile free text, and values that passed unseen
UNSEEN_BEFORE = [
    ("dev", lambda c: app(c, "phala")["phala"].update(instanceType="-h"), "apps[2].phala.instanceType",
     "is not a Phala instance type"),
    ("dev", lambda c: app(c, "phala")["services"][0].update(restart="sometimes"), "apps[2].services[0].restart",
     "is not a restart policy"),
    ("dev", lambda c: app(c, "phala")["kms"].update(urls=["not a url"]), "apps[2].kms.urls[0]", "is not a URL"),
    ("staging", lambda c: app(c, "vmm")["vmm"].update(image="../../etc"), "apps[0].vmm.image",
     "is not an image name on the VMM host"),
    ("staging", lambda c: app(c, "vmm")["vmm"].update(url="https://admin:hunter2@vmm.staging.acme.internal:9080"),
     "apps[0].vmm.url", "carries credentials"),
    ("prod", lambda c: c[NS + "overlay"].update(executionRpc="https://mainnet.infura.io/v3/9aa3d95b3bc440fa88ea12eaa4456161"),
     "overlay.executionRpc", "looks like an API key"),
    ("prod", lambda c: app(c, "gce")["kms"].update(urls=["https://kms.prod.acme.internal:8000/?token=s3cr3t"]),
     "apps[0].kms.urls[0]", "'token' looks like a credential"),
    ("prod", lambda c: app(c, "gce").update(verify={"infoUrl": "https://x.example.com/info?access_token=abc"}),
     "apps[0].verify.infoUrl", "looks like a credential"),
    ("staging", lambda c: (c.update({NS + "tier": "prod"}),
                           app(c, "vmm")["vmm"].update(url="http://vmm.staging.acme.internal:9080")),
     "apps[0].vmm.url", "prod requires https"),
    ("dev", lambda c: c[NS + "containers"]["hello"]["docker"].update(context="../../etc"),
     "containers.hello.docker.context", "leaves the repository"),
    ("dev", lambda c: c[NS + "containers"]["hello"]["docker"].update(dockerfile="../../Dockerfile"),
     "containers.hello.docker.dockerfile", "leaves the repository"),
    ("prod", lambda c: c[NS + "network"]["subnets"].update({"us-central1": "127.0.0.0/20"}),
     "network.subnets.us-central1", "loopback"),
    ("prod", lambda c: c[NS + "network"]["subnets"].update({"us-central1": "169.254.0.0/20"}),
     "network.subnets.us-central1", "link-local"),
    ("prod", lambda c: c[NS + "nodes"][0].update(addresses={"pins": ["10.30.0.10"] * 5}),
     "nodes[0].addresses.pins[1]", "10.30.0.10 is already pinned at pins[0]"),
]


@pytest.mark.parametrize("stack, change, key, message", UNSEEN_BEFORE, ids=[c[2] for c in UNSEEN_BEFORE])
def test_hostile_or_wrong_free_text_is_refused_naming_the_key(capsys, project, stack, change, key, message):
    lines = plan_problems(capsys, project, stack, change)
    assert any(f": {NS}{key}: " in line and message in line for line in lines), lines
    assert "hunter2" not in "".join(lines)


def test_a_subnet_in_shared_address_space_is_accepted(project):
    from fleet.stacks.load import load_config

    project.mutate("prod", "cgnat", lambda c: c[NS + "network"]["subnets"].update({"us-central1": "100.64.0.0/20"}) or
                   c[NS + "nodes"][0].update(addresses={"offset": 10}) or c[NS + "nodes"][1].update(addresses={"offset": 40}))
    _, config = load_config(project.root, "cgnat")
    assert config.fleet.network.subnets["us-central1"] == "100.64.0.0/20"


@pytest.mark.parametrize("stack", ["dev", "staging", "prod", "images", "bootstrap"])
def test_program_label_keys_are_the_ones_resources_carry(stack):
    """The reserved label keys are exactly those the program sets besides the user's (golden plans)."""
    import json

    from fleet.gcp.naming import PROGRAM_LABEL_KEYS

    from .conftest import ROOT

    document = json.loads((ROOT / "tests" / "golden" / f"{stack}.plan.json").read_text())
    user = set(stack_config(stack).get(NS + "labels", {}))
    labelled = [r for r in document["resources"] if isinstance(r["inputs"].get("labels"), dict)]
    assert labelled
    for resource in labelled:
        assert set(resource["inputs"]["labels"]) - user <= set(PROGRAM_LABEL_KEYS), resource["urn"]


# ---- repository files ----------------------------------------------------------------------------

def test_a_symlink_out_of_the_repository_in_a_build_context_is_refused(capsys, project, tmp_path):
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    outside.mkdir()
    os.symlink(outside, project.root / "apps" / "hello" / "escape")
    lines = plan_problems(capsys, project, "dev", lambda c: None, name="dev")
    assert any("containers.hello.docker.context: apps/hello: escape is a symlink out of the repository" in line
               for line in lines), lines


def test_a_build_context_too_large_to_hash_is_refused(capsys, project, monkeypatch):
    from fleet.stacks import inputs

    monkeypatch.setattr(inputs, "MAX_TREE_FILES", 40)  # the real bound (20,000) works the same way, slower
    bulk = project.root / "apps" / "hello" / "bulk"
    bulk.mkdir()
    for i in range(41):
        (bulk / str(i)).touch()
    lines = plan_problems(capsys, project, "dev", lambda c: None, name="dev")
    assert any("containers.hello.docker.context: apps/hello: holds more than 40 files" in line for line in lines), lines


DIGEST = "sha256:" + "6" * 64


@pytest.mark.parametrize("dockerfile, args, stages, problems", [
    (f"FROM busybox@{DIGEST}\n", {}, [], []),
    ("FROM busybox:1.36\n", {}, [], ["line 1: base image 'busybox:1.36'"]),
    (f"ARG BASE=node:20\nFROM ${{BASE}}\n", {}, [], ["line 2: base image 'node:20'"]),
    ("ARG BASE=node:20\nFROM $BASE\n", {"BASE": f"node@{DIGEST}"}, [], []),
    ("ARG BASE\nFROM ${BASE}\n", {}, [], ["line 2: FROM ${BASE} uses build arg(s) BASE with no value"]),
    (f"FROM --platform=linux/amd64 golang@{DIGEST} AS build\nFROM scratch\nCOPY --from=build /x /x\n", {},
     ["build"], []),
    (f"FROM golang@{DIGEST} AS Build\nFROM build\n", {}, ["build"], []),
    ("# escape=`\nFROM `\n  alpine:3\n", {}, [], ["line 2: base image 'alpine:3'"]),
    (f"FROM alpine@{DIGEST} \\\n  AS base\nRUN x\n", {}, ["base"], []),
])
def test_every_dockerfile_base_image_must_be_pinned(dockerfile, args, stages, problems):
    found_stages, found = dockerfile_bases(dockerfile, args)
    assert found_stages == stages
    assert len(found) == len(problems) and all(f.startswith(p) for f, p in zip(found, problems)), found


def test_an_unpinned_from_in_the_dev_app_is_a_configuration_error(capsys, project):
    dockerfile = project.root / "apps" / "hello" / "Dockerfile"
    dockerfile.write_text(dockerfile.read_text().replace(
        "FROM busybox:1.36.1@sha256:6776a33c72b3af7582a5b301e3a08186f2c21a3409f0d2b52dfddbdbe24a5b04", "FROM busybox:1.36.1"))
    lines = plan_problems(capsys, project, "dev", lambda c: None, name="dev")
    assert any(f"{NS}containers.hello.docker.dockerfile: Dockerfile: line 4: base image 'busybox:1.36.1'" in line
               for line in lines), lines


def test_a_target_that_is_no_stage_is_named(capsys, project):
    lines = plan_problems(capsys, project, "dev", lambda c: c[NS + "containers"]["hello"]["docker"].update(target="prod"))
    assert any(f"{NS}containers.hello.docker.target: 'prod' is not a stage of Dockerfile" in line for line in lines)


def test_mkosi_mirror_must_be_a_dated_snapshot(tmp_path):
    (tmp_path / "mkosi.conf").write_text("[Distribution]\nDistribution=debian\nMirror=https://snapshot.debian.org/"
                                         "archive/debian/20250901T000000Z\n")
    assert mirror_problems(tmp_path, "x") == []
    (tmp_path / "mkosi.conf.d").mkdir()
    (tmp_path / "mkosi.conf.d" / "10-mirror.conf").write_text("[Distribution]\nMirror=http://deb.debian.org/debian\n")
    (problem,) = mirror_problems(tmp_path, "x")
    assert problem.startswith("x/mkosi.conf.d/10-mirror.conf: Mirror=http://deb.debian.org/debian is not a dated "
                              "snapshot")
    (tmp_path / "mkosi.conf.d" / "10-mirror.conf").unlink()
    (tmp_path / "mkosi.conf").write_text("[Distribution]\nDistribution=debian\n")
    (problem,) = mirror_problems(tmp_path, "x")
    assert "no Mirror= in [Distribution]" in problem


def test_the_shipped_mkosi_app_is_pinned_and_a_moving_mirror_is_refused(capsys, project):
    conf = project.root / "apps" / "simple-mkosi-app" / "mkosi.conf"
    assert mirror_problems(conf.parent, "apps/simple-mkosi-app") == []
    conf.write_text(conf.read_text().replace("https://snapshot.debian.org/archive/debian/20250901T000000Z",
                                             "https://deb.debian.org/debian"))
    lines = plan_problems(capsys, project, "dev", lambda c: None, name="dev")
    assert any(f"{NS}containers.simple-app.mkosi.directory: apps/simple-mkosi-app/mkosi.conf: Mirror=" in line
               for line in lines), lines


def test_a_compose_file_that_is_not_utf8_is_named(capsys, project):
    (project.root / "compose").mkdir()
    (project.root / "compose" / "bad.yaml").write_bytes("services:\n  a:\n    image: caf\xe9\n".encode("latin-1"))

    def compose_file(c):
        entry = app(c, "vmm")
        entry.update(kind="compose", composeFile="compose/bad.yaml")
        entry.pop("nearMpc")

    lines = plan_problems(capsys, project, "staging", compose_file)
    assert any(f"{NS}apps[0].composeFile: compose/bad.yaml: is not UTF-8 text" in line for line in lines), lines


def test_problems_hidden_behind_a_pending_image_are_found(capsys, project):
    """The dev stack's Phala apps wait for images the lock lacks, so the program never renders their
    compose; the check renders it with a stand-in digest and finds what rendering would."""
    lines = plan_problems(capsys, project, "dev", lambda c: app(c, "phala").update(dstackVersion="0.5.3"))
    index = next(i for i, a in enumerate(stack_config("dev")[NS + "apps"]) if a["target"] == "phala")
    assert any(f"{NS}apps[{index}].settings.secureTime: vmm-cli 0.5.3 always writes secure_time" in line for line in lines)
