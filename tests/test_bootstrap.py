"""The bootstrap stack: exact least-privilege IAM, pinned CI federation, a safe state bucket, and
names that env and images stacks derive identically."""

from __future__ import annotations

import pulumi
import pytest
from hypothesis import given, settings, strategies as st

from fleet.project import accounts
from fleet.project.bootstrap import PRIMITIVE_ROLES, PUBLIC_MEMBERS, env_tiers, names_for, plan_bootstrap
from fleet.plan.harness import run_program
from fleet.plan.planner import build_plan
from fleet.stacks.load import load_config
from fleet.config.problems import ConfigError
from tests.plans import shipped_plan

from .conftest import ROOT, stack_config

IAM_TYPES = {
    "gcp:projects/iAMMember:IAMMember", "gcp:storage/bucketIAMMember:BucketIAMMember",
    "gcp:kms/cryptoKeyIAMMember:CryptoKeyIAMMember",
    "gcp:artifactregistry/repositoryIamMember:RepositoryIamMember", "gcp:serviceaccount/iAMMember:IAMMember",
}

# Reviewed table: which roles each identity may hold (anything else fails this test).
ALLOWED_ROLES = {
    "ci-preview": {"roles/compute.viewer", "roles/cloudkms.cryptoKeyDecrypter", "roles/storage.objectViewer"},
    "ci-drift": {"roles/compute.viewer", "roles/cloudkms.cryptoKeyDecrypter", "roles/storage.objectViewer"},
    "ci-deploy": {"roles/compute.instanceAdmin.v1", "roles/compute.networkAdmin", "roles/compute.securityAdmin",
                  "roles/compute.storageAdmin", "roles/iam.serviceAccountUser", "roles/storage.objectViewer",
                  "roles/storage.objectAdmin", "roles/cloudkms.cryptoKeyEncrypterDecrypter",
                  "roles/iam.workloadIdentityUser", "roles/storage.objectCreator", "roles/cloudkms.signerVerifier",
                  "roles/iap.tunnelResourceAccessor"},
    "ci-images": {"roles/compute.instanceAdmin.v1", "roles/compute.networkAdmin", "roles/compute.securityAdmin",
                  "roles/iam.serviceAccountUser", "roles/storage.objectAdmin", "roles/artifactregistry.writer",
                  "roles/storage.objectViewer", "roles/cloudkms.cryptoKeyEncrypterDecrypter"},
    "builder": {"roles/logging.logWriter", "roles/storage.objectAdmin", "roles/cloudkms.publicKeyViewer"},
    "node-overlay": {"roles/logging.logWriter", "roles/monitoring.metricWriter"},
    "node-dstack": {"roles/logging.logWriter", "roles/monitoring.metricWriter", "roles/artifactregistry.reader"},
    "compute-agent": {"roles/storage.objectViewer"},
    # anyone may read the public app repository (registry.publicAppImages), and nothing else
    "allUsers": {"roles/artifactregistry.reader"},
}


@pytest.fixture(scope="module")
def plan():
    return shipped_plan("bootstrap")


def iam(plan):
    return [r for r in plan.update_run.resources if r.type in IAM_TYPES]


def principal_kind(name: str) -> str:
    for prefix in ("ci-preview", "ci-drift", "ci-deploy", "ci-images", "builder", "compute-agent", "allUsers"):
        if name.startswith(prefix):
            return prefix
    return "node-dstack" if "-dstack-" in name else "node-overlay"


def test_iam_is_exactly_the_declared_set(plan):
    _, config = load_config(ROOT, "bootstrap")
    declared = {b.key: (b.role, b.member) for b in plan_bootstrap(config, env_tiers(ROOT, config)).bindings}
    granted = {r.name: (r.inputs["role"], r.inputs["member"]) for r in iam(plan) if not r.name.startswith("wif-")}
    for key, (role, member) in declared.items():
        assert key in granted and granted[key][0] == role
        if not member.startswith("computeServiceAgent:"):
            assert granted[key][1] == member
    assert set(granted) == set(declared)


