"""Container image references: parsing, pinning, the two kinds of image digest, and finding
references in free text.

The grammar is distribution/reference's (``regexp.go``): ``[registry[:port]/]path[:tag][@algo:hex]``.
Which leading component is a registry follows its ``splitDockerDomain`` (``normalize.go``): the
part before the first ``/`` is a registry only if it contains ``.`` or ``:``, is ``localhost``, or
has upper-case letters (a path never does). References are kept as written; ``canonical_name``
gives Docker Hub's expanded form for comparisons.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

NAME_MAX_LENGTH = 255  # distribution/reference NameTotalLengthMax
DOCKER_HUB = "docker.io"
_LEGACY_DOCKER_HUB = "index.docker.io"
_OFFICIAL_PREFIX = "library/"

_ALPHANUMERIC = r"[a-z0-9]+"
_SEPARATOR = r"(?:[._]|__|[-]+)"
_PATH_COMPONENT = rf"{_ALPHANUMERIC}(?:{_SEPARATOR}{_ALPHANUMERIC})*"
_REMOTE_NAME = rf"{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*"
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN_NAME = rf"{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*"
_HOST = rf"(?:{_DOMAIN_NAME}|\[[a-fA-F0-9:]+\])"
_DOMAIN_AND_PORT = rf"{_HOST}(?::[0-9]+)?"
_TAG = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"

_REFERENCE_RE = re.compile(
    rf"(?P<name>(?:{_DOMAIN_AND_PORT}/)?{_REMOTE_NAME})(?::(?P<tag>{_TAG}))?(?:@(?P<digest>{_DIGEST}))?"
)
_REMOTE_NAME_RE = re.compile(_REMOTE_NAME)
_DOMAIN_AND_PORT_RE = re.compile(_DOMAIN_AND_PORT)
_TAG_RE = re.compile(_TAG)
_PINNED_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")
_HEX64_RE = re.compile(r"[0-9a-f]{64}")
_VARIABLE_RE = re.compile(r"\$\{[^}]*\}?|\$[A-Za-z_][A-Za-z0-9_]*|\{\{.*?(?:\}\}|$)|<<?[A-Za-z_][\w.-]*>>?")


class InvalidImageReference(ValueError):
    """The text is not an image reference under the distribution/reference grammar."""


class DigestKind(str, Enum):
    """Which object of an image a sha256 digest names. The two are different numbers for the same
    image, and a check that compares one against the other always fails (or, worse, is skipped)."""

    MANIFEST = "manifest"
    IMAGE_ID = "image-id"

    @property
    def obtained_from(self) -> str:
        return _DIGEST_KIND_SOURCES[self]


_DIGEST_KIND_SOURCES = {
    DigestKind.MANIFEST: (
        "the registry manifest digest: what `docker pull name@sha256:...` and compose `image:` take, "
        "pulumi-docker's `repo_digest`, the registry's Docker-Content-Digest header"
    ),
    DigestKind.IMAGE_ID: (
        "the image ID (config digest): `docker image inspect --format '{{.Id}}'`, the manifest's "
        "`config.digest`; it cannot be pulled by name@digest"
    ),
}


@dataclass(frozen=True)
class ImageDigest:
    """A pinned sha256 digest (64 lower-case hex digits) and the kind of object it names."""

    hex: str
    kind: DigestKind

    def __post_init__(self) -> None:
        if not isinstance(self.kind, DigestKind):
            raise ValueError(f"digest kind must be a DigestKind, got {self.kind!r}")
        if not _HEX64_RE.fullmatch(self.hex or ""):
            raise ValueError(f"{self.hex!r} is not 64 lower-case hex digits")

    @classmethod
    def parse(cls, text: str, kind: DigestKind) -> "ImageDigest":
        """``sha256:<64 hex>`` of the given kind; the reason it is not pinned otherwise."""
        reason = _digest_problem(text)
        if reason:
            raise ValueError(f"{text!r}: {reason}")
        return cls(text.split(":", 1)[1], kind)

    def __str__(self) -> str:
        return f"sha256:{self.hex}"

    def reference(self, name: str) -> str:
        """``name@sha256:...``, the pullable form; only a manifest digest can be pulled."""
        if self.kind is not DigestKind.MANIFEST:
            raise ValueError(f"{name}@{self} would name an image by its {self.kind.value} digest, which a registry "
                             f"cannot serve; use {DigestKind.MANIFEST.obtained_from}")
        return f"{name}@{self}"


@dataclass(frozen=True)
class ImageRef:
    """A parsed reference, kept exactly as written (``str(ref)`` gives the input back)."""

    registry: str | None
    repository: str
    tag: str | None = None
    digest: str | None = None

    def __str__(self) -> str:
        text = self.name
        if self.tag is not None:
            text += f":{self.tag}"
        if self.digest is not None:
            text += f"@{self.digest}"
        return text

    @property
    def name(self) -> str:
        return f"{self.registry}/{self.repository}" if self.registry else self.repository

    @property
    def canonical_name(self) -> str:
        """Docker's fully qualified name: ``nginx`` is ``docker.io/library/nginx``."""
        registry = self.registry or DOCKER_HUB
        if registry == _LEGACY_DOCKER_HUB:
            registry = DOCKER_HUB
        repository = self.repository
        if registry == DOCKER_HUB and "/" not in repository:
            repository = _OFFICIAL_PREFIX + repository
        return f"{registry}/{repository}"

    @property
    def unpinned_reason(self) -> str | None:
        if self.digest is None:
            if self.tag is None:
                return "has neither tag nor digest, so it means :latest, which moves; pin it with @sha256:<64 hex>"
            return (f"is pinned only by the tag :{self.tag}, which the registry can point at other content; "
                    "pin it with @sha256:<64 hex> (the manifest digest)")
        return _digest_problem(self.digest)

    @property
    def pinned(self) -> bool:
        return self.unpinned_reason is None

    @property
    def manifest_digest(self) -> ImageDigest | None:
        """The digest after ``@`` is always a manifest digest (that is what a registry resolves)."""
        if not self.pinned:
            return None
        return ImageDigest.parse(self.digest, DigestKind.MANIFEST)

    def with_digest(self, digest: ImageDigest) -> "ImageRef":
        if digest.kind is not DigestKind.MANIFEST:
            raise ValueError(f"an image reference pins a manifest digest, not an {digest.kind.value} digest; "
                             f"use {DigestKind.MANIFEST.obtained_from}")
        return ImageRef(self.registry, self.repository, self.tag, str(digest))


