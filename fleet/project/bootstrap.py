"""The project plumbing every environment relies on, decided as data.

The bootstrap stack owns every identity and grant: env stacks never create service accounts or
grant roles. Names are derived from the bootstrap project, the name prefix and the environment,
by the functions here; env and images stacks derive the same names from their
``dstack-fleet:bootstrap`` setting (the bootstrap project and region), so their offline plans know
every email, bucket and registry path without reading another stack's state, and
``tests/test_bootstrap.py`` proves the bootstrap stack creates exactly what they expect.

Least privilege: the preview identity can only read, and decrypt the secrets of the stacks pull
requests preview (dev and staging tiers; never prod, whose preview runs only as its deploy
identity); each deploy identity can change only its own environment's project, state objects and
key; node identities can only write logs and metrics (and read the registry, for dstack nodes); no
primitive role is ever granted, and no public member but ``allUsers`` reading the public app
repository when ``dstack-fleet:registry.publicAppImages`` asks for it.

CI federation: every name that reaches the provider's CEL condition or a principal set (branches,
GitHub environments) is checked against git's and GitHub's rules and refused, never escaped, when
it holds a character either would read as syntax. A principal set binds one attribute, so the
provider maps combined attributes, ``repo_env`` (repository id and environment) and ``repo_ref``
(repository id and ref): a deploy identity trusts only its own environment *of this repository*,
the images identity only its branch of this repository, even if the condition were ever loosened.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from pathlib import Path

from fleet.project import accounts
from fleet.config import grammar, stackfile
from fleet.config.problems import ConfigError, Problem
from fleet.config.schema import NAMESPACE, StackConfig
from fleet.gcp.naming import MAX_SERVICE_ACCOUNT_ID, gcp_name, public_repository_id

GITHUB_ISSUER = "https://token.actions.githubusercontent.com"
PRIMITIVE_ROLES = frozenset({"roles/owner", "roles/editor", "roles/viewer"})
PUBLIC_MEMBERS = frozenset({"allUsers", "allAuthenticatedUsers"})

SERVICES_BOOTSTRAP = (
    "artifactregistry.googleapis.com", "cloudkms.googleapis.com", "cloudresourcemanager.googleapis.com",
    "iam.googleapis.com", "iamcredentials.googleapis.com", "logging.googleapis.com",
    "storage.googleapis.com", "sts.googleapis.com",
)
# iap.googleapis.com: the rollout reaches nodes through IAP TCP forwarding (Google's own IAP bastion
# module, terraform-google-modules/terraform-google-bastion-host README "APIs", lists it as required).
SERVICES_ENV = (
    "cloudresourcemanager.googleapis.com", "compute.googleapis.com", "iam.googleapis.com", "iap.googleapis.com",
    "logging.googleapis.com", "monitoring.googleapis.com",
)
SERVICES_IMAGES = (
    "compute.googleapis.com", "iam.googleapis.com", "logging.googleapis.com", "storage.googleapis.com",
)

# Roles each identity holds, by where they apply. Tests compare the plan with this table.
DEPLOY_PROJECT_ROLES = (
    "roles/compute.instanceAdmin.v1", "roles/compute.networkAdmin", "roles/compute.securityAdmin",
    "roles/compute.storageAdmin",
)
# `make rollout` reads nodes through IAP TCP forwarding (`gcloud compute start-iap-tunnel`,
# fleet/cli/tunnel.py). The tunnel needs iap.tunnelInstances.accessViaIAP: roles/iap.tunnelResourceAccessor
# ("IAP-secured Tunnel User"; its only other permission is iap.tunnelDestGroups.accessViaIAP; iann0036/
# iam-dataset 88be600b gcp/roles/iap.tunnelResourceAccessor.json). gcloud's GA command also reads the
# instance first (compute.instances.get; google-cloud-sdk lib/surface/compute/start_iap_tunnel.py
# `_FetchInstance`), which roles/compute.instanceAdmin.v1 above already includes (iam-dataset 0043e408
# gcp/roles/compute.instanceAdmin.v1.json), so no viewer role is added for it.
DEPLOY_TUNNEL_ROLES = ("roles/iap.tunnelResourceAccessor",)
TUNNEL_INSTANCE_READ = ("compute.instances.get", "roles/compute.instanceAdmin.v1")  # (permission, held through)
PREVIEW_PROJECT_ROLES = ("roles/compute.viewer",)
IMAGES_PROJECT_ROLES = ("roles/compute.instanceAdmin.v1", "roles/compute.networkAdmin",
                        "roles/compute.securityAdmin")
NODE_PROJECT_ROLES = ("roles/logging.logWriter", "roles/monitoring.metricWriter")
BUILDER_PROJECT_ROLES = ("roles/logging.logWriter",)


@dataclass(frozen=True)
class Names:
    """Every name shared between the bootstrap stack and the stacks that use its resources."""

    prefix: str
    project: str  # the bootstrap project
    region: str

    @property
    def state_bucket(self) -> str:
        return gcp_name(self.project, self.prefix, "state")

    @property
    def backend_url(self) -> str:
        return f"gs://{self.state_bucket}"

    @property
    def image_bucket(self) -> str:
        return gcp_name(self.project, self.prefix, "images")

    @property
    def key_ring(self) -> str:
        return gcp_name(self.prefix, "stack-secrets")

    def key(self, stack: str) -> str:
        return gcp_name(self.prefix, stack)

    def key_id(self, stack: str) -> str:
        return f"projects/{self.project}/locations/{self.region}/keyRings/{self.key_ring}/cryptoKeys/{self.key(stack)}"

    def secrets_provider(self, stack: str) -> str:
        return f"gcpkms://{self.key_id(stack)}"

    @property
    def table_key(self) -> str:
        """The fleet's asymmetric signing key for overlay member tables (one for every stack, so one
        overlay image, which carries its public half, serves them all)."""
        return gcp_name(self.prefix, "overlay-tables")

    @property
    def table_key_version(self) -> str:
        """Version 1 of it: Cloud KMS never reuses a key or version name, so this name stands for one
        public key for good (an image build fetches it; deploys sign with it)."""
        return (f"projects/{self.project}/locations/{self.region}/keyRings/{self.key_ring}/cryptoKeys/"
                f"{self.table_key}/cryptoKeyVersions/1")


    @property
    def pool_id(self) -> str:
        return gcp_name(self.prefix, "github", max_length=32)

    provider_id = "github-actions"

    @property
    def registry_id(self) -> str:
        return gcp_name(self.prefix)

    @property
    def mirror_id(self) -> str:
        return gcp_name(self.prefix, "dockerhub")

    @property
    def public_registry_id(self) -> str:
        """The public-read repository for the built images of apps that opt in (Phala Cloud pulls them)."""
        return public_repository_id(self.prefix)

    @property
    def registry_host(self) -> str:
        return f"{self.region}-docker.pkg.dev"

    @property
    def registry_path(self) -> str:
        return f"{self.region}-docker.pkg.dev/{self.project}/{self.registry_id}"

    @property
    def public_registry_path(self) -> str:
        return f"{self.region}-docker.pkg.dev/{self.project}/{self.public_registry_id}"

    @property
    def mirror_path(self) -> str:
        return f"{self.region}-docker.pkg.dev/{self.project}/{self.mirror_id}"

    def ci_account_id(self, purpose: str) -> str:
        return gcp_name(self.prefix, "ci", purpose, max_length=MAX_SERVICE_ACCOUNT_ID)

    def ci_account(self, purpose: str) -> str:
        return accounts.email(self.ci_account_id(purpose), self.project)

    def builder_account_id(self) -> str:
        return gcp_name(self.prefix, "builder", max_length=MAX_SERVICE_ACCOUNT_ID)


# A Cloud KMS key version's resource name, as gcloud's --project/--location/--keyring/--key/--version want it.
KEY_VERSION_RE = re.compile(
    r"^projects/(?P<project>[a-z][a-z0-9-]{4,28}[a-z0-9])/locations/(?P<location>[a-z0-9-]+)/keyRings/"
    r"(?P<ring>[A-Za-z0-9_-]{1,63})/cryptoKeys/(?P<key>[A-Za-z0-9_-]{1,63})/cryptoKeyVersions/(?P<version>[0-9]+)$")


def key_version_flags(name: str) -> tuple[str, list[str]]:
    """(version number, the gcloud flags naming its key) of a key version resource name."""
    match = KEY_VERSION_RE.match(name)
    if not match:
        raise ValueError(f"{name!r} is not a Cloud KMS key version resource name")
    return match["version"], ["--project", match["project"], "--location", match["location"],
                              "--keyring", match["ring"], "--key", match["key"]]


def names_for(config: StackConfig) -> Names:
    """The bootstrap names as seen from any stack: the bootstrap stack itself, or a stack whose
    ``dstack-fleet:bootstrap`` names the bootstrap project."""
    ref = config.fleet.bootstrap
    if config.fleet.role == "bootstrap" or ref is None:
        return Names(config.fleet.name_prefix, config.gcp.project, config.gcp.region)
    return Names(config.fleet.name_prefix, ref.project, ref.region or config.gcp.region)


@dataclass(frozen=True)
class Account:
    key: str  # logical name
    account_id: str
    project: str
    display_name: str
    description: str

    @property
    def email(self) -> str:
        return accounts.email(self.account_id, self.project)


@dataclass(frozen=True)
class Binding:
    """One IAM grant: ``member`` gets ``role`` on ``target`` (of kind ``scope``)."""

    scope: str  # project | bucket | repository | crypto_key | service_account
    target: str
    role: str
    member: str
    who: str  # short name of the member, for the logical name
    target_label: str  # short name of the target, for the logical name
    condition: tuple[str, str] | None = None  # (title, CEL expression)

    @property
    def key(self) -> str:
        """A readable, unique logical name: who gets which role on what."""
        role = self.role.removeprefix("roles/").replace(".", "-")
        return f"{self.who}-{role}-{self.target_label}"


@dataclass
class BootstrapPlan:
    names: Names
    services: dict[str, tuple[str, ...]]
    accounts: list[Account]
    bindings: list[Binding]
    keys: dict[str, str]  # stack -> crypto key name
    table_key: str  # the overlay member tables' signing key
    attribute_mapping: dict[str, str]
    attribute_condition: str
    environments: dict[str, str]  # env stack -> project
    images_project: str
    service_agents: dict[str, str] = field(default_factory=dict)  # project -> member placeholder
    public_repository: str | None = None  # the public-read app repository, when the stack opts in

    def account(self, key: str) -> Account:
        return next(a for a in self.accounts if a.key == key)


# The provider's condition is at most 4096 characters (pulumi-gcp 10.2.0,
# iam/workload_identity_pool_provider.py, attribute_condition).
MAX_CONDITION = 4096
_DIGITS = frozenset("0123456789")


class UnsafeName(ValueError):
    """A name that would reach the CEL condition or a principal set but is not safe there."""


def _literal(value: str, problem: str | None) -> str:
    """A CEL single-quoted literal of a value already checked to need no escaping: refuse, never escape."""
    if problem is not None or "'" in value or "\\" in value:
        raise UnsafeName(problem or f"{value!r} cannot be a CEL literal")
    return f"'{value}'"


def _ids(github) -> tuple[str, str]:
    for value in (github.repository_id, github.owner_id):
        if not value or not set(value) <= _DIGITS:
            raise UnsafeName(f"{value!r} is not a numeric GitHub id")
    return github.repository_id, github.owner_id


def deploy_environments(github, environments: list[str]) -> list[str]:
    return list(github.environments or environments)


def federated_environments(github, environments: list[str]) -> list[str]:
    """Every GitHub environment whose jobs may authenticate: the deploy environments and the drift
    check's own."""
    return [*deploy_environments(github, environments), github.drift_environment]


