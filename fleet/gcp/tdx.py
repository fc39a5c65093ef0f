"""Where Intel TDX confidential VMs can run on GCP: data, with its source and date.

Google's own zone table could not be retrieved when this list was made, so it is the union of
configurations seen working in public code. Stacks extend it with
``dstack-fleet:tdx.extraZones`` / ``extraMachineTypes`` when Google adds capacity, instead of
waiting for a release of this program.
"""

from __future__ import annotations

import re

SOURCE = (
    "Dstack-TEE/dstack deploy/gcp/terraform/main.tf header (zones), the Terraform provider's TDX "
    "acceptance test (c3-standard-4), GCP Dataproc docs (TDX: c3-standard-*, a3-highgpu-1g); "
    "read 2026-08. Google's zone table itself was not retrieved: check a zone with "
    "`gcloud compute zones describe ZONE` before relying on it."
)
AS_OF = "2026-08-07"

TDX_ZONES: tuple[str, ...] = (
    "asia-southeast1-a",
    "asia-southeast1-b",
    "asia-southeast1-c",
    "europe-west4-a",
    "europe-west4-b",
    "europe-west4-c",
    "us-central1-a",
    "us-central1-b",
    "us-central1-c",
    "us-east1-c",
    "us-east1-d",
    "us-east4-a",
    "us-east4-c",
    "us-west1-a",
    "us-west1-b",
)

_C3_SIZES = (4, 8, 22, 44, 88, 176)
TDX_MACHINE_TYPES: tuple[str, ...] = tuple(
    f"c3-{shape}-{size}" for shape in ("standard", "highcpu", "highmem") for size in _C3_SIZES
) + ("a3-highgpu-1g",)

# Local SSDs and bare metal are not offered with TDX.
_NEVER_TDX = re.compile(r"-(lssd|metal)$")


def region_of(zone: str) -> str:
    """``us-central1-a`` -> ``us-central1``."""
    return zone.rsplit("-", 1)[0]


def machine_type_problem(machine_type: str, extra: tuple[str, ...] = ()) -> str | None:
    """Why ``machine_type`` cannot run a TDX guest, or None when it can."""
    if _NEVER_TDX.search(machine_type):
        return (
            f"{machine_type!r} has local SSD or is bare metal, which TDX does not support; "
            f"use the plain variant, e.g. {_NEVER_TDX.sub('', machine_type)!r}"
        )
    if machine_type in TDX_MACHINE_TYPES or machine_type in extra:
        return None
    return (
        f"{machine_type!r} does not offer TDX; choose one of {', '.join(TDX_MACHINE_TYPES)} "
        "(or add it under dstack-fleet:tdx.extraMachineTypes once Google lists it)"
    )


def zone_problem(zone: str, extra: tuple[str, ...] = ()) -> str | None:
    if zone in TDX_ZONES or zone in extra:
        return None
    return (
        f"{zone!r} does not offer TDX; choose one of {', '.join(TDX_ZONES)} "
        "(or add it under dstack-fleet:tdx.extraZones once Google lists it)"
    )


# Machine types whose size is not a per-vCPU multiple, with their source. Google's "Accelerator-
# optimized machine family" page (cloud.google.com/compute/docs/accelerator-optimized-machines, A3
# High table, read 2026-08): a3-highgpu-1g has 1 H100 GPU, 26 vCPUs and 234 GB of memory, an
# eighth of a3-highgpu-8g's 208 vCPUs and 1,872 GB. Compute Engine's "GB" of machine memory is
# memoryMb / 1024 (as c3-standard-4's 16 GB is 16384 MB), so 234 GiB.
FIXED_SHAPES: dict[str, tuple[int, int]] = {"a3-highgpu-1g": (26, 234)}  # (vCPUs, GiB)
FIXED_SHAPES_SOURCE = ("cloud.google.com/compute/docs/accelerator-optimized-machines (A3 High: a3-highgpu-1g "
                       "26 vCPUs, 234 GB), read 2026-08")


def memory_gib(machine_type: str) -> int | None:
    """RAM of a machine type in GiB. It sizes the TD HOB that the firmware measures into RTMR0 (and
    ``vm_config.memory_size``), so it is part of a node's expected measurements. None for a type we
    have no table entry for."""
    match = re.fullmatch(r"c3-(standard|highcpu|highmem)-(\d+)", machine_type)
    if match:
        per_vcpu = {"standard": 4, "highcpu": 2, "highmem": 8}[match.group(1)]
        return per_vcpu * int(match.group(2))
    shape = FIXED_SHAPES.get(machine_type)
    return shape[1] if shape else None


def vcpus(machine_type: str) -> int | None:
    match = re.fullmatch(r"[a-z0-9]+-[a-z]+-(\d+)", machine_type)
    if match:
        return int(match.group(1))
    shape = FIXED_SHAPES.get(machine_type)
    return shape[0] if shape else None
