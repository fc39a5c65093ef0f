"""Everything about one confidential node, decided before any resource exists.

Components only turn a ``NodeSpec`` into an address, a data disk and a TDX instance. Safety rules
live here: instances are replaced delete-before-replace and never protected (protection would
block every upgrade); in prod the data disk and address are protected, kept on delete and carry
``deletion_policy: PREVENT``, so no change can take a node's data with it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from fleet.project import accounts
from fleet.project.bootstrap import names_for
from fleet.config.schema import NodeGroup, StackConfig, rollout_node_port
from fleet.nodes.identity import NodeIdentity, node_identities
from fleet.images.recipes import INIT_SCRIPT_DERIVED, TABLE_KEY_DERIVED
from fleet.images.versions import ImageVersion
from fleet.nodes import membertable
from fleet.nodes.initscript import SCRIPT, SCRIPT_SHA256
from fleet.gcp.naming import Namer
from fleet.nodes.network import Ingress, group_tag
from fleet.nodes.topology import OverlayPlan, inbound, plan_overlay

LOGGING_SCOPES = (
    "https://www.googleapis.com/auth/logging.write",
    "https://www.googleapis.com/auth/monitoring.write",
)
REGISTRY_READ_SCOPE = "https://www.googleapis.com/auth/devstorage.read_only"
BOOT_DISK_GB = 20
DISK_TYPE = "pd-balanced"
DATA_DEVICE_NAME = "data"

# Serial output goes to Cloud Logging for boot diagnostics; the interactive serial console stays
# off. Project SSH keys are blocked, though these guests run no SSH daemon or Google guest agent:
# the keys would do nothing, and the real protection is that nothing listens.
BASE_METADATA = {
    "block-project-ssh-keys": "TRUE",
    "serial-port-enable": "FALSE",
    "serial-port-logging-enable": "TRUE",
}


@dataclass(frozen=True)
class Shielded:
    secure_boot: bool
    vtpm: bool
    integrity_monitoring: bool


# tplus images are measured by Google's firmware "according to spec" with the vTPM off (as their
# deployment does); dstack on GCP measures the UKI into vTPM PCRs and needs it on. The custom UKIs
# are unsigned, so Secure Boot is off for both.
SHIELDED = {
    "overlay": Shielded(secure_boot=False, vtpm=False, integrity_monitoring=False),
    "dstack": Shielded(secure_boot=False, vtpm=True, integrity_monitoring=True),
}


@dataclass(frozen=True)
class NodeSpec:
    identity: NodeIdentity
    machine_type: str
    image_key: str
    image: ImageVersion
    address_name: str
    external_address_name: str | None
    data_disk_name: str
    data_disk_gb: int
    service_account: str
    scopes: tuple[str, ...]
    shielded: Shielded
    metadata: dict[str, str]
    tags: tuple[str, ...]
    labels: dict[str, str]
    protect_data: bool
    snapshot_policy: str | None  # region of the snapshot schedule to attach, or None
    max_unavailable: int
    peers: tuple[str, ...] = ()
    delivery: str | None = None
    restart_key: str | None = None  # overlay settings a running node acts on only at a restart (reset)

    @property
    def key(self) -> str:
        return self.identity.key

    def summary(self) -> dict[str, object]:
        """The plan's line for this node."""
        out: dict[str, object] = {
            "group": self.identity.group,
            "ordinal": self.identity.ordinal,
            "kind": self.identity.kind,
            "name": self.identity.name,
            "zone": self.identity.zone,
            "address": self.identity.address,
            "machineType": self.machine_type,
            "image": self.image_key,
            "imageStatus": self.image.status,
        }
        if self.identity.kind == "overlay":
            out["peers"] = list(self.peers)
            out["delivery"] = self.delivery
        return out


@dataclass
class Fleet:
    nodes: list[NodeSpec]
    overlay: OverlayPlan | None
    init_script: str | None
    ingress: list[Ingress] = field(default_factory=list)
    table_body: str | None = None  # the overlay member table as the plan knows it (fleet.nodes.membertable)
    table_key_version: str | None = None  # the Cloud KMS key version that signs it

    def by_group(self) -> dict[str, list[NodeSpec]]:
        out: dict[str, list[NodeSpec]] = {}
        for node in self.nodes:
            out.setdefault(node.identity.group, []).append(node)
        return out


