"""What a stack's network consists of: a custom-mode VPC, one subnet per region, Cloud NAT for
egress and ingress firewall rules that exist only because some component declared them.

Nodes and build hosts have no external address, yet they must reach RPC endpoints, registries and
Intel's collateral service: Cloud NAT gives them egress without any inbound path. Private Google
Access lets them reach Google APIs (Artifact Registry, Cloud Storage, Logging) without NAT.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fleet.config.schema import StackConfig
from fleet.gcp.naming import Namer

DENY_ALL_PRIORITY = 65534  # just above GCP's implied deny (65535), so denials are logged


@dataclass(frozen=True)
class Ingress:
    """An ingress rule some component needs. Sources are network tags or CIDRs, never empty."""

    key: str  # logical name, unique in the stack
    description: str
    protocol: str
    ports: tuple[int, ...]
    target_tags: tuple[str, ...]
    source_tags: tuple[str, ...] = ()
    source_ranges: tuple[str, ...] = ()
    public: bool = False  # declared in dstack-fleet:network.publicIngress

    def __post_init__(self) -> None:
        if not self.source_tags and not self.source_ranges:
            raise ValueError(f"ingress {self.key!r} has no source; GCP would read that as 'everyone'")
        if not self.target_tags:
            raise ValueError(f"ingress {self.key!r} has no target tags; it would apply to every instance")


@dataclass(frozen=True)
class Subnet:
    key: str
    name: str
    region: str
    cidr: str
    router_name: str
    nat_name: str


@dataclass(frozen=True)
class FirewallRule:
    key: str
    name: str
    description: str
    direction: str
    priority: int
    action: str  # allow | deny
    protocol: str
    ports: tuple[int, ...]
    target_tags: tuple[str, ...]
    source_tags: tuple[str, ...]
    source_ranges: tuple[str, ...]
    log: bool


@dataclass(frozen=True)
class NetworkSpec:
    name: str
    description: str
    subnets: tuple[Subnet, ...]
    nat_logging: str
    rules: tuple[FirewallRule, ...] = field(default_factory=tuple)


def network_spec(config: StackConfig, namer: Namer, ingress: list[Ingress]) -> NetworkSpec:
    network = config.fleet.network
    assert network is not None, "network_spec needs dstack-fleet:network"
    regions = [r for r in sorted(network.subnets) if r in config.regions()]
    subnets = tuple(
        Subnet(
            key=f"subnet-{region}",
            name=namer.name(region),
            region=region,
            cidr=network.subnets[region],
            router_name=namer.name(region, "router"),
            nat_name=namer.name(region, "nat"),
        )
        for region in regions
    )
    rules = [
        FirewallRule(
            key="fw-deny-all-ingress",
            name=namer.name("deny-all-ingress"),
            description="Deny every inbound connection not allowed by a higher-priority rule (logged).",
            direction="INGRESS",
            priority=DENY_ALL_PRIORITY,
            action="deny",
            protocol="all",
            ports=(),
            target_tags=(),
            source_tags=(),
            source_ranges=("0.0.0.0/0",),
            log=True,
        )
    ]
    keys = {r.key for r in rules}
    for item in sorted(ingress, key=lambda i: i.key):
        key = f"fw-{item.key}"
        if key in keys:
            raise ValueError(f"two ingress rules are named {item.key!r}")
        keys.add(key)
        rules.append(
            FirewallRule(
                key=key,
                name=namer.name(item.key),
                description=item.description,
                direction="INGRESS",
                priority=1000,
                action="allow",
                protocol=item.protocol,
                ports=tuple(sorted(item.ports)),
                target_tags=tuple(sorted(item.target_tags)),
                source_tags=tuple(sorted(item.source_tags)),
                source_ranges=tuple(sorted(item.source_ranges)),
                log=item.public,
            )
        )
    return NetworkSpec(
        name=namer.name("vpc"),
        description=f"dstack-fleet network of stack {config.stack}",
        subnets=subnets,
        nat_logging=network.nat_logging,
        rules=tuple(rules),
    )


def public_ingress(config: StackConfig, namer: Namer) -> list[Ingress]:
    """Ingress for ports the stack declares public, to the node groups it names."""
    network = config.fleet.network
    if network is None:
        return []
    out = []
    for rule in network.public_ingress:
        out.append(
            Ingress(
                key=f"public-{rule.protocol}-{rule.port}",
                description=f"Public {rule.protocol}/{rule.port}: {rule.reason}",
                protocol=rule.protocol,
                ports=(rule.port,),
                target_tags=tuple(group_tag(namer, g) for g in rule.groups),
                source_ranges=("0.0.0.0/0",),
                public=True,
            )
        )
    return out


def group_tag(namer: Namer, group: str) -> str:
    """The network tag every instance of a node group carries (firewall targets and sources)."""
    return namer.name("grp", group)


def describe_subnets(spec: NetworkSpec, self_links: list[str], gateways: list[str]) -> dict[str, dict[str, str]]:
    """The stack output for the subnets: one entry per region, checked against the spec."""
    if len(self_links) != len(spec.subnets) or len(gateways) != len(spec.subnets):
        raise ValueError("subnet outputs do not match the network spec")
    out = {}
    for subnet, link, gateway in zip(spec.subnets, self_links, gateways):
        out[subnet.region] = {"name": subnet.name, "cidr": subnet.cidr, "selfLink": link, "gateway": gateway}
    return out
