"""The policy rules (fleet/policy/rules.py) on small programs run under mocks, through both adapters.

Every case builds a few resources with the real providers' classes, runs them with
``fleet.harness.run_program`` (no stack config, so the rule itself is what is tested, not config
validation) and feeds what was captured to

* the offline adapter, ``rules.evaluate``, as ``fleet plan`` does, and
* the CrossGuard adapter: each captured registration becomes ``pulumi_policy`` argument types
  (``ResourceValidationArgs``, ``StackValidationArgs`` of ``PolicyResource``s with unknowns behind the
  SDK's unknown-checking proxy and secrets in plaintext, as the engine sends them) and every policy's
  ``validate`` runs with a collecting ``report_violation``, the way the SDK's servicer runs them.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from dataclasses import dataclass, field
from inspect import isawaitable
from pathlib import Path
from typing import Any, Callable

import pulumi
import pulumi_command as command
import pulumi_docker as docker
import pulumi_gcp as gcp
import pytest
from pulumi_policy import (PolicyCustomTimeouts, PolicyResource, PolicyResourceOptions, ResourceValidationArgs,
                           ResourceValidationPolicy, StackValidationArgs)
from pulumi_policy.proxy import UNKNOWN_STRING_VALUE, UnknownValueError, unknown_checking_proxy

from fleet.policy import rules
from fleet.plan.harness import ProgramRun, run_program
from fleet.config.values import UNKNOWN, Secret

PROJECT = "dstack-fleet"
GCP_PROJECT = "acme-tee-prod"
H = hashlib.sha256(b"image").hexdigest()
H2 = hashlib.sha256(b"other").hexdigest()
NODE_ACCOUNT = "fleet-prod-overlay@acme-tee-prod.iam.gserviceaccount.com"
LOGGING_SCOPES = ["https://www.googleapis.com/auth/logging.write",
                  "https://www.googleapis.com/auth/monitoring.write"]
GOOD_METADATA = {"block-project-ssh-keys": "TRUE", "serial-port-enable": "FALSE",
                 "serial-port-logging-enable": "TRUE"}
ALL_FEATURES = ["GVNIC", "TDX_CAPABLE", "UEFI_COMPATIBLE", "VIRTIO_SCSI_MULTIQUEUE"]
# Values the cases put into inputs; no message may ever repeat one of them.
SENSITIVE = ("img:tag", "x:latest", "${IMG}", "n2-standard-8", "0.0.0.0/0", "123456789-compute@", "family/debian",
             "s3cr3t-canary", "nginx:1.25", "registry:5000/img", "hunter2", "c3-standard-4-lssd", "abc1234")


# ---------------------------------------------------------------------------------------------
# Building blocks: a compliant world, and components with the type tokens the rules scope by


class Node(pulumi.ComponentResource):
    def __init__(self, name: str, kind: str = "OverlayNode"):
        super().__init__(f"dstack-fleet:nodes:{kind}", name, {}, None)


class Component(pulumi.ComponentResource):
    def __init__(self, type_: str, name: str, parent: pulumi.Resource | None = None):
        super().__init__(type_, name, {}, pulumi.ResourceOptions(parent=parent))


class BuildHostComponent(pulumi.ComponentResource):
    def __init__(self, name: str):
        super().__init__(rules.BUILD_HOST_TYPE, name, {}, None)


def gcp_image(name: str = "img", *, features=ALL_FEATURES, integrity: bool = True) -> gcp.compute.Image:
    depends = []
    if integrity:
        depends.append(command.local.Command(f"{name}-integrity", create="gcloud storage objects describe "
                                             "gs://acme-images/abc/disk.tar.gz --format=json"))
    return gcp.compute.Image(name, name=f"fleet-prod-{name}", project=GCP_PROJECT,
                             raw_disk={"source": "gs://acme-images/abc/disk.tar.gz"},
                             guest_os_features=[{"type": f} for f in features],
                             opts=pulumi.ResourceOptions(depends_on=depends))


def instance(name: str = "overlay-0", *, parent: pulumi.Resource | None = None, image: Any = None,
             machine_type: str = "c3-standard-4", confidential: str | None = "TDX",
             maintenance: str = "TERMINATE", metadata: Any = None, email: str | None = NODE_ACCOUNT,
             scopes: list[str] | None = None, external: bool = False, group: str = "overlay",
             protect: bool | None = None, deletion_protection: bool = False) -> gcp.compute.Instance:
    """A node instance every rule accepts, unless an argument says otherwise."""
    if parent is None:
        parent = Node(name)
    if image is None:
        image = gcp_image(f"{name}-image").self_link
    nic: dict[str, Any] = {"subnetwork": "default", "nic_type": "GVNIC"}
    if external:
        nic["access_configs"] = [{"nat_ip": "203.0.113.7"}]
    account = {"scopes": scopes if scopes is not None else LOGGING_SCOPES}
    if email is not None:
        account["email"] = email
    return gcp.compute.Instance(
        name, name=f"fleet-prod-{name}", project=GCP_PROJECT, zone="us-central1-a", machine_type=machine_type,
        boot_disk={"initialize_params": {"image": image, "size": 20}},
        network_interfaces=[nic],
        confidential_instance_config={"confidential_instance_type": confidential} if confidential else None,
        scheduling={"on_host_maintenance": maintenance},
        service_account=account,
        metadata=GOOD_METADATA if metadata is None else metadata,
        labels={"group": group, "environment": "prod"},
        deletion_protection=deletion_protection,
        opts=pulumi.ResourceOptions(parent=parent, protect=protect))


def firewall(name: str = "fw", *, ranges=("0.0.0.0/0",), tags=(), ports=("22",), protocol="tcp",
             deny: bool = False, direction: str = "INGRESS") -> gcp.compute.Firewall:
    match = {"protocol": protocol, **({"ports": list(ports)} if ports else {})}
    return gcp.compute.Firewall(name, network="default", direction=direction,
                                source_ranges=list(ranges) or None, source_tags=list(tags) or None,
                                allows=None if deny else [match], denies=[match] if deny else None)


def node_disk(name: str = "overlay-0-data", *, prevent: bool = True, protect: bool = True, retain: bool = True,
              parent: pulumi.Resource | None = None) -> gcp.compute.Disk:
    return gcp.compute.Disk(name, name=f"fleet-prod-{name}", zone="us-central1-a", size=50,
                            deletion_policy="PREVENT" if prevent else None,
                            opts=pulumi.ResourceOptions(parent=parent or Node(name.rsplit("-", 1)[0]),
                                                        protect=protect, retain_on_delete=retain))


def build_script(*, commits=("c27ff30d6c35f299f7b27d51d368d4e402057cc6",), guest=("source", "3eb04cad11664a381227d77a469e68bca7e94c30")) -> str:
    lines = ["#!/bin/bash", "set -euo pipefail", "readonly RECIPE=tplus-overlay",
             f"readonly UPSTREAM_COMMITS=({' '.join(commits)})"]
    kind, value = guest
    lines.append(f"readonly GUEST_KIND={kind}")
    lines.append(f"readonly {'GUEST_COMMIT' if kind == 'source' else 'GUEST_SHA256'}={value}")
    return "\n".join(lines + ['git -C "$WORK_DIR" fetch origin "${UPSTREAM_COMMITS[0]}"']) + "\n"


def build_host(name: str = "build-abc", *, script: str | None = None, image: str =
               "projects/ubuntu-os-cloud/global/images/ubuntu-2404-noble-amd64-v20250805") -> None:
    parent = BuildHostComponent(name)
    gcp.compute.Instance(name, name=f"fleet-images-{name}", zone="us-central1-a", machine_type="n2-standard-16",
                         boot_disk={"initialize_params": {"image": image}},
                         network_interfaces=[{"subnetwork": "default"}],
                         scheduling={"on_host_maintenance": "MIGRATE"},
                         service_account={"email": "fleet-build@acme-tee-build.iam.gserviceaccount.com",
                                          "scopes": ["https://www.googleapis.com/auth/logging.write"]},
                         metadata={**GOOD_METADATA, "startup-script": script if script is not None else build_script()},
                         opts=pulumi.ResourceOptions(parent=parent))


# ---------------------------------------------------------------------------------------------
# Running a case through both adapters


@dataclass(frozen=True)
class E:
    """An expected finding: rule, resource name (last URN part), status, and whether only the
    offline adapter can see it."""

    policy: str
    name: str
    status: str = "violation"
    offline_only: bool = False


@dataclass
class Case:
    id: str
    program: Callable[[], None]
    expect: set[E]
    tier: str | None = "prod"
    passes: tuple[bool, ...] = (True, False)  # preview, update
    enforcement: dict[str, str] = field(default_factory=dict)
    public_ports: tuple[int, ...] = ()
    allowed_images: tuple[str, ...] = ()
    external_ip_groups: tuple[str, ...] = ()
    extra_machine_types: tuple[str, ...] = ()
    public_repositories: tuple[str, ...] = ()
    expect_update: set[E] | None = None  # when the update pass differs (values known there)


def stack_name(tier: str | None) -> str:
    return tier or "images"


def run_case(tmp_path: Path, case: Case, preview: bool) -> ProgramRun:
    (tmp_path / "Pulumi.yaml").write_text(f"name: {PROJECT}\nruntime: python\n")
    return run_program(tmp_path, stack=stack_name(case.tier), config={}, preview=preview, program=case.program)


def offline(case: Case, run: ProgramRun) -> list[dict[str, str]]:
    outputs = dict(run.outputs)
    measurements = outputs.pop("measurements", {}) or {}
    context = rules.RuleContext(
        tier=case.tier, enforcement=case.enforcement, public_ports=frozenset(case.public_ports),
        allowed_images=case.allowed_images, external_ip_groups=frozenset(case.external_ip_groups),
        extra_machine_types=case.extra_machine_types, public_repositories=frozenset(case.public_repositories),
        outputs=outputs, measurements=measurements,
        stack_urn=rules.stack_urn(run.stack, run.project))
    return rules.evaluate(run.resources, context)


def policy_props(value: Any) -> Any:
    """A captured input as the engine hands it to a policy: secrets in plaintext, unknowns as the
    SDK's unknown sentinel."""
    if isinstance(value, Secret):
        return policy_props(value.value)
    if value is UNKNOWN:
        return UNKNOWN_STRING_VALUE
    if isinstance(value, dict):
        return {k: policy_props(v) for k, v in value.items()}
    if isinstance(value, list):
        return [policy_props(v) for v in value]
    return value


