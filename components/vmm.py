"""An app's VM on a dstack VMM host, as a Pulumi dynamic provider that speaks the VMM API.

Why a dynamic provider and not ``vmm-cli.py`` through pulumi-command:

* the VM id returned by ``CreateVm`` is the resource id, kept in state; ``update`` changes the running
  VM in place (``UpdateVm`` on the same id, stop/start around it), so a compose change never starts a
  second VM with the same name and ports (a Command without ``update`` is replaced, create before
  delete); ``delete`` removes exactly that VM;
* ``diff`` decides what is a change: the encrypted env is random on every encryption, so it is never
  compared; a keyed hash of the plaintext is;
* vmm-cli.py is not on PyPI: it would have to be vendored at a pinned tag with its sha256, it prompts
  interactively for an unsigned KMS key, and it takes its password on argv or from the environment;
* the provider is plain Python, tested against a fake VMM HTTP server (tests/test_vmm.py).

The requests are those of vmm-cli.py at the pinned dstack version (``fleet/apps/vmm.py``, v0.5.11).

Secrets never enter the resource's inputs. The provider reads ``dstack-fleet:secrets`` from the stack
configuration the engine hands to dynamic providers (``ResourceProvider.configure``, pulumi/pulumi#17673):
the VMM credential (``vmm.tokenSecret``) and the plaintext of ``secretEnv``, by name. So a rotated
credential is used at once (also by ``destroy``), and the plaintext env is neither stored nor shown.
The env is encrypted at deploy time with the KMS's signed per-app key (``GetAppEnvEncryptPubKey``
from the app's first KMS URL, as vmm-cli.py does); the blob is a secret output. Whether the plaintext
changed is decided by ``envDigest`` = HMAC-SHA256 of the plaintext under ``envKey``, a random per-VM
key kept as a secret output; only a changed plaintext (or a changed set of names) is re-encrypted.
"""

from __future__ import annotations

from typing import Any

import pulumi
from pulumi.dynamic import (CheckFailure, CheckResult, ConfigureRequest, CreateResult, DiffResult, ReadResult,
                            Resource, ResourceProvider, UpdateResult)

from fleet.apps import vmm as core

SECRETS_KEY = "dstack-fleet:secrets"
TYPE = "pulumi-python:dynamic/vmm:Vm"

# inputs whose change is a new VM (the VMM cannot rename or move one); everything else updates in place
REPLACES = ("url", "name")
UPDATES = ("image", "composeFile", "userConfig", "vcpu", "memory", "diskSize", "ports", "kmsUrls",
           "gatewayUrls", "secretEnv")
# how the provider reaches the VMM, waits and checks the KMS: a change is an update that records it in
# state without touching the VM (so a later update or delete uses the current credential name, the
# current API version and signers, never the ones the VM was created with); a signer list that no
# longer trusts the KMS key the env was encrypted to also re-encrypts the env
SETTINGS = ("tokenSecret", "apiVersion", "stopTimeout", "pollInterval", "requestTimeout", "trustedKmsSigners",
            "appIdPinned")
# computed by the provider
OUTPUTS = ("vmId", "status", "vmAppId", "encryptedEnv", "envKey", "envDigest", "kmsSigner")
SECRET_OUTPUTS = ["encryptedEnv", "envKey"]


