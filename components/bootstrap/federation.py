"""Workload Identity Federation for GitHub Actions: CI authenticates without long-lived keys."""

from __future__ import annotations

import pulumi
import pulumi_gcp as gcp

from components.adopt import options
from fleet.project.bootstrap import GITHUB_ISSUER, principal_set


class GithubFederation(pulumi.ComponentResource):
    pool: gcp.iam.WorkloadIdentityPool
    provider: gcp.iam.WorkloadIdentityPoolProvider

    def __init__(self, *, project: str, pool_id: str, provider_id: str, attribute_mapping: dict[str, str],
                 attribute_condition: str, impersonation: list[tuple[gcp.serviceaccount.Account, str, str]],
                 opts: pulumi.ResourceOptions | None = None):
        super().__init__("dstack-fleet:bootstrap:GithubFederation", "github-federation", {}, opts)
        self.pool = gcp.iam.WorkloadIdentityPool(
            "pool", project=project, workload_identity_pool_id=pool_id, display_name="GitHub Actions",
            description="CI of the pinned repository", opts=options("pool", parent=self))
        self.provider = gcp.iam.WorkloadIdentityPoolProvider(
            "provider", project=project, workload_identity_pool_id=self.pool.workload_identity_pool_id,
            workload_identity_pool_provider_id=provider_id, display_name="GitHub OIDC",
            attribute_mapping=attribute_mapping, attribute_condition=attribute_condition,
            oidc={"issuer_uri": GITHUB_ISSUER}, opts=options("provider", parent=self))
        for account, attribute, value in impersonation:
            gcp.serviceaccount.IAMMember(
                f"wif-{attribute}-{value.replace('/', '-')}", service_account_id=account.name,
                role="roles/iam.workloadIdentityUser",
                member=self.pool.name.apply(lambda pool, a=attribute, v=value: principal_set(pool, a, v)),
                opts=pulumi.ResourceOptions(parent=self))
        self.register_outputs({"provider": self.provider.name})
