"""Configuration checks that span several keys. Each problem names the key to change and how."""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit

from fleet.config.problems import Problem
from fleet.config.schema import OverlayConfig, StackConfig
from fleet.gcp import tdx
from fleet.gcp.naming import Namer
from fleet.nodes.identity import group_block, node_identities, ordinals, usable_range, zone_names
from fleet.nodes.membertable import MAX_VALUE_BYTES, worst_case_bytes
from fleet.nodes.specs import GUEST_AGENT_PORT  # what verifies a dstack node reaches it through IAP only
from fleet.nodes.topology import Member, OverlayPlan, peer_keys, plan_overlay, reachable_from_genesis

# The light client's own listening ports (tplus-examples @3eb04cad light_client.rs: POST /setup on
# 40080, helios.rs: the API on 3032): the overlay port must differ, and no public rule may open them.
SETUP_PORT = 40080
API_PORT = 3032
_KEY_LIKE = re.compile(r"^[A-Za-z0-9_-]{16,}$")

NS = "dstack-fleet:"


def check_all(config: "StackConfig") -> list[Problem]:
    problems: list[Problem] = []
    for check in (_role, _network, _node_groups, _address_blocks, _images, _overlay):
        problems.extend(check(config))
    if not problems:  # the table's size needs every address, so only a config that is otherwise sound
        problems += _table_size(config)
    return problems


def _p(config: "StackConfig", path: str, message: str) -> Problem:
    return Problem(config.source, NS + path, message)


def _role(config: "StackConfig") -> list[Problem]:
    fleet = config.fleet
    out = []
    if fleet.role == "env":
        if fleet.tier is None:
            out.append(_p(config, "tier", "is required for env stacks; set dev, staging or prod"))
        if fleet.network is None:
            out.append(_p(config, "network", "is required for env stacks; declare at least network.subnets"))
    else:
        if fleet.tier is not None:
            out.append(_p(config, "tier", f"only env stacks have a tier (this stack's role is {fleet.role!r})"))
        if fleet.nodes:
            out.append(_p(config, "nodes", f"only env stacks declare nodes (this stack's role is {fleet.role!r})"))
    images_only = ("build_for", "build_host")
    if fleet.role == "images":
        if fleet.network is None:
            out.append(_p(config, "network", "is required for the images stack: its build hosts run in it; declare "
                          "network.subnets"))
        if fleet.build_host is None:
            out.append(_p(config, "buildHost", "is required for the images stack: at least bootImage, the build "
                          "hosts' boot image pinned by self link"))
    else:
        for key in images_only:
            if key in fleet.model_fields_set:
                out.append(_p(config, _camel(key), f"only the images stack sets this (this stack's role is "
                              f"{fleet.role!r})"))
    bootstrap_only = ("environments", "images_project", "github", "registry")
    if fleet.role == "bootstrap":
        for key, hint in (("environments", "map each env stack to its project"),
                          ("images_project", "the project of the images stack"),
                          ("github", "the repository CI runs from, with its numeric ids")):
            if not getattr(fleet, key):
                out.append(_p(config, _camel(key), f"is required for the bootstrap stack: {hint}"))
        if fleet.bootstrap is not None:
            out.append(_p(config, "bootstrap", "is for env and images stacks; the bootstrap stack is itself"))
    else:
        for key in bootstrap_only:
            if key in fleet.model_fields_set:
                out.append(_p(config, _camel(key), f"only the bootstrap stack sets this (this stack's role is "
                              f"{fleet.role!r})"))
        if fleet.bootstrap is None:
            out.append(_p(config, "bootstrap", "is required: the bootstrap project whose registry, buckets and "
                          "keys this stack uses, e.g. {project: acme-tee-ops}"))
    return out


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def _network(config: "StackConfig") -> list[Problem]:
    network = config.fleet.network
    if network is None:
        return []
    out = []
    needed = config.regions() if config.fleet.role != "bootstrap" else []
    for region in needed:
        if region not in network.subnets:
            out.append(
                _p(
                    config,
                    f"network.subnets.{region}",
                    f"is missing: region {region!r} is used (by gcp:region or a node zone); "
                    "give it a private CIDR such as 10.10.0.0/20",
                )
            )
    blocks = sorted((ipaddress.IPv4Network(c), r) for r, c in network.subnets.items())
    for i, (net_a, region_a) in enumerate(blocks):
        for net_b, region_b in blocks[i + 1 :]:
            if net_a.overlaps(net_b):
                out.append(
                    _p(
                        config,
                        f"network.subnets.{region_b}",
                        f"{net_b} overlaps {net_a} of region {region_a!r}; subnets of one VPC must not overlap",
                    )
                )
    seen: set[tuple[int, str]] = set()
    groups = {g.name for g in config.fleet.nodes}
    for i, rule in enumerate(network.public_ingress):
        for j, name in enumerate(rule.groups):
            if name not in groups:
                out.append(_p(config, f"network.publicIngress[{i}].groups[{j}]",
                              f"no node group is named {name!r}; declared groups: {', '.join(sorted(groups)) or '(none)'}"))
        if (rule.port, rule.protocol) in seen:
            out.append(_p(config, f"network.publicIngress[{i}]", f"{rule.protocol}/{rule.port} is listed twice"))
        seen.add((rule.port, rule.protocol))
    dstack_groups = {g.name for g in config.fleet.nodes if g.kind == "dstack"}
    for i, rule in enumerate(network.public_ingress):
        opened = sorted(dstack_groups & set(rule.groups))
        if rule.port == GUEST_AGENT_PORT and rule.protocol == "tcp" and opened:
            out.append(_p(config, f"network.publicIngress[{i}].port", f"{rule.port} is the dstack guest agent's API "
                          f"(reached through IAP only) on dstack groups {', '.join(opened)}; remove the rule"))
    return out


