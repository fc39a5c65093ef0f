"""Turns pydantic errors into one-line problems that name the key path and the fix."""

from __future__ import annotations

import difflib
import types
import typing
from typing import Any

from pydantic import BaseModel, ValidationError

from fleet.config.problems import Problem


def _unwrap(annotation: Any) -> list[Any]:
    """The concrete types inside Optional/Union/Annotated."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        out: list[Any] = []
        for arg in typing.get_args(annotation):
            out.extend(_unwrap(arg))
        return out
    return [annotation]


def _child_annotation(annotation: Any, step: Any) -> Any:
    if isinstance(step, str) and step.startswith("<"):
        return annotation  # union branch tag
    for candidate in _unwrap(annotation):
        origin = typing.get_origin(candidate)
        if isinstance(candidate, type) and issubclass(candidate, BaseModel) and isinstance(step, str):
            for field in candidate.model_fields.values():
                if (field.alias or "") == step:
                    return field.annotation
        elif origin in (list, tuple, set, frozenset) and isinstance(step, int):
            return typing.get_args(candidate)[0]
        elif origin is dict and isinstance(step, str):
            return typing.get_args(candidate)[1]
    return None


def _union_member(annotation: Any, step: Any) -> Any:
    """If ``step`` is a discriminated union's tag (pydantic puts it in the error location), the
    member it selects; else None."""
    if not isinstance(step, str) or annotation is None:
        return None
    models = [c for c in _unwrap(annotation) if isinstance(c, type) and issubclass(c, BaseModel)]
    if len(models) < 2:
        return None
    for model in models:
        for field in model.model_fields.values():
            if typing.get_origin(field.annotation) is typing.Literal and step in typing.get_args(field.annotation):
                return model
    return None


def clean_loc(root: Any, loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """``loc`` without union tags and pydantic's ``[key]`` markers: only the user's keys."""
    out = []
    annotation = root
    for step in loc:
        if isinstance(step, str) and (step.startswith("<") or step == "[key]"):
            continue
        member = _union_member(annotation, step)
        if member is not None:
            annotation = member
            continue
        out.append(step)
        annotation = _child_annotation(annotation, step) if annotation is not None else None
    return tuple(out)


def model_at(root: Any, loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The model class that owns the last step of ``loc`` (for did-you-mean on unknown keys)."""
    annotation = root
    for step in loc:
        annotation = _child_annotation(annotation, step)
        if annotation is None:
            return None
    for candidate in _unwrap(annotation):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def known_keys(model: type[BaseModel]) -> list[str]:
    return [field.alias or name for name, field in model.model_fields.items()]


def did_you_mean(word: str, choices: list[str]) -> str:
    match = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    if match:
        return f"did you mean {match[0]!r}?"
    return f"known keys: {', '.join(sorted(choices))}"


def format_path(prefix: str, loc: tuple[Any, ...]) -> str:
    text = prefix
    for step in loc:
        if isinstance(step, str) and (step.startswith("<") or step == "[key]"):
            continue  # a union branch tag or pydantic's marker for an invalid mapping key
        if isinstance(step, int):
            text += f"[{step}]"
        elif text.endswith(":") or not text:
            text += str(step)
        else:
            text += f".{step}"
    return text


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def message_for(error: dict[str, Any], root: Any, secret: bool) -> str:
    kind = error["type"]
    ctx = error.get("ctx") or {}
    value = error.get("input")
    got = "" if secret else f" (got {_show(value)})"
    loc = tuple(error["loc"])
    if kind == "missing":
        return "is required"
    if kind == "extra_forbidden":
        owner = model_at(root, loc[:-1])
        hint = did_you_mean(str(loc[-1]), known_keys(owner)) if owner else ""
        return f"unknown key; {hint}" if hint else "unknown key"
    if kind in ("greater_than_equal", "greater_than"):
        bound = ctx.get("ge", ctx.get("gt"))
        word = "at least" if kind == "greater_than_equal" else "greater than"
        return f"must be {word} {bound}{got}"
    if kind in ("less_than_equal", "less_than"):
        bound = ctx.get("le", ctx.get("lt"))
        word = "at most" if kind == "less_than_equal" else "less than"
        return f"must be {word} {bound}{got}"
    if kind in ("int_parsing", "int_type", "int_from_float"):
        return f"must be a whole number{got}"
    if kind in ("bool_parsing", "bool_type"):
        return f"must be true or false{got}"
    if kind == "string_type":
        return f"must be a string{got}"
    if kind in ("list_type", "tuple_type"):
        return f"must be a list{got}"
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return f"must be a mapping of keys to values{got}"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')}{got}"
    if kind == "too_short":
        return f"must have at least {ctx.get('min_length')} item(s)"
    if kind == "too_long":
        return f"must have at most {ctx.get('max_length')} item(s)"
    if kind == "string_too_long":
        return f"must be at most {ctx.get('max_length')} characters{got}"
    if kind == "string_too_short":
        return f"must be at least {ctx.get('min_length')} characters{got}"
    if kind == "string_pattern_mismatch":
        return f"must match {ctx.get('pattern')}{got}"
    if kind in ("value_error", "assertion_error"):
        reason = ctx.get("error")
        return str(reason) if reason is not None else error["msg"]
    return error["msg"] + got


def problems_from(
    exc: ValidationError,
    *,
    root: Any,
    source: str,
    prefix: str,
    secret_paths: tuple[str, ...] = (),
) -> list[Problem]:
    out = []
    for error in exc.errors(include_url=False):
        loc = clean_loc(root, tuple(error["loc"]))
        error = dict(error, loc=loc)
        path = format_path(prefix, loc)
        secret = any(path == p or path.startswith(p + ".") or path.startswith(p + "[") for p in secret_paths)
        out.append(Problem(source, path, message_for(error, root, secret)))
    return out
