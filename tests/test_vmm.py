"""Apps on a dstack VMM host: request bodies as vmm-cli.py v0.5.11 builds them, the dynamic provider
against a fake VMM (and KMS) HTTP server, encrypted env, and the component under the mock harness."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import dill
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from eth_keys import keys
from pulumi.dynamic import Config, ConfigureRequest

from components.vmm import TYPE, VmProvider, vm_props
from fleet.apps import plans as fleet_apps
from fleet.project import bootstrap
from fleet.images import lock
from fleet.apps import vmm as core
from fleet.plan.harness import run_program
from fleet.stacks.load import load_config
from fleet.config.values import display

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "ops:tok-3f9a1c"  # user:password -> HTTP Basic, as vmm-cli.py v0.5.11 sends it
SECRET_VALUE = "s3cret-env-value-71"


# ---------------------------------------------------------------------------------------------
# A fake VMM (and KMS) speaking /prpc/<Method>?json


class FakeVmm:
    """Records every request; keeps VMs like the VMM's manifest does; refuses requests without the
    expected Authorization header when ``auth`` is set; ``fail[method] = (status, body)`` injects errors."""

    def __init__(self, auth: str | None = None, kms_key: X25519PrivateKey | None = None,
                 signer: keys.PrivateKey | None = None, sign: str = "v1"):
        self.auth = auth
        self.requests: list[dict] = []
        self.vms: dict[str, dict] = {}
        self.fail: dict[str, tuple[int, bytes]] = {}
        self.kms_key, self.signer, self.sign = kms_key, signer, sign
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                method = self.path.split("?")[0].removeprefix("/prpc/")
                body = json.loads(raw or b"{}")
                fake.requests.append({"method": method, "path": self.path, "body": body,
                                      "authorization": self.headers.get("Authorization")})
                if fake.auth is not None and self.headers.get("Authorization") != fake.auth:
                    return self._send(401, b"Unauthorized", "text/plain")
                if method in fake.fail:
                    status, payload = fake.fail[method]
                    return self._send(status, payload, "application/json")
                try:
                    result = fake.handle(method, body)
                except KeyError as exc:
                    return self._send(400, json.dumps({"error": f"{exc.args[0]}"}).encode(), "application/json")
                return self._send(200, json.dumps(result).encode(), "application/json")

            def _send(self, status, payload, content_type):
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def methods(self) -> list[str]:
        return [r["method"] for r in self.requests]

    def bodies(self, method: str) -> list[dict]:
        return [r["body"] for r in self.requests if r["method"] == method]

    def _vm(self, vm_id: str) -> dict:
        if vm_id not in self.vms:
            raise KeyError(f"Failed to load VM: VM not found: {vm_id}")
        return self.vms[vm_id]

    def handle(self, method: str, body: dict) -> dict:
        if method == "Status":
            return {"vms": [{"id": i, "name": v["name"], "status": v["status"], "app_id": v["app_id"]}
                            for i, v in self.vms.items() if body.get("keyword", "") in v["name"]]}
        if method == "CreateVm":
            vm_id = str(uuid.uuid4())
            self.vms[vm_id] = {**body, "status": "running",
                               "app_id": body.get("app_id") or hashlib.sha256(body["compose_file"].encode()).hexdigest()[:40]}
            return {"id": vm_id}
        if method == "GetInfo":
            vm = self.vms.get(body["id"])
            if vm is None:
                return {"found": False}
            return {"found": True, "info": {"id": body["id"], "name": vm["name"], "status": vm["status"],
                                            "app_id": vm["app_id"], "configuration": {"compose_file": vm["compose_file"]}}}
        if method in ("UpdateVm", "UpgradeApp", "ResizeVm"):
            vm = self._vm(body["id"])
            resources = [k for k in ("vcpu", "memory", "disk_size", "image") if k in body]
            if resources and vm["status"] not in ("stopped", "exited"):
                raise KeyError(f"vm should be stopped before resize: {body['id']}")
            for key in ("compose_file", "encrypted_env", "user_config", *resources):
                if body.get(key):
                    vm[key] = body[key]
            if body.get("update_ports"):
                vm["ports"] = body["ports"]
            if body.get("update_kms_urls"):
                vm["kms_urls"] = body["kms_urls"]
            return {} if method == "ResizeVm" else {"id": hashlib.sha256(vm["compose_file"].encode()).hexdigest()[:40]}
        if method in ("ShutdownVm", "StopVm"):
            self._vm(body["id"])["status"] = "stopped"
            return {}
        if method == "StartVm":
            self._vm(body["id"])["status"] = "running"
            return {}
        if method == "RemoveVm":
            self._vm(body["id"])
            del self.vms[body["id"]]
            return {}
        if method == "GetAppEnvEncryptPubKey":
            return self.pubkey_response(body["app_id"])
        raise KeyError(f"unknown method {method}")

    def pubkey_response(self, app_id: str) -> dict:
        public = self.kms_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        response = {"public_key": public.hex()}
        app = bytes.fromhex(app_id)
        if self.sign == "v1":
            stamp = int(time.time())
            message = core.SIGNED_PREFIX + app + stamp.to_bytes(8, "big") + public
            response.update(timestamp=stamp, signature_v1=self.signer.sign_msg_hash(core.keccak256(message)).to_bytes().hex())
        elif self.sign == "legacy":
            response["signature"] = self.signer.sign_msg_hash(core.keccak256(core.SIGNED_PREFIX + app + public)).to_bytes().hex()
        return response

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def decrypt_env(blob_hex: str, private_key: X25519PrivateKey) -> dict:
    """What the guest does with .encrypted-env: ephemeral public key (32), IV (12), AES-256-GCM."""
    blob = bytes.fromhex(blob_hex)
    shared = private_key.exchange(X25519PublicKey.from_public_bytes(blob[:32]))
    return json.loads(AESGCM(shared).decrypt(blob[32:44], blob[44:], None))


# ---------------------------------------------------------------------------------------------
# Planned apps


def staging_app(project=None, change=None):
    """The staging stack's VMM app, optionally with its config changed."""
    if project is not None and change is not None:
        project.mutate("staging", "staging", change)  # same stack name, so the same app name
        root, stack = project.root, "staging"
    else:
        root, stack = ROOT, "staging"
    sf, cfg = load_config(root, stack)
    names = bootstrap.names_for(cfg)
    plans = fleet_apps.plan_apps(cfg, lock.load(root), root, names.registry_path)
    app = next(a for a in plans if a.target == "vmm")
    return sf, cfg, app