def _node_groups(config: "StackConfig") -> list[Problem]:
    out = []
    seen: dict[str, int] = {}
    for i, group in enumerate(config.fleet.nodes):
        at = f"nodes[{i}]"
        if group.name in seen:
            out.append(
                _p(config, f"{at}.name", f"group {group.name!r} is already declared at nodes[{seen[group.name]}]; "
                   "group names must be unique")
            )
        seen.setdefault(group.name, i)
        names = zone_names(group)
        for j, zone in enumerate(names):
            if names.index(zone) != j:
                out.append(_p(config, f"{at}.zones[{j}]", f"{zone!r} is listed twice"))
        regions = {tdx.region_of(z) for z in names}
        if len(regions) > 1:
            out.append(
                _p(config, f"{at}.zones", f"spans regions {', '.join(sorted(regions))}; a group lives in one "
                   "region (declare one group per region)")
            )
        if not any(_first(z) == 0 for z in group.zones):
            out.append(_p(config, f"{at}.zones", "no zone is active for ordinal 0; the first zone needs no firstOrdinal"))
        for r in group.retired:
            if r >= group.count:
                out.append(_p(config, f"{at}.retired", f"ordinal {r} is not below count {group.count}"))
        if len(set(group.retired)) >= group.count:
            out.append(_p(config, f"{at}.retired", "retires every node of the group; remove the group instead"))
        if group.max_unavailable > group.count:
            out.append(
                _p(config, f"{at}.maxUnavailable", f"is {group.max_unavailable}, more than the group's "
                   f"{group.count} nodes")
            )
    return out


def _first(entry) -> int:
    return getattr(entry, "first_ordinal", 0)


def _address_blocks(config: "StackConfig") -> list[Problem]:
    network = config.fleet.network
    if network is None:
        return []
    out = []
    claimed: dict[tuple[str, int], str] = {}
    for i, group in enumerate(config.fleet.nodes):
        names = zone_names(group)
        region = tdx.region_of(names[0])
        cidr = network.subnets.get(region)
        if cidr is None:
            continue  # reported by _network
        at = f"nodes[{i}].addresses"
        first, last = usable_range(cidr)
        subnet = ipaddress.IPv4Network(cidr)
        if group.addresses.pins is not None:
            if len(group.addresses.pins) < group.count:
                out.append(
                    _p(config, f"{at}.pins", f"has {len(group.addresses.pins)} address(es) for {group.count} "
                       "nodes; pin one address per ordinal")
                )
                continue
            first_use: dict[str, int] = {}
            for j, pin in enumerate(group.addresses.pins):
                if ipaddress.IPv4Address(pin) not in subnet:
                    out.append(_p(config, f"{at}.pins[{j}]", f"{pin} is outside {region}'s subnet {cidr}"))
                if first_use.setdefault(pin, j) != j:
                    out.append(_p(config, f"{at}.pins[{j}]", f"{pin} is already pinned at pins[{first_use[pin]}]; "
                                  "each node needs an address of its own"))
        indexes = group_block(group, cidr)
        bad = [x for x in indexes if not first <= x <= last]
        if bad and group.addresses.offset is not None:
            out.append(
                _p(config, f"{at}.offset", f"block {indexes[0]}..{indexes[-1]} does not fit {cidr} (usable "
                   f"indexes {first}..{last}); lower the offset or use a larger subnet")
            )
            continue
        if bad:
            out.append(_p(config, f"{at}.pins", "pins GCP's reserved addresses (the first two and last two of the subnet)"))
            continue
        for x in indexes:
            owner = claimed.get((region, x))
            if owner is not None and owner != group.name:
                out.append(
                    _p(config, at, f"overlaps group {owner!r} at {subnet.network_address + x}; give the groups "
                       "disjoint blocks")
                )
                break
            claimed[(region, x)] = group.name
    return out


