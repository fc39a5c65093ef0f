"""The CrossGuard pack under policies/: its own hash-locked environment, the analyzer it serves, and
the offline plan's verdicts on the shipped and mutated stacks."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import re
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import yaml
from google.protobuf import empty_pb2, struct_pb2
from pulumi.runtime.proto import analyzer_pb2, analyzer_pb2_grpc
from pulumi_policy.proxy import UNKNOWN_STRING_VALUE

from fleet.policy import rules
from fleet.plan.planner import build_plan
from fleet.config.stackfile import available_stacks
from fleet.cli.main import main as cli_main
from tests.plans import shipped_plan

from .conftest import ROOT

PACK = ROOT / "policies"
REQUIREMENT = re.compile(r"^([A-Za-z0-9_.-]+)==(\S+)")


def requirement_blocks(path: Path) -> dict[str, tuple[str, frozenset[str]]]:
    """name -> (version, hashes) of a hash-locked requirements file."""
    out: dict[str, tuple[str, frozenset[str]]] = {}
    name = None
    for line in path.read_text().splitlines():
        match = REQUIREMENT.match(line)
        if match:
            name = re.sub(r"[-_.]+", "-", match[1]).lower()
            out[name] = (match[2].rstrip(" \\"), frozenset())
        elif name and line.strip().startswith("--hash="):
            version, hashes = out[name]
            out[name] = (version, hashes | {line.strip().rstrip(" \\").removeprefix("--hash=")})
        elif not line.startswith("    "):
            name = None
    return out


def closure(*names: str) -> set[str]:
    """Installed distributions ``names`` need (markers evaluated for this interpreter)."""
    import importlib.metadata as metadata

    from packaging.markers import default_environment
    from packaging.requirements import Requirement

    environment = default_environment() | {"extra": ""}
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if name in seen:
            continue
        seen.add(name)
        for text in metadata.requires(name) or []:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate(environment):
                todo.append(requirement.name)
    return seen


# ---------------------------------------------------------------------------------------------
# The pack's files


def test_pack_requirements_are_the_projects_pins_for_exactly_what_the_pack_imports():
    pack = requirement_blocks(PACK / "requirements.txt")
    project = requirement_blocks(ROOT / "requirements.txt")
    assert set(pack) == closure("pulumi-policy", "pulumi", "pyyaml")
    for name, (version, hashes) in pack.items():
        assert hashes, f"{name} is not hash-locked"
        assert (version, hashes) == project[name], f"{name} differs from requirements.txt"
    assert pack["pulumi-policy"][0] == "1.21.0" and pack["pulumi"][0] == "3.272.0" and pack["pyyaml"][0] == "6.0.3"


def test_policy_project_file():
    document = yaml.safe_load((PACK / "PulumiPolicy.yaml").read_text())
    assert document["runtime"] == {"name": "python", "options": {"virtualenv": "venv"}}
    assert re.fullmatch(r"[0-9]+\.[0-9]+\.[0-9]+", document["version"])
    assert document["description"]


def test_pack_entry_point_only_adds_the_repository_and_builds_the_pack_from_fleet_rules():
    text = (PACK / "__main__.py").read_text()
    assert "from fleet.policy.rules import PACK_NAME, crossguard_policies" in text
    assert "ResourceValidationPolicy" not in text and "def " not in text  # no rules of its own


def test_pack_readme_carries_the_rule_table():
    readme = (PACK / "README.md").read_text()
    assert rules.rule_table() in readme
    for r in rules.RULES:
        assert f"`{r.name}`" in readme


def test_policies_are_named_like_the_rules_and_typed_by_scope():
    from pulumi_policy import ResourceValidationPolicy, StackValidationPolicy

    policies = {p.name: p for p in rules.crossguard_policies()}
    assert list(policies) == [r.name for r in rules.RULES if not r.offline_only]
    for r in rules.crossguard_rules():
        kind = StackValidationPolicy if r.scope == "stack" else ResourceValidationPolicy
        assert isinstance(policies[r.name], kind), r.name
        assert policies[r.name].remediation_steps == r.remediation


# ---------------------------------------------------------------------------------------------
# The pack in its own environment, as `pulumi preview --policy-pack policies` starts it


def pack_venv(env: dict[str, str]) -> Path:
    """The pack's own environment, as the Pulumi CLI makes ``policies/venv`` from its requirements: built
    once per requirements file under .venv/ (reused by later runs and shared by parallel workers)."""
    digest = hashlib.sha256((PACK / "requirements.txt").read_bytes()).hexdigest()[:16]
    venv = ROOT / ".venv" / "policy-pack" / digest
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f"{digest}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (venv / "installed").exists():
            shutil.rmtree(venv, ignore_errors=True)
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, env=env, timeout=120)
            install = subprocess.run(
                [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                 "--require-hashes", "-r", str(PACK / "requirements.txt")],
                env=env, capture_output=True, text=True, timeout=300)
            assert install.returncode == 0, install.stderr[-3000:]
            (venv / "installed").touch()
    return venv


def start_pack(env: dict[str, str]):
    python = pack_venv(env) / "bin" / "python"
    # the engine runs `python -u -m pulumi.policy <engine address> <program>` in the pack directory
    process = subprocess.Popen([str(python), "-u", "-m", "pulumi.policy", "127.0.0.1:1", str(PACK / "__main__.py")],
                               cwd=PACK, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        line = b""
        deadline = time.monotonic() + 60
        while not line.endswith(b"\n") and time.monotonic() < deadline:
            ready, _, _ = select.select([process.stdout], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            chunk = os.read(process.stdout.fileno(), 64)
            if not chunk:
                break
            line += chunk
        assert re.fullmatch(rb"[0-9]+\n", line), (line, process.poll(), process.stderr.read1(4000)
                                                  if process.poll() is not None else b"")
        yield {"port": int(line), "python": python, "env": env}
    finally:
        process.kill()
        process.wait(timeout=10)


def pack_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME",
                                                            rules.PULUMI_CONFIG_ENV)}
    return env | extra


@pytest.fixture(scope="module")
def pack_server():
    """The pack as started without the stack's configuration (as no CLI run does): it must not guess."""
    yield from start_pack(pack_env())


