"""The one entry point that reads a stack's configuration: the schema first (``fleet.config``), then
the checks each domain owns, in a fixed order, so every problem of a stack file is reported at once.

* nodes: role, network, node groups, address blocks, image use, overlay (``fleet.nodes.checks``);
* images: recipe inputs and mkosi declarations, checked by the recipes themselves (``fleet.images``);
* apps: files and settings of dstack apps (``fleet.apps.plans``), when the repository is known;
* inputs: values the program hands to a domain's parser, run through that parser first, and the
  repository files builds read (``fleet.stacks.inputs``).
* rollout: the URL templates `make rollout` reads nodes with (``fleet.stacks.rollout``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fleet.apps.plans import app_problems
from fleet.config import stackfile
from fleet.config.problems import ConfigError, Problem
from fleet.config.schema import NAMESPACE, StackConfig, parse
from fleet.images import mkosibuild
from fleet.images.recipes import validate_build
from fleet.images.versions import build_inputs
from fleet.nodes.checks import check_all
from fleet.project.bootstrap import bootstrap_problems
from fleet.stacks import inputs
from fleet.stacks.expectations import verify_problems
from fleet.stacks.rollout import rollout_problems


def load(
    raw: dict[str, Any],
    *,
    stack: str,
    source: str,
    secret_keys: frozenset[str] | set[str] = frozenset(),
    root: Path | None = None,
) -> StackConfig:
    """Validate a stack's config; raise ``ConfigError`` with every problem found. With ``root``
    (the repository), files the config names (compose files) are checked too."""
    config = parse(raw, stack=stack, source=source, secret_keys=secret_keys)
    problems = check_all(config)
    problems += build_problems(config, source, root)
    problems += verify_problems(config)
    problems += rollout_problems(config)
    if root is not None:
        problems += app_problems(config, root)
    problems += inputs.problems(config, root)
    problems += bootstrap_problems(config)
    if problems:
        raise ConfigError(problems)
    return config


def load_config(root: Path, stack: str, *, overrides: dict[str, Any] | None = None,
                secret_overrides: dict[str, Any] | None = None) -> tuple[stackfile.StackFile, StackConfig]:
    """Read and validate a stack file; raises ``ConfigError``."""
    sf = stackfile.read(root, stack, overrides=overrides, secret_overrides=secret_overrides)
    cfg = load(sf.config, stack=stack, source=sf.source, secret_keys=sf.secret_keys, root=root)
    return sf, cfg


def build_problems(config: StackConfig, source: str, root: Path | None) -> list[Problem]:
    """Recipe inputs checked by the recipes themselves (commits, sha256s, output parameters)."""
    out = []
    for key, image in sorted(config.fleet.images.items()):
        if image.build is not None:
            out += [Problem(source, path, message) for path, message in
                    validate_build(build_inputs(image), key=key, root=root)]
    if root is not None:
        for key, container in sorted(config.fleet.containers.items()):
            if container.mkosi is not None:
                out += [Problem(source, f"{NAMESPACE}:containers.{key}.mkosi.{path}", message)
                        for path, message in mkosibuild.validate(container.mkosi, root)]
    return out