def test_no_primitive_roles_no_public_members_and_only_reviewed_roles(plan):
    public = [r for r in iam(plan) if r.inputs["member"] in PUBLIC_MEMBERS]
    # the one public grant: reading the public app repository, which the stack file opts in to
    assert [(r.type, r.inputs["role"], r.inputs["member"], r.inputs["repository"]) for r in public] == [
        ("gcp:artifactregistry/repositoryIamMember:RepositoryIamMember", "roles/artifactregistry.reader", "allUsers",
         "fleet-public")]
    for r in iam(plan):
        role, member = r.inputs["role"], r.inputs["member"]
        assert role not in PRIMITIVE_ROLES and (member not in PUBLIC_MEMBERS or r in public)
        assert not member.startswith(("user:", "group:", "domain:"))
        if not r.name.startswith("wif-"):
            assert role in ALLOWED_ROLES[principal_kind(r.name)], r.name
    compute_agents = [r for r in iam(plan) if r.name.startswith("compute-agent")]
    assert compute_agents and all(r.inputs["member"].endswith("@compute-system.iam.gserviceaccount.com")
                                  for r in compute_agents)


def test_deploy_identities_touch_only_their_own_environment(plan):
    _, config = load_config(ROOT, "bootstrap")
    bp = plan_bootstrap(config, env_tiers(ROOT, config))
    for env, project in bp.environments.items():
        mine = [b for b in bp.bindings if b.who == f"ci-deploy-{env}"]
        projects = {b.target for b in mine if b.scope == "project"}
        keys = {(b.target, b.role) for b in mine if b.scope == "crypto_key"}
        # its own secrets key, and the fleet's table-signing key to sign its overlay's member tables
        assert projects == {project} and keys == {(bp.names.key(env), "roles/cloudkms.cryptoKeyEncrypterDecrypter"),
                                                  (bp.names.table_key, "roles/cloudkms.signerVerifier")}
        writes = [b for b in mine if b.role == "roles/storage.objectAdmin"]
        assert len(writes) == 1 and f"/{env}.json" in writes[0].condition[1]
        assert all(f"/{other}" not in writes[0].condition[1] for other in bp.environments if other != env)
        (uploads,) = [b for b in mine if b.role == "roles/storage.objectCreator"]
        assert uploads.target == bp.names.image_bucket and f"/config-disks/{env}/" in uploads.condition[1]


def test_each_deploy_identity_may_tunnel_to_its_own_environments_nodes_only(plan):
    """`make rollout` reads nodes through IAP TCP forwarding (fleet/cli/tunnel.py): each deploy identity
    holds roles/iap.tunnelResourceAccessor on its own env project (a gcp.projects.IAMMember), and reads
    the instance gcloud looks up first (compute.instances.get) through a role it already holds."""
    from fleet.project.bootstrap import DEPLOY_PROJECT_ROLES, TUNNEL_INSTANCE_READ

    _, config = load_config(ROOT, "bootstrap")
    bp = plan_bootstrap(config, env_tiers(ROOT, config))
    members = {(r.inputs["project"], r.inputs["member"]) for r in iam(plan)
               if r.type == "gcp:projects/iAMMember:IAMMember" and r.inputs["role"] == "roles/iap.tunnelResourceAccessor"}
    assert members == {(project, f"serviceAccount:{bp.account(f'ci-deploy-{env}').email}")
                       for env, project in bp.environments.items()}
    assert all("condition" not in r.inputs for r in iam(plan) if r.inputs["role"] == "roles/iap.tunnelResourceAccessor")
    permission, role = TUNNEL_INSTANCE_READ
    assert permission == "compute.instances.get" and role in DEPLOY_PROJECT_ROLES
    # the IAP API is on in every env project, nowhere else
    services = {(r.inputs["project"], r.inputs["service"]) for r in plan.resources
                if r.type == "gcp:projects/service:Service" and r.inputs["service"] == "iap.googleapis.com"}
    assert services == {(project, "iap.googleapis.com") for project in bp.environments.values()}