def policy_resources(run: ProgramRun) -> list[PolicyResource]:
    """The stack as ``AnalyzeStack`` builds it: one PolicyResource per resource and the stack
    resource carrying the outputs, with parents and dependencies linked by URN."""
    out: dict[str, PolicyResource] = {}
    for r in run.resources:
        opts = PolicyResourceOptions(bool(r.options.get("protect")), list(r.options.get("ignoreChanges") or []),
                                     r.options.get("deleteBeforeReplace"), [], PolicyCustomTimeouts(0, 0, 0), [],
                                     r.parent)
        out[r.urn] = PolicyResource(r.type, unknown_checking_proxy(policy_props(r.inputs)), r.urn, r.name, opts,
                                    None, None, [], {})
    stack = rules.stack_urn(run.stack, run.project)
    out[stack] = PolicyResource(rules.STACK_TYPE, unknown_checking_proxy(policy_props(run.outputs)), stack,
                                f"{run.project}-{run.stack}",
                                PolicyResourceOptions(False, [], None, [], PolicyCustomTimeouts(0, 0, 0), []),
                                None, None, [], {})
    for r in run.resources:
        resource = out[r.urn]
        resource.parent = out.get(r.parent) if r.parent else None
        resource.dependencies = [out[d] for d in r.dependencies if d in out]
        resource.property_dependencies = {k: [out[d] for d in v if d in out]
                                          for k, v in r.property_dependencies.items()}
    return list(out.values())


