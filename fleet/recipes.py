"""Image recipes: their inputs and the input hash that names a build.

The input hash covers every input of a build (recipe, recipe revision, pinned upstreams, the guest
binary's sha256, files derived from the stack such as an overlay's init script), so unchanged inputs
never rebuild and identical inputs share one artifact.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

# Bump when a recipe's generated build changes in a way that changes its output.
RECIPE_REVISIONS = {"tplus-overlay": 1, "dstack-os": 1}

# The hashes each recipe's build produces besides the artifact's sha256 (lock-file field names).
# A tplus overlay image is a plain Yocto disk: it has no dstack os-image-hash or verity rootfs.
RECIPE_OUTPUTS = {"tplus-overlay": (), "dstack-os": ("os_image_hash", "rootfs_hash", "uki_hash")}


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def input_hash(recipe: str, inputs: dict[str, Any], derived: dict[str, str] | None = None) -> str:
    """SHA-256 over the canonical JSON of a build's complete inputs."""
    if recipe not in RECIPE_REVISIONS:
        raise ValueError(f"unknown recipe {recipe!r}; known: {', '.join(sorted(RECIPE_REVISIONS))}")
    document = {
        "recipe": recipe,
        "revision": RECIPE_REVISIONS[recipe],
        "inputs": inputs,
        "derived": dict(sorted((derived or {}).items())),
    }
    return hashlib.sha256(canonical_json(document)).hexdigest()