def test_federation_pins_repository_and_owner_ids(plan):
    provider = next(r for r in plan.resources if r.type.endswith(":WorkloadIdentityPoolProvider"))
    github = stack_config("bootstrap")["dstack-fleet:github"]
    condition = provider.inputs["attributeCondition"]
    assert f"assertion.repository_id == '{github['repositoryId']}'" in condition
    assert f"assertion.repository_owner_id == '{github['ownerId']}'" in condition
    assert condition.startswith("assertion.repository_id ==") and " && " in condition
    assert provider.inputs["oidc"]["issuerUri"] == "https://token.actions.githubusercontent.com"
    bindings = {r.name: r.inputs["member"] for r in plan.update_run.resources if r.name.startswith("wif-")}
    repository_id = github["repositoryId"]
    # every principal set names the repository: a token of another repository matches none of them
    assert bindings == {
        f"wif-repository_id-{repository_id}": f"{POOL}/attribute.repository_id/{repository_id}",
        f"wif-repo_env-{repository_id}-dev": f"{POOL}/attribute.repo_env/{repository_id}/dev",
        f"wif-repo_env-{repository_id}-staging": f"{POOL}/attribute.repo_env/{repository_id}/staging",
        f"wif-repo_env-{repository_id}-prod": f"{POOL}/attribute.repo_env/{repository_id}/prod",
        f"wif-repo_env-{repository_id}-drift": f"{POOL}/attribute.repo_env/{repository_id}/drift",
        f"wif-repo_ref-{repository_id}-refs-heads-main": f"{POOL}/attribute.repo_ref/{repository_id}/refs/heads/main",
    }
    mapping = provider.inputs["attributeMapping"]
    assert mapping["attribute.repo_env"] == ("assertion.repository_id + '/' + ('environment' in assertion ? "
                                             "assertion.environment : '')")
    assert mapping["attribute.repo_ref"] == "assertion.repository_id + '/' + ('ref' in assertion ? assertion.ref : '')"


POOL = "principalSet://iam.googleapis.com/" + "projects/123456789012/locations/global/workloadIdentityPools/fleet-github"  # the offline stand-in


def test_the_preview_identity_decrypts_no_prod_secret(plan):
    """Any branch of the repository can reach the preview identity through a pull request: it may
    decrypt what pull requests preview (dev, staging), never prod's key."""
    grants = [(r.name, r.inputs.get("cryptoKeyId")) for r in plan.update_run.resources
              if r.type == "gcp:kms/cryptoKeyIAMMember:CryptoKeyIAMMember" and r.name.startswith("ci-preview")]
    assert sorted(name for name, _ in grants) == ["ci-preview-cloudkms-cryptoKeyDecrypter-key-dev",
                                                  "ci-preview-cloudkms-cryptoKeyDecrypter-key-staging"]
    preview_roles = {r.inputs["role"] for r in plan.update_run.resources
                     if r.name.startswith("ci-preview") and "role" in r.inputs}
    assert not any(role.endswith(("Admin", "admin", "Writer", "writer", "Creator", "Encrypter")) or "Encrypter" in role
                   for role in preview_roles), preview_roles


def test_the_drift_identity_decrypts_every_env_stack_and_writes_nothing(plan):
    """The daily drift check previews prod too, so its identity holds prod's key to decrypt (the
    preview identity never does); it is bound to the drift check's GitHub environment alone, which
    the attribute condition admits."""
    _, config = load_config(ROOT, "bootstrap")
    bp = plan_bootstrap(config, env_tiers(ROOT, config))
    mine = [b for b in bp.bindings if b.who == "ci-drift"]
    assert {(b.target, b.role) for b in mine if b.scope == "crypto_key"} == {
        (bp.names.key(env), "roles/cloudkms.cryptoKeyDecrypter") for env in bp.environments}
    assert {b.target for b in mine if b.scope == "project"} == set(bp.environments.values())
    assert {b.role for b in mine} == {"roles/compute.viewer", "roles/cloudkms.cryptoKeyDecrypter",
                                      "roles/storage.objectViewer"}
    assert all(b.condition is None for b in mine)
    condition = next(r for r in plan.resources if r.type.endswith(":WorkloadIdentityPoolProvider")).inputs[
        "attributeCondition"]
    assert "assertion.environment in ['dev', 'staging', 'prod', 'drift']" in condition
    wif = [r for r in plan.update_run.resources if r.name.startswith("wif-")
           and r.inputs["member"].endswith("/drift")]
    assert len(wif) == 1