def attribute_condition(github, environments: list[str]) -> str:
    """Only this repository (by immutable ids, which survive renames and cannot be re-registered by
    someone else) from its allowed branches, GitHub environments, or its own pull requests. Every
    name is checked (``fleet.config.grammar``) before it is written into the expression."""
    repository_id, owner_id = _ids(github)
    branches = ", ".join(_literal(f"refs/heads/{b}", grammar.ci_branch_problem(b)) for b in github.branches)
    environments_list = ", ".join(_literal(e, grammar.github_environment_problem(e))
                                  for e in federated_environments(github, environments))
    return (
        f"assertion.repository_id == '{repository_id}' && "
        f"assertion.repository_owner_id == '{owner_id}' && "
        f"(assertion.ref in [{branches}] || "
        f"('environment' in assertion && assertion.environment in [{environments_list}]) || "
        "assertion.event_name == 'pull_request')"
    )


# Combined attributes: a principal set names one attribute value, so the repository goes into the
# value together with what is bound (GitHub's claims: repository_id, environment, ref). A job
# without an environment maps to '<id>/', which no binding names.
REPO_ENV = "repo_env"
REPO_REF = "repo_ref"
ATTRIBUTE_MAPPING = {
    "google.subject": "assertion.sub",
    "attribute.repository_id": "assertion.repository_id",
    "attribute.repository_owner_id": "assertion.repository_owner_id",
    "attribute.ref": "assertion.ref",
    "attribute.environment": "assertion.environment",
    "attribute.event_name": "assertion.event_name",
    f"attribute.{REPO_ENV}": "assertion.repository_id + '/' + ('environment' in assertion ? assertion.environment : '')",
    f"attribute.{REPO_REF}": "assertion.repository_id + '/' + ('ref' in assertion ? assertion.ref : '')",
}


