"""The overlay init script: valid /bin/sh, shellcheck-clean, and it really starts the daemon right
(run here with stand-ins for ip, start-stop-daemon, wget, blkid, mkfs and mount)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fleet.nodes.initscript import node_metadata, render
from fleet.nodes.topology import Member, OverlayPlan, peer_keys

SHELLCHECK = str(Path(sys.executable).parent / "shellcheck")
KEYS = ["overlay-0", "overlay-1", "overlay-2"]
ADDRESSES = ["10.30.0.10", "10.30.0.11", "10.30.0.12"]
RPC = "https://rpc.example/$(touch pwned)?a=1&b=`id`"


def plan(delivery="baked", interface="argv", topology="mesh"):
    return OverlayPlan(port=5000, protocol="udp", topology=topology, delivery=delivery, interface=interface,
                       setup_port=40080, execution_rpc=RPC, genesis="overlay-0",
                       members=tuple(Member(k, a) for k, a in zip(KEYS, ADDRESSES)),
                       peers=peer_keys(topology, KEYS, "overlay-0", {}))


VARIANTS = [(d, i) for d in ("baked", "metadata") for i in ("argv", "setup")]


@pytest.mark.parametrize("delivery,interface", VARIANTS)
def test_sh_n_and_shellcheck(tmp_path, delivery, interface):
    script = tmp_path / "init"
    script.write_text(render(plan(delivery, interface)))
    assert subprocess.run(["sh", "-n", str(script)]).returncode == 0
    result = subprocess.run([SHELLCHECK, "-s", "sh", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


STUBS = {
    "ip": 'echo "2: ens4    inet $FAKE_ADDRESS/32 brd $FAKE_ADDRESS scope global dynamic ens4"',
    "start-stop-daemon": 'printf "%s\\n" "$*" >> "$LOG/ssd"',
    "wget": """
