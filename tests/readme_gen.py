"""Generated sections of README.md and docs/*.md: the config reference (from the pydantic models) and
the resource graph (from the offline plans of the shipped stacks).

A section is marked ``<!-- BEGIN GENERATED:name -->`` … ``<!-- END GENERATED:name -->`` in any of those
files; ``make readme`` rewrites what is between the markers, and ``tests/test_readme.py`` fails when a
file differs from what this module renders."""

from __future__ import annotations

import re
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from fleet.config.schema import FleetConfig, GcpSettings

MARKER = re.compile(r"(<!-- BEGIN GENERATED:(?P<name>[a-z-]+) -->\n)(?P<body>.*?)(<!-- END GENERATED:(?P=name) -->)",
                    re.DOTALL)


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin in (typing.Union, types.UnionType):
        names = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(dict.fromkeys(names))
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if origin is dict:
        return f"map of {_type_name(args[0])} to {_type_name(args[1])}"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "object"
    if annotation is None or annotation is type(None):
        return "null"
    name = getattr(annotation, "__name__", str(annotation))
    return {"str": "string", "int": "integer", "bool": "boolean", "SecretStr": "secret string"}.get(name, name)


def _models_in(annotation: Any) -> list[tuple[str, type[BaseModel]]]:
    """(suffix, model) pairs for nested models: '' for a model, '[]' inside a list, '.<key>' in a map."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return _models_in(args[0])
    if origin in (typing.Union, types.UnionType):
        out: list[tuple[str, type[BaseModel]]] = []
        for a in args:
            out += _models_in(a)
        return out
    if origin is list:
        return [("[]" + s, m) for s, m in _models_in(args[0])]
    if origin is dict:
        return [(".<key>" + s, m) for s, m in _models_in(args[1])]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [("", annotation)]
    return []


def _default(field) -> str:
    if field.is_required():
        return "**required**"
    if field.default_factory is not None:
        value = field.default_factory()
        return "`{}`" if value == {} else "`[]`" if value == [] else "(defaults)"
    if field.default is None or field.default is PydanticUndefined:
        return "unset"
    return f"`{field.default}`"


def config_rows(model: type[BaseModel], prefix: str, seen: tuple[type, ...] = ()) -> list[str]:
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{field.alias or name}"
        description = (field.description or "").replace("|", "\\|").replace("\n", " ")
        rows.append(f"| `{key}` | {_type_name(field.annotation)} | {_default(field)} | {description} |")
        for suffix, nested in _models_in(field.annotation):
            if nested in seen:
                continue
            rows += config_rows(nested, f"{key}{suffix}.", seen + (model,))
    return rows


def config_reference() -> str:
    lines = ["| key | type | default | description |", "|---|---|---|---|"]
    lines += config_rows(GcpSettings, "gcp:")
    lines += config_rows(FleetConfig, "dstack-fleet:")
    return "\n".join(lines) + "\n"


def resource_graph(root: Path, plan_of=None) -> str:
    """Component-level graph of each stack role, edges from resource dependencies."""
    from fleet.config import stackfile
    from fleet.plan.planner import build_plan

    by_role: dict[str, str] = {}
    for stack in stackfile.available_stacks(root):
        role = stackfile.read(root, stack).config["dstack-fleet:role"]
        if role == "env" and stack != "prod":
            continue  # prod shows every env component
        by_role.setdefault(role, stack)

    lines = ["```mermaid", "flowchart LR"]
    for role, stack in sorted(by_role.items()):
        plan = plan_of(stack) if plan_of else build_plan(root, stack)
        top: dict[str, str] = {}  # urn -> top-level component label
        for r in plan.resources:
            node = r
            while node.parent is not None:
                node = next(x for x in plan.resources if x.urn == node.parent)
            top[r.urn] = node.type.split(":")[-1] if not node.custom else node.type.split("/")[-1].split(":")[-1]
        labels = sorted(set(top.values()))
        lines.append(f"  subgraph {role}[\"{role} stack ({stack})\"]")
        for label in labels:
            lines.append(f"    {role}_{label}[{label}]")
        lines.append("  end")
        edges = set()
        for r in plan.resources:
            for dep in r.dependencies:
                a, b = top.get(dep), top.get(r.urn)
                if a and b and a != b:
                    edges.add((a, b))
        lines += [f"  {role}_{a} --> {role}_{b}" for a, b in sorted(edges)]
    lines.append("```")
    return "\n".join(lines) + "\n"


def documents(root: Path) -> list[Path]:
    """The Markdown files that may hold generated sections: README.md and docs/*.md."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def render(root: Path, plan_of=None, path: Path | None = None) -> str:
    """``path`` (default README.md) with its generated sections rendered; ``plan_of(stack)`` plans a
    stack (tests pass their shared plans)."""
    path = path or root / "README.md"
    text = path.read_text(encoding="utf-8")
    generated = {"config-reference": config_reference, "resource-graph": lambda: resource_graph(root, plan_of)}

    def replace(match: re.Match) -> str:
        name = match.group("name")
        if name not in generated:
            raise KeyError(f"{path.relative_to(root)} has an unknown generated section {name!r}")
        return match.group(1) + generated[name]() + match.group(4)

    return MARKER.sub(replace, text)


def render_all(root: Path, plan_of=None) -> dict[Path, str]:
    """Every document of ``documents`` as ``make readme`` writes it."""
    return {path: render(root, plan_of, path) for path in documents(root)}
