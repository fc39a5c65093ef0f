"""The dstack VMM API as ``vmm-cli.py`` speaks it: request bodies, auth, env encryption, a small client.

Pinned version: **dstack v0.5.11** (Dstack-TEE/dstack tag ``v0.5.11``, commit
40eaf35e6b3f112998d01569f2a26110baab123b): ``vmm/rpc/proto/vmm_rpc.proto`` and ``vmm/src/vmm-cli.py`` at
that tag are the source of every method name and field below. ``VMM_VERSION`` selects the update call
of older hosts (see ``update_calls``).

Transport. ``vmm-cli.py`` POSTs JSON to ``<url>/prpc/<Method>?json``; ``bytes`` fields travel as hex
strings; an error is HTTP 400 with ``{"error": "..."}`` (``ra-rpc`` ``encode_error``).

Calls (service ``Vmm``):

* ``CreateVm(VmConfiguration) -> {id}``: the body ``vmm-cli.py deploy`` sends (``create_request``);
  ``compose_file`` is the app-compose text exactly as planned (the guest hashes those bytes),
  ``app_id`` the plan's app id, ports in ``parse_port_mapping``'s form.
* update in place: ``UpdateVm(UpdateVmRequest)`` from v0.5.6 on (compose, encrypted env, user config,
  ports, KMS and gateway URLs, vcpu/memory/disk/image); v0.5.5 has only ``UpgradeApp(UpgradeAppRequest)``
  (compose, env, user config, ports) plus ``ResizeVm``. vmm-cli.py v0.5.11 still calls the deprecated
  ``UpgradeApp`` alias, which the v0.5.11 server forwards to ``update_vm``. Empty fields mean "leave
  unchanged"; resources change only while the VM is stopped, and the VMM writes the new files into the
  VM's shared directory, which the guest reads at its next boot, so an update stops and starts the VM
  (same VM id, same data disk).
* ``StartVm``, ``ShutdownVm`` (graceful, through the guest agent), ``StopVm`` (forced), ``RemoveVm``,
  ``GetInfo({id}) -> {found, info}``, ``Status({keyword, brief}) -> {vms}``.
* ``GetAppEnvEncryptPubKey({app_id}) -> {public_key, signature, timestamp, signature_v1}``: vmm-cli.py
  asks the KMS given with ``--kms-url`` directly (``<kms>/prpc/GetAppEnvEncryptPubKey?json``, TLS not
  verified because the KMS serves RA-TLS; the secp256k1 signature over the key is what is trusted,
  checked against a list of trusted signers when one is configured).

Auth. At v0.5.5 and v0.5.11 the VMM's own ``[auth]`` (``rocket-apitoken``, Bearer tokens) guards only
``/logs``; no check was found on ``/prpc`` (``main.rs`` mounts ``prpc_routes!`` without a guard).
vmm-cli.py at those tags sends only HTTP Basic (``--auth-user``/``--auth-password``), which is meant for
a reverse proxy in front of the VMM. From ``next`` on, ``dstack-api-auth`` guards the whole server and
accepts ``Authorization: Bearer``. So: a credential ``user:password`` is sent as Basic, exactly as
vmm-cli.py v0.5.11 does; a credential without ``:`` is sent as ``Bearer`` (a proxy that wants a token,
or a ``next`` VMM). Without a credential the pinned VMM's ``/prpc`` must only be reachable from trusted
networks.

Nothing here imports Pulumi: ``components/vmm.py`` drives these functions from a dynamic provider.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets as _secrets
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

VMM_VERSION = "0.5.11"
VMM_SOURCE = "Dstack-TEE/dstack v0.5.11 (40eaf35e6b3f112998d01569f2a26110baab123b)"
UPDATE_VM_SINCE = (0, 5, 6)  # UpdateVm and its URL/resource fields (proto at v0.5.6)

STOPPED = ("stopped", "exited")
PROTOCOLS = ("tcp", "udp")


class VmmError(Exception):
    """A failed VMM or KMS call, or a request the pinned VMM cannot express: one line, no secrets."""


def one_line(text: object, limit: int = 300) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def parse_version(version: str) -> tuple[int, ...]:
    match = re.fullmatch(r"v?(\d+)\.(\d+)\.(\d+)", version.strip())
    if not match:
        raise VmmError(f"VMM version {version!r} is not of the form 0.5.11")
    return tuple(int(p) for p in match.groups())


def update_method(version: str = VMM_VERSION) -> str:
    return "UpdateVm" if parse_version(version) >= UPDATE_VM_SINCE else "UpgradeApp"


# ---------------------------------------------------------------------------------------------
# Request bodies


def parse_port(spec: str) -> dict[str, Any]:
    """``protocol:host:vm`` or ``protocol:address:host:vm`` as vmm-cli.py's ``parse_port_mapping`` reads
    it (the 3-part form binds the host side to 127.0.0.1)."""
    parts = spec.split(":")
    if len(parts) == 3:
        protocol, address, host, vm = parts[0], "127.0.0.1", parts[1], parts[2]
    elif len(parts) == 4:
        protocol, address, host, vm = parts
    else:
        raise VmmError(f"port {spec!r}: expected protocol:host_port:vm_port or protocol:address:host_port:vm_port")
    if protocol not in PROTOCOLS:
        raise VmmError(f"port {spec!r}: protocol must be tcp or udp")
    numbers = []
    for value in (host, vm):
        if not value.isdigit() or not 1 <= int(value) <= 65535:
            raise VmmError(f"port {spec!r}: {value!r} is not a port number (1-65535)")
        numbers.append(int(value))
    return {"protocol": protocol, "host_address": address, "host_port": numbers[0], "vm_port": numbers[1]}


@dataclass(frozen=True)
class VmSpec:
    """Everything the VMM is told about one app's VM."""

    name: str
    image: str
    compose_file: str  # the app-compose.json text, exactly the planned bytes
    app_id: str
    user_config: str
    vcpu: int
    memory: int  # MB
    disk_size: int  # GB
    ports: tuple[Mapping[str, Any], ...] = ()
    kms_urls: tuple[str, ...] = ()
    gateway_urls: tuple[str, ...] = ()

    RESOURCES = ("vcpu", "memory", "disk_size", "image")

    def to_props(self) -> dict[str, Any]:
        """The dynamic resource's inputs (camelCase, JSON-ready)."""
        return {"name": self.name, "image": self.image, "composeFile": self.compose_file, "appId": self.app_id,
                "userConfig": self.user_config, "vcpu": self.vcpu, "memory": self.memory,
                "diskSize": self.disk_size, "ports": [dict(p) for p in self.ports],
                "kmsUrls": list(self.kms_urls), "gatewayUrls": list(self.gateway_urls)}

    @classmethod
    def from_props(cls, props: Mapping[str, Any]) -> "VmSpec":
        return cls(name=str(props["name"]), image=str(props["image"]), compose_file=str(props["composeFile"]),
                   app_id=str(props["appId"]), user_config=str(props.get("userConfig") or ""),
                   vcpu=int(props["vcpu"]), memory=int(props["memory"]), disk_size=int(props["diskSize"]),
                   ports=tuple(_port(p) for p in props.get("ports") or ()),
                   kms_urls=tuple(props.get("kmsUrls") or ()), gateway_urls=tuple(props.get("gatewayUrls") or ()))


