"""The README's everyday recipes, played as written on a committed copy of the repository.

In README.md, each block of a recipe that can run offline follows a marker line
``<!-- recipe: NAME -->`` (``<!-- recipe: NAME (LABEL) -->`` names a point the test prepares
something first). The block's fence says what it is:

* ``diff``: an edit of one file: ``--- a/PATH``, ``+++ b/PATH``, then hunks (separated by ``@@``
  lines) of context (`` ``), removed (``-``) and added (``+``) lines. A hunk applies where its
  context and removed lines occur exactly once, so an edit whose context the stack files no longer
  have fails here;
* ``sh``: commands, one a line, run from the copy's root; each must exit 0, or the code its
  ``# exits N`` comment names. ``make test`` and ``make test-fast`` (this suite) are not run;
* ``text``: lines the output (standard output and error) of the last command contains, each one
  somewhere in it; a ``…`` stands for any text within the line.

So the recipes' edits, commands, exit codes and quoted output cannot drift from the code. What the
README leaves to GCP or CI is prepared by the test: a build recorded in the lock file (recipe 3), a
deployed prod stack and the real CLI's preview of the change (recipe 5: ``tests/fake_pulumi.py``).
Commands run with the ready ``.venv`` (a symlink to this interpreter's environment; ``PY_DEPS`` empty
so make never rebuilds it), as the other tests run make.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from .conftest import ROOT

MARKER = re.compile(r"^(?P<indent>\s*)<!-- recipe: (?P<name>[a-z0-9-]+)(?: \((?P<label>[a-z0-9 -]+)\))? -->$")
FENCE = re.compile(r"^(?P<indent>\s*)```(?P<lang>[a-z]*)$")
EXITS = re.compile(r"\s+#\s*exits (?P<code>\d+)\s*$")
NOT_RUN = {"make test", "make test-fast"}  # the suite this test is part of
GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com"]


@dataclass
class Block:
    recipe: str
    label: str | None
    kind: str  # diff, sh, text
    lines: list[str]
    line: int  # in README.md, for messages

    def where(self) -> str:
        return f"README.md:{self.line} (recipe {self.recipe})"


def blocks(text: str) -> list[Block]:
    """Every marked block of ``text``, in order."""
    out: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        marker = MARKER.match(lines[i])
        i += 1
        if not marker:
            continue
        while i < len(lines) and not lines[i].strip():
            i += 1
        fence = FENCE.match(lines[i]) if i < len(lines) else None
        assert fence and fence.group("lang") in ("diff", "sh", "text"), \
            f"README.md:{i}: a recipe marker must precede a diff, sh or text block"
        indent, start = fence.group("indent"), i + 1
        body = []
        i += 1
        while lines[i].rstrip() != indent + "```":
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i].lstrip())
            i += 1
        i += 1
        out.append(Block(marker.group("name"), marker.group("label"), fence.group("lang"), body, start))
    return out


def apply_edit(root: Path, block: Block) -> None:
    head = block.lines[:2]
    assert head[0].startswith("--- a/") and head[1].startswith("+++ b/"), f"{block.where()}: no file header"
    path = root / head[1][len("+++ b/"):]
    text = path.read_text()
    hunks: list[list[str]] = [[]]
    for line in block.lines[2:]:
        if line.startswith("@@"):
            hunks.append([])
        else:
            hunks[-1].append(line)
    for hunk in filter(None, hunks):
        assert all(l[:1] in (" ", "-", "+", "") for l in hunk), f"{block.where()}: not a diff line in {hunk}"
        old = "".join(l[1:] + "\n" for l in hunk if l[:1] in (" ", "-", ""))
        new = "".join(l[1:] + "\n" for l in hunk if l[:1] in (" ", "+", ""))
        count = ("\n" + text).count("\n" + old)
        assert count == 1, f"{block.where()}: the edit's context occurs {count} times in {path.name}:\n{old}"
        text = ("\n" + text).replace("\n" + old, "\n" + new, 1)[1:]
    path.write_text(text)


@dataclass
class Player:
    """Plays one recipe's blocks on the copy, in order."""

    root: Path
    name: str
    env: dict[str, str] = field(default_factory=dict)
    output: str = ""
    ran: list[str] = field(default_factory=list)

    def __post_init__(self):
        self.todo = [b for b in blocks((ROOT / "README.md").read_text()) if b.recipe == self.name]
        assert self.todo, f"README.md has no recipe {self.name!r}"

    def play(self, until: str | None = None) -> None:
        """The blocks up to the one labelled ``until`` (all that are left without it)."""
        while self.todo:
            block = self.todo[0]
            if until is not None and block.label == until:
                return
            self.todo.pop(0)
            getattr(self, block.kind)(block)
        assert until is None, f"recipe {self.name} has no block labelled {until!r}"

    def diff(self, block: Block) -> None:
        apply_edit(self.root, block)

    def sh(self, block: Block) -> None:
        for line in block.lines:
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            expected = EXITS.search(line)
            command = EXITS.sub("", line).strip()
            if command in NOT_RUN:
                continue
            result = subprocess.run(command, shell=True, cwd=self.root, capture_output=True, text=True, timeout=600,
                                    env=shell_env({**os.environ, "PY_DEPS": "", **self.env}))
            self.output = result.stdout + result.stderr
            self.ran.append(command)
            code = int(expected.group("code")) if expected else 0
            assert result.returncode == code, (f"{block.where()}: `{command}` exited {result.returncode}, the README "
                                               f"says {code}:\n{self.output[-4000:]}")

    def text(self, block: Block) -> None:
        missing = [line for line in block.lines if line.strip() and not shown(line.strip(), self.output)]
        assert not missing, (f"{block.where()}: the output of `{self.ran[-1]}` lacks:\n" + "\n".join(missing)
                             + f"\n--- it was:\n{self.output[-6000:]}")