def vmm_entry(config) -> dict:
    return next(a for a in config["dstack-fleet:apps"] if a["target"] == "vmm")


def with_kms_env(config):
    app = vmm_entry(config)
    app["keyProvider"] = "kms"
    app["kms"] = {"urls": ["https://kms.staging.acme.internal:8000"]}
    app["secretEnv"] = {"API_KEY": "apiKey"}
    config.setdefault("dstack-fleet:secrets", {})["apiKey"] = {"secure": "v1:placeholder"}


def provider(secrets: dict[str, str]) -> VmProvider:
    p = VmProvider()
    p.configure(ConfigureRequest(Config({"dstack-fleet:secrets": json.dumps(secrets)}, "dstack-fleet")))
    return p


def props_for(app, fake: FakeVmm, **extra) -> dict:
    props = vm_props(app, app.config.vmm)
    props.update(url=fake.url, stopTimeout=2, pollInterval=0.01, **extra)
    return props


# ---------------------------------------------------------------------------------------------
# Request bodies


def test_create_request_carries_the_exact_compose_bytes_app_id_and_parsed_ports():
    _, _, app = staging_app()
    spec = core.vm_spec(app, app.config.vmm)
    body = core.create_request(spec)
    assert body["compose_file"].encode("utf-8") == app.app_compose.data
    assert body["app_id"] == app.app_id == hashlib.sha256(app.app_compose.data).hexdigest()[:40]
    assert body["ports"] == [
        {"protocol": "tcp", "host_address": "127.0.0.1", "host_port": 8080, "vm_port": 8080},
        {"protocol": "tcp", "host_address": "127.0.0.1", "host_port": 24567, "vm_port": 24567}]
    assert (body["vcpu"], body["memory"], body["disk_size"], body["image"]) == (8, 65536, 500, "dstack-0.5.11")
    # the fields vmm-cli.py deploy always sends; no swap_size (not in the proto), no empty URL lists
    assert set(body) == {"name", "image", "compose_file", "vcpu", "memory", "disk_size", "app_id", "user_config",
                         "ports", "hugepages", "pin_numa", "stopped", "no_tee"}
    assert body["name"] == "mpc-staging" and body["stopped"] is False


