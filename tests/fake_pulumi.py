"""A stand-in for the Pulumi CLI on PATH, and preview documents in the pinned CLI's format.

The documents follow ``pulumi preview --json`` (pulumi/pulumi ``pkg/display/json.go``
``PreviewDigest``/``PreviewStep``, ``apitype.ResourceV3`` states; ``duration`` in nanoseconds;
``detailedDiff`` always present, ``null`` when there is none). A canned document holds every step a
preview with ``--refresh --show-sames --show-replacement-steps`` prints; the fake leaves out what the
flags of each call do not ask for (``pkg/backend/display/display.go`` ``shouldShow``).

The fake keeps state between calls in its directory: every call is logged (argv, ``--target`` set),
and what an ``up`` applied no longer shows as a change in later previews, so a rollout sees its
waves land. A targeted ``up`` fails, as the engine does, when a targeted resource needs a resource
that is created but not targeted (``step_generator.go`` "untargeted create").
"""

from __future__ import annotations

import copy
import json
import os
import stat
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

UNKNOWN = "04da6b54-80e4-46f7-96ec-b56ff0331ba9"
REPLACEMENT_HIDDEN = ("create-replacement", "delete-replaced")
PASSIVE = ("same", "refresh", "read")


# ---- documents -------------------------------------------------------------------------------------

def _value(value: Any) -> Any:
    """Plan display values as a preview state shows them."""
    if value == "<computed>":
        return UNKNOWN
    if isinstance(value, dict):
        return {k: _value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_value(v) for v in value]
    return value


def state_of(resource: dict[str, Any], outputs: dict[str, Any] | None = None) -> dict[str, Any]:
    state = {"urn": resource["urn"], "custom": resource["custom"], "type": resource["type"],
             "inputs": _value(resource.get("inputs") or {})}
    if resource["custom"]:
        state["id"] = resource["name"]
        state["provider"] = f"urn:pulumi:stack::dstack-fleet::pulumi:providers:{resource['type'].split(':')[0]}::default::1"
        state["outputs"] = outputs if outputs is not None else dict(state["inputs"])
    if resource.get("parent"):
        state["parent"] = resource["parent"]
    if resource.get("dependencies"):
        state["dependencies"] = list(resource["dependencies"])
    if resource.get("propertyDependencies"):
        state["propertyDependencies"] = {k: v for k, v in resource["propertyDependencies"].items() if v}
    return state


def step(op: str, urn: str, old: dict | None, new: dict | None, **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"op": op, "urn": urn}
    if (new or old or {}).get("custom"):
        out["provider"] = (new or old)["provider"]
    if old is not None:
        out["oldState"] = old
    if new is not None:
        out["newState"] = new
    out.update({k: v for k, v in extra.items() if k != "detailedDiff" and v})
    out["detailedDiff"] = extra.get("detailedDiff")
    return out