def _port(p: Mapping[str, Any]) -> dict[str, Any]:
    return {"protocol": str(p["protocol"]), "host_address": str(p["host_address"]),
            "host_port": int(p["host_port"]), "vm_port": int(p["vm_port"])}


def vm_spec(app, target) -> VmSpec:
    """The VM of an ``AppPlan`` on a ``VmmTarget``. The app id is the plan's: the pinned one, else the
    compose-derived one, as vmm-cli.py's ``--app-id`` default."""
    if app.app_compose is None:
        raise VmmError(f"app {app.name}: its images are pending, so it has no app-compose yet")
    text = app.app_compose.text
    app_id = app.app_id
    kms = app.config.kms
    return VmSpec(name=app.name, image=target.image, compose_file=text, app_id=app_id,
                  user_config=app.user_config or "", vcpu=target.vcpu, memory=target.memory_mb,
                  disk_size=target.disk_gb, ports=tuple(parse_port(p) for p in target.ports),
                  kms_urls=tuple(kms.urls) if (kms and app.config.key_provider == "kms") else (),
                  gateway_urls=tuple(target.gateway_urls))


def create_request(spec: VmSpec, *, encrypted_env: str | None = None) -> dict[str, Any]:
    """The ``CreateVm`` body, field for field as ``vmm-cli.py deploy`` builds it."""
    body: dict[str, Any] = {
        "name": spec.name, "image": spec.image, "compose_file": spec.compose_file, "vcpu": spec.vcpu,
        "memory": spec.memory, "disk_size": spec.disk_size, "app_id": spec.app_id,
        "user_config": spec.user_config, "ports": [dict(p) for p in spec.ports],
        "hugepages": False, "pin_numa": False, "stopped": False, "no_tee": False,
    }
    if spec.kms_urls:
        body["kms_urls"] = list(spec.kms_urls)
    if spec.gateway_urls:
        body["gateway_urls"] = list(spec.gateway_urls)
    if encrypted_env:
        body["encrypted_env"] = encrypted_env
    return body


