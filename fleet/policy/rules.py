"""Policy rules: pure functions over a normalized view of resources, with two adapters.

A rule never sees Pulumi objects. It sees ``ResourceView``s: type, name, URN, the inputs as plain
values (secrets unwrapped, the paths that were secret listed when the source can tell; values a
preview cannot know are ``fleet.values.UNKNOWN``), the resource options the source can see, and the
parent type chain taken from the URN (``a$b$type``), which the offline harness and the real engine
form the same way. A rule returns ``Finding``s:

* ``violation``: enforced at the rule's level (mandatory in staging and prod and in stacks without a
  tier, advisory in dev; ``dstack-fleet:policy.enforcement`` overrides it, ``disabled`` turns it off);
* ``could-not-run``: a value the rule needs is unknown in this preview, so it did not pass either;
  always advisory;
* ``pending``: a node boots an image that is still a pending build; always advisory.

Messages name the input path and the problem, never a property value.

Adapters:

* offline, ``evaluate(registrations, context)``: the plan's violation dicts (``fleet plan``);
* CrossGuard, ``crossguard_policies()``: ``pulumi_policy`` policy objects for the pack under
  ``policies/`` (``pulumi preview --policy-pack policies --policy-pack-config <pack_config(...)>``).
  The engine cannot show a policy whether a value is secret, nor ``retainOnDelete`` or
  ``replaceOnChanges``: rules and checks that need them are *offline-only* and say so.
  "Could not run" is reported the way the engine reports an unknown value (``UnknownValueError``:
  an advisory "can't run policy ... during preview").
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import yaml

from fleet.gcp import tdx
from fleet.gcp.naming import public_repository_id
from fleet.apps.imageref import InvalidImageReference, find_image_references, parse_image_ref, unpinned_reason
from fleet.config.problems import ConfigError, Problem
from fleet.config.values import UNKNOWN, Secret

PACK_NAME = "dstack-fleet"

STACK_TYPE = "pulumi:pulumi:Stack"
INSTANCE = "gcp:compute/instance:Instance"
IMAGE = "gcp:compute/image:Image"
FIREWALL = "gcp:compute/firewall:Firewall"
DISK = "gcp:compute/disk:Disk"
ADDRESS = "gcp:compute/address:Address"
BUCKET_OBJECT = "gcp:storage/bucketObject:BucketObject"
LOCAL_COMMAND = "command:local:Command"
REMOTE_COMMAND = "command:remote:Command"
NODE_TYPES = ("dstack-fleet:nodes:OverlayNode", "dstack-fleet:nodes:DstackNode")
BUILD_HOST_TYPE = "dstack-fleet:images:BuildHost"
GCP_IMAGE_TYPE = "dstack-fleet:images:GcpImage"

# components.tdxnode.PENDING_IMAGE: the boot image of a node whose image is not built yet
PENDING_IMAGE = "pending build"
# Marks a measurement export uses for values not known yet: fleet.measure.MARKERS, the "reported
# by ..." values of apps whose service computes them after deploy, and "no measurement profile ..."
# where no profile can compute them for that release yet (fleet.expectations).
MEASUREMENT_MARKS = ("pending build", "known at boot")
PENDING_MARK_PREFIXES = ("reported by ", "no measurement profile")

REQUIRED_IMAGE_FEATURES = ("GVNIC", "TDX_CAPABLE", "UEFI_COMPATIBLE")
CLOUD_PLATFORM_SCOPES = ("https://www.googleapis.com/auth/cloud-platform", "cloud-platform")
WORLD_RANGES = ("0.0.0.0/0", "::/0")
PEER_METADATA_KEYS = ("overlay-genesis", "overlay-peers", "overlay-setup", "overlay-setup-founding")
# The signed overlay member table and its signature (fleet.nodes.membertable): signed at deploy, so
# unknown in a preview, and strictly parsed by the node (no keyword can carry an image reference).
SIGNED_TABLE_KEYS = (("metadata", "overlay-table"), ("metadata", "overlay-table-signature"))
_DEFAULT_COMPUTE_ACCOUNT = re.compile(r"[0-9]+-compute@developer\.gserviceaccount\.com")
_IMAGE_LINK = re.compile(
    r"(?:https://(?:www|compute)\.googleapis\.com/compute/(?:v1|beta)/)?"
    r"(?:projects/(?P<project>[a-z][a-z0-9-]{4,28}[a-z0-9])/)?global/images/(?P<name>[a-z]([-a-z0-9]*[a-z0-9])?)"
)
_HEX40 = re.compile(r"[0-9a-f]{40}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_IMAGE_ID = re.compile(r"sha256:[0-9a-f]{64}")
_VARIABLE = re.compile(r"\$\{|\$[A-Za-z_]|\{\{|<<?[A-Za-z_][\w.-]*>>?")

LEVELS = ("mandatory", "advisory", "disabled")
Path = tuple[str | int, ...]


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


MISSING = _Missing()


def render_path(path: Sequence[str | int]) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + part
    return out or "(inputs)"


def split_urn(urn: str) -> tuple[str, str, tuple[str, ...], str]:
    """``urn:pulumi:<stack>::<project>::<a$b$type>::<name>`` -> stack, project, type chain, name."""
    parts = urn.split("::")
    if len(parts) < 4 or not parts[0].startswith("urn:pulumi:"):
        raise ValueError(f"not a Pulumi URN: {urn}")
    return parts[0][len("urn:pulumi:"):], parts[1], tuple(parts[2].split("$")), "::".join(parts[3:])


def stack_urn(stack: str, project: str) -> str:
    return f"urn:pulumi:{stack}::{project}::{STACK_TYPE}::{project}-{stack}"


# ---------------------------------------------------------------------------------------------
# The normalized view


@dataclass(frozen=True)
class ResourceView:
    """One resource as every rule sees it, whichever adapter built it."""

    urn: str
    type: str
    name: str
    inputs: Mapping[str, Any]
    secret_paths: frozenset[Path] | None = None  # None: the source cannot tell (CrossGuard)
    options: Mapping[str, Any] = field(default_factory=dict)  # only the options the source can see
    dependencies: tuple[str, ...] = ()
    property_dependencies: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def parent_types(self) -> tuple[str, ...]:
        """Types of the enclosing components, outermost first (from the URN's type chain)."""
        return split_urn(self.urn)[2][:-1]

    def under(self, *types: str) -> bool:
        return any(t in self.parent_types for t in types)

    def get(self, *path: str | int) -> Any:
        value: Any = self.inputs
        for part in path:
            if value is UNKNOWN:
                return UNKNOWN
            if isinstance(part, int):
                if not isinstance(value, list) or not -len(value) <= part < len(value):
                    return MISSING
                value = value[part]
            else:
                if not isinstance(value, Mapping) or part not in value:
                    return MISSING
                value = value[part]
        return value

    def is_secret(self, path: Sequence[str | int]) -> bool | None:
        if self.secret_paths is None:
            return None
        path = tuple(path)
        return any(path[:n] in self.secret_paths for n in range(len(path) + 1))

    def sees(self, option: str) -> bool:
        return option in self.options

    def labels(self) -> Mapping[str, Any]:
        labels = self.get("labels")
        return labels if isinstance(labels, Mapping) else {}


@dataclass(frozen=True)
class PlanView:
    resources: tuple[ResourceView, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_urn", {r.urn: r for r in self.resources})

    def find(self, urn: str) -> ResourceView | None:
        return self._by_urn.get(urn)  # type: ignore[attr-defined]

    def of_type(self, type_: str) -> list[ResourceView]:
        return [r for r in self.resources if r.type == type_]


def walk(value: Any, path: Path = ()) -> Iterator[tuple[Path, Any]]:
    """Every leaf under ``value`` with its path (dicts and lists are descended, nothing else)."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            yield from walk(item, path + (str(key),))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from walk(item, path + (i,))
    else:
        yield path, value


def _unwrap_secrets(value: Any, path: Path, secrets: set[Path]) -> Any:
    if isinstance(value, Secret):
        secrets.add(path)
        return _unwrap_secrets(value.value, path, secrets)
    if isinstance(value, Mapping):
        return {k: _unwrap_secrets(v, path + (k,), secrets) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_unwrap_secrets(v, path + (i,), secrets) for i, v in enumerate(value)]
    return value


def view_from_registration(registration: Any) -> ResourceView:
    """The offline view of a ``fleet.harness.Registration`` (preview pass)."""
    secrets: set[Path] = set()
    inputs = _unwrap_secrets(registration.inputs, (), secrets)
    return ResourceView(
        urn=registration.urn, type=registration.type, name=registration.name, inputs=inputs,
        secret_paths=frozenset(secrets),
        options={k: registration.options.get(k) for k in ("protect", "retainOnDelete", "deleteBeforeReplace",
                                                          "ignoreChanges", "replaceOnChanges")},
        dependencies=tuple(registration.dependencies),
        property_dependencies={k: tuple(v) for k, v in registration.property_dependencies.items()},
    )


# ---------------------------------------------------------------------------------------------
# Findings, context, rules


@dataclass(frozen=True)
class Finding:
    urn: str
    message: str
    status: Literal["violation", "could-not-run", "pending"] = "violation"
    offline_only: bool = False


def _violation(view: ResourceView, message: str, *, offline_only: bool = False) -> Finding:
    return Finding(view.urn, message, "violation", offline_only)


def _could_not_run(view: ResourceView, path: Sequence[str | int], why: str = "") -> Finding:
    return Finding(view.urn, f"{render_path(path)} is not known in this preview{why}", "could-not-run")


@dataclass(frozen=True)
class RuleContext:
    """What a rule may know about the stack besides its resources."""

    tier: str | None = None
    enforcement: Mapping[str, str] = field(default_factory=dict)
    public_ports: frozenset[int] = frozenset()
    allowed_images: tuple[str, ...] = ()
    external_ip_groups: frozenset[str] = frozenset()
    extra_machine_types: tuple[str, ...] = ()
    public_repositories: frozenset[str] = frozenset()  # repositories anyone may read (bootstrap opt-in)
    outputs: Mapping[str, Any] | None = None  # stack outputs (None: not available)
    measurements: Mapping[str, Any] | None = None  # the plan's measurements (None: from outputs)
    stack_urn: str = ""

    @property
    def prod(self) -> bool:
        return self.tier == "prod"

    def level(self, rule: str) -> str:
        return self.enforcement.get(rule, default_level(self.tier))


def default_level(tier: str | None) -> str:
    """mandatory everywhere except dev (stacks without a tier, images and bootstrap, are mandatory)."""
    return "advisory" if tier == "dev" else "mandatory"


@dataclass(frozen=True)
class Rule:
    """A rule: ``check(view, context)`` per resource (``scope="resource"``) or
    ``check(plan, context)`` over the whole stack (``scope="stack"``: it needs other resources,
    such as the image a node boots, or the stack outputs)."""

    name: str
    description: str
    remediation: str
    applies_to: str
    scope: Literal["resource", "stack"]
    check: Callable[..., Iterable[Finding]]
    offline_only: bool = False
    partly_offline: str = ""  # the part only the offline plan can check
    config_keys: tuple[str, ...] = ()

    def findings(self, plan: PlanView, context: RuleContext) -> list[Finding]:
        if self.scope == "stack":
            return list(self.check(plan, context))
        return [f for view in plan.resources for f in self.check(view, context)]


# ---------------------------------------------------------------------------------------------
# pinned-digests


def pin_problem(reference: Any) -> str | None:
    """Why an image reference is not pinned by ``@sha256:<64 lower-case hex>``, in words that
    never repeat the reference; None when it is pinned."""
    if not isinstance(reference, str):
        return "is not a string"
    if unpinned_reason(reference) is None:
        return None
    if _VARIABLE.search(reference):
        return "is filled in from a variable at deploy time"
    if "@" in reference:
        return "has a digest that is not sha256 with 64 lower-case hex digits"
    try:
        ref = parse_image_ref(reference)
    except InvalidImageReference:
        return "is not a valid image reference"
    if ref.tag is not None:
        return "is pinned only by a tag, which can move"
    return "has neither tag nor digest, so it means :latest"


# fields that hold exactly one image reference the resource runs or pulls
_DOCKER_IMAGE_FIELDS = {
    "docker:index/container:Container": ("image",),
    "docker:index/remoteImage:RemoteImage": ("name",),
}
# where a build pushes: a registry stores a push under a tag, never under a digest it has not
# computed yet, so these need a tag (not the implicit :latest); what consumers pull is the pushed
# digest (repoDigest, recorded in images.lock.json)
_DOCKER_PUSH_FIELDS = {
    "docker:index/image:Image": ("imageName",),
    "docker:index/registryImage:RegistryImage": ("name",),
}
# inputs where image references are expected, so an unknown value there means "could not run"
_IMAGE_BEARING = {
    INSTANCE: (("metadata",), ("metadataStartupScript",)),
    "gcp:compute/instanceTemplate:InstanceTemplate": (("metadata",), ("metadataStartupScript",)),
    LOCAL_COMMAND: (("create",), ("update",), ("delete",), ("environment",), ("stdin",)),
    REMOTE_COMMAND: (("create",), ("update",), ("delete",), ("environment",), ("stdin",)),
    BUCKET_OBJECT: (("content",),),
}
_STRUCTURED_HINTS = ("services", "docker_compose_file")


def _parse_document(text: str) -> Any:
    if not any(hint in text for hint in _STRUCTURED_HINTS):
        return None
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        return yaml.safe_load(text)
    except (yaml.YAMLError, ValueError):
        return None


def image_problems_in_text(text: str, where: str, *, depth: int = 0) -> list[tuple[str, str]]:
    """``(where, problem)`` for every unpinned image reference in ``text``: compose and app-compose
    documents by structure (``services.*.image``, ``build:``, ``docker_compose_file``), anything
    else by ``fleet.imageref.find_image_references``."""
    document = _parse_document(text) if depth < 4 else None
    if isinstance(document, Mapping):
        compose = document.get("docker_compose_file")
        services = document.get("services")
        if isinstance(compose, str) or isinstance(services, Mapping):
            return _document_problems(document, where, depth)
    out = []
    for mention in find_image_references(text):
        problem = pin_problem(mention.text)
        if problem:
            out.append((where, problem))
    return out


def _document_problems(document: Mapping[str, Any], where: str, depth: int) -> list[tuple[str, str]]:
    """Services are named by position (``service #1``): their names are part of the value."""
    out: list[tuple[str, str]] = []
    skip: set[Path] = set()
    compose = document.get("docker_compose_file")
    if isinstance(compose, str):
        out += image_problems_in_text(compose, f"{where} (app-compose docker_compose_file)", depth=depth + 1)
        skip.add(("docker_compose_file",))
    services = document.get("services")
    position: dict[str, int] = {}
    if isinstance(services, Mapping):
        for number, (name, service) in enumerate(services.items(), start=1):
            position[str(name)] = number
            if not isinstance(service, Mapping):
                continue
            at = f"{where} (compose service #{number}"
            if "build" in service:
                out.append((f"{at} build)", "is a compose build:, which builds the image from sources no digest pins"))
            if "image" in service:
                skip.add(("services", str(name), "image"))
                problem = pin_problem(service["image"])
                if problem:
                    out.append((f"{at} image)", problem))
            skip |= {("services", str(name), "build") + p for p, _ in walk(service.get("build"))}
    for path, value in walk(document):
        if isinstance(value, str) and path not in skip:
            shown = path
            if len(path) > 1 and path[0] == "services" and str(path[1]) in position:
                shown = (f"service #{position[str(path[1])]}",) + path[2:]
            out += image_problems_in_text(value, f"{where} ({render_path(shown)})", depth=depth + 1)
    return out


def _group_problems(view: ResourceView, problems: list[tuple[Path, str, str]]) -> list[Finding]:
    by_where: dict[str, list[str]] = {}
    for path, where, problem in problems:
        if view.is_secret(path):
            where = f"a secret value at {render_path(path)}"
        by_where.setdefault(where, []).append(problem)
    out = []
    for where, found in sorted(by_where.items()):
        kinds = "; ".join(sorted(set(found)))
        if len(found) == 1:
            message = f"the image reference in {where} {kinds}"
        else:
            message = f"{len(found)} image references in {where} are not pinned ({kinds})"
        out.append(_violation(view, message + "; pin every image as name@sha256:<64 hex>"))
    return out


def _push_problem(value: Any) -> str | None:
    problem = pin_problem(value)
    if problem is None or problem == "is pinned only by a tag, which can move":
        return None  # a tag is what a push can name; consumers use the pushed digest
    return problem.replace("so it means :latest", "so the build pushes :latest")


def check_pinned_digests(view: ResourceView, context: RuleContext) -> Iterator[Finding]:
    pulled = {(f,) for f in _DOCKER_IMAGE_FIELDS.get(view.type, ())}
    pushed = {(f,) for f in _DOCKER_PUSH_FIELDS.get(view.type, ())}
    direct = pulled | pushed
    problems: list[tuple[Path, str, str]] = []
    for path in sorted(direct):
        value = view.get(*path)
        if value is UNKNOWN:
            yield _could_not_run(view, path, ", so the image it names cannot be checked")
        elif value is not MISSING and value is not None:
            if path in pushed:
                problem = _push_problem(value)
            else:
                problem = None if (isinstance(value, str) and _IMAGE_ID.fullmatch(value)) else pin_problem(value)
            if problem:
                problems.append((path, render_path(path), problem))
    bearing = _IMAGE_BEARING.get(view.type, ())
    unknown_reported = False
    for path, value in walk(view.inputs):
        if path in direct:
            continue
        if value is UNKNOWN:
            if view.type == INSTANCE and tuple(path[:2]) in SIGNED_TABLE_KEYS:
                continue
            if not unknown_reported and any(path[:len(b)] == b for b in bearing):
                unknown_reported = True
                yield _could_not_run(view, path, ", so image references in it cannot be checked")
            continue
        if isinstance(value, str) and value:
            problems += [(path, where, p) for where, p in image_problems_in_text(value, render_path(path))]
    yield from _group_problems(view, problems)


# ---------------------------------------------------------------------------------------------
# pinned-build-inputs


def image_link_problem(link: str) -> str | None:
    """Why a boot/source image link is not pinned to one image; None when it names one image."""
    if "family/" in link:
        return "names an image family, which moves to newer images; pin the image by self link"
    if not _IMAGE_LINK.fullmatch(link):
        return ("is not an image self link (projects/P/global/images/NAME); the short forms may name a "
                "family, which moves")
    return None


def _this_plans_images(plan: PlanView, view: ResourceView, prop: str) -> list[ResourceView]:
    urns = view.property_dependencies.get(prop, ())
    return [r for r in (plan.find(u) for u in urns) if r is not None and r.type == IMAGE]


def _boot_image_findings(plan: PlanView, view: ResourceView) -> Iterator[Finding]:
    path = ("bootDisk", "initializeParams", "image")
    link = view.get(*path)
    if link is MISSING or link is None:
        return  # booting an existing disk: the disk's own image is not this resource's input
    if link is UNKNOWN:
        if not _this_plans_images(plan, view, "bootDisk"):
            yield _could_not_run(view, path, " and it comes from no image of this stack")
        return
    if not isinstance(link, str) or link.startswith(PENDING_IMAGE):
        return
    problem = image_link_problem(link)
    if problem:
        yield _violation(view, f"the boot image ({render_path(path)}) {problem}")


_SCRIPT_ASSIGNMENT = re.compile(r"^readonly (?P<name>[A-Z][A-Z0-9_]*)=(?P<value>.*)$", re.MULTILINE)
_SCRIPT_VALUES = ("UPSTREAM_COMMITS", "GUEST_KIND", "GUEST_COMMIT", "GUEST_SHA256", "RECIPE")


def build_script_values(script: str) -> dict[str, list[str]]:
    """The single-line ``readonly NAME=value`` / ``readonly NAME=(a b)`` assignments of a generated
    build script (``fleet.buildscript``) that pin its inputs."""
    out: dict[str, list[str]] = {}
    for match in _SCRIPT_ASSIGNMENT.finditer(script):
        name, value = match["name"], match["value"].strip()
        if name not in _SCRIPT_VALUES:
            continue
        if value.startswith("(") and value.endswith(")"):
            value = value[1:-1]
        try:
            out[name] = shlex.split(value)
        except ValueError:
            out[name] = [value]
    return out


def _build_script_findings(view: ResourceView) -> Iterator[Finding]:
    for path in (("metadata", "startup-script"), ("metadataStartupScript",)):
        script = view.get(*path)
        if script is UNKNOWN:
            yield _could_not_run(view, path, ", so the build's pinned inputs cannot be checked")
            return
        if isinstance(script, str):
            break
    else:
        yield _violation(view, "a build host without a startup script builds nothing this stack pinned; it "
                               "must run the generated build script")
        return
    where = render_path(path)
    values = build_script_values(script)
    commits = values.get("UPSTREAM_COMMITS")
    if not commits:
        yield _violation(view, f"the build script ({where}) declares no upstream commits; every upstream is "
                               "fetched at a full 40-hex commit SHA")
    elif not all(_HEX40.fullmatch(c) for c in commits):
        yield _violation(view, f"an upstream commit in the build script ({where}) is not a full 40-hex commit SHA; "
                               "branches and tags move")
    kind = (values.get("GUEST_KIND") or [""])[0]
    if kind == "source" and not all(_HEX40.fullmatch(c) for c in values.get("GUEST_COMMIT") or [""]):
        yield _violation(view, f"the guest source commit in the build script ({where}) is not a full 40-hex "
                               "commit SHA")
    if kind == "binary" and not all(_HEX64.fullmatch(c) for c in values.get("GUEST_SHA256") or [""]):
        yield _violation(view, f"the guest binary in the build script ({where}) carries no sha256 (64 "
                               "lower-case hex) to verify it against")
    if (values.get("RECIPE") or [""])[0] == "tplus-overlay" and kind not in ("source", "binary"):
        yield _violation(view, f"the build script ({where}) bakes a guest that is neither a pinned source "
                               "commit nor a binary with its sha256")


def check_pinned_build_inputs(plan: PlanView, context: RuleContext) -> Iterator[Finding]:
    for view in plan.resources:
        if view.type == INSTANCE:
            yield from _boot_image_findings(plan, view)
            if view.under(BUILD_HOST_TYPE):
                yield from _build_script_findings(view)
        elif view.type == IMAGE:
            source = view.get("sourceImage")
            if isinstance(source, str) and image_link_problem(source):
                yield _violation(view, f"sourceImage {image_link_problem(source)}")
            raw = view.get("rawDisk", "source")
            if raw is not MISSING and raw is not None:
                checks = [d for d in (plan.find(u) for u in view.dependencies)
                          if d is not None and d.type in (LOCAL_COMMAND, REMOTE_COMMAND)]
                if not checks:
                    yield _violation(view, "rawDisk.source is a storage object no integrity step checks before "
                                           "the image is made; create the image after the step that compares the "
                                           "object's generation and crc32c (or sha256) with images.lock.json")


# ---------------------------------------------------------------------------------------------
# tdx-only, image-features


def _features(view: ResourceView) -> Any:
    """The guest OS feature names of an image, or ``UNKNOWN``."""
    features = view.get("guestOsFeatures")
    if features is UNKNOWN:
        return UNKNOWN
    if not isinstance(features, list):
        return set()
    out = set()
    for item in features:
        kind = item.get("type") if isinstance(item, Mapping) else item
        if kind is UNKNOWN:
            return UNKNOWN
        if isinstance(kind, str):
            out.add(kind)
    return out


def normalize_image_link(link: str) -> str:
    match = _IMAGE_LINK.fullmatch(link)
    if not match:
        return link
    return f"projects/{match['project']}/global/images/{match['name']}" if match["project"] else \
        f"global/images/{match['name']}"


def _image_matches(image: ResourceView, link: str) -> bool:
    match = _IMAGE_LINK.fullmatch(link)
    if not match:
        return False
    self_link = image.get("selfLink")
    if isinstance(self_link, str) and normalize_image_link(self_link) == normalize_image_link(link):
        return True
    name, project = image.get("name"), image.get("project")
    if name != match["name"]:
        return False
    return match["project"] is None or not isinstance(project, str) or project == match["project"]


def _tdx_image_findings(plan: PlanView, view: ResourceView, context: RuleContext) -> Iterator[Finding]:
    path = ("bootDisk", "initializeParams", "image")
    link = view.get(*path)
    if link is UNKNOWN:
        images = _this_plans_images(plan, view, "bootDisk")
        if not images:
            yield _could_not_run(view, path, " and it comes from no image of this stack, so its TDX support "
                                             "cannot be checked")
    elif isinstance(link, str) and link.startswith(PENDING_IMAGE):
        yield Finding(view.urn, "boots a pending build of its image; its TDX support is checked once the build is "
                                "recorded in images.lock.json", "pending")
        return
    elif isinstance(link, str):
        if normalize_image_link(link) in {normalize_image_link(a) for a in context.allowed_images} \
                and not image_link_problem(link):
            return
        images = [i for i in plan.of_type(IMAGE) if _image_matches(i, link)]
        if not images:
            yield _violation(view, f"the boot image ({render_path(path)}) is neither an image this stack makes "
                                   "(with TDX_CAPABLE) nor listed in dstack-fleet:policy.allowedImages")
    else:
        yield _violation(view, f"{render_path(path)} is not set, so the instance boots no image this stack "
                               "vouches for")
        return
    for image in images:
        features = _features(image)
        if features is UNKNOWN:
            yield _could_not_run(view, path, ": the guestOsFeatures of its image are not known")
        elif "TDX_CAPABLE" not in features:  # type: ignore[operator]
            yield _violation(view, "boots an image of this stack whose guestOsFeatures lack TDX_CAPABLE")


def check_tdx_only(plan: PlanView, context: RuleContext) -> Iterator[Finding]:
    for view in plan.of_type(INSTANCE):
        if not view.under(*NODE_TYPES):
            continue
        expected = {("confidentialInstanceConfig", "confidentialInstanceType"): "TDX",
                    ("scheduling", "onHostMaintenance"): "TERMINATE"}
        for path, wanted in expected.items():
            value = view.get(*path)
            if value is UNKNOWN:
                yield _could_not_run(view, path)
            elif value != wanted:
                yield _violation(view, f"{render_path(path)} must be {wanted}")
        machine_type = view.get("machineType")
        if machine_type is UNKNOWN:
            yield _could_not_run(view, ("machineType",))
        elif not isinstance(machine_type, str) or tdx.machine_type_problem(
                machine_type.rsplit("/", 1)[-1], tuple(context.extra_machine_types)):
            yield _violation(view, "machineType cannot run a TDX guest (C3 standard/highcpu/highmem or a3-highgpu-1g, "
                                   "or a type listed in dstack-fleet:tdx.extraMachineTypes; no -lssd or -metal)")
        yield from _tdx_image_findings(plan, view, context)


def boot_images(plan: PlanView) -> list[ResourceView]:
    """The images this stack boots from: those ``GcpImage`` makes, and any image an instance's boot
    disk refers to (by dependency or by link). Images that only seed other disks (a data or
    configuration disk) are not boot images."""
    found = {v.urn: v for v in plan.of_type(IMAGE) if v.parent_types[-1:] == (GCP_IMAGE_TYPE,)}
    images = plan.of_type(IMAGE)
    for view in plan.of_type(INSTANCE):
        for image in _this_plans_images(plan, view, "bootDisk"):
            found[image.urn] = image
        link = view.get("bootDisk", "initializeParams", "image")
        if isinstance(link, str):
            found.update({i.urn: i for i in images if _image_matches(i, link)})
    return [found[u] for u in sorted(found)]


def check_image_features(plan: PlanView, context: RuleContext) -> Iterator[Finding]:
    for view in boot_images(plan):
        features = _features(view)
        if features is UNKNOWN:
            yield _could_not_run(view, ("guestOsFeatures",))
            continue
        missing = [f for f in REQUIRED_IMAGE_FEATURES if f not in features]
        if missing:
            yield _violation(view, f"guestOsFeatures lack {', '.join(missing)}")


# ---------------------------------------------------------------------------------------------
# no-open-ingress


def _port_range(spec: Any) -> tuple[int, int] | None:
    text = str(spec).strip()
    low, _, high = text.partition("-")
    try:
        return int(low), int(high or low)
    except ValueError:
        return None


def check_no_open_ingress(view: ResourceView, context: RuleContext) -> Iterator[Finding]:
    if view.type != FIREWALL:
        return
    direction = view.get("direction")
    if direction is UNKNOWN:
        yield _could_not_run(view, ("direction",))
        return
    if direction not in (MISSING, None, "INGRESS"):
        return
    allows = view.get("allows")
    if allows is UNKNOWN:
        yield _could_not_run(view, ("allows",))
        return
    if not isinstance(allows, list) or not allows:
        return  # a deny rule
    sources = {key: view.get(key) for key in ("sourceRanges", "sourceTags", "sourceServiceAccounts")}
    for key, value in sources.items():
        if value is UNKNOWN or (isinstance(value, list) and UNKNOWN in value):
            yield _could_not_run(view, (key,))
            return
    ranges = sources["sourceRanges"] if isinstance(sources["sourceRanges"], list) else []
    world = [r for r in ranges if isinstance(r, str) and r.strip() in WORLD_RANGES]
    no_source = not any(isinstance(v, list) and v for v in sources.values())
    if not world and not no_source:
        return
    undeclared = False
    for i, allow in enumerate(allows):
        if allow is UNKNOWN or not isinstance(allow, Mapping):
            yield _could_not_run(view, ("allows", i))
            return
        ports = allow.get("ports")
        if ports is UNKNOWN or (isinstance(ports, list) and UNKNOWN in ports):
            yield _could_not_run(view, ("allows", i, "ports"))
            return
        if not ports:
            undeclared = True  # every port of the protocol
            continue
        for spec in ports:
            bounds = _port_range(spec)
            if bounds is None or any(p not in context.public_ports for p in range(bounds[0], bounds[1] + 1)):
                undeclared = True
    if undeclared:
        source = "no source at all, which GCP reads as everyone" if no_source and not world else "the whole internet"
        yield _violation(view, f"an INGRESS allow rule open to {source} covers ports that are not declared public "
                               "(dstack-fleet:network.publicIngress or dstack-fleet:policy.publicPorts)")


# ---------------------------------------------------------------------------------------------
# hardened-instances


PUBLIC_PRINCIPALS = ("allUsers", "allAuthenticatedUsers")
PUBLIC_READ = ("gcp:artifactregistry/repositoryIamMember:RepositoryIamMember", "roles/artifactregistry.reader")


def _public_principals(view: ResourceView) -> list[str]:
    found = []
    for path, value in walk(view.inputs):
        if isinstance(value, str) and any(p in value for p in PUBLIC_PRINCIPALS) and path and path[0] in (
                "member", "members", "policyData", "bindings"):
            found.append(render_path(path))
    return found


def check_no_public_access(view: ResourceView, context: RuleContext) -> Iterator[Finding]:
    where = _public_principals(view)
    if not where:
        return
    repository = view.inputs.get("repository")
    if ((view.type, view.inputs.get("role")) == PUBLIC_READ and isinstance(repository, str)
            and repository in context.public_repositories and where == ["member"]
            and view.inputs.get("member") == "allUsers"):
        return  # reading the public app repository the bootstrap stack opted in to
    yield _violation(view, f"{', '.join(where)} grants access to everyone on the internet; the only public "
                           "grant allowed is reading the public app repository (dstack-fleet:registry.publicAppImages)")


def _truthy(value: Any) -> bool:
    return value is True or (isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "on", "y"))


def check_hardened_instances(view: ResourceView, context: RuleContext) -> Iterator[Finding]:
    if view.type != INSTANCE:
        return
    metadata = view.get("metadata")
    if metadata is UNKNOWN:
        yield _could_not_run(view, ("metadata",))
    else:
        metadata = metadata if isinstance(metadata, Mapping) else {}
        serial = metadata.get("serial-port-enable")
        if serial is UNKNOWN:
            yield _could_not_run(view, ("metadata", "serial-port-enable"))
        elif _truthy(serial):
            yield _violation(view, "metadata.serial-port-enable turns on the interactive serial console; set it "
                                   "to FALSE (serial output still reaches Cloud Logging)")
        block = metadata.get("block-project-ssh-keys")
        if block is UNKNOWN:
            yield _could_not_run(view, ("metadata", "block-project-ssh-keys"))
        elif not _truthy(block):
            yield _violation(view, "metadata.block-project-ssh-keys must be TRUE")
    email = view.get("serviceAccount", "email")
    if email is UNKNOWN:
        yield _could_not_run(view, ("serviceAccount", "email"))
    elif not isinstance(email, str) or not email or _DEFAULT_COMPUTE_ACCOUNT.fullmatch(email):
        yield _violation(view, "runs as the default compute service account (serviceAccount.email is missing or "
                               "the project's -compute@developer account); use the stack's own node identity")
    scopes = view.get("serviceAccount", "scopes")
    if scopes is UNKNOWN:
        yield _could_not_run(view, ("serviceAccount", "scopes"))
    elif isinstance(scopes, list) and any(s in CLOUD_PLATFORM_SCOPES for s in scopes):
        yield _violation(view, "serviceAccount.scopes include cloud-platform (every API the account may use); "
                               "list only the narrow scopes the node needs")
    interfaces = view.get("networkInterfaces")
    if interfaces is UNKNOWN:
        yield _could_not_run(view, ("networkInterfaces",))
        return
    external = [i for i, nic in enumerate(interfaces if isinstance(interfaces, list) else [])
                if isinstance(nic, Mapping) and nic.get("accessConfigs") not in (None, [], MISSING)]
    if external:
        group = view.labels().get("group")
        if group is UNKNOWN:
            yield _could_not_run(view, ("labels", "group"))
        elif group not in context.external_ip_groups:
            yield _violation(view, "networkInterfaces have an external address (accessConfigs), but the "
                                   "instance's node group does not declare externalIp: true")


# ---------------------------------------------------------------------------------------------
# data-safety


def check_data_safety(view: ResourceView, context: RuleContext) -> Iterator[Finding]:
    if view.type == INSTANCE:
        if view.options.get("protect"):
            yield _violation(view, "an instance is protected (protect option), which blocks every replacement and "
                                   "so every image upgrade; keep data on the protected data disk instead")
        protection = view.get("deletionProtection")
        if protection is UNKNOWN:
            yield _could_not_run(view, ("deletionProtection",))
        elif protection is True:
            yield _violation(view, "deletionProtection on an instance blocks its replacement and so every image "
                                   "upgrade; keep data on the protected data disk instead")
        return
    if not context.prod:
        return
    # a node's own data disk is its direct child; configuration disks (a ConfigDisk inside the node) are
    # versions made from content and replaced with it
    keeps = (view.type == DISK and view.parent_types[-1:] in [(t,) for t in NODE_TYPES]) or view.type == ADDRESS
    if not keeps:
        return
    what = "a node's data disk" if view.type == DISK else "an address"
    policy = view.get("deletionPolicy")
    if policy is UNKNOWN:
        yield _could_not_run(view, ("deletionPolicy",))
    elif policy != "PREVENT":
        yield _violation(view, f"{what} in prod must carry deletionPolicy PREVENT")
    if not view.options.get("protect"):
        yield _violation(view, f"{what} in prod must be protected (protect option)")
    if view.sees("retainOnDelete") and not view.options.get("retainOnDelete"):
        yield _violation(view, f"{what} in prod must be kept on delete (retainOnDelete option)", offline_only=True)


# ---------------------------------------------------------------------------------------------
# no-plaintext-secrets (offline-only)

# Exact (type, input path) pairs that carry a secret; ``[*]`` is any list element. No guessing from
# names: a component that carries a secret in another field adds that field here.
SECRET_FIELDS: tuple[tuple[str, str, str], ...] = (
    ("docker:index/image:Image", "registry.password", "registry password of a docker build"),
    ("pulumi:providers:docker", "registryAuth[*].password", "registry password of the docker provider"),
    ("gcp:secretmanager/secretVersion:SecretVersion", "secretData", "a Secret Manager payload"),
    (LOCAL_COMMAND, "environment.DSTACK_VMM_TOKEN", "the VMM bearer token (vmm-cli)"),
    (LOCAL_COMMAND, "environment.DSTACK_VMM_AUTH_PASSWORD", "the VMM basic-auth password (vmm-cli)"),
    (LOCAL_COMMAND, "environment.PHALA_CLOUD_API_KEY", "the Phala Cloud API key"),
    (LOCAL_COMMAND, "environment.DSTACK_FLEET_APP_ENV", "an app's plaintext env before it is encrypted for the KMS"),
)


def _pattern_parts(pattern: str) -> tuple[str, ...]:
    return tuple(p for p in re.split(r"\.|(\[\*\])", pattern) if p)


def _matches(path: Path, parts: tuple[str, ...]) -> bool:
    if len(path) != len(parts):
        return False
    return all((isinstance(p, int) if want == "[*]" else p == want) for p, want in zip(path, parts))


def check_no_plaintext_secrets(view: ResourceView, context: RuleContext) -> Iterator[Finding]:
    fields = [(_pattern_parts(p), what) for t, p, what in SECRET_FIELDS if t == view.type]
    if not fields or view.secret_paths is None:
        return
    reported: set[str] = set()
    for path, value in walk(view.inputs):
        for parts, what in fields:
            prefix = path[:len(parts)]
            if len(path) < len(parts) or not _matches(prefix, parts) or value is None or value == "":
                continue
            if not view.is_secret(prefix) and render_path(prefix) not in reported:
                reported.add(render_path(prefix))
                yield _violation(view, f"{render_path(prefix)} carries {what} but is not a Pulumi secret; pass it as "
                                       "a secret (dstack-fleet:secrets, pulumi.Output.secret)", offline_only=True)


# ---------------------------------------------------------------------------------------------
# unsafe-peer-delivery


def check_unsafe_peer_delivery(view: ResourceView, context: RuleContext) -> Iterator[Finding]:
    if view.type != INSTANCE or not context.prod:
        return
    metadata = view.get("metadata")
    if metadata is UNKNOWN:
        yield _could_not_run(view, ("metadata",))
        return
    if isinstance(metadata, Mapping) and any(k in metadata for k in PEER_METADATA_KEYS):
        yield _violation(view, "overlay peers are delivered through unsigned instance metadata, which the host "
                               "controls; prod delivers only the signed member table (overlay-table)")


# ---------------------------------------------------------------------------------------------
# expected-measurements (stack)


@dataclass(frozen=True)
class MeasurementExpectation:
    fields: Mapping[str, int]  # field -> length of its lower-case hex value
    why: str
    # field -> the field it is computed from: pending when that one is pending
    derived_from: Mapping[str, str] = field(default_factory=dict)


# What each kind of node and app must export under ``measurements["node:<key>"]`` /
# ``measurements["app:<name>"]`` (fleet.expectations): a value, or a pending mark ("pending build",
# "known at boot", "reported by ...") until it can be known. One table, by kind.
EXPECTED_MEASUREMENTS: dict[str, MeasurementExpectation] = {
    "overlay": MeasurementExpectation(
        {}, "none: tplus overlay images emit no dstack runtime events (no RTMR3, app-id or compose-hash), and "
            "their MRTD and RTMR0-2 are not computed from the build yet"),
    "dstack": MeasurementExpectation(
        {"os_image_hash": 64}, "the dstack OS image hash (sha256 of sha256sum.txt) the node's guest reports"),
    "dstack-app": MeasurementExpectation(
        {"compose_hash": 64, "app_id": 40, "rtmr3": 96},
        "the app's identity (compose-hash, app-id) and the RTMR3 its runtime events replay to; the OS image hash "
        "belongs to the node (gce) or the host (vmm, phala)",
        derived_from={"app_id": "compose_hash", "rtmr3": "compose_hash"}),
}
MEASUREMENT_PREFIX = {"node": "node:", "app": "app:"}


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p.title() for p in rest)


def is_pending_mark(value: Any) -> bool:
    return isinstance(value, str) and (value in MEASUREMENT_MARKS or value.startswith(PENDING_MARK_PREFIXES))


def _entities(outputs: Mapping[str, Any]) -> Iterator[tuple[str, str, Any]]:
    nodes = outputs.get("nodes")
    if isinstance(nodes, Mapping):
        for key, summary in sorted(nodes.items()):
            yield "node", key, summary.get("kind") if isinstance(summary, Mapping) else UNKNOWN
    apps = outputs.get("apps")
    if isinstance(apps, Mapping):
        for key, summary in sorted(apps.items()):
            kind = summary.get("measurementKind", "dstack-app") if isinstance(summary, Mapping) else UNKNOWN
            yield "app", key, kind


def check_expected_measurements(plan: PlanView, context: RuleContext) -> Iterator[Finding]:
    urn = context.stack_urn or "stack"
    outputs = context.outputs
    if outputs is None or outputs is UNKNOWN or not isinstance(outputs, Mapping):
        yield Finding(urn, "the stack outputs are not known in this preview, so the exported measurements cannot "
                           "be checked", "could-not-run")
        return
    measurements = context.measurements if context.measurements is not None else outputs.get("measurements", {})
    if measurements is UNKNOWN:
        yield Finding(urn, "the measurements output is not known in this preview", "could-not-run")
        return
    measurements = measurements if isinstance(measurements, Mapping) else {}
    for what, key, kind in _entities(outputs):
        if kind is UNKNOWN:
            yield Finding(urn, f"the kind of {what} {key} is not known in this preview", "could-not-run")
            continue
        expectation = EXPECTED_MEASUREMENTS.get(kind)
        if expectation is None:
            yield Finding(urn, f"{what} {key} has a kind the measurement table (fleet.rules.EXPECTED_MEASUREMENTS) "
                               "does not describe; add what it must export")
            continue
        if not expectation.fields:
            continue
        entry_key = MEASUREMENT_PREFIX[what] + key
        entry = measurements.get(entry_key)
        if entry is UNKNOWN:
            yield Finding(urn, f"the measurements of {what} {key} are not known in this preview", "could-not-run")
            continue
        if not isinstance(entry, Mapping):
            yield Finding(urn, f"{what} {key} ({kind}) exports no expected measurements; measurements[{entry_key}] "
                               f"must give {', '.join(expectation.fields)} (or mark them pending)")
            continue
        def value_of(name: str) -> Any:
            return entry.get(name, entry.get(_camel(name)))

        missing = []
        for name, length in expectation.fields.items():
            value = value_of(name)
            source = expectation.derived_from.get(name)
            if value is UNKNOWN:
                yield Finding(urn, f"measurements[{entry_key}].{name} is not known in this preview", "could-not-run")
            elif is_pending_mark(value) or (isinstance(value, str) and re.fullmatch(f"[0-9a-f]{{{length}}}", value)):
                continue
            elif value is None and source is not None and is_pending_mark(value_of(source)):
                continue  # computed from a value that is itself still pending
            else:
                missing.append(name)
        if missing:
            yield Finding(urn, f"{what} {key} ({kind}) exports neither a value nor a pending mark for "
                               f"{', '.join(missing)} under measurements[{entry_key}] (values are lower-case hex)")


# ---------------------------------------------------------------------------------------------
# The rule table

_CONFIG_PROPERTIES: dict[str, dict[str, Any]] = {
    "tier": {"type": "string", "enum": ["dev", "staging", "prod", "none"],
             "description": "The stack's dstack-fleet:tier (none for images and bootstrap)."},
    "publicPorts": {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 65535},
                    "description": "Ports that may be open to the internet: network.publicIngress ports and "
                                   "policy.publicPorts."},
    "allowedImages": {"type": "array", "items": {"type": "string"},
                      "description": "External GCE images (self links) nodes may boot."},
    "extraMachineTypes": {"type": "array", "items": {"type": "string"},
                          "description": "dstack-fleet:tdx.extraMachineTypes."},
    "externalIpGroups": {"type": "array", "items": {"type": "string"},
                         "description": "Node groups that declare externalIp: true."},
    "publicRepositories": {"type": "array", "items": {"type": "string"},
                           "description": "Artifact Registry repositories anyone may read (the bootstrap's public "
                                          "app repository when dstack-fleet:registry.publicAppImages is set)."},
}

