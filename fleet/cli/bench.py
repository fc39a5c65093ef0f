"""``make bench``: what an offline plan costs, measured against what the Pulumi mocks engine itself needs.

For two generated fleet shapes and 10, 100 and 1,000 nodes:

* **ring**: a staging overlay of groups of up to 250 nodes over three zones, ring topology;
* **mesh**: prod-shaped: prod tier (protected disks and addresses, snapshots, mandatory policies),
  four fifths overlay nodes in a full mesh and one fifth dstack nodes running a NEAR MPC app.

each of the two passes ``make plan`` can run (``preview``, the default, and ``up``) is timed as a
whole process, interpreter start to written JSON, three times. Beside it runs the **floor**: a bare
program that registers the same resources (same types, counts, parents, inputs, options and
dependencies, read from the plan's JSON) under the same mocks in the same pass, importing the same
provider SDK modules a program using those types imports, with no logic and no checks. The ratio
plan/floor is our own overhead; 1.0 would mean the plan costs only what the engine's mocks cost.

The ``up`` pass runs as a real ``pulumi up`` does, which refuses images the lock file lacks, so each
generated stack gets a lock file of stand-in builds of its images (``bench_lock``), in its temporary
copy only.
"""

from __future__ import annotations

import importlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import yaml

SIZES = (10, 100, 1000)
SHAPES = ("ring", "mesh")
PASSES = ("preview", "up")
SAMPLES = 3
GROUP_SIZE = 250
PROGRAM_FILES = ("Pulumi.yaml", "__main__.py", "images.lock.json")
STACK = "bench"

OVERLAY_IMAGE = {"build": {"recipe": "tplus-overlay", "guest": {"source": {
    "repository": "https://github.com/tpluslabs/tplus-examples",
    "commit": "3eb04cad11664a381227d77a469e68bca7e94c30", "workspace": "dstack-helios-tdx",
    "binary": "light_client", "features": ["quic", "tdx"]}}}}
ZONES = ["us-central1-a", "us-central1-b", "us-central1-c"]