def changed_fields(old: VmSpec, new: VmSpec) -> list[str]:
    return [f for f in ("image", "compose_file", "user_config", "vcpu", "memory", "disk_size", "ports",
                        "kms_urls", "gateway_urls") if getattr(old, f) != getattr(new, f)]


def update_calls(vm_id: str, old: VmSpec, new: VmSpec, *, encrypted_env: str | None = None,
                 version: str = VMM_VERSION) -> list[tuple[str, dict[str, Any]]]:
    """The calls that turn VM ``vm_id`` from ``old`` into ``new`` in place (no call when nothing
    changed). Raises ``VmmError`` for a change the VMM cannot make in place."""
    changed = changed_fields(old, new)
    if old.name != new.name:
        raise VmmError(f"VM {vm_id}: the VMM cannot rename a VM ({old.name!r} -> {new.name!r}); that is a replacement")
    if new.disk_size < old.disk_size:
        raise VmmError(f"VM {vm_id}: the data disk cannot shrink ({old.disk_size} GB -> {new.disk_size} GB)")
    if "user_config" in changed and not new.user_config:
        raise VmmError(f"VM {vm_id}: the VMM treats an empty user config as 'unchanged', so it cannot be "
                       "cleared in place; set it to an empty JSON object or text instead")
    resources = {f: getattr(new, f) for f in VmSpec.RESOURCES if f in changed}
    body: dict[str, Any] = {"id": vm_id}
    if "compose_file" in changed:
        body["compose_file"] = new.compose_file
    if encrypted_env:
        body["encrypted_env"] = encrypted_env
    if "user_config" in changed:
        body["user_config"] = new.user_config
    if "ports" in changed:
        body["update_ports"] = True
        body["ports"] = [dict(p) for p in new.ports]
    calls: list[tuple[str, dict[str, Any]]] = []
    if update_method(version) == "UpdateVm":
        if "kms_urls" in changed:
            body["update_kms_urls"] = True
            body["kms_urls"] = list(new.kms_urls)
        if "gateway_urls" in changed:
            body["update_gateway_urls"] = True
            body["gateway_urls"] = list(new.gateway_urls)
        body.update(resources)
        if len(body) > 1:
            calls.append(("UpdateVm", body))
        return calls
    unsupported = [f for f in ("kms_urls", "gateway_urls") if f in changed]
    if unsupported:
        raise VmmError(f"VM {vm_id}: changing {' and '.join(unsupported)} in place needs UpdateVm (VMM "
                       f"{'.'.join(map(str, UPDATE_VM_SINCE))}+); this host speaks {version}")
    if resources:
        calls.append(("ResizeVm", {"id": vm_id, **resources}))
    if len(body) > 1:
        calls.append(("UpgradeApp", body))
    return calls


def needs_restart(old: VmSpec, new: VmSpec, *, env_changed: bool) -> bool:
    """Everything but port forwards reaches the guest only at its next boot."""
    return env_changed or any(f != "ports" for f in changed_fields(old, new))


# ---------------------------------------------------------------------------------------------
# Auth and the HTTP client


@dataclass(frozen=True, repr=False)
class Auth:
    scheme: str  # basic | bearer
    credential: str

    @classmethod
    def from_secret(cls, value: str) -> "Auth":
        """``user:password`` -> HTTP Basic (vmm-cli.py v0.5.11); anything else -> Bearer token."""
        value = value.strip()
        if not value:
            raise VmmError("the VMM credential is empty")
        return cls("basic" if ":" in value else "bearer", value)

    def header(self) -> str:
        if self.scheme == "basic":
            return "Basic " + base64.b64encode(self.credential.encode("utf-8")).decode("ascii")
        return "Bearer " + self.credential

    def __repr__(self) -> str:
        return f"Auth({self.scheme}, [secret])"


