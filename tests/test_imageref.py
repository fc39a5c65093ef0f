"""Image references: the distribution/reference grammar, pinning, digest kinds, references in text."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleet.apps.imageref import (
    DigestKind,
    ImageDigest,
    InvalidImageReference,
    PinnedImage,
    find_image_references,
    parse_image_ref,
    repository_problem,
    unpinned_reason,
)

HEX = hashlib.sha256(b"manifest").hexdigest()
OTHER_HEX = hashlib.sha256(b"config").hexdigest()

# (reference, registry, repository, tag, digest)
PARSED = [
    ("nginx", None, "nginx", None, None),
    ("nginx:1.25", None, "nginx", "1.25", None),
    ("library/nginx:latest", None, "library/nginx", "latest", None),
    ("nearone/mpc-launcher@sha256:" + HEX, None, "nearone/mpc-launcher", None, "sha256:" + HEX),
    ("registry:5000/img", "registry:5000", "img", None, None),
    ("registry:5000/img:5000", "registry:5000", "img", "5000", None),
    (f"registry:5000/img@sha256:{HEX}", "registry:5000", "img", None, f"sha256:{HEX}"),
    (f"img:tag@sha256:{HEX}", None, "img", "tag", f"sha256:{HEX}"),
    ("localhost/img", "localhost", "img", None, None),
    ("localhost:5000/a/b/c:v1", "localhost:5000", "a/b/c", "v1", None),
    ("ghcr.io/org/app_name__x.y-z:1.0_rc-1", "ghcr.io", "org/app_name__x.y-z", "1.0_rc-1", None),
    ("Registry/img", "Registry", "img", None, None),  # upper case: only a registry can have it
    ("[::1]:5000/img:1", "[::1]:5000", "img", "1", None),
    ("10.0.0.1/team/img", "10.0.0.1", "team/img", None, None),
    ("a--b/c", None, "a--b/c", None, None),
    ("docker.io/socrates1024/simple-mkosi-app:" + HEX, "docker.io", "socrates1024/simple-mkosi-app", HEX, None),
]


@pytest.mark.parametrize("text,registry,repository,tag,digest", PARSED)
def test_parse_splits_and_round_trips(text, registry, repository, tag, digest):
    ref = parse_image_ref(text)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == (registry, repository, tag, digest)
    assert str(ref) == text


# (reference, why it is not a reference: a word of the message)
INVALID = [
    ("", "empty"),
    (" nginx", "whitespace"),
    ("nginx latest", "whitespace"),
    ("Nginx", "lower case"),
    ("org/Nginx", "lower case"),
    ("img:-tag", "tag"),
    ("img:" + "t" * 129, "tag"),
    ("img@sha256:abc", "digest"),
    ("img@@sha256:" + HEX, "more than one"),
    ("org//img", "repository"),
    ("org/-img", "repository"),
    ("org/img_", "repository"),
    ("host:port/img", "host[:port]"),
    ("my_host.io/img", "host[:port]"),  # a dot makes it a registry, and _ is not allowed in a host
    ("a" * 256, "255"),
    ("${IMG}", "variable"),
]


@pytest.mark.parametrize("text,word", INVALID)
def test_invalid_references_say_why(text, word):
    with pytest.raises(InvalidImageReference) as info:
        parse_image_ref(text)
    assert word in str(info.value)


# (reference, None if pinned else a word the reason must contain)
PINNING = [
    (f"nginx@sha256:{HEX}", None),
    (f"registry:5000/img@sha256:{HEX}", None),  # the port is not a tag
    (f"img:tag@sha256:{HEX}", None),
    (f"ghcr.io/org/app:1.0@sha256:{HEX}", None),
    (f"localhost:5000/a/b@sha256:{HEX}", None),
    ("registry:5000/img", "neither tag nor digest"),
    ("nginx", "neither tag nor digest"),
    ("nginx:1.25", "tag :1.25"),
    ("docker.io/socrates1024/simple-mkosi-app:" + HEX, "tag :" + HEX),  # a hash as a tag is still a tag
    (f"img@sha256:{HEX[:63]}", "63 hex digits"),
    (f"img@sha256:{HEX}0", "65 hex digits"),
    (f"img@sha256:{HEX[:31]}", "31 hex digits"),
    (f"img@sha256:{HEX.upper()}", "upper-case"),
    (f"img@sha512:{HEX}{HEX}", "'sha512' is not sha256"),
    (f"img@sha256:{HEX[:-1]}g", "not hex"),
    (f"img@{HEX}", "no algorithm"),
    ("", "empty"),
    ("   ", "empty"),
    ("${IMG}", "variable '${IMG}'"),
    ("${IMG:-nginx@sha256:" + HEX + "}", "variable"),
    ("$IMG", "variable '$IMG'"),
    (f"nearone/launcher@sha256:${{DIGEST}}", "variable"),
    ("{{ .Values.image }}", "variable"),
    (f"Nginx@sha256:{HEX}", "lower case"),
    (f"img@@sha256:{HEX}", "more than one '@'"),
]

# unpinned texts that are not references at all (the grammar refuses them); the others parse, unpinned
UNPARSABLE = {f"img@sha256:{HEX[:31]}", f"img@sha256:{HEX[:-1]}g", f"img@{HEX}", f"Nginx@sha256:{HEX}",
              f"img@@sha256:{HEX}"}


@pytest.mark.parametrize("text,word", PINNING)
def test_pinned_means_sha256_and_64_lowercase_hex(text, word):
    reason = unpinned_reason(text)
    if word is None:
        assert reason is None
        ref = parse_image_ref(text)
        assert ref.pinned and ref.manifest_digest.hex == HEX
    else:
        assert reason is not None and word in reason
        if any(v in text for v in ("$", "{{")) or not text.strip():
            assert "variable" in reason or "empty" in reason  # nothing a parser could read
        elif text in UNPARSABLE:
            with pytest.raises(InvalidImageReference):
                parse_image_ref(text)
        else:
            ref = parse_image_ref(text)
            assert not ref.pinned and ref.manifest_digest is None and ref.unpinned_reason == reason


def test_unpinned_reasons_name_the_fix():
    for text, word in PINNING:
        if word is not None and "variable" in word:
            assert "literally" in unpinned_reason(text)
        elif word is not None and "tag" in word:
            assert "@sha256:<64 hex>" in unpinned_reason(text)


def test_canonical_name_expands_docker_hub_only():
    assert parse_image_ref("nginx:1").canonical_name == "docker.io/library/nginx"
    assert parse_image_ref("nearone/mpc").canonical_name == "docker.io/nearone/mpc"
    assert parse_image_ref("index.docker.io/nginx").canonical_name == "docker.io/library/nginx"
    assert parse_image_ref("ghcr.io/nginx").canonical_name == "ghcr.io/nginx"
    assert parse_image_ref("localhost:5000/nginx").canonical_name == "localhost:5000/nginx"


def test_digest_kinds_are_typed_and_only_a_manifest_is_pullable():
    manifest = ImageDigest.parse(f"sha256:{HEX}", DigestKind.MANIFEST)
    image_id = ImageDigest.parse(f"sha256:{OTHER_HEX}", DigestKind.IMAGE_ID)
    assert manifest.reference("nearone/mpc-node") == f"nearone/mpc-node@sha256:{HEX}"
    with pytest.raises(ValueError, match="image-id"):
        image_id.reference("nearone/mpc-node")
    assert manifest != ImageDigest(HEX, DigestKind.IMAGE_ID)
    ref = parse_image_ref("nearone/mpc-node:main")
    assert str(ref.with_digest(manifest)) == f"nearone/mpc-node:main@sha256:{HEX}"
    with pytest.raises(ValueError, match="manifest digest"):
        ref.with_digest(image_id)
    for bad in (f"sha256:{HEX.upper()}", f"sha256:{HEX[:63]}", HEX, f"sha512:{HEX}"):
        with pytest.raises(ValueError):
            ImageDigest.parse(bad, DigestKind.MANIFEST)


def test_pinned_image_gives_each_consumer_the_kind_it_compares():
    ref = parse_image_ref(f"nearone/mpc-node@sha256:{HEX}")
    known = PinnedImage(ref, ImageDigest(OTHER_HEX, DigestKind.IMAGE_ID))
    assert known.digest(DigestKind.MANIFEST) == ImageDigest(HEX, DigestKind.MANIFEST)
    assert known.digest(DigestKind.IMAGE_ID) == ImageDigest(OTHER_HEX, DigestKind.IMAGE_ID)
    with pytest.raises(ValueError, match="docker image inspect"):
        PinnedImage(ref).digest(DigestKind.IMAGE_ID)
    with pytest.raises(ValueError, match="tag"):
        PinnedImage(parse_image_ref("nearone/mpc-node:latest"))
    with pytest.raises(ValueError, match="image_id must be of kind"):
        PinnedImage(ref, ImageDigest(OTHER_HEX, DigestKind.MANIFEST))


_COMPONENT = st.from_regex(r"[a-z0-9]{1,5}(?:[._-][a-z0-9]{1,5}){0,2}", fullmatch=True)
_FIRST_COMPONENT = st.from_regex(r"[a-z0-9]{1,5}(?:[_-][a-z0-9]{1,5}){0,2}", fullmatch=True)


@given(
    registry=st.none() | st.sampled_from(["ghcr.io", "registry:5000", "localhost", "10.1.2.3:443", "[::1]"]),
    path=st.tuples(_FIRST_COMPONENT, st.lists(_COMPONENT, max_size=2)).map(lambda p: "/".join([p[0], *p[1]])),
    tag=st.none() | st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}", fullmatch=True),
    digest=st.none() | st.binary(min_size=1, max_size=8).map(lambda b: "sha256:" + hashlib.sha256(b).hexdigest()),
)
def test_every_grammatical_reference_round_trips(registry, path, tag, digest):
    text = (f"{registry}/" if registry else "") + path + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")
    ref = parse_image_ref(text)
    assert str(ref) == text
    assert ref.tag == tag and ref.digest == digest
    assert ref.pinned == (digest is not None)
    assert (ref.registry, ref.repository) == (registry, path)


FREE_TEXT = f"""#!/bin/sh
docker pull nginx:1.25
docker run --rm -v /srv:/srv -e MODE=x --name web ghcr.io/org/web@sha256:{HEX} serve
podman run -it alpine
FROM python:3.11-slim@sha256:{HEX} AS build
services:
  app:
    image: ${{APP_IMAGE}}
    volumes:
      - /var/run/docker.sock:/var/run/docker.sock
      - shared-volume:/mnt/shared:rw
    security_opt:
      - no-new-privileges:true
    ports:
      - "3000:3000"
{{"image": "registry:5000/team/api:2.0", "url": "https://ghcr.io/org/page:1"}}
see also quay.io/org/tool:v2. and x@sha256:{HEX.upper()}
helm --image={{{{ .Values.image }}}}
"""


def test_find_image_references_in_free_text():
    found = {m.text: m for m in find_image_references(FREE_TEXT)}
    expected = {
        "nginx:1.25": ("keyword", False),
        f"ghcr.io/org/web@sha256:{HEX}": ("keyword", True),
        "alpine": ("keyword", False),
        f"python:3.11-slim@sha256:{HEX}": ("keyword", True),
        "${APP_IMAGE}": ("keyword", False),
        "registry:5000/team/api:2.0": ("keyword", False),
        "quay.io/org/tool:v2": ("name-tag", False),
        f"x@sha256:{HEX.upper()}": ("digest", False),
        "{{ .Values.image }}": ("keyword", False),
    }
    assert {text: (m.found_by, m.pinned) for text, m in found.items()} == expected
    assert "variable" in found["${APP_IMAGE}"].unpinned_reason
    assert "upper-case" in found[f"x@sha256:{HEX.upper()}"].unpinned_reason
    for mention in found.values():
        assert FREE_TEXT[mention.start:mention.end] == mention.text


def test_find_image_references_ignores_mounts_urls_and_key_values():
    text = "/a/b:/c/d ./x/y:/z https://ghcr.io/org/img:1 no-new-privileges:true 3000:3000 a:b"
    assert find_image_references(text) == []


@pytest.mark.parametrize(("text", "problem"), [
    ("docker.io/nearone/mpc-launcher", None),
    ("registry:5000/img", None),  # a port is not a tag
    ("[::1]:5000/team/img", None),
    ("docker.io/nearone/mpc-launcher:latest", "names the tag :latest; give the repository alone "
                                              "(docker.io/nearone/mpc-launcher)"),
    ("registry:5000/img:5000", "names the tag :5000; give the repository alone (registry:5000/img)"),
    (f"nearone/mpc-node@sha256:{HEX}", f"carries the digest sha256:{HEX}; give the repository alone (nearone/mpc-node)"),
    (f"img:tag@sha256:{HEX}", "carries the digest"),
    ("Nearone/MPC", "is not an image repository"),
])
def test_a_repository_is_refused_with_a_tag_or_digest(text, problem):
    found = repository_problem(text)
    assert (found is None) if problem is None else (problem in found)


@given(st.sampled_from([text for text, _, _, tag, digest in PARSED if tag is None and digest is None]))
def test_every_bare_repository_of_the_corpus_is_accepted(text):
    assert repository_problem(text) is None