RULES: tuple[Rule, ...] = (
    Rule(
        name="pinned-digests",
        description="Every container image reference in any input (docker image names, instance metadata, "
                    "compose and app-compose content, command strings) is pinned by @sha256:<64 hex>; a docker "
                    "build pushes to a tag, never to the implicit :latest.",
        remediation="Write each image as name@sha256:<64 lower-case hex> (a tag may precede the digest); never a "
                    "tag alone, a variable, or a compose build:. Built images take their digest from "
                    "images.lock.json.",
        applies_to="every resource",
        scope="resource", check=check_pinned_digests),
    Rule(
        name="pinned-build-inputs",
        description="Build inputs are pinned: upstream and guest source commits are 40-hex SHAs, guest binaries "
                    "carry a sha256, boot and source images are self links (never a family), and images are made "
                    "only after an integrity step.",
        remediation="Use full commit SHAs, the guest binary's sha256 and image self links "
                    "(projects/P/global/images/NAME); create images from objects the integrity step checks.",
        applies_to="instances (boot image), build hosts (their build script), GCP images",
        scope="stack", check=check_pinned_build_inputs),
    Rule(
        name="tdx-only",
        description="Every node instance is a TDX confidential VM: confidentialInstanceType TDX, "
                    "onHostMaintenance TERMINATE, a TDX machine type, and a boot image of this stack with "
                    "TDX_CAPABLE (or an allow-listed pinned image).",
        remediation="Keep the TdxNode settings; add external images to dstack-fleet:policy.allowedImages only "
                    "after checking they are TDX-capable.",
        applies_to="instances inside a node component (OverlayNode, DstackNode); build hosts are out of scope",
        scope="stack", check=check_tdx_only, config_keys=("allowedImages", "extraMachineTypes")),
    Rule(
        name="image-features",
        description="Every GCP image the stack boots from declares the guest OS features UEFI_COMPATIBLE, "
                    "TDX_CAPABLE and GVNIC.",
        remediation="Create boot images with fleet.images.GUEST_OS_FEATURES.",
        applies_to="gcp:compute/image:Image that GcpImage makes or an instance boots (not data or config "
                   "disk images)",
        scope="stack", check=check_image_features),
    Rule(
        name="no-open-ingress",
        description="No INGRESS allow rule is open to the world (0.0.0.0/0, ::/0, or no source at all) on a "
                    "port the stack does not declare public.",
        remediation="Restrict the sources (network tags, CIDRs) or declare the port in "
                    "dstack-fleet:network.publicIngress with a reason.",
        applies_to="gcp:compute/firewall:Firewall",
        scope="resource", check=check_no_open_ingress, config_keys=("publicPorts",)),
    Rule(
        name="no-public-access",
        description="No IAM grant names allUsers or allAuthenticatedUsers, except reading (roles/"
                    "artifactregistry.reader, allUsers) the one public app repository the bootstrap stack opts in "
                    "to with dstack-fleet:registry.publicAppImages.",
        remediation="Grant a service account or group instead; publish an app's images with phala.publicImages "
                    "and dstack-fleet:registry.publicAppImages rather than opening another repository.",
        applies_to="IAM members, bindings and policies of every resource type",
        scope="resource", check=check_no_public_access, config_keys=("publicRepositories",)),
    Rule(
        name="hardened-instances",
        description="Instances keep the interactive serial console off, block project SSH keys, do not run as the "
                    "default compute service account or with the cloud-platform scope, and have no external "
                    "address unless their node group declares externalIp.",
        remediation="Use fleet.nodes.BASE_METADATA, the stack's node identity with narrow scopes, and externalIp "
                    "on the group that needs it.",
        applies_to="gcp:compute/instance:Instance",
        scope="resource", check=check_hardened_instances, config_keys=("externalIpGroups",)),
    Rule(
        name="data-safety",
        description="In prod, node data disks and addresses are kept (deletionPolicy PREVENT, protect, and "
                    "retainOnDelete, which is checked offline only); no instance is ever protected.",
        remediation="Set deletion_policy PREVENT, protect and retain_on_delete on prod disks and addresses; never "
                    "protect an instance (it would block every upgrade).",
        applies_to="node data disks (direct children of a node) and addresses (prod), instances (every tier)",
        scope="resource", check=check_data_safety, partly_offline="retainOnDelete", config_keys=("tier",)),
    Rule(
        name="no-plaintext-secrets",
        description="Offline-only: the inputs listed in fleet.rules.SECRET_FIELDS (registry passwords, VMM "
                    "tokens, API keys, an app's plaintext env) are Pulumi secrets. The policy engine does not tell "
                    "a policy which values are secret, so the CrossGuard pack cannot check this.",
        remediation="Take the value from dstack-fleet:secrets or wrap it with pulumi.Output.secret.",
        applies_to="the (type, input) pairs of fleet.rules.SECRET_FIELDS",
        scope="resource", check=check_no_plaintext_secrets, offline_only=True),
    Rule(
        name="unsafe-peer-delivery",
        description="Prod refuses overlay peers delivered through unsigned instance metadata (host-controlled "
                    "and unmeasured); the signed member table is what prod nodes get.",
        remediation="Deploy with this version's overlay (delivery: signed), which writes only overlay-table and "
                    "its signature.",
        applies_to="gcp:compute/instance:Instance (prod)",
        scope="resource", check=check_unsafe_peer_delivery, config_keys=("tier",)),
    Rule(
        name="expected-measurements",
        description="Every node and app exports the expected measurements of its kind (see "
                    "fleet.rules.EXPECTED_MEASUREMENTS; overlay nodes: none), or marks them pending.",
        remediation="Export measurements[\"node:<key>\"] / measurements[\"app:<name>\"] with the fields its kind "
                    "expects (fleet.expectations), or a pending mark.",
        applies_to="the stack (outputs nodes, apps and measurements)",
        scope="stack", check=check_expected_measurements),
)

