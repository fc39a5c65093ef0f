"""The bootstrap stack: APIs, buckets, KMS keys, identities and grants, registry, CI federation."""

from __future__ import annotations

from pathlib import Path

import pulumi

from components.bootstrap.buckets import Buckets
from components.bootstrap.federation import GithubFederation
from components.bootstrap.identities import Identities
from components.bootstrap.kms import SecretsKeys
from components.bootstrap.registry import Registry
from components.bootstrap.services import ProjectServices
from components.stackconfig import load_lock
from fleet.project import bootstrap as fleet_bootstrap
from fleet.config.schema import StackConfig
from fleet.gcp.naming import Namer


def build(config: StackConfig, namer: Namer, root: Path) -> None:
    plan = fleet_bootstrap.plan_bootstrap(config, fleet_bootstrap.env_tiers(root, config))
    names = plan.names
    labels = namer.labels()
    project, region = config.gcp.project, config.gcp.region
    services = ProjectServices(plan.services)
    after_services = pulumi.ResourceOptions(depends_on=[services])
    buckets = Buckets(state_name=names.state_bucket, images_name=names.image_bucket, project=project,
                      location=region, labels=labels, opts=after_services)
    keys = SecretsKeys(ring_name=names.key_ring, keys=plan.keys, project=project, location=region, labels=labels,
                       table_key=plan.table_key, opts=after_services)
    registry = Registry(repository_id=names.registry_id, mirror_id=names.mirror_id, project=project, location=region,
                        keep_digests=[c.digest for c in load_lock(root).containers.values()],
                        keep_recent=config.fleet.registry.keep_recent,
                        untagged_days=config.fleet.registry.cleanup_untagged_after_days, labels=labels,
                        public_id=plan.public_repository, opts=after_services)
    identities = Identities(
        accounts=plan.accounts, bindings=plan.bindings,
        buckets={names.state_bucket: buckets.state, names.image_bucket: buckets.images},
        keys={**keys.keys, "overlay-tables": keys.table_key},
        key_names={**plan.keys, "overlay-tables": plan.table_key},
        repositories={names.registry_id: registry.repository, names.mirror_id: registry.mirror,
                      **({names.public_registry_id: registry.public} if registry.public is not None else {})},
        location=region, project=project, opts=after_services)
    federation = GithubFederation(
        project=project, pool_id=names.pool_id, provider_id=names.provider_id,
        attribute_mapping=plan.attribute_mapping, attribute_condition=plan.attribute_condition,
        impersonation=[(identities.accounts[key], attribute, value)
                       for key, attribute, value in fleet_bootstrap.impersonation(plan, config.fleet.github)],
        opts=after_services)

    pulumi.export("backendUrl", names.backend_url)
    pulumi.export("secretsProviders", {stack: names.secrets_provider(stack) for stack in plan.keys})
    pulumi.export("workloadIdentityProvider", federation.provider.name)
    pulumi.export("serviceAccounts", {a.key: a.email for a in plan.accounts})
    pulumi.export("registry", names.registry_path)
    pulumi.export("dockerHubMirror", names.mirror_path)
    if plan.public_repository is not None:
        pulumi.export("publicRegistry", names.public_registry_path)
    pulumi.export("imageBucket", f"gs://{names.image_bucket}")
    pulumi.export("overlayTableKey", names.table_key_version)