def _call(result: Any) -> None:
    if isawaitable(result):
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(result)
        finally:
            loop.close()


def crossguard(case: Case, run: ProgramRun, config: dict[str, Any] | None = None) -> list[dict[str, str]]:
    """Every policy of the pack over the run, with the pack config ``fleet deploy`` would pass."""
    if config is None:
        config = rules.pack_config(case.tier, case.enforcement, case.public_ports, case.allowed_images,
                                   extra_machine_types=case.extra_machine_types,
                                   external_ip_groups=case.external_ip_groups,
                                   public_repositories=case.public_repositories)
    resources = policy_resources(run)
    out: list[dict[str, str]] = []
    for policy in rules.crossguard_policies():
        entry = dict(config.get(policy.name, {}))
        level = entry.pop("enforcementLevel", config.get("all", "advisory"))
        if level == "disabled":
            continue

        def collector(default_urn: str, name: str = policy.name, level: str = level):
            def report(message: str, urn: str | None = None) -> None:
                out.append({"policy": name, "enforcement": level, "urn": urn or default_urn, "message": message})
            return report

        def guarded(fn: Callable[[], Any], urn: str) -> None:
            try:
                _call(fn())
            except UnknownValueError as exc:  # the servicer reports these as advisory "can't run"
                out.append({"policy": policy.name, "enforcement": "advisory", "urn": urn,
                            "message": f"could not run: {exc.message}"})

        if isinstance(policy, ResourceValidationPolicy):
            for r in resources:
                if r.resource_type == rules.STACK_TYPE:
                    continue
                args = ResourceValidationArgs(r.resource_type, r.props, r.urn, r.name, r.opts, None, entry)
                guarded(lambda args=args, urn=r.urn: policy.validate(args, collector(urn)), r.urn)
        else:
            args = StackValidationArgs(resources, entry)
            guarded(lambda: policy.validate(args, collector("")), "")
    return out


def _status(v: dict[str, str]) -> str:
    if v["message"].startswith("could not run:"):
        return "could-not-run"
    if v["message"].startswith("pending:"):
        return "pending"
    return "violation"


def _name(urn: str) -> str:
    return urn.rsplit("::", 1)[-1] if urn else ""


def check_case(tmp_path: Path, case: Case, preview: bool) -> tuple[list[dict], list[dict]]:
    run = run_case(tmp_path, case, preview)
    expected = case.expect if preview or case.expect_update is None else case.expect_update
    found = offline(case, run)
    level = rules.default_level(case.tier)
    got = {(v["policy"], _name(v["urn"]), _status(v)) for v in found}
    assert got == {(e.policy, e.name, e.status) for e in expected}, json.dumps(found, indent=1)
    for v in found:
        wanted = case.enforcement.get(v["policy"], level) if _status(v) == "violation" else "advisory"
        assert v["enforcement"] == wanted, v
        if v["message"].endswith("[offline-only]"):
            r = rules.rule(v["policy"])
            assert r.offline_only or r.partly_offline, v

    cg = crossguard(case, run)
    violations = {(v["policy"], _name(v["urn"])) for v in cg if _status(v) == "violation"}
    assert violations == {(e.policy, e.name) for e in expected if e.status == "violation" and not e.offline_only}, \
        json.dumps(cg, indent=1)
    assert {v["policy"] for v in cg if _status(v) != "violation"} == \
        {e.policy for e in expected if e.status != "violation"}, json.dumps(cg, indent=1)
    for v in cg:
        assert v["enforcement"] == (case.enforcement.get(v["policy"], level) if _status(v) == "violation"
                                    else "advisory")
    for message in [v["message"] for v in found + cg]:
        assert not any(s in message for s in SENSITIVE), message
    return found, cg


# ---------------------------------------------------------------------------------------------
# The cases

NODE = "overlay-0"
IMG = "overlay-0-image"


def _world(**kwargs) -> Callable[[], None]:
    return lambda: instance(**kwargs)


def _metadata(**extra: Any) -> dict[str, Any]:
    return {**GOOD_METADATA, **extra}


def gcp_image_in_component(features: list[str]) -> None:
    parent = Component(rules.GCP_IMAGE_TYPE, "boot")
    gcp.compute.Image("boot", name="fleet-prod-boot", raw_disk={"source": "gs://acme-images/abc/disk.tar.gz"},
                      guest_os_features=[{"type": f} for f in features],
                      opts=pulumi.ResourceOptions(parent=parent, depends_on=[command.local.Command(
                          "boot-integrity", create="true", opts=pulumi.ResourceOptions(parent=parent))]))


def _disk_seed_image() -> None:
    """An image that only seeds data disks (dstack's GPT data disk) is not a boot image."""
    seed = gcp_image("data-seed", features=["GVNIC", "UEFI_COMPATIBLE"])
    node = Node("apps-0", "DstackNode")
    gcp.compute.Disk("apps-0-data", zone="us-central1-a", image=seed.self_link, deletion_policy="PREVENT",
                     opts=pulumi.ResourceOptions(parent=node, protect=True, retain_on_delete=True))


def _config_disk() -> None:
    """A node's configuration disk is a version made from content, replaced with it: not kept."""
    node = Node("apps-0", "DstackNode")
    config = Component("dstack-fleet:nodes:ConfigDisk", "apps-0-config-abc", node)
    gcp.compute.Disk("apps-0-config-abc-disk", zone="us-central1-a", opts=pulumi.ResourceOptions(parent=config))


def _unknown_command() -> None:
    image = gcp_image("probe")
    command.local.Command("pull", create=image.self_link.apply(lambda link: f"docker pull example/app:1.0 # {link}"))