@dataclass(frozen=True)
class PinnedImage:
    """An image pinned by its manifest digest, with its image ID when known, so each consumer can
    take the kind it compares (NEAR's Python launcher: image ID; its Rust launcher and docker:
    manifest)."""

    ref: ImageRef
    image_id: ImageDigest | None = None

    def __post_init__(self) -> None:
        reason = self.ref.unpinned_reason
        if reason:
            raise ValueError(f"{self.ref} {reason}")
        if self.image_id is not None and self.image_id.kind is not DigestKind.IMAGE_ID:
            raise ValueError(f"image_id must be of kind {DigestKind.IMAGE_ID.value}, got {self.image_id.kind.value}")

    def digest(self, kind: DigestKind) -> ImageDigest:
        if kind is DigestKind.MANIFEST:
            return self.ref.manifest_digest
        if self.image_id is None:
            raise ValueError(f"the image ID of {self.ref} is not known; record {DigestKind.IMAGE_ID.obtained_from} "
                             "alongside the manifest digest")
        return self.image_id


def parse_image_ref(text: str) -> ImageRef:
    """Parse ``text`` under the distribution/reference grammar; raise ``InvalidImageReference``
    saying which part is wrong."""
    if not isinstance(text, str):
        raise InvalidImageReference(f"an image reference must be a string, got {type(text).__name__}")
    if not text:
        raise InvalidImageReference("the image reference is empty")
    if text != text.strip():
        raise InvalidImageReference(f"{text!r} has surrounding whitespace")
    match = _REFERENCE_RE.fullmatch(text)
    if not match:
        raise InvalidImageReference(_explain_invalid(text))
    name = match["name"]
    if len(name) > NAME_MAX_LENGTH:
        raise InvalidImageReference(f"the repository name is {len(name)} characters; at most {NAME_MAX_LENGTH}")
    registry, repository = _split_registry(name)
    if registry is not None and not _DOMAIN_AND_PORT_RE.fullmatch(registry):
        raise InvalidImageReference(f"{registry!r} is not a registry host[:port]")
    if not _REMOTE_NAME_RE.fullmatch(repository):
        raise InvalidImageReference(f"{repository!r} is not a repository path (lower-case letters, digits and "
                                    "single . _ __ or - separators)")
    return ImageRef(registry, repository, match["tag"], match["digest"])


def repository_problem(text: str) -> str | None:
    """Why ``text`` is not a bare repository (``[registry[:port]/]path``), or None. A tag or digest
    there would end up inside the pinned reference as ``name:tag@sha256:...``, measured as written."""
    try:
        ref = parse_image_ref(text)
    except InvalidImageReference as exc:
        return f"{text!r} is not an image repository: {exc}"
    if ref.digest is not None:
        return (f"{text!r} carries the digest {ref.digest}; give the repository alone ({ref.name}) and the "
                "digest under `digest:`")
    if ref.tag is not None:
        return (f"{text!r} names the tag :{ref.tag}; give the repository alone ({ref.name}): the content is "
                "pinned by `digest:`, and a tag would be measured into the compose as written")
    return None