@pytest.mark.parametrize("name", ["prod", "PROD"])
def test_a_drift_environment_named_like_a_deploy_environment_is_refused(project, name):
    project.mutate("bootstrap", "clash", lambda c: c["dstack-fleet:github"].update({"driftEnvironment": name}))
    with pytest.raises(ConfigError) as info:
        load_config(project.root, "clash")
    assert [line for line in info.value.lines() if "driftEnvironment" in line] == [
        f"stacks/Pulumi.clash.yaml: dstack-fleet:github.driftEnvironment: {name!r} is also a deploy environment; the "
        "drift check needs a GitHub environment of its own (its identity reads every environment's secrets): name "
        "another"]


def test_an_environment_whose_stack_file_is_missing_counts_as_prod(project):
    from fleet.project.bootstrap import previews_decrypt

    (project.root / "stacks" / "Pulumi.staging.yaml").unlink()
    _, config = load_config(project.root, "bootstrap")
    tiers = env_tiers(project.root, config)
    assert tiers == {"dev": "dev", "staging": None, "prod": "prod"}
    assert [env for env in tiers if previews_decrypt(tiers, env)] == ["dev"]


HOSTILE_BRANCHES = ["x'])||true||('", "main' || true || 'x", "a\\'b", "feat/(x)", "release|1"]
HOSTILE_ENVIRONMENTS = ["prod' || true || '", "prod']||true||['", "pr od", "prod/x", "e" * 256]


@pytest.mark.parametrize("key, value", [("branches", [b]) for b in HOSTILE_BRANCHES]
                         + [("imagesBranch", b) for b in HOSTILE_BRANCHES]
                         + [("environments", ["dev", "staging", "prod", e]) for e in HOSTILE_ENVIRONMENTS]
                         + [("driftEnvironment", e) for e in HOSTILE_ENVIRONMENTS])
def test_hostile_names_never_reach_the_condition(project, key, value):
    project.mutate("bootstrap", "hostile", lambda c: c["dstack-fleet:github"].update({key: value}))
    with pytest.raises(ConfigError) as info:
        load_config(project.root, "hostile")
    lines = info.value.lines()
    assert lines and all(f"dstack-fleet:github.{key}" in line for line in lines), lines


def test_the_condition_refuses_rather_than_escapes_even_past_the_schema():
    """Called with names the schema never saw (another caller, a future field), the condition
    builder refuses them instead of writing them into CEL."""
    from types import SimpleNamespace

    from fleet.project.bootstrap import UnsafeName, attribute_condition

    base = dict(repository_id="812345678", owner_id="98765432", branches=["main"], environments=["prod"],
                drift_environment="drift")
    assert "'refs/heads/main'" in attribute_condition(SimpleNamespace(**base), [])
    for change in ({"branches": ["x'])||true||('"]}, {"environments": ["prod' || true || '"]},
                   {"repository_id": "1' || true || '"}, {"branches": ["a\\"]},
                   {"drift_environment": "drift' || true || '"}):
        with pytest.raises(UnsafeName):
            attribute_condition(SimpleNamespace(**{**base, **change}), [])


def _structure(condition: str) -> str:
    """The condition with every string literal replaced by a marker: its operators and shape."""
    import re

    return re.sub(r"'[^'\\]*'", "L", condition)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(branches=st.lists(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,20}", fullmatch=True), min_size=1, max_size=3),
       environments=st.lists(st.from_regex(r"[A-Za-z0-9._-]{1,20}", fullmatch=True), min_size=1, max_size=3))
def test_no_accepted_name_changes_the_shape_of_the_condition(branches, environments):
    """For every name the grammar accepts, the condition differs only inside its string literals."""
    from types import SimpleNamespace

    from fleet.config import grammar
    from fleet.project.bootstrap import attribute_condition

    branches = [b for b in branches if grammar.ci_branch_problem(b) is None] or ["main"]
    reference = attribute_condition(SimpleNamespace(repository_id="1", owner_id="2", branches=["main"] * len(branches),
                                                    environments=["prod"] * len(environments),
                                                    drift_environment="prod"), [])
    condition = attribute_condition(SimpleNamespace(repository_id="1", owner_id="2", branches=branches,
                                                    environments=environments, drift_environment=environments[0]),
                                    [])
    assert _structure(condition) == _structure(reference)