def principal_set(pool_name: str, attribute: str, value: str) -> str:
    """``pool_name`` is the pool's resource name (projects/NUMBER/locations/global/...)."""
    return f"principalSet://iam.googleapis.com/{pool_name}/attribute.{attribute}/{value}"


POOL_PLACEHOLDER = "{pool}"
# A member that names a project's Compute Engine service agent; its email needs the project number,
# which only GCP knows, so the component resolves it.
COMPUTE_AGENT = "computeServiceAgent:"  # replaced by the pool's resource name once GCP assigns it


def state_prefix_condition(stack: str, project_name: str = "dstack-fleet") -> tuple[str, str]:
    """Objects of one stack in the DIY GCS backend (project-scoped layout): its checkpoint (and
    ``.bak``), history, backups and lock files."""
    paths = [f".pulumi/stacks/{project_name}/{stack}.json", f".pulumi/history/{project_name}/{stack}/",
             f".pulumi/backups/{project_name}/{stack}/", f".pulumi/locks/organization/{project_name}/{stack}/"]
    clauses = " || ".join(f"resource.name.startsWith('projects/_/buckets/{{bucket}}/objects/{p}')" for p in paths)
    return (f"state of {stack}", clauses)


def env_tiers(root: Path, config: StackConfig) -> dict[str, str | None]:
    """The tier each environment's own stack file declares (None when it is missing or unreadable,
    which counts as prod: the stricter reading)."""
    tiers: dict[str, str | None] = {}
    for env in config.fleet.environments:
        try:
            tier = stackfile.read(root, env).config.get(f"{NAMESPACE}:tier")
        except ConfigError:
            tier = None
        tiers[env] = tier if tier in ("dev", "staging", "prod") else None
    return tiers


