"""The overlay's member table: what a node needs to join, signed at deploy time, verified at boot.

The image is the same for every stack and every member set; what differs (members, port, topology,
the execution RPC) reaches each node as this table in instance metadata. Instance metadata is
host-controlled, so the table is signed with the fleet's asymmetric Cloud KMS key (created by the
bootstrap stack, ``fleet.project.bootstrap.Names.table_key_version``) and the image carries only
the public half: the init script (``fleet.nodes.initscript``) checks the signature, that the
table names the node's own stack and project, that the node's own address is a member and that the
serial is never lower than the last one it accepted (kept on its data disk) before the light
client starts, and refuses to start otherwise.

The table is compact: the members (addresses, in config order) and the topology rule, from which
every node derives its own peers exactly as ``fleet.nodes.topology.peer_keys`` does (mesh: every
other member; ring: its two neighbours in member order; star: the genesis node is the hub;
explicit: one ``peers`` line per node). A 1,000-node mesh is about 20 KB, well inside the 256 KiB
GCE allows for one metadata value.

The plan knows the body (everything but the serial and the founding flag); the deploy-time step
``sign`` (``python -m fleet.nodes.membertable sign``, run by a pulumi-command ``Command`` of the
env stack) adds both and signs:

* the serial is ``max(previous serial + 1, seconds since the epoch)``: the step's ``update`` sees
  its previous output (pulumi-command 1.2.1 sets ``PULUMI_COMMAND_STDOUT``), and the clock keeps it
  increasing even if the step's state were lost;
* ``founding open`` only in the overlay's first table (the step's ``create``); every later table
  (any ``update``: a membership change, a port change, or the genesis node's data disk being
  replaced, which the step follows through its environment) says ``founding closed``, so the
  genesis node founds only at the overlay's first creation.

Format (version 1), one ``keyword value`` per line, UTF-8, ``\\n`` line ends, signed byte for byte::

    dstack-fleet-overlay-table 1
    serial 1767225600
    founding closed
    stack prod
    project acme-tee-prod
    topology mesh
    interface setup
    port 5000
    protocol udp
    setup-port 40080
    genesis 10.30.0.10
    execution-rpc "https://ethereum-rpc.publicnode.com"
    member 10.30.0.10
    member 10.30.0.11
    peers 10.30.0.10 10.30.0.11        (explicit topology only: a node, then its peers)
    end

``execution-rpc`` is a JSON string literal made by ``json.dumps`` (ASCII only), which the init
script copies into the ``POST /setup`` body as is.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import ipaddress
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from fleet.nodes.topology import OverlayPlan
from fleet.project.bootstrap import KEY_VERSION_RE, key_version_flags

FORMAT = "dstack-fleet-overlay-table"
VERSION = "1"
METADATA_TABLE = "overlay-table"
METADATA_SIGNATURE = "overlay-table-signature"
# GCE: "the only restriction placed on values is that their size must be less than or equal to
# 262144 bytes (256 KiB)" (compute v1 Metadata.items[].value); all items together stay under 512 KB.
MAX_VALUE_BYTES = 262144
MAX_METADATA_BYTES = 512 * 1000
# Worst case of the lines the signer adds (serial of 20 digits, founding closed/open).
SIGNER_LINES_MAX = len(f"{FORMAT} {VERSION}\nserial {'9' * 20}\nfounding closed\n")
# Cloud KMS returns a DER-encoded ECDSA signature of at most 72 bytes for P-256 (96 in base64).
SIGNATURE_B64_MAX = 96
STEP = "overlay-table-sign"
STEP_MARK = "# dstack-fleet:step="
PYTHON = ".venv/bin/python"  # the project's interpreter, relative to the project root (where up runs)
_WORD = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class TableError(ValueError):
    """A table that a node would refuse (or that the signer must not sign)."""


def body(plan: OverlayPlan) -> str:
    """Everything of the table the plan knows: the same bytes for every member."""
    lines = [
        f"stack {plan.stack}",
        f"project {plan.project}",
        f"topology {plan.topology}",
        f"interface {plan.interface}",
        f"port {plan.port}",
        f"protocol {plan.protocol}",
        f"setup-port {plan.setup_port}",
        f"genesis {plan.address_of(plan.genesis)}",
    ]
    if plan.execution_rpc:
        lines.append("execution-rpc " + json.dumps(plan.execution_rpc, ensure_ascii=True))
    lines += [f"member {m.address}" for m in plan.members]
    if plan.topology == "explicit":
        for m in plan.members:
            lines.append(" ".join(["peers", m.address, *(plan.address_of(p) for p in plan.peers[m.key])]))
    return "\n".join(lines) + "\n"


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def body_sha256(plan: OverlayPlan) -> str:
    return sha256_text(body(plan))


def document(table_body: str, serial: int, founding: bool) -> str:
    """The signed bytes: the header, the signer's two lines, the body and the end mark."""
    if serial < 1:
        raise TableError(f"serial {serial} is not positive")
    return (f"{FORMAT} {VERSION}\nserial {serial}\nfounding {'open' if founding else 'closed'}\n"
            f"{table_body}end\n")