def test_state_bucket(plan):
    state = next(r for r in plan.resources if r.type == "gcp:storage/bucket:Bucket" and r.name == "state")
    assert state.inputs["versioning"] == {"enabled": True}
    assert state.inputs["publicAccessPrevention"] == "enforced"
    assert state.inputs["uniformBucketLevelAccess"] is True
    assert state.inputs["softDeletePolicy"]["retentionDurationSeconds"] > 0
    assert "retentionPolicy" not in state.inputs  # the backend deletes its lock and checkpoint files
    assert state.options["protect"] is True and state.options["retainOnDelete"] is True


def test_services_are_never_disabled(plan):
    services = [r for r in plan.resources if r.type == "gcp:projects/service:Service"]
    assert services and all(r.inputs["disableOnDestroy"] is False for r in services)
    enabled = {(r.inputs["project"], r.inputs["service"]) for r in services}
    assert ("acme-tee-prod", "compute.googleapis.com") in enabled
    assert ("acme-tee-ops", "iamcredentials.googleapis.com") in enabled


def test_registry_is_immutable_and_keeps_locked_digests(plan):
    repo = next(r for r in plan.resources if r.name == "repository")
    assert repo.inputs["dockerConfig"] == {"immutableTags": True}
    actions = {p["id"]: p["action"] for p in repo.inputs["cleanupPolicies"]}
    assert actions["delete-old-untagged"] == "DELETE" and actions["keep-recent"] == "KEEP"
    mirror = next(r for r in plan.resources if r.name == "dockerhub-mirror")
    assert mirror.inputs["remoteRepositoryConfig"]["dockerRepository"]["publicRepository"] == "DOCKER_HUB"


@pytest.mark.parametrize("env", ["dev", "staging", "prod"])
def test_env_stacks_use_exactly_what_bootstrap_creates(plan, env):
    _, env_config = load_config(ROOT, env)
    _, boot = load_config(ROOT, "bootstrap")
    assert boot.fleet.environments[env].project == env_config.gcp.project
    created = set(plan.outputs["serviceAccounts"].values())
    for kind in accounts.NODE_KINDS:
        assert accounts.node_account_email(env_config.fleet.name_prefix, env, kind, env_config.gcp.project) in created
    env_plan = shipped_plan(env)
    used = {r.inputs["serviceAccount"]["email"] for r in env_plan.resources
            if r.type == "gcp:compute/instance:Instance"}
    assert used and used <= created
    assert names_for(env_config).registry_path == plan.outputs["registry"]
    assert names_for(env_config).secrets_provider(env) == plan.outputs["secretsProviders"][env]


def test_adopting_existing_resources_imports_them(project):
    project.mutate("bootstrap", "adopting", lambda c: c.update({"dstack-fleet:adopt": {
        "state": "acme-tee-ops-fleet-state", "repository": "projects/acme-tee-ops/locations/us-central1/repositories/fleet"}}))
    plan = build_plan(project.root, "adopting")
    by_name = {r.name: r for r in plan.resources}
    assert by_name["state"].options["import"] == "acme-tee-ops-fleet-state"
    assert by_name["images"].options.get("import") is None


def test_adopting_a_node_disk_in_an_env_stack(project):
    disk_id = "projects/acme-tee-prod/zones/us-central1-a/disks/legacy-overlay-data"
    project.mutate("prod", "adopting", lambda c: c.update({"dstack-fleet:adopt": {"overlay-0-data": disk_id}}))
    plan = build_plan(project.root, "adopting")
    assert {r.name: r for r in plan.resources}["overlay-0-data"].options["import"] == disk_id


def test_adopt_naming_nothing_is_an_error(project):
    config = stack_config("prod")
    config["dstack-fleet:adopt"] = {"overlay-0-dta": "projects/x/zones/y/disks/z"}
    with pytest.raises(pulumi.RunError, match="adopt names no resource of this stack: overlay-0-dta"):
        run_program(ROOT, stack="prod", config=config, preview=True)