def previews_decrypt(tiers: dict[str, str | None], env: str) -> bool:
    """Pull requests preview dev and staging with the read-only identity; prod is previewed only by
    its deploy identity, so the preview identity never holds prod's key."""
    return tiers.get(env) in ("dev", "staging")


def bootstrap_problems(config: StackConfig) -> list[Problem]:
    """The bootstrap stack as GCP will take it: one project per environment (a deploy identity
    administers its whole project, so a shared project would let one environment's CI change
    another's nodes), the images project apart from them, and the CI federation below."""
    fleet = config.fleet
    if fleet.role != "bootstrap":
        return []
    out = []
    owner: dict[str, str] = {}
    for env, ref in sorted(fleet.environments.items()):
        if ref.project in owner:
            out.append(Problem(config.source, f"{NAMESPACE}:environments.{env}.project", f"{ref.project} is also the "
                               f"project of environment {owner[ref.project]!r}; each environment needs its own (its "
                               "deploy identity administers the whole project)"))
        owner.setdefault(ref.project, env)
    if fleet.images_project in owner:
        out.append(Problem(config.source, f"{NAMESPACE}:imagesProject", f"{fleet.images_project} is the project of "
                           f"environment {owner[fleet.images_project]!r}; build hosts need a project of their own (the "
                           "images identity administers its instances)"))
    return out + federation_problems(config)