# Which image origins each node kind can boot.
_RECIPES_FOR_KIND = {"overlay": "tplus-overlay", "dstack": "dstack-os"}


def _images(config: "StackConfig") -> list[Problem]:
    out = []
    images = config.fleet.images
    if config.fleet.role != "env" and images:
        out.append(_p(config, "images", f"only env stacks declare image versions (this stack's role is "
                      f"{config.fleet.role!r}); the images stack builds what env stacks declare"))
    for i, group in enumerate(config.fleet.nodes):
        refs = [(f"nodes[{i}].image", group.image)] + [
            (f"nodes[{i}].imageOverrides.{n}", key) for n, key in sorted(group.image_overrides.items())]
        for path, key in refs:
            source = images.get(key)
            if source is None:
                out.append(_p(config, path, f"no image {key!r} in dstack-fleet:images; declared: "
                              f"{', '.join(sorted(images)) or '(none)'}"))
                continue
            wanted = _RECIPES_FOR_KIND[group.kind]
            if source.build is not None and source.build.recipe != wanted:
                out.append(_p(config, path, f"image {key!r} is built by recipe {source.build.recipe!r}, but "
                              f"{group.kind} nodes boot {wanted!r} images"))
        for n in group.image_overrides:
            if not 0 <= n < group.count or n in group.retired:
                out.append(_p(config, f"nodes[{i}].imageOverrides.{n}",
                              f"ordinal {n} is not a node of the group (count {group.count})"))
    return out


def _overlay(config: "StackConfig") -> list[Problem]:

    keys = [f"{g.name}-{n}" for g in config.fleet.nodes if g.kind == "overlay" for n in ordinals(g)]
    overlay = config.fleet.overlay
    if not keys:
        if overlay is not None:
            return [_p(config, "overlay", "is set, but no node group has kind overlay")]
        return []
    overlay = overlay or OverlayConfig()
    out = []
    if overlay.interface == "setup" and not overlay.execution_rpc:
        out.append(_p(config, "overlay.executionRpc", "is required by the setup interface (the light client "
                      "asks for it in POST /setup); give the execution RPC URL"))
    if overlay.interface == "setup" and overlay.setup_port == overlay.port:
        out.append(_p(config, "overlay.setupPort", f"equals the overlay port {overlay.port}; choose another port"))
    elif overlay.port in (SETUP_PORT, API_PORT):
        out.append(_p(config, "overlay.port", f"{overlay.port} is one of the light client's own ports ({SETUP_PORT} "
                      f"setup, {API_PORT} API); choose another port"))
    if overlay.execution_rpc:
        problem = rpc_key_problem(overlay.execution_rpc)
        if problem:
            out.append(_p(config, "overlay.executionRpc", f"{problem}: the member table is instance metadata, "
                          "readable by anyone who may view the instances, and the plan shows it; use an endpoint "
                          "that needs no key in its URL (e.g. one that allow-lists the NAT's egress address)"))
    out += _overlay_ports_stay_closed(config, overlay)
    out += _overlay_availability(config, keys)
    known = set(keys)
    if overlay.genesis is not None and overlay.genesis not in known:
        out.append(_p(config, "overlay.genesis", f"{overlay.genesis!r} is not an overlay node; nodes: "
                      f"{', '.join(keys)}"))
    if overlay.topology != "explicit" and overlay.peers:
        out.append(_p(config, "overlay.peers", f"is only used by the explicit topology (topology is "
                      f"{overlay.topology!r})"))
    if overlay.topology == "explicit":
        bad = False
        for key, peers in sorted(overlay.peers.items()):
            if key not in known:
                out.append(_p(config, f"overlay.peers.{key}", f"{key!r} is not an overlay node; nodes: {', '.join(keys)}"))
                bad = True
            for i, peer in enumerate(peers):
                if peer not in known:
                    out.append(_p(config, f"overlay.peers.{key}[{i}]", f"{peer!r} is not an overlay node; nodes: "
                                  f"{', '.join(keys)}"))
                    bad = True
                elif peer == key:
                    out.append(_p(config, f"overlay.peers.{key}[{i}]", "a node cannot peer with itself"))
                    bad = True
        genesis = overlay.genesis or keys[0]
        if not bad and genesis in known:

            plan = OverlayPlan(port=overlay.port, protocol=overlay.protocol, topology="explicit", delivery="",
                               interface="", setup_port=0, execution_rpc=None, genesis=genesis,
                               members=tuple(Member(k, "") for k in keys),
                               peers=peer_keys("explicit", keys, genesis, overlay.peers))
            stranded = [k for k in keys if k not in reachable_from_genesis(plan)]
            if stranded:
                out.append(_p(config, "overlay.peers", f"{', '.join(stranded)} cannot reach the genesis node "
                              f"{genesis!r} through peer links; give them a path to it"))
    return out


