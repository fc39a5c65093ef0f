"""The grammar of each free-text value, as the thing that consumes it reads it.

A stack file is reviewed in pull requests and planned in CI, so a value that parses here must mean
the same thing to GCP, git, GitHub, docker compose, the dstack VMM and Phala's CLI, and a value that
would mean something else (an option, a path outside the repository, a credential, a CEL
expression) is refused with a one-line reason, never escaped. Each function returns why a value is
refused, or None; ``fleet.config.schema`` attaches them to fields. Standard library only.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import PurePosixPath
from urllib.parse import parse_qsl, urlsplit

# ---- GCP subnets ----------------------------------------------------------------------------------
# Where a subnet's primary IPv4 range may lie, from "Valid IPv4 ranges" of
# https://cloud.google.com/vpc/docs/subnets (read from memory of that page; it could not be fetched
# here, see docs/configuration.md). Everything else GCP either refuses ("Invalid IPv4 ranges")
# or accepts only as privately used public space, which we refuse: it hides the real owners of
# those addresses from every node.
SUBNET_RANGES: tuple[tuple[str, str], ...] = (
    ("10.0.0.0/8", "RFC 1918"), ("172.16.0.0/12", "RFC 1918"), ("192.168.0.0/16", "RFC 1918"),
    ("100.64.0.0/10", "shared address space, RFC 6598"), ("192.0.0.0/24", "IETF protocol assignments, RFC 6890"),
    ("192.0.2.0/24", "documentation, RFC 5737"), ("198.51.100.0/24", "documentation, RFC 5737"),
    ("203.0.113.0/24", "documentation, RFC 5737"), ("192.88.99.0/24", "6to4 relay, RFC 7526"),
    ("198.18.0.0/15", "benchmarking, RFC 2544"), ("240.0.0.0/4", "reserved for future use, RFC 1112"),
)
INVALID_SUBNET_RANGES: tuple[tuple[str, str], ...] = (
    ("0.0.0.0/8", "the current network (RFC 1122)"), ("127.0.0.0/8", "loopback (RFC 1122)"),
    ("169.254.0.0/16", "link-local (RFC 3927), where the metadata server lives"),
    ("224.0.0.0/4", "multicast (RFC 5771)"), ("255.255.255.255/32", "the limited broadcast address"),
)
SMALLEST_SUBNET = 29


def subnet_problem(value: str) -> str | None:
    """Why GCP would refuse ``value`` as a subnet's primary range (or we do), or None."""
    try:
        network = ipaddress.IPv4Network(value, strict=True)
    except ValueError as exc:
        return f"{value!r} is not an IPv4 CIDR block such as 10.10.0.0/20 ({exc})"
    for block, why in INVALID_SUBNET_RANGES:
        if network.overlaps(ipaddress.IPv4Network(block)):
            return f"{value!r} overlaps {block}, {why}, which GCP never accepts for a subnet"
    if not any(network.subnet_of(ipaddress.IPv4Network(block)) for block, _ in SUBNET_RANGES):
        return (f"{value!r} is not a private range: use RFC 1918 space such as 10.0.0.0/8, or 100.64.0.0/10 "
                "(public ranges would hide their real owners from every node)")
    if network.prefixlen > SMALLEST_SUBNET:
        return f"{value!r} is too small for GCP (a subnet needs at least a /{SMALLEST_SUBNET})"
    return None


# ---- text -----------------------------------------------------------------------------------------
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def one_line_problem(value: str, *, max_length: int = 300) -> str | None:
    """Human text shown in plans and written into resource descriptions: one printable line."""
    if _CONTROL.search(value):
        return "must be one line of printable text (no line breaks or control characters)"
    if len(value) > max_length:
        return f"must be at most {max_length} characters"
    if value != value.strip() or not value:
        return "must be non-empty text without surrounding spaces"
    return None


def argument_problem(value: str) -> str | None:
    """One element of an argv list (a container's Cmd or Entrypoint): any text but NUL."""
    if "\x00" in value:
        return "contains a NUL character, which no program argument can hold"
    return None


