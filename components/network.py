"""The stack's VPC: subnets, Cloud Router + NAT per region, and the declared firewall rules."""

from __future__ import annotations

import pulumi
import pulumi_gcp as gcp

from fleet.nodes.network import NetworkSpec, describe_subnets


class Network(pulumi.ComponentResource):
    network: gcp.compute.Network
    subnets: dict[str, gcp.compute.Subnetwork]
    nats: dict[str, gcp.compute.RouterNat]  # per region: what nodes without an external address reach out through

    def __init__(self, name: str, spec: NetworkSpec, project: str, opts: pulumi.ResourceOptions | None = None):
        super().__init__("dstack-fleet:network:Network", name, {}, opts)
        child = pulumi.ResourceOptions(parent=self)

        self.network = gcp.compute.Network(
            "vpc",
            name=spec.name,
            project=project,
            description=spec.description,
            auto_create_subnetworks=False,
            routing_mode="REGIONAL",
            delete_default_routes_on_create=False,
            opts=child,
        )
        self.subnets = {}
        self.nats = {}
        for subnet in spec.subnets:
            self.subnets[subnet.region] = gcp.compute.Subnetwork(
                subnet.key,
                name=subnet.name,
                project=project,
                region=subnet.region,
                network=self.network.id,
                ip_cidr_range=subnet.cidr,
                private_ip_google_access=True,
                opts=child,
            )
            router = gcp.compute.Router(
                f"router-{subnet.region}",
                name=subnet.router_name,
                project=project,
                region=subnet.region,
                network=self.network.id,
                opts=child,
            )
            self.nats[subnet.region] = gcp.compute.RouterNat(
                f"nat-{subnet.region}",
                name=subnet.nat_name,
                project=project,
                region=subnet.region,
                router=router.name,
                nat_ip_allocate_option="AUTO_ONLY",
                source_subnetwork_ip_ranges_to_nat="LIST_OF_SUBNETWORKS",
                subnetworks=[
                    {
                        "name": self.subnets[subnet.region].id,
                        "source_ip_ranges_to_nats": ["ALL_IP_RANGES"],
                    }
                ],
                log_config=(
                    {"enable": True, "filter": "ERRORS_ONLY" if spec.nat_logging == "errors" else "ALL"}
                    if spec.nat_logging != "off"
                    else {"enable": False, "filter": "ALL"}
                ),
                opts=child,
            )

        for rule in spec.rules:
            match: dict[str, object] = {"protocol": rule.protocol}
            if rule.ports:
                match["ports"] = [str(p) for p in rule.ports]
            gcp.compute.Firewall(
                rule.key,
                name=rule.name,
                project=project,
                network=self.network.id,
                description=rule.description,
                direction=rule.direction,
                priority=rule.priority,
                allows=[match] if rule.action == "allow" else None,
                denies=[match] if rule.action == "deny" else None,
                target_tags=list(rule.target_tags) or None,
                source_tags=list(rule.source_tags) or None,
                source_ranges=list(rule.source_ranges) or None,
                log_config={"metadata": "EXCLUDE_ALL_METADATA"} if rule.log else None,
                opts=child,
            )

        ordered = [self.subnets[s.region] for s in spec.subnets]
        self.summary = pulumi.Output.all(
            pulumi.Output.all(*[s.self_link for s in ordered]),
            pulumi.Output.all(*[s.gateway_address for s in ordered]),
        ).apply(lambda values: describe_subnets(spec, list(values[0]), list(values[1])))
        self.register_outputs({"network": self.network.self_link, "subnets": self.summary})