def rpc_key_problem(url: str) -> str | None:
    """Why an execution RPC URL looks like it carries a credential (None when it does not)."""
    parts = urlsplit(url)
    if parts.username or parts.password:
        return "carries credentials (user:password@)"
    if parts.query:
        return "carries a query string, where providers put API keys"
    for segment in parts.path.split("/"):
        if _KEY_LIKE.match(segment) and any(c.isdigit() for c in segment):
            return f"has a path segment that looks like an API key ({segment[:4]}…, {len(segment)} characters)"
    return None


def _overlay_ports_stay_closed(config: "StackConfig", overlay: OverlayConfig) -> list[Problem]:
    """The setup port is unauthenticated (first caller wins) and the API port is for what verifies
    nodes, through IAP only: no public rule may open either to an overlay group."""
    network = config.fleet.network
    overlay_groups = {g.name for g in config.fleet.nodes if g.kind == "overlay"}
    out = []
    for i, rule in enumerate(network.public_ingress if network else []):
        if rule.port in (overlay.setup_port, SETUP_PORT, API_PORT) and overlay_groups & set(rule.groups):
            what = "the light client's API (reached through IAP only)" if rule.port == API_PORT else \
                "the light client's unauthenticated setup endpoint (first caller wins)"
            out.append(_p(config, f"network.publicIngress[{i}].port", f"{rule.port} is {what} on overlay groups "
                          f"{', '.join(sorted(overlay_groups & set(rule.groups)))}; remove the rule"))
    return out


def _overlay_availability(config: "StackConfig", keys: list[str]) -> list[Problem]:
    """A group allowed to take every member of the overlay down at once would lose its shared secret."""
    if len(keys) < 2:
        return []
    out = []
    for i, group in enumerate(config.fleet.nodes):
        if group.kind == "overlay" and group.max_unavailable >= len(keys):
            out.append(_p(config, f"nodes[{i}].maxUnavailable", f"{group.max_unavailable} would let a change take "
                          f"every one of the overlay's {len(keys)} members down at once, and the shared secret "
                          f"with them; set at most {len(keys) - 1}"))
    return out


def _table_size(config: "StackConfig") -> list[Problem]:
    if config.fleet.network is None:
        return []
    plan = plan_overlay(config, node_identities(config, Namer(config.fleet.name_prefix, config.stack,
                                                                config.gcp.project)))
    size = worst_case_bytes(plan) if plan else 0
    if size > MAX_VALUE_BYTES:
        return [_p(config, "overlay", f"the signed member table would be {size} bytes; one instance metadata value "
                   f"holds at most {MAX_VALUE_BYTES} (GCE): fewer members, or a topology with fewer explicit peers")]
    return []
