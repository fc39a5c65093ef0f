"""The overlay member table: its format, its size, the peers each node derives from it, and the
deploy-time signing step (run against a stand-in `gcloud` that signs like Cloud KMS: DER ECDSA P-256
over SHA-256, written to --signature-file)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from Crypto.PublicKey import ECC
from hypothesis import given, settings
from hypothesis import strategies as st

from fleet.nodes import membertable
from fleet.nodes.membertable import TableError, document, parse
from fleet.nodes.topology import Member, OverlayPlan, peer_keys
from fleet.plan.offline import COMMAND_STEPS, Context, command_step

from .conftest import ROOT

KEY_VERSION = ("projects/acme-tee-ops/locations/us-central1/keyRings/fleet-stack-secrets/cryptoKeys/"
               "fleet-overlay-tables/cryptoKeyVersions/1")


def plan_of(count: int, topology: str = "mesh", explicit=None, rpc="https://ethereum-rpc.publicnode.com",
            interface="setup") -> OverlayPlan:
    keys = [f"overlay-{i}" for i in range(count)]
    return OverlayPlan(port=5000, protocol="udp", topology=topology, delivery="signed", interface=interface,
                       setup_port=40080, execution_rpc=rpc, genesis="overlay-0",
                       members=tuple(Member(k, f"10.{30 + i // 60000}.{i // 250 % 240}.{i % 250 + 2}")
                                     for i, k in enumerate(keys)),
                       peers=peer_keys(topology, keys, "overlay-0", explicit or {}), stack="prod",
                       project="acme-tee-prod")


def test_the_body_holds_members_and_the_rule_not_peer_lists():
    p = plan_of(3)
    assert membertable.body(p) == (
        "stack prod\nproject acme-tee-prod\ntopology mesh\ninterface setup\nport 5000\nprotocol udp\n"
        "setup-port 40080\ngenesis 10.30.0.2\nexecution-rpc \"https://ethereum-rpc.publicnode.com\"\n"
        "member 10.30.0.2\nmember 10.30.0.3\nmember 10.30.0.4\n")
    table = parse(document(membertable.body(p), 12, founding=False))
    assert (table.serial, table.founding, table.stack, table.project) == (12, False, "prod", "acme-tee-prod")


def test_a_1000_node_mesh_fits_one_metadata_value():
    p = plan_of(1000)
    size = membertable.worst_case_bytes(p)
    assert size < 25_000 < membertable.MAX_VALUE_BYTES  # about 20 bytes per member
    signed = document(membertable.body(p), 1_767_225_600, founding=True)
    assert len(signed.encode()) <= size and parse(signed).members[-1] == p.members[-1].address


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=1, max_value=12), st.sampled_from(["mesh", "ring", "star"]))
def test_every_node_derives_exactly_the_peers_the_plan_shows(count, topology):
    p = plan_of(count, topology)
    table = parse(document(membertable.body(p), 1, founding=False))
    for m in p.members:
        assert table.endpoints_of(m.address) == p.peer_endpoints(m.key)


def test_explicit_peers_travel_as_lines():
    p = plan_of(3, "explicit", {"overlay-1": ["overlay-0"], "overlay-2": ["overlay-1", "overlay-0"]})
    assert "peers 10.30.0.4 10.30.0.3 10.30.0.2\n" in membertable.body(p)
    table = parse(document(membertable.body(p), 1, founding=False))
    assert [table.endpoints_of(m.address) for m in p.members] == [p.peer_endpoints(m.key) for m in p.members]


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.replace("dstack-fleet-overlay-table 1", "dstack-fleet-overlay-table 2"), "not dstack-fleet-overlay"),
    (lambda t: t.replace("end\n", ""), "no end line"),
    (lambda t: t.replace("member 10.30.0.3", "member 10.30.0.3; rm -rf /"), "is not an IPv4 address"),
    (lambda t: t.replace("serial 4", "serial 4\nserial 5"), "serial appears twice"),
    (lambda t: t.replace("topology mesh", "topology hypercube"), "unknown topology"),
    (lambda t: t.replace("genesis 10.30.0.2", "genesis 10.30.0.99"), "is not a member"),
    (lambda t: t.replace("port 5000", "port 5000\nimage docker.io/x:latest"), "unknown keyword 'image'"),
    (lambda t: t.replace('"https://ethereum-rpc.publicnode.com"', "https://x"), "not an ASCII JSON string"),
])
def test_what_a_node_would_refuse_is_never_signed(edit, message):
    good = document(membertable.body(plan_of(3)), 4, founding=False)
    parse(good)
    with pytest.raises(TableError, match=message):
        parse(edit(good))


def test_the_serial_only_grows():
    assert membertable.next_serial(None, now=1_000) == 1_000
    previous = json.dumps({"serial": 5_000})
    assert membertable.next_serial(previous, now=1_000) == 5_001  # a clock behind the last table
    assert membertable.next_serial(previous, now=9_000) == 9_000
    assert membertable.next_serial("not json", now=7) == 7


def test_the_step_opens_founding_only_on_create():
    create = membertable.step_script(KEY_VERSION, founding=True)
    update = membertable.step_script(KEY_VERSION, founding=False)
    assert command_step(create) == command_step(update) == membertable.STEP
    assert create.rstrip().endswith("--founding") and "--founding" not in update
    assert f"--key-version {KEY_VERSION}" in update and ".venv/bin/python -m fleet.nodes.membertable sign" in update
    with pytest.raises(ValueError, match="not a Cloud KMS key version"):
        membertable.step_script("projects/x; rm -rf /", founding=False)


def test_the_offline_stand_in_has_the_real_shape():
    body = membertable.body(plan_of(2))
    ctx = Context(project="p", stack="prod", type="command:local:Command", name="overlay-table-sign",
                  urn="urn:pulumi:prod::dstack-fleet::x::overlay-table-sign",
                  inputs={"create": membertable.step_script(KEY_VERSION, founding=True), "stdin": body})
    out = json.loads(COMMAND_STEPS[membertable.STEP](ctx))
    assert parse(out["table"]).founding and out["table"].endswith(body + "end\n") and out["serial"] == 1


# ---- the signing step against a stand-in Cloud KMS --------------------------------------------------------------

FAKE_GCLOUD = r'''
import base64, json, os, sys
from Crypto.Hash import SHA256
from Crypto.PublicKey import ECC
from Crypto.Signature import DSS
args = sys.argv[1:]
with open(os.environ["GCLOUD_LOG"], "a") as log:
    log.write(json.dumps(args) + "\n")
flags = dict(zip(args[::2], args[1::2]))
key = ECC.import_key(open(os.environ["KMS_PRIVATE_KEY"]).read())
if args[:2] == ["kms", "asymmetric-sign"]:
    data = open(flags["--input-file"], "rb").read()
    signature = DSS.new(key, "fips-186-3", encoding="der").sign(SHA256.new(data))
    if os.environ.get("SIGNATURE_AS_BASE64"):
        signature = base64.b64encode(signature)
    if os.environ.get("SIGNATURE_GARBAGE"):
        signature = b"\x30" + bytes(70)
    open(flags["--signature-file"], "wb").write(signature)
elif args[:4] == ["kms", "keys", "versions", "get-public-key"]:
    open(dict(zip(args[5::2], args[6::2]))["--output-file"], "w").write(key.public_key().export_key(format="PEM"))
else:
    sys.exit("unsupported")
'''


@pytest.fixture
def kms(tmp_path):
    private = tmp_path / "kms.pem"
    private.write_text(ECC.generate(curve="P-256").export_key(format="PEM"))
    gcloud = tmp_path / "gcloud"
    gcloud.write_text(f"#!{sys.executable}\n{FAKE_GCLOUD}")
    gcloud.chmod(0o755)
    log = tmp_path / "gcloud.log"
    env = dict(os.environ, KMS_PRIVATE_KEY=str(private), GCLOUD_LOG=str(log), GCLOUD=str(gcloud),
               PYTHONPATH=str(ROOT))

    def run(body: str, *extra: str, previous: str | None = None, **more: str) -> subprocess.CompletedProcess:
        e = dict(env, **more)
        if previous is not None:
            e["PULUMI_COMMAND_STDOUT"] = previous
        return subprocess.run([sys.executable, "-m", "fleet.nodes.membertable", "sign", "--key-version", KEY_VERSION,
                               *extra], input=body, env=e, capture_output=True, text=True, cwd=ROOT)

    run.public = lambda: ECC.import_key(private.read_text()).public_key().export_key(format="PEM")
    run.calls = lambda: [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return run


def test_sign_produces_a_table_the_image_verifies(kms):
    import base64

    body = membertable.body(plan_of(3))
    result = kms(body, "--founding")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert membertable.verify(out["table"].encode(), base64.b64decode(out["signature"]), kms.public())
    table = parse(out["table"])
    assert table.founding and out["table"].endswith(body + "end\n") and out["keyVersion"] == KEY_VERSION
    sign, public = kms.calls()
    assert sign[:2] == ["kms", "asymmetric-sign"] and sign[sign.index("--digest-algorithm") + 1] == "sha256"
    assert [sign[sign.index(f) + 1] for f in ("--project", "--location", "--keyring", "--key", "--version")] == [
        "acme-tee-ops", "us-central1", "fleet-stack-secrets", "fleet-overlay-tables", "1"]
    assert public[:5] == ["kms", "keys", "versions", "get-public-key", "1"]
    # an update: founding closed, serial above the previous one even if the clock were behind
    again = kms(body, previous=json.dumps({"serial": 10**12}))
    assert again.returncode == 0 and not parse(json.loads(again.stdout)["table"]).founding
    assert json.loads(again.stdout)["serial"] == 10**12 + 1


def test_a_base64_signature_file_is_accepted_and_a_bad_one_refused(kms):
    body = membertable.body(plan_of(2))
    assert kms(body, SIGNATURE_AS_BASE64="1").returncode == 0
    bad = kms(body, SIGNATURE_GARBAGE="1")
    assert bad.returncode == 1 and "does not verify with its own public key" in bad.stderr and bad.stdout == ""


def test_a_table_a_node_would_refuse_is_not_signed(kms):
    result = kms(membertable.body(plan_of(2)).replace("member 10.30.0.3", "member nowhere"))
    assert result.returncode == 1 and "is not an IPv4 address" in result.stderr
    assert kms.calls() == []  # never sent to Cloud KMS