def federation_problems(config: StackConfig) -> list[Problem]:
    """The bootstrap stack's CI federation as GCP will take it: names safe in the condition, the
    condition within GCP's length limit."""
    github = config.fleet.github
    if config.fleet.role != "bootstrap" or github is None:
        return []
    at = f"{NAMESPACE}:github"
    try:
        condition = attribute_condition(github, list(config.fleet.environments))
    except UnsafeName as exc:  # the schema refuses these first; this guards other callers
        return [Problem(config.source, at, str(exc))]
    if len(condition) > MAX_CONDITION:
        return [Problem(config.source, f"{at}.branches", f"the attribute condition would be {len(condition)} characters; "
                        f"GCP takes at most {MAX_CONDITION}: list fewer or shorter branches and environments")]
    out = []
    if github.drift_environment.lower() in {e.lower() for e in [*config.fleet.environments, *github.environments]}:
        out.append(Problem(config.source, f"{at}.driftEnvironment", f"{github.drift_environment!r} is also a deploy "
                           "environment; the drift check needs a GitHub environment of its own (its identity reads "
                           "every environment's secrets): name another"))
    for env in config.fleet.environments:
        if github.environments and env not in github.environments:
            out.append(Problem(config.source, f"{at}.environments", f"does not list {env!r}: its deploy identity "
                               "could never authenticate; add it"))
    return out


