"""How ``make rollout`` reaches a node's URLs: ``direct`` (as written, from where it runs) or ``iap``
(through IAP TCP forwarding), per ``dstack-fleet:rollout.reach`` or ``make rollout REACH=...``.

Through IAP, every read of a node starts, for each port the read needs,

    gcloud compute start-iap-tunnel INSTANCE PORT --local-host-port=127.0.0.1:FREE --zone=ZONE --project=PROJECT

with the instance's name and zone from the plan's ``nodes`` output and the stack's ``gcp:project``,
waits (bounded) until the local port accepts a connection, reads ``http://127.0.0.1:FREE`` with the
URL's own path and query, and stops the tunnel: always, also when the read or the wait failed. The
tunnel runs in a process group of its own, and the whole group is stopped (SIGTERM, then SIGKILL), so
no process outlives the read. The free port is picked on 127.0.0.1 and the tunnel listens exactly
there, whatever ``localhost`` resolves to.

What gcloud does, from its reference (https://cloud.google.com/sdk/gcloud/reference/compute/start-iap-tunnel:
``INSTANCE_NAME INSTANCE_PORT [--local-host-port=LOCAL_HOST_PORT; default="localhost:0"] [--zone=ZONE]``)
and its source (google-cloud-sdk-unofficial/google-cloud-sdk cb6e70f7 ``lib/surface/compute/
start_iap_tunnel.py``, 01f043c2 ``lib/googlecloudsdk/command_lib/compute/iap_tunnel.py``):

* the GA command first reads the instance (``_FetchInstance``: ``compute.instances.get``), then, unless
  ``--iap-tunnel-disable-connection-check``, opens one test connection through IAP ("Testing if tunnel
  connection works.") before it binds the local port: a missing permission, a firewall that does not
  admit IAP's range or a node that does not listen ends the process with an error before it listens;
* it refuses a local port that is not free (``LocalPortUnavailableError``), binds it, prints
  "Listening on port [N]." and serves until it is interrupted.

A tunnel that exits or does not listen within the wait is a one-line ``TunnelError`` naming the node
and the port, with gcloud's last error line; it is an ``OSError``, so the health wait retries it like
any unreachable URL and the attestation gate fails on it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from typing import IO, Any, Iterator
from urllib.parse import urlsplit

GCLOUD = "gcloud"
OPEN_TIMEOUT_SECONDS = 60  # how long a tunnel may take to listen (bounded further by the health timeout)
STOP_TIMEOUT_SECONDS = 5
LOCAL_HOST = "127.0.0.1"


class TunnelError(OSError):
    """A tunnel that could not be used; the message is one line naming the node."""


@dataclass(frozen=True)
class Instance:
    name: str
    zone: str
    project: str


def start_argv(instance: Instance, port: int, local_port: int, gcloud: str = GCLOUD) -> list[str]:
    return [gcloud, "compute", "start-iap-tunnel", instance.name, str(port),
            f"--local-host-port={LOCAL_HOST}:{local_port}", f"--zone={instance.zone}", f"--project={instance.project}"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOCAL_HOST, 0))
        return sock.getsockname()[1]


def node_port(url: str) -> tuple[int, str]:
    """(port, path and query) of a filled URL that reads the node itself over http."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"{url}: only an http URL of the node itself can be read through IAP")
    try:
        port = parts.port or 80
    except ValueError as exc:
        raise ValueError(f"{url}: {exc}") from None
    return port, (parts.path or "/") + (f"?{parts.query}" if parts.query else "")


def _last_line(log: IO[bytes]) -> str:
    """gcloud's error line (or its last line): what a one-line message quotes."""
    log.flush()
    log.seek(0)
    lines = [ln.strip() for ln in log.read().decode("utf-8", "replace").splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("ERROR")]
    line = (errors or lines or [""])[-1]
    return line if len(line) <= 300 else line[:297] + "..."


