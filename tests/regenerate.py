"""``make golden`` and ``make readme``: regenerate the checked-in generated files.

Tests compare the same functions' output with what is committed, so a stale golden file or generated
section (README.md, docs/*.md) fails the suite with a message naming the command that fixes it.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

from fleet.plan.planner import Plan, build_plan
from fleet.config.stackfile import available_stacks

from . import readme_gen

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "golden"


def golden_files(root: Path = ROOT, stacks: list[str] | None = None,
                 plan_of: Callable[[str], Plan] | None = None) -> dict[Path, str]:
    """Golden URN lists and plan JSON of ``stacks`` (default: all); ``plan_of`` plans one stack
    (the tests pass their shared plans)."""
    plan_of = plan_of or (lambda stack: build_plan(root, stack))
    files: dict[Path, str] = {}
    for stack in stacks if stacks is not None else available_stacks(root):
        plan = plan_of(stack)
        files[GOLDEN / f"{stack}.urns"] = "".join(r.urn + "\n" for r in plan.resources)
        files[GOLDEN / f"{stack}.plan.json"] = plan.to_json()
    return files


def all_golden_files(root: Path = ROOT) -> dict[Path, str]:
    from .test_compose import golden_compose_files
    from .test_diff import golden_diff_files

    files = golden_files(root)
    files.update(golden_diff_files())
    files.update({GOLDEN / "compose" / name: text for name, text in golden_compose_files().items()})
    return files


def write(files: dict[Path, str]) -> None:
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path.relative_to(ROOT)}")


def main(argv: list[str]) -> int:
    what = argv[0] if argv else ""
    if what == "golden":
        files = all_golden_files()
        stale = {p for p in GOLDEN.rglob("*") if p.is_file() and p not in files}
        for path in stale:
            path.unlink()
            print(f"removed {path.relative_to(ROOT)}")
        write(files)
    elif what == "readme":
        write(readme_gen.render_all(ROOT))
    else:
        print("usage: python -m tests.regenerate golden|readme", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
