"""Service accounts (CI per purpose, nodes per environment and kind, the build host) and the exact
set of IAM grants declared in ``fleet.bootstrap``."""

from __future__ import annotations

import pulumi
import pulumi_gcp as gcp

from components.adopt import options
from fleet.project.bootstrap import COMPUTE_AGENT, Account, Binding


class Identities(pulumi.ComponentResource):
    accounts: dict[str, gcp.serviceaccount.Account]

    def __init__(self, *, accounts: list[Account], bindings: list[Binding], buckets: dict[str, pulumi.Resource],
                 keys: dict[str, gcp.kms.CryptoKey], key_names: dict[str, str],
                 repositories: dict[str, gcp.artifactregistry.Repository], location: str, project: str,
                 opts: pulumi.ResourceOptions | None = None):
        super().__init__("dstack-fleet:bootstrap:Identities", "identities", {}, opts)
        self.accounts = {}
        for account in accounts:
            self.accounts[account.key] = gcp.serviceaccount.Account(
                f"sa-{account.key}", account_id=account.account_id, project=account.project,
                display_name=account.display_name, description=account.description,
                opts=options(f"sa-{account.key}", parent=self))
        by_email = {a.email: self.accounts[a.key] for a in accounts}
        key_by_name = {key_names[stack]: key for stack, key in keys.items()}
        child = pulumi.ResourceOptions(parent=self, depends_on=list(self.accounts.values()))

        for b in bindings:
            member = b.member
            if member.startswith(COMPUTE_AGENT):
                number = gcp.organizations.get_project_output(project_id=member[len(COMPUTE_AGENT):]).number
                member = number.apply(lambda n: f"serviceAccount:service-{n}@compute-system.iam.gserviceaccount.com")
            condition = None
            if b.condition is not None:
                title, expression = b.condition
                condition = {"title": title, "expression": buckets[b.target].name.apply(
                    lambda name, e=expression: e.replace("{bucket}", name))}
            if b.scope == "project":
                gcp.projects.IAMMember(b.key, project=b.target, role=b.role, member=member, condition=condition,
                                       opts=child)
            elif b.scope == "bucket":
                gcp.storage.BucketIAMMember(b.key, bucket=buckets[b.target].name, role=b.role, member=member,
                                            condition=condition, opts=child)
            elif b.scope == "crypto_key":
                gcp.kms.CryptoKeyIAMMember(b.key, crypto_key_id=key_by_name[b.target].id, role=b.role,
                                           member=member, opts=child)
            elif b.scope == "repository":
                gcp.artifactregistry.RepositoryIamMember(b.key, project=project, location=location,
                                                         repository=repositories[b.target].repository_id,
                                                         role=b.role, member=member, opts=child)
            elif b.scope == "service_account":
                gcp.serviceaccount.IAMMember(b.key, service_account_id=by_email[b.target].name, role=b.role,
                                             member=member, opts=child)
            else:  # pragma: no cover - the core only declares the scopes above
                raise ValueError(f"unknown binding scope {b.scope!r}")
        self.register_outputs({})