RULE_NAMES = tuple(r.name for r in RULES)


def rule(name: str) -> Rule:
    for r in RULES:
        if r.name == name:
            return r
    raise KeyError(name)


def crossguard_rules() -> tuple[Rule, ...]:
    return tuple(r for r in RULES if not r.offline_only)


def rule_table() -> str:
    """The Markdown table of the rules (policies/README.md carries it)."""
    lines = ["| rule | applies to | default enforcement | offline-only | scope |", "|---|---|---|---|---|"]
    for r in RULES:
        offline = "yes" if r.offline_only else (f"partly ({r.partly_offline})" if r.partly_offline else "no")
        lines.append(f"| `{r.name}` | {r.applies_to} | mandatory (advisory in dev) | {offline} | {r.scope} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Offline adapter


def context_from_config(config: Any, *, project: str = "", outputs: Mapping[str, Any] | None = None,
                        measurements: Mapping[str, Any] | None = None) -> RuleContext:
    """The rule context of a validated ``fleet.config.StackConfig``; raises ``ConfigError`` when
    ``dstack-fleet:policy.enforcement`` names a rule that does not exist."""
    fleet = config.fleet
    policy = fleet.policy
    unknown = sorted(set(policy.enforcement) - set(RULE_NAMES))
    if unknown:
        raise ConfigError([Problem(config.source, f"dstack-fleet:policy.enforcement.{name}",
                                   f"no policy rule is named {name!r}; rules: {', '.join(RULE_NAMES)}")
                           for name in unknown])
    public = {int(p) for p in policy.public_ports}
    if fleet.network is not None:
        public |= {rule_.port for rule_ in fleet.network.public_ingress}
    return RuleContext(
        tier=fleet.tier,
        enforcement=dict(policy.enforcement),
        public_ports=frozenset(public),
        allowed_images=tuple(policy.allowed_images),
        external_ip_groups=frozenset(g.name for g in fleet.nodes if g.external_ip),
        extra_machine_types=tuple(fleet.tdx.extra_machine_types),
        public_repositories=frozenset({public_repository_id(fleet.name_prefix)} if fleet.role == "bootstrap"
                                      and fleet.registry.public_app_images else ()),
        outputs=outputs,
        measurements=measurements,
        stack_urn=stack_urn(config.stack, project) if project else "",
    )


def _violation_dict(r: Rule, finding: Finding, level: str) -> dict[str, str]:
    message = finding.message
    if finding.status == "could-not-run":
        message = f"could not run: {message}"
    elif finding.status == "pending":
        message = f"pending: {message}"
    if r.offline_only or finding.offline_only:
        message += " [offline-only]"
    return {
        "policy": r.name,
        "enforcement": level if finding.status == "violation" else "advisory",
        "urn": finding.urn,
        "message": message,
    }


def evaluate(resources: Sequence[Any], context: RuleContext) -> list[dict[str, str]]:
    """The plan's violations: every rule over the captured registrations, sorted."""
    plan = PlanView(tuple(view_from_registration(r) for r in resources))
    out: dict[tuple[str, str, str, str], dict[str, str]] = {}
    for r in RULES:
        level = context.level(r.name)
        if level == "disabled":
            continue
        for finding in r.findings(plan, context):
            item = _violation_dict(r, finding, level)
            out[(item["urn"], item["policy"], item["message"], item["enforcement"])] = item
    return [out[k] for k in sorted(out)]


# ---------------------------------------------------------------------------------------------
# CrossGuard adapter


def pack_config(tier: str | None, overrides: Mapping[str, str] | None = None,
                public_ports: Iterable[int] = (), allowed_images: Iterable[str] = (), *,
                extra_machine_types: Iterable[str] = (), external_ip_groups: Iterable[str] = (),
                public_repositories: Iterable[str] = ()) -> dict[str, Any]:
    """The ``--policy-pack-config`` document for a stack: the tier's level for every policy, the
    stack's overrides, and each policy's settings."""
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(RULE_NAMES))
    if unknown:
        raise ValueError(f"no policy rule is named {', '.join(unknown)}; rules: {', '.join(RULE_NAMES)}")
    bad = sorted(k for k, v in overrides.items() if v not in LEVELS)
    if bad:
        raise ValueError(f"enforcement of {', '.join(bad)} must be one of {', '.join(LEVELS)}")
    settings = {
        "tier": tier or "none",
        "publicPorts": sorted({int(p) for p in public_ports}),
        "allowedImages": sorted(set(allowed_images)),
        "extraMachineTypes": sorted(set(extra_machine_types)),
        "externalIpGroups": sorted(set(external_ip_groups)),
        "publicRepositories": sorted(set(public_repositories)),
    }
    document: dict[str, Any] = {"all": default_level(tier)}
    for r in crossguard_rules():
        entry: dict[str, Any] = {"enforcementLevel": overrides.get(r.name, default_level(tier))}
        entry.update({key: settings[key] for key in r.config_keys})
        document[r.name] = entry
    return document