@dataclass
class Table:
    """A parsed table (the init script reads the same fields, see ``fleet.nodes.initscript``)."""

    serial: int
    founding: bool
    stack: str
    project: str
    topology: str
    interface: str
    port: int
    protocol: str
    setup_port: int
    genesis: str
    execution_rpc: str | None
    members: list[str]
    explicit: dict[str, list[str]] = field(default_factory=dict)

    def peers_of(self, address: str) -> list[str]:
        """The addresses ``address`` dials, derived as the init script derives them."""
        if address not in self.members:
            raise TableError(f"{address} is not a member")
        others = [m for m in self.members if m != address]
        if self.topology == "mesh":
            return others
        if self.topology == "star":
            return others if address == self.genesis else [self.genesis]
        if self.topology == "ring":
            i = self.members.index(address)
            ring = [self.members[i - 1], self.members[(i + 1) % len(self.members)]]
            return [m for m in dict.fromkeys(ring) if m != address]
        return list(self.explicit.get(address, []))

    def endpoints_of(self, address: str) -> list[str]:
        return [f"{a}:{self.port}" for a in self.peers_of(address)]


def _address(value: str, line: int) -> str:
    try:
        if str(ipaddress.IPv4Address(value)) == value:
            return value
    except ValueError:
        pass
    raise TableError(f"line {line}: {value!r} is not an IPv4 address")


def _number(value: str, line: int, low: int, high: int) -> int:
    if not value.isdigit() or not low <= int(value) <= high:
        raise TableError(f"line {line}: {value!r} is not a number from {low} to {high}")
    return int(value)