class PreviewBuilder:
    """A preview of ``plan`` (a plan JSON) against a deployed state: ``deployed`` (the plan of the
    deployed revision, compared with ``fleet.plan.changes`` the way the engine diffs), or the plan
    itself, plus what a test changes by hand."""

    def __init__(self, plan: dict[str, Any], deployed: dict[str, Any] | None = None):
        from fleet.plan import changes

        self.plan = plan
        self.resources = {r["urn"]: r for r in plan["resources"]}
        self.stack_urn = f"urn:pulumi:{plan['stack']}::{plan['project']}::pulumi:pulumi:Stack::{plan['project']}-{plan['stack']}"
        base = deployed or plan
        self.deployed_outputs = {**base["outputs"], "measurements": base["measurements"]}
        self.new: set[str] = set()
        self.changes: dict[str, list[dict[str, Any]]] = {}
        self.extra_old: list[dict[str, Any]] = []
        self.status: dict[str, str] = {}
        if deployed is None:
            return
        olds = {r["urn"]: r for r in deployed["resources"]}
        for change in changes.diff(deployed["resources"], plan["resources"]):
            if change.action == "create":
                self.created(change.urn)
            elif change.action == "delete":
                self.deleted(olds[change.urn])
            elif change.action in ("replace", "stop", "live"):
                old_inputs = _value(olds[change.urn].get("inputs") or {})
                paths = [path for path, _ in change.reasons]
                command_update = change.urn.split("::")[2].endswith("command:local:Command") and \
                    "update" in (self.resources[change.urn].get("inputs") or {}) and \
                    not any(p.startswith("triggers") for p in paths)
                if change.action == "replace" and not command_update:
                    self.replaced(change.urn, old_inputs, sorted({p.split(".")[0].split("[")[0] for p in paths}),
                                  detailed=paths)
                else:
                    self.updated(change.urn, old_inputs, {p: "update" for p in paths})

    def urn(self, name: str, type_: str | None = None) -> str:
        found = [u for u, r in self.resources.items() if r["name"] == name and (type_ is None or r["type"] == type_)]
        assert len(found) == 1, (name, type_, found)
        return found[0]

    def _outputs(self, resource: dict[str, Any], status: str = "RUNNING") -> dict[str, Any]:
        outputs = dict(_value(resource.get("inputs") or {}))
        if resource["type"] == "gcp:compute/instance:Instance":
            outputs["currentStatus"] = status
        return outputs

    def created(self, urn: str) -> None:
        self.new.add(urn)

    def replaced(self, urn: str, old_inputs: dict[str, Any], reasons: list[str],
                 detailed: list[str] | None = None) -> None:
        resource = self.resources[urn]
        old = state_of(resource, self._outputs(resource))
        old["inputs"] = {**old["inputs"], **old_inputs}
        new = state_of(resource, {})
        diff = {r: {"kind": "update-replace", "inputDiff": True} for r in detailed or reasons}
        self.changes[urn] = [
            step("replace", urn, old, new, replaceReasons=reasons, diffReasons=reasons, detailedDiff=diff),
            step("create-replacement", urn, old, new, replaceReasons=reasons, diffReasons=reasons, detailedDiff=diff),
            step("delete-replaced", urn, old, None),
        ]

    def updated(self, urn: str, old_inputs: dict[str, Any], paths: dict[str, str]) -> None:
        """``paths``: detailed diff path -> kind (update, add, delete)."""
        resource = self.resources[urn]
        old = state_of(resource, self._outputs(resource))
        old["inputs"] = {**old["inputs"], **old_inputs}
        new = state_of(resource, self._outputs(resource))
        diff = {p: {"kind": k, "inputDiff": True} for p, k in paths.items()}
        reasons = sorted({p.split(".")[0].split("[")[0] for p in paths})
        self.changes[urn] = [step("update", urn, old, new, diffReasons=reasons, detailedDiff=diff)]

    def deleted(self, resource: dict[str, Any]) -> None:
        """A resource of the deployed state the program no longer registers (plan-JSON shape)."""
        self.extra_old.append(resource)

    def down(self, urn: str, status: str) -> None:
        self.status[urn] = status

    def document(self) -> dict[str, Any]:
        steps = []
        root = {"urn": self.stack_urn, "custom": False, "type": "pulumi:pulumi:Stack", "outputs": self.deployed_outputs}
        steps.append(step("same", self.stack_urn, root, {"urn": self.stack_urn, "custom": False,
                                                           "type": "pulumi:pulumi:Stack"}))
        summary: dict[str, int] = {}
        for urn, resource in self.resources.items():
            status = self.status.get(urn, "RUNNING")
            if urn not in self.new and resource["custom"]:
                before = state_of(resource, self._outputs(resource))
                after = state_of(resource, self._outputs(resource, status))
                steps.append(step("refresh", urn, before, after))
            if urn in self.new:
                steps.append(step("create", urn, None, state_of(resource, {})))
                summary["create"] = summary.get("create", 0) + 1
            elif urn in self.changes:
                for s in self.changes[urn]:
                    if s["op"] in ("replace", "create-replacement") and s.get("oldState", {}).get("outputs"):
                        s["oldState"]["outputs"]["currentStatus"] = status if resource["type"].endswith(
                            "Instance") else s["oldState"]["outputs"].get("currentStatus")
                    steps.append(s)
                logical = self.changes[urn][0]["op"]
                summary[logical] = summary.get(logical, 0) + 1
            else:
                state = state_of(resource, self._outputs(resource, status) if resource["custom"] else None)
                steps.append(step("same", urn, state, copy.deepcopy(state)))
                summary["same"] = summary.get("same", 0) + 1
        for resource in self.extra_old:
            old = state_of(resource, self._outputs(resource))
            if resource["custom"]:
                steps.append(step("refresh", resource["urn"], old, copy.deepcopy(old)))
            steps.append(step("delete", resource["urn"], old, None))
            summary["delete"] = summary.get("delete", 0) + 1
        return {"steps": steps, "changeSummary": summary, "duration": 8_412_000_000}


# ---- the CLI ---------------------------------------------------------------------------------------

def _flag_values(argv: list[str], flag: str) -> list[str]:
    out = []
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            out.append(argv[i + 1])
        elif arg.startswith(flag + "="):
            out.append(arg.split("=", 1)[1])
    return out


def _depends(state: dict[str, Any] | None) -> set[str]:
    if not state:
        return set()
    out = set(state.get("dependencies") or [])
    for urns in (state.get("propertyDependencies") or {}).values():
        out.update(urns)
    if state.get("parent"):
        out.add(state["parent"])
    return out