def absolute_path_problem(value: str) -> str | None:
    """A path inside a container: absolute, one line, no ``..``."""
    if not value.startswith("/"):
        return f"{value!r} is not an absolute path such as /opt/app"
    if _CONTROL.search(value):
        return f"{value!r} contains a line break or control character"
    if ".." in PurePosixPath(value).parts:
        return f"{value!r} contains '..'; write the path it means"
    return None


def repo_path_problem(value: str) -> str | None:
    """A path inside this repository, as given: relative, no ``..``, no backslashes. (Symlinks
    are checked against the checkout by ``fleet.stacks.inputs``.)"""
    if not value or _CONTROL.search(value) or "\\" in value:
        return f"{value!r} is not a path inside the repository"
    if value.startswith("/") or value.startswith("~"):
        return f"{value!r} is absolute; give a path relative to the repository root"
    if ".." in PurePosixPath(value).parts:
        return f"{value!r} leaves the repository ('..'); give a path inside it"
    if value.startswith("-"):
        return f"{value!r} would be read as an option; give a path such as apps/x"
    if len(value.encode("utf-8")) > 1024 or any(len(part.encode("utf-8")) > 255 for part in value.split("/")):
        return f"{value[:40]!r}... is longer than a file system allows (255 bytes a name, 1024 a path)"
    return None


# ---- names --------------------------------------------------------------------------------------
_HOST_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")


def hostname_problem(value: str, *, min_labels: int = 2) -> str | None:
    """A DNS name (RFC 1123): dot-separated labels of letters, digits and inner hyphens."""
    labels = value.lower().split(".")
    if len(value) > 253 or len(labels) < min_labels or not all(_HOST_LABEL.fullmatch(label) for label in labels) \
            or labels[-1].isdigit():
        return f"{value!r} is not a domain name such as dstack-pha-prod8.phala.network"
    return None


MACHINE_TYPE = re.compile(r"[a-z][a-z0-9]*(-[a-z0-9]+)+")
PHALA_INSTANCE_TYPE = re.compile(r"[a-z][a-z0-9]*(\.[a-z0-9]+)+")  # tdx.small, tdx.2xlarge
VMM_IMAGE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # a directory name in the VMM's image dir
# Compressed secp256k1 public key: 0x, then 02 or 03 and the 32-byte x coordinate (SEC 1, 2.3.3).
SECP256K1_COMPRESSED = re.compile(r"0x0[23][0-9a-fA-F]{64}")
DOCKER_ARG_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
DOCKER_STAGE = re.compile(r"[a-z][a-z0-9_.-]*")  # BuildKit lower-cases stage names
# Cargo feature names (letters, digits, _ - + .), optionally dep-name/feature.
CARGO_FEATURE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_+.-]*(/[A-Za-z0-9_][A-Za-z0-9_+.-]*)?")
# docker compose `restart:` (compose-spec, services.restart).
COMPOSE_RESTART = re.compile(r"no|always|unless-stopped|on-failure(:[0-9]+)?")


# ---- git refs and GitHub environments --------------------------------------------------------------
# git's refname rules (git/git 1a3e64c6c4a623626ff0687008732a8e007e2a1c, refs.c:
# refname_disposition, check_refname_component, check_or_sanitize_refname; check_branch_ref adds
# "no leading '-'" and "not HEAD").
_GIT_BAD = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]")
# What we let reach a CEL string literal and a principal-set URL: the characters that need no
# escaping in either. git accepts far more (quotes, parentheses, '|'); those are refused, not escaped.
_CEL_SAFE_REF = re.compile(r"[A-Za-z0-9._/-]+")
_CEL_SAFE_ENV = re.compile(r"[A-Za-z0-9._-]+")
GITHUB_ENVIRONMENT_MAX = 255  # "An environment name may not exceed 255 characters" (GitHub docs)