def parse(text: str) -> Table:
    """The table as a node reads it; anything a node would refuse raises ``TableError``."""
    if not text.endswith("\n"):
        raise TableError("the table does not end with a newline")
    lines = text[:-1].split("\n")
    if lines[0] != f"{FORMAT} {VERSION}":
        raise TableError(f"line 1 is {lines[0][:60]!r}, not {FORMAT} {VERSION}")
    if lines[-1] != "end":
        raise TableError("the table has no end line (truncated?)")
    single: dict[str, str] = {}
    members: list[str] = []
    explicit: dict[str, list[str]] = {}
    for number, line in enumerate(lines[1:-1], start=2):
        keyword, _, value = line.partition(" ")
        if keyword == "member":
            members.append(_address(value, number))
        elif keyword == "peers":
            node, *peers = value.split(" ")
            explicit[_address(node, number)] = [_address(p, number) for p in peers]
        elif keyword in ("serial", "founding", "stack", "project", "topology", "interface", "port", "protocol",
                         "setup-port", "genesis", "execution-rpc"):
            if keyword in single:
                raise TableError(f"line {number}: {keyword} appears twice")
            single[keyword] = value
        else:
            raise TableError(f"line {number}: unknown keyword {keyword!r}")
    missing = [k for k in ("serial", "founding", "stack", "project", "topology", "interface", "port", "protocol",
                           "setup-port", "genesis") if k not in single]
    if missing:
        raise TableError(f"missing {', '.join(missing)}")
    for keyword in ("stack", "project", "topology", "interface", "protocol"):
        if not _WORD.match(single[keyword]):
            raise TableError(f"{keyword} {single[keyword]!r} is not a plain word")
    if single["founding"] not in ("open", "closed"):
        raise TableError(f"founding {single['founding']!r} is neither open nor closed")
    if single["topology"] not in ("mesh", "ring", "star", "explicit"):
        raise TableError(f"unknown topology {single['topology']!r}")
    if single["interface"] not in ("argv", "setup"):
        raise TableError(f"unknown interface {single['interface']!r}")
    rpc = single.get("execution-rpc")
    if rpc is not None:
        if not (rpc.startswith('"') and rpc.endswith('"') and rpc.isascii() and rpc.isprintable()):
            raise TableError("execution-rpc is not an ASCII JSON string")
        rpc = json.loads(rpc)
    if single["interface"] == "setup" and rpc is None:
        raise TableError("the setup interface needs execution-rpc")
    if not members or len(set(members)) != len(members):
        raise TableError("the members are empty or repeated")
    genesis = _address(single["genesis"], 0)
    if genesis not in members:
        raise TableError(f"genesis {genesis} is not a member")
    if single["topology"] != "explicit" and explicit:
        raise TableError("peers lines belong to the explicit topology only")
    if any(k not in members or any(p not in members for p in v) for k, v in explicit.items()):
        raise TableError("a peers line names a non-member")
    return Table(
        serial=_number(single["serial"], 0, 1, 10**19), founding=single["founding"] == "open",
        stack=single["stack"], project=single["project"], topology=single["topology"],
        interface=single["interface"], port=_number(single["port"], 0, 1, 65535), protocol=single["protocol"],
        setup_port=_number(single["setup-port"], 0, 1, 65535), genesis=genesis, execution_rpc=rpc,
        members=members, explicit=explicit)


def worst_case_bytes(plan: OverlayPlan) -> int:
    """The largest metadata value this plan's table can be once signed."""
    return SIGNER_LINES_MAX + len(body(plan).encode("utf-8")) + len("end\n")


# ---- the deploy-time signing step -------------------------------------------------------------------

def step_script(key_version: str, *, founding: bool) -> str:
    """The command the env stack's signing step runs (``create`` with founding, ``update`` without).
    It runs from the project root, where ``pulumi up`` runs; the body arrives on stdin."""
    if not KEY_VERSION_RE.match(key_version):
        raise ValueError(f"{key_version!r} is not a Cloud KMS key version resource name")
    args = [PYTHON, "-m", "fleet.nodes.membertable", "sign", "--key-version", key_version]
    if founding:
        args.append("--founding")
    return "\n".join([f"{STEP_MARK}{STEP}", "set -eu", "exec " + " ".join(args)]) + "\n"


def next_serial(previous_stdout: str | None, now: int) -> int:
    previous = 0
    if previous_stdout:
        try:
            previous = int(json.loads(previous_stdout)["serial"])
        except (ValueError, KeyError, TypeError):
            previous = 0
    return max(previous + 1, now)


def step_output(table: str, signature_der: bytes, key_version: str) -> str:
    """What the step prints (one JSON line): the env stack puts ``table`` and ``signature`` into
    every member's instance metadata."""
    parsed = parse(table)
    return json.dumps({"table": table, "signature": base64.b64encode(signature_der).decode("ascii"),
                       "serial": parsed.serial, "founding": parsed.founding, "keyVersion": key_version,
                       "sha256": hashlib.sha256(table.encode("utf-8")).hexdigest()}, sort_keys=True)