def test_ports_parse_like_vmm_cli_and_bad_ones_fail_in_one_line():
    assert core.parse_port("udp:0.0.0.0:5000:5001") == {"protocol": "udp", "host_address": "0.0.0.0",
                                                        "host_port": 5000, "vm_port": 5001}
    for bad, why in (("tcp:8080", "expected protocol"), ("sctp:1:2", "tcp or udp"), ("tcp:0:80", "not a port"),
                     ("tcp:80:http", "not a port")):
        with pytest.raises(core.VmmError, match=why) as exc:
            core.parse_port(bad)
        assert "\n" not in str(exc.value)


def _spec(**changes):
    base = core.VmSpec(name="app-dev", image="dstack-0.5.11", compose_file='{"a": 1}', app_id="ab" * 20,
                       user_config="", vcpu=2, memory=4096, disk_size=20,
                       ports=(core.parse_port("tcp:8080:80"),), kms_urls=("https://kms",), gateway_urls=())
    return core.VmSpec(**{**base.__dict__, **changes})


def test_update_is_one_UpdateVm_with_only_what_changed_from_v0_5_6():
    old, new = _spec(), _spec(compose_file='{"a": 2}', memory=8192, kms_urls=("https://kms2",))
    calls = core.update_calls("vm-1", old, new)
    assert calls == [("UpdateVm", {"id": "vm-1", "compose_file": '{"a": 2}', "update_kms_urls": True,
                                   "kms_urls": ["https://kms2"], "memory": 8192})]
    assert core.update_calls("vm-1", old, _spec()) == []
    ports = core.update_calls("vm-1", old, _spec(ports=()))
    assert ports == [("UpdateVm", {"id": "vm-1", "update_ports": True, "ports": []})]
    assert not core.needs_restart(old, _spec(ports=()), env_changed=False)
    assert core.needs_restart(old, new, env_changed=False)


def test_update_at_v0_5_5_is_ResizeVm_and_UpgradeApp_and_refuses_url_changes():
    old = _spec()
    calls = core.update_calls("vm-1", old, _spec(compose_file="{}", vcpu=4), encrypted_env="ee", version="0.5.5")
    assert calls == [("ResizeVm", {"id": "vm-1", "vcpu": 4}),
                     ("UpgradeApp", {"id": "vm-1", "compose_file": "{}", "encrypted_env": "ee"})]
    with pytest.raises(core.VmmError, match="kms_urls in place needs UpdateVm"):
        core.update_calls("vm-1", old, _spec(kms_urls=()), version="0.5.5")
    assert core.update_method("0.5.5") == "UpgradeApp" and core.update_method("0.5.6") == "UpdateVm"


def test_changes_the_vmm_cannot_make_in_place_are_refused():
    with pytest.raises(core.VmmError, match="cannot shrink"):
        core.update_calls("vm-1", _spec(), _spec(disk_size=10))
    with pytest.raises(core.VmmError, match="cannot be cleared"):
        core.update_calls("vm-1", _spec(user_config="x"), _spec(user_config=""))
    with pytest.raises(core.VmmError, match="cannot rename"):
        core.update_calls("vm-1", _spec(), _spec(name="other"))


def test_auth_basic_for_user_password_bearer_otherwise_never_in_repr():
    basic = core.Auth.from_secret("ops:pw")
    assert basic.header() == "Basic " + base64.b64encode(b"ops:pw").decode()
    assert core.Auth.from_secret("tok123").header() == "Bearer tok123"
    assert "pw" not in repr(basic) and "tok123" not in repr(core.Auth.from_secret("tok123"))


# ---------------------------------------------------------------------------------------------
# The dynamic provider against the fake VMM


