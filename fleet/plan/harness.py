"""Runs the Pulumi program in-process under ``pulumi.runtime`` mocks and records what it registers.

This is how the program is tested and how ``fleet plan`` works without a cloud account:

* ``RecordingMonitor`` keeps every ``RegisterResourceRequest``: the URN as the engine forms it (the
  full parent type chain, no ``pulumi:pulumi:Stack$`` prefix), inputs with secrets and unknowns
  marked, dependencies and the resource options, and refuses a duplicate URN like the engine does.
* ``OfflineMocks`` echoes inputs and fills the outputs that only the provider knows from the table
  in ``fleet.offline``: in the *preview* pass they stay unknown, as in a real ``pulumi preview`` of a
  new stack; in the *update* pass they get deterministic stand-ins so every ``apply`` body runs.
* The program runs inside ``pulumi.runtime.test``, which awaits every RPC and every ``Output``
  task and re-raises the first exception, so an error inside any ``apply`` fails the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import runpy
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pulumi
import pulumi.runtime
import yaml
from google.protobuf import struct_pb2
from pulumi.runtime import mocks as pulumi_mocks
from pulumi.runtime import rpc
from pulumi.runtime import settings as pulumi_settings

from fleet.plan import offline
from fleet.config.values import SECRET_MARK, UNKNOWN, Secret

STACK_TYPE = "pulumi:pulumi:Stack"


def engine_urn(stack: str, project: str, parent: str, type_: str, name: str) -> str:
    """The URN the Pulumi engine assigns: the parent's full qualified type chain, and no
    ``pulumi:pulumi:Stack`` prefix for resources parented to the stack."""
    qualified = type_
    if parent:
        parent_type = parent.split("::")[2]
        if parent_type != STACK_TYPE:
            qualified = f"{parent_type}${type_}"
    return f"urn:pulumi:{stack}::{project}::{qualified}::{name}"


def from_proto(value: Any) -> Any:
    """Protobuf property value -> Python, keeping secrets (``Secret``) and unknowns (``UNKNOWN``)."""
    if isinstance(value, struct_pb2.Struct):
        if rpc._special_sig_key in value:
            sig = value[rpc._special_sig_key]
            if sig == rpc._special_secret_sig:
                return Secret(from_proto(value["value"]))
            if sig == rpc._special_resource_sig:
                return {"urn": value["urn"]}
            if sig == rpc._special_asset_sig:
                return {"asset": {k: v for k, v in value.items() if k != rpc._special_sig_key}}
            if sig == rpc._special_archive_sig:
                return {"archive": "[archive]"}
            if sig == rpc._special_output_value_sig:
                if "value" not in value:
                    return UNKNOWN
                inner = from_proto(value["value"])
                return Secret(inner) if value.get("secret") else inner
        return {k: from_proto(v) for k, v in value.items()}
    if isinstance(value, struct_pb2.ListValue):
        return [from_proto(v) for v in value]
    if value == rpc.UNKNOWN:
        return UNKNOWN
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


@dataclass
class Registration:
    urn: str
    type: str
    name: str
    parent: str | None
    custom: bool
    inputs: dict[str, Any]
    dependencies: list[str]
    property_dependencies: dict[str, list[str]]
    options: dict[str, Any]
    provider: str | None
    outputs: dict[str, Any] | None = None  # component outputs (register_outputs)


@dataclass
class ProgramRun:
    project: str
    stack: str
    preview: bool
    resources: list[Registration]
    outputs: dict[str, Any]
    warnings: list[str] = field(default_factory=list)

    def by_urn(self) -> dict[str, Registration]:
        return {r.urn: r for r in self.resources}

    def of_type(self, type_: str) -> list[Registration]:
        return [r for r in self.resources if r.type == type_]


class DuplicateUrnError(Exception):
    pass


class RecordingMonitor(pulumi_mocks.MockMonitor):
    def __init__(self, mocks: "OfflineMocks"):
        super().__init__(mocks)
        self.registrations: dict[str, Registration] = {}

    def make_urn(self, parent: str, type_: str, name: str) -> str:
        return engine_urn(pulumi.get_stack(), pulumi.get_project(), parent, type_, name)

    def RegisterResource(self, request):  # noqa: N802 - gRPC method name
        urn = self.make_urn(request.parent, request.type, request.name)
        if request.type == STACK_TYPE:
            return pulumi_mocks.resource_pb2.RegisterResourceResponse(urn=urn)
        if urn in self.registrations:
            raise DuplicateUrnError(
                f"duplicate URN {urn}: two resources of type {request.type} are named {request.name!r}"
            )
        parent_type = request.parent.split("::")[2] if request.parent else ""
        registration = Registration(
            urn=urn,
            type=request.type,
            name=request.name,
            parent=request.parent if request.parent and parent_type != STACK_TYPE else None,
            custom=bool(request.custom),
            # a dynamic provider's pickled code travels as the `__provider` input; it is not configuration
            inputs={k: v for k, v in from_proto(request.object).items() if k != "__provider"},
            dependencies=sorted(set(request.dependencies)),
            property_dependencies={
                k: sorted(set(v.urns)) for k, v in sorted(request.propertyDependencies.items())
            },
            options={
                "protect": request.protect if request.HasField("protect") else None,
                "retainOnDelete": request.retainOnDelete if request.HasField("retainOnDelete") else None,
                "deleteBeforeReplace": request.deleteBeforeReplace if request.deleteBeforeReplaceDefined else None,
                "ignoreChanges": sorted(request.ignoreChanges),
                "replaceOnChanges": sorted(request.replaceOnChanges),
                "import": request.importId or None,
            },
            provider=request.provider or None,
        )
        self.registrations[urn] = registration
        resource_id, state = self.mocks.respond(registration, request.object)
        self.resources[urn] = pulumi_mocks.MockMonitor.ResourceRegistration(urn, resource_id, {})
        return pulumi_mocks.resource_pb2.RegisterResourceResponse(urn=urn, id=resource_id, object=state)

    def RegisterResourceOutputs(self, request):  # noqa: N802
        registration = self.registrations.get(request.urn)
        if registration is not None:
            registration.outputs = from_proto(request.outputs)
        return super().RegisterResourceOutputs(request)


class OfflineMocks(pulumi_mocks.Mocks):
    """Echo inputs; provider-computed outputs unknown (preview) or deterministic (update)."""

    def __init__(self, *, project: str, stack: str, preview: bool,
                 stack_references: dict[str, dict[str, Any]] | None = None):
        self.project = project
        self.stack = stack
        self.preview = preview
        self.stack_references = stack_references or {}

    def respond(self, registration: Registration, inputs: struct_pb2.Struct) -> tuple[str, struct_pb2.Struct]:
        state = struct_pb2.Struct()
        state.CopyFrom(inputs)
        if not registration.custom:
            return "", state
        if registration.type == "pulumi:pulumi:StackReference":
            name = registration.inputs.get("name", registration.name)
            if name not in self.stack_references:
                raise offline.OfflineGap(
                    f"no offline outputs for stack reference {name!r}; known: {sorted(self.stack_references)}"
                )
            state.update({"outputs": self.stack_references[name], "secretOutputNames": []})
            return name, state
        if self.preview:
            return "", state
        context = offline.Context(
            project=self.project, stack=self.stack, type=registration.type, name=registration.name,
            urn=registration.urn, inputs=registration.inputs,
        )
        computed = offline.computed_outputs(context)
        state.update(computed)
        return offline.resource_id(context), state

    def new_resource(self, args):  # pragma: no cover - RecordingMonitor calls respond() instead
        raise NotImplementedError

    def call(self, args: pulumi_mocks.MockCallArgs):
        return offline.invoke(args.token, args.args, project=self.project, preview=self.preview,
                              provider=args.provider or "")


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.warnings: list[str] = []
        self.errors: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        target = self.errors if record.levelno >= logging.ERROR else self.warnings
        target.append(record.getMessage())


class ProgramError(Exception):
    """The program logged errors (``pulumi.log.error``), which fail a real update too."""


def config_strings(config: dict[str, Any]) -> dict[str, str]:
    """Config values as the CLI passes them to a program: strings, objects and lists as JSON."""
    out = {}
    for key, value in config.items():
        out[key] = value if isinstance(value, str) else json.dumps(value, sort_keys=False)
    return out


async def _resolve(value: Any) -> Any:
    if isinstance(value, pulumi.Output):
        known = await value.is_known()
        secret = await value.is_secret()
        if not known:
            return Secret(UNKNOWN) if secret else UNKNOWN
        inner = await _resolve(await value.future(with_unknowns=True))
        return Secret(inner) if secret else inner
    if isinstance(value, pulumi.output.Unknown):
        return UNKNOWN
    if isinstance(value, dict):
        return {k: await _resolve(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [await _resolve(v) for v in value]
    if isinstance(value, pulumi.Resource):
        return {"urn": await _resolve(value.urn)}
    return value


def run_program(
    root: Path,
    *,
    stack: str,
    config: dict[str, Any],
    secret_keys: set[str] | frozenset[str] = frozenset(),
    preview: bool,
    program: Callable[[], None] | None = None,
    project: str | None = None,
    stack_references: dict[str, dict[str, Any]] | None = None,
    as_deployment: bool = False,
) -> ProgramRun:
    """Run ``root/__main__.py`` (or ``program``) once under mocks and return what it registered.

    ``as_deployment`` runs the update pass as a real ``pulumi up`` would, with deploy-time guards on
    (tests use it to prove the guards); the offline plan leaves it off."""
    project = project or project_name(root)
    mocks = OfflineMocks(project=project, stack=stack, preview=preview, stack_references=stack_references)
    monitor = RecordingMonitor(mocks)
    collect = _Collect()
    logger = logging.getLogger(f"dstack-fleet.plan.{id(monitor)}")
    logger.propagate = False
    logger.addHandler(collect)

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    pulumi.runtime.set_all_config(config_strings(config), sorted(secret_keys))
    pulumi_settings.reset_options(project=project, stack=stack, preview=preview)
    pulumi.runtime.set_mocks(mocks, project=project, stack=stack, preview=preview, logger=logger, monitor=monitor)

    root_str = str(root.resolve())
    added_path = root_str not in sys.path
    if added_path:
        sys.path.insert(0, root_str)

    previous_marker = os.environ.get(offline.OFFLINE_PLAN_ENV)
    if as_deployment:
        os.environ.pop(offline.OFFLINE_PLAN_ENV, None)
    else:
        os.environ[offline.OFFLINE_PLAN_ENV] = "1"

    def body() -> None:
        if program is not None:
            program()
        else:
            runpy.run_path(str(root / "__main__.py"), run_name="__main__")

    try:
        pulumi.runtime.test(body)()
        stack_resource = pulumi_settings.get_root_resource()
        outputs = loop.run_until_complete(_resolve(dict(stack_resource.outputs))) if stack_resource else {}
    finally:
        with contextlib.suppress(Exception):
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.close()
        asyncio.set_event_loop(None)
        if added_path:
            with contextlib.suppress(ValueError):
                sys.path.remove(root_str)
        logger.removeHandler(collect)
        pulumi.runtime.set_all_config({}, [])
        if previous_marker is None:
            os.environ.pop(offline.OFFLINE_PLAN_ENV, None)
        else:
            os.environ[offline.OFFLINE_PLAN_ENV] = previous_marker

    if collect.errors:
        raise ProgramError("; ".join(collect.errors))
    resources = sorted(monitor.registrations.values(), key=lambda r: r.urn)
    return ProgramRun(
        project=project, stack=stack, preview=preview, resources=resources, outputs=outputs,
        warnings=collect.warnings,
    )


def project_name(root: Path) -> str:
    document = yaml.safe_load((root / "Pulumi.yaml").read_text(encoding="utf-8"))
    return str(document["name"])


__all__ = [
    "SECRET_MARK",
    "UNKNOWN",
    "ProgramError",
    "ProgramRun",
    "RecordingMonitor",
    "Registration",
    "Secret",
    "engine_urn",
    "run_program",
]