@contextlib.contextmanager
def stub(port: int):
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    grpc.channel_ready_future(channel).result(timeout=20)
    try:
        yield analyzer_pb2_grpc.AnalyzerStub(channel)
    finally:
        channel.close()


@pytest.fixture(scope="module")
def analyzer(pack_server):
    with stub(pack_server["port"]) as client:
        yield client


def test_pack_environment_holds_only_its_own_requirements(pack_server):
    probe = subprocess.run([str(pack_server["python"]), "-c", "import pulumi_gcp"], env=pack_server["env"],
                           capture_output=True, text=True)
    assert probe.returncode != 0 and "No module named 'pulumi_gcp'" in probe.stderr
    probe = subprocess.run([str(pack_server["python"]), "-c", "import pydantic"], env=pack_server["env"],
                           capture_output=True, text=True)
    assert probe.returncode != 0  # fleet.rules needs no pydantic


def _configure(analyzer, document: dict) -> None:
    request = analyzer_pb2.ConfigureAnalyzerRequest()
    levels = {"mandatory": analyzer_pb2.MANDATORY, "advisory": analyzer_pb2.ADVISORY,
              "disabled": analyzer_pb2.DISABLED}
    for name, entry in document.items():
        if name == "all":
            continue
        properties = struct_pb2.Struct()
        properties.update({k: v for k, v in entry.items() if k != "enforcementLevel"})
        request.policyConfig[name].CopyFrom(analyzer_pb2.PolicyConfig(
            enforcementLevel=levels[entry["enforcementLevel"]], properties=properties))
    analyzer.Configure(request)


def _struct(value: dict) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update(value)
    return out


OPEN_SSH = {"network": "default", "direction": "INGRESS", "sourceRanges": ["0.0.0.0/0"],
            "allows": [{"protocol": "tcp", "ports": ["22"]}]}
FIREWALL_URN = "urn:pulumi:prod::dstack-fleet::gcp:compute/firewall:Firewall::debug-ssh"