def test_create_then_compose_change_updates_the_same_vm_then_delete_removes_it(project):
    _, _, app = staging_app()
    expected_auth = "Basic " + base64.b64encode(TOKEN.encode()).decode()
    with FakeVmm(auth=expected_auth) as fake:
        p = provider({"vmmToken": TOKEN})
        props = props_for(app, fake)
        created = p.create(props)
        vm_id = created.id
        create = fake.bodies("CreateVm")
        assert len(create) == 1 and create[0]["compose_file"].encode() == app.app_compose.data
        assert create[0]["app_id"] == app.app_id
        assert all(r["authorization"] == expected_auth for r in fake.requests)
        assert created.outs["vmId"] == vm_id and created.outs["status"] == "running"

        # a compose change: the diff says update (no replacement), the update targets the same VM id
        _, _, changed = staging_app(project, lambda c: vmm_entry(c)["settings"].update(publicLogs=False))
        news = props_for(changed, fake)
        assert news["composeFile"] != props["composeFile"]
        diff = p.diff(vm_id, created.outs, news)
        assert diff.changes is True and diff.replaces == [] and diff.delete_before_replace is True
        fake.requests.clear()
        updated = p.update(vm_id, created.outs, news)
        assert "CreateVm" not in fake.methods()
        update = fake.bodies("UpdateVm")
        assert update == [{"id": vm_id, "compose_file": news["composeFile"]}]
        order = [m for m in fake.methods() if m in ("ShutdownVm", "UpdateVm", "StartVm")]
        assert order == ["ShutdownVm", "UpdateVm", "StartVm"]
        assert fake.vms[vm_id]["compose_file"] == news["composeFile"] and len(fake.vms) == 1
        assert updated.outs["vmId"] == vm_id

        p.delete(vm_id, updated.outs)
        assert fake.bodies("RemoveVm") == [{"id": vm_id}] and fake.vms == {}
        p.delete(vm_id, updated.outs)  # already gone: no second RemoveVm, no error
        assert len(fake.bodies("RemoveVm")) == 1


def test_requests_without_the_credential_are_refused_by_the_fake():
    with FakeVmm(auth="Bearer right") as fake:
        with pytest.raises(core.VmmError, match=r"^VMM Status \(http://127\.0\.0\.1:\d+\) failed: HTTP 401: Unauthorized$"):
            core.VmmClient(fake.url).call("Status", {})
        with pytest.raises(core.VmmError, match="HTTP 401"):
            core.VmmClient(fake.url, auth=core.Auth.from_secret("wrong")).call("Status", {})
        assert core.VmmClient(fake.url, auth=core.Auth.from_secret("right")).call("Status", {}) == {"vms": []}


def test_create_refuses_a_second_vm_with_the_same_name():
    _, _, app = staging_app()
    with FakeVmm() as fake:
        props = props_for(app, fake, tokenSecret=None)
        first = provider({}).create(props)
        with pytest.raises(core.VmmError, match=f"already has a VM named 'mpc-staging' \\(id {first.id}\\)"):
            provider({}).create(props)
        assert len(fake.bodies("CreateVm")) == 1


@pytest.mark.parametrize("status,payload,expected", [
    (400, b'{"error": "Port mapping is not allowed for tcp:8080"}',
     r"^VMM CreateVm \(http://127\.0\.0\.1:\d+\) failed: HTTP 400: Port mapping is not allowed for tcp:8080$"),
    (500, b"internal\nserver error", r"^VMM CreateVm \(.*\) failed: HTTP 500: internal server error$"),
    (200, b"<html>proxy</html>", r"^VMM CreateVm \(.*\): the response is not JSON: <html>proxy</html>$"),
])
def test_server_errors_are_one_line_naming_the_call(status, payload, expected):
    _, _, app = staging_app()
    with FakeVmm() as fake:
        fake.fail["CreateVm"] = (status, payload)
        with pytest.raises(core.VmmError, match=expected) as exc:
            provider({"vmmToken": TOKEN}).create(props_for(app, fake))
        assert "\n" not in str(exc.value) and TOKEN not in str(exc.value)


def test_an_unreachable_vmm_is_one_line():
    port = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    url = f"http://127.0.0.1:{port.server_address[1]}"
    port.server_close()
    with pytest.raises(core.VmmError, match=r"^VMM GetInfo \(http://127\.0\.0\.1:\d+\): cannot connect: .+$"):
        core.vm_info(core.VmmClient(url, timeout=2), "x")


