"""A stand-in for ``gcloud compute start-iap-tunnel`` on PATH that really forwards.

It behaves as the GA command does (google-cloud-sdk ``lib/surface/compute/start_iap_tunnel.py`` and
``command_lib/compute/iap_tunnel.py``): it looks the instance up in the project and zone it is given
(an unknown one is "not found"), tests one connection to the instance's port before it listens (a
port nothing serves is error 4003 'failed to connect to backend'), then binds ``--local-host-port``,
prints "Listening on port [N]." and forwards every local connection to the port, until it is
stopped. What it forwards to comes from ``routes.json`` in ``FAKE_GCLOUD_DIR``: per instance its zone,
project and ``{port: "host:port"}``; ``fail`` (instance or ``*`` -> gcloud's error text) makes it exit
1 with that error, ``hang`` (instances or ``*``) makes it wait forever without listening.

Like the real ``gcloud`` script it runs under a shell wrapper; this wrapper stays as the parent of
the Python process (it does not ``exec``), so a caller that stopped only the process it started
would leave the forwarder running. Every call is logged with both process ids.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import sys
import threading
import time
from pathlib import Path
from typing import Any

ERROR = "ERROR: (gcloud.compute.start-iap-tunnel) "


def _relay(source: socket.socket, sink: socket.socket) -> None:
    try:
        while True:
            data = source.recv(65536)
            if not data:
                break
            sink.sendall(data)
    except OSError:
        pass
    finally:
        try:
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def _forward(conn: socket.socket, target: tuple[str, int]) -> None:
    try:
        upstream = socket.create_connection(target, timeout=10)
    except OSError:
        conn.close()
        return
    upstream.settimeout(None)
    back = threading.Thread(target=_relay, args=(upstream, conn), daemon=True)
    back.start()
    _relay(conn, upstream)
    back.join()
    conn.close()
    upstream.close()


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def _flags(args: list[str]) -> dict[str, str]:
    return dict(a[2:].split("=", 1) for a in args if a.startswith("--") and "=" in a)


def _matches(setting: Any, instance: str) -> Any:
    if isinstance(setting, dict):
        return setting.get(instance, setting.get("*"))
    return instance in setting or "*" in setting


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    home = Path(os.environ["FAKE_GCLOUD_DIR"])
    with open(home / "calls.jsonl", "a") as log:
        log.write(json.dumps({"who": "gcloud", "argv": argv, "pid": os.getpid(), "wrapper": os.getppid(),
                              "time": time.time()}) + "\n")
    if argv[:2] != ["compute", "start-iap-tunnel"] or len(argv) < 4:
        print(f"ERROR: (gcloud) fake gcloud: unsupported {' '.join(argv)}", file=sys.stderr)
        return 2
    routes = json.loads((home / "routes.json").read_text()) if (home / "routes.json").exists() else {}
    instance, port, flags = argv[2], argv[3], _flags(argv[4:])
    failure = _matches(routes.get("fail", {}), instance)
    if failure:
        print(ERROR + failure, file=sys.stderr)
        return 1
    known = routes.get("instances", {}).get(instance)
    if known is None or known["zone"] != flags.get("zone") or known["project"] != flags.get("project"):
        print(ERROR + "Could not fetch resource:\n - The resource 'projects/{}/zones/{}/instances/{}' was not "
              "found".format(flags.get("project"), flags.get("zone"), instance), file=sys.stderr)
        return 1
    print("Testing if tunnel connection works.", file=sys.stderr, flush=True)
    if _matches(routes.get("hang", []), instance):
        while True:
            time.sleep(3600)
    target = known["ports"].get(port)
    try:
        socket.create_connection(_address(target), timeout=5).close() if target else None
    except OSError:
        target = None
    if target is None:
        print(ERROR + "While checking if a connection can be made: Error while connecting [4003: 'failed to "
              "connect to backend'].", file=sys.stderr)
        return 1
    local_host, local_port = _address(flags.get("local-host-port", "localhost:0"))
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((local_host, local_port))
    except OSError:
        print(ERROR + f"Local port [{local_port}] is not available.", file=sys.stderr)
        return 1
    listener.listen(16)
    print(f"Listening on port [{listener.getsockname()[1]}].", flush=True)
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=_forward, args=(conn, _address(target)), daemon=True).start()


def install(directory: Path, root: Path, routes: dict[str, Any] | None = None) -> dict[str, str]:
    """``gcloud`` in ``directory/bin`` (a shell wrapper around this module); the environment entries
    to run with (prepend ``bin`` to PATH)."""
    bindir = directory / "bin"
    bindir.mkdir(parents=True, exist_ok=True)
    launcher = directory / "fake_gcloud_main.py"
    launcher.write_text(f"import sys\nsys.path.insert(0, {str(root)!r})\nfrom tests.fake_gcloud import main\n"
                        "sys.exit(main())\n")
    exe = bindir / "gcloud"
    # not `exec`: the wrapper stays the parent, as a shell script running gcloud's Python may
    exe.write_text(f"#!/bin/sh\n'{sys.executable}' '{launcher}' \"$@\"\nstatus=$?\nexit $status\n")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    if routes is not None:
        (directory / "routes.json").write_text(json.dumps(routes, indent=2))
    return {"FAKE_GCLOUD_DIR": str(directory)}


def set_routes(directory: Path, routes: dict[str, Any]) -> None:
    (directory / "routes.json").write_text(json.dumps(routes, indent=2))


def calls(directory: Path) -> list[dict[str, Any]]:
    path = directory / "calls.jsonl"
    out = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [c for c in out if c.get("who") == "gcloud"]


def tunnels(directory: Path) -> list[dict[str, str]]:
    """Each start-iap-tunnel call as instance, port, zone, project and local-host-port."""
    out = []
    for call in calls(directory):
        argv = call["argv"]
        out.append({"instance": argv[2], "port": argv[3], **_flags(argv[4:])})
    return out


def alive(pid: int) -> bool:
    """Whether a process still runs (a zombie waiting for its reaper does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"
