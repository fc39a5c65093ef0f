"""Where `make rollout` reads each node: its health and attestation URLs, from the stack's
``dstack-fleet:rollout`` templates filled with the node's values from the plan's ``nodes`` output.

Defaults, per node kind:

* overlay: ``GET http://{address}:3032/attest``. The tplus light client serves its API on port 3032
  only once it holds the overlay's shared secret (tpluslabs/tplus-examples
  3eb04cad11664a381227d77a469e68bca7e94c30, ``dstack-helios-tdx/light-client/src/helios.rs``: ``run``
  awaits the secret before ``run_server``); ``/attest`` answers a JSON string holding
  ``{"quote": hex, "pubkey": hex}``, the compressed public key of that secret and a quote over it.
* dstack: ``http://{address}:8090/prpc/Info?json``, the guest agent's public ``Info`` (its ``Worker``
  service on port 8090, Dstack-TEE/dstack 312dc605ebaaf93372534ffb135ea011533d28e9
  ``docs/security/cvm-boundaries.md``; method names are bare because ``guest-agent/rpc/build.rs``
  disables service-name emission). The guest agent serves no quote there, so a dstack group's
  ``quoteUrl`` (the node's app) has no default and a rollout of the group needs it.

``dstack-fleet:rollout.reach`` says how those URLs are reached: ``direct`` (the default, as written,
from where the rollout runs) or ``iap`` (``fleet.cli.tunnel``: through IAP TCP forwarding to the
port the URL names on the node's instance, which is why every template must then read the node
itself over plain http).
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Any

from fleet.config.problems import Problem
from fleet.config.schema import NAMESPACE, ROLLOUT_URL_FIELDS, RolloutEndpoints, StackConfig, rollout_node_port
from fleet.nodes.specs import GUEST_AGENT_PORT, LIGHT_CLIENT_API_PORT

DEFAULT_ATTEST_URL = f"http://{{address}}:{LIGHT_CLIENT_API_PORT}/attest"
DEFAULT_INFO_URL = f"http://{{address}}:{GUEST_AGENT_PORT}/prpc/Info?json"
FIELDS_BY_KIND = {"overlay": ("attest_url",), "dstack": ("info_url", "quote_url")}
KEYS = {"attest_url": "attestUrl", "info_url": "infoUrl", "quote_url": "quoteUrl"}


@dataclass(frozen=True)
class NodeEndpoints:
    key: str
    kind: str
    attest_url: str | None = None
    info_url: str | None = None
    quote_url: str | None = None


def _placeholders(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]


def rollout_problems(config: StackConfig) -> list[Problem]:
    """Templates name only known placeholders, and only groups of the stack with their kind's URLs."""
    problems = []
    kinds = {g.name: g.kind for g in config.fleet.nodes}
    for group, endpoints in sorted(config.fleet.rollout.groups.items()):
        where = f"{NAMESPACE}:rollout.groups.{group}"
        if group not in kinds:
            known = ", ".join(sorted(kinds)) or "none"
            problems.append(Problem(config.source, where, f"no node group is named {group!r} (groups: {known})"))
            continue
        for field in ("attest_url", "info_url", "quote_url"):
            template = getattr(endpoints, field)
            if template is None:
                continue
            if field not in FIELDS_BY_KIND[kinds[group]]:
                wanted = " and ".join(KEYS[f] for f in FIELDS_BY_KIND[kinds[group]])
                problems.append(Problem(config.source, f"{where}.{KEYS[field]}",
                                        f"group {group} is kind {kinds[group]}: it takes {wanted}"))
                continue
            try:
                names = _placeholders(template)
            except ValueError as exc:
                problems.append(Problem(config.source, f"{where}.{KEYS[field]}", f"not a template ({exc})"))
                continue
            unknown = [n for n in names if n not in ROLLOUT_URL_FIELDS]
            if unknown:
                problems.append(Problem(config.source, f"{where}.{KEYS[field]}",
                                        f"unknown placeholder {{{unknown[0]}}}; use "
                                        + ", ".join(f"{{{n}}}" for n in ROLLOUT_URL_FIELDS)))
    return problems + template_problems(config, config.fleet.rollout.reach)


def template_problems(config: StackConfig, reach: str) -> list[Problem]:
    """Under ``iap`` every template a group uses must read the node itself over plain http: a tunnel
    reaches a port of the node's instance, not another host, and carries no TLS name to check."""
    if reach != "iap":
        return []
    kinds = {g.name: g.kind for g in config.fleet.nodes}
    problems = []
    for group, endpoints in sorted(config.fleet.rollout.groups.items()):
        for field in FIELDS_BY_KIND.get(kinds.get(group, ""), ()):
            template = getattr(endpoints, field)
            if template is not None and rollout_node_port(template) is None:
                problems.append(Problem(
                    config.source, f"{NAMESPACE}:rollout.groups.{group}.{KEYS[field]}",
                    f"{template!r} cannot be read through IAP (rollout.reach iap): a tunnel reaches a port of the node "
                    "itself over plain http, so write http://{address}:PORT/... (or {name} as the host)"))
    return problems


def node_endpoints(config: StackConfig, key: str, node: dict[str, Any]) -> NodeEndpoints:
    """The URLs of one node; ``node`` is its entry in the plan's ``nodes`` output."""
    endpoints = config.fleet.rollout.groups.get(node["group"]) or RolloutEndpoints()
    values = {"address": node.get("address", ""), "name": node.get("name", ""), "zone": node.get("zone", ""),
              "group": node["group"], "ordinal": node.get("ordinal", ""), "key": key}

    def fill(template: str | None) -> str | None:
        return template.format(**values) if template else None

    if node.get("kind") == "overlay":
        return NodeEndpoints(key, "overlay", attest_url=fill(endpoints.attest_url or DEFAULT_ATTEST_URL))
    return NodeEndpoints(key, "dstack", info_url=fill(endpoints.info_url or DEFAULT_INFO_URL),
                         quote_url=fill(endpoints.quote_url))


def quote_url_key(group: str) -> str:
    return f"{NAMESPACE}:rollout.groups.{group}.quoteUrl"