def test_a_missing_credential_fails_clearly_before_any_request():
    _, _, app = staging_app()
    with FakeVmm() as fake:
        with pytest.raises(core.VmmError, match=r"dstack-fleet:secrets\.vmmToken is not set"):
            provider({}).create(props_for(app, fake))
        with pytest.raises(core.VmmError, match="did not receive the stack configuration"):
            VmProvider().create(props_for(app, fake))
        assert fake.requests == []


def test_a_graceful_shutdown_that_fails_falls_back_to_a_forced_stop(project):
    _, _, app = staging_app()
    with FakeVmm() as fake:
        p = provider({"vmmToken": TOKEN})
        created = p.create(props_for(app, fake))
        fake.fail["ShutdownVm"] = (400, b'{"error": "guest agent unreachable"}')
        news = props_for(app, fake, vcpu=16)
        p.update(created.id, created.outs, news)
        assert [m for m in fake.methods() if m in ("ShutdownVm", "StopVm", "UpdateVm", "StartVm")] == [
            "ShutdownVm", "StopVm", "UpdateVm", "StartVm"]
        assert fake.bodies("UpdateVm") == [{"id": created.id, "vcpu": 16}]


def test_diff_replaces_only_for_name_url_or_a_pinned_app_id_and_reports_every_setting():
    _, _, app = staging_app()
    p = provider({"vmmToken": TOKEN})
    olds = {**vm_props(app, app.config.vmm), "vmId": "v", "envKey": "", "envDigest": ""}
    same = p.diff("v", olds, vm_props(app, app.config.vmm))
    assert same.changes is False and same.replaces == []
    renamed = p.diff("v", olds, {**olds, "name": "other"})
    assert renamed.replaces == ["name"] and renamed.delete_before_replace is True
    assert p.diff("v", olds, {**olds, "url": "https://other:9080"}).replaces == ["url"]
    # how the provider reaches the VMM is an in-place update too (state must follow it), never a replacement
    for key, value in (("tokenSecret", "rotated"), ("stopTimeout", 9), ("apiVersion", "0.5.5"),
                       ("trustedKmsSigners", ["0x02" + "ab" * 32]), ("pollInterval", 5), ("requestTimeout", 30)):
        changed = p.diff("v", olds, {**olds, key: value})
        assert changed.changes is True and changed.replaces == [], key
    assert p.diff("v", olds, {**olds, "appId": "cd" * 20}).changes is False  # the VM keeps its app id
    assert p.diff("v", {**olds, "appIdPinned": True}, {**olds, "appId": "cd" * 20, "appIdPinned": True}).replaces == ["appId"]
    assert p.diff("v", olds, {**olds, "diskSize": 600}).replaces == []


def test_a_settings_change_updates_state_without_touching_the_vm_and_delete_uses_the_new_credential(project):
    """Before: tokenSecret, apiVersion, stopTimeout and trustedKmsSigners changes were not reported, so state
    kept the first ones and a delete after a credential rotation used the credential that no longer exists."""
    _, _, app = staging_app()
    rotated_token = "ops:rotated-credential-77"
    with FakeVmm(auth="Basic " + base64.b64encode(TOKEN.encode()).decode()) as fake:
        created = provider({"vmmToken": TOKEN}).create(props_for(app, fake))
        # the operator stores the new credential under a new name and drops the old one
        fake.auth = "Basic " + base64.b64encode(rotated_token.encode()).decode()
        p = provider({"vmmTokenV2": rotated_token})
        news = {**created.outs, "tokenSecret": "vmmTokenV2", "apiVersion": "0.5.5", "stopTimeout": 60}
        news = {k: v for k, v in news.items() if k not in ("vmId", "status", "vmAppId")}
        diff = p.diff(created.id, created.outs, news)
        assert diff.changes is True and diff.replaces == []
        fake.requests.clear()
        updated = p.update(created.id, created.outs, news)
        assert [m for m in fake.methods() if m not in ("GetInfo",)] == []  # the VM is not stopped or changed
        assert (updated.outs["tokenSecret"], updated.outs["apiVersion"], updated.outs["stopTimeout"]) == (
            "vmmTokenV2", "0.5.5", 60)
        assert p.diff(created.id, updated.outs, news).changes is False
        p.delete(created.id, updated.outs)  # with the credential state now names
        assert fake.bodies("RemoveVm") == [{"id": created.id}] and fake.vms == {}


