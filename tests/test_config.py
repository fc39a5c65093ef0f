"""Configuration: every shipped stack loads; bad input gives one clear line per problem."""

from __future__ import annotations

import subprocess
import sys

import pulumi
import pytest

from fleet.stacks import load as fleet_config
from fleet.config import stackfile
from fleet.plan.harness import run_program
from fleet.config.problems import ConfigError
from fleet.config.stackfile import available_stacks

from .conftest import ROOT, stack_config


def load(project, name):
    sf = stackfile.read(project.root, name)
    return fleet_config.load(sf.config, stack=name, source=sf.source, secret_keys=sf.secret_keys)


def problems_of(project, name) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(project, name)
    return info.value.lines()


@pytest.mark.parametrize("stack", available_stacks(ROOT))
def test_every_shipped_stack_loads(project, stack):
    config = load(project, stack)
    assert config.stack == stack
    assert config.fleet.role in ("bootstrap", "images", "env")


def test_env_stacks_differ_per_environment():
    configs = {s: stack_config(s) for s in ("dev", "staging", "prod")}
    projects = {c["gcp:project"] for c in configs.values()}
    tiers = [c["dstack-fleet:tier"] for c in configs.values()]
    assert len(projects) == 3 and tiers == ["dev", "staging", "prod"]
    sizes = [sum(g["count"] for g in c["dstack-fleet:nodes"]) for c in configs.values()]
    assert sizes[0] <= sizes[1] < sizes[2]  # dev runs one dstack node per example app (NEAR, kettle)
    overlay = [sum(g["count"] for g in c["dstack-fleet:nodes"] if g["kind"] == "overlay") for c in configs.values()]
    assert overlay[0] < overlay[1] < overlay[2]


def _nodes(c):
    return c["dstack-fleet:nodes"]


