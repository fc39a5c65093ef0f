"""APIs enabled per project; never disabled on destroy (other things may depend on them)."""

from __future__ import annotations

import pulumi
import pulumi_gcp as gcp

from components.adopt import options


class ProjectServices(pulumi.ComponentResource):
    def __init__(self, services: dict[str, tuple[str, ...]], opts: pulumi.ResourceOptions | None = None):
        super().__init__("dstack-fleet:bootstrap:ProjectServices", "services", {}, opts)
        self.enabled: dict[tuple[str, str], gcp.projects.Service] = {}
        for project, names in services.items():
            for service in names:
                name = f"{project}-{service.split('.')[0]}"
                self.enabled[(project, service)] = gcp.projects.Service(
                    name, project=project, service=service, disable_on_destroy=False,
                    disable_dependent_services=False, opts=options(name, parent=self))
        self.register_outputs({})