def overlay_tag(namer: Namer) -> str:
    """Network tag of every overlay member (firewall source and target of the overlay port)."""
    return namer.name("overlay-members")


def overlay_node_tag(namer: Namer, key: str) -> str:
    """A member's own tag, the target of the firewall rule that admits its inbound peers (every
    topology but mesh, whose edges are all pairs)."""
    return namer.name("ovl", key)


# The light client's HTTP API (`GET /attest`, `GET /block`, `POST /call`): tpluslabs/tplus-examples
# @3eb04cad dstack-helios-tdx/light-client/src/helios.rs serves it on 0.0.0.0:3032.
LIGHT_CLIENT_API_PORT = 3032
# What verifies nodes reaches that port through IAP TCP forwarding
# (`gcloud compute start-iap-tunnel NODE 3032 ...`), whose connections come from this range
# (cloud.google.com/iap/docs/using-tcp-forwarding#create-firewall-rule). Nothing else may reach it.
IAP_TCP_FORWARDING_RANGE = "35.235.240.0/20"
# The dstack guest agent's public HTTP API (the `Worker` service: Info, Version): `[external] address =
# "0.0.0.0", port = 8090` in Dstack-TEE/dstack guest-agent/dstack.toml (1029e63f), "an HTTP server on
# port 8090 inside the CVM" in docs/security/cvm-boundaries.md (312dc605 and 10ca9b29). A dstack node
# admits it, like the light client's API, only through IAP TCP forwarding.
GUEST_AGENT_PORT = 8090
# Firewall rules are kept well inside GCP's per-rule limits (assumed >= 256 source ranges and >= 64
# target tags; the limits page could not be read: a stated assumption in docs/nodes-and-overlay.md).
MAX_SOURCE_RANGES = 256
MAX_TARGET_TAGS = 64


def snapshot_policy_name(namer: Namer, region: str) -> str:
    return namer.name(region, "snapshots")


def snapshots_enabled(config: StackConfig) -> bool:
    return config.fleet.snapshots if config.fleet.snapshots is not None else config.is_prod


# The overlay plan of the config last asked for: one pass asks several times (image inputs, node
# specs), and planning a large mesh is not free.
_last_overlay: list = []


def overlay_init_script(config: StackConfig, namer: Namer) -> tuple[OverlayPlan | None, str]:
    """The overlay plan and the init script an overlay image bakes (the same for every stack)."""
    if _last_overlay and _last_overlay[0] is config and _last_overlay[1] == namer:
        return _last_overlay[2]
    plan = plan_overlay(config, node_identities(config, namer))
    result = plan, SCRIPT
    _last_overlay[:] = [config, namer, result]
    return result


def derived_image_inputs(config: StackConfig, namer: Namer) -> dict[str, dict[str, str]]:
    """Inputs of image builds that come from outside the build's own config: an overlay image bakes
    the init script (the same bytes for every stack) and the public half of the fleet's table-signing
    key (named by its Cloud KMS key version, whose key never changes). Nothing here depends on the
    members, the port or the environment, so dev, staging and prod name the same image."""
    out: dict[str, dict[str, str]] = {}
    key_version = names_for(config).table_key_version
    for key, source in config.fleet.images.items():
        if source.build is not None and source.build.recipe == "tplus-overlay":
            out[key] = {INIT_SCRIPT_DERIVED: SCRIPT_SHA256, TABLE_KEY_DERIVED: key_version}
    return out


