"""``python -m fleet collect``: the second half of an image build, after the build host is done.

A build runs on its build host for hours, longer than a CI job may run, so ``pulumi up`` of the
images stack only starts it. This command, run later (on a schedule, or by hand), looks at every
build the images stack would still declare a host for and reads what its host left in the bucket
(``gs://<image bucket>/<input hash>/``):

* ``outputs.json``: **finished**, once its outputs are verified *in the bucket*: the document parses
  into a lock entry for this input hash and recipe, the tarball object still has the generation
  and crc32c the build recorded (a replaced object never reaches the lock), ``disk.tar.gz.sha256``
  names the recorded sha256, and ``build.log`` is there;
* ``failure.txt``: **failed**, recorded with the log's URL (the log stays in the bucket);
* ``started.json`` older than the recipe's timeout: **timed out**, recorded as failed;
* otherwise **running** (started, within its timeout) or **not started** (the VM is still booting).

The result is a file in the shape ``make lock OUTPUTS=<file>`` merges (``lockEntries.images`` and
``lockEntries.failed``). Once merged, the images stack no longer declares the hosts of those hashes,
so the next ``make up STACK=images`` deletes them. An outputs document that fails verification is
neither recorded nor deleted: the command exits 1 and names the problem, and the host and the
bucket stay as they are for a look.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

from fleet.config.schema import StackConfig
from fleet.gcp.naming import Namer
from fleet.images.buildscript import BuildHostPlan, OutputsError, parse_outputs
from fleet.images.lock import LockFile
from fleet.project import bootstrap as fleet_bootstrap
from fleet.stacks.builds import plan_builds

FINISHED, FAILED, TIMED_OUT, RUNNING, NOT_STARTED, INVALID = (
    "finished", "failed", "timed out", "running", "not started", "invalid")
REASON_LIMIT = 500


class Bucket(Protocol):
    """What collecting reads from the image bucket."""

    def read(self, url: str) -> str | None:
        """The object's text, or None when there is no such object."""

    def describe(self, url: str) -> tuple[str, str] | None:
        """``(generation, crc32c)`` of the object, or None when there is no such object."""


class GcloudBucket:
    """The bucket through ``gcloud storage``, with the same calls the build script makes."""

    def __init__(self, gcloud: str = "gcloud"):
        self.gcloud = gcloud

    def _run(self, *args: str) -> str | None:
        result = subprocess.run([self.gcloud, "storage", *args], capture_output=True, text=True, check=False)
        return result.stdout if result.returncode == 0 else None

    def read(self, url: str) -> str | None:
        return self._run("cat", url)

    def describe(self, url: str) -> tuple[str, str] | None:
        out = self._run("objects", "describe", url, "--format=value(generation,crc32c_hash)")
        if out is None:
            return None
        parts = out.split()
        return (parts[0], parts[1]) if len(parts) == 2 else None