def _analyze(analyzer, type_: str, urn: str, props: dict):
    return analyzer.Analyze(analyzer_pb2.AnalyzeRequest(
        type=type_, urn=urn, name=urn.rsplit("::", 1)[-1], properties=_struct(props),
        options=analyzer_pb2.AnalyzerResourceOptions())).diagnostics


def test_served_pack_describes_its_policies(analyzer):
    info = analyzer.GetAnalyzerInfo(empty_pb2.Empty())
    assert info.name == rules.PACK_NAME and info.supportsConfig
    assert [p.name for p in info.policies] == [p.name for p in rules.crossguard_policies()]
    assert {p.enforcementLevel for p in info.policies} == {analyzer_pb2.MANDATORY}
    schema = next(p for p in info.policies if p.name == "no-open-ingress").configSchema
    assert "publicPorts" in schema.properties


def test_served_pack_enforces_the_stack_config(analyzer):
    _configure(analyzer, rules.pack_config("prod"))
    (diagnostic,) = _analyze(analyzer, "gcp:compute/firewall:Firewall", FIREWALL_URN, OPEN_SSH)
    assert diagnostic.policyName == "no-open-ingress" and diagnostic.enforcementLevel == analyzer_pb2.MANDATORY
    description, detail = diagnostic.message.split("\n", 1)  # the engine puts the description first
    assert description == diagnostic.description
    assert detail.startswith("an INGRESS allow rule open to the whole internet") and "0.0.0.0/0" not in detail

    _configure(analyzer, rules.pack_config("prod", public_ports=[22]))
    assert list(_analyze(analyzer, "gcp:compute/firewall:Firewall", FIREWALL_URN, OPEN_SSH)) == []

    _configure(analyzer, rules.pack_config("dev"))
    (diagnostic,) = _analyze(analyzer, "gcp:compute/firewall:Firewall", FIREWALL_URN, OPEN_SSH)
    assert diagnostic.enforcementLevel == analyzer_pb2.ADVISORY


def test_served_pack_reports_unknown_values_as_could_not_run(analyzer):
    _configure(analyzer, rules.pack_config("prod"))
    urn = "urn:pulumi:prod::dstack-fleet::gcp:compute/firewall:Firewall::fw"
    diagnostics = _analyze(analyzer, "gcp:compute/firewall:Firewall", urn,
                           {**OPEN_SSH, "sourceRanges": UNKNOWN_STRING_VALUE})
    (diagnostic,) = diagnostics
    assert diagnostic.enforcementLevel == analyzer_pb2.ADVISORY
    assert "can't run policy 'no-open-ingress'" in diagnostic.message
    assert "sourceRanges is not known in this preview" in diagnostic.message


def test_served_pack_checks_tdx_nodes_across_the_stack(analyzer):
    _configure(analyzer, rules.pack_config("prod"))
    image_urn = "urn:pulumi:prod::dstack-fleet::dstack-fleet:images:GcpImage$gcp:compute/image:Image::img"
    node_urn = "urn:pulumi:prod::dstack-fleet::dstack-fleet:nodes:OverlayNode$gcp:compute/instance:Instance::n-0"
    image = analyzer_pb2.AnalyzerResource(
        type="gcp:compute/image:Image", urn=image_urn, name="img",
        properties=_struct({"name": "img", "guestOsFeatures": [{"type": "GVNIC"}, {"type": "UEFI_COMPATIBLE"}],
                            "selfLink": UNKNOWN_STRING_VALUE}))
    node = analyzer_pb2.AnalyzerResource(
        type="gcp:compute/instance:Instance", urn=node_urn, name="n-0",
        properties=_struct({"machineType": "c3-standard-4", "scheduling": {"onHostMaintenance": "TERMINATE"},
                            "confidentialInstanceConfig": {"confidentialInstanceType": "TDX"},
                            "bootDisk": {"initializeParams": {"image": UNKNOWN_STRING_VALUE}}}),
        dependencies=[image_urn])
    node.propertyDependencies["bootDisk"].urns.append(image_urn)
    response = analyzer.AnalyzeStack(analyzer_pb2.AnalyzeStackRequest(resources=[image, node]))
    tdx = [d for d in response.diagnostics if d.policyName == "tdx-only"]
    assert [(d.urn, d.enforcementLevel) for d in tdx] == [(node_urn, analyzer_pb2.MANDATORY)]
    assert "lack TDX_CAPABLE" in tdx[0].message


