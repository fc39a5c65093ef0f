"""The overlay init script: valid /bin/sh, shellcheck-clean, and what it does at boot, run against
stand-ins: a fake GCE metadata server and a fake light client (HTTP servers on the loopback
address), stub `ip`, `start-stop-daemon`, `blkid`, `mkfs.ext4`, `mount` and `sleep`, and the real
`wget` and `openssl` (the signature tool the image recipe adds: openssl-bin, see
fleet/images/recipes.py). Tables are signed here with a P-256 key made for the test, in the form
Cloud KMS returns (DER ECDSA over SHA-256), and checked good, forged, tampered, replayed and foreign."""

from __future__ import annotations

import base64
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from Crypto.Hash import SHA256
from Crypto.PublicKey import ECC
from Crypto.Signature import DSS

from fleet.nodes import membertable
from fleet.nodes.initscript import CCEL_BEGIN, CCEL_END, SCRIPT, render
from fleet.nodes.topology import Member, OverlayPlan, peer_keys

SHELLCHECK = str(Path(sys.executable).parent / "shellcheck")
KEYS = ["overlay-0", "overlay-1", "overlay-2", "overlay-3", "overlay-4"]
ADDRESSES = ["10.30.0.10", "10.30.0.11", "10.30.0.12", "10.30.0.13", "10.30.0.14"]
RPC = "https://rpc.example/$(touch pwned)?a=1&b=`id`"
PROJECT = "acme-tee-prod"

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None or shutil.which("wget") is None,
                                reason="needs openssl and wget on PATH (the image has both)")


def plan(interface="setup", topology="mesh", count=3, stack="prod", project=PROJECT, explicit=None, port=5000,
         setup_port=40080, rpc=RPC):
    keys = KEYS[:count]
    return OverlayPlan(port=port, protocol="udp", topology=topology, delivery="signed", interface=interface,
                       setup_port=setup_port, execution_rpc=rpc, genesis="overlay-0",
                       members=tuple(Member(k, a) for k, a in zip(keys, ADDRESSES)),
                       peers=peer_keys(topology, keys, "overlay-0", explicit or {}), stack=stack, project=project)


class Signer:
    def __init__(self):
        self.key = ECC.generate(curve="P-256")

    @property
    def public_pem(self) -> str:
        return self.key.public_key().export_key(format="PEM")

    def sign(self, data: bytes) -> str:
        return base64.b64encode(DSS.new(self.key, "fips-186-3", encoding="der").sign(SHA256.new(data))).decode()


FLEET_KEY = Signer()
OTHER_KEY = Signer()


def signed(p: OverlayPlan, serial=7, founding=False, signer=FLEET_KEY) -> dict[str, str]:
    table = membertable.document(membertable.body(p), serial, founding)
    return {"overlay-table": table, "overlay-table-signature": signer.sign(table.encode())}


class _Metadata(http.server.BaseHTTPRequestHandler):
    values: dict[str, str] = {}

    def do_GET(self):  # noqa: N802 - the stdlib's name
        prefix = "/computeMetadata/v1/"
        value = self.values.get(self.path[len(prefix):]) if self.path.startswith(prefix) else None
        if self.headers.get("Metadata-Flavor") != "Google" or value is None:
            self.send_response(403 if value is not None else 404)
            self.end_headers()
            return
        data = value.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


class _LightClient(http.server.BaseHTTPRequestHandler):
    received: list = []

    def do_POST(self):  # noqa: N802
        length = int(self.headers.get("Content-Length", "0"))
        self.received.append((self.path, self.headers.get("Content-Type"), self.rfile.read(length)))
        data = b'{"status":"success"}'
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def serve(handler):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server


STUBS = {
    "ip": 'echo "2: ens4    inet $FAKE_ADDRESS/32 brd $FAKE_ADDRESS scope global dynamic ens4"',
    "start-stop-daemon": 'printf "%s\\n" "$*" >> "$LOG/ssd"',
    "blkid": 'exit "${FAKE_BLKID:-0}"',
    "mkfs.ext4": 'echo "$*" >> "$LOG/mkfs"',
    "mount": 'echo "$*" >> "$LOG/mount"',
    "sleep": "exit 0",
}