BAD_CONFIGS = [
    ("misspelt-top-level", lambda c: c.update({"dstack-fleet:nodez": _nodes(c)}),
     "dstack-fleet:nodez", "unknown key; did you mean 'dstack-fleet:nodes'?"),
    ("count-zero", lambda c: _nodes(c)[0].update(count=0),
     "dstack-fleet:nodes[0].count", "must be at least 1 (got 0)"),
    ("count-negative", lambda c: _nodes(c)[0].update(count=-3),
     "dstack-fleet:nodes[0].count", "must be at least 1 (got -3)"),
    ("count-not-a-number", lambda c: _nodes(c)[0].update(count="three"),
     "dstack-fleet:nodes[0].count", "must be a whole number (got 'three')"),
    ("missing-project", lambda c: c.pop("gcp:project"), "gcp:project", "is required"),
    ("misspelt-project", lambda c: c.update({"gcp:projet": c.pop("gcp:project")}),
     "gcp:projet", "did you mean 'gcp:project'?"),
    ("misspelt-nested", lambda c: _nodes(c)[0].update(maxUnavailabel=1),
     "dstack-fleet:nodes[0].maxUnavailabel", "unknown key; did you mean 'maxUnavailable'?"),
    ("zone-without-tdx", lambda c: _nodes(c)[0].update(zones=["us-central1-a", "us-central1-f"]),
     "dstack-fleet:nodes[0].zones[1]", "'us-central1-f' does not offer TDX; choose one of"),
    ("machine-without-tdx", lambda c: _nodes(c)[0].update(machineType="n2-standard-4"),
     "dstack-fleet:nodes[0].machineType", "'n2-standard-4' does not offer TDX"),
    ("machine-lssd", lambda c: _nodes(c)[0].update(machineType="c3-standard-8-lssd"),
     "dstack-fleet:nodes[0].machineType", "use the plain variant, e.g. 'c3-standard-8'"),
    ("machine-metal", lambda c: _nodes(c)[0].update(machineType="c3-highcpu-192-metal"),
     "dstack-fleet:nodes[0].machineType", "has local SSD or is bare metal"),
    ("duplicate-group", lambda c: _nodes(c).append(dict(_nodes(c)[0], addresses={"offset": 200})),
     "dstack-fleet:nodes[2].name", "group 'overlay' is already declared at nodes[0]"),
    ("bad-cidr", lambda c: c["dstack-fleet:network"]["subnets"].update({"us-central1": "10.300.0.0/20"}),
     "dstack-fleet:network.subnets.us-central1", "is not an IPv4 CIDR block"),
    ("public-cidr", lambda c: c["dstack-fleet:network"]["subnets"].update({"us-central1": "8.8.0.0/20"}),
     "dstack-fleet:network.subnets.us-central1", "is not a private range"),
    ("region-without-subnet", lambda c: _nodes(c).append(
        {"name": "eu", "kind": "overlay", "count": 1, "zones": ["europe-west4-a"], "addresses": {"offset": 10}, "image": "overlay-3eb04ca"}),
     "dstack-fleet:network.subnets.europe-west4", "is missing: region 'europe-west4' is used"),
    ("overlapping-blocks", lambda c: _nodes(c).append(
        {"name": "second", "kind": "overlay", "count": 2, "zones": ["us-central1-a"], "addresses": {"offset": 11}, "image": "overlay-3eb04ca"}),
     "dstack-fleet:nodes[2].addresses", "overlaps group 'overlay'"),
    ("block-too-big", lambda c: _nodes(c)[0].update(addresses={"offset": 4093}),
     "dstack-fleet:nodes[0].addresses.offset", "does not fit 10.30.0.0/20"),
    ("too-few-pins", lambda c: _nodes(c)[0].update(addresses={"pins": ["10.30.0.10"]}),
     "dstack-fleet:nodes[0].addresses.pins", "has 1 address(es) for 5 nodes"),
    ("pin-outside-subnet", lambda c: _nodes(c)[0].update(
        addresses={"pins": ["10.30.0.10", "10.30.0.11", "10.30.0.12", "10.30.0.13", "192.168.0.1"]}),
     "dstack-fleet:nodes[0].addresses.pins[4]", "192.168.0.1 is outside us-central1's subnet"),
    ("offset-and-pins", lambda c: _nodes(c)[0].update(addresses={"offset": 10, "pins": ["10.30.0.10"]}),
     "dstack-fleet:nodes[0].addresses", "set exactly one of 'offset' or 'pins'"),
    ("bad-role", lambda c: c.update({"dstack-fleet:role": "envv"}),
     "dstack-fleet:role", "must be one of 'bootstrap', 'images' or 'env' (got 'envv')"),
    ("env-without-tier", lambda c: c.pop("dstack-fleet:tier"),
     "dstack-fleet:tier", "is required for env stacks"),
    ("key-without-namespace", lambda c: c.update({"nodes": []}),
     "nodes", "config keys are 'namespace:key'; did you mean 'dstack-fleet:nodes'?"),
    ("zones-across-regions", lambda c: _nodes(c)[0].update(zones=["us-central1-a", "us-east1-c"]),
     "dstack-fleet:nodes[0].zones", "spans regions us-central1, us-east1"),
    ("retired-out-of-range", lambda c: _nodes(c)[0].update(retired=[7]),
     "dstack-fleet:nodes[0].retired", "ordinal 7 is not below count 5"),
    ("max-unavailable-over-count", lambda c: _nodes(c)[0].update(maxUnavailable=9),
     "dstack-fleet:nodes[0].maxUnavailable", "is 9, more than the group's 5 nodes"),
    ("zone-entry-misspelt", lambda c: _nodes(c)[0]["zones"].append({"zone": "us-east4-a", "firstOrdnial": 5}),
     "dstack-fleet:nodes[0].zones[3].firstOrdnial", "unknown key; did you mean 'firstOrdinal'?"),
    ("public-port-out-of-range", lambda c: c["dstack-fleet:network"].update(
        publicIngress=[{"port": 70000, "reason": "x", "groups": ["overlay"]}]),
     "dstack-fleet:network.publicIngress[0].port", "must be at most 65535 (got 70000)"),
    ("public-port-unknown-group", lambda c: c["dstack-fleet:network"].update(
        publicIngress=[{"port": 443, "reason": "x", "groups": ["web"]}]),
     "dstack-fleet:network.publicIngress[0].groups[0]", "no node group is named 'web'"),
]