def _signed_table(extra_unknown: bool) -> Callable[[], None]:
    """An overlay member whose metadata carries the signed member table from the deploy-time step."""
    def program() -> None:
        signed = command.local.Command("overlay-table-sign", create="true").stdout
        metadata = _metadata(**{"overlay-table": signed, "overlay-table-signature": signed})
        if extra_unknown:
            metadata["startup-hint"] = signed
        instance(metadata=metadata)
    return program


def _secret_env(value_secret: bool) -> Callable[[], None]:
    def program() -> None:
        token = pulumi.Output.secret("s3cr3t-canary") if value_secret else "s3cr3t-canary"
        command.local.Command("deploy", create="python3 vmm-cli.py lsvm",
                              environment={"DSTACK_VMM_TOKEN": token, "DSTACK_VMM_URL": "https://vmm:9080"})
    return program


def _measurements(kind: str, entry: Any) -> Callable[[], None]:
    def program() -> None:
        pulumi.export("nodes", {"n-0": {"kind": kind}})
        if entry is not None:
            pulumi.export("measurements", {"node:n-0": entry})
    return program


def _app_measurements(entry: dict[str, Any]) -> Callable[[], None]:
    def program() -> None:
        pulumi.export("apps", {"web-prod": {"kind": "compose", "target": "gce"}})
        pulumi.export("measurements", {"app:web-prod": entry})
    return program


def _public_grant(repository: str = "fleet-public", role: str = "roles/artifactregistry.reader",
                  member: str = "allUsers") -> None:
    gcp.artifactregistry.RepositoryIamMember("grant", project="acme-tee-ops", location="us-central1",
                                             repository=repository, role=role, member=member)