def verify(table: bytes, signature_der: bytes, public_key_pem: str) -> bool:
    """ECDSA P-256 / SHA-256 over the table bytes, as ``openssl dgst -sha256 -verify`` checks it."""
    from Crypto.Hash import SHA256
    from Crypto.PublicKey import ECC
    from Crypto.Signature import DSS

    key = ECC.import_key(public_key_pem)
    try:
        DSS.new(key, "fips-186-3", encoding="der").verify(SHA256.new(table), signature_der)
        return True
    except ValueError:
        return False


def _signature_bytes(raw: bytes) -> list[bytes]:
    """gcloud's --signature-file holds the DER signature; its reference page speaks of base64, so a
    base64 text is accepted too (whichever verifies is used)."""
    out = [raw]
    try:
        out.append(base64.b64decode(raw.strip(), validate=True))
    except ValueError:
        pass
    return out


def sign(table_body: str, key_version: str, *, founding: bool, previous_stdout: str | None,
         gcloud: str = "gcloud", now: int | None = None) -> str:
    """Sign with Cloud KMS (``gcloud kms asymmetric-sign``), check the signature against the key
    version's public key, and return the step's output."""
    try:
        version, where = key_version_flags(key_version)
    except ValueError as exc:
        raise TableError(str(exc)) from None
    serial = next_serial(previous_stdout, int(time.time()) if now is None else now)
    table = document(table_body, serial, founding)
    parse(table)  # never sign what a node would refuse
    if len(table.encode("utf-8")) > MAX_VALUE_BYTES:
        raise TableError(f"the table is {len(table.encode())} bytes; a metadata value holds at most {MAX_VALUE_BYTES}")
    with tempfile.TemporaryDirectory(prefix="fleet-table-") as tmp:
        data, signature, public = Path(tmp, "table"), Path(tmp, "table.sig"), Path(tmp, "key.pem")
        data.write_bytes(table.encode("utf-8"))
        subprocess.run([gcloud, "kms", "asymmetric-sign", *where, "--version", version,
                        "--digest-algorithm", "sha256", "--input-file", str(data), "--signature-file",
                        str(signature)], check=True, stdout=sys.stderr)
        subprocess.run([gcloud, "kms", "keys", "versions", "get-public-key", version, *where,
                        "--output-file", str(public)], check=True, stdout=sys.stderr)
        pem = public.read_text(encoding="ascii")
        for candidate in _signature_bytes(signature.read_bytes()):
            if verify(data.read_bytes(), candidate, pem):
                return step_output(table, candidate, key_version)
    raise TableError(f"the signature from {key_version} does not verify with its own public key")


def offline_step_stdout(ctx) -> str:
    """Offline stand-in for the signing step (``fleet.plan.offline.COMMAND_STEPS``): the step's
    output for the table on its stdin, serial 1, with a fake signature that verifies with no key
    (it is 64 bytes derived from the step's URN, not DER)."""
    body_text = ctx.inputs.get("stdin") if isinstance(ctx.inputs.get("stdin"), str) else ""
    table = document(body_text, 1, founding="--founding" in str(ctx.inputs.get("create", "")))
    return step_output(table, bytes.fromhex(ctx.digest("signature") * 2), "offline stand-in")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fleet.nodes.membertable",
                                     description="Sign the overlay member table read from stdin (deploy time).")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sign")
    s.add_argument("--key-version", required=True)
    s.add_argument("--founding", action="store_true", help="the overlay's first table (the step's create)")
    args = parser.parse_args(argv)
    try:
        print(sign(sys.stdin.read(), args.key_version, founding=args.founding,
                   previous_stdout=os.environ.get("PULUMI_COMMAND_STDOUT"), gcloud=os.environ.get("GCLOUD", "gcloud")))
    except (TableError, subprocess.CalledProcessError, OSError) as exc:
        print(f"overlay member table not signed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
