"""Typed configuration of one stack: the ``dstack-fleet:`` namespace plus ``gcp:project``/``gcp:region``.

Input is the stack's config as the Pulumi CLI hands it to a program: a flat mapping of
``namespace:key`` to a value (objects and lists decoded from JSON) and the set of keys that are
secret. ``load`` validates all of it at once and raises ``ConfigError`` listing every problem.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    Discriminator,
    Tag,
    ValidationInfo,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    model_validator,
)
from pydantic.alias_generators import to_camel

from fleet.gcp import tdx
from fleet.gcp.naming import PROGRAM_LABEL_KEYS
from fleet.config import grammar
from fleet.config.ports import port_key
from fleet.config.problems import ConfigError, Problem
from fleet.config.validation import known_keys, problems_from

NAMESPACE = "dstack-fleet"


class Model(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        alias_generator=to_camel,
        populate_by_name=False,
        frozen=True,
        validate_default=True,
    )


def _pattern(regex: str, what: str):
    compiled = re.compile(regex)

    def check(value: str) -> str:
        if not compiled.fullmatch(value):
            raise ValueError(f"{value!r} is not {what}")
        return value

    return AfterValidator(check)


def _cidr(value: str) -> str:
    problem = grammar.subnet_problem(value)
    if problem:
        raise ValueError(problem)
    return str(ipaddress.IPv4Network(value))


def _check(check):
    """An ``AfterValidator`` from a ``fleet.config.grammar`` function (``value -> reason | None``)."""

    def validate(value: str) -> str:
        problem = check(value)
        if problem:
            raise ValueError(problem)
        return value

    return AfterValidator(validate)


def _regex(compiled: "re.Pattern[str]", what: str):
    def validate(value: str) -> str:
        if not compiled.fullmatch(value):
            raise ValueError(f"{value[:80]!r} is not {what}")
        return value

    return AfterValidator(validate)


def _url(schemes: tuple[str, ...] = ("https", "http")):
    """A URL checked by ``grammar.url_problem``; https is required when the stack's tier is prod."""

    def validate(value: str, info: ValidationInfo) -> str:
        problem = grammar.url_problem(value, schemes=schemes, prod=(info.context or {}).get("tier") == "prod")
        if problem:
            raise ValueError(problem)
        return value

    return AfterValidator(validate)


def _no_program_labels(labels: dict[str, str]) -> dict[str, str]:
    taken = sorted(set(labels) & set(PROGRAM_LABEL_KEYS))
    if taken:
        raise ValueError(f"label key(s) {', '.join(taken)} are set by the program (they identify the stack, group "
                         f"and node); choose other keys (reserved: {', '.join(PROGRAM_LABEL_KEYS)})")
    if len(labels) + len(PROGRAM_LABEL_KEYS) > 64:
        raise ValueError(f"GCP allows 64 labels per resource and the program sets {len(PROGRAM_LABEL_KEYS)}; "
                         f"keep at most {64 - len(PROGRAM_LABEL_KEYS)}")
    return labels


def _allowed_in_prod(refused, why: str):
    """Refuse a value prod must never have (the stack's tier comes from the validation context)."""

    def validate(value, info: ValidationInfo):
        if (info.context or {}).get("tier") == "prod" and value == refused:
            raise ValueError(why)
        return value

    return AfterValidator(validate)


def _guest_binary_url(value: str) -> str:
    if value.startswith(("https://", "http://")):
        problem = grammar.url_problem(value, schemes=("https",))
    else:
        problem = grammar.repo_path_problem(value)
    if problem:
        raise ValueError(problem)
    return value


def _ipv4(value: str) -> str:
    try:
        return str(ipaddress.IPv4Address(value))
    except ValueError:
        raise ValueError(f"{value!r} is not an IPv4 address") from None


def _tdx_zone(value: str, info: ValidationInfo) -> str:
    problem = tdx.zone_problem(value, tuple((info.context or {}).get("extra_zones", ())))
    if problem:
        raise ValueError(problem)
    return value


def _tdx_machine_type(value: str, info: ValidationInfo) -> str:
    problem = tdx.machine_type_problem(value, tuple((info.context or {}).get("extra_machine_types", ())))
    if problem:
        raise ValueError(problem)
    return value


def _text_or_map(value: Any) -> str:
    return "<map>" if isinstance(value, dict) else "<text>"


def text_or_map(text_type: Any, model: Any) -> Any:
    """``text_type | model`` where errors name only the branch the value took (by its shape)."""
    return Annotated[
        Annotated[text_type, Tag("<text>")] | Annotated[model, Tag("<map>")],
        Discriminator(_text_or_map),
    ]


ProjectId = Annotated[
    str, _pattern(r"[a-z][a-z0-9-]{4,28}[a-z0-9]", "a GCP project id (6-30 chars: a-z, 0-9, '-')")
]
Region = Annotated[str, _pattern(r"[a-z]+-[a-z]+[0-9]+", "a GCP region such as us-central1")]
Zone = Annotated[str, _pattern(r"[a-z]+-[a-z]+[0-9]+-[a-z]", "a GCP zone such as us-central1-a")]
TdxZone = Annotated[Zone, AfterValidator(_tdx_zone)]
TdxMachineType = Annotated[str, AfterValidator(_tdx_machine_type)]
Cidr = Annotated[str, AfterValidator(_cidr)]
Url = Annotated[str, _url()]
HttpsUrl = Annotated[str, _url(("https",))]
OneLine = Annotated[str, _check(grammar.one_line_problem)]
Argument = Annotated[str, _check(grammar.argument_problem)]
AbsolutePath = Annotated[str, _check(grammar.absolute_path_problem)]
MachineTypeName = Annotated[str, _regex(grammar.MACHINE_TYPE, "a machine type name such as n2-standard-16")]
CiBranch = Annotated[str, _check(grammar.ci_branch_problem)]
GithubEnvironment = Annotated[str, _check(grammar.github_environment_problem)]
ComposePort = Annotated[str, _check(grammar.compose_port_problem)]
ComposeVolume = Annotated[str, _check(grammar.compose_volume_problem)]
ComposeTmpfs = Annotated[str, _check(grammar.compose_tmpfs_problem)]
SecurityOpt = Annotated[str, _regex(grammar.SECURITY_OPT, "a security option such as no-new-privileges:true")]
Restart = Annotated[str, _regex(grammar.COMPOSE_RESTART, "a restart policy: no, always, unless-stopped or "
                                "on-failure[:N]")]