def pack_config_for(config: Any) -> dict[str, Any]:
    """``pack_config`` of a validated stack configuration."""
    context = context_from_config(config)
    return pack_config(context.tier, context.enforcement, context.public_ports, context.allowed_images,
                       extra_machine_types=context.extra_machine_types,
                       external_ip_groups=context.external_ip_groups,
                       public_repositories=context.public_repositories)


class PackConfigMissing(Exception):
    """The pack was given neither a tier (``--policy-pack-config``) nor the stack's configuration."""


# The Pulumi CLI starts a policy pack with the stack's configuration in PULUMI_CONFIG, the JSON document a
# program reads (pulumi/pulumi pkg/resource/plugin/analyzer_plugin.go, constructEnv: "Config is passed as an
# environment variable (including unencrypted secrets), similar to how config is passed to each language
# runtime plugin"; pulumi-policy 1.21.0 policy.py _configure_runtime_settings reads it again per call).
PULUMI_CONFIG_ENV = "PULUMI_CONFIG"
NO_TIER = (f"the dstack-fleet policy pack was given no tier: neither --policy-pack-config (`python -m fleet "
           f"policy-config --stack <stack>` writes it; make preview/up pass it) nor the stack's configuration "
           f"(dstack-fleet:role and dstack-fleet:tier in {PULUMI_CONFIG_ENV}); it does not guess one")