@dataclass
class VmmClient:
    """POST JSON to ``<url>/prpc/<Method>?json`` as vmm-cli.py does; every failure is one ``VmmError``
    line naming the call (never the credential)."""

    url: str
    auth: Auth | None = None
    timeout: float = 60.0
    verify_tls: bool = True
    label: str = "VMM"
    calls: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        parsed = urllib.parse.urlparse(self.url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise VmmError(f"{self.label} URL {self.url!r} is not an http(s) URL")
        self.url = self.url.rstrip("/")

    def _context(self) -> ssl.SSLContext | None:
        if not self.url.startswith("https:"):
            return None
        context = ssl.create_default_context()
        if not self.verify_tls:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context

    def call(self, method: str, body: Mapping[str, Any] | None = None) -> dict[str, Any]:
        self.calls.append(method)
        data = json.dumps(body or {}).encode("utf-8")
        request = urllib.request.Request(f"{self.url}/prpc/{method}?json", data=data, method="POST",
                                         headers={"Content-Type": "application/json"})
        if self.auth is not None:
            request.add_header("Authorization", self.auth.header())
        where = f"{self.label} {method} ({self.url})"
        try:
            with urllib.request.urlopen(request, timeout=self.timeout, context=self._context()) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            raise VmmError(f"{where} failed: HTTP {exc.code}: {_error_text(exc.read(), exc.reason)}") from None
        except urllib.error.URLError as exc:
            raise VmmError(f"{where}: cannot connect: {one_line(exc.reason)}") from None
        except (OSError, ValueError) as exc:  # timeouts, resets, malformed responses
            raise VmmError(f"{where}: {one_line(exc) or type(exc).__name__}") from None
        if not raw.strip():
            return {}
        try:
            parsed = json.loads(raw)
        except ValueError:
            raise VmmError(f"{where}: the response is not JSON: {one_line(raw.decode('utf-8', 'replace'), 120)}") from None
        if not isinstance(parsed, dict):
            raise VmmError(f"{where}: expected a JSON object, got {type(parsed).__name__}")
        if "error" in parsed and len(parsed) == 1:
            raise VmmError(f"{where} failed: {one_line(parsed['error'])}")
        return parsed


def _error_text(raw: bytes, reason: object) -> str:
    text = raw.decode("utf-8", "replace").strip()
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict) and parsed.get("error"):
        return one_line(parsed["error"])
    return one_line(text or reason or "no details")


# ---------------------------------------------------------------------------------------------
# Operations


def find_by_name(client: VmmClient, name: str) -> list[dict[str, Any]]:
    response = client.call("Status", {"keyword": name, "brief": True})
    return [vm for vm in response.get("vms") or [] if vm.get("name") == name]


def vm_info(client: VmmClient, vm_id: str) -> dict[str, Any] | None:
    response = client.call("GetInfo", {"id": vm_id})
    if not response.get("found") or not isinstance(response.get("info"), dict):
        return None
    return response["info"]


def create_vm(client: VmmClient, spec: VmSpec, *, encrypted_env: str | None = None) -> str:
    """Create the VM, refusing when one of the same name already runs there (a second VM with the same
    name and ports is never what a deploy means)."""
    existing = find_by_name(client, spec.name)
    if existing:
        ids = ", ".join(str(vm.get("id")) for vm in existing)
        raise VmmError(f"VMM {client.url} already has a VM named {spec.name!r} (id {ids}); import it "
                       f"(`pulumi import`) or remove it before creating a new one")
    response = client.call("CreateVm", create_request(spec, encrypted_env=encrypted_env))
    vm_id = response.get("id")
    if not isinstance(vm_id, str) or not vm_id:
        raise VmmError(f"VMM CreateVm ({client.url}) returned no VM id")
    return vm_id


@dataclass(frozen=True)
class Waiting:
    timeout: float = 300.0
    interval: float = 2.0
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.monotonic


def _wait_stopped(client: VmmClient, vm_id: str, waiting: Waiting) -> bool:
    deadline = waiting.clock() + waiting.timeout
    while True:
        info = vm_info(client, vm_id)
        if info is None or info.get("status") in STOPPED:
            return True
        if waiting.clock() >= deadline:
            return False
        waiting.sleep(waiting.interval)


