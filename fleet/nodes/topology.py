"""Peer lists of the overlay, all known at plan time.

Members are the stack's ``kind: overlay`` nodes in config order (group order, then ordinal). Peers
are addresses, which the core allocates from config, so no peer list depends on another
resource's output and the graph has no cycles.

Exactly one node founds the overlay: the *genesis* node starts without peers, which makes it mint
the shared secret. It does so only with the overlay's first signed member table (``founding open``,
see ``fleet.nodes.membertable``) and only while its data disk has never recorded a founding or an
accepted table; on every later boot (restart, replacement with the same disk, a new disk after the
table moved on) it starts with peers like everyone else, so a restart never splits the network.
Every other node always starts with peers.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from fleet.config.schema import OverlayConfig, StackConfig
from fleet.nodes.identity import NodeIdentity


@dataclass(frozen=True)
class Member:
    key: str
    address: str


# The one delivery there is: a signed member table in instance metadata. The older names are
# accepted in stack files and mean the same (the image always requires a valid signature).
DELIVERY = "signed"
DELIVERY_ALIASES = {
    "baked": "overlay.delivery 'baked' now means 'signed': the member table is no longer in the image; it "
             "reaches each node in instance metadata, signed with the fleet's KMS key (set delivery: signed)",
    "metadata": "overlay.delivery 'metadata' now means 'signed': the member table in instance metadata is signed "
                "with the fleet's KMS key and verified before the light client starts (set delivery: signed)",
}


@dataclass(frozen=True)
class OverlayPlan:
    port: int
    protocol: str
    topology: str
    delivery: str
    interface: str
    setup_port: int
    execution_rpc: str | None
    genesis: str
    members: tuple[Member, ...]
    peers: dict[str, tuple[str, ...]]  # node key -> peer node keys
    stack: str = ""
    project: str = ""  # the GCP project every member runs in (the node checks it; hosts cannot change it)
    requested_delivery: str = DELIVERY  # as the stack file spells it

    @property
    def delivery_notice(self) -> str | None:
        """A one-line notice when the stack file uses an older name of the delivery."""
        return DELIVERY_ALIASES.get(self.requested_delivery)

    @cached_property
    def _addresses(self) -> dict[str, str]:
        return {m.key: m.address for m in self.members}

    def address_of(self, key: str) -> str:
        return self._addresses[key]

    def peer_endpoints(self, key: str) -> list[str]:
        return [f"{self.address_of(p)}:{self.port}" for p in self.peers[key]]

    def first_boot_peers(self, key: str) -> list[str]:
        """Peers on the genesis node's founding boot (none) and everyone's first boot otherwise."""
        return [] if key == self.genesis else self.peer_endpoints(key)


def peer_keys(topology: str, keys: list[str], genesis: str, explicit: dict[str, list[str]]) -> dict[str, tuple[str, ...]]:
    """Each member's peers for a topology (keys in member order)."""
    if topology == "mesh":
        return {k: tuple(x for x in keys if x != k) for k in keys}
    if topology == "ring":
        if len(keys) == 1:
            return {keys[0]: ()}
        out = {}
        for i, k in enumerate(keys):
            ring = [keys[i - 1], keys[(i + 1) % len(keys)]]
            out[k] = tuple(dict.fromkeys(x for x in ring if x != k))
        return out
    if topology == "star":
        # spokes reach the hub; the hub (genesis) reaches every spoke after the founding boot
        return {k: (tuple(x for x in keys if x != k) if k == genesis else (genesis,)) for k in keys}
    if topology == "explicit":
        return {k: tuple(explicit.get(k, ())) for k in keys}
    raise ValueError(f"unknown topology {topology!r}")


def overlay_members(config: StackConfig, identities: list[NodeIdentity]) -> list[NodeIdentity]:
    return [n for n in identities if n.kind == "overlay"]


def plan_overlay(config: StackConfig, identities: list[NodeIdentity]) -> OverlayPlan | None:
    members = overlay_members(config, identities)
    if not members:
        return None
    overlay: OverlayConfig = config.fleet.overlay or OverlayConfig()
    keys = [m.key for m in members]
    genesis = overlay.genesis or keys[0]
    return OverlayPlan(
        port=overlay.port,
        protocol=overlay.protocol,
        topology=overlay.topology,
        delivery=DELIVERY,
        interface=overlay.interface,
        setup_port=overlay.setup_port,
        execution_rpc=overlay.execution_rpc,
        genesis=genesis,
        members=tuple(Member(m.key, m.address) for m in members),
        peers=peer_keys(overlay.topology, keys, genesis, overlay.peers),
        stack=config.stack,
        project=config.gcp.project,
        requested_delivery=overlay.delivery,
    )


def inbound(plan: OverlayPlan) -> dict[str, tuple[str, ...]]:
    """Who dials whom: each member's peers connect to it (the light client dials exactly its
    configured peers and accepts every incoming connection), so a member must accept the overlay
    port from every member that lists it. Keys in member order."""
    sources: dict[str, list[str]] = {m.key: [] for m in plan.members}
    for m in plan.members:
        for p in plan.peers[m.key]:
            if m.key not in sources[p]:
                sources[p].append(m.key)
    order = {m.key: i for i, m in enumerate(plan.members)}
    return {k: tuple(sorted(v, key=order.__getitem__)) for k, v in sources.items()}


def reachable_from_genesis(plan: OverlayPlan) -> set[str]:
    """Members that can reach the genesis node through peer links (joins flow toward peers)."""
    reverse: dict[str, set[str]] = {m.key: set() for m in plan.members}
    for key, peers in plan.peers.items():
        for p in peers:
            reverse[p].add(key)
    seen = {plan.genesis}
    frontier = [plan.genesis]
    while frontier:
        current = frontier.pop()
        for k in reverse[current]:
            if k not in seen:
                seen.add(k)
                frontier.append(k)
    return seen
