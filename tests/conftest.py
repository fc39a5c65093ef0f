"""Shared fixtures: the repository root, throw-away copies of the project, stack-file helpers."""

from __future__ import annotations

import asyncio
import copy
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
PROGRAM_FILES = ("Pulumi.yaml", "__main__.py", ".pulumi-version", "images.lock.json")


@pytest.fixture(autouse=True)
def fresh_event_loop():
    """Every test gets its own event loop (Outputs bind to the loop they were created on)."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    yield loop
    loop.close()
    asyncio.set_event_loop(None)


@pytest.fixture
def repo_root() -> Path:
    return ROOT


def stack_config(name: str) -> dict[str, Any]:
    return yaml.safe_load((ROOT / "stacks" / f"Pulumi.{name}.yaml").read_text())["config"]


class _NoAliasDumper(yaml.SafeDumper):
    """Writes a value shared by two keys out twice: stack files refuse anchors and aliases."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


class Project:
    """A copy of the program's entry files, stacks and apps in a temporary directory; the packages
    (``fleet``, ``components``) are imported from the repository."""

    def __init__(self, root: Path):
        self.root = root

    def write_stack(self, name: str, config: dict[str, Any] | None = None, *, text: str | None = None,
                    extra: dict[str, Any] | None = None) -> Path:
        path = self.root / "stacks" / f"Pulumi.{name}.yaml"
        if text is None:
            document = {"config": config or {}}
            document.update(extra or {})
            text = yaml.dump(document, Dumper=_NoAliasDumper, sort_keys=False)
        path.write_text(text)
        return path

    def mutate(self, base: str, name: str, change) -> Path:
        config = copy.deepcopy(stack_config(base))
        change(config)
        return self.write_stack(name, config)

    def assert_config_error(self, name: str, path: str, message: str) -> None:
        """Loading stack ``name`` fails with a line for config key ``path`` that holds ``message``."""
        from fleet.config.problems import ConfigError
        from fleet.stacks.load import load_config

        with pytest.raises(ConfigError) as info:
            load_config(self.root, name)
        lines = [l for l in info.value.lines() if f": {path}: " in l]
        assert lines and any(message in l for l in lines), info.value.lines()


@pytest.fixture
def project(tmp_path: Path) -> Project:
    for name in PROGRAM_FILES:
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "stacks", tmp_path / "stacks")
    shutil.copytree(ROOT / "apps", tmp_path / "apps")  # build inputs the stacks name (contexts, mkosi trees)
    return Project(tmp_path)


def lock_hello_container(project: Project, digest_hex: str = "4" * 64) -> None:
    """Record a stand-in build of the dev stack's `hello` container in the project copy's lock file,
    as `make lock` would after the images stack pushed it."""
    import json

    from fleet.apps import plans as fleet_apps
    from fleet.stacks.load import load_config

    _, config = load_config(project.root, "dev")
    public = "hello" in fleet_apps.public_container_keys(config)  # its Phala app publishes it
    _, digest = fleet_apps.container_build_hash(project.root, "hello", config.fleet.containers["hello"], public=public)
    repository = "fleet-public" if public else "fleet"
    (project.root / "images.lock.json").write_text(json.dumps({"version": 1, "containers": {digest: {
        "image": f"us-central1-docker.pkg.dev/acme-tee-ops/{repository}/hello", "digest": f"sha256:{digest_hex}",
        "digest_kind": "manifest", "source": "test fixture"}}}))