for last; do :; done
case "$last" in
  */computeMetadata/*) key=${last##*/}; cat "$FAKE_METADATA/$key" ;;
  */setup) while [ $# -gt 0 ]; do if [ "$1" = --post-data ]; then printf "%s\\n" "$2" >> "$LOG/setup"; fi; shift; done ;;
esac""",
    "blkid": 'exit "${FAKE_BLKID:-0}"',
    "mkfs.ext4": 'echo "$*" >> "$LOG/mkfs"',
    "mount": 'echo "$*" >> "$LOG/mount"',
    "sleep": "exit 0",
}


@pytest.fixture
def guest(tmp_path):
    bindir, log, state, meta = (tmp_path / d for d in ("bin", "log", "state", "meta"))
    for d in (bindir, log, meta):
        d.mkdir()
    for name, body in STUBS.items():
        stub = bindir / name
        stub.write_text("#!/bin/sh\n" + body + "\n")
        stub.chmod(0o755)
    device = tmp_path / "data-device"
    device.write_text("")

    def run(script: str, address: str, action="start", **env):
        path = tmp_path / "init"
        path.write_text(script)
        full_env = dict(os.environ, DSTACK_FLEET_STUB_PATH=str(bindir), LOG=str(log), FAKE_ADDRESS=address,
                        FAKE_METADATA=str(meta), DSTACK_FLEET_STATE_DIR=str(state),
                        DSTACK_FLEET_DATA_DEVICE=str(device), **env)
        return subprocess.run(["sh", str(path), action], env=full_env, capture_output=True, text=True, cwd=tmp_path)

    def read(name):
        p = log / name
        return p.read_text().splitlines() if p.exists() else []

    return run, read, state, meta, device, tmp_path


def daemon_args(line: str) -> list[str]:
    # start-stop-daemon -S -b -m -p PIDFILE -x /bin/sh -- -c CMD NAME LOGFILE DAEMON args...
    parts = line.split(" ")
    return parts[parts.index("/usr/bin/guest") + 1:]


def test_argv_member_starts_backgrounded_with_its_peers(guest):
    run, read, state, *_ = guest
    result = run(render(plan()), "10.30.0.11")
    assert result.returncode == 0, result.stderr
    (line,) = read("ssd")
    assert line.startswith("-S -b -m -p /var/run/dstack-sync.pid -x /bin/sh")
    assert daemon_args(line) == ["5000", "10.30.0.10:5000", "10.30.0.12:5000"]
    assert not (state / "overlay-founded").exists()


def test_argv_genesis_founds_once_then_joins(guest):
    run, read, state, *_ = guest
    script = render(plan())
    assert run(script, "10.30.0.10").returncode == 0
    assert run(script, "10.30.0.10").returncode == 0
    first, second = read("ssd")
    assert daemon_args(first) == ["5000"]  # founding boot: no peers
    assert daemon_args(second) == ["5000", "10.30.0.11:5000", "10.30.0.12:5000"]
    assert (state / "overlay-founded").exists()


def test_genesis_without_its_data_disk_never_founds(guest):
    run, read, state, meta, device, _ = guest
    device.unlink()
    result = run(render(plan()), "10.30.0.10")
    assert result.returncode == 0
    assert daemon_args(read("ssd")[0]) == ["5000", "10.30.0.11:5000", "10.30.0.12:5000"]
    assert "data disk unavailable" in result.stderr


def test_blank_data_disk_is_formatted_and_mounted_a_used_one_is_not_formatted(guest):
    run, read, *_ = guest
    run(render(plan()), "10.30.0.11", FAKE_BLKID="2")
    assert len(read("mkfs")) == 1 and len(read("mount")) == 1
    run(render(plan()), "10.30.0.11", FAKE_BLKID="0")
    assert len(read("mkfs")) == 1 and len(read("mount")) == 2


def test_setup_interface_posts_json_on_loopback(guest):
    run, read, *_ = guest
    script = render(plan(interface="setup"))
    assert "http://127.0.0.1:40080/setup" in script
    assert run(script, "10.30.0.12").returncode == 0
    assert run(script, "10.30.0.10").returncode == 0
    (member, founding) = [json.loads(line) for line in read("setup")]
    assert member == {"peers": ["10.30.0.10:5000", "10.30.0.11:5000"], "port": 5000, "execution_rpc": RPC}
    assert founding["peers"] == []
    assert daemon_args(read("ssd")[0]) == []  # the current light client takes no argv


def test_hostile_values_are_inert(guest):
    run, read, state, meta, device, tmp = guest
    run(render(plan(interface="setup")), "10.30.0.11")
    assert not (tmp / "pwned").exists()
    assert json.loads(read("setup")[0])["execution_rpc"] == RPC


def test_a_node_not_in_the_table_refuses_to_start(guest):
    run, read, *_ = guest
    result = run(render(plan()), "10.30.0.99")
    assert result.returncode == 1 and "10.30.0.99 is not a member of this overlay" in result.stderr
    assert read("ssd") == []


@pytest.mark.parametrize("interface", ["argv", "setup"])
def test_metadata_delivery_reads_peers_at_boot(guest, interface):
    run, read, state, meta, *_ = guest
    p = plan(delivery="metadata", interface=interface)
    script = render(p)
    assert "10.30.0.11" not in script  # no member table in the image
    for key, value in node_metadata(p, "overlay-1").items():
        (meta / key).write_text(value)
    assert run(script, "10.30.0.11").returncode == 0
    if interface == "argv":
        assert daemon_args(read("ssd")[0]) == ["5000", "10.30.0.10:5000", "10.30.0.12:5000"]
    else:
        assert json.loads(read("setup")[0])["peers"] == ["10.30.0.10:5000", "10.30.0.12:5000"]


def test_stop_and_usage(guest):
    run, read, *_ = guest
    assert run(render(plan()), "10.30.0.11", action="stop").returncode == 0
    assert read("ssd") == ["-K -o -p /var/run/dstack-sync.pid"]
    result = run(render(plan()), "10.30.0.11", action="bogus")
    assert result.returncode == 1 and "Usage:" in result.stderr


def test_baked_table_is_identical_for_every_node_and_changes_with_membership():
    script = render(plan())
    assert all(address in script for address in ADDRESSES)
    bigger = OverlayPlan(**{**plan().__dict__, "members": plan().members + (Member("overlay-3", "10.30.0.13"),),
                            "peers": peer_keys("mesh", KEYS + ["overlay-3"], "overlay-0", {})})
    assert render(bigger) != script
