"""README.md and docs/*.md: generated sections match the code, the README gives the two commands, and
the paths, modules, make targets and links they name exist."""

from __future__ import annotations

from pathlib import Path

import pytest

from .conftest import ROOT
from .plans import shipped_plan
from .readme_gen import MARKER, config_reference, documents, render


@pytest.mark.parametrize("document", [p.relative_to(ROOT).as_posix() for p in documents(ROOT)])
def test_generated_sections_are_current(document):
    path = ROOT / document
    assert path.read_text() == render(ROOT, shipped_plan, path), f"{document} is stale: run `make readme`"


def test_the_generated_sections_are_where_the_readme_says():
    found = {m.group("name"): p.relative_to(ROOT).as_posix() for p in documents(ROOT)
             for m in MARKER.finditer(p.read_text())}
    assert found == {"resource-graph": "README.md", "config-reference": "docs/configuration.md"}


def test_readme_gives_the_two_commands_and_marks_real_deployment():
    text = (ROOT / "README.md").read_text()
    assert "make plan STACK=prod" in text and "make test" in text
    assert "Not executed in this repository's CI" in (ROOT / "docs" / "operations.md").read_text()


def test_every_config_field_is_documented():
    table = config_reference()
    assert "| `dstack-fleet:nodes[].count` | integer | **required** |" in table
    for line in table.splitlines()[2:]:
        assert line.split("|")[4].strip(), f"field without description: {line}"


def test_ci_runs_the_readme_test_command():
    assert "make test" in (ROOT / ".ci" / "run").read_text()


# ---- hand-written references cannot rot -----------------------------------------------------------------------

import importlib  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402

DOCUMENTS = ("README.md", "ARCHITECTURE.md", "policies/README.md",
             *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md")))
PLACEHOLDER = re.compile(r"[<>…{}\[\]$|]")
MODULE = re.compile(r"(?:fleet|components)(?:\.[A-Za-z_][A-Za-z0-9_]*)+")


def tracked_top_level() -> set[str]:
    names = subprocess.run(["git", "-C", str(ROOT), "ls-files"], capture_output=True, text=True, check=True).stdout
    return {line.split("/")[0] for line in names.splitlines()}


def make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([a-z][a-z0-9-]*):", text, re.MULTILINE))


def ignored(path: str) -> bool:
    """Generated paths (``.venv/``, ``policies/venv``) are named in .gitignore, so they are real."""
    return any(subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", "--no-index", candidate]).returncode == 0
               for candidate in (path, path.rstrip("/") + "/"))


def code_spans(path) -> list[str]:
    return re.findall(r"`([^`\n]+)`", (ROOT / path).read_text(encoding="utf-8"))


def resolves(dotted: str) -> bool:
    """A module, or an attribute of one (``fleet.policy.rules.pack_config_for``)."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def broken_references(path, top_level: set[str], targets: set[str]) -> list[str]:
    broken = []
    for span in code_spans(path):
        words = span.split()
        if words[:1] == ["make"] and len(words) > 1 and "=" not in words[1]:
            if words[1] not in targets:
                broken.append(f"{span}: no make target {words[1]!r}")
            continue
        if len(words) != 1:
            continue
        token = words[0].rstrip(".,:;")
        if MODULE.fullmatch(token):
            if not resolves(token):
                broken.append(f"{token}: no such module or attribute")
        elif "/" in token and "://" not in token and not token.startswith("/") and not PLACEHOLDER.search(token):
            if token.split("/")[0] not in top_level:
                continue  # a path inside a guest, an upstream or a bucket, not this repository
            if "*" in token:
                if not list(ROOT.glob(token)):
                    broken.append(f"{token}: matches no file")
            elif not (ROOT / token).exists() and not ignored(token):
                broken.append(f"{token}: no such path")
    return broken


@pytest.mark.parametrize("document", DOCUMENTS)
def test_paths_modules_and_make_targets_named_in_backticks_exist(document):
    assert broken_references(document, tracked_top_level(), make_targets()) == []


def test_the_reference_check_finds_rot(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("see `fleet/nowhere.py`, `fleet.policy.rules.no_such_rule`, `make nope STACK=dev`, "
                   "`fleet/policy/rules.py`, `fleet.policy.rules.pack_config_for`, `make plan STACK=dev`, "
                   "`/dev/disk/by-id/google-data`, `tests/golden/*.urns`\n")
    assert broken_references(doc, tracked_top_level(), make_targets()) == [
        "fleet/nowhere.py: no such path",
        "fleet.policy.rules.no_such_rule: no such module or attribute",
        "make nope STACK=dev: no make target 'nope'",
    ]


# ---- links between the documents --------------------------------------------------------------------------------

LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)\)")


def anchors(path: Path) -> set[str]:
    """The anchors GitHub gives a Markdown file's headings: lower case, punctuation dropped, spaces to
    hyphens, a repeated one numbered."""
    seen: dict[str, int] = {}
    out = set()
    fenced = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        heading = re.match(r"#{1,6} (.+)", line)
        if fenced or not heading:
            continue
        slug = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-")
        out.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return out


def broken_links(path: Path) -> list[str]:
    """Relative links of ``path`` whose file, or whose file's heading, does not exist."""
    broken = []
    for target in LINK.findall(path.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        file, _, anchor = target.partition("#")
        resolved = (path.parent / file).resolve() if file else path.resolve()
        if not resolved.exists():
            broken.append(f"{target}: no such file")
        elif anchor and (resolved.suffix != ".md" or anchor not in anchors(resolved)):
            broken.append(f"{target}: no heading with that anchor")
    return broken


@pytest.mark.parametrize("document", DOCUMENTS)
def test_links_name_files_and_headings_that_exist(document):
    assert broken_links(ROOT / document) == []


def test_the_link_check_finds_rot(tmp_path):
    (tmp_path / "README.md").write_text("# dstack-fleet\n\n## Everyday tasks\n")
    (tmp_path / "docs").mkdir()
    doc = tmp_path / "docs" / "probe.md"
    doc.write_text("# A heading: with `code`, punctuation!\n\n[ok](#a-heading-with-code-punctuation) "
                   "[ok](../README.md#everyday-tasks) [gone](nowhere.md) [bad](#no-such-heading) "
                   "[bad](../README.md#no-such-heading) [web](https://example.com/#x)\n")
    assert broken_links(doc) == ["nowhere.md: no such file", "#no-such-heading: no heading with that anchor",
                                 "../README.md#no-such-heading: no heading with that anchor"]