def shown(expected: str, output: str) -> bool:
    """``expected`` is in ``output``; a ``…`` in it stands for any text within the same line."""
    if "…" not in expected:
        return expected in output
    pattern = ".*?".join(re.escape(part) for part in expected.split("…"))
    return re.search(pattern, output) is not None


def shell_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` as a user's shell has it: without what an enclosing make (``make test``) passes its
    sub-makes, which would turn make's messages into ``make[1]: …``."""
    return {k: v for k, v in env.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES")}


# ---- the copy -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def committed(tmp_path_factory) -> Path:
    """One committed copy of the repository (what git tracks, and new files not ignored) with the
    ready virtual environment; each test plays on it and the fixture below resets it."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    repo = tmp_path_factory.mktemp("recipes") / "repo"
    for name in filter(None, files):
        if not (ROOT / name).is_file():
            continue  # deleted in the working tree
        target = repo / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target)
    (repo / ".venv").symlink_to(Path(sys.prefix))
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run(GIT + ["add", "-A"], cwd=repo, check=True)
    subprocess.run(GIT + ["commit", "-qm", "base"], cwd=repo, check=True)
    return repo


@pytest.fixture
def repo(committed):
    yield committed
    subprocess.run(["git", "checkout", "-q", "--", "."], cwd=committed, check=True)
    subprocess.run(["git", "clean", "-qfd"], cwd=committed, check=True)


def changed(root: Path) -> set[str]:
    status = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, check=True)
    return {line[3:] for line in status.stdout.splitlines()}


# ---- the recipes ----------------------------------------------------------------------------------------------


def test_every_marked_block_belongs_to_a_recipe_played_here():
    played = {"grow", "bump", "bump-mpc-node", "add-app", "upgrade", "refused"}
    assert {b.recipe for b in blocks((ROOT / "README.md").read_text())} == played


def test_grow_a_node_group(repo):
    recipe = Player(repo, "grow")
    recipe.play()
    assert recipe.ran == ["make golden", "make plan STACK=prod", "make diff STACK=prod"]
    # make golden rewrote prod's golden files, which make test compares with the plan
    assert {"tests/golden/prod.urns", "tests/golden/prod.plan.json"} <= changed(repo)


def test_bump_a_container_digest(repo):
    Player(repo, "bump").play()


def test_bump_the_near_mpc_node_image_through_the_launchers_override(repo):
    Player(repo, "bump-mpc-node").play()


def test_add_an_app(repo):
    from .test_readiness import lock_everything

    recipe = Player(repo, "add-app")
    recipe.play(until="built")
    # the images workflow built the app's container and its lock pull request was merged
    lock_everything(Copy(repo), "dev")
    recipe.play()


def test_roll_an_image_upgrade(repo):
    Player(repo, "upgrade").play()


def test_fix_a_refused_rollout(repo, tmp_path):
    from fleet.plan.planner import build_plan

    from .fake_pulumi import PreviewBuilder, calls, install
    from .test_deploy import ENCRYPTED_KEY
    from .test_readiness import lock_everything

    # prod as deployed: the stack initialised once by the operator (its encryptedkey), every build locked
    stack = repo / "stacks" / "Pulumi.prod.yaml"
    text = stack.read_text()
    assert "\nsecretsprovider: " in text
    stack.write_text(re.sub(r"(\nsecretsprovider: [^\n]*\n)", rf"\1encryptedkey: {ENCRYPTED_KEY}\n", text, count=1))
    lock_everything(Copy(repo), "prod")
    deployed = json.loads(build_plan(repo, "prod").to_json())

    recipe = Player(repo, "refused")
    recipe.play(until="preview")
    # the real CLI's preview of the change against that deployment; no node answers from here
    planned = json.loads(build_plan(repo, "prod").to_json())
    cli = tmp_path / "cli"
    recipe.env = {**install(cli, ROOT, PreviewBuilder(planned, deployed).document()),
                  "PULUMI_BACKEND_URL": "gs://acme-tee-ops-fleet-state", "FLEET_UP_YES": "1",
                  "FLEET_EVIDENCE_DIR": str(tmp_path / "evidence"),
                  "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9", "no_proxy": ""}
    recipe.play()
    assert recipe.ran[0] == "make up STACK=prod" and recipe.ran[-1].startswith("make rollout")
    assert calls(cli, "up") == []  # every step refused before anything was applied


@dataclass
class Copy:
    """What the project helpers of other tests take: a root."""

    root: Path