class VmProvider(ResourceProvider):
    """CRUD for one VM. ``configure`` keeps the secrets by name; nothing secret is pickled with the
    provider (``__getstate__``)."""

    def __init__(self) -> None:
        super().__init__()
        self._secrets: dict[str, str] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._secrets = None

    def configure(self, req: ConfigureRequest) -> None:
        self._secrets = core.secrets_from_config(req.config.get(SECRETS_KEY))

    # -- helpers ------------------------------------------------------------------------------

    def _secret(self, name: str, what: str) -> str:
        if self._secrets is None:
            raise core.VmmError(f"{what}: the provider did not receive the stack configuration, so "
                                f"{SECRETS_KEY}.{name} is unavailable (use the Pulumi CLI of .pulumi-version)")
        if name not in self._secrets:
            raise core.VmmError(f"{what}: {SECRETS_KEY}.{name} is not set")
        return self._secrets[name]

    def _client(self, props: dict[str, Any]) -> core.VmmClient:
        name = props.get("tokenSecret")
        auth = core.Auth.from_secret(self._secret(name, "VMM credential")) if name else None
        return core.VmmClient(str(props["url"]), auth=auth, timeout=float(props.get("requestTimeout") or 60))

    def _env(self, props: dict[str, Any]) -> dict[str, str]:
        return {env: self._secret(secret, f"secret env {env}") for env, secret in sorted((props.get("secretEnv") or {}).items())}

    def _waiting(self, props: dict[str, Any]) -> core.Waiting:
        return core.Waiting(timeout=float(props.get("stopTimeout") or 300), interval=float(props.get("pollInterval") or 2))

    @staticmethod
    def _encrypt(props: dict[str, Any], env: dict[str, str], app_id: str) -> tuple[str, str]:
        """The encrypted env and the KMS key that signed the env key (accepted only from
        ``trustedKmsSigners`` when that is set, otherwise reported so it can be pinned)."""
        kms_urls = props.get("kmsUrls") or []
        if not kms_urls:
            raise core.VmmError(f"VM {props['name']}: secret env needs a KMS URL to encrypt for")
        key = core.kms_env_pubkey(kms_urls[0], app_id, trusted_signers=props.get("trustedKmsSigners") or ())
        return core.encrypt_env(env, key.public_key), key.signer

    def _env_changed(self, olds: dict[str, Any], news: dict[str, Any]) -> bool:
        if (olds.get("secretEnv") or {}) != (news.get("secretEnv") or {}):
            return True
        env = self._env(news)
        if not env:
            return False
        if not core.signer_trusted(olds.get("kmsSigner") or "", news.get("trustedKmsSigners") or ()):
            return True  # encrypted to a key the new signer list does not accept: encrypt again, checked
        key = olds.get("envKey")
        return not key or core.env_digest(key, env) != olds.get("envDigest")

    # -- the provider interface -----------------------------------------------------------------

    def check(self, olds: dict[str, Any], news: dict[str, Any]) -> CheckResult:
        failures = []
        if olds and int(news.get("diskSize", 0)) < int(olds.get("diskSize", 0)):
            failures.append(CheckFailure("diskSize", f"the VMM cannot shrink a data disk ({olds['diskSize']} GB -> "
                                                     f"{news['diskSize']} GB)"))
        if news.get("secretEnv") and not news.get("kmsUrls"):
            failures.append(CheckFailure("secretEnv", "encrypted env needs the app's KMS URLs"))
        try:
            core.parse_version(str(news.get("apiVersion") or core.VMM_VERSION))
        except core.VmmError as exc:
            failures.append(CheckFailure("apiVersion", str(exc)))
        return CheckResult(news, failures)

    def diff(self, _id: str, olds: dict[str, Any], news: dict[str, Any]) -> DiffResult:
        replaces = [k for k in REPLACES if olds.get(k) != news.get(k)]
        if news.get("appIdPinned") and olds.get("appId") != news.get("appId"):
            replaces.append("appId")  # a different KMS app is a different app
        changed = [k for k in UPDATES + SETTINGS if k != "secretEnv" and olds.get(k) != news.get(k)]
        if self._env_changed(olds, news):
            changed.append("secretEnv")
        return DiffResult(changes=bool(replaces or changed), replaces=replaces,
                          stables=["vmId"] if not replaces else [], delete_before_replace=True)

    def create(self, props: dict[str, Any]) -> CreateResult:
        client = self._client(props)
        spec = core.VmSpec.from_props(props)
        env = self._env(props)
        encrypted, env_key, digest, signer = "", "", "", ""
        if env:
            encrypted, signer = self._encrypt(props, env, spec.app_id)
            env_key = core.new_env_key()
            digest = core.env_digest(env_key, env)
        vm_id = core.create_vm(client, spec, encrypted_env=encrypted or None)
        info = core.vm_info(client, vm_id) or {}
        outs = {**props, "vmId": vm_id, "status": str(info.get("status") or "created"),
                "vmAppId": str(info.get("app_id") or spec.app_id), "encryptedEnv": encrypted, "envKey": env_key,
                "envDigest": digest, "kmsSigner": signer}
        return CreateResult(vm_id, outs)

    def update(self, vm_id: str, olds: dict[str, Any], news: dict[str, Any]) -> UpdateResult:
        client = self._client(news)
        old, new = core.VmSpec.from_props(olds), core.VmSpec.from_props(news)
        encrypted, env_key, digest = olds.get("encryptedEnv") or "", olds.get("envKey") or "", olds.get("envDigest") or ""
        signer = olds.get("kmsSigner") or ""
        fresh = None
        if self._env_changed(olds, news) and (self._env(news) or news.get("kmsUrls")):
            env = self._env(news)
            info = core.vm_info(client, vm_id)
            if info is None:
                raise core.VmmError(f"VMM {client.url} has no VM {vm_id} (removed outside Pulumi?); run `pulumi refresh`")
            # the VM keeps the app id it was created with (vmm-cli.py update-env asks GetInfo for it)
            fresh, signer = self._encrypt(news, env, str(info.get("app_id") or new.app_id))
            env_key = env_key or core.new_env_key()
            encrypted, digest = fresh, core.env_digest(env_key, env)
        core.update_vm(client, vm_id, old, new, encrypted_env=fresh,
                       version=str(news.get("apiVersion") or core.VMM_VERSION), waiting=self._waiting(news))
        info = core.vm_info(client, vm_id) or {}
        outs = {**news, "vmId": vm_id, "status": str(info.get("status") or olds.get("status") or ""),
                "vmAppId": str(info.get("app_id") or olds.get("vmAppId") or new.app_id), "encryptedEnv": encrypted,
                "envKey": env_key, "envDigest": digest, "kmsSigner": signer}
        return UpdateResult(outs)

    def delete(self, vm_id: str, props: dict[str, Any]) -> None:
        core.remove_vm(self._client(props), vm_id)

    def read(self, vm_id: str, props: dict[str, Any]) -> ReadResult:
        info = core.vm_info(self._client(props), vm_id)
        if info is None:
            return ReadResult(None, {})
        return ReadResult(vm_id, {**props, "status": str(info.get("status") or ""),
                                  "vmAppId": str(info.get("app_id") or props.get("vmAppId") or "")})