PROD_ADDRESS_URN = ("urn:pulumi:prod::dstack-fleet::dstack-fleet:nodes:OverlayNode$gcp:compute/address:Address::"
                    "overlay-0-address")


def test_served_pack_without_a_tier_refuses_instead_of_assuming_prod(analyzer):
    """No --policy-pack-config and no stack configuration: a rule that depends on the tier reports that it
    was given none (mandatory), and the other rules still run."""
    analyzer.Configure(analyzer_pb2.ConfigureAnalyzerRequest())  # as the engine does with no config file
    info = analyzer.GetAnalyzerInfo(empty_pb2.Empty())
    assert {p.enforcementLevel for p in info.policies} == {analyzer_pb2.MANDATORY}
    diagnostics = _analyze(analyzer, "gcp:compute/address:Address", PROD_ADDRESS_URN, {"addressType": "INTERNAL"})
    # the two rules that read the tier refuse, each once for this resource
    assert sorted((d.policyName, d.enforcementLevel) for d in diagnostics) == [
        ("data-safety", analyzer_pb2.MANDATORY), ("unsafe-peer-delivery", analyzer_pb2.MANDATORY)]
    for diagnostic in diagnostics:
        assert "the dstack-fleet policy pack was given no tier" in diagnostic.message
        assert "python -m fleet policy-config --stack <stack>" in diagnostic.message
    ssh = {d.policyName for d in _analyze(analyzer, "gcp:compute/firewall:Firewall", FIREWALL_URN, OPEN_SSH)}
    assert ssh == {"no-open-ingress", "data-safety", "unsafe-peer-delivery"}  # the rest still runs


def test_served_pack_reads_the_tier_from_the_stack_configuration_the_cli_passes():
    """The CLI starts the pack with the stack's configuration in PULUMI_CONFIG: dev's rules are advisory
    and prod-only checks do not apply, without any --policy-pack-config."""
    dev = json.dumps({"dstack-fleet:role": "env", "dstack-fleet:tier": "dev", "gcp:project": "acme-tee-dev"})
    for server in start_pack(pack_env(**{rules.PULUMI_CONFIG_ENV: dev})):
        with stub(server["port"]) as client:
            info = client.GetAnalyzerInfo(empty_pb2.Empty())
            assert {p.enforcementLevel for p in info.policies} == {analyzer_pb2.ADVISORY}
            assert list(_analyze(client, "gcp:compute/address:Address", PROD_ADDRESS_URN,
                                 {"addressType": "INTERNAL"})) == []  # prod-only: not in dev
            (ssh,) = _analyze(client, "gcp:compute/firewall:Firewall", FIREWALL_URN, OPEN_SSH)
            assert ssh.enforcementLevel == analyzer_pb2.ADVISORY


@pytest.mark.parametrize("config, tier", [
    ({"dstack-fleet:role": "env", "dstack-fleet:tier": "staging"}, "staging"),
    ({"dstack-fleet:role": "env", "dstack-fleet:tier": "prod"}, "prod"),
    ({"dstack-fleet:role": "images"}, "none"),
    ({"dstack-fleet:role": "bootstrap"}, "none"),
    ({"dstack-fleet:role": "env"}, None),
    ({}, None),
])
def test_stack_tier_comes_from_the_stack_configuration(config, tier):
    environ = {rules.PULUMI_CONFIG_ENV: json.dumps(config)}
    assert rules.stack_tier(environ) == tier
    assert rules.pack_enforcement(environ) == ("mandatory" if tier != "dev" else "advisory")
    if tier is None:
        with pytest.raises(rules.PackConfigMissing, match="does not guess one"):
            rules.context_from_policy_config({}, environ)
    else:
        assert rules.context_from_policy_config({}, environ).tier == (None if tier == "none" else tier)
    # the generated config wins over the stack configuration
    assert rules.context_from_policy_config({"tier": "dev"}, environ).tier == "dev"


# ---------------------------------------------------------------------------------------------
# The offline plan: shipped stacks pass, mutated prod stacks fail naming the problem