def unpinned_reason(reference: str | ImageRef) -> str | None:
    """Why ``reference`` is not pinned by a sha256 digest, or None if it is.

    Pinned means ``@sha256:`` followed by exactly 64 lower-case hex digits; a tag may precede it
    (``img:1.0@sha256:...``) and a registry may carry a port (``host:5000/img@sha256:...``).
    """
    if isinstance(reference, ImageRef):
        return reference.unpinned_reason
    if not isinstance(reference, str):
        return f"is a {type(reference).__name__}, not a string"
    if not reference.strip():
        return "is empty"
    variable = _VARIABLE_RE.search(reference)
    if variable:
        return (f"uses the variable {variable.group(0)!r}, which is filled in at deploy time from input that is not "
                "measured; write the reference literally as name@sha256:<64 hex>")
    if reference.count("@") > 1:
        return f"is not a valid image reference: {reference!r} has more than one '@'"
    _, at, digest = reference.partition("@")
    if at:
        digest_reason = _digest_problem(digest)
        if digest_reason:
            return digest_reason
    try:
        ref = parse_image_ref(reference)
    except InvalidImageReference as exc:
        return f"is not a valid image reference: {exc}"
    return ref.unpinned_reason


def _digest_problem(digest: str) -> str | None:
    if _PINNED_DIGEST_RE.fullmatch(digest):
        return None
    algorithm, colon, encoded = digest.partition(":")
    if not colon:
        return f"digest {digest!r} has no algorithm; write sha256:<64 hex>"
    if algorithm != "sha256":
        return f"digest algorithm {algorithm!r} is not sha256; pin with sha256:<64 hex>"
    if not re.fullmatch(r"[0-9a-fA-F]*", encoded):
        return f"digest {digest!r} has characters that are not hex digits"
    if encoded != encoded.lower():
        return "digest has upper-case hex digits; registries and docker accept only lower case"
    return f"digest has {len(encoded)} hex digits; sha256 needs exactly 64"


def _split_registry(name: str) -> tuple[str | None, str]:
    first, slash, rest = name.partition("/")
    if slash and (first == "localhost" or any(c in first for c in ".:") or first.lower() != first):
        return first, rest
    return None, name


def _explain_invalid(text: str) -> str:
    variable = _VARIABLE_RE.search(text)
    if variable:
        return f"{text!r} contains the variable {variable.group(0)!r}; it names no image until something fills it in"
    if any(c.isspace() for c in text):
        return f"{text!r} contains whitespace"
    if text.count("@") > 1:
        return f"{text!r} has more than one '@'"
    name_and_tag, _, digest = text.partition("@")
    if digest and not re.fullmatch(_DIGEST, digest):
        return f"{digest!r} is not a digest (algorithm:hex with at least 32 hex digits)"
    slash, colon = name_and_tag.rfind("/"), name_and_tag.rfind(":")
    name, tag = (name_and_tag[:colon], name_and_tag[colon + 1:]) if colon > slash else (name_and_tag, None)
    if tag is not None and not _TAG_RE.fullmatch(tag):
        return f"tag {tag!r} is not valid (letters, digits, _ . -, at most 128, not starting with . or -)"
    registry, path = _split_registry(name)
    if registry is not None and not _DOMAIN_AND_PORT_RE.fullmatch(registry):
        return f"{registry!r} is not a registry host[:port]"
    if path != path.lower():
        return f"repository {path!r} must be lower case"
    return (f"repository {path!r} is not a path of lower-case letters and digits joined by single . _ __ "
            "or runs of -, with components separated by /")


# -- references inside free text -------------------------------------------------------------------

@dataclass(frozen=True)
class ImageMention:
    """A probable image reference found in free text, for a rule to check."""

    text: str
    start: int
    end: int
    found_by: str
    ref: ImageRef | None
    unpinned_reason: str | None

    @property
    def pinned(self) -> bool:
        return self.unpinned_reason is None