def plan_bootstrap(config: StackConfig, tiers: dict[str, str | None] | None = None) -> BootstrapPlan:
    """``tiers``: each environment's tier (``env_tiers``); an environment without one is treated as
    prod."""
    tiers = tiers or {}
    fleet = config.fleet
    assert fleet.github is not None and fleet.images_project is not None, "checked for bootstrap stacks"
    names = names_for(config)
    prefix = fleet.name_prefix
    envs = {name: env.project for name, env in sorted(fleet.environments.items())}
    images_project = fleet.images_project

    services: dict[str, set[str]] = {config.gcp.project: set(SERVICES_BOOTSTRAP)}
    for project in envs.values():
        services.setdefault(project, set()).update(SERVICES_ENV)
    services.setdefault(images_project, set()).update(SERVICES_IMAGES)

    accts = [
        Account("ci-preview", names.ci_account_id("preview"), config.gcp.project, "CI preview (read-only)",
                "Runs pulumi preview for pull requests of the pinned repository; reads only."),
        Account("ci-drift", names.ci_account_id("drift"), config.gcp.project, "CI drift check (read-only)",
                "Runs the daily pulumi preview --refresh of every env stack from its GitHub environment; reads "
                "and decrypts only."),
        Account("ci-images", names.ci_account_id("images"), config.gcp.project, "CI images",
                "Runs the images stack from the main branch."),
        Account("builder", names.builder_account_id(), images_project, "Image build host",
                "Build hosts write artifacts to the image bucket."),
    ]
    for env in envs:
        accts.append(Account(f"ci-deploy-{env}", names.ci_account_id(f"deploy-{env}"), config.gcp.project,
                             f"CI deploy {env}", f"Runs pulumi up for {env} from its GitHub environment."))
        for kind in accounts.NODE_KINDS:
            accts.append(Account(f"node-{env}-{kind}", accounts.node_account_id(prefix, env, kind), envs[env],
                                 f"{kind} nodes ({env})", f"Identity of {kind} nodes in {env}."))
    by_key = {a.key: a for a in accts}

    def sa(key: str) -> str:
        return f"serviceAccount:{by_key[key].email}"

    state, image_bucket = names.state_bucket, names.image_bucket
    registry = names.registry_id
    bindings: list[Binding] = []
    labels = {state: "state-bucket", image_bucket: "image-bucket", registry: "registry",
              names.mirror_id: "dockerhub-mirror", names.public_registry_id: "public-apps"}
    labels.update({project: f"project-{env}" for env, project in envs.items()})
    labels[images_project] = "project-images"
    labels.update({names.key(stack): f"key-{stack}" for stack in [*envs, "images"]})
    labels[names.table_key] = "key-overlay-tables"
    labels.update({a.email: f"sa-{a.key}" for a in accts})

    def add(b: tuple) -> None:
        scope, target, role, member, *rest = b
        who = member.split(":", 1)[1] if ":" in member else member
        who = next((a.key for a in accts if a.email == who), None) or (
            who if who in PUBLIC_MEMBERS else f"compute-agent-{labels.get(who, who)}")
        bindings.append(Binding(scope, target, role, member, who, labels[target], rest[0] if rest else None))

    # preview: read-only everywhere it looks, plus decrypting the secrets of the stacks pull requests
    # preview (never prod's: any branch of the repository can reach this identity).
    # drift: what preview reads, in every environment, and every env stack's key to decrypt (prod's
    # too, which the preview identity never holds); only the drift check's GitHub environment, whose
    # deployment branch is main, can act as it
    for reader, decrypts in (("ci-preview", lambda env: previews_decrypt(tiers, env)), ("ci-drift", lambda env: True)):
        for env, project in envs.items():
            for role in PREVIEW_PROJECT_ROLES:
                add(("project", project, role, sa(reader)))
            if decrypts(env):
                add(("crypto_key", names.key(env), "roles/cloudkms.cryptoKeyDecrypter", sa(reader)))
        add(("bucket", state, "roles/storage.objectViewer", sa(reader)))
        add(("bucket", image_bucket, "roles/storage.objectViewer", sa(reader)))
    # deploy per environment: only its project, its node identities, its state objects and its key
    for env, project in envs.items():
        member = sa(f"ci-deploy-{env}")
        for role in DEPLOY_PROJECT_ROLES + DEPLOY_TUNNEL_ROLES:
            add(("project", project, role, member))
        for kind in accounts.NODE_KINDS:
            add(("service_account", by_key[f"node-{env}-{kind}"].email, "roles/iam.serviceAccountUser",
                        member))
        add(("bucket", state, "roles/storage.objectViewer", member))
        add(("bucket", state, "roles/storage.objectAdmin", member, state_prefix_condition(env)))
        add(("crypto_key", names.key(env), "roles/cloudkms.cryptoKeyEncrypterDecrypter", member))
        add(("bucket", image_bucket, "roles/storage.objectViewer", member))
        # dstack nodes' configuration disks are built at deploy and uploaded under the env's own prefix
        add(("bucket", image_bucket, "roles/storage.objectCreator", member, (
            f"config disks of {env}",
            f"resource.name.startsWith('projects/_/buckets/{{bucket}}/objects/config-disks/{env}/')")))
    # images: build hosts in the images project, artifacts, registry pushes, its own state and key
    images = sa("ci-images")
    for role in IMAGES_PROJECT_ROLES:
        add(("project", images_project, role, images))
    add(("service_account", by_key["builder"].email, "roles/iam.serviceAccountUser", images))
    add(("bucket", image_bucket, "roles/storage.objectAdmin", images))
    add(("repository", registry, "roles/artifactregistry.writer", images))
    add(("bucket", state, "roles/storage.objectViewer", images))
    add(("bucket", state, "roles/storage.objectAdmin", images, state_prefix_condition("images")))
    add(("crypto_key", names.key("images"), "roles/cloudkms.cryptoKeyEncrypterDecrypter", images))
    # build hosts write artifacts under their input hash, read them back, and clear a previous
    # failure marker on retry
    builder = sa("builder")
    for role in BUILDER_PROJECT_ROLES:
        add(("project", images_project, role, builder))
    add(("bucket", image_bucket, "roles/storage.objectAdmin", builder))
    # Compute Engine's service agent of each env project reads the tarball an image is made from
    for project in envs.values():
        add(("bucket", image_bucket, "roles/storage.objectViewer", f"{COMPUTE_AGENT}{project}"))
    # nodes: logs and metrics; dstack nodes also pull from the registry and its Docker Hub mirror
    for env, project in envs.items():
        for kind in accounts.NODE_KINDS:
            member = sa(f"node-{env}-{kind}")
            for role in NODE_PROJECT_ROLES:
                add(("project", project, role, member))
            if kind == "dstack":
                add(("repository", registry, "roles/artifactregistry.reader", member))
                add(("repository", names.mirror_id, "roles/artifactregistry.reader", member))

    # the one public grant: anyone may pull from the public app repository, which holds only the
    # images of apps that opted in (phala.publicImages); fleet.policy's no-public-access allows exactly it
    public = None
    if fleet.registry.public_app_images:
        public = names.public_registry_id
        add(("repository", public, "roles/artifactregistry.writer", images))
        add(("repository", public, "roles/artifactregistry.reader", "allUsers"))
    # overlay member tables: each deploy identity signs its environment's tables with the fleet key
    # (cloudkms.signerVerifier: sign, and read the public key to check the signature), build hosts
    # read its public half into the overlay image
    for env in envs:
        add(("crypto_key", names.table_key, "roles/cloudkms.signerVerifier", sa(f"ci-deploy-{env}")))
    add(("crypto_key", names.table_key, "roles/cloudkms.publicKeyViewer", builder))

    keys = {stack: names.key(stack) for stack in [*envs, "images"]}
    return BootstrapPlan(
        names=names,
        services={p: tuple(sorted(s)) for p, s in sorted(services.items())},
        accounts=accts,
        bindings=bindings,
        keys=keys,
        table_key=names.table_key,
        attribute_mapping=dict(ATTRIBUTE_MAPPING),
        attribute_condition=attribute_condition(fleet.github, list(envs)),
        environments=envs,
        images_project=images_project,
        public_repository=public,
    )


def impersonation(plan: BootstrapPlan, github) -> list[tuple[str, str, str]]:
    """(account key, attribute, value): which GitHub principals may act as which CI account. Each
    value carries the repository id, so no other repository's token matches it."""
    repository_id, _ = _ids(github)
    _literal(github.images_branch, grammar.ci_branch_problem(github.images_branch))
    out = [("ci-preview", "repository_id", repository_id)]
    for env in plan.environments:
        _literal(env, grammar.github_environment_problem(env))
        out.append((f"ci-deploy-{env}", REPO_ENV, f"{repository_id}/{env}"))
    _literal(github.drift_environment, grammar.github_environment_problem(github.drift_environment))
    out.append(("ci-drift", REPO_ENV, f"{repository_id}/{github.drift_environment}"))
    out.append(("ci-images", REPO_REF, f"{repository_id}/refs/heads/{github.images_branch}"))
    return out