@pytest.mark.parametrize("stack,change,path,message", [
    ("bootstrap", lambda c: c.pop("dstack-fleet:github"), "dstack-fleet:github", "is required for the bootstrap"),
    ("bootstrap", lambda c: c["dstack-fleet:github"].update(repositoryId="acme/dstack-fleet"),
     "dstack-fleet:github.repositoryId", "must match"),
    ("bootstrap", lambda c: c.update({"dstack-fleet:bootstrap": {"project": "acme-tee-ops"}}),
     "dstack-fleet:bootstrap", "the bootstrap stack is itself"),
    ("prod", lambda c: c.pop("dstack-fleet:bootstrap"), "dstack-fleet:bootstrap", "is required"),
    ("prod", lambda c: c.update({"dstack-fleet:imagesProject": "acme-tee-build"}), "dstack-fleet:imagesProject",
     "only the bootstrap stack sets this"),
    # two environments in one project: one deploy identity would administer the other's nodes (and the
    # program would declare the same grants twice: duplicate URNs, the program failed)
    ("bootstrap", lambda c: c["dstack-fleet:environments"]["prod"].update(project="acme-tee-staging"),
     "dstack-fleet:environments.staging.project", "is also the project of environment 'prod'"),
    ("bootstrap", lambda c: c.update({"dstack-fleet:imagesProject": "acme-tee-prod"}), "dstack-fleet:imagesProject",
     "is the project of environment 'prod'"),
    ("bootstrap", lambda c: c["dstack-fleet:github"].update(environments=["dev", "staging"]),
     "dstack-fleet:github.environments", "does not list 'prod'"),
    ("bootstrap", lambda c: c["dstack-fleet:github"].update(branches=[f"release/{i:03d}-{'x' * 60}" for i in range(60)]),
     "dstack-fleet:github.branches", "GCP takes at most 4096"),
])
def test_bootstrap_config_errors(project, stack, change, path, message):
    project.mutate(stack, "badboot", change)
    project.assert_config_error("badboot", path, message)


def test_the_table_signing_key_is_one_asymmetric_p256_key_for_the_fleet(plan):
    # pulumi-gcp 10.2.0 CryptoKey: purpose and version_template.algorithm take Cloud KMS's enum names
    # (CryptoKeyPurpose ASYMMETRIC_SIGN, CryptoKeyVersionAlgorithm EC_SIGN_P256_SHA256)
    _, config = load_config(ROOT, "bootstrap")
    bp = plan_bootstrap(config)
    keys = [r for r in plan.resources if r.type == "gcp:kms/cryptoKey:CryptoKey"]
    (table,) = [r for r in keys if r.inputs.get("purpose") == "ASYMMETRIC_SIGN"]
    assert table.inputs["name"] == bp.names.table_key == "fleet-overlay-tables"
    assert table.inputs["versionTemplate"] == {"algorithm": "EC_SIGN_P256_SHA256", "protectionLevel": "HSM"}
    assert "rotationPeriod" not in table.inputs  # asymmetric keys do not rotate automatically
    assert table.options["protect"] and table.options["retainOnDelete"]
    assert all(r.inputs["purpose"] == "ENCRYPT_DECRYPT" for r in keys if r is not table)
    assert bp.names.table_key_version == (
        "projects/acme-tee-ops/locations/us-central1/keyRings/fleet-stack-secrets/cryptoKeys/fleet-overlay-tables/"
        "cryptoKeyVersions/1")
    assert plan.outputs["overlayTableKey"] == bp.names.table_key_version
    grants = {(b.who, b.role) for b in bp.bindings if b.target == bp.names.table_key}
    assert grants == {(f"ci-deploy-{env}", "roles/cloudkms.signerVerifier") for env in bp.environments} | {
        ("builder", "roles/cloudkms.publicKeyViewer")}
    # every env stack and the images stack derive the same key version (one image for every stack)
    for stack in ("dev", "staging", "prod", "images"):
        from fleet.project.bootstrap import names_for

        assert names_for(load_config(ROOT, stack)[1]).table_key_version == bp.names.table_key_version
