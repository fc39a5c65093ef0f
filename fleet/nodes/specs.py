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
from fleet.config.schema import NodeGroup, StackConfig
from fleet.nodes.identity import NodeIdentity, node_identities
from fleet.images.versions import ImageVersion
from fleet.nodes.initscript import node_metadata, render
from fleet.gcp.naming import Namer
from fleet.nodes.network import Ingress, group_tag
from fleet.nodes.topology import OverlayPlan, plan_overlay

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

    def by_group(self) -> dict[str, list[NodeSpec]]:
        out: dict[str, list[NodeSpec]] = {}
        for node in self.nodes:
            out.setdefault(node.identity.group, []).append(node)
        return out


def overlay_tag(namer: Namer) -> str:
    """Network tag of every overlay member (firewall source and target of the overlay port)."""
    return namer.name("overlay-members")


def snapshot_policy_name(namer: Namer, region: str) -> str:
    return namer.name(region, "snapshots")


def snapshots_enabled(config: StackConfig) -> bool:
    return config.fleet.snapshots if config.fleet.snapshots is not None else config.is_prod


# The overlay plan and init script of the config last asked for: one pass asks several times (image
# inputs, node specs), and rendering a large mesh's table is not free.
_last_overlay: list = []


def overlay_init_script(config: StackConfig, namer: Namer) -> tuple[OverlayPlan | None, str | None]:
    if _last_overlay and _last_overlay[0] is config and _last_overlay[1] == namer:
        return _last_overlay[2]
    plan = plan_overlay(config, node_identities(config, namer))
    result = plan, (render(plan) if plan else None)
    _last_overlay[:] = [config, namer, result]
    return result


def derived_image_inputs(config: StackConfig, namer: Namer) -> dict[str, dict[str, str]]:
    """Inputs of image builds that come from the stack itself: an overlay image bakes the init
    script (with the member table in ``baked`` delivery), so its bytes are part of the input hash."""
    _, script = overlay_init_script(config, namer)
    out: dict[str, dict[str, str]] = {}
    if script is None:
        return out
    digest = hashlib.sha256(script.encode("utf-8")).hexdigest()
    for key, source in config.fleet.images.items():
        if source.build is not None and source.build.recipe == "tplus-overlay":
            out[key] = {"init_script_sha256": digest}
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
        metadata = dict(BASE_METADATA)
        peers: tuple[str, ...] = ()
        if identity.kind == "overlay" and overlay is not None:
            peers = tuple(overlay.peer_endpoints(identity.key))
            if overlay.delivery == "metadata":
                metadata.update(node_metadata(overlay, identity.key))
        scopes = LOGGING_SCOPES + ((REGISTRY_READ_SCOPE,) if identity.kind == "dstack" else ())
        tags = (group_tag(namer, identity.group),) + ((overlay_tag(namer),) if identity.kind == "overlay" else ())
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
        ))
    ingress = []
    if overlay is not None:
        tag = overlay_tag(namer)
        ingress.append(Ingress(
            key="overlay-peers",
            description=f"Overlay traffic ({overlay.protocol}/{overlay.port}) between overlay nodes only.",
            protocol=overlay.protocol, ports=(overlay.port,), target_tags=(tag,), source_tags=(tag,)))
    return Fleet(nodes=nodes, overlay=overlay, init_script=script, ingress=ingress)