@dataclass
class Collected:
    input_hash: str
    recipe: str
    state: str
    detail: str
    entry: dict[str, Any] | None = None
    failure: dict[str, str] | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def deletes_host(self) -> bool:
        return self.entry is not None or self.failure is not None


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _stamp(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_time(text: str) -> datetime | None:
    try:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    except (TypeError, ValueError):
        return None


def collect_one(host: BuildHostPlan, bucket: Bucket, now: datetime) -> Collected:
    prefix = host.artifact_prefix
    log = f"{prefix}/build.log"
    outputs = bucket.read(f"{prefix}/outputs.json")
    if outputs is not None:
        return _verify(host, bucket, outputs)
    failure = bucket.read(f"{prefix}/failure.txt")
    if failure is not None:
        reason = " ".join(failure.split())[:REASON_LIMIT] or "failure.txt is empty"
        kept = bucket.describe(log) is not None
        return Collected(host.input_hash, host.recipe, FAILED,
                         f"{reason}; build log {log}" + ("" if kept else " (missing)"),
                         failure={"recipe": host.recipe, "reason": reason, "log": log, "at": _stamp(now)})
    started_text = bucket.read(f"{prefix}/started.json")
    if started_text is None:
        return Collected(host.input_hash, host.recipe, NOT_STARTED,
                         f"no started.json yet: the build host {host.instance_name} has not begun; {host.serial_hint()}")
    try:
        started = _parse_time(json.loads(started_text).get("started_at"))
    except (ValueError, AttributeError):
        started = None
    if started is None:
        return Collected(host.input_hash, host.recipe, INVALID, f"{prefix}/started.json is not what a build writes",
                         problems=[f"{prefix}/started.json: no started_at time"])
    elapsed = int((now - started).total_seconds())
    if elapsed > host.timeout_seconds:
        reason = (f"no outputs.json {elapsed // 60} min after the build started ({started_text.strip()[:120]}); "
                  f"the recipe's timeout is {host.timeout_seconds // 60} min")
        return Collected(host.input_hash, host.recipe, TIMED_OUT,
                         f"{reason}; the host is deleted, its serial console was: {host.serial_hint()}",
                         failure={"recipe": host.recipe, "reason": reason, "log": log, "at": _stamp(now)})
    return Collected(host.input_hash, host.recipe, RUNNING,
                     f"running for {elapsed // 60} of at most {host.timeout_seconds // 60} min; {host.serial_hint()}")


def _verify(host: BuildHostPlan, bucket: Bucket, outputs: str) -> Collected:
    prefix = host.artifact_prefix
    try:
        _, entry = parse_outputs(outputs, expect_input_hash=host.input_hash)
    except OutputsError as exc:
        return Collected(host.input_hash, host.recipe, INVALID, "outputs.json does not hold a lock entry",
                         problems=[f"{prefix}/outputs.json: {exc}"])
    problems = []
    if entry["recipe"] != host.recipe:
        problems.append(f"{prefix}/outputs.json: recipe {entry['recipe']!r}, but this input hash is a {host.recipe} build")
    artifact = entry["artifact"]
    described = bucket.describe(artifact["url"])
    if described is None:
        problems.append(f"{artifact['url']}: no such object, though outputs.json records it")
    elif described != (artifact["generation"], artifact["crc32c"]):
        problems.append(f"{artifact['url']}: generation {described[0]} and crc32c {described[1]} in the bucket, but the "
                        f"build recorded {artifact['generation']} and {artifact['crc32c']}: the object was replaced")
    published = bucket.read(f"{prefix}/disk.tar.gz.sha256")
    if published is None or published.split()[:1] != [artifact["sha256"]]:
        problems.append(f"{prefix}/disk.tar.gz.sha256 does not name the recorded sha256 {artifact['sha256']}")
    if bucket.describe(f"{prefix}/build.log") is None:
        problems.append(f"{prefix}/build.log is missing")
    if problems:
        return Collected(host.input_hash, host.recipe, INVALID, "outputs failed verification in the bucket",
                         problems=problems)
    return Collected(host.input_hash, host.recipe, FINISHED, f"verified {artifact['url']} (sha256 {artifact['sha256']})",
                     entry=entry)


def collect(hosts: list[BuildHostPlan], bucket: Bucket, now: datetime | None = None) -> list[Collected]:
    moment = now or _now()
    return [collect_one(host, bucket, moment) for host in hosts]


def lock_outputs(results: list[Collected]) -> dict[str, Any]:
    """What ``make lock OUTPUTS=<file>`` merges."""
    return {"lockEntries": {
        "images": {r.input_hash: r.entry for r in results if r.entry is not None},
        "failed": {r.input_hash: r.failure for r in results if r.failure is not None},
    }}


def report(results: list[Collected]) -> list[str]:
    if not results:
        return ["no image build is waiting to be collected"]
    lines = []
    for r in results:
        lines.append(f"{r.state}: {r.recipe} {r.input_hash[:12]}: {r.detail}")
        lines += [f"  problem: {p}" for p in r.problems]
    return lines


def hosts_of(config: StackConfig, root: Path, lock: LockFile) -> list[BuildHostPlan]:
    """The build hosts the images stack declares now: the builds waiting to be collected."""
    names = fleet_bootstrap.names_for(config)
    namer = Namer(prefix=config.fleet.name_prefix, stack=config.stack, project=config.gcp.project)
    return plan_builds(config, root, lock, names, namer).hosts