def stop_vm(client: VmmClient, vm_id: str, waiting: Waiting = Waiting()) -> None:
    """Graceful shutdown through the guest agent, then a forced stop if it does not finish in time."""
    info = vm_info(client, vm_id)
    if info is None or info.get("status") in STOPPED:
        return
    try:
        client.call("ShutdownVm", {"id": vm_id})
        if _wait_stopped(client, vm_id, waiting):
            return
    except VmmError:
        pass  # no guest agent answering: stop it
    client.call("StopVm", {"id": vm_id})
    if not _wait_stopped(client, vm_id, waiting):
        raise VmmError(f"VMM {client.url}: VM {vm_id} did not stop within {waiting.timeout:g} s")


def start_vm(client: VmmClient, vm_id: str) -> None:
    client.call("StartVm", {"id": vm_id})


def update_vm(client: VmmClient, vm_id: str, old: VmSpec, new: VmSpec, *, encrypted_env: str | None = None,
              version: str = VMM_VERSION, waiting: Waiting = Waiting()) -> list[str]:
    """Apply the in-place update; returns the methods called. The VM keeps its id and data disk."""
    calls = update_calls(vm_id, old, new, encrypted_env=encrypted_env, version=version)
    if not calls:
        return []
    if vm_info(client, vm_id) is None:
        raise VmmError(f"VMM {client.url} has no VM {vm_id} (removed outside Pulumi?); run `pulumi refresh`")
    restart = needs_restart(old, new, env_changed=bool(encrypted_env))
    if restart:
        stop_vm(client, vm_id, waiting)
    for method, body in calls:
        client.call(method, body)
    if restart:
        start_vm(client, vm_id)
    return [m for m, _ in calls]


def remove_vm(client: VmmClient, vm_id: str) -> bool:
    """Remove the VM and its disk; False when it was already gone."""
    if vm_info(client, vm_id) is None:
        return False
    client.call("RemoveVm", {"id": vm_id})
    return True


# ---------------------------------------------------------------------------------------------
# Encrypted env


@dataclass(frozen=True)
class EnvKey:
    public_key: str  # hex X25519 public key the guest's KMS-derived env key answers to
    signer: str  # compressed secp256k1 public key of the KMS that signed it


# The KMS signs keccak256(b"dstack-env-encrypt-pubkey:" + app_id [+ timestamp] + public key), as
# dstack_sdk.verify_env_encrypt_public_key checks it.
SIGNED_PREFIX = b"dstack-env-encrypt-pubkey:"


def keccak256(data: bytes) -> bytes:
    """Keccak-256 with Ethereum's (pre-NIST) padding, as the KMS signs; eth-hash with its
    pycryptodome backend (both pinned in requirements.txt)."""
    from eth_hash.auto import keccak

    return keccak(data)


MAX_SIGNATURE_AGE = 300  # seconds, as dstack_sdk.verify_env_encrypt_public_key
FUTURE_SKEW = 60


def env_key_signer(public_key: bytes, app_id: str, signature: bytes, timestamp: int | None = None) -> str | None:
    """The compressed secp256k1 key that signed ``keccak256(prefix ":" app_id [timestamp_be8] public_key)``
    (``signature_v1`` with a timestamp, the legacy ``signature`` without), or None."""
    from eth_keys import keys

    if len(signature) != 65:
        return None
    try:
        app = bytes.fromhex(app_id.removeprefix("0x"))
    except ValueError:
        return None
    stamp = timestamp.to_bytes(8, "big") if timestamp is not None else b""
    try:
        recovered = keys.Signature(signature_bytes=signature).recover_public_key_from_msg_hash(
            keccak256(SIGNED_PREFIX + app + stamp + public_key))
    except Exception:  # noqa: BLE001 - any malformed signature is "not signed"
        return None
    return "0x" + recovered.to_compressed_bytes().hex()