def stack_tier(environ: Mapping[str, str]) -> str | None:
    """The tier of the stack the CLI runs the pack for, read from its configuration (``none`` for the
    images and bootstrap stacks); None when the configuration does not say."""
    try:
        config = json.loads(environ.get(PULUMI_CONFIG_ENV) or "{}")
    except ValueError:
        return None
    if not isinstance(config, dict):
        return None
    tier, role = config.get("dstack-fleet:tier"), config.get("dstack-fleet:role")
    if role in ("images", "bootstrap"):
        return "none"
    if role == "env" and tier in ("dev", "staging", "prod"):
        return tier
    return None


def context_from_policy_config(config: Mapping[str, Any] | None,
                               environ: Mapping[str, str] | None = None) -> RuleContext:
    """The rule context from a policy's CrossGuard config. The tier comes from the config
    (``pack_config``), else from the stack's configuration the CLI hands the pack; without either the
    pack refuses (``PackConfigMissing``), because guessing prod would fail dev and staging previews and
    guessing anything else would relax prod."""
    import os

    config = config or {}
    tier = config.get("tier") or stack_tier(os.environ if environ is None else environ)
    if tier is None:
        raise PackConfigMissing(NO_TIER)
    return RuleContext(
        tier=None if tier == "none" else tier,
        public_ports=frozenset(int(p) for p in config.get("publicPorts", ()) or ()),
        allowed_images=tuple(config.get("allowedImages", ()) or ()),
        external_ip_groups=frozenset(config.get("externalIpGroups", ()) or ()),
        extra_machine_types=tuple(config.get("extraMachineTypes", ()) or ()),
        public_repositories=frozenset(config.get("publicRepositories", ()) or ()),
    )


