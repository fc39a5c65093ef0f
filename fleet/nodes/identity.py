"""Stable node identity: a node is (group, ordinal).

Its name, zone and address derive from the ordinal and its own group's settings only, so growing
another group, retiring a node or appending a zone (with ``firstOrdinal``) never moves any other
node. Moving a node would replace its instance and, for a zone move, its zonal data disk.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from fleet.config.schema import NodeGroup, StackConfig, ZoneEntry
from fleet.gcp.naming import Namer
from fleet.gcp.tdx import region_of


@dataclass(frozen=True)
class NodeIdentity:
    group: str
    ordinal: int
    kind: str
    key: str  # "<group>-<ordinal>": the Pulumi logical name and the node's name in every output
    name: str  # the GCP instance name
    zone: str
    region: str
    address: str


def zone_names(group: NodeGroup) -> list[str]:
    return [z.zone if isinstance(z, ZoneEntry) else z for z in group.zones]


def _first_ordinal(entry: str | ZoneEntry) -> int:
    return entry.first_ordinal if isinstance(entry, ZoneEntry) else 0


def zone_for(group: NodeGroup, ordinal: int) -> str:
    """Round-robin over the zones active at ``ordinal`` (in list order).

    A zone with ``firstOrdinal: k`` is invisible to ordinals below k, so appending it leaves every
    existing node where it is; ordinals from k on cycle over all zones active for them.
    """
    active = [z for z in group.zones if _first_ordinal(z) <= ordinal]
    if not active:
        raise ValueError(f"group {group.name!r}: no zone is active for ordinal {ordinal}")
    entry = active[ordinal % len(active)]
    return entry.zone if isinstance(entry, ZoneEntry) else entry


def group_region(group: NodeGroup) -> str:
    return region_of(zone_names(group)[0])


def ordinals(group: NodeGroup) -> list[int]:
    retired = set(group.retired)
    return [n for n in range(group.count) if n not in retired]


def usable_range(cidr: str) -> tuple[int, int]:
    """First and last usable host index of a GCP subnet (GCP reserves 0, 1 and the last two)."""
    size = ipaddress.IPv4Network(cidr).num_addresses
    return 2, size - 3


def address_for(group: NodeGroup, ordinal: int, cidr: str) -> str:
    block = group.addresses
    if block.pins is not None:
        return block.pins[ordinal]
    assert block.offset is not None
    network = ipaddress.IPv4Network(cidr)
    return str(network.network_address + block.offset + ordinal)


def group_block(group: NodeGroup, cidr: str) -> list[int]:
    """Host indexes this group's block claims in the subnet (every ordinal up to count,
    retired ones included, so a retired ordinal's address is never reused by someone else)."""
    network = ipaddress.IPv4Network(cidr)
    if group.addresses.pins is not None:
        return [int(ipaddress.IPv4Address(p)) - int(network.network_address) for p in group.addresses.pins]
    assert group.addresses.offset is not None
    return list(range(group.addresses.offset, group.addresses.offset + group.count))


def node_identities(config: StackConfig, namer: Namer) -> list[NodeIdentity]:
    out = []
    subnets = config.fleet.network.subnets if config.fleet.network else {}
    for group in config.fleet.nodes:
        region = group_region(group)
        cidr = subnets[region]
        for n in ordinals(group):
            out.append(
                NodeIdentity(
                    group=group.name,
                    ordinal=n,
                    kind=group.kind,
                    key=f"{group.name}-{n}",
                    name=namer.name(group.name, str(n)),
                    zone=zone_for(group, n),
                    region=region,
                    address=address_for(group, n, cidr),
                )
            )
    return out