def restart_key(plan: OverlayPlan) -> str:
    """What a running member acts on only at its next start: a change of any of these resets the
    members, in waves (membership is not here: a running node accepts joining peers as it is)."""
    text = "|".join(str(v) for v in (plan.port, plan.protocol, plan.interface, plan.topology, plan.setup_port,
                                     plan.execution_rpc or ""))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def overlay_ingress(plan: OverlayPlan, namer: Namer) -> list[Ingress]:
    """The overlay port along the topology's edges (a member admits exactly the members that dial
    it), and the light client's API only from what verifies nodes; the setup port never."""
    tag = overlay_tag(namer)
    out = [Ingress(
        key="overlay-api-iap",
        description=(f"The light client's API (tcp/{LIGHT_CLIENT_API_PORT}: /attest, /block) only through IAP TCP "
                     "forwarding, the path fleet verify takes; the setup port is never opened."),
        protocol="tcp", ports=(LIGHT_CLIENT_API_PORT,), target_tags=(tag,), source_ranges=(IAP_TCP_FORWARDING_RANGE,))]
    if plan.topology == "mesh":
        out.append(Ingress(
            key="overlay-peers",
            description=f"Overlay traffic ({plan.protocol}/{plan.port}) between overlay nodes only.",  # mesh: all pairs
            protocol=plan.protocol, ports=(plan.port,), target_tags=(tag,), source_tags=(tag,)))
        return out
    sources = inbound(plan)
    groups: dict[tuple[str, ...], list[str]] = {}
    for m in plan.members:
        if sources[m.key]:
            groups.setdefault(sources[m.key], []).append(m.key)
    for dialers, targets in groups.items():
        ranges = [f"{plan.address_of(k)}/32" for k in dialers]
        for t in range(0, len(targets), MAX_TARGET_TAGS):
            chunk = targets[t:t + MAX_TARGET_TAGS]
            for r in range(0, len(ranges), MAX_SOURCE_RANGES):
                suffix = "".join(f"-{i}" for i in (t // MAX_TARGET_TAGS, r // MAX_SOURCE_RANGES) if i)
                out.append(Ingress(
                    key=f"overlay-peers-{chunk[0]}{suffix}",
                    description=(f"Overlay traffic ({plan.protocol}/{plan.port}) to {', '.join(chunk)} from the "
                                 f"members that dial {'it' if len(chunk) == 1 else 'them'} ({plan.topology})."),
                    protocol=plan.protocol, ports=(plan.port,),
                    target_tags=tuple(overlay_node_tag(namer, k) for k in chunk),
                    source_ranges=tuple(ranges[r:r + MAX_SOURCE_RANGES])))
    return out


def dstack_ingress(config: StackConfig, namer: Namer) -> list[Ingress]:
    """Per dstack group, what `make rollout` reads on its nodes, only from IAP TCP forwarding's range
    and only to that group's nodes: the guest agent's port and the ports its rollout templates read
    on the node itself (a quoteUrl such as http://{address}:8080/quote; a template naming another
    host, e.g. a gateway, opens nothing here)."""
    out = []
    for group in config.fleet.nodes:
        if group.kind != "dstack":
            continue
        ports = {GUEST_AGENT_PORT}
        endpoints = config.fleet.rollout.groups.get(group.name)
        for template in (endpoints.info_url, endpoints.quote_url) if endpoints else ():
            port = rollout_node_port(template) if template else None
            if port is not None:
                ports.add(port)
        listed = ", ".join(f"tcp/{p}" for p in sorted(ports))
        out.append(Ingress(
            key=f"dstack-api-iap-{group.name}",
            description=(f"What verifies the nodes of group {group.name} ({listed}: the guest agent's Info, the "
                         "app's quote) only through IAP TCP forwarding, the path make rollout takes."),
            protocol="tcp", ports=tuple(sorted(ports)), target_tags=(group_tag(namer, group.name),),
            source_ranges=(IAP_TCP_FORWARDING_RANGE,)))
    return out


def plan_fleet(config: StackConfig, namer: Namer, images: dict[str, ImageVersion]) -> Fleet:
    identities = node_identities(config, namer)
    overlay, script = overlay_init_script(config, namer)
    groups = {g.name: g for g in config.fleet.nodes}
    protect = config.is_prod
    snapshots = snapshots_enabled(config)
    nodes = []
    for identity in identities:
        group: NodeGroup = groups[identity.group]
        key = group.image_overrides.get(identity.ordinal, group.image)
        metadata = dict(BASE_METADATA)  # an overlay member also gets the signed table (components/overlaytable.py)
        peers: tuple[str, ...] = ()
        tags = (group_tag(namer, identity.group),)
        if identity.kind == "overlay" and overlay is not None:
            peers = tuple(overlay.peer_endpoints(identity.key))
            tags += (overlay_tag(namer),)
            if overlay.topology != "mesh":
                tags += (overlay_node_tag(namer, identity.key),)
        scopes = LOGGING_SCOPES + ((REGISTRY_READ_SCOPE,) if identity.kind == "dstack" else ())
        nodes.append(NodeSpec(
            identity=identity,
            machine_type=group.machine_type,
            image_key=key,
            image=images[key],
            address_name=namer.name(identity.group, str(identity.ordinal), "ip"),
            external_address_name=namer.name(identity.group, str(identity.ordinal), "ext") if group.external_ip else None,
            data_disk_name=namer.name(identity.group, str(identity.ordinal), "data"),
            data_disk_gb=group.data_disk_gb,
            service_account=accounts.node_account_email(
                config.fleet.name_prefix, config.stack, identity.kind, config.gcp.project),
            scopes=scopes,
            shielded=SHIELDED[identity.kind],
            metadata=metadata,
            tags=tuple(sorted(tags)),
            labels=namer.labels(**{**config.fleet.labels, "group": identity.group, "kind": identity.kind,
                                   "node": identity.key, "environment": config.stack,
                                   "tier": config.fleet.tier or "none"}),
            protect_data=protect,
            snapshot_policy=identity.region if snapshots else None,
            max_unavailable=group.max_unavailable,
            peers=peers,
            delivery=overlay.delivery if identity.kind == "overlay" and overlay else None,
            restart_key=restart_key(overlay) if identity.kind == "overlay" and overlay else None,
        ))
    verify = dstack_ingress(config, namer)
    if overlay is None:
        return Fleet(nodes=nodes, overlay=None, init_script=None, ingress=verify)
    return Fleet(nodes=nodes, overlay=overlay, init_script=script, ingress=overlay_ingress(overlay, namer) + verify,
                 table_body=membertable.body(overlay), table_key_version=names_for(config).table_key_version)


def overlay_summary(fleet: Fleet) -> dict[str, object]:
    """The plan's ``overlay`` output: how the overlay is wired, what its table is, and what the light
    client itself does and does not check (tpluslabs/tplus-examples @3eb04cad dstack-helios-tdx)."""
    plan = fleet.overlay
    assert plan is not None and fleet.table_body is not None
    return {
        "topology": plan.topology, "delivery": plan.delivery, "interface": plan.interface,
        "genesis": plan.genesis, "port": plan.port, "members": len(plan.members),
        "table": {
            "bodySha256": membertable.sha256_text(fleet.table_body),
            "keyVersion": fleet.table_key_version,
            "metadata": [membertable.METADATA_TABLE, membertable.METADATA_SIGNATURE],
            "worstCaseBytes": membertable.worst_case_bytes(plan),
            "limitBytes": membertable.MAX_VALUE_BYTES,
        },
        "verifyPath": (f"tcp/{LIGHT_CLIENT_API_PORT} (/attest) through IAP TCP forwarding from "
                       f"{IAP_TCP_FORWARDING_RANGE} only: gcloud compute start-iap-tunnel NODE {LIGHT_CLIENT_API_PORT}"),
        "lightClientChecks": ("a joining peer's quote signature only (mocks/src/lib.rs verify_quote: measurements "
                              "are a TODO upstream), then it shares the secret with it; POST /setup on port "
                              f"{plan.setup_port} is unauthenticated (first caller wins): the init script sends "
                              "it on loopback at boot and no firewall rule opens it"),
        "restarts": ("running members read the table at their next start; a membership change needs none, a "
                     "port, interface, topology or execution RPC change resets them in waves"),
        "allDown": "every member down at once loses the shared secret for good; the rollout check refuses it",
    }