def test_a_signer_list_that_no_longer_trusts_the_env_key_reencrypts_or_refuses(project, kms):
    _, _, app = staging_app(project, with_kms_env)
    secrets = {"vmmToken": TOKEN, "apiKey": SECRET_VALUE}
    with FakeVmm() as vmmd:
        p = provider(secrets)
        props = props_for(app, vmmd, kmsUrls=[kms.url])
        created = p.create(props)
        signer = created.outs["kmsSigner"]
        # pinning the signer the env was encrypted to: recorded, nothing re-encrypted
        pinned = {**props, "trustedKmsSigners": [signer]}
        assert p.diff(created.id, created.outs, pinned).changes is True
        kept = p.update(created.id, created.outs, pinned)
        assert vmmd.bodies("UpdateVm") == [] and kept.outs["encryptedEnv"] == created.outs["encryptedEnv"]
        assert len(kms.bodies("GetAppEnvEncryptPubKey")) == 1
        # a list without that signer: the env must be encrypted again, to a key the list accepts
        other = "0x02" + "cd" * 32
        moved = {**props, "trustedKmsSigners": [other]}
        assert p.diff(created.id, kept.outs, moved).changes is True
        with pytest.raises(core.VmmError, match=f"signed by {signer}, which is not a trusted KMS signer"):
            p.update(created.id, kept.outs, moved)
        assert vmmd.bodies("UpdateVm") == []  # nothing was sent with an untrusted key


def test_app_targets_export_the_app_id_the_vmm_reports(project):
    """An in-place compose update keeps the VM's first app id (the VMM does not change it), so the stack
    exports what the VMM reports, not the id planned for the new compose."""
    _, _, app = staging_app()
    with FakeVmm(auth="Basic " + base64.b64encode(TOKEN.encode()).decode()) as fake:
        p = provider({"vmmToken": TOKEN})
        created = p.create(props_for(app, fake))
        first = created.outs["vmAppId"]
        _, _, changed = staging_app(project, lambda c: vmm_entry(c)["settings"].update(publicLogs=False))
        news = props_for(changed, fake)
        assert news["appId"] != first  # the planned id follows the compose
        updated = p.update(created.id, created.outs, news)
        assert updated.outs["vmAppId"] == first == fake.vms[created.id]["app_id"]


def test_check_refuses_a_shrinking_disk():
    _, _, app = staging_app()
    props = vm_props(app, app.config.vmm)
    result = provider({}).check(props, {**props, "diskSize": 100})
    assert [(f.property, f.reason) for f in result.failures] == [
        ("diskSize", "the VMM cannot shrink a data disk (500 GB -> 100 GB)")]
    assert provider({}).check(props, props).failures == []


# ---------------------------------------------------------------------------------------------
# Encrypted env


@pytest.fixture
def kms():
    key, signer = X25519PrivateKey.generate(), keys.PrivateKey(os.urandom(32))
    with FakeVmm(kms_key=key, signer=signer) as fake:
        yield fake


def test_encrypted_env_decrypts_to_the_plaintext_and_differs_every_time(kms):
    public = kms.kms_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()
    first, second = core.encrypt_env({"B": "2", "A": "1"}, public), core.encrypt_env({"A": "1", "B": "2"}, public)
    assert first != second
    for blob in (first, second):
        assert decrypt_env(blob, kms.kms_key) == {"env": [{"key": "A", "value": "1"}, {"key": "B", "value": "2"}]}