class Guest:
    """One node's disk, metadata and light client; ``boot`` runs the init script."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.bin, self.log, self.state = tmp / "bin", tmp / "log", tmp / "state"
        for d in (self.bin, self.log):
            d.mkdir(parents=True)
        for name, body in STUBS.items():
            stub = self.bin / name
            stub.write_text("#!/bin/sh\n" + body + "\n")
            stub.chmod(0o755)
        self.device = tmp / "data-device"
        self.device.write_text("")
        self.key = tmp / "table-key.pem"
        self.key.write_text(FLEET_KEY.public_pem)
        self.serial = tmp / "ttyS0"
        self.serial.write_text("")
        self.ccel = tmp / "CCEL"
        self.metadata_values: dict[str, str] = {"project/project-id": PROJECT}
        handler = type("Metadata", (_Metadata,), {"values": self.metadata_values})
        self.metadata = serve(handler)
        self.received: list = []
        self.light_client = serve(type("LightClient", (_LightClient,), {"received": self.received}))

    @property
    def setup_port(self) -> int:
        return self.light_client.server_address[1]

    def deliver(self, values: dict[str, str]) -> None:
        for key in ("overlay-table", "overlay-table-signature"):
            self.metadata_values.pop(f"instance/attributes/{key}", None)
        for key, value in values.items():
            self.metadata_values[f"instance/attributes/{key}"] = value

    def boot(self, address: str, action: str = "start", script: str = SCRIPT, **env):
        path = self.tmp / "init"
        path.write_text(script)
        full_env = dict(os.environ, DSTACK_FLEET_STUB_PATH=str(self.bin), LOG=str(self.log), FAKE_ADDRESS=address,
                        DSTACK_FLEET_STATE_DIR=str(self.state), DSTACK_FLEET_DATA_DEVICE=str(self.device),
                        DSTACK_FLEET_TABLE_KEY=str(self.key), DSTACK_FLEET_CCEL=str(self.ccel),
                        DSTACK_FLEET_SERIAL_CONSOLE=str(self.serial),
                        DSTACK_FLEET_METADATA_URL=f"http://127.0.0.1:{self.metadata.server_address[1]}"
                                                  "/computeMetadata/v1", **env)
        full_env.pop("http_proxy", None)
        full_env.pop("HTTP_PROXY", None)
        return subprocess.run(["sh", str(path), action], env=full_env, capture_output=True, text=True, cwd=self.tmp,
                              timeout=60)

    def read(self, name):
        p = self.log / name
        return p.read_text().splitlines() if p.exists() else []

    def setups(self) -> list[dict]:
        return [json.loads(body) for _, _, body in self.received]

    def close(self):
        self.metadata.shutdown()
        self.light_client.shutdown()


@pytest.fixture
def guest(tmp_path):
    g = Guest(tmp_path)
    yield g
    g.close()


def daemon_args(line: str) -> list[str]:
    # start-stop-daemon -S -b -m -p PIDFILE -x /bin/sh -- -c CMD NAME LOGFILE DAEMON args...
    parts = line.split(" ")
    return parts[parts.index("/usr/bin/guest") + 1:]


# ---- the script itself -------------------------------------------------------------------------------

def test_sh_n_and_shellcheck(tmp_path):
    script = tmp_path / "init"
    script.write_text(SCRIPT)
    assert subprocess.run(["sh", "-n", str(script)]).returncode == 0
    result = subprocess.run([SHELLCHECK, "-s", "sh", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_the_script_is_the_same_for_every_stack_and_member_set():
    assert render() == SCRIPT
    for address in ADDRESSES:
        assert address not in SCRIPT
    assert "5000" not in SCRIPT and "prod" not in SCRIPT


# ---- good tables ------------------------------------------------------------------------------------

def test_a_member_verifies_its_table_and_posts_setup_on_loopback(guest):
    p = plan(setup_port=guest.setup_port)
    guest.deliver(signed(p))
    result = guest.boot("10.30.0.12")
    assert result.returncode == 0, result.stderr
    (line,) = guest.read("ssd")
    assert line.startswith("-S -b -m -p /var/run/dstack-sync.pid -x /bin/sh") and daemon_args(line) == []
    ((path, content_type, _),) = guest.received
    assert path == "/setup" and content_type == "application/json"
    assert guest.setups() == [{"peers": ["10.30.0.10:5000", "10.30.0.11:5000"], "port": 5000, "execution_rpc": RPC}]
    assert (guest.state / "overlay-table").read_text() == signed(p)["overlay-table"]
    assert not (guest.state / "overlay-founded").exists()
    assert not (guest.tmp / "pwned").exists()  # the RPC URL is data, never code


def test_argv_interface_starts_the_daemon_with_its_peers(guest):
    guest.deliver(signed(plan(interface="argv")))
    result = guest.boot("10.30.0.11")
    assert result.returncode == 0, result.stderr
    assert daemon_args(guest.read("ssd")[0]) == ["5000", "10.30.0.10:5000", "10.30.0.12:5000"]
    assert guest.received == []


@pytest.mark.parametrize("topology,count,explicit", [
    ("mesh", 5, None), ("ring", 5, None), ("ring", 2, None), ("ring", 1, None), ("star", 4, None),
    ("explicit", 4, {"overlay-1": ["overlay-0"], "overlay-2": ["overlay-1", "overlay-0"], "overlay-3": ["overlay-2"]}),
])
def test_each_node_derives_the_peers_the_plan_shows(tmp_path, topology, count, explicit):
    p = plan(interface="argv", topology=topology, count=count, explicit=explicit)
    table = membertable.parse(signed(p)["overlay-table"])
    for i, (key, address) in enumerate(zip(KEYS[:count], ADDRESSES)):
        g = Guest(tmp_path / str(i))
        try:
            g.deliver(signed(p))
            result = g.boot(address)
            assert result.returncode == 0, result.stderr
            shell = daemon_args(g.read("ssd")[0])[1:]
        finally:
            g.close()
        assert shell == p.peer_endpoints(key) == table.endpoints_of(address), (topology, key)


def test_genesis_founds_once_with_the_first_table_then_joins(guest):
    p = plan(setup_port=guest.setup_port)
    guest.deliver(signed(p, serial=1, founding=True))
    assert guest.boot("10.30.0.10").returncode == 0
    assert (guest.state / "overlay-founded").exists()
    guest.deliver(signed(p, serial=1, founding=True))  # the same table after a restart
    assert guest.boot("10.30.0.10").returncode == 0
    first, second = guest.setups()
    assert first["peers"] == []  # founding boot: no peers, the light client mints the secret
    assert second["peers"] == ["10.30.0.11:5000", "10.30.0.12:5000"]


def test_founding_open_never_founds_on_a_disk_that_accepted_a_table(guest):
    p = plan(setup_port=guest.setup_port)
    guest.deliver(signed(p, serial=1, founding=False))
    assert guest.boot("10.30.0.10").returncode == 0
    guest.deliver(signed(p, serial=2, founding=True))
    assert guest.boot("10.30.0.10").returncode == 0
    assert [s["peers"] for s in guest.setups()] == [["10.30.0.11:5000", "10.30.0.12:5000"]] * 2
    assert not (guest.state / "overlay-founded").exists()


def test_a_blank_disk_with_a_later_table_joins(guest):
    # the genesis node's disk was lost: the table moved on (founding closed), so it joins
    guest.deliver(signed(plan(setup_port=guest.setup_port), serial=9, founding=False))
    assert guest.boot("10.30.0.10").returncode == 0
    assert guest.setups()[0]["peers"] == ["10.30.0.11:5000", "10.30.0.12:5000"]


def test_only_the_genesis_node_founds(guest):
    guest.deliver(signed(plan(setup_port=guest.setup_port), serial=1, founding=True))
    assert guest.boot("10.30.0.11").returncode == 0
    assert guest.setups()[0]["peers"] == ["10.30.0.10:5000", "10.30.0.12:5000"]


def test_a_newer_table_is_accepted_at_restart(guest):
    small, big = plan(setup_port=guest.setup_port), plan(setup_port=guest.setup_port, count=4)
    guest.deliver(signed(small, serial=5))
    assert guest.boot("10.30.0.11").returncode == 0
    guest.deliver(signed(big, serial=6))
    assert guest.boot("10.30.0.11", action="restart").returncode == 0
    assert guest.setups()[1]["peers"] == ["10.30.0.10:5000", "10.30.0.12:5000", "10.30.0.13:5000"]
    assert "serial 6\n" in (guest.state / "overlay-table").read_text()


# ---- refused tables ------------------------------------------------------------------------------------

def refused(result, guest, message):
    assert result.returncode == 1, result.stdout
    assert message in result.stderr, result.stderr
    assert guest.read("ssd") == [] and guest.received == []
    assert message in guest.serial.read_text()  # the reason reaches the serial console


def test_forged_table_is_refused(guest):
    guest.deliver(signed(plan(), signer=OTHER_KEY))
    refused(guest.boot("10.30.0.11"), guest, "not signed by the fleet key")
    assert not (guest.state / "overlay-table").exists()


def test_tampered_table_is_refused(guest):
    values = signed(plan())
    values["overlay-table"] = values["overlay-table"].replace("member 10.30.0.12\n", "member 10.66.6.6\n")
    guest.deliver(values)
    refused(guest.boot("10.30.0.11"), guest, "not signed by the fleet key")


def test_garbage_signature_is_refused(guest):
    values = signed(plan())
    values["overlay-table-signature"] = "not base64 at all!"
    guest.deliver(values)
    refused(guest.boot("10.30.0.11"), guest, "not signed by the fleet key")


def test_replayed_older_table_is_refused(guest):
    p = plan(setup_port=guest.setup_port)
    guest.deliver(signed(p, serial=8))
    assert guest.boot("10.30.0.11").returncode == 0
    guest.received.clear()
    (guest.log / "ssd").unlink()
    guest.deliver(signed(plan(setup_port=guest.setup_port, count=2), serial=7))  # validly signed, older
    refused(guest.boot("10.30.0.11"), guest, "serial 7, older than the accepted 8 (replayed)")
    assert "serial 8\n" in (guest.state / "overlay-table").read_text()


def test_same_serial_with_other_content_is_refused(guest):
    guest.deliver(signed(plan(interface="argv"), serial=8))
    assert guest.boot("10.30.0.11").returncode == 0
    (guest.log / "ssd").unlink()
    guest.deliver(signed(plan(interface="argv", count=4), serial=8))
    refused(guest.boot("10.30.0.11"), guest, "differs from the accepted one of the same serial 8")


def test_foreign_project_is_refused(guest):
    guest.deliver(signed(plan(stack="dev", project="acme-tee-dev")))  # the same fleet key signs dev's tables
    refused(guest.boot("10.30.0.11"), guest, "for project acme-tee-dev, this node runs in acme-tee-prod")


def test_foreign_stack_is_refused_after_the_first_accepted_table(guest):
    guest.deliver(signed(plan(interface="argv", stack="prod"), serial=3))
    assert guest.boot("10.30.0.11").returncode == 0
    (guest.log / "ssd").unlink()
    guest.deliver(signed(plan(interface="argv", stack="prod-shadow"), serial=4))  # same project, another stack
    refused(guest.boot("10.30.0.11"), guest, "for stack prod-shadow, this node belongs to prod")


def test_a_node_not_in_the_table_refuses_to_start(guest):
    guest.deliver(signed(plan()))
    refused(guest.boot("10.30.0.99"), guest, "10.30.0.99 is not a member of this overlay")


def test_no_table_in_metadata_refuses(guest):
    refused(guest.boot("10.30.0.11"), guest, "no member table in instance metadata")


def test_no_data_disk_refuses(guest):
    guest.device.unlink()
    guest.deliver(signed(plan()))
    refused(guest.boot("10.30.0.10"), guest, "data disk unavailable")


def test_unknown_format_is_refused(guest):
    table = signed(plan())["overlay-table"].replace("dstack-fleet-overlay-table 1", "dstack-fleet-overlay-table 2")
    guest.deliver({"overlay-table": table, "overlay-table-signature": FLEET_KEY.sign(table.encode())})
    refused(guest.boot("10.30.0.11"), guest, "not in a format this image reads")


# ---- the rest of the boot ------------------------------------------------------------------------------

def test_blank_data_disk_is_formatted_and_mounted_a_used_one_is_not_formatted(guest):
    guest.deliver(signed(plan(interface="argv")))
    guest.boot("10.30.0.11", FAKE_BLKID="2")
    assert len(guest.read("mkfs")) == 1 and len(guest.read("mount")) == 1
    guest.boot("10.30.0.11", FAKE_BLKID="0")
    assert len(guest.read("mkfs")) == 1 and len(guest.read("mount")) == 2


def test_the_cc_event_log_goes_to_the_serial_console(guest):
    ccel = bytes(range(256)) * 3
    guest.ccel.write_bytes(ccel)
    guest.deliver(signed(plan(interface="argv")))
    assert guest.boot("10.30.0.11").returncode == 0
    text = guest.serial.read_text()
    inside = text.split(CCEL_BEGIN + "\n", 1)[1].split(CCEL_END, 1)[0]
    assert base64.b64decode("".join(inside.split())) == ccel


def test_the_documented_capture_command_recovers_the_event_log(guest):
    # the pipeline docs/nodes-and-overlay.md gives after `gcloud compute instances get-serial-port-output`
    pipeline = ("tr -d '\\r' \\\n  | sed -n '/^dstack-fleet: BEGIN CCEL$/,/^dstack-fleet: END CCEL$/p' | sed '1d;$d' \\\n"
                "  | base64 -d > overlay-0.ccel")
    doc = (Path(__file__).resolve().parent.parent / "docs" / "nodes-and-overlay.md").read_text()
    assert pipeline in doc
    ccel = os.urandom(5000)
    guest.ccel.write_bytes(ccel)
    guest.serial.write_text("[    1.2] kernel line\r\n")
    guest.deliver(signed(plan(interface="argv")))
    assert guest.boot("10.30.0.11").returncode == 0
    console = guest.serial.read_text().replace("\n", "\r\n") + "[    9.9] later kernel line\r\n"
    (guest.tmp / "serial.txt").write_text(console)
    result = subprocess.run(["sh", "-c", "cat serial.txt | " + pipeline.replace("\\\n", "")], cwd=guest.tmp,
                            capture_output=True)
    assert result.returncode == 0, result.stderr
    assert (guest.tmp / "overlay-0.ccel").read_bytes() == ccel


def test_stop_and_usage(guest):
    assert guest.boot("10.30.0.11", action="stop").returncode == 0
    assert guest.read("ssd") == ["-K -o -p /var/run/dstack-sync.pid"]
    result = guest.boot("10.30.0.11", action="bogus")
    assert result.returncode == 1 and "Usage:" in result.stderr


# -- every tool the script calls is in the image ----------------------------------------------------

_SHELL_WORDS = {"if", "then", "else", "elif", "fi", "do", "done", "while", "until", "for", "case", "esac", "!", "{",
                "}", "in"}
# POSIX sh special and regular built-ins the script may use (busybox ash has them all)
_BUILTINS = {"[", "test", "echo", "set", "shift", "exec", "return", "exit", "continue", "break", ":", "true", "false",
             "cd", "export", "local", "read", "printf", "trap", "unset", "wait", "kill"}
_STARTS_COMMAND = {";", ";;", "|", "||", "&&", "(", ")", "then", "do", "else", "elif", "if", "while", "until", "!",
                   "{"}


_PATTERN_ITEM = r"(?:[^\s()'\"\\|]|\\.|\"[^\"]*\"|'[^']*')+"
CASE_PATTERN = __import__("re").compile(rf"^{_PATTERN_ITEM}(?:\|{_PATTERN_ITEM})*\)\s*(.*)$")


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
        pattern = CASE_PATTERN.match(line)
        if pattern:  # a case pattern (globs, quoted parts, alternatives): only what follows ')' runs
            line = pattern.group(1)
        line = re.sub(r"\$\{[^}]*\}", "X", line)  # ${var%% *}: a word, whatever its spaces
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
    # and the packages the dstack-sync recipe depends on; the guest binary the recipe installs.
    import re

    from fleet.images import recipes
    from fleet.nodes import initscript

    provided = recipes.tplus_image_tools() | {initscript.DAEMON, "/bin/sh"}
    script = render()  # one script for every stack, interface and topology: the member table says which
    functions = set(re.findall(r"^([a-z_]+)\(\) [{(]", script, re.MULTILINE))
    called = called_commands(script) - _BUILTINS - functions
    assert called <= provided, sorted(called - provided)
    # the script calls these; the pinned busybox lacks mke2fs and openssl, so their packages must be listed
    assert {"mkfs.ext4", "blkid", "start-stop-daemon", "wget", "ip", "mount", "openssl"} <= called
    assert "mkfs.ext4" not in recipes.BUSYBOX_APPLETS and "e2fsprogs-mke2fs" in recipes.TPLUS_IMAGE_PACKAGES
    assert "openssl" not in recipes.BUSYBOX_APPLETS and "openssl-bin" in recipes.TPLUS_IMAGE_PACKAGES


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
    head, tail = render().rsplit('case "$1" in', 1)  # the dispatch at the end
    script = head + 'case "$1" in\n    find) find_data_device; exit $? ;;' + tail
    path = tmp_path / "init"
    path.write_text(script)
    result = subprocess.run(["sh", str(path), "find"], capture_output=True, text=True,
                            env=dict(os.environ, DSTACK_FLEET_SYS_BLOCK=str(sys_block), DSTACK_FLEET_DEV_DIR=str(dev)))
    assert result.returncode == 0 and result.stdout.strip() == f"{dev}/nvme0n2", result.stderr


def test_the_lexer_reads_case_globs_and_parameter_expansions_as_words():
    script = ("case \"$x\" in\n    ''|*[!0-9.]*|.*) return 1 ;;\n    *\" $m \"*) continue ;;\nesac\n"
              "keyword=${line%% *}\nnode=${value%% *} frob\n")
    assert called_commands(script) - {"return", "continue"} == {"frob"}
