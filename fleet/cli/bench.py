"""``make bench``: offline plan time, peak memory and dependency-graph depth for generated fleets.

Each size runs in its own process (so peak RSS is that size's alone) on a generated env stack:
one region, groups of up to 250 overlay nodes over three zones, ring topology, baked delivery.
The time covers both passes of the plan (preview and update), as ``make plan`` does.
"""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from fleet.plan.planner import build_plan

SIZES = (10, 100, 1000)
GROUP_SIZE = 250
PROGRAM_FILES = ("Pulumi.yaml", "__main__.py", "images.lock.json")


def fleet_config(nodes: int) -> dict:
    groups = []
    offset = 10
    for g in range((nodes + GROUP_SIZE - 1) // GROUP_SIZE):
        count = min(GROUP_SIZE, nodes - g * GROUP_SIZE)
        groups.append({"name": f"g{g}", "kind": "overlay", "count": count, "machineType": "c3-standard-4",
                       "zones": ["us-central1-a", "us-central1-b", "us-central1-c"],
                       "addresses": {"offset": offset}, "maxUnavailable": 1, "image": "overlay"})
        offset += count
    return {"config": {
        "gcp:project": "bench-project", "gcp:region": "us-central1",
        "dstack-fleet:role": "env", "dstack-fleet:tier": "staging",
        "dstack-fleet:bootstrap": {"project": "bench-ops"},
        "dstack-fleet:network": {"subnets": {"us-central1": "10.40.0.0/16"}},
        "dstack-fleet:images": {"overlay": {"build": {"recipe": "tplus-overlay", "guest": {"source": {
            "repository": "https://github.com/tpluslabs/tplus-examples",
            "commit": "3eb04cad11664a381227d77a469e68bca7e94c30", "workspace": "dstack-helios-tdx",
            "binary": "light_client", "features": ["quic", "tdx"]}}}}},
        "dstack-fleet:nodes": groups,
        "dstack-fleet:overlay": {"topology": "ring", "delivery": "baked", "interface": "setup",
                                 "executionRpc": "https://rpc.example"},
    }}


def graph_depth(resources) -> int:
    """Longest chain of dependencies (resources count as levels)."""
    by_urn = {r.urn: r for r in resources}
    memo: dict[str, int] = {}

    def depth(urn: str) -> int:
        if urn not in memo:
            deps = [d for d in by_urn[urn].dependencies if d in by_urn]
            memo[urn] = 1 + max((depth(d) for d in deps), default=0)
        return memo[urn]

    return max((depth(u) for u in by_urn), default=0)


def measure_one(nodes: int, root: Path) -> dict:

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in PROGRAM_FILES:
            if (root / name).exists():
                shutil.copy(root / name, work / name)
        (work / "stacks").mkdir()
        (work / "stacks" / "Pulumi.bench.yaml").write_text(yaml.safe_dump(fleet_config(nodes)))
        sys.path.insert(0, str(root))
        start = time.perf_counter()
        plan = build_plan(work, "bench")
        seconds = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"nodes": nodes, "resources": len(plan.resources), "seconds": round(seconds, 2),
            "peak_mib": round(peak_kib / 1024, 1), "depth": graph_depth(plan.resources)}


def run(root: Path) -> int:
    rows = []
    for nodes in SIZES:
        result = subprocess.run([sys.executable, "-m", "fleet", "--root", str(root), "bench", "--one", str(nodes)],
                                cwd=root, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            print(result.stderr, file=sys.stderr)
            return 1
        rows.append(json.loads(result.stdout))
    print("| nodes | resources | plan time (s, both passes) | peak memory (MiB) | graph depth |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['nodes']} | {r['resources']} | {r['seconds']} | {r['peak_mib']} | {r['depth']} |")
    by = {r["nodes"]: r for r in rows}
    ratio = by[1000]["seconds"] / by[100]["seconds"]
    print()
    print(f"time 1000/100 nodes: {ratio:.1f}x (aim: at most 11x); peak at 1000 nodes: {by[1000]['peak_mib']} MiB "
          f"(aim: under 1024); depth {'constant' if len({r['depth'] for r in rows}) == 1 else 'varies'} "
          f"({', '.join(str(r['depth']) for r in rows)})")
    return 0