def pack_enforcement(environ: Mapping[str, str]) -> str:
    """The pack's default level, used for every policy the ``--policy-pack-config`` does not set: the
    stack's tier's level when the CLI passed the stack's configuration, else mandatory (the policies
    then refuse for want of a tier)."""
    tier = stack_tier(environ)
    return default_level(None if tier in (None, "none") else tier)


def _context_or_refuse(r: Rule, config: Mapping[str, Any] | None,
                       report_violation: Callable[..., None]) -> RuleContext | None:
    """The context, or None after reporting the refusal: a rule that reads the tier cannot run without
    one; the others run (they do not depend on it)."""
    try:
        return context_from_policy_config(config)
    except PackConfigMissing as exc:
        if "tier" in r.config_keys:
            report_violation(str(exc))
            return None
        return context_from_policy_config({**(config or {}), "tier": "none"})


def _policy_value(value: Any) -> Any:
    """A ``pulumi_policy`` property (proxied or plain) as plain data; unknowns become ``UNKNOWN``."""
    from pulumi_policy import proxy
    from pulumi_policy.secret import Secret as PolicySecret

    sentinels = {proxy.UNKNOWN_BOOLEAN_VALUE, proxy.UNKNOWN_NUMBER_VALUE, proxy.UNKNOWN_STRING_VALUE,
                 proxy.UNKNOWN_ARRAY_VALUE, proxy.UNKNOWN_ASSET_VALUE, proxy.UNKNOWN_ARCHIVE_VALUE,
                 proxy.UNKNOWN_OBJECT_VALUE}

    def item(container: Any, key: Any) -> Any:
        try:
            return plain(container[key])
        except proxy.UnknownValueError:
            return UNKNOWN

    def plain(v: Any) -> Any:
        if isinstance(v, PolicySecret):
            return plain(v.value)
        if isinstance(v, str):
            return UNKNOWN if v in sentinels else v
        if isinstance(v, Mapping):
            return {str(k): item(v, k) for k in list(v)}
        if isinstance(v, Sequence) and not isinstance(v, (bytes, bytearray)):
            return [item(v, i) for i in range(len(v))]
        if isinstance(v, float) and v.is_integer():
            return int(v)
        for attr in ("path", "text", "uri"):
            if hasattr(v, attr) and type(v).__module__.startswith("pulumi"):
                return {"asset": {attr: getattr(v, attr)}}
        return v

    return plain(value)


