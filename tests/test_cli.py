"""The command line and the Makefile as a newcomer meets them: help, first runs, pipes, failures."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT

MAKE = ["make", "-s", "--no-print-directory", "PY_DEPS=", f"PY={sys.executable}"]


def make(*args: str, cwd: Path = ROOT, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([*MAKE, *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **env} if env else None)


def test_make_alone_lists_the_targets():
    result = subprocess.run(["make", "--no-print-directory"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    listed = {line.split()[0] for line in result.stdout.splitlines()[1:] if line.startswith("  ")}
    assert {"help", "test", "test-fast", "plan", "diff", "golden", "readme", "up", "bench", "lock-deps"} <= listed
    assert ".installed" not in result.stdout


@pytest.mark.parametrize("seed", [None, "42"])
def test_make_test_random_prints_the_seed_it_runs_with(seed):
    """pytest's header, which names the seed, is quiet (-q): the Makefile picks the seed, prints it and
    passes that same one, so a failing order can be repeated."""
    import re

    result = subprocess.run(["make", "-n", "--no-print-directory", "test-random", "PY_DEPS=",
                             *([f"SEED={seed}"] if seed else [])], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    printed = re.search(r"random order, seed (\d+): make test-random SEED=(\d+) repeats it", result.stdout)
    used = re.search(r"-p randomly --randomly-seed=(\d+)", result.stdout)
    assert printed and used, result.stdout
    assert printed[1] == printed[2] == used[1]
    if seed:
        assert used[1] == seed


def test_plan_json_dash_writes_only_the_json_to_stdout(tmp_path):
    result = subprocess.run([sys.executable, "-m", "fleet", "plan", "--stack", "dev", "--json", "-"],
                            cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["stack"] == "dev"
    assert not (tmp_path / "-").exists()


BROKEN_PROGRAM = '''
def _configure_broken():
    raise RuntimeError("simulated bug")


_configure_broken()
'''


@pytest.fixture
def broken_project(project):
    with (project.root / "__main__.py").open("a") as f:
        f.write(BROKEN_PROGRAM)
    return project


def test_a_program_failure_names_the_failing_statement_and_the_debug_switch(broken_project):
    result = make("plan", "STACK=dev", f"FLEET_ROOT={broken_project.root}")
    assert result.returncode == 2  # GNU make's only failure status; the tool itself exits 3
    lines = (broken_project.root / "__main__.py").read_text().splitlines()
    line = lines.index('    raise RuntimeError("simulated bug")') + 1
    assert (f"error: the program failed in the preview pass: RuntimeError: simulated bug "
            f"(at __main__.py:{line} in _configure_broken)") in result.stderr
    assert "DEBUG=1" in result.stderr and "Traceback" not in result.stderr
    direct = subprocess.run([sys.executable, "-m", "fleet", "--root", str(broken_project.root), "plan", "--stack",
                             "dev"], cwd=ROOT, capture_output=True, text=True)
    assert direct.returncode == 3


def test_debug_shows_the_traceback(broken_project):
    result = make("plan", "STACK=dev", f"FLEET_ROOT={broken_project.root}", "DEBUG=1")
    assert "Traceback (most recent call last)" in result.stderr and "simulated bug" in result.stderr


def test_python_on_the_command_line_reaches_the_first_run(tmp_path):
    """`make plan PYTHON=…` on a clone without .venv: the sub-make that builds .venv uses that PYTHON."""
    clone = tmp_path / "clone"
    clone.mkdir()
    for name in ("Makefile", "requirements.txt", "requirements-dev.txt"):
        shutil.copy(ROOT / name, clone / name)
    log = tmp_path / "calls"
    fake = tmp_path / "python-fake"
    fake.write_text(f"#!/bin/sh\necho \"$@\" >> {log}\necho 'fake python refuses' >&2\nexit 1\n")
    fake.chmod(0o755)
    result = subprocess.run(["make", "--no-print-directory", "plan", "STACK=dev", f"PYTHON={fake}"], cwd=clone,
                            capture_output=True, text=True)
    assert result.returncode != 0
    assert log.exists() and "sys.version_info" in log.read_text()  # the version check ran on the given PYTHON


FAKE_PIP_COMPILE = """#!/bin/sh
# a stand-in for pip-compile: writes the output file as the test asks (unchanged, or with one more line)
while [ $# -gt 0 ]; do case "$1" in -o) out=$2; shift;; esac; shift; done
[ -n "$FAKE_CHANGE" ] && echo "# changed" >> "$out"
exit 0
"""


@pytest.mark.parametrize("change", [False, True])
def test_lock_deps_rewrites_a_file_only_when_its_content_changes(tmp_path, change):
    clone = tmp_path / "clone"
    clone.mkdir()
    for name in ("Makefile", "requirements.in", "requirements-dev.in", "requirements.txt", "requirements-dev.txt"):
        shutil.copy(ROOT / name, clone / name)
    tools = tmp_path / "piptools"
    (tools / "bin").mkdir(parents=True)
    (tools / "bin" / "pip-compile").write_text(FAKE_PIP_COMPILE)
    (tools / "bin" / "pip-compile").chmod(0o755)
    before = {n: (clone / n).stat().st_mtime_ns for n in ("requirements.txt", "requirements-dev.txt")}
    digest = hashlib.sha256((clone / "requirements.txt").read_bytes()).hexdigest()
    result = subprocess.run(["make", "--no-print-directory", "lock-deps", f"PIPTOOLS={tools}"], cwd=clone,
                            capture_output=True, text=True, env={**os.environ, "FAKE_CHANGE": "1" if change else ""})
    assert result.returncode == 0, result.stderr
    after = {n: (clone / n).stat().st_mtime_ns for n in before}
    if change:
        assert "requirements.txt: updated" in result.stdout
        assert (clone / "requirements.txt").read_text().endswith("# changed\n")
    else:
        assert "requirements.txt: unchanged" in result.stdout and "requirements-dev.txt: unchanged" in result.stdout
        assert after == before
        assert hashlib.sha256((clone / "requirements.txt").read_bytes()).hexdigest() == digest


def test_build_outputs_are_ignored_by_git():
    ignored = subprocess.run(["git", "check-ignore", "-q", "--no-index", "dist/x.raw"], cwd=ROOT)
    assert ignored.returncode == 0


# ---- other interpreters ----------------------------------------------------------------------------------------

def interpreter(version: str) -> str | None:
    """A working ``python<version>``: on PATH (a pyenv shim there may not run), or installed by pyenv."""
    candidates = [shutil.which(f"python{version}")]
    candidates += sorted(glob.glob(os.path.expanduser(f"~/.pyenv/versions/{version}.*/bin/python{version}")))
    for candidate in filter(None, candidates):
        probe = subprocess.run([candidate, "-c", "import sys, venv; print(sys.version_info[:2])"],
                               capture_output=True, text=True)
        if probe.returncode == 0 and probe.stdout.strip() == str(tuple(map(int, version.split(".")))):
            return candidate
    return None


@pytest.mark.parametrize("version", ["3.12", "3.13"])
def test_the_locked_runtime_plans_prod_identically_on(version):
    """The Makefile accepts 3.12 and 3.13 because this passes: the hash-locked runtime requirements install
    there (their hashes cover that interpreter's wheels) and plan prod byte for byte as on 3.11. The venv is
    built once per requirements file and kept under .venv/pythons/."""
    python = interpreter(version)
    if python is None:
        pytest.skip(f"no Python {version} on this machine (PATH or ~/.pyenv); the Makefile still accepts it")
    digest = hashlib.sha256((ROOT / "requirements.txt").read_bytes()).hexdigest()[:16]
    venv = ROOT / ".venv" / "pythons" / f"{version}-{digest}"
    if not (venv / "installed").exists():
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([python, "-m", "venv", str(venv)], check=True)
        install = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--no-compile",
                                  "--disable-pip-version-check", "--require-hashes", "--no-deps", "-r",
                                  str(ROOT / "requirements.txt")], capture_output=True, text=True)
        assert install.returncode == 0, install.stderr[-3000:]
        (venv / "installed").touch()
    result = subprocess.run([str(venv / "bin" / "python"), "-m", "fleet", "plan", "--stack", "prod", "--json", "-"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout == (ROOT / "tests" / "golden" / "prod.plan.json").read_text()