def live(document: dict[str, Any], applied: set[str]) -> dict[str, Any]:
    """The canned document after what ``applied`` names has been applied."""
    gone = {s["urn"] for s in document["steps"] if s["op"] == "delete" and s["urn"] in applied}
    steps = []
    for s in document["steps"]:
        if s["urn"] in gone:
            continue
        if s["urn"] not in applied or s["op"] in PASSIVE:
            steps.append(s)
            continue
        if s["op"] in ("delete", "delete-replaced", "create-replacement"):
            continue
        new = s.get("newState")
        if new is None:
            continue
        state = copy.deepcopy(new)
        if state.get("custom"):
            state["outputs"] = dict(state.get("inputs") or {})
            if state["type"].endswith("instance:Instance"):
                state["outputs"]["currentStatus"] = "RUNNING"
        steps.append({"op": "same", "urn": s["urn"], "oldState": state, "newState": copy.deepcopy(state),
                      **({"provider": s["provider"]} if s.get("provider") else {}), "detailedDiff": None})
    return {**document, "steps": steps}


def shown(document: dict[str, Any], argv: list[str]) -> dict[str, Any]:
    keep = []
    for s in document["steps"]:
        root = s["urn"].split("::")[2].endswith("pulumi:pulumi:Stack")
        if s["op"] == "same" and "--show-sames" not in argv and not root:
            continue
        if s["op"] in REPLACEMENT_HIDDEN and "--show-replacement-steps" not in argv:
            continue
        if s["op"] == "refresh" and "--refresh" not in argv:
            continue
        keep.append(s)
    return {**document, "steps": keep}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    home = Path(os.environ["FAKE_PULUMI_DIR"])
    args = argv[2:] if argv[:1] == ["--cwd"] else argv
    targets = _flag_values(args, "--target")
    with open(home / "calls.jsonl", "a") as log:
        log.write(json.dumps({"who": "pulumi", "argv": argv, "command": args[:1], "targets": targets,
                              "backend": os.environ.get("PULUMI_BACKEND_URL"), "time": time.time()}) + "\n")
    if args == ["version"]:
        print("v" + os.environ.get("FAKE_PULUMI_VERSION", (home / "version").read_text().strip()))
        return 0
    applied_file = home / "applied.json"
    applied = set(json.loads(applied_file.read_text())) if applied_file.exists() else set()
    document = json.loads((home / "preview.json").read_text()) if (home / "preview.json").exists() else {}
    now = live(document, applied) if document else {}
    if args[:2] == ["stack", "export"]:  # the checkpoint: what is deployed now, as `pulumi stack export` prints it
        deployed = [s["oldState"] for s in now.get("steps", []) if s.get("oldState")]
        print(json.dumps({"version": 3, "deployment": {"resources": deployed}}))
        return 0
    if args[:1] == ["stack"]:
        return 0
    if args[:1] == ["preview"]:
        if "FAKE_PULUMI_PREVIEW_TEXT" in os.environ:  # what a CLI that is not the pinned one might print
            print(os.environ["FAKE_PULUMI_PREVIEW_TEXT"])
        elif "--json" in args:
            print(json.dumps(shown(now, args), indent=4))
        code = int(os.environ.get("FAKE_PULUMI_PREVIEW_EXIT", "0"))
        return code
    if args[:1] == ["up"]:
        steps = {s["urn"]: s for s in now.get("steps", []) if s["op"] not in PASSIVE}
        if targets:
            wanted = set(targets)
            creates = {u for u, s in steps.items() if s["op"] == "create"}
            for urn in sorted(wanted):
                for dep in sorted(_depends((steps.get(urn) or {}).get("newState"))):
                    if dep in creates and dep not in wanted:
                        print(f"error: Resource '{urn}' depends on '{dep}', which will be created but was not "
                              "specified in --target list", file=sys.stderr)
                        return 255
            applied |= wanted & set(steps)
        else:
            applied |= set(steps)
        applied_file.write_text(json.dumps(sorted(applied)))
        return int(os.environ.get("FAKE_PULUMI_UP_EXIT", "0"))
    return 0


def install(directory: Path, root: Path, document: dict[str, Any] | None = None) -> dict[str, str]:
    """Put the fake on a PATH under ``directory``; the environment to run with. A fake ``gcloud``
    (tests/fake_gcloud.py, no routes until a test gives some) goes next to it, so nothing a test runs
    ever reaches a real one."""
    from tests import fake_gcloud

    gcloud_env = fake_gcloud.install(directory, root)
    bindir = directory / "bin"
    bindir.mkdir(parents=True, exist_ok=True)
    exe = bindir / "pulumi"
    exe.write_text(f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {str(root)!r})\n"
                   "from tests.fake_pulumi import main\nsys.exit(main())\n")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    (directory / "version").write_text((root / ".pulumi-version").read_text())
    if document is not None:
        (directory / "preview.json").write_text(json.dumps(document, indent=4))
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}", FAKE_PULUMI_DIR=str(directory), **gcloud_env)
    env.pop("PULUMI_BACKEND_URL", None)
    env.pop("FLEET_EVIDENCE_DIR", None)
    return env


def calls(directory: Path, command: str | None = None,
          where: Callable[[dict[str, Any]], bool] | None = None) -> list[dict[str, Any]]:
    path = directory / "calls.jsonl"
    out = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [c for c in out if c.get("who") == "pulumi" and (command is None or c["command"] == [command])
            and (where is None or where(c))]