# Import ids of adopted resources: GCP resource paths or names, no spaces (pulumi import ids).
ImportId = Annotated[str, _regex(re.compile(r"[A-Za-z0-9][A-Za-z0-9._/:@-]{0,1023}"),
                                 "an import id such as projects/P/zones/Z/disks/D")]
IPv4 = Annotated[str, AfterValidator(_ipv4)]
Port = Annotated[int, Field(ge=1, le=65535)]
ShortName = Annotated[
    str,
    _pattern(r"[a-z]([a-z0-9-]{0,18}[a-z0-9])?", "a short name (1-20 chars: a-z, 0-9, '-', starting with a letter)"),
]
LabelKey = Annotated[str, _pattern(r"[a-z][a-z0-9_-]{0,62}", "a GCP label key")]
LabelValue = Annotated[str, _pattern(r"[a-z0-9_-]{0,63}", "a GCP label value")]
SecretName = Annotated[str, _pattern(r"[A-Za-z][A-Za-z0-9_]{0,63}", "a secret name (letters, digits, '_')")]

Sha256Hex = Annotated[str, _pattern(r"[0-9a-f]{64}", "a sha256 (64 lowercase hex digits)")]
CommitSha = Annotated[
    str, _pattern(r"[0-9a-f]{40}", "a full commit SHA (40 lowercase hex digits); branches and tags move")
]
ImageKey = Annotated[
    str,
    _pattern(r"[a-z]([a-z0-9-]{0,38}[a-z0-9])?", "an image key (1-40 chars: a-z, 0-9, '-', starting with a letter)"),
]
GceImageLink = Annotated[
    str,
    _pattern(
        r"(https://www\.googleapis\.com/compute/v1/)?projects/[a-z][a-z0-9-]{4,28}[a-z0-9]/global/images/[a-z]([-a-z0-9]*[a-z0-9])?",
        "a GCE image self link (projects/P/global/images/NAME); families are not allowed because they move",
    ),
]

Role = Literal["bootstrap", "images", "env"]
Tier = Literal["dev", "staging", "prod"]
Protocol = Literal["tcp", "udp"]


class GcpSettings(Model):
    """The provider settings this program reads (namespace ``gcp:``)."""

    model_config = ConfigDict(extra="ignore", alias_generator=None, frozen=True)

    project: ProjectId = Field(description="GCP project id every resource lives in.")
    region: Region = Field(description="Default region: subnets, routers and regional resources.")


class PublicIngress(Model):
    """A port deliberately reachable from the internet (the *no-open-ingress* rule allows only these)."""

    port: Port = Field(description="Destination port.")
    protocol: Protocol = Field("tcp", description="tcp or udp.")
    reason: OneLine = Field(description="Why this port is public; shown in the plan and the firewall description.")
    groups: list[ShortName] = Field(min_length=1, description="Node groups that receive this traffic.")


class NetworkConfig(Model):
    """The VPC of a stack: one subnet per region used, Cloud NAT for egress, deny-by-default ingress."""

    subnets: dict[Region, Cidr] = Field(
        default_factory=dict,
        description="Primary CIDR per region. Every region a node or build host runs in needs one; "
        "node addresses are allocated from it.",
    )
    nat_logging: Literal["off", "errors", "all"] = Field(
        "errors", description="Cloud NAT logging: off, errors (translation failures) or all."
    )
    public_ingress: list[PublicIngress] = Field(
        default_factory=list,
        description="Ports opened to 0.0.0.0/0. Empty by default: nodes talk to each other and reach "
        "the internet through NAT only.",
    )