class Vm(Resource, module="vmm", name="Vm"):
    """One VM on a VMM host; ``vmId`` (also the resource id), ``status`` and ``vmAppId`` (the app id the
    VMM registered) are outputs."""

    vmId: pulumi.Output[str]  # noqa: N815 - dynamic resource outputs carry their property names
    status: pulumi.Output[str]
    vmAppId: pulumi.Output[str]  # noqa: N815

    def __init__(self, name: str, props: dict[str, Any], opts: pulumi.ResourceOptions | None = None):
        inputs = {**props, **{k: None for k in OUTPUTS}}
        opts = pulumi.ResourceOptions.merge(opts, pulumi.ResourceOptions(
            delete_before_replace=True, additional_secret_outputs=SECRET_OUTPUTS))
        super().__init__(VmProvider(), name, inputs, opts)


def vm_props(app, target, *, api_version: str | None = None) -> dict[str, Any]:
    """The inputs of an app's VM: the VM spec plus how to reach the VMM. Secrets appear by name only.
    ``apiVersion`` is the VMM host's dstack version (``vmm.apiVersion`` when the config has it, else the
    pinned one); it picks ``UpdateVm`` or, before 0.5.6, ``UpgradeApp``."""
    spec = core.vm_spec(app, target)
    api_version = api_version or getattr(target, "api_version", None) or core.VMM_VERSION
    kms = app.config.kms
    return {
        "url": target.url, **spec.to_props(),
        "appIdPinned": bool(kms and kms.app_id),
        "tokenSecret": target.token_secret,
        "secretEnv": dict(sorted(app.config.secret_env.items())),
        "apiVersion": api_version,
        "stopTimeout": 300,
        # signers of the KMS env keys to accept (compressed secp256k1 keys); empty: any valid signature
        "trustedKmsSigners": list(getattr(target, "trusted_kms_signers", None) or []),
    }

