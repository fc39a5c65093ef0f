"""A fuzz test of our own over the stack schema: shipped stack files, changed at random places to
random values, planned through the real command line. Whatever the change, `fleet plan` ends with
exit 0, 1 or 2, never a traceback, and every problem is one line naming the stack file.

The examples are derandomized (the same ones every run, so the suite never flakes) and bounded
(``max_examples``, a deadline per example) to stay inside the test-suite budget."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import gc
import io
import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

from fleet.cli.main import main
from fleet.config import stackfile
from fleet.config.problems import ConfigError

from .conftest import PROGRAM_FILES, ROOT, stack_config

STACKS = ("bootstrap", "images", "dev", "staging", "prod")
BASES = {name: stack_config(name) for name in STACKS}


def _paths(value: Any, path: tuple = ()) -> list[tuple]:
    out = [path] if path else []
    if isinstance(value, dict):
        for key, item in value.items():
            out += _paths(item, path + (key,))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            out += _paths(item, path + (index,))
    return out


PATHS = {name: _paths(config) for name, config in BASES.items()}


def _at(config: Any, path: tuple) -> Any:
    for step in path:
        config = config[step]
    return config

HOSTILE = ["", "-h", "--help", "../../etc", "/etc/passwd", "a b", "x'])||true||('", "$(id)", "`id`", "a\nb", "\t",
           "ü", "x" * 300, "tcp:0:0", "sometimes", "not a url", "http://u:p@h/", "https://h?token=1", "0", "-1",
           "10.0.0.0/33", "127.0.0.0/20", "us-central1-z", "c3-standard-4", "prod", "main", "null", "{}", "[1]",
           "sha256:" + "0" * 64, "☃" * 5, "\x00"]
# values some shipped stack holds somewhere: a change to one of them is often still valid, which
# takes the example past the schema into the program
SHIPPED = sorted({repr(v): v for config in BASES.values() for path in _paths(config)
                  for v in [_at(config, path)] if not isinstance(v, (dict, list))}.values(), key=repr)
# ...and, for each key name, every value it has in some shipped stack
BY_KEY: dict[Any, list] = {}
for _config in BASES.values():
    for _path in _paths(_config):
        _value = _at(_config, _path)
        if not isinstance(_value, (dict, list)) and isinstance(_path[-1], str):
            BY_KEY.setdefault(_path[-1], []).append(_value)
SCALARS = st.one_of(
    st.sampled_from(SHIPPED), st.sampled_from(SHIPPED), st.sampled_from(HOSTILE), st.text(max_size=20), st.integers(min_value=-2**40, max_value=2**40),
    st.sampled_from([0, 1, 5, 65535, 65536, 10**20]), st.booleans(), st.none(), st.floats(allow_nan=True),
)
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(["a", "name", "port", "zone", "x-y", "1", "a\nb"]), inner,
                                                 max_size=3)), max_leaves=6)


def _apply(config: dict, path: tuple, operation: str, value: Any) -> None:
    parent = config
    for step in path[:-1]:
        parent = parent[step]
    last = path[-1]
    if operation == "delete":
        if isinstance(parent, dict):
            parent.pop(last, None)
        elif isinstance(parent, list) and len(parent) > last:
            parent.pop(last)
    elif operation == "add" and isinstance(parent.get(last) if isinstance(parent, dict) else None, dict):
        parent[last]["unknownKey"] = value
    elif operation == "append" and isinstance(parent, dict) and isinstance(parent.get(last), list):
        parent[last].append(value)
    else:
        parent[last] = value


@st.composite
def mutated(draw) -> tuple[str, dict]:
    stack = draw(st.sampled_from(STACKS))
    config = copy.deepcopy(BASES[stack])
    for _ in range(draw(st.sampled_from([1, 1, 2, 3]))):
        path = draw(st.sampled_from(PATHS[stack]))
        operation = draw(st.sampled_from(["like", "like", "replace", "delete", "add", "append"]))
        try:
            current = _at(config, path)
            if operation == "like" and not isinstance(current, (dict, list)):  # another value of the same type
                same_key = BY_KEY.get(path[-1], [])
                same_type = [v for v in SHIPPED if type(v) is type(current)]
                value = draw(st.sampled_from(same_key or same_type or [current]) if same_key and draw(st.booleans())
                             else st.sampled_from(same_type or [current]))
            else:
                value = draw(VALUES)
            _apply(config, path, "replace" if operation == "like" else operation, value)
        except (KeyError, IndexError, TypeError):
            pass  # an earlier change removed or retyped this path
    return stack, config


@pytest.fixture(scope="module")
def fuzz_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fuzz")
    for name in PROGRAM_FILES:
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, root / name)
    shutil.copytree(ROOT / "stacks", root / "stacks")
    shutil.copytree(ROOT / "apps", root / "apps")
    return root


def _plan(root: Path, stack: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    loop = asyncio.new_event_loop()  # the program binds outputs to the loop it runs on
    asyncio.set_event_loop(loop)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["--root", str(root), "plan", "--stack", stack])
            gc.collect()  # what a failed run leaves behind is reported with that run, as a process exit would
    finally:
        loop.close()
    return code, out.getvalue(), err.getvalue()


@settings(max_examples=30, deadline=timedelta(seconds=30), derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                 HealthCheck.data_too_large])
@given(case=mutated())
def test_any_change_to_a_stack_file_ends_in_0_1_or_2_with_one_line_per_problem(fuzz_root, case):
    stack, config = case
    path = fuzz_root / "stacks" / f"Pulumi.{stack}.yaml"
    original = path.read_text()
    try:
        path.write_text(yaml.safe_dump({"config": config}, allow_unicode=True))
        code, _, err = _plan(fuzz_root, stack)
    finally:
        path.write_text(original)
    assert "Traceback" not in err, err
    assert code in (0, 1, 2), err
    if code == 2:
        lines = err.splitlines()
        assert lines and all(line.startswith(f"stacks/Pulumi.{stack}.yaml: ") for line in lines), lines


@settings(max_examples=300, deadline=timedelta(seconds=2), derandomize=True, database=None)
@given(text=st.one_of(
    st.text(max_size=200),
    st.builds(lambda body: "config:\n" + body, st.text(alphabet=st.sampled_from(list("  \n:-[]{}&*!|>'\"#ab1")),
                                                       max_size=120)),
))
def test_any_text_as_a_stack_file_reads_or_is_one_line_per_problem(tmp_path_factory, text):
    root = tmp_path_factory.getbasetemp() / "fuzz-text"
    (root / "stacks").mkdir(parents=True, exist_ok=True)
    (root / "stacks" / "Pulumi.x.yaml").write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        stackfile.read(root, "x")
    except ConfigError as exc:
        lines = exc.lines()
        assert lines and all(line.startswith("stacks/Pulumi.x.yaml") and "\n" not in line for line in lines)