@pytest.mark.parametrize("stack", available_stacks(ROOT))
def test_shipped_stacks_have_no_mandatory_violation(stack):
    plan = shipped_plan(stack)
    assert [v for v in plan.violations if v["enforcement"] == "mandatory"] == []
    for v in plan.violations:  # what remains is pending or could-not-run, never a silent pass
        assert v["message"].startswith(("pending:", "could not run:")) or plan.tier == "dev", v


def test_every_shipped_stack_is_planned():
    assert {"dev", "staging", "prod", "images", "bootstrap"} <= set(available_stacks(ROOT))


def plan_cli(project, stack: str, *extra: str) -> subprocess.CompletedProcess:
    """``python -m fleet plan`` in this process (same code path, no interpreter start per plan)."""
    argv = ["--root", str(project.root), "plan", "--stack", stack, *extra]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_main(argv)
    return subprocess.CompletedProcess(["python", "-m", "fleet", *argv], code, out.getvalue(), err.getvalue())


def plan_changed_program(project, code: str, stack: str = "prod", *extra: str) -> subprocess.CompletedProcess:
    """Plan after appending ``code`` to the project's copy of ``__main__.py`` (a code change)."""
    with (project.root / "__main__.py").open("a") as f:
        f.write(code)
    return plan_cli(project, stack, *extra)


def _prebuilt(c, link: str) -> None:
    c["dstack-fleet:images"]["handmade"] = {"prebuilt": {"image": {"selfLink": link}}}
    c["dstack-fleet:nodes"][0]["image"] = "handmade"
    del c["dstack-fleet:images"]["overlay-3eb04ca"]


HANDMADE = "projects/acme-tee-prod/global/images/overlay-handmade-v1"


@pytest.mark.parametrize("name,change,key", [
    ("non-tdx-machine", lambda c: c["dstack-fleet:nodes"][0].update(machineType="n2-standard-8"),
     "dstack-fleet:nodes[0].machineType"),
    ("image-family", lambda c: _prebuilt(c, "projects/acme-tee-prod/global/images/family/overlay"),
     "dstack-fleet:images.handmade.prebuilt.image.selfLink"),
    ("guest-tag", lambda c: c["dstack-fleet:images"]["overlay-3eb04ca"]["build"]["guest"]["source"].update(
        commit="v0.3.1"), "dstack-fleet:images.overlay-3eb04ca.build.guest.source.commit"),
    ("unknown-rule", lambda c: c.update({"dstack-fleet:policy": {"enforcement": {"tdx-olny": "advisory"}}}),
     "dstack-fleet:policy.enforcement.tdx-olny"),
])
def test_config_validation_stops_bad_prod_stacks_first(project, name, change, key):
    project.mutate("prod", name, change)
    result = plan_cli(project, name)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    (line,) = [line for line in result.stderr.splitlines() if key in line]  # one line names the key


def test_prebuilt_image_nobody_vouched_for_fails_tdx_only(project):
    """The config accepts any pinned GCE image (its TDX support is not config's to know); tdx-only
    refuses a node booting it until it is allow-listed."""
    project.mutate("prod", "handmade", lambda c: _prebuilt(c, HANDMADE))
    result = plan_cli(project, "handmade")
    assert result.returncode == 1, result.stdout + result.stderr
    line = next(l for l in result.stdout.splitlines() if "[mandatory]" in l)
    assert line.startswith("  - [mandatory] tdx-only ×5: ") and line.endswith(": overlay-0, overlay-1, overlay-2, "
                                                                           "overlay-3, overlay-4")
    assert "nor listed in dstack-fleet:policy.allowedImages" in line and HANDMADE not in result.stdout.split(
        "Policy violations")[1]
    document = json.loads(plan_cli(project, "handmade", "--json", "-").stdout)  # the JSON names every resource
    assert "urn:pulumi:handmade::dstack-fleet::dstack-fleet:nodes:OverlayNode$gcp:compute/instance:Instance::" \
           "overlay-0" in {v["urn"] for v in document["violations"] if v["enforcement"] == "mandatory"}

    project.mutate("prod", "vouched", lambda c: (_prebuilt(c, HANDMADE), c.update(
        {"dstack-fleet:policy": {"allowedImages": [HANDMADE]}})))
    assert plan_cli(project, "vouched").returncode == 0