def _groups(prefix: str, nodes: int, kind: str, offset: int, image: str, **extra: Any) -> tuple[list[dict], int]:
    groups = []
    for g in range((nodes + GROUP_SIZE - 1) // GROUP_SIZE):
        count = min(GROUP_SIZE, nodes - g * GROUP_SIZE)
        groups.append({"name": f"{prefix}{g}", "kind": kind, "count": count, "machineType": "c3-standard-4",
                       "zones": ZONES, "addresses": {"offset": offset}, "maxUnavailable": 1, "image": image,
                       **extra})
        offset += count
    return groups, offset


def fleet_config(shape: str, nodes: int) -> dict:
    """A generated env stack of ``nodes`` nodes."""
    config: dict[str, Any] = {
        "gcp:project": "bench-project", "gcp:region": "us-central1",
        "dstack-fleet:role": "env",
        "dstack-fleet:bootstrap": {"project": "bench-ops"},
        "dstack-fleet:network": {"subnets": {"us-central1": "10.40.0.0/16"}},
    }
    if shape == "ring":
        groups, _ = _groups("g", nodes, "overlay", 10, "overlay")
        config.update({
            "dstack-fleet:tier": "staging",
            "dstack-fleet:images": {"overlay": OVERLAY_IMAGE},
            "dstack-fleet:nodes": groups,
            "dstack-fleet:overlay": {"topology": "ring", "delivery": "baked", "interface": "setup",
                                     "executionRpc": "https://rpc.example"},
        })
        return {"config": config}
    dstack_nodes = max(1, nodes // 5)
    overlay, offset = _groups("overlay", nodes - dstack_nodes, "overlay", 10, "overlay", dataDiskGb=200)
    apps_groups, _ = _groups("apps", dstack_nodes, "dstack", offset, "dstack", dataDiskGb=100)
    config.update({
        "dstack-fleet:tier": "prod",
        "dstack-fleet:images": {"overlay": OVERLAY_IMAGE,
                                "dstack": {"build": {"recipe": "dstack-os", "version": "0.6.0.a2"}}},
        "dstack-fleet:nodes": overlay + apps_groups,
        "dstack-fleet:overlay": {"port": 5000, "topology": "mesh", "delivery": "baked", "interface": "setup",
                                 "executionRpc": "https://rpc.example"},
        "dstack-fleet:containers": {
            "mpc-launcher": {"external": {
                "image": "docker.io/nearone/mpc-launcher", "digestKind": "manifest", "source": "bench",
                "digest": "sha256:1f54b55bad22c45067228a9262bc6377e393ca1a07edb64e691e80704f49b74e"}},
            "mpc-node": {"external": {
                "image": "docker.io/nearone/mpc-node", "digestKind": "manifest", "source": "bench",
                "digest": "sha256:6a5700fccbb3facddd1f3934f4976c4dcefc176c4aac28cd2fd035984b368980"}}},
        "dstack-fleet:apps": [
            {"name": f"mpc{i}", "kind": "near-mpc", "target": "gce", "nodes": group["name"], "keyProvider": "kms",
             "kms": {"urls": ["https://kms.bench.internal:8000"]}, "stateful": True,
             "nearMpc": {"launcherImage": "mpc-launcher", "mpcImage": "mpc-node", "launcher": "rust"},
             "gatewayUrls": ["https://gateway.bench.internal:9204"]}
            for i, group in enumerate(apps_groups)],
    })
    return {"config": config}


def graph_depth(resources: list[dict]) -> int:
    """Longest chain of dependencies (resources count as levels)."""
    by_urn = {r["urn"]: r for r in resources}
    memo: dict[str, int] = {}

    def depth(urn: str) -> int:
        if urn not in memo:
            deps = [d for d in by_urn[urn]["dependencies"] if d in by_urn]
            memo[urn] = 1 + max((depth(d) for d in deps), default=0)
        return memo[urn]

    return max((depth(u) for u in by_urn), default=0)


# ---- the floor ---------------------------------------------------------------------------------------------

def sdk_class(type_: str) -> Callable | None:
    """The provider SDK class a program uses for ``type_`` (``gcp:compute/instance:Instance`` ->
    ``pulumi_gcp.compute.Instance``), imported as such a program imports it; ``None`` for types no SDK
    module holds (components, dynamic providers)."""
    provider, module, name = type_.split(":")
    if provider in ("pulumi", "pulumi-python") or "." in provider or "-" in provider:
        return None
    package = f"pulumi_{provider}"
    path = module.split("/")[0]
    try:
        mod = importlib.import_module(package if path == "index" else f"{package}.{path}")
        return getattr(mod, name)
    except (ImportError, AttributeError):
        return None


def _floor_value(value: Any) -> Any:
    import pulumi

    from fleet.config.values import SECRET_MARK, UNKNOWN_MARK

    if value == SECRET_MARK:
        return pulumi.Output.secret("secret")
    if value == UNKNOWN_MARK:
        return None
    if isinstance(value, dict):
        return {k: _floor_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_floor_value(v) for v in value]
    return value


def floor_program(resources: list[dict]) -> Callable[[], None]:
    """A program that registers ``resources`` (plan JSON rows) as they are: same types, names, parents,
    inputs, dependencies and options, in an order where parents and dependencies come first."""
    import pulumi

    order: list[dict] = []
    by_urn = {r["urn"]: r for r in resources}
    seen: set[str] = set()

    def visit(urn: str) -> None:
        if urn in seen or urn not in by_urn:
            return
        seen.add(urn)
        r = by_urn[urn]
        for before in ([r["parent"]] if r["parent"] else []) + r["dependencies"]:
            visit(before)
        order.append(r)

    for urn in sorted(by_urn):
        visit(urn)

    def program() -> None:
        made: dict[str, pulumi.Resource] = {}
        for r in order:
            opts = r["options"]
            options = pulumi.ResourceOptions(
                parent=made.get(r["parent"]) if r["parent"] else None,
                depends_on=[made[d] for d in r["dependencies"] if d in made],
                protect=opts.get("protect"), retain_on_delete=opts.get("retainOnDelete"),
                delete_before_replace=opts.get("deleteBeforeReplace"),
                ignore_changes=opts.get("ignoreChanges") or None,
                replace_on_changes=opts.get("replaceOnChanges") or None)
            if not r["custom"]:
                made[r["urn"]] = pulumi.ComponentResource(r["type"], r["name"], None, options)
                continue
            sdk_class(r["type"])  # the import a program using this type pays
            made[r["urn"]] = pulumi.CustomResource(r["type"], r["name"], _floor_value(r["inputs"]), options)

    return program


def run_floor(root: Path, spec: Path, out: Path, pass_: str) -> int:
    """The floor process: register the spec's resources under the plan's mocks, write their JSON."""
    from fleet.plan.harness import run_program
    from fleet.plan.planner import resource_json

    resources = json.loads(spec.read_text(encoding="utf-8"))["resources"]
    run = run_program(root, stack=STACK, config={}, preview=pass_ == "preview", program=floor_program(resources))
    out.write_text(json.dumps({"resources": [resource_json(r) for r in run.resources]}, indent=2, sort_keys=True),
                   encoding="utf-8")
    return 0


# ---- measuring ---------------------------------------------------------------------------------------------

def _timed(argv: list[str], cwd: Path) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one whole process."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode not in (0, 1):  # 1: a mandatory rule failed, which still writes the plan
        raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.read().decode()[-2000:]}")
    return seconds, usage.ru_maxrss / 1024


def machine() -> str:
    return (f"{os.cpu_count()} cores ({platform.processor() or platform.machine()}), "
            f"Python {platform.python_version()}, {platform.system()} {platform.release()}")


def bench_lock(project: Path) -> None:
    """Stand-in builds of every image the generated stack boots, so its ``up`` pass plans instead of
    refusing pending images. Never a real lock: the values are fixed placeholders, in a temporary copy."""
    from fleet.gcp.naming import Namer
    from fleet.images import lock
    from fleet.nodes import boot_images
    from fleet.stacks.load import load_config

    _, config = load_config(project, STACK)
    namer = Namer(config.fleet.name_prefix, STACK, config.gcp.project)
    current = lock.load(project)
    images = {}
    for version in boot_images.resolve_for_stack(config, current, namer).values():
        if version.pending and version.content_hash:
            entry: dict[str, Any] = {
                "recipe": version.recipe, "label": "make bench stand-in", "source": "make bench stand-in, not a build",
                "artifact": {"url": f"gs://bench-images/{version.content_hash}/disk.tar.gz", "generation": "1",
                             "crc32c": "AAAAAA==", "sha256": "0" * 64}}
            if version.recipe == "dstack-os":
                entry.update(os_image_hash="0" * 64, rootfs_hash="0" * 64)
            images[version.content_hash] = entry
    document = json.loads(current.to_json())
    document["images"] = {**document.get("images", {}), **images}
    (project / "images.lock.json").write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")


class _NoAliases(yaml.SafeDumper):
    """Stack files hold no anchors or aliases (the reader refuses them): shared values are written out."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _stack_dir(root: Path, work: Path, shape: str, nodes: int) -> Path:
    project = work / f"{shape}-{nodes}"
    (project / "stacks").mkdir(parents=True)
    for name in PROGRAM_FILES:
        if (root / name).exists():
            shutil.copy(root / name, project / name)
    (project / "stacks" / f"Pulumi.{STACK}.yaml").write_text(yaml.dump(fleet_config(shape, nodes), Dumper=_NoAliases))
    bench_lock(project)
    return project


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}–{max(values):.2f})"


def run(root: Path, *, sizes: tuple[int, ...] = SIZES, shapes: tuple[str, ...] = SHAPES,
        samples: int = SAMPLES, out=sys.stdout) -> int:
    def say(text: str) -> None:
        print(text, file=out, flush=True)

    python = sys.executable
    rows = []
    say(f"dstack-fleet bench on {machine()}; {samples} samples per figure, median (min–max) seconds")
    with tempfile.TemporaryDirectory(prefix="dstack-fleet-bench-") as tmp:
        work = Path(tmp)
        for shape in shapes:
            for nodes in sizes:
                project = _stack_dir(root, work, shape, nodes)
                for pass_ in PASSES:
                    plan_json, floor_json = project / f"plan-{pass_}.json", project / f"floor-{pass_}.json"
                    plan_argv = [python, "-m", "fleet", "--root", str(project), "plan", "--stack", STACK,
                                 "--pass", pass_, "--json", str(plan_json)]
                    floor_argv = [python, "-m", "fleet", "--root", str(project), "bench", "--floor", str(plan_json),
                                  "--pass", pass_, "--out", str(floor_json)]
                    plan_s, floor_s, peak = [], [], []
                    for i in range(samples):
                        say(f"  {shape} {nodes} nodes, {pass_} pass: sample {i + 1}/{samples} …")
                        seconds, mib = _timed(plan_argv, root)
                        plan_s.append(seconds)
                        peak.append(mib)
                        floor_s.append(_timed(floor_argv, root)[0])
                    resources = json.loads(plan_json.read_text(encoding="utf-8"))["resources"]
                    floor_count = len(json.loads(floor_json.read_text(encoding="utf-8"))["resources"])
                    if floor_count != len(resources):
                        raise RuntimeError(f"the floor registered {floor_count} resources, the plan {len(resources)}")
                    row = {"shape": shape, "nodes": nodes, "pass": pass_, "resources": len(resources),
                           "plan": plan_s, "floor": floor_s, "peak_mib": max(peak),
                           "ratio": statistics.median(plan_s) / statistics.median(floor_s),
                           "depth": graph_depth(resources)}
                    rows.append(row)
                    say(f"{shape} {nodes} {pass_}: plan {_spread(plan_s)} s, floor {_spread(floor_s)} s, "
                        f"ratio {row['ratio']:.2f}, peak {row['peak_mib']:.0f} MiB")
    say("")
    say(report(rows))
    return 0


def report(rows: list[dict]) -> str:
    lines = [
        "| shape | nodes | pass | resources | plan (s) | floor (s) | plan / floor | peak (MiB) | graph depth |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['nodes']} | {r['pass']} | {r['resources']} | {_spread(r['plan'])} | "
                     f"{_spread(r['floor'])} | {r['ratio']:.2f} | {r['peak_mib']:.0f} | {r['depth']} |")
    lines.append("")
    by = {(r["shape"], r["nodes"], r["pass"]): r for r in rows}
    for shape in SHAPES:
        for pass_ in PASSES:
            small, large = by.get((shape, 100, pass_)), by.get((shape, 1000, pass_))
            if small and large:
                growth = statistics.median(large["plan"]) / statistics.median(small["plan"])
                lines.append(f"{shape}, {pass_} pass: 1,000 nodes take {growth:.1f}x the time of 100 (aim: at most "
                             f"11x), peak {large['peak_mib']:.0f} MiB (aim: under 1024)")
    misses = [r for r in rows if r["ratio"] > 1.25]
    lines.append("plan / floor: " + ("at most 1.25 everywhere (the aim)" if not misses else
                                    "over the aim of 1.25 for " + ", ".join(
                                        f"{r['shape']} {r['nodes']} {r['pass']} ({r['ratio']:.2f})" for r in misses)))
    return "\n".join(lines)