def test_the_kms_key_must_carry_a_valid_and_trusted_signature(kms):
    app_id = "ab" * 20
    signer = "0x" + kms.signer.public_key.to_compressed_bytes().hex()
    key = core.kms_env_pubkey(kms.url, app_id, trusted_signers=[signer])
    assert key.signer == signer
    with pytest.raises(core.VmmError, match="which is not a trusted KMS signer"):
        core.kms_env_pubkey(kms.url, app_id, trusted_signers=["0x02" + "11" * 32])
    kms.sign = "legacy"
    assert core.kms_env_pubkey(kms.url, app_id).signer == signer
    kms.sign = "none"
    with pytest.raises(core.VmmError, match=r"^KMS GetAppEnvEncryptPubKey \(.*\): the env key for app a.* carries no "
                                            r"valid KMS signature; refusing to encrypt secrets to it$"):
        core.kms_env_pubkey(kms.url, app_id)
    kms.sign = "v1"
    stale = kms.pubkey_response(app_id)
    with pytest.raises(core.VmmError, match="signature is 3600 s old"):
        core.parse_env_pubkey(stale, app_id, now=stale["timestamp"] + 3600)
    # a signature made for another app recovers some other key, so only a trusted signer list catches it
    # (vmm-cli.py's whitelist works the same way)
    other = kms.pubkey_response("cd" * 20)
    assert core.parse_env_pubkey(other, app_id).signer != signer
    with pytest.raises(core.VmmError, match="not a trusted KMS signer"):
        core.parse_env_pubkey(other, app_id, trusted_signers=[signer])


def test_keccak_and_signature_recovery_match_vmm_cli_v0_5_11_vector():
    # the doctest of verify_signature in vmm-cli.py v0.5.11
    public = bytes.fromhex("e33a1832c6562067ff8f844a61e51ad051f1180b66ec2551fb0251735f3ee90a")
    signature = bytes.fromhex("8542c49081fbf4e03f62034f13fbf70630bdf256a53032e38465a27c36fd6bed7a5e7111652004aef37f7f"
                              "d92fbfc1285212c4ae6a6154203a48f5e16cad2cef00")
    assert core.env_key_signer(public, "00" * 20, signature) == (
        "0x0217610d74cbd39b6143842c6d8bc310d79da1d82cc9d17f8876376221eda0c38f")
    assert core.keccak256(b"").hex() == "c5d2460186f7233c927e7db2dcc703c0e500b653ca82273b7bfad8045d85a470"


def test_secret_env_is_encrypted_at_create_kept_secret_and_reencrypted_only_when_the_plaintext_changes(project, kms):
    _, _, app = staging_app(project, with_kms_env)
    secrets = {"vmmToken": TOKEN, "apiKey": SECRET_VALUE}
    with FakeVmm() as vmmd:
        p = provider(secrets)
        props = props_for(app, vmmd, kmsUrls=[kms.url])
        assert SECRET_VALUE not in json.dumps(props)
        created = p.create(props)
        blob = vmmd.bodies("CreateVm")[0]["encrypted_env"]
        assert decrypt_env(blob, kms.kms_key) == {"env": [{"key": "API_KEY", "value": SECRET_VALUE}]}
        assert kms.bodies("GetAppEnvEncryptPubKey") == [{"app_id": app.app_id or props["appId"]}]
        assert created.outs["encryptedEnv"] == blob
        assert created.outs["kmsSigner"] == "0x" + kms.signer.public_key.to_compressed_bytes().hex()
        assert SECRET_VALUE not in json.dumps(created.outs)
        assert created.outs["envDigest"] == core.env_digest(created.outs["envKey"], {"API_KEY": SECRET_VALUE})

        # unchanged plaintext: no change, and an update for another reason sends no encrypted env
        assert p.diff(created.id, created.outs, props).changes is False
        news = {**props, "userConfig": "LAUNCHER_IMAGE_TAGS=latest"}
        assert p.diff(created.id, created.outs, news).changes is True
        updated = p.update(created.id, created.outs, news)
        assert "encrypted_env" not in vmmd.bodies("UpdateVm")[-1]
        assert len(kms.bodies("GetAppEnvEncryptPubKey")) == 1
        assert updated.outs["encryptedEnv"] == blob

        # a changed plaintext: the diff sees it through the keyed hash, the update re-encrypts for the
        # app id the VM was created with
        rotated = provider({**secrets, "apiKey": "rotated-value"})
        diff = rotated.diff(created.id, updated.outs, news)
        assert diff.changes is True and diff.replaces == []
        again = rotated.update(created.id, updated.outs, news)
        sent = vmmd.bodies("UpdateVm")[-1]
        assert set(sent) == {"id", "encrypted_env"} and sent["encrypted_env"] != blob
        assert decrypt_env(sent["encrypted_env"], kms.kms_key) == {"env": [{"key": "API_KEY", "value": "rotated-value"}]}
        assert kms.bodies("GetAppEnvEncryptPubKey")[-1] == {"app_id": vmmd.vms[created.id]["app_id"]}
        assert again.outs["envDigest"] != updated.outs["envDigest"] and again.outs["envKey"] == updated.outs["envKey"]
        assert rotated.diff(created.id, again.outs, news).changes is False


