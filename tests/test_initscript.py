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


# -- every tool the script calls is in the image ----------------------------------------------------

_SHELL_WORDS = {"if", "then", "else", "elif", "fi", "do", "done", "while", "until", "for", "case", "esac", "!", "{",
                "}", "in"}
# POSIX sh special and regular built-ins the script may use (busybox ash has them all)
_BUILTINS = {"[", "test", "echo", "set", "shift", "exec", "return", "exit", "continue", "break", ":", "true", "false",
             "cd", "export", "local", "read", "printf", "trap", "unset", "wait", "kill"}
_STARTS_COMMAND = {";", ";;", "|", "||", "&&", "(", ")", "then", "do", "else", "elif", "if", "while", "until", "!",
                   "{"}


def called_commands(script: str) -> set[str]:
    """The first word of every simple command in ``script`` (a small lexer for the shapes the
    generator writes: case patterns, for loops, $(...), redirections, continuation lines)."""
    import re
    import shlex

    found: set[str] = set()
    text = script.replace("\\\n", " ")
    inner = re.findall(r"-c '([^']*)'", text)  # the inline sh -c program start_daemon passes
    for line in text.splitlines() + inner:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        pattern = re.match(r"^[^\s()'\"]+(\|[^\s()'\"]+)*\)\s*(.*)$", line)
        if pattern:  # a case pattern: only what follows ')' runs
            line = pattern.group(2)
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";|&()")
        lexer.whitespace_split = True
        tokens = list(lexer)
        start, skip = True, False
        for index, token in enumerate(tokens):
            if skip:
                skip = token not in (";", "do")
                start = token in (";", "do")
                continue
            if token in ("for", "case"):
                skip = True
                continue
            if token.endswith((">", "<")) and index + 1 < len(tokens) and tokens[index + 1] == "&":
                start = False  # 2>&1: not a separator
                continue
            if start and token not in _STARTS_COMMAND and token not in _SHELL_WORDS:
                if re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", token):
                    continue  # an assignment; x=$(...) runs what follows '('

                if not re.match(r"^[-$0-9(<>&]", token):
                    found.add(token)
                start = False
                continue
            start = token in _STARTS_COMMAND or (start and token in _SHELL_WORDS) or token.endswith("$")
    return found


def test_the_image_provides_every_tool_the_init_script_calls():
    # fleet/images/recipes.py: the pinned busybox applets (poky c5627ab0 defconfig + mdev fragment)
    # and the packages the build appends to core-image-minimal; the guest binary the recipe installs.
    import re

    from fleet.images import recipes
    from fleet.nodes import initscript

    provided = recipes.tplus_image_tools() | {initscript.DAEMON, "/bin/sh"}
    for delivery, interface in VARIANTS:
        script = render(plan(delivery, interface))
        functions = set(re.findall(r"^([a-z_]+)\(\) [{(]", script, re.MULTILINE))
        called = called_commands(script) - _BUILTINS - functions
        assert called, (delivery, interface)
        assert called <= provided, (delivery, interface, sorted(called - provided))
    # the script calls these, and the pinned busybox lacks mke2fs, so e2fsprogs must be in the list
    everything = set().union(*(called_commands(render(plan(d, i))) for d, i in VARIANTS))
    assert {"mkfs.ext4", "blkid", "start-stop-daemon", "wget", "ip", "mount"} <= everything
    assert "mkfs.ext4" not in recipes.BUSYBOX_APPLETS and "e2fsprogs-mke2fs" in recipes.TPLUS_IMAGE_PACKAGES


def test_the_lexer_sees_a_tool_a_change_would_add():
    assert "cryptsetup" in called_commands('x() {\n    if ! cryptsetup open "$1" data; then\n        return 1\n    fi\n}\n')
    assert called_commands("case \"$1\" in\n    a|b) foo ;;\nesac\nfor x in $y; do bar; done\n") == {"foo", "bar"}
    assert called_commands('y=$(baz 2>&1 | qux)\n') == {"baz", "qux"}


def test_the_data_disk_is_the_unpartitioned_whole_disk(tmp_path):
    # busybox mdev makes no /dev/disk/by-id/google-data, so the script finds the disk in sysfs
    sys_block, dev = tmp_path / "sys", tmp_path / "dev"
    for name, parts in (("nvme0n1", ["nvme0n1p1", "nvme0n1p15"]), ("nvme0n2", []), ("loop0", [])):
        (sys_block / name).mkdir(parents=True)
        (dev / name).parent.mkdir(exist_ok=True)
        (dev / name).write_text("")
        for part in parts:
            (sys_block / name / part).mkdir()
            (sys_block / name / part / "partition").write_text("1")
    head, tail = render(plan()).rsplit('case "$1" in', 1)  # the dispatch at the end
    script = head + 'case "$1" in\n    find) find_data_device; exit $? ;;' + tail
    path = tmp_path / "init"
    path.write_text(script)
    result = subprocess.run(["sh", str(path), "find"], capture_output=True, text=True,
                            env=dict(os.environ, DSTACK_FLEET_SYS_BLOCK=str(sys_block), DSTACK_FLEET_DEV_DIR=str(dev)))
    assert result.returncode == 0 and result.stdout.strip() == f"{dev}/nvme0n2", result.stderr