@pytest.mark.parametrize("case,change,path,message", BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config_gives_one_line_naming_the_key(project, case, change, path, message):
    project.mutate("prod", case, change)
    lines = problems_of(project, case)
    expected = [line for line in lines if line.startswith(f"stacks/Pulumi.{case}.yaml: {path}: ")]
    assert expected, f"no problem reported for {path}; got {lines}"
    assert any(message in line for line in expected), lines
    assert all("\n" not in line for line in lines)


def test_all_problems_are_reported_at_once(project):
    def change(c):
        c.pop("gcp:project")
        c["dstack-fleet:nodez"] = []
        _nodes(c)[0]["count"] = 0
        _nodes(c)[0]["zones"] = ["us-central1-f"]

    project.mutate("prod", "many", change)
    paths = {line.split(": ")[1] for line in problems_of(project, "many")}
    assert {"gcp:project", "dstack-fleet:nodez", "dstack-fleet:nodes[0].count",
            "dstack-fleet:nodes[0].zones[0]"} <= paths


def test_broken_yaml_is_one_line_with_position(project):
    project.write_stack("broken", text="config:\n  gcp:project: [oops\n  dstack-fleet:role: env\n")
    (line,) = problems_of(project, "broken")
    assert line.startswith("stacks/Pulumi.broken.yaml: invalid YAML at line ")


def test_only_config_keys_are_checked(project):
    project.mutate("prod", "withsettings", lambda c: None)
    path = project.root / "stacks" / "Pulumi.withsettings.yaml"
    path.write_text(path.read_text() + "encryptionsalt: v1:abc\nsecretsprovider: passphrase\nenvironment: [x/y]\n")
    assert load(project, "withsettings").stack == "withsettings"


def test_unknown_stack_file_key(project):
    project.mutate("prod", "extra", lambda c: None)
    path = project.root / "stacks" / "Pulumi.extra.yaml"
    path.write_text(path.read_text() + "confgi: {}\n")
    (line,) = problems_of(project, "extra")
    assert line == "stacks/Pulumi.extra.yaml: confgi: not a stack-file key; configuration goes under 'config:'"


def test_secret_values_never_appear_in_errors(project):
    canary = "canary-9f2c1e-do-not-print"
    project.mutate("prod", "secretbad", lambda c: c.update({"dstack-fleet:secrets": {"bad name": canary}}))
    lines = problems_of(project, "secretbad")
    assert lines and all(canary not in line for line in lines)


def test_secret_outside_secrets_is_refused(project):
    project.mutate("prod", "secretnodes", lambda c: c.update(
        {"dstack-fleet:labels": {"secure": "v1:AAAA"}}))
    (line,) = problems_of(project, "secretnodes")
    assert "dstack-fleet:labels: is stored as a secret" in line


def test_top_level_scalars_are_strings_as_the_cli_passes_them(project):
    project.write_stack("scalars", {"gcp:project": "acme-tee-dev", "gcp:region": "us-central1",
                                    "dstack-fleet:role": "images", "dstack-fleet:namePrefix": "abc",
                                    "dstack-fleet:network": {"subnets": {"us-central1": "10.0.0.0/24"}},
                                    "dstack-fleet:bootstrap": {"project": "acme-tee-ops"},
                                    "dstack-fleet:buildHost": {
                                        "bootImage": "projects/ubuntu-os-cloud/global/images/ubuntu-2404-noble-amd64-v20251205"}})
    sf = stackfile.read(project.root, "scalars")
    assert all(isinstance(v, (str, dict, list)) for v in sf.config.values())
    assert load(project, "scalars").fleet.name_prefix == "abc"


@pytest.mark.parametrize("name,change,line", [
    ("misspelt", lambda c: c.update({"dstack-fleet:nodez": []}), "dstack-fleet:nodez: unknown key"),
    ("negative", lambda c: _nodes(c)[0].update(count=-1), "dstack-fleet:nodes[0].count: must be at least 1"),
    ("noproject", lambda c: c.pop("gcp:project"), "gcp:project: is required"),
])
def test_cli_plan_exits_2_with_one_line_and_no_traceback(project, name, change, line):
    project.mutate("prod", name, change)
    result = subprocess.run([sys.executable, "-m", "fleet", "--root", str(project.root), "plan", "--stack", name],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"stacks/Pulumi.{name}.yaml: {line}")
    assert "Traceback" not in result.stderr


def test_cli_plan_broken_yaml_exits_2(project):
    project.write_stack("broken", text="config: {gcp:project: x\n")
    result = subprocess.run([sys.executable, "-m", "fleet", "--root", str(project.root), "plan", "--stack", "broken"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1 and "invalid YAML" in result.stderr
    assert "Traceback" not in result.stderr


def test_real_run_raises_one_runerror_listing_every_problem(project):
    """Under a real `pulumi up` the program sees config via the runtime and fails cleanly."""
    config = stack_config("prod")
    config.pop("gcp:project")
    config["dstack-fleet:nodez"] = []
    config["dstack-fleet:nodes"][0]["count"] = 0
    with pytest.raises(pulumi.RunError) as info:
        run_program(ROOT, stack="prod", config=config, preview=True)
    message = str(info.value)
    for expected in ("stacks/Pulumi.prod.yaml: gcp:project: is required",
                     "stacks/Pulumi.prod.yaml: dstack-fleet:nodez: unknown key",
                     "stacks/Pulumi.prod.yaml: dstack-fleet:nodes[0].count: must be at least 1 (got 0)"):
        assert expected in message


def _mkosi_problems(project, change) -> list[str]:
    from fleet.stacks.load import load_config

    change(project.root / "apps" / "simple-mkosi-app")
    with pytest.raises(ConfigError) as info:
        load_config(project.root, "dev")
    return info.value.lines()


def test_an_mkosi_directory_without_a_reproducible_configuration_is_refused(project):
    def drop_epoch(directory):
        conf = directory / "mkosi.conf"
        conf.write_text("\n".join(line for line in conf.read_text().splitlines()
                                  if not line.startswith("SourceDateEpoch=")) + "\n")

    (line,) = _mkosi_problems(project, drop_epoch)
    assert line.startswith("stacks/Pulumi.dev.yaml: dstack-fleet:containers.simple-app.mkosi.directory: ")
    assert "SourceDateEpoch" in line


def test_an_mkosi_directory_that_does_not_exist_is_named(project):
    import shutil

    (line,) = _mkosi_problems(project, shutil.rmtree)
    assert line == ("stacks/Pulumi.dev.yaml: dstack-fleet:containers.simple-app.mkosi.directory: "
                    "apps/simple-mkosi-app: no such directory in the repository")


@pytest.mark.parametrize("source, path, message", [
    ({"docker": {"context": "apps/hello"}, "mkosi": {"directory": "apps/simple-mkosi-app", "command": ["x"]}},
     "dstack-fleet:containers.simple-app", "set exactly one of 'external', 'docker' or 'mkosi'"),
    ({"mkosi": {"directory": "apps/simple-mkosi-app", "command": []}},
     "dstack-fleet:containers.simple-app.mkosi.command", "at least 1"),
    ({"mkosi": {"directory": "apps/simple-mkosi-app", "command": ["x"], "ports": ["3000/quic"]}},
     "dstack-fleet:containers.simple-app.mkosi.ports[0]", "exposed port '3000/quic' is not PORT"),
    ({"mkosi": {"directory": "apps/simple-mkosi-app", "command": ["x"], "workingDir": "opt/app"}},
     "dstack-fleet:containers.simple-app.mkosi.workingDir", "'opt/app' is not an absolute path"),
])
def test_bad_mkosi_settings_name_their_key(project, source, path, message):
    project.mutate("dev", "bad", lambda c: c["dstack-fleet:containers"].update({"simple-app": source}))
    lines = problems_of(project, "bad")
    assert any(line.startswith(f"stacks/Pulumi.bad.yaml: {path}") and message in line for line in lines), lines