def view_from_policy(resource_type: str, props: Any, urn: str, name: str, opts: Any = None,
                     dependencies: Iterable[Any] = (), property_dependencies: Mapping[str, Any] | None = None
                     ) -> ResourceView:
    """The view of a ``ResourceValidationArgs`` or ``PolicyResource``: no secret flags, and only the
    options the engine passes (protect, deleteBeforeReplace, ignoreChanges)."""
    options: dict[str, Any] = {}
    if opts is not None:
        options = {"protect": bool(getattr(opts, "protect", False)),
                   "deleteBeforeReplace": getattr(opts, "delete_before_replace", None),
                   "ignoreChanges": list(getattr(opts, "ignore_changes", []) or [])}

    def urn_of(d: Any) -> str:
        return d if isinstance(d, str) else d.urn

    return ResourceView(
        urn=urn, type=resource_type, name=name, inputs=_policy_value(props) or {}, secret_paths=None,
        options=options, dependencies=tuple(urn_of(d) for d in dependencies),
        property_dependencies={k: tuple(urn_of(d) for d in v) for k, v in (property_dependencies or {}).items()},
    )


def _could_not_run_error(rule_name: str, findings: list[Finding]) -> Exception:
    from pulumi_policy.proxy import UNKNOWN_STRING_VALUE, UnknownValueError

    first = findings[0]
    more = f" (and {len(findings) - 1} more)" if len(findings) > 1 else ""
    error = UnknownValueError(UNKNOWN_STRING_VALUE, [])
    error.message = f"{rule_name} could not run: {first.urn}: {first.message}{more}"
    return error


