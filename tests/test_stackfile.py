"""Reading stack files as untrusted input: limits hold before anything is expanded, every mistake is
one line naming the file (and key), exit 2, never a traceback."""

from __future__ import annotations

import os
import time

import pytest

from fleet.cli.main import main
from fleet.config import stackfile
from fleet.config.problems import ConfigError

from .conftest import ROOT


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def plan(capsys, project, stack: str, *extra: str) -> tuple[int, list[str]]:
    code, _, err = run_cli(capsys, "--root", str(project.root), "plan", "--stack", stack, *extra)
    assert "Traceback" not in err
    return code, err.splitlines()


def problem_lines(project, stack: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        stackfile.read(project.root, stack)
    lines = info.value.lines()
    assert lines and all("\n" not in line for line in lines)
    return lines


def test_invalid_utf8_is_one_line(capsys, project):
    path = project.root / "stacks" / "Pulumi.latin1.yaml"
    path.write_bytes("config:\n  dstack-fleet:role: env\n  gcp:project: caf\xe9\n".encode("latin-1"))
    code, lines = plan(capsys, project, "latin1")
    assert code == 2 and lines == ["stacks/Pulumi.latin1.yaml: is not valid UTF-8 (byte 0xe9 at line 3); save the "
                                   "file as UTF-8"]


def test_yaml_nested_3000_deep_is_refused_without_recursion(capsys, project):
    project.write_stack("deep", text="config:\n  dstack-fleet:labels: " + "[" * 3000 + "]" * 3000 + "\n")
    code, lines = plan(capsys, project, "deep")
    assert code == 2 and len(lines) == 1
    assert lines[0].startswith("stacks/Pulumi.deep.yaml: invalid YAML at line 2") and "nested more than" in lines[0]


def test_a_600_byte_alias_bomb_is_refused_before_it_expands(capsys, project):
    # each level refers to the previous one nine times: 9**9 leaves once expanded
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{i}: &a{i} [{', '.join(['*a' + str(i - 1)] * 9)}]" for i in range(1, 9)]
    text = "config:\n  dstack-fleet:labels:\n" + "".join(f"    {line}\n" for line in levels)
    assert len(text) < 700
    project.write_stack("bomb", text=text)
    started = time.monotonic()
    code, lines = plan(capsys, project, "bomb")
    assert time.monotonic() - started < 5
    assert code == 2 and len(lines) == 1 and "anchor &a0 is not supported in stack files" in lines[0]


def test_an_alias_alone_is_refused_too(project):
    project.write_stack("alias", text="config:\n  gcp:project: *p\n")
    (line,) = problem_lines(project, "alias")
    assert "alias *p is not supported" in line or "found undefined alias" in line


@pytest.mark.parametrize("text, key, first", [
    ("config:\n  gcp:project: a-b-c-d\n  gcp:project: e-f-g-h\n", "gcp:project", 2),
    ("config:\n  dstack-fleet:network:\n    subnets:\n      us-central1: 10.0.0.0/20\n      us-central1: 10.1.0.0/20\n",
     "us-central1", 4),
    ("config:\n  dstack-fleet:labels:\n    '1': a\n    1: b\n", "1", 3),  # yaml.v3 compares the key text
])
def test_duplicate_keys_are_refused_as_the_pulumi_cli_does(project, text, key, first):
    project.write_stack("dupes", text=text)
    (line,) = problem_lines(project, "dupes")
    assert f"mapping key {key!r} already defined at line {first}" in line and line.startswith("stacks/Pulumi.dupes")


def test_oversized_stack_file_is_refused_before_parsing(project):
    project.write_stack("huge", text="config:\n  dstack-fleet:role: env\n" + "# padding\n" * 120_000)
    (line,) = problem_lines(project, "huge")
    assert line == "stacks/Pulumi.huge.yaml: is larger than 1024 KiB; a stack file holds configuration, not data"


def test_plaintext_under_secrets_is_refused_naming_the_key(project):
    project.mutate("prod", "plain", lambda c: c.update({"dstack-fleet:secrets": {
        "token": "hunter2", "ok": {"secure": "v1:abc"}, "odd": {"secure": "v1:abc", "extra": 1}}}))
    lines = problem_lines(project, "plain")
    assert [line.split(": ")[1] for line in lines] == ["dstack-fleet:secrets.odd", "dstack-fleet:secrets.token"]
    assert "hunter2" not in "".join(lines) and "pulumi config set --secret --path 'dstack-fleet:secrets.token'" \
        in lines[1]


def test_only_plain_yaml_types_are_built(project):
    project.write_stack("tagged", text="config:\n  gcp:project: !!binary aGVsbG8=\n")
    (line,) = problem_lines(project, "tagged")
    assert "tag 'tag:yaml.org,2002:binary' is not supported" in line
    project.write_stack("dated", text="config:\n  dstack-fleet:labels: {since: 2024-01-02}\n")
    assert stackfile.read(project.root, "dated").config["dstack-fleet:labels"] == {"since": "2024-01-02"}


def test_a_directory_in_place_of_the_file_is_one_line(project):
    os.mkdir(project.root / "stacks" / "Pulumi.dir.yaml")
    (line,) = problem_lines(project, "dir")
    assert line.startswith("stacks/Pulumi.dir.yaml: cannot be read: ")


def test_a_256_character_stack_name_is_bad_input(capsys):
    code, out, err = run_cli(capsys, "plan", "--stack", "a" * 256)
    assert code == 2 and out == ""
    assert err.splitlines() == [f"--stack: {'a' * 40!r}... is not a stack name: Pulumi allows 1-100 characters of "
                                "letters, digits, '_', '.' and '-'"]


@pytest.mark.parametrize("name", ["../stacks/Pulumi.dev", "dev/../../x", "", "dev prod"])
def test_stack_names_pulumi_refuses_never_reach_the_file_system(capsys, name):
    code, _, err = run_cli(capsys, "plan", "--stack", name)
    assert code == 2 and len(err.splitlines()) == 1 and "is not a stack name" in err


def test_json_into_a_missing_directory_is_bad_input_before_planning(capsys, tmp_path):
    target = tmp_path / "no" / "such" / "plan.json"
    code, out, err = run_cli(capsys, "plan", "--stack", "dev", "--json", str(target))
    assert code == 2 and out == "" and not target.exists()
    assert err.splitlines() == [f"--json: directory {str(target.parent)!r} does not exist; create it or write "
                                "elsewhere"]


def test_diff_output_into_a_missing_directory_is_bad_input(capsys, tmp_path):
    code, _, err = run_cli(capsys, "diff", "--stack", "dev", "--base", "HEAD", "--output", str(tmp_path / "x" / "d.md"))
    assert code == 2 and err.count("\n") == 1 and "--output: directory" in err


def test_json_is_written_whole_in_one_rename(capsys, project, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    target = out / "plan.json"
    target.write_text("old")
    code, _ = plan(capsys, project, "dev", "--json", str(target))
    assert code == 0 and target.read_text().startswith("{") and target.read_text().endswith("}\n")
    assert [p.name for p in out.iterdir()] == ["plan.json"]  # no partial file left behind


def test_an_unexpected_failure_is_one_line_and_exit_3(capsys, monkeypatch):
    from fleet.cli import main as cli

    def broken(args):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(cli, "cmd_bench", broken)
    code, _, err = run_cli(capsys, "bench")
    assert code == 3 and err.splitlines() == ["error: internal error: RuntimeError: boom (rerun with --debug for the "
                                              "traceback)"]


def test_a_json_value_nested_3000_deep_is_one_line(capsys, project):
    """Top-level values arrive JSON-encoded from the CLI; their depth is bounded like the file's."""
    project.write_stack("deepjson", text="config:\n  dstack-fleet:labels: '" + "[" * 3000 + "]" * 3000 + "'\n")
    code, lines = plan(capsys, project, "deepjson")
    assert code == 2 and "stacks/Pulumi.deepjson.yaml: dstack-fleet:labels: is nested more than 32 levels deep" in lines


def test_a_problem_is_one_line_even_when_the_key_holds_a_line_break(capsys, project):
    project.mutate("dev", "breaks", lambda c: c["dstack-fleet:labels"].update({"a\nb\x1b[31m": "x"}))
    code, lines = plan(capsys, project, "breaks")
    assert code == 2 and len(lines) == 1
    assert lines[0].startswith("stacks/Pulumi.breaks.yaml: dstack-fleet:labels.a\\nb\\x1b[31m: ")