CASES = [
    Case("compliant-node", _world(), set()),
    # pinned-digests
    # (pulumi-docker has no offline stand-ins for the update pass: previews only)
    Case("digests-container-tag", lambda: docker.Container("web", image="nginx:1.25"), {E("pinned-digests", "web")},
         passes=(True,)),
    Case("digests-container-pinned", lambda: docker.Container("web", image=f"registry:5000/img@sha256:{H}"), set(),
         passes=(True,)),
    Case("digests-metadata-command", _world(metadata=_metadata(**{
        "startup-script": f"docker pull x:latest && docker run y@sha256:{H}"})), {E("pinned-digests", NODE)}),
    Case("digests-compose-build", _world(metadata=_metadata(**{
        "app-compose": "services:\n  web:\n    build: .\n"})), {E("pinned-digests", NODE)}),
    Case("digests-app-compose-in-object", lambda: gcp.storage.BucketObject(
        "config", bucket="b", name="app-compose.json",
        content=json.dumps({"docker_compose_file": "services:\n  a:\n    image: img:tag\n", "name": "a"})),
        {E("pinned-digests", "config")}),
    Case("digests-build-pushes-a-tag", lambda: docker.Image(
        "app", image_name="registry.example/acme/app:0123abcd", build={"context": "app", "platform": "linux/amd64"}),
        set(), passes=(True,)),
    Case("digests-build-pushes-latest", lambda: docker.Image("app", image_name="registry.example/acme/app",
                                                             build={"context": "app"}),
         {E("pinned-digests", "app")}, passes=(True,)),
    Case("digests-build-from-variable", lambda: docker.Image("app", image_name="${IMG}", build={"context": "app"}),
         {E("pinned-digests", "app")}, passes=(True,)),
    Case("digests-pinned-everywhere", lambda: command.local.Command(
        "pull", create=f"docker pull img:tag@sha256:{H} && docker run registry:5000/img@sha256:{H2}",
        environment={"COMPOSE": f"services:\n  a:\n    image: registry:5000/img@sha256:{H}\n"}), set()),
    Case("digests-unknown-command", _unknown_command, {E("pinned-digests", "pull", "could-not-run")},
         expect_update={E("pinned-digests", "pull")}),
    # pinned-build-inputs
    Case("build-family-boot-image", _world(image="projects/debian-cloud/global/images/family/debian-12"),
         {E("pinned-build-inputs", NODE), E("tdx-only", NODE)}),
    Case("build-short-form-boot-image", lambda: build_host(image="debian-cloud/debian-12"),
         {E("pinned-build-inputs", "build-abc")}),
    Case("build-host-pinned", lambda: build_host(), set()),
    Case("build-host-short-commit", lambda: build_host(script=build_script(commits=("abc1234",))),
         {E("pinned-build-inputs", "build-abc")}),
    Case("build-host-guest-without-sha256", lambda: build_host(script=build_script(guest=("binary", "hunter2"))),
         {E("pinned-build-inputs", "build-abc")}),
    Case("build-image-without-integrity-step", lambda: instance(image=gcp_image("raw", integrity=False).self_link),
         {E("pinned-build-inputs", "raw")}),
    # tdx-only and image-features
    Case("tdx-not-confidential", _world(confidential=None), {E("tdx-only", NODE)}),
    Case("tdx-sev-instead", _world(confidential="SEV_SNP"), {E("tdx-only", NODE)}),
    Case("tdx-live-migrated", _world(maintenance="MIGRATE"), {E("tdx-only", NODE)}),
    Case("tdx-n2-machine", _world(machine_type="n2-standard-8"), {E("tdx-only", NODE)}),
    Case("tdx-lssd-even-if-listed", _world(machine_type="c3-standard-4-lssd"), {E("tdx-only", NODE)},
         extra_machine_types=("c3-standard-4-lssd",)),
    Case("tdx-extra-machine-type", _world(machine_type="c4-standard-8"), set(), extra_machine_types=("c4-standard-8",)),
    Case("tdx-image-not-capable", lambda: instance(image=gcp_image("plain", features=["GVNIC", "UEFI_COMPATIBLE"])
                                                   .self_link),
         {E("tdx-only", NODE), E("image-features", "plain")}),
    Case("tdx-external-image", _world(image="projects/ubuntu-os-cloud/global/images/ubuntu-2404-tdx-v20250805"),
         {E("tdx-only", NODE)}),
    Case("tdx-allowed-external-image", _world(image="projects/ubuntu-os-cloud/global/images/ubuntu-2404-tdx-v20250805"),
         set(), allowed_images=("https://www.googleapis.com/compute/v1/projects/ubuntu-os-cloud/global/images/"
                                "ubuntu-2404-tdx-v20250805",)),
    Case("tdx-pending-image", _world(image="pending build: overlay-3eb04ca (0c7e1ef8)"),
         {E("tdx-only", NODE, "pending")}),
    Case("tdx-build-host-out-of-scope", lambda: build_host(), set()),
    Case("features-gcp-image-nobody-boots-yet", lambda: gcp_image_in_component(["GVNIC", "UEFI_COMPATIBLE"]),
         {E("image-features", "boot")}),
    Case("features-disk-seed-image", _disk_seed_image, set()),
    # no-open-ingress
    Case("ingress-open-ssh", lambda: firewall(), {E("no-open-ingress", "fw")}),
    Case("ingress-open-ipv6", lambda: firewall(ranges=("::/0",), ports=("443",)), {E("no-open-ingress", "fw")}),
    Case("ingress-no-source", lambda: firewall(ranges=()), {E("no-open-ingress", "fw")}),
    Case("ingress-all-ports", lambda: firewall(ports=(), protocol="all"), {E("no-open-ingress", "fw")},
         public_ports=(22, 443)),
    Case("ingress-range-partly-declared", lambda: firewall(ports=("440-445",)), {E("no-open-ingress", "fw")},
         public_ports=(443,)),
    Case("ingress-declared", lambda: firewall(ports=("22", "443")), set(), public_ports=(22, 443)),
    Case("ingress-tags-only", lambda: firewall(ranges=(), tags=("fleet-prod-overlay-members",)), set()),
    Case("ingress-deny-all", lambda: firewall(deny=True, ports=(), protocol="all"), set()),
    Case("ingress-egress", lambda: firewall(direction="EGRESS"), set()),
    Case("ingress-open-advisory-in-dev", lambda: firewall(), {E("no-open-ingress", "fw")}, tier="dev"),
    Case("ingress-override-mandatory-in-dev", lambda: firewall(), {E("no-open-ingress", "fw")}, tier="dev",
         enforcement={"no-open-ingress": "mandatory"}),
    Case("ingress-disabled", lambda: firewall(), set(), enforcement={"no-open-ingress": "disabled"}),
    # no-public-access
    Case("public-app-repository-read", lambda: _public_grant(), set(), public_repositories=("fleet-public",)),
    Case("public-repository-not-opted-in", lambda: _public_grant(), {E("no-public-access", "grant")}),
    Case("public-other-repository", lambda: _public_grant(repository="fleet"), {E("no-public-access", "grant")},
         public_repositories=("fleet-public",)),
    Case("public-write", lambda: _public_grant(role="roles/artifactregistry.writer"),
         {E("no-public-access", "grant")}, public_repositories=("fleet-public",)),
    Case("public-authenticated-users", lambda: _public_grant(member="allAuthenticatedUsers"),
         {E("no-public-access", "grant")}, public_repositories=("fleet-public",)),
    Case("public-bucket", lambda: gcp.storage.BucketIAMMember("grant", bucket="acme-images", member="allUsers",
                                                             role="roles/storage.objectViewer"),
         {E("no-public-access", "grant")}, public_repositories=("fleet-public",)),
    Case("public-none-for-a-service-account", lambda: _public_grant(member="serviceAccount:a@p.iam.gserviceaccount.com"),
         set()),
    # hardened-instances
    Case("hardened-serial-console", _world(metadata=_metadata(**{"serial-port-enable": "TRUE"})),
         {E("hardened-instances", NODE)}),
    Case("hardened-project-keys", _world(metadata={"serial-port-logging-enable": "TRUE"}),
         {E("hardened-instances", NODE)}),
    Case("hardened-default-account", _world(email="123456789-compute@developer.gserviceaccount.com"),
         {E("hardened-instances", NODE)}),
    Case("hardened-no-account", _world(email=None), {E("hardened-instances", NODE)}),
    Case("hardened-cloud-platform", _world(scopes=["https://www.googleapis.com/auth/cloud-platform"]),
         {E("hardened-instances", NODE)}),
    Case("hardened-external-undeclared", _world(external=True), {E("hardened-instances", NODE)}),
    Case("hardened-external-declared", _world(external=True), set(), external_ip_groups=("overlay",)),
    # data-safety
    Case("data-disk-kept", lambda: node_disk(), set()),
    Case("data-disk-not-kept", lambda: node_disk(prevent=False, protect=False, retain=False),
         {E("data-safety", "overlay-0-data")}),
    Case("data-disk-only-retain-missing", lambda: node_disk(retain=False),
         {E("data-safety", "overlay-0-data", offline_only=True)}),
    Case("data-disk-not-prevented", lambda: node_disk(prevent=False), {E("data-safety", "overlay-0-data")}),
    Case("data-disk-not-protected", lambda: node_disk(protect=False), {E("data-safety", "overlay-0-data")}),
    Case("data-address-kept", lambda: gcp.compute.Address("ip", name="fleet-prod-ip", region="us-central1",
                                                           deletion_policy="PREVENT",
                                                           opts=pulumi.ResourceOptions(protect=True,
                                                                                       retain_on_delete=True)), set()),
    Case("data-address-not-kept", lambda: gcp.compute.Address("ip", name="fleet-prod-ip", region="us-central1"),
         {E("data-safety", "ip")}),
    Case("data-config-disk-inside-a-node", _config_disk, set()),
    Case("data-disk-outside-nodes", lambda: gcp.compute.Disk("scratch", zone="us-central1-a", size=10), set()),
    Case("data-disk-dev", lambda: node_disk(prevent=False, protect=False, retain=False), set(), tier="dev"),
    Case("data-instance-protected", _world(protect=True), {E("data-safety", NODE)}, tier="staging"),
    Case("data-instance-deletion-protection", _world(deletion_protection=True), {E("data-safety", NODE)}, tier="dev"),
    # no-plaintext-secrets (offline-only)
    Case("secrets-plaintext-token", _secret_env(False), {E("no-plaintext-secrets", "deploy", offline_only=True)}),
    Case("secrets-token-as-secret", _secret_env(True), set()),
    # unsafe-peer-delivery
    Case("peers-metadata-prod", _world(metadata=_metadata(**{"overlay-peers": "10.0.0.2:5000"})),
         {E("unsafe-peer-delivery", NODE)}),
    Case("peers-metadata-dev", _world(metadata=_metadata(**{"overlay-peers": "10.0.0.2:5000"})), set(), tier="dev"),
    # the signed member table is what prod members get: unknown in a preview, it holds no image reference
    Case("peers-signed-table-prod", _signed_table(False), set()),
    Case("peers-signed-table-and-another-unknown", _signed_table(True),
         {E("pinned-digests", NODE, "could-not-run")}, expect_update=set()),
    # expected-measurements
    Case("measurements-overlay-none", _measurements("overlay", None), set()),
    Case("measurements-dstack-missing", _measurements("dstack", None),
         {E("expected-measurements", "dstack-fleet-prod")}),
    Case("measurements-dstack-pending", _measurements("dstack", {"os_image_hash": "pending build"}), set()),
    Case("measurements-dstack-null", _measurements("dstack", {"os_image_hash": None}),
         {E("expected-measurements", "dstack-fleet-prod")}),
    Case("measurements-unknown-kind", _measurements("sev-snp", None),
         {E("expected-measurements", "dstack-fleet-prod")}),
    Case("measurements-app-complete", _app_measurements({"compose_hash": H, "app_id": H[:40], "rtmr3": "known at boot"}),
         set()),
    Case("measurements-app-rtmr3-value", _app_measurements({"compose_hash": H, "app_id": H[:40], "rtmr3": H + H[:32]}),
         set()),
    Case("measurements-app-not-hex", _app_measurements({"compose_hash": H.upper(), "app_id": H[:40],
                                                         "rtmr3": "no measurement profile for dstack 0.6 yet"}),
         {E("expected-measurements", "dstack-fleet-prod")}),
    Case("measurements-app-pending-compose", _app_measurements({"compose_hash": "pending build",
                                                                "app_id": "pending build"}), set()),
    Case("measurements-app-missing-rtmr3", _app_measurements({"compose_hash": H, "app_id": H[:40]}),
         {E("expected-measurements", "dstack-fleet-prod")}),
]