def test_the_serialized_provider_carries_no_secret():
    from pulumi.dynamic.dynamic import serialize_provider

    p = provider({"vmmToken": TOKEN, "apiKey": SECRET_VALUE})
    pickled = base64.b64decode(serialize_provider(p))
    assert TOKEN.encode() not in pickled and SECRET_VALUE.encode() not in pickled
    restored = dill.loads(pickled)  # as the provider process does, then configure() from the stack config
    assert isinstance(restored, VmProvider) and restored._secrets is None
    restored.configure(ConfigureRequest(Config({"dstack-fleet:secrets": {"vmmToken": TOKEN}}, "dstack-fleet")))
    assert restored._secret("vmmToken", "VMM credential") == TOKEN


# ---------------------------------------------------------------------------------------------
# The component under the mock harness


def _program(app, cfg, exports):
    def program():
        import pulumi

        from components.apptargets import create_app_target

        target = create_app_target(app, config=cfg)
        exports["target"] = target
        pulumi.export("app", target.outputs)
    return program


@pytest.mark.parametrize("preview", [True, False])
def test_component_registers_the_vm_under_a_DstackApp_without_secrets(project, preview):
    project.mutate("staging", "vmmtest", with_kms_env)
    sf, cfg = load_config(project.root, "vmmtest", secret_overrides={
        "dstack-fleet:secrets": {"vmmToken": TOKEN, "apiKey": SECRET_VALUE}})
    assert cfg.fleet.secrets["vmmToken"].get_secret_value() == TOKEN
    names = bootstrap.names_for(cfg)
    app = next(a for a in fleet_apps.plan_apps(cfg, lock.load(project.root), project.root, names.registry_path)
               if a.target == "vmm")
    run = run_program(project.root, stack="vmmtest", config=sf.config, secret_keys=sf.secret_keys, preview=preview,
                      program=_program(app, cfg, {}))
    by_type = {r.type: r for r in run.resources}
    assert set(by_type) == {"dstack-fleet:apps:DstackApp", TYPE}
    component, vm = by_type["dstack-fleet:apps:DstackApp"], by_type[TYPE]
    assert component.inputs == {"name": "mpc-vmmtest", "target": "vmm", "identity": "compose"}
    assert vm.parent == component.urn and vm.urn.endswith("DstackApp$pulumi-python:dynamic/vmm:Vm::mpc-vmmtest-vm")
    assert vm.options["deleteBeforeReplace"] is True
    assert vm.inputs["composeFile"].encode() == app.app_compose.data
    assert vm.inputs["secretEnv"] == {"API_KEY": "apiKey"} and vm.inputs["tokenSecret"] == "vmmToken"
    shown = json.dumps([display(r.inputs) for r in run.resources] + [display(run.outputs)], default=str)
    assert TOKEN not in shown and SECRET_VALUE not in shown and "tok-3f9a1c" not in shown
    outputs = run.outputs["app"]
    assert outputs["composeHash"] == app.compose_hash and outputs["target"] == "vmm"
    if preview:
        assert str(outputs["instanceId"]) == "<computed>"
        assert str(outputs["appId"]) == "<computed>"  # what the VMM reports, not the planned id
    else:
        assert uuid.UUID(outputs["instanceId"]) and outputs["status"] == "running"
        assert outputs["appId"] == vm.inputs["appId"]  # the offline stand-in reports the id it was created with


def test_no_target_for_gce_apps_or_pending_images():
    from components.apptargets import create_app_target

    _, cfg, app = staging_app()
    from dataclasses import replace

    assert create_app_target(replace(app, app_compose=None), config=cfg) is None
    assert create_app_target(replace(app, target="gce"), config=cfg) is None