def _report(r: Rule, findings: Iterable[Finding], report_violation: Callable[..., None], *, with_urn: bool) -> None:
    blocked = []
    for finding in findings:
        if finding.status == "violation":
            report_violation(finding.message, finding.urn if with_urn else None)
        else:
            blocked.append(finding)
    if blocked:
        raise _could_not_run_error(r.name, blocked)


def _resource_validator(r: Rule) -> Callable[[Any, Callable[..., None]], None]:
    def validate(args: Any, report_violation: Callable[..., None]) -> None:
        context = _context_or_refuse(r, args.get_config(), report_violation)
        if context is None:
            return
        view = view_from_policy(args.resource_type, args.props, args.urn, args.name, args.opts)
        _report(r, r.check(view, context), report_violation, with_urn=False)

    return validate


def _stack_validator(r: Rule) -> Callable[[Any, Callable[..., None]], None]:
    def validate(args: Any, report_violation: Callable[..., None]) -> None:
        context = _context_or_refuse(r, args.get_config(), report_violation)
        if context is None:
            return
        views, outputs, urn = [], None, ""
        for resource in args.resources:
            if resource.resource_type == STACK_TYPE:
                outputs, urn = _policy_value(resource.props), resource.urn
                continue
            views.append(view_from_policy(resource.resource_type, resource.props, resource.urn, resource.name,
                                          resource.opts, resource.dependencies, resource.property_dependencies))
        context = replace(context, outputs=outputs, stack_urn=urn)
        _report(r, r.check(PlanView(tuple(views)), context), report_violation, with_urn=True)

    return validate


def crossguard_policies() -> list[Any]:
    """The ``pulumi_policy`` policies of the pack (every rule that is not offline-only)."""
    from pulumi_policy import PolicyConfigSchema, ResourceValidationPolicy, StackValidationPolicy

    policies: list[Any] = []
    for r in crossguard_rules():
        description = r.description
        if r.partly_offline:
            description += f" (The {r.partly_offline} part is offline-only: the engine does not pass it to policies.)"
        schema = PolicyConfigSchema({key: _CONFIG_PROPERTIES[key] for key in r.config_keys}) if r.config_keys \
            else None
        if r.scope == "stack":
            policies.append(StackValidationPolicy(name=r.name, description=description, validate=_stack_validator(r),
                                                  config_schema=schema, remediation_steps=r.remediation))
        else:
            policies.append(ResourceValidationPolicy(name=r.name, description=description,
                                                     validate=_resource_validator(r), config_schema=schema,
                                                     remediation_steps=r.remediation))
    return policies


__all__ = [
    "EXPECTED_MEASUREMENTS", "MISSING", "PACK_NAME", "RULES", "RULE_NAMES", "SECRET_FIELDS", "Finding", "PlanView",
    "PackConfigMissing", "ResourceView", "Rule", "RuleContext", "context_from_config", "context_from_policy_config",
    "crossguard_policies", "evaluate", "pack_config", "pack_config_for", "pack_enforcement", "pin_problem", "rule",
    "rule_table", "stack_tier",
    "view_from_policy", "view_from_registration",
]
