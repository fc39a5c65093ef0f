"""Stand-ins for what only a cloud provider knows, for the offline plan.

``COMPUTED`` lists, per resource type, the outputs the provider computes (ids, self links, emails,
digests, command output). In a real preview of a new resource they are unknown, and so they are in
the plan's preview pass; the update pass fills them with deterministic stand-ins so that every
``apply`` body runs. A type missing from the table is an error, so adding a resource type forces
a decision about its computed outputs.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
from dataclasses import dataclass
from typing import Any, Callable

import pulumi

from fleet.apps import phala
from fleet.images import buildscript, dockerbuild, mkosibuild
from fleet.nodes import membertable

COMPUTE = "https://www.googleapis.com/compute/v1"
FAKE_PROJECT_NUMBER = "123456789012"


# Set while the offline plan runs the program to exercise it (``--pass preview``/``both``): the deploy-time
# guards (fleet.stacks.readiness: pending images, unset secrets) warn instead of refusing, so every apply
# body runs. ``--pass up`` runs without it (``run_program(as_deployment=True)``), as a real `pulumi up`.
OFFLINE_PLAN_ENV = "DSTACK_FLEET_OFFLINE_PLAN"


def is_offline_plan() -> bool:
    return os.environ.get(OFFLINE_PLAN_ENV) == "1"


def is_real_update() -> bool:
    """True in a real `pulumi up` (not a preview, not the offline plan)."""
    return not pulumi.runtime.is_dry_run() and not is_offline_plan()


class OfflineGap(Exception):
    """The offline plan has no stand-in for something the program asked for."""


@dataclass(frozen=True)
class Context:
    project: str
    stack: str
    type: str
    name: str
    urn: str
    inputs: dict[str, Any]

    @property
    def gcp_name(self) -> str:
        name = self.inputs.get("name")
        return name if isinstance(name, str) else self.name

    @property
    def project_id(self) -> str:
        project = self.inputs.get("project")
        return project if isinstance(project, str) else self.project

    def digest(self, salt: str = "") -> str:
        return hashlib.sha256(f"{self.urn}|{salt}".encode()).hexdigest()

    def number(self, salt: str = "") -> str:
        return str(int(self.digest(salt)[:15], 16))


def _self_link(scope: str, collection: str) -> Callable[[Context], dict[str, Any]]:
    def outputs(ctx: Context) -> dict[str, Any]:
        where = ctx.inputs.get(scope.rstrip("s")) if scope in ("regions", "zones") else None
        location = f"{scope}/{where}" if where else "global"
        link = f"{COMPUTE}/projects/{ctx.project_id}/{location}/{collection}/{ctx.gcp_name}"
        return {"selfLink": link}

    return outputs


def _with(*parts: Callable[[Context], dict[str, Any]]) -> Callable[[Context], dict[str, Any]]:
    def outputs(ctx: Context) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for part in parts:
            merged.update(part(ctx))
        return merged

    return outputs


def _fields(**values: Callable[[Context], Any]) -> Callable[[Context], dict[str, Any]]:
    return lambda ctx: {k: f(ctx) for k, f in values.items()}


COMPUTED: dict[str, Callable[[Context], dict[str, Any]]] = {
    "gcp:compute/network:Network": _with(
        _self_link("global", "networks"),
        _fields(networkId=lambda c: c.number(), gatewayIpv4=lambda c: ""),
    ),
    "gcp:compute/subnetwork:Subnetwork": _with(
        _self_link("regions", "subnetworks"),
        _fields(gatewayAddress=lambda c: _gateway(c.inputs.get("ipCidrRange", "")), subnetworkId=lambda c: c.number()),
    ),
    "gcp:compute/router:Router": _self_link("regions", "routers"),
    "gcp:compute/routerNat:RouterNat": _fields(),
    "gcp:compute/firewall:Firewall": _self_link("global", "firewalls"),
    "gcp:compute/image:Image": _with(
        _self_link("global", "images"),
        _fields(archiveSizeBytes=lambda c: 10737418240, labelFingerprint=lambda c: c.digest("labels")[:12]),
    ),
    "gcp:compute/address:Address": _with(
        _self_link("regions", "addresses"),
        # an internal address is the one we asked for; an external one is assigned by GCP
        _fields(address=lambda c: c.inputs.get("address") or _fake_public_ip(c)),
    ),
    "gcp:compute/disk:Disk": _with(
        _self_link("zones", "disks"),
        _fields(diskId=lambda c: c.number(), labelFingerprint=lambda c: c.digest("labels")[:12]),
    ),
    "gcp:compute/instance:Instance": _with(
        _self_link("zones", "instances"),
        _fields(instanceId=lambda c: c.number(), cpuPlatform=lambda c: "Intel Sapphire Rapids",
                currentStatus=lambda c: "RUNNING", labelFingerprint=lambda c: c.digest("labels")[:12]),
    ),
    "gcp:compute/resourcePolicy:ResourcePolicy": _self_link("regions", "resourcePolicies"),
    "gcp:compute/diskResourcePolicyAttachment:DiskResourcePolicyAttachment": _fields(),
    "command:local:Command": lambda c: {"stdout": command_stdout(c), "stderr": ""},
    # a build host's guest binary, uploaded next to its artifacts (components/buildhost.py)
    "gcp:storage/bucketObject:BucketObject": _fields(
        selfLink=lambda c: f"https://www.googleapis.com/storage/v1/b/{c.inputs.get('bucket')}/o/{c.gcp_name}",
        mediaLink=lambda c: f"https://storage.googleapis.com/download/storage/v1/b/{c.inputs.get('bucket')}/o/"
                            f"{c.gcp_name}?alt=media",
        outputName=lambda c: c.gcp_name, generation=lambda c: int(c.digest("generation")[:12], 16),
        crc32c=lambda c: c.digest("crc32c")[:6] + "==", md5hash=lambda c: c.digest("md5")[:22] + "==",
        contentType=lambda c: "application/octet-stream"),
    # pulumi-docker: the manifest digest of the push (deterministic stand-in)
    "docker:index/image:Image": _fields(
        repoDigest=lambda c: f"{str(c.inputs.get('imageName', '')).rsplit(':', 1)[0]}@sha256:{c.digest('push')}",
        baseImageName=lambda c: c.inputs.get("imageName"), context=lambda c: (c.inputs.get("build") or {}).get("context"),
        dockerfile=lambda c: (c.inputs.get("build") or {}).get("dockerfile"), platform=lambda c: "linux/amd64"),
    # explicit provider instances (components/roles/env.py: registry look-ups without a Docker daemon)
    "pulumi:providers:docker": _fields(),
    "gcp:projects/service:Service": _fields(),
    "gcp:storage/bucket:Bucket": _fields(url=lambda c: f"gs://{c.gcp_name}",
                                         selfLink=lambda c: f"https://www.googleapis.com/storage/v1/b/{c.gcp_name}"),
    "gcp:kms/keyRing:KeyRing": _fields(),
    "gcp:kms/cryptoKey:CryptoKey": _fields(primaries=lambda c: []),
    "gcp:iam/workloadIdentityPool:WorkloadIdentityPool": _fields(
        name=lambda c: f"projects/{FAKE_PROJECT_NUMBER}/locations/global/workloadIdentityPools/"
                       f"{c.inputs.get('workloadIdentityPoolId')}", state=lambda c: "ACTIVE"),
    "gcp:iam/workloadIdentityPoolProvider:WorkloadIdentityPoolProvider": _fields(
        name=lambda c: f"projects/{FAKE_PROJECT_NUMBER}/locations/global/workloadIdentityPools/"
                       f"{c.inputs.get('workloadIdentityPoolId')}/providers/{c.inputs.get('workloadIdentityPoolProviderId')}",
        state=lambda c: "ACTIVE"),
    "gcp:serviceaccount/account:Account": _fields(
        email=lambda c: _sa_email(c), name=lambda c: f"projects/{c.project_id}/serviceAccounts/{_sa_email(c)}",
        uniqueId=lambda c: c.number(), member=lambda c: f"serviceAccount:{_sa_email(c)}"),
    "gcp:projects/iAMMember:IAMMember": _fields(etag=lambda c: c.digest("etag")[:16]),
    "gcp:storage/bucketIAMMember:BucketIAMMember": _fields(etag=lambda c: c.digest("etag")[:16]),
    "gcp:kms/cryptoKeyIAMMember:CryptoKeyIAMMember": _fields(etag=lambda c: c.digest("etag")[:16]),
    "gcp:artifactregistry/repositoryIamMember:RepositoryIamMember": _fields(etag=lambda c: c.digest("etag")[:16]),
    "gcp:serviceaccount/iAMMember:IAMMember": _fields(etag=lambda c: c.digest("etag")[:16]),
    "gcp:artifactregistry/repository:Repository": _fields(
        name=lambda c: f"projects/{c.project_id}/locations/{c.inputs.get('location')}/repositories/"
                       f"{c.inputs.get('repositoryId')}", createTime=lambda c: "2026-01-01T00:00:00Z"),
    # an app's VM on a dstack VMM host (components/vmm.py, dynamic provider): the VMM's VM id (a UUID),
    # its status and app id, and, with secret env, a blob of the encrypted env's shape (32-byte key, IV,
    # ciphertext) with its keyed digest
    "pulumi-python:dynamic/vmm:Vm": _fields(
        vmId=lambda c: str(__import__("uuid").UUID(c.digest("vm-id")[:32])), status=lambda c: "running",
        vmAppId=lambda c: c.inputs.get("appId"),
        encryptedEnv=lambda c: (c.digest("env-pub") + c.digest("env-iv")[:24] + c.digest("env-ct")
                                if c.inputs.get("secretEnv") else ""),
        envKey=lambda c: c.digest("env-key") if c.inputs.get("secretEnv") else "",
        envDigest=lambda c: c.digest("env-digest") if c.inputs.get("secretEnv") else "",
        kmsSigner=lambda c: "0x02" + c.digest("kms-signer") if c.inputs.get("secretEnv") else ""),
}

# Generated command scripts name their step on a line `# dstack-fleet:step=<name>`; a step whose
# output the program parses registers a stand-in here that produces output of the same shape.
STEP_MARK = "# dstack-fleet:step="
COMMAND_STEPS: dict[str, Callable[[Context], str]] = {
    # An app's Phala deploy step prints `phala cvms get <name> --json`; the stand-in is a document of that
    # shape with fake values derived from the step's URN (fleet/apps/phala.py).
    "phala-deploy": phala.offline_cvm_stdout,
    # A container built with mkosi prints its lock entry as one JSON line; the stand-in is a line of that
    # shape with fake digests derived from the step's URN (fleet/images/mkosibuild.py).
    "mkosi-build": mkosibuild.offline_step_stdout,
    # A container built with Docker prints its lock entry the same way (fleet/images/dockerbuild.py).
    "docker-build": dockerbuild.offline_step_stdout,
    # The overlay member table's signing step prints the signed table and its signature; the stand-in
    # is that output for the table on its stdin, serial 1, with a fake signature (fleet/nodes/membertable.py).
    "overlay-table-sign": membertable.offline_step_stdout,
}


def command_step(script: object) -> str | None:
    if not isinstance(script, str):
        return None
    for line in script.splitlines():
        if line.startswith(STEP_MARK):
            return line[len(STEP_MARK):].strip()
    return None


def command_stdout(ctx: Context) -> str:
    step = command_step(ctx.inputs.get("create"))
    if step in COMMAND_STEPS:
        return COMMAND_STEPS[step](ctx)
    return f"offline stand-in output of {ctx.name}"


def _fake_public_ip(ctx: Context) -> str:
    """A documentation-range address (RFC 5737), so a stand-in can never be mistaken for a real one."""
    return f"203.0.113.{int(ctx.digest('ip')[:2], 16) % 254 + 1}"


def _sa_email(ctx: Context) -> str:
    return f"{ctx.inputs.get('accountId')}@{ctx.project_id}.iam.gserviceaccount.com"


def _gateway(cidr: str) -> str:
    try:
        return str(ipaddress.IPv4Network(cidr).network_address + 1)
    except ValueError:
        return ""


def computed_outputs(ctx: Context) -> dict[str, Any]:
    fill = COMPUTED.get(ctx.type)
    if fill is None:
        raise OfflineGap(
            f"resource type {ctx.type} has no entry in fleet/plan/offline.py COMPUTED; list the outputs its "
            "provider computes so the offline plan stays faithful"
        )
    return fill(ctx)


# Ids the program passes on to other resources, in the form the provider reports them.
RESOURCE_IDS: dict[str, Callable[[Context], str]] = {
    "gcp:kms/keyRing:KeyRing": lambda c: f"projects/{c.project_id}/locations/{c.inputs.get('location')}/keyRings/"
                                         f"{c.gcp_name}",
    "gcp:kms/cryptoKey:CryptoKey": lambda c: f"{c.inputs.get('keyRing')}/cryptoKeys/{c.gcp_name}",
    "gcp:compute/network:Network": lambda c: f"projects/{c.project_id}/global/networks/{c.gcp_name}",
    "gcp:compute/subnetwork:Subnetwork": lambda c: f"projects/{c.project_id}/regions/{c.inputs.get('region')}/"
                                                   f"subnetworks/{c.gcp_name}",
}


def resource_id(ctx: Context) -> str:
    fill = RESOURCE_IDS.get(ctx.type)
    return fill(ctx) if fill else f"{ctx.gcp_name}-{ctx.digest('id')[:8]}"


INVOKES: dict[str, Callable[[dict[str, Any], str], dict[str, Any]]] = {
    # a registry lookup by digest answers with that digest (the image is assumed present offline)
    "docker:index/getRegistryImage:getRegistryImage": lambda args, project: {
        "name": args.get("name"), "sha256Digest": str(args.get("name", "")).rpartition("@")[2],
        "insecureSkipVerify": False},
    "gcp:organizations/getProject:getProject": lambda args, project: {
        "projectId": args.get("projectId") or project,
        "number": FAKE_PROJECT_NUMBER,
        "name": args.get("projectId") or project,
    },
}


# Invokes that must go through an explicit provider instance (its type), not the default provider: the
# default Docker provider needs a Docker daemon on the deploying machine.
INVOKE_PROVIDERS: dict[str, str] = {
    "docker:index/getRegistryImage:getRegistryImage": "pulumi:providers:docker",
}


def invoke(token: str, args: dict[str, Any], *, project: str, preview: bool, provider: str = "") -> dict[str, Any]:
    handler = INVOKES.get(token)
    if handler is None:
        raise OfflineGap(f"no offline stand-in for invoke {token}; add one to fleet/plan/offline.py INVOKES")
    wanted = INVOKE_PROVIDERS.get(token)
    if wanted and f"::{wanted}::" not in provider:
        raise OfflineGap(f"invoke {token} must use an explicit {wanted} provider (the default one needs a "
                         f"Docker daemon), not {provider or 'the default provider'}")
    return handler(args, project)