def _stop(process: subprocess.Popen) -> None:
    """The tunnel's whole process group: SIGTERM, then SIGKILL for whatever is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        except PermissionError:  # pragma: no cover - the group is ours; nothing else can be signalled
            break
        try:
            process.wait(timeout=STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            continue
    if process.poll() is None:  # pragma: no cover - SIGKILL cannot be ignored
        process.kill()
        process.wait()


def _wait_open(process: subprocess.Popen, local_port: int, timeout: float, what: str, log: IO[bytes]) -> None:
    deadline = time.monotonic() + timeout
    while True:
        code = process.poll()
        if code is not None:
            raise TunnelError(f"{what}: gcloud compute start-iap-tunnel exited {code}: "
                              f"{_last_line(log) or 'no output'}")
        try:
            with socket.create_connection((LOCAL_HOST, local_port), timeout=1):
                return
        except OSError:
            pass
        if time.monotonic() >= deadline:
            line = _last_line(log)
            raise TunnelError(f"{what}: the IAP tunnel did not listen on {LOCAL_HOST}:{local_port} within "
                              f"{timeout:g}s" + (f" (gcloud: {line})" if line else ""))
        time.sleep(0.1)


@contextlib.contextmanager
def tunnel(instance: Instance, port: int, *, what: str, timeout: float = OPEN_TIMEOUT_SECONDS,
           gcloud: str = GCLOUD, env: dict[str, str] | None = None) -> Iterator[int]:
    """A listening tunnel to ``port`` of ``instance``; yields the local port, stops the tunnel on exit."""
    local_port = free_port()
    run_env = dict(os.environ if env is None else env)
    run_env["CLOUDSDK_CORE_DISABLE_PROMPTS"] = "1"  # never wait on a question nobody can answer
    with tempfile.TemporaryFile() as log:
        try:
            process = subprocess.Popen(start_argv(instance, port, local_port, gcloud), stdin=subprocess.DEVNULL,
                                       stdout=log, stderr=subprocess.STDOUT, env=run_env, start_new_session=True)
        except OSError as exc:
            raise TunnelError(f"{what}: cannot run {gcloud} ({exc.strerror or exc}); reaching nodes through IAP "
                              "needs the Google Cloud CLI") from None
        try:
            _wait_open(process, local_port, timeout, what, log)
            yield local_port
        finally:
            _stop(process)


class Direct:
    """URLs as written, read from where the rollout runs."""

    name = "direct"

    @contextlib.contextmanager
    def urls(self, key: str, node: dict[str, Any], urls: list[str]) -> Iterator[list[str]]:
        yield list(urls)

    def hint(self, group: str) -> str:
        return ("run the rollout where the nodes are reachable (or with dstack-fleet:rollout.reach: iap), or set "
                f"dstack-fleet:rollout.groups.{group}.infoUrl")


@dataclass
class Iap:
    """Each URL through a tunnel to the port it names on the node's instance; one tunnel per port."""

    project: str
    timeout: float = OPEN_TIMEOUT_SECONDS
    env: dict[str, str] | None = None
    gcloud: str = GCLOUD

    name = "iap"

    @contextlib.contextmanager
    def urls(self, key: str, node: dict[str, Any], urls: list[str]) -> Iterator[list[str]]:
        name, zone = node.get("name"), node.get("zone")
        if not name or not zone:
            raise TunnelError(f"{key}: the plan names no instance and zone for it, so no IAP tunnel can reach it")
        instance = Instance(str(name), str(zone), self.project)
        with contextlib.ExitStack() as stack:
            local: dict[int, int] = {}
            out = []
            for url in urls:
                port, rest = node_port(url)
                if port not in local:
                    local[port] = stack.enter_context(tunnel(
                        instance, port, what=f"{key} ({instance.name} tcp/{port} through IAP)", timeout=self.timeout,
                        gcloud=self.gcloud, env=self.env))
                out.append(f"http://{LOCAL_HOST}:{local[port]}{rest}")
            yield out

    def hint(self, group: str) -> str:
        return (f"check that the identity running it holds roles/iap.tunnelResourceAccessor on {self.project}, that "
                f"the firewall admits IAP's range to group {group}'s ports, and gcloud's message above")