class AddressBlock(Model):
    """Where a group's internal addresses come from: an offset into the subnet, or explicit pins."""

    offset: int | None = Field(
        None,
        ge=2,
        description="Index of the group's first address in its region's subnet; ordinal n gets offset+n. "
        "Must not overlap another group's block. GCP reserves indexes 0, 1 and the last two.",
    )
    pins: list[IPv4] | None = Field(
        None, description="Explicit address per node ordinal (ordinal n gets pins[n])."
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> "AddressBlock":
        if (self.offset is None) == (self.pins is None):
            raise ValueError("set exactly one of 'offset' or 'pins'")
        return self


class ZoneEntry(Model):
    """A zone appended to a running group: only ordinals from ``firstOrdinal`` on use it."""

    zone: TdxZone = Field(description="A TDX zone.")
    first_ordinal: int = Field(ge=0, description="First ordinal allowed to use this zone (the group's count when added).")


class NodeGroup(Model):
    """A group of identical confidential TDX nodes. A node is (group, ordinal): its name, zone and
    address derive from that alone, so growing another group never moves it."""

    name: ShortName = Field(description="Group name; part of every node's name and URN. Never rename.")
    kind: Literal["overlay", "dstack"] = Field(
        description="overlay: tplus light-client image with peers; dstack: dstack OS running apps."
    )
    count: int = Field(ge=1, le=1000, description="Number of nodes (ordinals 0..count-1).")
    machine_type: TdxMachineType = Field("c3-standard-4", description="A TDX-capable machine type (C3 family).")
    zones: list[text_or_map(TdxZone, ZoneEntry)] = Field(  # type: ignore[valid-type]
        min_length=1,
        description="TDX zones, round-robin by ordinal. To add a zone to a running group append "
        "{zone: ..., firstOrdinal: <current count>} so no existing node moves; never reorder.",
    )
    retired: list[int] = Field(
        default_factory=list,
        description="Ordinals removed from the group; the others keep their name, zone and address.",
    )
    data_disk_gb: int = Field(50, ge=10, le=65536, description="Size of each node's data disk (GB).")
    addresses: AddressBlock = Field(description="Address block of the group in its region's subnet.")
    max_unavailable: int = Field(
        1, ge=1, description="At most this many nodes of the group may be replaced or stopped by one change."
    )
    image: ImageKey = Field(description="Key in dstack-fleet:images of the image the group boots.")
    external_ip: bool = Field(False, description="Give each node a static external address (off: egress via NAT only).")
    image_overrides: dict[int, ImageKey] = Field(
        default_factory=dict,
        description="Per-ordinal image for rolling upgrades in waves: pin some ordinals to the current "
        "version while the rest take the next.",
    )


class ExpectedHashes(Model):
    """Hashes a prebuilt image is expected to have. GCE cannot report them, so ``fleet verify``
    checks them against a booted node's attestation."""

    os_image_hash: Sha256Hex | None = Field(None, description="dstack os-image-hash (sha256 of sha256sum.txt).")
    rootfs_hash: str | None = Field(None, description="dm-verity root hash of the rootfs.")
    uki_hash: str | None = Field(None, description="Authenticode hash of the UKI.")
    source: OneLine = Field(description="Where these values come from (release page, build log).")


class GuestBinary(Model):
    """A prebuilt light-client binary (the musl build), verified before use."""

    url: Annotated[str, AfterValidator(_guest_binary_url)] = Field(
        description="https:// URL or path (relative to the repository) of the musl build.")
    sha256: Sha256Hex = Field(description="SHA-256 of the binary; the build stops when it differs.")


class GuestSource(Model):
    """Build the light client from source on the build host (cargo, musl target)."""

    repository: HttpsUrl = Field(description="Git repository (https).")
    commit: CommitSha = Field(description="Commit to build.")
    workspace: Annotated[str, _check(grammar.repo_path_problem)] = Field(
        description="Cargo workspace directory inside the repository.")
    binary: str = Field(pattern=r"^[A-Za-z0-9_-]+$", description="Cargo binary target to build.")
    features: list[Annotated[str, _regex(grammar.CARGO_FEATURE, "a Cargo feature name")]] = Field(
        default_factory=list, description="Cargo features (with --no-default-features).")


class Guest(Model):
    """The light client baked into an overlay image: a verified binary or a pinned source build."""

    binary: GuestBinary | None = Field(None, description="A prebuilt binary with its sha256.")
    source: GuestSource | None = Field(None, description="A source build at a pinned commit.")

    @model_validator(mode="after")
    def _exactly_one(self) -> "Guest":
        if (self.binary is None) == (self.source is None):
            raise ValueError("set exactly one of 'binary' or 'source'")
        return self


class TplusOverlayBuild(Model):
    """tpluslabs/meta-dstack on the flashbots Yocto setup, with the light client as the guest."""

    recipe: Literal["tplus-overlay"] = Field(description="Recipe name.")
    guest: Guest = Field(description="The light client to bake in.")
    prod: bool = Field(True, description="PROD=true: drop Yocto's debug-tweaks (no root login, no debug tools).")


class DstackOsBuild(Model):
    """The dstack guest OS with GCP (UKI) output, built reproducibly at a pinned commit."""

    recipe: Literal["dstack-os"] = Field(description="Recipe name.")
    version: str = Field(description="dstack OS release with GCP (UKI) output: 0.6.0.a2 (Dstack-TEE/meta-dstack).")
    cmdline_overrides: dict[str, str] = Field(
        default_factory=dict, description="Kernel parameters of the pinned release to set, by exact name "
        "(dstack.rootfs_device, dstack.data_device). dstack.rootfs_hash/rootfs_size are build outputs.")


class PrebuiltTarball(Model):
    """An existing disk.raw tarball in GCS, checked against its sha256 before an image is made."""

    url: str = Field(pattern=r"^gs://[a-z0-9][a-z0-9._-]{1,220}/.+\.tar\.gz$", description="gs:// URL of the tarball.")
    sha256: Sha256Hex = Field(description="SHA-256 of the tarball.")
    expected: ExpectedHashes | None = Field(None, description="Hashes the image is expected to produce.")


class PrebuiltImage(Model):
    """An existing GCE image, pinned by self link."""

    self_link: GceImageLink = Field(description="projects/P/global/images/NAME of the image.")
    expected: ExpectedHashes | None = Field(None, description="Hashes the image is expected to produce.")


class Prebuilt(Model):
    tarball: PrebuiltTarball | None = Field(None, description="Make a GCP image from an existing tarball.")
    image: PrebuiltImage | None = Field(None, description="Use an existing GCE image.")

    @model_validator(mode="after")
    def _exactly_one(self) -> "Prebuilt":
        if (self.tarball is None) == (self.image is None):
            raise ValueError("set exactly one of 'tarball' or 'image'")
        return self


class ImageSource(Model):
    """One image version: built by a recipe (hashes from the lock file) or prebuilt."""

    build: Annotated[TplusOverlayBuild | DstackOsBuild, Field(discriminator="recipe")] | None = Field(
        None, description="Build with a recipe; the images stack builds it, the lock file records its hashes.")
    prebuilt: Prebuilt | None = Field(None, description="Use something that already exists.")

    @model_validator(mode="after")
    def _exactly_one(self) -> "ImageSource":
        if (self.build is None) == (self.prebuilt is None):
            raise ValueError("set exactly one of 'build' or 'prebuilt'")
        return self


NodeKey = Annotated[str, _pattern(r"[a-z]([a-z0-9-]{0,18}[a-z0-9])?-[0-9]+", "a node key '<group>-<ordinal>'")]


class OverlayConfig(Model):
    """The overlay the stack's ``kind: overlay`` nodes form (the tplus light client)."""

    port: Port = Field(5000, description="Overlay port every node listens on.")
    protocol: Protocol = Field("udp", description="udp for the QUIC overlay (the default build), tcp otherwise.")
    topology: Literal["mesh", "ring", "star", "explicit"] = Field(
        "mesh", description="Who peers with whom. Every peer list is known at plan time.")
    peers: dict[NodeKey, list[NodeKey]] = Field(
        default_factory=dict, description="explicit topology: each node's peers by node key.")
    genesis: NodeKey | None = Field(
        None, description="The one node that founds the overlay (starts without peers, only with the overlay's first "
        "signed table and only while its data disk has never recorded a founding or a table). Default: the first node "
        "of the first overlay group.")
    delivery: Literal["signed", "metadata", "baked"] = Field(
        "signed", description="signed: the member table reaches each node in instance metadata, signed at deploy "
        "time with the fleet's Cloud KMS key; the image verifies it before the light client starts. 'metadata' "
        "and 'baked' are older names of the same mode (the image always requires a valid signature).")
    interface: Literal["argv", "setup"] = Field(
        "setup", description="How the light client takes its peers: argv (`guest <port> [ip:port ...]`, older "
        "builds) or setup (one-time POST /setup on the loopback port, current builds).")
    setup_port: Port = Field(40080, description="Loopback port of the setup endpoint; never opened to the network.")
    execution_rpc: Url | None = Field(
        None,
        description="Ethereum execution RPC URL for the setup interface. It is part of the signed member table in "
        "instance metadata, readable by anyone who may view the instances, so a URL carrying an API key is refused.")


class BootstrapRef(Model):
    """Where the bootstrap stack's shared resources live (the registry, buckets, KMS keys)."""

    project: ProjectId = Field(description="The bootstrap stack's GCP project.")
    region: Region | None = Field(None, description="Its region (default: this stack's gcp:region).")


class EnvironmentRef(Model):
    project: ProjectId = Field(description="GCP project of the env stack of this name.")


class GithubConfig(Model):
    """The repository whose workflows may act as the CI identities (Workload Identity Federation)."""

    repository: str = Field(pattern=r"^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$", description="owner/name, for humans.")
    repository_id: str = Field(pattern=r"^[0-9]+$", description="The repository's immutable numeric id "
                               "(gh api repos/OWNER/NAME --jq .id); names can be renamed and re-registered.")
    owner_id: str = Field(pattern=r"^[0-9]+$", description="The owner's immutable numeric id (… --jq .owner.id).")
    branches: list[CiBranch] = Field(default_factory=lambda: ["main"], min_length=1,
                                     description="Branches whose workflows may authenticate.")
    environments: list[GithubEnvironment] = Field(default_factory=list, description="GitHub environments "
                                                  "allowed to authenticate (each deploy identity accepts only its "
                                                  "own).")
    images_branch: CiBranch = Field("main", description="Branch whose workflow may run the images stack.")
    drift_environment: GithubEnvironment = Field(
        "drift", description="GitHub environment of the daily drift check (deployment branch: main only); only "
        "it may act as the drift identity, which reads every env stack's secrets but changes nothing.")

    @model_validator(mode="after")
    def _unique_environments(self) -> "GithubConfig":
        folded = [e.lower() for e in self.environments]
        twice = sorted({e for e in self.environments if folded.count(e.lower()) > 1})
        if twice:
            raise ValueError(f"environments {', '.join(twice)} differ only in case; GitHub environment names are "
                             "not case sensitive, so they name one environment")
        return self


class GcConfig(Model):
    retention_days: int = Field(30, ge=1, description="How long an image or bucket artifact stays after `make gc` "
                                "first finds that nothing names it (it is marked then, and deleted only later).")


# Placeholders a rollout URL template may use; each is the node's value from the plan's `nodes` output.
ROLLOUT_URL_FIELDS = ("address", "name", "zone", "group", "ordinal", "key")
RolloutUrl = Annotated[str, _pattern(r"https?://[^\s'\"]+", "an http(s) URL template")]
# A template whose host is one of these reads a port of the node itself: what IAP TCP forwarding can
# reach (`dstack-fleet:rollout.reach: iap`) and what the firewall admits from IAP's range.
ROLLOUT_NODE_HOSTS = ("{address}", "{name}")


def rollout_node_port(template: str) -> int | None:
    """The port of the node a rollout URL template reads (80 for http without one), or None when its
    host is not the node itself ({address} or {name}) or it is not plain http."""
    scheme, rest = template.split("://", 1) if "://" in template else ("", template)
    netloc = rest.split("/", 1)[0].split("?", 1)[0]
    host, colon, port = netloc.rpartition(":") if netloc.count(":") == 1 else (netloc, "", "")
    if scheme.lower() != "http" or host not in ROLLOUT_NODE_HOSTS:
        return None
    if not colon:
        return 80
    return int(port) if port.isdigit() and 1 <= int(port) <= 65535 else None


class RolloutEndpoints(Model):
    """Where `make rollout` reads one node of a group: URL templates with {address}, {name}, {zone},
    {group}, {ordinal} or {key} of the node. With reach direct they must be reachable from where the
    rollout runs; with reach iap they must read the node itself over http."""

    attest_url: RolloutUrl | None = Field(
        None, description="overlay group: the light client's GET /attest (default http://{address}:3032/attest), "
        "served once the node holds the overlay's shared secret.")
    info_url: RolloutUrl | None = Field(
        None, description="dstack group: the guest agent's Info response with tcb_info (default "
        "http://{address}:8090/prpc/Info?json).")
    quote_url: RolloutUrl | None = Field(
        None, description="dstack group: a GetQuote response of the node's app (no default: the guest agent "
        "does not serve quotes on its public port; the app must).")


class RolloutConfig(Model):
    """`make rollout`: how long a wave may take to become healthy and where its nodes are read."""

    reach: Literal["direct", "iap"] = Field(
        "direct", description="How the rollout reaches each URL. direct: from where it runs, as written (the "
        "default templates name internal addresses: run it inside the VPC). iap: through IAP TCP forwarding, one "
        "`gcloud compute start-iap-tunnel` per node and port, closed after each read; every template must then be "
        "http://{address}:PORT/... or http://{name}:PORT/..., and the identity running it needs "
        "roles/iap.tunnelResourceAccessor (the bootstrap stack grants each deploy identity). `make rollout REACH=...` "
        "overrides it for one run.")
    groups: dict[ShortName, RolloutEndpoints] = Field(
        default_factory=dict, description="Per node group: the URLs the health wait and the attestation gate read.")
    health_timeout_seconds: int = Field(1800, ge=1, description="How long a wave's nodes may take to answer "
                                        "(and an overlay node to hold the secret) before the rollout stops.")
    poll_seconds: int = Field(15, ge=1, description="Seconds between health probes.")


class RegistryConfig(Model):
    cleanup_untagged_after_days: int = Field(30, ge=1, description="Delete untagged versions older than this, "
                                             "except digests the lock file names and the newest ones.")
    keep_recent: int = Field(10, ge=1, description="Always keep this many newest versions per image.")
    public_app_images: bool = Field(False, description="Also create a public-read repository (allUsers may pull, "
                                    "nothing else) for the built images of apps that opt in with "
                                    "phala.publicImages; Phala Cloud cannot authenticate to the private one.")


Digest = Annotated[str, _pattern(r"sha256:[0-9a-f]{64}", "a digest 'sha256:' + 64 lowercase hex digits")]
EnvName = Annotated[str, _pattern(r"[A-Za-z_][A-Za-z0-9_]{0,63}", "an environment variable name")]
RepoPath = Annotated[str, _pattern(r"[A-Za-z0-9_.][A-Za-z0-9_./-]*", "a path inside the repository"),
                     _check(grammar.repo_path_problem)]


class ExternalContainer(Model):
    """An image built elsewhere, referenced only by digest."""

    image: str = Field(pattern=r"^[a-z0-9][a-z0-9._/:-]*[a-z0-9]$",
                       description="Repository, e.g. docker.io/nearone/mpc-node (no tag, no digest).")
    digest: Digest = Field(description="The pinned digest.")
    digest_kind: Literal["manifest", "image-id"] = Field(
        "manifest", description="manifest: registry manifest digest (pull by digest); image-id: config digest "
        "(docker image inspect .Id), which some launchers compare.")
    source: OneLine = Field(description="Where the digest comes from (release, build log, registry).")
    check_at_deploy: bool = Field(False, description="Ask the registry at deploy whether this manifest digest "
                                  "exists under the repository (manifest digests only; public registries).")


class DockerBuildContainer(Model):
    """Built by the images stack with Docker (a generated step) and pushed to the bootstrap registry."""

    context: RepoPath = Field(description="Build context directory in the repository.")
    dockerfile: RepoPath = Field("Dockerfile", description="Dockerfile inside the context.")
    platform: Literal["linux/amd64"] = Field("linux/amd64", description="TDX guests are amd64.")
    args: dict[Annotated[str, _regex(grammar.DOCKER_ARG_NAME, "a build-arg name")], Argument] = Field(
        default_factory=dict, description="Build args (part of the input hash). An arg a FROM line uses must "
        "name an image pinned by digest.")
    target: Annotated[str, _regex(grammar.DOCKER_STAGE, "a build stage name")] | None = Field(
        None, description="Build stage (a FROM ... AS name of the Dockerfile).")


def _image_port(value: int | str) -> int | str:
    """A port an image exposes, checked by the rules the OCI image config is written with."""
    port_key(str(value))
    return value


class MkosiBuildContainer(Model):
    """Built reproducibly by the images stack with mkosi (a root-filesystem tar turned into a
    deterministic OCI image) and pushed to the bootstrap registry; see fleet/images/mkosibuild.py."""

    directory: RepoPath = Field(description="Repository directory holding mkosi.conf (Format=tar, SourceDateEpoch=).")
    command: list[Argument] = Field(min_length=1, description="What the container runs (the image's Cmd).")
    entrypoint: list[Argument] = Field(default_factory=list, description="The image's Entrypoint.")
    working_dir: AbsolutePath | None = Field(None, description="The image's working directory.")
    env: dict[EnvName, Argument] = Field(default_factory=dict, description="The image's environment.")
    ports: list[Annotated[int | str, AfterValidator(_image_port)]] = \
        Field(default_factory=list, description="Exposed ports: 3000, '3000/tcp', '53/udp'.")


CONTAINER_SOURCES = ("external", "docker", "mkosi")


class ContainerSource(Model):
    """A container image apps run: external (by digest) or built (digest from images.lock.json)."""

    external: ExternalContainer | None = Field(None, description="An existing image pinned by digest.")
    docker: DockerBuildContainer | None = Field(None, description="Build it in the images stack with Docker.")
    mkosi: MkosiBuildContainer | None = Field(None, description="Build it reproducibly in the images stack with mkosi.")

    @model_validator(mode="after")
    def _exactly_one(self) -> "ContainerSource":
        if sum(getattr(self, name) is not None for name in CONTAINER_SOURCES) != 1:
            raise ValueError("set exactly one of 'external', 'docker' or 'mkosi'")
        return self


class AppSettings(Model):
    """app-compose.json settings (measured: changing one changes the compose hash)."""

    gateway_enabled: bool = Field(False, description="Expose the app through the dstack gateway.")
    public_logs: bool = Field(False, description="Container logs readable without attestation.")
    public_sysinfo: bool = Field(False, description="System info readable without attestation.")
    public_tcbinfo: bool | None = Field(None, description="TCB info readable without attestation (0.5.1+).")
    no_instance_id: bool = Field(False, description="No per-instance id (the instance-id event is empty).")
    secure_time: bool = Field(False, description="Wait for trusted time before starting.")
    storage_fs: Literal["zfs", "ext4"] | None = Field(None, description="Data disk filesystem (0.5.5+).")
    allowed_envs: list[EnvName] = Field(default_factory=list,
                                        description="Extra env names the encrypted env may carry.")


class KmsSettings(Model):
    urls: list[Url] = Field(min_length=1, description="KMS URLs the guest asks for its keys.")
    app_id: str | None = Field(None, pattern=r"^[0-9a-f]{40}$", description="The app id registered with the KMS "
                               "(e.g. the on-chain app contract): the identity stays stable across compose changes.")
    key_provider_id: str = Field("", pattern=r"^([0-9a-f]{2})*$", description="Hex id of the KMS root key.")


class ServiceConfig(Model):
    """One service of a generated compose file."""

    name: str = Field(pattern=r"^[a-zA-Z0-9][a-zA-Z0-9_.-]*$", description="Service name.")
    image: str = Field(description="A key of dstack-fleet:containers.")
    ports: list[ComposePort] = Field(default_factory=list, description="Port mappings, e.g. '3000:3000'.")
    environment: dict[EnvName, Argument] = Field(default_factory=dict, description="Measured environment.")
    volumes: list[ComposeVolume] = Field(default_factory=list, description="Volume mounts, e.g. "
                                         "'/var/run/dstack.sock:/var/run/dstack.sock'.")
    command: list[Argument] | None = Field(None, description="Command (argv).")
    working_dir: AbsolutePath | None = Field(None, description="Working directory.")
    restart: Restart | None = Field(None, description="Restart policy: no, always, unless-stopped, on-failure[:N].")
    read_only: bool | None = Field(None, description="Read-only root filesystem.")
    security_opt: list[SecurityOpt] = Field(default_factory=list, description="Security options.")
    tmpfs: list[ComposeTmpfs] = Field(default_factory=list, description="tmpfs mounts, e.g. '/tmp:size=64m'.")


class NearPortMapping(Model):
    """One ``port_mappings`` entry of the Rust launcher's user config."""

    host: Port = Field(description="Host (CVM) port.")
    container: Port = Field(description="MPC container port.")


class NearLauncherSettings(Model):
    """``[launcher_config]`` of the Rust launcher's user config (unmeasured: a change is a restart)."""

    image_reference: str | None = Field(None, description="[registry/]name[:tag] the launcher pulls the approved "
                                        "digest from (default: the mpcImage container's repository).")
    hash_override: str | None = Field(None, description="Key of dstack-fleet:containers: an approved MPC image to "
                                      "run instead of the newest approved one (mpc_hash_override).")
    pull_max_retries: int | None = Field(None, ge=0, description="docker pull retries (launcher default 5).")
    pull_retry_interval_secs: int | None = Field(None, ge=0, description="First retry delay (launcher default 2).")
    pull_max_delay_secs: int | None = Field(None, ge=0, description="Retry delay cap (launcher default 60).")
    port_mappings: list[NearPortMapping] = Field(default_factory=list, description="Ports the MPC container "
                                                 "publishes.")


class NearMpcConfig(Model):
    """The NEAR MPC launcher (seed 003): measured launcher settings, unmeasured user config."""

    launcher_image: str = Field(description="Key of dstack-fleet:containers: the launcher image.")
    mpc_image: str = Field(description="Key of dstack-fleet:containers: the MPC node image it may start.")
    launcher: Literal["python", "rust"] = Field("python", description="Launcher implementation (decides the "
                                                 "digest kind it compares and the user config format).")
    user_config: dict[str, str] = Field(default_factory=dict, description="python launcher: unmeasured user config "
                                        "(MPC_IMAGE_NAME, MPC_IMAGE_TAGS, MPC_REGISTRY, MPC_HASH_OVERRIDE, MPC_*).")
    launcher_config: NearLauncherSettings = Field(default_factory=NearLauncherSettings, description="rust "
                                                  "launcher: [launcher_config] of its TOML user config.")
    node_config: dict[str, Any] = Field(default_factory=dict, description="rust launcher: [mpc_node_config], "
                                        "opaque to the launcher and passed to the MPC node (no secrets: it is "
                                        "host-readable).")


class KettleConfig(Model):
    """kettle (seed 002): the manifest and app hashes are measured compose values."""

    launcher_image: str = Field(description="Key of dstack-fleet:containers: the kettle launcher image.")
    manifest_url: str = Field(description="https URL of manifest.json.")
    manifest_sha256: Sha256Hex = Field(description="SHA-256 of the manifest bytes.")
    app_url: str = Field(description="URL of the app the manifest names.")
    app_sha256: Sha256Hex = Field(description="SHA-256 of the app source.")
    port: Port = Field(3001, description="Port kettle listens on.")


class VmmTarget(Model):
    """A dstack VMM host (vmm-cli.py's HTTP API)."""

    url: Url = Field(description="VMM RPC URL (https in prod; the credential goes in tokenSecret).")
    image: Annotated[str, _regex(grammar.VMM_IMAGE, "an image name on the VMM host such as dstack-0.5.11")] = Field(
        description="dstack OS image name on the host, e.g. dstack-0.5.11.")
    vcpu: int = Field(2, ge=1, description="vCPUs (measured in RTMR0).")
    memory_mb: int = Field(4096, ge=512, description="Memory in MB (measured).")
    disk_gb: int = Field(20, ge=1, description="Data disk in GB.")
    ports: list[str] = Field(default_factory=list, description="Port forwards 'tcp:host:guest'.")
    gateway_urls: list[Url] = Field(default_factory=list, description="Gateway URLs.")
    token_secret: SecretName | None = Field(
        None, description="dstack-fleet:secrets entry with the VMM credential: 'user:password' (HTTP Basic, what "
        "vmm-cli.py sends) or a bearer token.")
    api_version: str = Field("0.5.11", pattern=r"^[0-9]+\.[0-9]+\.[0-9]+$",
                             description="dstack version of the VMM host (decides the update call).")
    trusted_kms_signers: list[Annotated[str, _regex(grammar.SECP256K1_COMPRESSED,
                                                    "a compressed secp256k1 public key (0x02.. or 0x03.., 33 bytes)")]] = Field(
        default_factory=list, description="Compressed secp256k1 keys (0x…) the KMS env key must be signed by; empty "
        "accepts any signer, as vmm-cli.py does with an empty whitelist.")


class PhalaTarget(Model):
    """Phala Cloud through the phala CLI."""

    node_id: int | None = Field(None, description="Node to deploy on.")
    kms: Literal["phala", "ethereum", "base"] = Field("phala", description="KMS of the app.")
    instance_type: Annotated[str, _regex(grammar.PHALA_INSTANCE_TYPE, "a Phala instance type such as tdx.small")] = \
        Field("tdx.small", description="Phala instance type.")
    gateway_domain: Annotated[str, _check(grammar.hostname_problem)] = Field(
        description="Gateway base domain, e.g. dstack-pha-prod8.phala.network.")
    api_key_secret: SecretName = Field(description="dstack-fleet:secrets entry with the Phala API key.")
    ports: list[Port] = Field(default_factory=list, description="Ports served through the gateway.")
    public_images: bool = Field(False, description="Push this app's built containers to the bootstrap's public-read "
                                "repository, the only registry of ours Phala Cloud can pull from (anyone can then "
                                "pull them: opt in only for images whose contents may be public). Needs "
                                "dstack-fleet:registry.publicAppImages in the bootstrap stack.")


class VerifyConfig(Model):
    """After each deploy, fetch the app's attestation and check it against the plan (off unless set)."""

    info_url: Url = Field(description="URL of the guest agent's Info response "
                          "(JSON with tcb_info), e.g. the app's guest-agent port through the dstack gateway.")
    quote_url: Url | None = Field(None,
                                  description="URL of a GetQuote response (needed: the check always verifies the "
                                              "quote's signature, TCB status and registers).")


class AppConfig(Model):
    """A dstack app: its compose, its identity, and where it runs."""

    name: Annotated[str, _pattern(r"[a-z]([a-z0-9-]{0,38}[a-z0-9])?", "an app name (1-40 chars: a-z, 0-9, '-')")] = Field(
        description="App name; the app-compose name is '<name>-<stack>' so environments never share an identity.")
    kind: Literal["compose", "near-mpc", "kettle"] = Field("compose", description="How the compose is made.")
    target: Literal["gce", "vmm", "phala"] = Field(description="gce: a DstackNode group; vmm: a dstack VMM "
                                                   "host; phala: Phala Cloud.")
    nodes: ShortName | None = Field(None, description="gce target: the kind: dstack node group that runs it.")
    dstack_version: Annotated[str, _pattern(r"[0-9]+\.[0-9]+\.[0-9]+(\.[a-z0-9]+)?", "a dstack version such as "
                                            "0.5.11")] = Field(
        "0.5.11", description="dstack guest version whose app-compose format to write.")
    key_provider: Literal["none", "local", "kms"] = Field(
        description="Where keys come from. Unless kms.appId pins it, the app-id is the compose hash's first 20 "
        "bytes, with or without a KMS (identity 'compose': any compose change is a new identity); a pinned "
        "kms.appId keeps it (identity 'pinned').")
    kms: KmsSettings | None = Field(None, description="KMS settings (key provider kms).")
    docker_hub: Literal["mirror", "direct"] = Field(
        "mirror", description="gce target: pull Docker Hub images through the bootstrap's Docker Hub mirror "
        "(mirror) or straight from Docker Hub (direct). Either is named in the measured compose, so switching "
        "changes the compose-hash (and a derived app identity).")
    gateway_urls: list[Url] = Field(default_factory=list, description="gce target: dstack gateway URLs "
                                    "(.sys-config.json; not measured).")
    stateful: bool = Field(True, description="The app keeps data under its keys; prod refuses identity changes.")
    compose_file: RepoPath | None = Field(None, description="A docker-compose file taken verbatim (its bytes are "
                                          "measured).")
    services: list[ServiceConfig] = Field(default_factory=list, description="Or: services to generate it from.")
    near_mpc: NearMpcConfig | None = Field(None, description="kind near-mpc.")
    kettle: KettleConfig | None = Field(None, description="kind kettle.")
    settings: AppSettings = Field(default_factory=AppSettings, description="app-compose.json settings.")
    secret_env: dict[EnvName, SecretName] = Field(
        default_factory=dict, description="Env vars from dstack-fleet:secrets, delivered encrypted (needs kms).")
    user_config: Argument | None = Field(None, description="Unmeasured .user-config text (host-controlled).")
    vmm: VmmTarget | None = Field(None, description="vmm target settings.")
    phala: PhalaTarget | None = Field(None, description="phala target settings.")
    verify: VerifyConfig | None = Field(None, description="Optional post-deploy check of the app's attestation "
                                        "against its expected measurements.")


class RecipeHost(Model):
    machine_type: MachineTypeName | None = Field(None, description="Build host machine type (default per recipe).")
    disk_gb: int | None = Field(None, ge=50, le=65536, description="Build disk size in GB (default per recipe).")
    disk_type: Literal["pd-ssd", "pd-balanced"] = Field("pd-ssd", description="Build disk type.")
    timeout_minutes: int | None = Field(None, ge=10, description="How long a started build may run before `python -m fleet collect` gives it up (its host is deleted, the failure recorded).")


class BuildHostConfig(Model):
    """images stack: the ephemeral VMs that build images (no SSH, no external address)."""

    boot_image: GceImageLink = Field(description="Build host boot image, pinned by self link (a family moves).")
    zone: Zone | None = Field(None, description="Zone of the build hosts (default: <gcp:region>-a).")
    poll_seconds: int = Field(60, ge=5, description="Unused: builds are collected by `python -m fleet collect` (kept so existing stack files stay valid).")
    recipes: dict[Literal["tplus-overlay", "dstack-os"], RecipeHost] = Field(
        default_factory=dict, description="Per-recipe sizing.")

    @model_validator(mode="after")
    def _timeouts_outlast_polls(self) -> "BuildHostConfig":
        # fleet.images.buildscript.settings_problems refuses this inside the program; say it here
        short = sorted(name for name, host in self.recipes.items()
                       if host.timeout_minutes is not None and host.timeout_minutes * 60 < self.poll_seconds)
        if short:
            raise ValueError(f"recipes.{short[0]}.timeoutMinutes must be longer than pollSeconds "
                             f"({self.poll_seconds} s)")
        return self


class PolicyConfig(Model):
    """How the policy rules apply to this stack (the defaults follow the tier)."""

    enforcement: dict[str, Annotated[Literal["mandatory", "advisory", "disabled"], _allowed_in_prod(
            "disabled", "prod never disables a policy rule (every rule is mandatory there); fix what it reports, or "
            "allow the one thing it refuses through the rule's own setting")]] = Field(
        default_factory=dict,
        description="Per rule name, override the tier's enforcement (mandatory in staging and prod, advisory "
        "in dev).")
    public_ports: list[Port] = Field(
        default_factory=list, description="Ports the no-open-ingress rule allows from 0.0.0.0/0 (in addition to "
        "dstack-fleet:network.publicIngress).")
    allowed_images: list[GceImageLink] = Field(
        default_factory=list, description="External GCE images (by self link) nodes may boot besides this "
        "stack's own TDX-capable images.")


class TdxOverrides(Model):
    """Additions to the built-in TDX zone and machine-type lists (see fleet/gcp/tdx.py for their source)."""

    extra_zones: list[Zone] = Field(default_factory=list, description="Zones to accept beyond the built-in list.")
    extra_machine_types: list[MachineTypeName] = Field(
        default_factory=list, description="Machine types to accept beyond the built-in list."
    )


class FleetConfig(Model):
    """Everything under ``dstack-fleet:``."""

    role: Role = Field(description="Which part of the system this stack owns: bootstrap, images or env.")
    tier: Tier | None = Field(
        None,
        description="Safety tier of an env stack: dev, staging or prod. prod protects data disks and "
        "addresses and refuses unsafe settings; staging and prod make policies mandatory.",
    )
    name_prefix: ShortName = Field("fleet", description="Prefix of every GCP resource name.")
    labels: Annotated[dict[LabelKey, LabelValue], AfterValidator(_no_program_labels)] = Field(
        default_factory=dict, description="Extra labels on every node (keys the program sets are refused)."
    )
    network: NetworkConfig | None = Field(None, description="The stack's VPC (env and images stacks).")
    images: dict[ImageKey, ImageSource] = Field(
        default_factory=dict,
        description="Image versions by key. A version stays declared while any node uses it; the plan "
        "lists versions no node uses so they can be removed deliberately.",
    )
    nodes: list[NodeGroup] = Field(default_factory=list, description="Node groups (env stacks).")
    overlay: OverlayConfig | None = Field(None, description="The overlay of the stack's overlay nodes.")
    containers: dict[ImageKey, ContainerSource] = Field(
        default_factory=dict, description="Container images apps run, by key: external by digest, or built.")
    apps: list[AppConfig] = Field(default_factory=list, description="dstack apps (env stacks).")
    bootstrap: BootstrapRef | None = Field(
        None, description="env and images stacks: the bootstrap project whose registry, buckets and keys they "
        "use. Every name there is derived from it, so nothing is copied by hand.")
    environments: dict[ShortName, EnvironmentRef] = Field(
        default_factory=dict, description="bootstrap stack: the env stacks and their projects.")
    images_project: ProjectId | None = Field(
        None, description="bootstrap stack: project of the images stack (build hosts).")
    github: GithubConfig | None = Field(None, description="bootstrap stack: the repository CI runs from.")
    registry: RegistryConfig = Field(default_factory=RegistryConfig,
                                     description="bootstrap stack: Artifact Registry cleanup.")
    policy: PolicyConfig = Field(default_factory=PolicyConfig, description="Policy rule settings.")
    build_for: list[ShortName] = Field(
        default_factory=list, description="images stack: the env stacks whose declared images and containers it "
        "builds (their stack files are read from this repository).")
    build_host: BuildHostConfig | None = Field(None, description="images stack: build host settings.")
    rollout: RolloutConfig = Field(default_factory=RolloutConfig, description="env stacks: `make rollout` "
                                   "settings (health wait, where each node's attestation is read).")
    gc: GcConfig = Field(default_factory=GcConfig, description="images and env stacks: garbage collection of "
                         "what no stack and no lock entry names any more (`make gc`).")
    adopt: dict[Annotated[str, _pattern(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}", "a logical resource name")],
                ImportId] = Field(
        default_factory=dict,
        description="Adopt resources created by hand: logical resource name -> import id (e.g. "
        "projects/P/zones/Z/disks/D). The next up imports them instead of creating new ones.")
    snapshots: Annotated[bool, _allowed_in_prod(False, "prod always snapshots its data disks daily; remove "
                                                "snapshots: false")] | None = Field(
        None, description="Daily snapshots of data disks (default: on in prod, off elsewhere).")
    tdx: TdxOverrides = Field(default_factory=TdxOverrides, description="Extend the TDX zone/machine lists.")
    secrets: dict[SecretName, SecretStr] = Field(
        default_factory=dict,
        description="Secret values, referenced by name elsewhere. Set with "
        "`pulumi config set --secret --path 'dstack-fleet:secrets.NAME'`.",
    )


class StackConfig(BaseModel):
    """A validated stack configuration."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    stack: str
    source: str
    gcp: GcpSettings
    fleet: FleetConfig

    @property
    def tier(self) -> str | None:
        return self.fleet.tier

    @property
    def is_prod(self) -> bool:
        return self.fleet.tier == "prod"

    def regions(self) -> list[str]:
        """Regions the stack runs in: the default region plus every node zone's region."""
        found = {self.gcp.region}
        for group in self.fleet.nodes:
            found.update(tdx.region_of(z.zone if isinstance(z, ZoneEntry) else z) for z in group.zones)
        return sorted(found)


# Top-level keys whose values may be secret (everything else must be plain).
SECRET_KEYS = {f"{NAMESPACE}:secrets"}
GCP_KEYS = ("project", "region")


MAX_VALUE_DEPTH = 32  # as fleet.config.stackfile bounds a stack file


def _depth(value: Any) -> int:
    """Nesting depth of lists and mappings, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, level)
            if level <= MAX_VALUE_DEPTH:
                stack.extend((child, level + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def decode_value(value: Any) -> Any:
    """Config values arrive as the CLI passes them: objects and lists JSON-encoded. ``ValueError``
    when a value is nested deeper than any configuration is (it would exhaust the validator)."""
    if isinstance(value, str) and value[:1] in ("{", "["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return value
        except RecursionError:
            raise ValueError(f"is nested more than {MAX_VALUE_DEPTH} levels deep") from None
    if _depth(value) > MAX_VALUE_DEPTH:
        raise ValueError(f"is nested more than {MAX_VALUE_DEPTH} levels deep")
    return value


def parse(
    raw: dict[str, Any],
    *,
    stack: str,
    source: str,
    secret_keys: frozenset[str] | set[str] = frozenset(),
) -> StackConfig:
    """The schema's view of a stack's config; raise ``ConfigError`` with every problem the schema
    finds. Checks that need a domain run after this, from ``fleet.stacks.load``."""
    problems: list[Problem] = []
    fleet_raw: dict[str, Any] = {}
    gcp_raw: dict[str, Any] = {}
    fleet_keys = known_keys(FleetConfig)

    for key in sorted(raw):
        namespace, sep, name = key.partition(":")
        if not sep or not name:
            problems.append(
                Problem(source, key, f"config keys are 'namespace:key'; did you mean '{NAMESPACE}:{key}'?")
            )
            continue
        try:
            value = decode_value(raw[key])
        except ValueError as exc:
            problems.append(Problem(source, key, str(exc)))
            continue
        if namespace == NAMESPACE:
            if name not in fleet_keys:
                problems.append(Problem(source, key, _unknown_top_level(name, fleet_keys)))
                continue
            if key in secret_keys and key not in SECRET_KEYS:
                problems.append(
                    Problem(
                        source,
                        key,
                        "is stored as a secret, which would hide it from every plan and diff; keep it "
                        f"plain and put secret values under {NAMESPACE}:secrets",
                    )
                )
                continue
            fleet_raw[name] = value
        elif namespace == "gcp":
            if name in GCP_KEYS:
                gcp_raw[name] = value
            else:
                close = [k for k in GCP_KEYS if _close(name, k)]
                if close:
                    problems.append(
                        Problem(source, key, f"not a key this program reads; did you mean 'gcp:{close[0]}'?")
                    )
        elif _close(namespace, NAMESPACE):
            problems.append(
                Problem(source, key, f"unknown namespace {namespace!r}; did you mean '{NAMESPACE}:{name}'?")
            )

    gcp = fleet = None
    try:
        gcp = GcpSettings.model_validate(gcp_raw)
    except ValidationError as exc:
        problems += problems_from(exc, root=GcpSettings, source=source, prefix="gcp:")
    tdx_raw = fleet_raw.get("tdx") if isinstance(fleet_raw.get("tdx"), dict) else {}

    def strings(key: str) -> list[str]:
        value = tdx_raw.get(key)
        return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []

    context = {
        "extra_zones": strings("extraZones"),
        "extra_machine_types": strings("extraMachineTypes"),
        "tier": fleet_raw.get("tier"),
    }
    try:
        fleet = FleetConfig.model_validate(fleet_raw, context=context)
    except ValidationError as exc:
        problems += problems_from(
            exc,
            root=FleetConfig,
            source=source,
            prefix=f"{NAMESPACE}:",
            secret_paths=tuple(SECRET_KEYS),
        )
    if problems or gcp is None or fleet is None:
        raise ConfigError(problems)

    return StackConfig(stack=stack, source=source, gcp=gcp, fleet=fleet)


def _unknown_top_level(name: str, fleet_keys: list[str]) -> str:
    match = difflib.get_close_matches(name, fleet_keys, n=1, cutoff=0.6)
    if match:
        return f"unknown key; did you mean '{NAMESPACE}:{match[0]}'?"
    return f"unknown key; known keys: {', '.join(f'{NAMESPACE}:{k}' for k in sorted(fleet_keys))}"


def _close(word: str, target: str) -> bool:
    return word != target and difflib.SequenceMatcher(None, word.lower(), target.lower()).ratio() >= 0.75