def parse_env_pubkey(response: Mapping[str, Any], app_id: str, *, trusted_signers: Sequence[str] = (),
                     where: str = "KMS GetAppEnvEncryptPubKey", now: float | None = None) -> EnvKey:
    """Check the KMS's signature over the key (``signature_v1`` with a fresh timestamp preferred, the
    legacy one accepted, as vmm-cli.py does) and, when ``trusted_signers`` is set, that the signer is
    one of them. vmm-cli.py asks interactively when a key is unsigned or untrusted; a deploy refuses.

    Recovery yields *some* key for any well-formed signature, so only ``trusted_signers`` binds the key
    to a known KMS (vmm-cli.py's whitelist works the same way, and accepts any signer when it is empty).
    """
    try:
        public_key = bytes.fromhex(str(response["public_key"]).removeprefix("0x"))
    except (KeyError, ValueError):
        raise VmmError(f"{where}: the response has no hex public_key") from None
    if len(public_key) != 32:
        raise VmmError(f"{where}: public_key is {len(public_key)} bytes, not an X25519 key")
    signer = None
    try:
        if response.get("signature_v1") and response.get("timestamp"):
            stamp = int(response["timestamp"])
            age = (time.time() if now is None else now) - stamp
            if age > MAX_SIGNATURE_AGE or age < -FUTURE_SKEW:
                raise VmmError(f"{where}: the key's signature is {age:.0f} s old (at most {MAX_SIGNATURE_AGE} s "
                               "accepted); check the clocks")
            signer = env_key_signer(public_key, app_id, bytes.fromhex(str(response["signature_v1"])), stamp)
        if signer is None and response.get("signature"):
            signer = env_key_signer(public_key, app_id, bytes.fromhex(str(response["signature"])))
    except ValueError:
        signer = None
    if signer is None:
        raise VmmError(f"{where}: the env key for app {app_id} carries no valid KMS signature; refusing to "
                       "encrypt secrets to it")
    if not signer_trusted(signer, trusted_signers):
        raise VmmError(f"{where}: the env key for app {app_id} is signed by {signer}, which is not a trusted KMS signer")
    return EnvKey(public_key.hex(), signer)


def signer_trusted(signer: str, trusted_signers: Sequence[str]) -> bool:
    """Whether a KMS signer (compressed secp256k1, 0x…) passes ``trusted_signers``; an empty list trusts any
    valid signature, as vmm-cli.py's empty whitelist does."""
    trusted = {s.lower().removeprefix("0x") for s in trusted_signers}
    return not trusted or signer.lower().removeprefix("0x") in trusted


def kms_env_pubkey(kms_url: str, app_id: str, *, trusted_signers: Sequence[str] = (),
                   timeout: float = 60.0) -> EnvKey:
    client = VmmClient(kms_url, timeout=timeout, verify_tls=False, label="KMS")
    response = client.call("GetAppEnvEncryptPubKey", {"app_id": app_id})
    return parse_env_pubkey(response, app_id, trusted_signers=trusted_signers,
                            where=f"KMS GetAppEnvEncryptPubKey ({client.url})")


def encrypt_env(env: Mapping[str, str], public_key_hex: str) -> str:
    """The ``.encrypted-env`` blob (hex): ephemeral X25519 key, IV, AES-256-GCM of ``{"env": [...]}``,
    made by ``dstack_sdk.encrypt_env_vars_sync`` (the synchronous twin of ``encrypt_env_vars``, same
    format as vmm-cli.py's ``encrypt_env``). Random on every call (fresh ephemeral key and IV)."""
    from dstack_sdk import EnvVar, encrypt_env_vars_sync

    return encrypt_env_vars_sync([EnvVar(k, env[k]) for k in sorted(env)], public_key_hex)


def new_env_key() -> str:
    return _secrets.token_hex(32)


def env_digest(key_hex: str, env: Mapping[str, str]) -> str:
    """HMAC-SHA256 of the plaintext env under a per-VM random key: tells whether the plaintext changed
    without storing it or a guessable hash of it."""
    canonical = json.dumps(sorted(env.items()), separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return hmac.new(bytes.fromhex(key_hex), canonical, hashlib.sha256).hexdigest()


def secrets_from_config(raw: Any) -> dict[str, str]:
    """``dstack-fleet:secrets`` as a dynamic provider receives it (a JSON string or an object)."""
    if raw is None or raw == "":
        return {}
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError:
            raise VmmError("dstack-fleet:secrets is not a JSON object") from None
    if not isinstance(raw, dict):
        raise VmmError("dstack-fleet:secrets is not an object")
    return {str(k): str(v) for k, v in raw.items()}
