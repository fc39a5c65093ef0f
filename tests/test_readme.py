"""The README's generated sections match the code, and it gives the two commands."""

from __future__ import annotations

from .conftest import ROOT
from .readme_gen import config_reference, render


def test_generated_sections_are_current():
    assert (ROOT / "README.md").read_text() == render(ROOT), "README.md is stale: run `make readme`"


def test_readme_gives_the_two_commands_and_marks_real_deployment():
    text = (ROOT / "README.md").read_text()
    assert "make plan STACK=dev" in text and "make test" in text
    assert "Not executed in this repository's CI" in text


def test_every_config_field_is_documented():
    table = config_reference()
    assert "| `dstack-fleet:nodes[].count` | integer | **required** |" in table
    for line in table.splitlines()[2:]:
        assert line.split("|")[4].strip(), f"field without description: {line}"


def test_ci_runs_the_readme_test_command():
    assert "make test" in (ROOT / ".ci" / "run").read_text()
