"""The house rules of ``fleet/`` (ARCHITECTURE.md), enforced on the import graph.

The graph is read from the source with ``ast`` and includes imports inside functions, so a lazy
import cannot hide a cycle or a layer violation.
"""

from __future__ import annotations

import ast
import base64
import importlib
import subprocess
import sys
from pathlib import Path

import dill
import pytest

ROOT = Path(__file__).resolve().parent.parent

# package -> the fleet packages it may import (its own modules always)
ALLOWED = {
    "gcp": set(),
    "config": {"gcp"},
    "attest": {"gcp", "config"},
    "project": {"gcp", "config"},
    "images": {"gcp", "config", "project"},
    "nodes": {"gcp", "config", "project", "images"},
    "apps": {"gcp", "config", "attest", "images"},
    "policy": {"gcp", "config", "apps"},
    "stacks": {"gcp", "config", "attest", "project", "images", "nodes", "apps"},
    "plan": {"gcp", "config", "attest", "project", "images", "nodes", "apps", "policy", "stacks"},
    "cli": {"gcp", "config", "attest", "project", "images", "nodes", "apps", "policy", "stacks", "plan"},
}
# old module names that generated scripts, command inputs and the policy pack still use
SHIMS = {"fleet.rules": "fleet.policy.rules", "fleet.ocilayout": "fleet.images.ocilayout",
         "fleet.mkosibuild": "fleet.images.mkosibuild"}
PULUMI_SDKS = {"pulumi", "pulumi_gcp", "pulumi_docker", "pulumi_command", "pulumi_policy"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def sources(*tops: str) -> dict[str, Path]:
    out = {}
    for top in tops:
        for path in sorted((ROOT / top).rglob("*.py")):
            out[module_name(path)] = path
    return out


MODULES = sources("fleet", "components", "policies")


def imports_of(name: str, path: Path) -> set[str]:
    """Every module ``name`` imports, at any depth of its source, resolved to module names."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.add(target)
            out.update(f"{target}.{alias.name}" for alias in node.names if f"{target}.{alias.name}" in MODULES)
    return out


GRAPH = {name: imports_of(name, path) for name, path in MODULES.items()}


def fleet_package(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "fleet" or len(parts) < 2 or parts[1] not in ALLOWED:
        return None
    return parts[1]


def internal(targets: set[str]) -> set[str]:
    return {t for t in targets if t in MODULES}


def test_every_core_module_lives_in_a_package_and_every_package_is_known():
    top_level = sorted(n for n, p in MODULES.items() if n.startswith("fleet.") and p.parent == ROOT / "fleet"
                       and p.name != "__init__.py")
    assert top_level == sorted(["fleet.__main__", *SHIMS]), top_level
    packages = sorted(p.parent.name for p in (ROOT / "fleet").glob("*/__init__.py"))
    assert packages == sorted(ALLOWED)


def test_package_init_files_only_state_what_they_own():
    for package in ALLOWED:
        tree = ast.parse((ROOT / "fleet" / package / "__init__.py").read_text(encoding="utf-8"))
        assert len(tree.body) == 1 and isinstance(tree.body[0], ast.Expr), f"fleet/{package}/__init__.py"
        doc = ast.get_docstring(tree)
        assert doc and "import" in doc.lower(), f"fleet/{package}/__init__.py says what it owns and may import"


def test_each_package_imports_only_the_packages_beneath_it():
    wrong = []
    for name, targets in GRAPH.items():
        source = fleet_package(name)
        if source is None:
            continue
        for target in internal(targets):
            dest = fleet_package(target)
            if target in SHIMS or (dest is not None and dest != source and dest not in ALLOWED[source]):
                wrong.append(f"{name} -> {target}")
            if target.startswith(("components", "policies")):
                wrong.append(f"{name} -> {target}")
    assert wrong == []


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles_between_modules_or_packages():
    modules = {n: internal(t) - {n} for n, t in GRAPH.items()}
    assert cycles(modules) == []
    packages: dict[str, set[str]] = {}
    for name, targets in modules.items():
        source = fleet_package(name)
        if source:
            packages.setdefault(source, set()).update(
                p for p in map(fleet_package, targets) if p and p != source)
    assert cycles(packages) == []


def test_the_cycle_check_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_only_the_plan_harness_the_bench_floor_and_the_policy_adapter_touch_pulumi():
    touching = {name: sorted({t.split(".")[0] for t in targets} & PULUMI_SDKS)
                for name, targets in GRAPH.items() if name.startswith("fleet.")}
    touching = {k: v for k, v in touching.items() if v}
    assert touching == {"fleet.cli.bench": ["pulumi"], "fleet.plan.harness": ["pulumi"], "fleet.plan.offline": ["pulumi"],
                        "fleet.policy.rules": ["pulumi_policy"]}


def test_components_never_import_policies_and_policies_never_import_components():
    for name, targets in GRAPH.items():
        if name.startswith("components"):
            assert not {t for t in targets if t.startswith(("policies", "fleet.policy", "fleet.rules"))}, name
        if name.startswith("policies"):
            assert not {t for t in targets if t.startswith("components")}, name


@pytest.mark.parametrize("old,new", sorted(SHIMS.items()))
def test_old_module_names_are_the_same_modules(old, new):
    assert importlib.import_module(old) is importlib.import_module(new)


@pytest.mark.parametrize("old", ["fleet.ocilayout", "fleet.mkosibuild"])
def test_old_module_names_still_run_as_scripts(old):
    # the generated build steps run exactly these command lines
    result = subprocess.run([sys.executable, "-m", old, "--help"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert f"python -m {old}" in result.stdout


# dill.dumps of components.vmm.VmProvider() as pulumi.dynamic serializes it, taken before the core moved into
# packages: deployed stacks hold these bytes in their state, and the provider process unpickles them.
SERIALIZED_VMM_PROVIDER = "gASVJwAAAAAAAACMDmNvbXBvbmVudHMudm1tlIwKVm1Qcm92aWRlcpSTlCmBlH2UYi4="


def test_the_vmm_provider_serializes_to_the_bytes_deployed_stacks_hold():
    from pulumi.dynamic.dynamic import serialize_provider

    from components.vmm import VmProvider

    assert serialize_provider(VmProvider()) == SERIALIZED_VMM_PROVIDER
    restored = dill.loads(base64.b64decode(SERIALIZED_VMM_PROVIDER))
    assert type(restored) is VmProvider