_CLI_RUN = re.compile(r"\b(?:docker|podman|nerdctl)\s+(?:(?:image|container)\s+)?(?:pull|run|create)\b")
_KEYWORD_CONTEXT = re.compile(
    r"""(?x)
    (?: ^[ \t]*FROM(?:[ \t]+--platform=\S+)?[ \t]+
      | ["']?\bimage["']?[ \t]*[:=]
      | --image(?:=|[ \t]+)
    )
    [ \t]*["']?
    """,
    re.MULTILINE,
)
# docker run/create flags that take the next word as their value
_CLI_VALUE_FLAGS = frozenset(
    "-a -c -e -h -l -m -p -u -v -w --add-host --attach --cap-add --cap-drop --cgroup-parent --cidfile "
    "--cpus --cpu-shares --cpuset-cpus --device --dns --entrypoint --env --env-file --expose --gpus "
    "--group-add --health-cmd --hostname --ip --label --label-file --log-driver --log-opt --memory "
    "--mount --name --network --platform --pull --restart --security-opt --shm-size --stop-signal "
    "--stop-timeout --storage-opt --sysctl --tmpfs --ulimit --user --userns --volume --volumes-from "
    "--workdir".split()
)
_KEYWORD_TOKEN = re.compile(r"\{\{.*?\}\}|\$\{[^}\s]*\}?[^\s\"',;)\]}]*|[^\s\"',;)\]}]+")
_CANDIDATE_TOKEN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/:@+-]*")
_URL_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_DIGEST_IN_TOKEN = re.compile(r"@[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]+")


def _cli_image_word(text: str, position: int) -> re.Match[str] | None:
    """The first word after ``position`` on the same line that is not a flag or a flag's value."""
    line_end = text.find("\n", position)
    line_end = len(text) if line_end < 0 else line_end
    skip_next = False
    for word in _KEYWORD_TOKEN.finditer(text, position, line_end):
        value = word.group(0)
        if skip_next:
            skip_next = False
            continue
        if value.startswith("-"):
            skip_next = "=" not in value and value in _CLI_VALUE_FLAGS
            continue
        return word
    return None


def find_image_references(text: str) -> list[ImageMention]:
    """Probable image references in ``text`` (a command string, a script, JSON, YAML), in order.

    Heuristics, in the order they claim a span of text:

    1. ``keyword``: the image word of ``docker|podman|nerdctl [image|container] pull|run|create``
       (flags are skipped, and so is the value of the common flags that take one, such as ``-v``,
       ``-e``, ``--name``); the word after a Dockerfile ``FROM``; the value after ``image:`` or
       ``image=`` (YAML, JSON ``"image": "..."``, keyword arguments) and after ``--image``. Here
       anything counts, including ``nginx``, ``nginx:1.25`` and variables such as ``${IMG}``,
       ``$IMG`` or ``{{ .Image }}``, which are reported as not pinned.
    2. ``digest``: any word containing ``@<algorithm>:<hex>``.
    3. ``name-tag``: any word with a ``/`` and a ``:tag`` that parses as a reference, such as
       ``ghcr.io/org/app:1.2`` or ``org/app:latest``.

    Limits: a bare ``name`` or ``name:tag`` without a ``/`` is found only after a keyword, because
    ``key:value`` text (``no-new-privileges:true``, ``3000:3000``) looks the same. URLs
    (``scheme://``) and paths starting with ``/`` or ``.`` are skipped, so volume mounts such as
    ``/var/run/docker.sock:/var/run/docker.sock`` are not reported, while ``path/file:12`` in prose
    is a false positive. An unusual ``docker run`` flag that takes a separate value makes rule 1
    report that value instead of the image, and a command split into argv elements
    (``["docker", "pull", "x"]``) is not seen as a command. References assembled at run time (string
    concatenation, ``$REGISTRY/$NAME:$TAG`` split over several variables) are reported only where a
    keyword precedes them, and never resolved.
    """
    mentions: list[ImageMention] = []
    claimed: list[tuple[int, int]] = []

    def add(start: int, end: int, found_by: str) -> None:
        while end > start and text[end - 1] in ".:":
            end -= 1
        if end <= start or any(start < e and s < end for s, e in claimed):
            return
        token = text[start:end]
        try:
            ref: ImageRef | None = parse_image_ref(token)
        except InvalidImageReference:
            ref = None
        claimed.append((start, end))
        mentions.append(ImageMention(token, start, end, found_by, ref, unpinned_reason(token)))

    for command in _CLI_RUN.finditer(text):
        word = _cli_image_word(text, command.end())
        if word:
            add(word.start(), word.end(), "keyword")
    for context in _KEYWORD_CONTEXT.finditer(text):
        word = _KEYWORD_TOKEN.match(text, context.end())
        if word and not word.group(0).startswith(("-", "#")):
            add(word.start(), word.end(), "keyword")

    for candidate in _CANDIDATE_TOKEN.finditer(text):
        start, token = candidate.start(), candidate.group(0)
        if start > 0 and text[start - 1] in "/.$":
            continue
        if _URL_SCHEME.match(text, start):
            continue
        if _DIGEST_IN_TOKEN.search(token):
            add(start, candidate.end(), "digest")
        elif "/" in token and ":" in token:
            try:
                ref = parse_image_ref(token.rstrip(".:"))
            except InvalidImageReference:
                continue
            if ref.tag is not None:
                add(start, candidate.end(), "name-tag")

    mentions.sort(key=lambda m: m.start)
    return mentions