RUNS = [(case, preview) for case in CASES for preview in case.passes]


@pytest.mark.parametrize("case,preview", RUNS,
                         ids=[f"{c.id}-{'preview' if p else 'update'}" for c, p in RUNS])
def test_rule_case_through_both_adapters(tmp_path, case, preview):
    check_case(tmp_path, case, preview)


def test_every_rule_has_a_violating_and_a_passing_case():
    violated = {e.policy for c in CASES for e in c.expect if e.status == "violation"}
    assert violated == set(rules.RULE_NAMES)
    for name in rules.RULE_NAMES:
        # a passing case: a case whose program is about this rule (by id) and expects nothing of it
        prefix = {"pinned-digests": "digests", "pinned-build-inputs": "build", "tdx-only": "tdx",
                  "image-features": "compliant", "no-open-ingress": "ingress", "hardened-instances": "hardened",
                  "data-safety": "data", "no-plaintext-secrets": "secrets", "unsafe-peer-delivery": "peers",
                  "no-public-access": "public",
                  "expected-measurements": "measurements"}[name]
        assert any(c.id.startswith(prefix) and not any(e.policy == name for e in c.expect) for c in CASES), name


# ---------------------------------------------------------------------------------------------
# Messages and specific behaviour


def _messages(tmp_path, case: Case, preview: bool = True) -> tuple[list[str], list[str]]:
    found, cg = check_case(tmp_path, case, preview)
    return [v["message"] for v in found], [v["message"] for v in cg]


def test_messages_name_the_path_and_the_problem_never_the_value(tmp_path):
    offline_messages, cg_messages = _messages(tmp_path, next(c for c in CASES if c.id == "digests-metadata-command"))
    (message,) = offline_messages
    assert message == ("the image reference in metadata.startup-script is pinned only by a tag, which can move; "
                       "pin every image as name@sha256:<64 hex>")
    assert cg_messages == [message]


def test_compose_build_and_app_compose_are_read_by_structure(tmp_path):
    (build,), _ = _messages(tmp_path, next(c for c in CASES if c.id == "digests-compose-build"))
    assert "metadata.app-compose (compose service #1 build)" in build
    # a storage object's content is a secret input of the provider: located, never described
    (nested,), _ = _messages(tmp_path, next(c for c in CASES if c.id == "digests-app-compose-in-object"))
    assert nested.startswith("the image reference in a secret value at content is pinned only by a tag")


def test_a_secret_compose_is_reported_without_its_service_names(tmp_path):
    def program():
        instance(metadata=_metadata(**{"app-compose": pulumi.Output.secret(
            "services:\n  hunter2:\n    image: img:tag\n")}))
    found, _ = check_case(tmp_path, Case("secret", program, {E("pinned-digests", NODE)}), True)
    (message,) = [v["message"] for v in found]
    assert "a secret value at metadata.app-compose" in message and "hunter2" not in message


def test_could_not_run_is_advisory_in_both_adapters_even_when_mandatory(tmp_path):
    case = next(c for c in CASES if c.id == "digests-unknown-command")
    found, cg = check_case(tmp_path, case, True)
    assert [v["enforcement"] for v in found] == ["advisory"]
    assert found[0]["message"].startswith("could not run: create is not known in this preview")
    assert [v["enforcement"] for v in cg] == ["advisory"]
    assert "pinned-digests could not run" in cg[0]["message"] and "::pull" in cg[0]["message"]