OPEN_SSH_PROGRAM = '''
# a debugging change: SSH from anywhere
import pulumi_gcp as _gcp
_gcp.compute.Firewall("debug-ssh", network="default", direction="INGRESS", source_ranges=["0.0.0.0/0"],
                      allows=[{"protocol": "tcp", "ports": ["22"]}])
'''
TAG_PULL_PROGRAM = '''
# a convenience step that pulls a helper by tag
import pulumi_command as _command
_command.local.Command("warm-cache", create="docker pull nginx:1.25 && docker image ls")
'''


def test_program_change_opening_ssh_fails_in_prod_and_follows_the_declared_ports(project):
    """No configuration can open a port it does not also declare (publicIngress declares what it
    opens), so the realistic way in is a code change: this adds a firewall rule to the program."""
    result = plan_changed_program(project, OPEN_SSH_PROGRAM)
    assert result.returncode == 1, result.stdout + result.stderr
    assert ("[mandatory] no-open-ingress: urn:pulumi:prod::dstack-fleet::gcp:compute/firewall:Firewall::debug-ssh: "
            "an INGRESS allow rule open to the whole internet") in result.stdout

    project.mutate("prod", "declared", lambda c: c.update({"dstack-fleet:policy": {"publicPorts": [22]}}))
    assert plan_cli(project, "declared").returncode == 0

    project.mutate("prod", "relaxed", lambda c: c.update(
        {"dstack-fleet:policy": {"enforcement": {"no-open-ingress": "advisory"}}}))
    relaxed = plan_cli(project, "relaxed")
    assert relaxed.returncode == 0 and "[advisory] no-open-ingress" in relaxed.stdout

    dev = plan_cli(project, "dev")
    assert dev.returncode == 0 and "[advisory] no-open-ingress" in dev.stdout
    project.mutate("dev", "dev-strict", lambda c: c.update(
        {"dstack-fleet:policy": {"enforcement": {"no-open-ingress": "mandatory"}}}))
    assert plan_cli(project, "dev-strict").returncode == 1

    # prod never disables a rule: the plan refuses the setting itself (exit 2, naming it)...
    project.mutate("prod", "off", lambda c: c.update(
        {"dstack-fleet:policy": {"enforcement": {"no-open-ingress": "disabled"}}}))
    refused = plan_cli(project, "off")
    assert refused.returncode == 2 and "dstack-fleet:policy.enforcement.no-open-ingress: prod never disables" \
        in refused.stderr
    # ...while staging may, and the rule then says nothing
    project.mutate("staging", "off", lambda c: c.update(
        {"dstack-fleet:policy": {"enforcement": {"no-open-ingress": "disabled"}}}))
    off = plan_cli(project, "off")
    assert off.returncode == 0 and "no-open-ingress" not in off.stdout


def test_program_change_pulling_by_tag_fails_pinned_digests_in_prod(project):
    result = plan_changed_program(project, TAG_PULL_PROGRAM)
    assert result.returncode == 1, result.stdout + result.stderr
    assert ("[mandatory] pinned-digests: urn:pulumi:prod::dstack-fleet::command:local:Command::warm-cache: "
            "the image reference in create is pinned only by a tag") in result.stdout
    assert "nginx:1.25" not in result.stdout.split("Policy violations")[1]


def test_plan_json_carries_the_violations(project, tmp_path):
    out = tmp_path / "plan.json"
    assert plan_changed_program(project, OPEN_SSH_PROGRAM, "prod", "--json", str(out)).returncode == 1
    violations = json.loads(out.read_text())["violations"]
    assert {"policy": "no-open-ingress", "enforcement": "mandatory",
            "urn": "urn:pulumi:prod::dstack-fleet::gcp:compute/firewall:Firewall::debug-ssh",
            "message": "an INGRESS allow rule open to the whole internet covers ports that are not declared public "
                       "(dstack-fleet:network.publicIngress or dstack-fleet:policy.publicPorts)"} in violations