def git_branch_problem(name: str) -> str | None:
    """Why git would refuse ``name`` as a branch name (``git check-ref-format --branch``), or None."""
    ref = f"refs/heads/{name}"
    if not name or name.startswith("-") or ref == "refs/heads/HEAD":
        return f"{name!r} is not a branch name git accepts"
    if _GIT_BAD.search(name) or ".." in name or "@{" in name or name.endswith((".", "/")) or "//" in name:
        return f"{name!r} is not a branch name git accepts"
    for component in name.split("/"):
        if not component or component.startswith(".") or component.endswith(".lock"):
            return f"{name!r} is not a branch name git accepts"
    return None


def ci_branch_problem(name: str) -> str | None:
    """A branch whose name reaches the Workload Identity condition: git's rules, and only characters
    that need no escaping in CEL or a principal-set URL."""
    problem = git_branch_problem(name)
    if problem:
        return problem
    if not _CEL_SAFE_REF.fullmatch(name):
        return (f"{name!r} is a branch name git accepts, but it reaches the Workload Identity condition, which "
                "takes only letters, digits and . _ / -; rename the branch")
    return None


def github_environment_problem(name: str) -> str | None:
    """A GitHub environment name that reaches the Workload Identity condition."""
    if not name or len(name) > GITHUB_ENVIRONMENT_MAX:
        return f"a GitHub environment name has 1-{GITHUB_ENVIRONMENT_MAX} characters (got {len(name)})"
    if not _CEL_SAFE_ENV.fullmatch(name):
        return (f"{name!r} reaches the Workload Identity condition, which takes only letters, digits and . _ - "
                "in an environment name; rename the environment")
    return None


# ---- URLs ---------------------------------------------------------------------------------------
# Query parameters and path segments that carry credentials. A URL is printed in plans, diffs and
# pull-request comments (and some end up in images): a credential goes in dstack-fleet:secrets.
_CREDENTIAL_PARAM = re.compile(r"(?:^|[_.-])(?:api[_-]?key|key|token|secret|password|passwd|pwd|auth|"
                               r"authorization|sig|signature|credential|credentials|access[_-]?token|session)$",
                               re.IGNORECASE)
_KEY_LIKE = re.compile(r"[A-Za-z0-9_-]{32,}")
_USERINFO = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*@")


def _looks_like_key(segment: str) -> bool:
    return bool(_KEY_LIKE.fullmatch(segment)) and any(c.isdigit() for c in segment) \
        and any(c.isalpha() for c in segment)


def url_problem(value: str, *, schemes: tuple[str, ...] = ("https", "http"), prod: bool = False) -> str | None:
    """A URL a client of ours requests: parsed, an allowed scheme, a host, no credentials in it,
    https in prod. A message never repeats a URL that carries credentials."""
    if _USERINFO.search(value):
        return ("carries credentials (user:password@); keep them out of URLs, which plans print: store them in "
                "dstack-fleet:secrets with `pulumi config set --secret`")
    if _CONTROL.search(value) or " " in value:
        return f"{value[:60]!r} is not a URL (it contains spaces or control characters)"
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError as exc:
        return f"{value[:60]!r} is not a URL ({exc})"
    if parts.scheme not in schemes:
        return f"{value[:60]!r} is not a URL with scheme {' or '.join(s + '://' for s in schemes)}"
    host = parts.hostname or ""
    if parts.username is not None or parts.password is not None:
        return ("carries credentials (user:password@); keep them out of URLs, which plans print: store them in "
                "dstack-fleet:secrets with `pulumi config set --secret`")
    if not host:
        return f"{value[:60]!r} is not a URL: it names no host"
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if hostname_problem(host, min_labels=1):
            return f"{value[:60]!r} is not a URL: {host!r} is not a host name"
    if port == 0:
        return f"{value[:60]!r} is not a URL: port 0"
    for name, item in parse_qsl(parts.query, keep_blank_values=True):
        if _CREDENTIAL_PARAM.search(name) or _looks_like_key(item):
            return (f"query parameter {name!r} looks like a credential; keep credentials out of URLs, which plans "
                    "print: store them in dstack-fleet:secrets")
    if any(_looks_like_key(segment) for segment in parts.path.split("/")):
        return ("has a path segment that looks like an API key or token; keep credentials out of URLs, which plans "
                "print (use a provider endpoint without a key, or one you run)")
    if parts.fragment:
        return f"{value[:60]!r} has a #fragment, which a client never sends; remove it"
    if prod and parts.scheme != "https":
        return f"{value[:60]!r} is plain http; prod requires https (the traffic carries keys and attestations)"
    return None