def test_offline_only_parts_are_marked_and_absent_from_the_pack(tmp_path):
    case = next(c for c in CASES if c.id == "data-disk-only-retain-missing")
    found, cg = check_case(tmp_path, case, True)
    assert [v["message"] for v in found] == [
        "a node's data disk in prod must be kept on delete (retainOnDelete option) [offline-only]"]
    assert cg == []
    assert "no-plaintext-secrets" not in {p.name for p in rules.crossguard_policies()}
    assert "offline-only" in rules.rule("no-plaintext-secrets").description.lower()
    data_safety = next(p for p in rules.crossguard_policies() if p.name == "data-safety")
    assert "retainOnDelete part is offline-only" in data_safety.description


def test_boot_image_families_and_short_forms_are_named_as_such(tmp_path):
    found, _ = check_case(tmp_path, next(c for c in CASES if c.id == "build-family-boot-image"), True)
    assert [v["message"] for v in found if v["policy"] == "pinned-build-inputs"] == [
        "the boot image (bootDisk.initializeParams.image) names an image family, which moves to newer images; "
        "pin the image by self link"]
    found, _ = check_case(tmp_path, next(c for c in CASES if c.id == "build-short-form-boot-image"), True)
    assert "the short forms may name a family" in found[0]["message"]


def test_tdx_only_resolves_the_boot_image_by_dependency_when_its_self_link_is_unknown(tmp_path):
    case = next(c for c in CASES if c.id == "tdx-image-not-capable")
    run = run_case(tmp_path, case, preview=True)
    node = next(r for r in run.resources if r.type == rules.INSTANCE)
    assert node.inputs["bootDisk"]["initializeParams"]["image"] is UNKNOWN
    found = offline(case, run)
    assert {v["message"] for v in found if v["policy"] == "tdx-only"} == {
        "boots an image of this stack whose guestOsFeatures lack TDX_CAPABLE"}


def test_without_an_image_of_this_stack_an_unknown_boot_image_could_not_be_checked(tmp_path):
    def program():
        probe = command.local.Command("probe", create="true")
        instance(image=probe.stdout)
    found, cg = check_case(tmp_path, Case("unknown", program, {E("tdx-only", NODE, "could-not-run"),
                                                                E("pinned-build-inputs", NODE, "could-not-run")}),
                           True)
    assert all(v["enforcement"] == "advisory" for v in found + cg)


def test_enforcement_defaults_follow_the_tier():
    assert rules.default_level("prod") == rules.default_level("staging") == "mandatory"
    assert rules.default_level("dev") == "advisory"
    assert rules.default_level(None) == "mandatory"  # images and bootstrap stacks
    context = rules.RuleContext(tier="dev", enforcement={"tdx-only": "mandatory", "data-safety": "disabled"})
    assert (context.level("tdx-only"), context.level("data-safety"), context.level("pinned-digests")) == (
        "mandatory", "disabled", "advisory")


# ---------------------------------------------------------------------------------------------
# Image references: the table, each through a docker image name, a compose file and a command


REFERENCES = [
    (f"registry:5000/img@sha256:{H}", None),
    ("registry:5000/img", "has neither tag nor digest, so it means :latest"),
    (f"img:tag@sha256:{H}", None),
    ("img:tag", "is pinned only by a tag, which can move"),
    (f"img@sha256:{H.upper()}", "has a digest that is not sha256 with 64 lower-case hex digits"),
    (f"img@sha256:{H[:63]}", "has a digest that is not sha256 with 64 lower-case hex digits"),
    ("${IMG}", "is filled in from a variable at deploy time"),
    (f"ghcr.io/acme/app:1.2@sha256:{H}", None),
    ("docker.io/library/nginx", "has neither tag nor digest, so it means :latest"),
]


@pytest.mark.parametrize("reference,problem", REFERENCES, ids=[r for r, _ in REFERENCES])
def test_pin_problem_table(reference, problem):
    assert rules.pin_problem(reference) == problem
    if problem:
        assert reference not in problem


@pytest.mark.parametrize("where", ["container", "compose", "command"])
@pytest.mark.parametrize("reference,problem", REFERENCES, ids=[r for r, _ in REFERENCES])
def test_image_reference_table_through_programs(tmp_path, where, reference, problem):
    def program():
        if where == "container":
            docker.Container("ref", image=reference)
        elif where == "compose":
            gcp.storage.BucketObject("ref", bucket="b", name="docker-compose.yaml",
                                     content=f"services:\n  app:\n    image: \"{reference}\"\n")
        else:
            command.local.Command("ref", create=f"set -e\ndocker pull {reference} && docker run --rm -v /a:/b "
                                                f"{reference} true")
    expect = {E("pinned-digests", "ref")} if problem else set()
    found, _ = check_case(tmp_path, Case(reference, program, expect), True)
    if problem:
        assert problem in found[0]["message"]


def test_a_digest_hidden_in_a_command_does_not_pin_the_tag_next_to_it(tmp_path):
    def program():
        command.local.Command("ref", create=f"docker pull x:latest && docker run --rm y@sha256:{H} true",
                              update=f"docker run img:tag@sha256:{H2}")
    found, _ = check_case(tmp_path, Case("hidden", program, {E("pinned-digests", "ref")}), True)
    assert found[0]["message"].startswith("the image reference in create is pinned only by a tag")


