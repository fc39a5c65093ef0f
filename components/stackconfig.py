"""The stack's configuration, read from the Pulumi runtime and validated by ``fleet.config``.

The Python SDK has no public call that lists every config key, and a misspelt key can only be
caught with the full list. The program therefore reads the two places the runtime keeps config:
the in-process map (``pulumi.runtime.config.CONFIG``, filled by inline programs and mocks) and the
``PULUMI_CONFIG`` environment the language host sets for ``pulumi up``. Both are pinned with the
SDK version in requirements.txt and covered by tests/test_stackconfig.py.
"""

from __future__ import annotations

from typing import Any

import pulumi
from pulumi.runtime import config as runtime_config

from pathlib import Path

from fleet.images import lock
from fleet.config.schema import StackConfig
from fleet.config.values import NOT_SET
from fleet.images.lock import LockFile
from fleet.config.problems import ConfigError, Problem
from fleet.plan.offline import is_offline_plan
from fleet.stacks import readiness
from fleet.stacks.load import load


def runtime_values() -> tuple[dict[str, Any], set[str]]:
    values: dict[str, Any] = dict(runtime_config.get_config_env())
    values.update(runtime_config.CONFIG.get())
    secret_keys = set(runtime_config.get_config_secret_keys_env())
    secret_keys.update(runtime_config._SECRET_KEYS.get())
    return values, secret_keys


class ConfigRunError(pulumi.RunError):
    """A configuration mistake the program found: a ``pulumi.RunError`` (the CLI prints it without a
    traceback) that keeps its one-line problems, so the offline plan reports them as bad input."""

    def __init__(self, title: str, problems: list[Problem]):
        self.problems = problems
        super().__init__(title + "\n" + "\n".join(str(p) for p in sorted(set(problems))))


def load_stack_config(root: Path) -> StackConfig:
    """The validated config, or one ``pulumi.RunError`` that lists every problem (no traceback)."""
    stack = pulumi.get_stack()
    values, secret_keys = runtime_values()
    source = f"stacks/Pulumi.{stack}.yaml"
    try:
        return load(values, stack=stack, source=source, secret_keys=secret_keys, root=root)
    except ConfigError as exc:
        raise ConfigRunError("invalid configuration:", exc.problems) from None


def load_lock(root: Path) -> LockFile:
    try:
        return lock.load(root)
    except ConfigError as exc:
        raise ConfigRunError("invalid lock file:", exc.problems) from None


def secret(config: StackConfig, name: str) -> pulumi.Output[str]:
    """A secret from ``dstack-fleet:secrets``, kept secret in state and in every output. One that is not
    set is ``[secret: not set]`` in the offline plan and stops a real run with the command that sets it."""
    value = config.fleet.secrets.get(name)
    if value is None:
        if is_offline_plan():
            return pulumi.Output.secret(NOT_SET)
        raise pulumi.RunError(f"{readiness.SECRETS_KEY}.{name} is not set; set it with "
                              f"`{readiness.set_secret_command(config.stack, name)}`")
    return pulumi.Output.secret(value.get_secret_value())