# ---- docker compose -----------------------------------------------------------------------------
_PORT_RANGE = r"[0-9]{1,5}(?:-[0-9]{1,5})?"
_COMPOSE_PORT = re.compile(rf"(?:(?P<ip>[0-9]{{1,3}}(?:\.[0-9]{{1,3}}){{3}}|\[[0-9A-Fa-f:]+\]):)?(?:(?P<host>{_PORT_RANGE})?:)?"
                           rf"(?P<container>{_PORT_RANGE})(?:/(?P<proto>tcp|udp|sctp))?")
_VOLUME_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]*")
_VOLUME_OPTIONS = {"ro", "rw", "z", "Z", "consistent", "cached", "delegated", "nocopy",
                   "shared", "rshared", "slave", "rslave", "private", "rprivate"}
SECURITY_OPT = re.compile(r"[a-z][a-z-]*(?:[=:][^\s]+)?")


def compose_port_problem(value: str) -> str | None:
    """compose-spec short port syntax: ``[IP:][HOST[-HOST]:]CONTAINER[-CONTAINER][/PROTOCOL]``."""
    match = _COMPOSE_PORT.fullmatch(value)
    if match is None:
        return f"{value!r} is not a port mapping such as '3000:3000', '127.0.0.1:8080:80' or '53:53/udp'"
    for part in ("host", "container"):
        text = match.group(part)
        if text and not all(1 <= int(p) <= 65535 for p in text.split("-")):
            return f"{value!r}: ports are 1-65535"
    if match.group("ip") and not match.group("ip").startswith("["):
        try:
            ipaddress.IPv4Address(match.group("ip"))
        except ValueError:
            return f"{value!r}: {match.group('ip')!r} is not an IP address"
    return None


def compose_volume_problem(value: str) -> str | None:
    """compose-spec short volume syntax: ``[SOURCE:]TARGET[:MODE]`` with an absolute target."""
    parts = value.split(":")
    if len(parts) > 3 or _CONTROL.search(value):
        return f"{value!r} is not a volume such as 'data:/var/lib/app' or '/var/run/dstack.sock:/var/run/dstack.sock:ro'"
    options = parts[2] if len(parts) == 3 else None
    if len(parts) == 2 and not parts[1].startswith("/"):
        options = parts[1]
        parts = parts[:1]
    target = parts[-1] if len(parts) == 1 else parts[1]
    if not target.startswith("/") or ".." in PurePosixPath(target).parts:
        return f"{value!r}: the path inside the container must be absolute"
    if len(parts) >= 2:
        source = parts[0]
        if not (source.startswith(("/", "./", "../", "~")) or _VOLUME_NAME.fullmatch(source)):
            return f"{value!r}: {source!r} is neither a path nor a volume name"
    if options is not None and not set(options.split(",")) <= _VOLUME_OPTIONS:
        return f"{value!r}: {options!r} is not a volume mode (ro, rw, z, Z, nocopy, ...)"
    return None


def compose_tmpfs_problem(value: str) -> str | None:
    """``/path[:options]`` (compose-spec services.tmpfs)."""
    path, _, options = value.partition(":")
    problem = absolute_path_problem(path)
    if problem:
        return problem
    if options and not re.fullmatch(r"[A-Za-z0-9_=,.-]+", options):
        return f"{value!r}: {options!r} are not tmpfs mount options such as size=64m,mode=1777"
    return None