def test_image_problems_in_text_reads_structure_first():
    compose = f"services:\n  a:\n    image: img:tag@sha256:{H}\n  b:\n    build: ./b\n    image: b:dev\n"
    assert rules.image_problems_in_text(compose, "x") == [
        ("x (compose service #2 build)", "is a compose build:, which builds the image from sources no digest pins"),
        ("x (compose service #2 image)", "is pinned only by a tag, which can move")]
    app_compose = json.dumps({"docker_compose_file": "services:\n  a:\n    image: ${IMG}\n",
                              "pre_launch_script": "docker pull helper:1"})
    assert rules.image_problems_in_text(app_compose, "y") == [
        ("y (app-compose docker_compose_file) (compose service #1 image)", "is filled in from a variable at deploy time"),
        ("y (pre_launch_script)", "is pinned only by a tag, which can move")]


# ---------------------------------------------------------------------------------------------
# Configuration: offline context and the pack config


def test_pack_config_follows_tier_and_overrides():
    config = rules.pack_config("prod", {"unsafe-peer-delivery": "advisory", "tdx-only": "disabled"}, [443, 22],
                               ["projects/p-images/global/images/x"], external_ip_groups=["edge"])
    assert config["all"] == "mandatory"
    assert config["unsafe-peer-delivery"] == {"enforcementLevel": "advisory", "tier": "prod"}
    assert config["tdx-only"] == {"enforcementLevel": "disabled", "allowedImages": ["projects/p-images/global/images/x"],
                                  "extraMachineTypes": []}
    assert config["no-open-ingress"] == {"enforcementLevel": "mandatory", "publicPorts": [22, 443]}
    assert config["hardened-instances"]["externalIpGroups"] == ["edge"]
    assert "no-plaintext-secrets" not in config  # offline-only: not in the pack
    assert set(config) == {"all"} | {p.name for p in rules.crossguard_policies()}
    dev = rules.pack_config("dev")
    assert dev["all"] == "advisory" and {v["enforcementLevel"] for k, v in dev.items() if k != "all"} == {"advisory"}
    assert rules.pack_config(None)["data-safety"]["tier"] == "none"
    with pytest.raises(ValueError, match="no policy rule is named tdx"):
        rules.pack_config("prod", {"tdx": "advisory"})


def test_pack_config_keys_match_each_policys_schema():
    config = rules.pack_config("prod", public_ports=[22])
    for policy in rules.crossguard_policies():
        properties = policy.config_schema.properties if policy.config_schema else {}
        assert set(config[policy.name]) - {"enforcementLevel"} == set(properties), policy.name


def test_context_from_config_reads_the_stack(repo_root):
    from fleet.stacks.load import load_config

    _, config = load_config(repo_root, "prod")
    context = rules.context_from_config(config, project="dstack-fleet")
    assert context.tier == "prod" and context.stack_urn == "urn:pulumi:prod::dstack-fleet::pulumi:pulumi:Stack::dstack-fleet-prod"
    assert context.public_ports == frozenset() and context.external_ip_groups == frozenset()


def test_crossguard_without_config_or_stack_tier_refuses_instead_of_assuming_prod():
    """Before, a missing --policy-pack-config meant prod: dev and staging previews failed on prod rules."""
    with pytest.raises(rules.PackConfigMissing, match="it does not guess one"):
        rules.context_from_policy_config({}, {})
    assert rules.context_from_policy_config({"tier": "none"}, {}).tier is None
    assert rules.context_from_policy_config({"tier": "prod"}, {}).prod


def test_view_from_policy_reads_proxies_unknowns_and_assets():
    props = unknown_checking_proxy({"a": {"b": UNKNOWN_STRING_VALUE, "c": [1.0, "x", UNKNOWN_STRING_VALUE]},
                                    "asset": pulumi.FileAsset("guest.bin")})
    view = rules.view_from_policy("t:m:T", props, "urn:pulumi:s::p::t:m:T::n", "n")
    assert view.get("a", "b") is UNKNOWN and view.get("a", "c") == [1, "x", UNKNOWN]
    assert view.get("asset") == {"asset": {"path": "guest.bin"}}
    assert view.secret_paths is None and not view.sees("retainOnDelete")


def test_parent_chain_comes_from_the_urn():
    view = rules.ResourceView(
        urn="urn:pulumi:prod::p::dstack-fleet:nodes:DstackNode$gcp:compute/disk:Disk::d", type=rules.DISK, name="d",
        inputs={})
    assert view.parent_types == ("dstack-fleet:nodes:DstackNode",) and view.under(*rules.NODE_TYPES)


def test_measurement_marks_match_fleet_measure():
    from fleet.attest import measure

    assert set(rules.MEASUREMENT_MARKS) == set(measure.MARKERS)
    from components.tdxnode import PENDING_IMAGE

    assert PENDING_IMAGE == rules.PENDING_IMAGE
    assert rules.EXPECTED_MEASUREMENTS["overlay"].fields == {}  # overlay nodes: none, said explicitly
    assert "none" in rules.EXPECTED_MEASUREMENTS["overlay"].why


def test_real_build_scripts_carry_their_pins():
    from fleet.images.buildscript import build_script as generate

    from .test_buildhost import BUCKET, dstack, tplus

    for spec in (tplus(), dstack()):
        values = rules.build_script_values(generate(spec, mode="remote", bucket=BUCKET))
        assert values["UPSTREAM_COMMITS"] and all(len(c) == 40 for c in values["UPSTREAM_COMMITS"])
    assert rules.build_script_values(generate(tplus(), mode="remote", bucket=BUCKET))["GUEST_COMMIT"] == [
        "3eb04cad11664a381227d77a469e68bca7e94c30"]


def test_real_build_host_passes_every_rule(tmp_path):
    from components.buildhost import BuildHost
    from fleet.images.buildscript import plan_build_host

    from .test_buildhost import ACCOUNT, NAMER, SETTINGS, SUBNET, dstack, tplus

    plans = [plan_build_host(s, SETTINGS, NAMER, project="acme-tee-build") for s in (tplus(), dstack())]

    def program():
        for p in plans:
            BuildHost(p, project="acme-tee-build", subnetwork=SUBNET, service_account=ACCOUNT)

    for preview in (True, False):
        check_case(tmp_path, Case("real-build-host", program, set(), tier=None), preview)
