"""An app on Phala Cloud as the ``phala`` CLI sees it: its calls, generated scripts and reported CVM.

``components/phala.py`` runs these scripts through pulumi-command.

CLI version followed: ``phala`` **1.1.18** (``phala --version`` prints ``v1.1.18+d27a321``), the only
release the npm registry serves (``npm view phala versions``; the 1.1.0-beta.2 this module followed
before is no longer installable). Its flags were re-read from that release as published: the npm
tarball ``phala-1.1.18.tgz`` (integrity ``sha512-vi6iNNIMrjOWhVCucCtHTe9MGVcrHtUB9OUorjQl/WEhmxHh4Ft+1EPS
r+O5z6ISX2dzakU+Wm/o7lBW3WJ7kw==``), ``dist/index.js``: the ``deploy`` command's option table and the
global options, ``cvms get`` and ``cvms delete`` (``DEPLOY_FLAGS`` below is that table; a test keeps
every flag the scripts pass inside it). ``tools/phala/`` installs exactly this release with
``npm ci`` (every package of its tree checked against the lock file's integrity hashes). Its calls,
as the generated scripts make them:

* create: ``phala deploy --json --name N --instance-type T --kms K --no-dev-os --no-listed
  [--node-id I] [--fs X] --compose F [-e ENVFILE] [--pre-launch-script P] --public-logs|--no-public-logs
  --public-sysinfo|--no-public-sysinfo``. The CLI provisions, encrypts the env file client-side with
  the app's key and commits; ``--no-dev-os`` keeps it from adding the operator's
  ``~/.ssh/id_*.pub`` to the env, as it does when neither dev flag is given. 1.1.18 has no flag for
  public TCB info or secure time (``--public-tcbinfo``/``--secure-time`` are "unknown or unexpected
  option"s), so those settings are refused for a phala target;
* update in place: ``phala deploy --json --cvm-id N --compose F [-e ENVFILE] [--pre-launch-script P]
  [--public-logs ...] --wait`` (the CLI PATCHes the CVM: compose, pre-launch script, env, public
  logs/sysinfo). What the PATCH cannot change (name, KMS, instance type, node, filesystem, public
  tcbinfo, secure time) is in ``triggers``, which the pulumi-command SDK marks ``replaceOnChanges``:
  a change replaces the CVM, deleting the old one first (``deleteBeforeReplace``);
* read back: ``phala cvms get N --json``: with ``--json`` the CLI prints ``{"success": true, ...}``
  merged into the CVM as the API describes it (``app_id``, ``vm_uuid``, ``compose_hash``, ``status``,
  ``gateway``...). The scripts send the deploy's own output to stderr, so the step's stdout is
  exactly this document;
* adopt: a create first asks ``phala cvms get N --json``. A CVM of that name exists when an earlier run
  was interrupted after the CLI made it (Pulumi then has no state of it and creates again): the create
  updates that CVM in place instead of making a second one. Only a "not found" answer leads to a new
  CVM; any other failure of the look-up stops the step (``cvms get`` exits 1 both for a missing CVM,
  "CVM not found", and for API errors: ``cli/src/commands/cvms/get/index.ts``);
* delete: ``phala cvms delete N --yes``.

Every call runs in a fresh temporary directory, because the CLI reads ``phala.toml`` from the working
directory (a ``cvm_id`` there would turn a create into an update of another CVM). The API key reaches
the CLI only as ``PHALA_CLOUD_API_KEY`` in the command's environment (a Pulumi secret), never on argv;
the plaintext env is written to a mode-600 file in that directory from ``DSTACK_FLEET_APP_ENV``.

Phala builds app-compose.json on its servers (with values of its own), so the compose-hash and app-id
are *reported*: parsed from the CLI's JSON (unknown extra fields are ignored, a missing one fails
clearly). App URLs are ``https://<app-id>-<port>.<gateway domain>`` for each declared port.

Alternative: Phala's Terraform provider (``phala-network/phala``, Apache-2.0) through Pulumi's bridge,
``pulumi package add terraform-provider registry.terraform.io/phala-network/phala <version>``, gives a
``phala_app`` resource with ``app_id`` (and, after v0.3.0-beta.4, ``compose_hash``) as outputs and in-place
updates, without a CLI on the deploying machine. It is not used here because it keeps the plaintext
``env`` in state and needs the provider plugin downloaded at plan time; generating its SDK was not tried.
"""

from __future__ import annotations

import json
import re
import shlex
import uuid
from typing import Any, Mapping


CLI_VERSION = "1.1.18"
CLI_SOURCE = "npm phala@1.1.18 (build d27a321), dist/index.js: the deploy, cvms get and cvms delete option tables"
# `phala deploy` in 1.1.18: the command's options and the global ones (as `phala deploy --help` lists
# them), each with its negated form where the CLI defines one.
DEPLOY_FLAGS = frozenset({
    "--help", "--version", "--api-token", "--api-key", "--json", "--no-json", "--interactive", "--cvm-id",
    "--profile", "--api-version", "--name", "--compose", "--instance-type", "--region", "--env", "-e", "--kms",
    "--wait", "--ssh-pubkey", "--dev-os", "--no-dev-os", "--public-logs", "--no-public-logs", "--public-sysinfo",
    "--no-public-sysinfo", "--listed", "--no-listed", "--debug", "--disk-size", "--fs", "--image", "--node-id",
    "--custom-app-id", "--nonce", "--pre-launch-script", "--private-key", "--rpc-url", "--prepare-only", "--commit",
    "--token", "--compose-hash", "--transaction-hash",
})
STEP = "phala-deploy"
STEP_MARK = "# dstack-fleet:step="
API_KEY_ENV = "PHALA_CLOUD_API_KEY"
APP_ENV = "DSTACK_FLEET_APP_ENV"
PRE_LAUNCH_ENV = "DSTACK_FLEET_PRE_LAUNCH"
NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9-]{4,62}")
ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class PhalaError(Exception):
    """Bad input for the CLI or an unusable CLI response: one line."""


def name_problem(name: str) -> str | None:
    """The CLI's rule for ``--name``: 5-63 characters, a letter first, letters, digits and hyphens."""
    if NAME_RE.fullmatch(name):
        return None
    return (f"Phala CVM name {name!r} is invalid: the phala CLI wants 5-63 characters, a letter first, then letters, "
            "digits or hyphens")


def _flag(name: str, value: bool | None) -> list[str]:
    if value is None:
        return []
    return [f"--{name}" if value else f"--no-{name}"]


def deploy_args(app, target, *, update: bool, with_env: bool, with_pre_launch: bool) -> list[str]:
    """``phala deploy`` arguments for an ``AppPlan`` on a ``PhalaTarget``: no secret ever appears here."""
    settings = app.config.settings
    args = ["phala", "deploy", "--json"]
    if update:
        args += ["--cvm-id", app.name]
    else:
        args += ["--name", app.name, "--instance-type", target.instance_type, "--kms", target.kms, "--no-dev-os",
                 "--no-listed"]
        if target.node_id is not None:
            args += ["--node-id", str(target.node_id)]
        if settings.storage_fs:
            args += ["--fs", settings.storage_fs]
    args += ["--compose", "docker-compose.yml"]
    args += _flag("public-logs", settings.public_logs) + _flag("public-sysinfo", settings.public_sysinfo)
    if with_env:
        args += ["-e", "app.env"]
    if with_pre_launch:
        args += ["--pre-launch-script", "pre-launch.sh"]
    if update:
        args.append("--wait")
    return args


def replacement_triggers(app, target) -> list[Any]:
    """What the CLI cannot change on an existing CVM."""
    settings = app.config.settings
    return [app.name, target.kms, target.instance_type, target.node_id, settings.storage_fs,
            settings.public_tcbinfo, settings.secure_time]


_PROLOGUE = """set -euo pipefail
: "${PHALA_CLOUD_API_KEY:?PHALA_CLOUD_API_KEY is not set}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
umask 077
"""


def _script(step: str | None, body: list[str], *, reads_compose: bool) -> str:
    lines = [f"{STEP_MARK}{step}"] if step else []
    lines.append(_PROLOGUE.rstrip("\n"))
    if reads_compose:
        lines.append('cat > "$work/docker-compose.yml"  # stdin: the compose file, byte for byte')
        lines.append(f'if [ -n "${{{APP_ENV}:-}}" ]; then printf \'%s\\n\' "${APP_ENV}" > "$work/app.env"; fi')
        lines.append(f'if [ -n "${{{PRE_LAUNCH_ENV}:-}}" ]; then printf \'%s\' "${PRE_LAUNCH_ENV}" > "$work/pre-launch.sh"; fi')
    lines.append('cd "$work"  # never a phala.toml of the calling directory')
    lines += body
    return "\n".join(lines) + "\n"


NOT_FOUND = "not found|404"  # what `phala cvms get` prints for a CVM that does not exist (grep -E, any case)


def deploy_script(app, target, *, update: bool, with_env: bool, with_pre_launch: bool) -> str:
    """The create (``update=False``) or update script: deploy (its output to stderr), then print
    ``phala cvms get --json``, which is the step's stdout. A create adopts a CVM of its own name that an
    interrupted run left behind (it updates it in place)."""
    flags = dict(with_env=with_env, with_pre_launch=with_pre_launch)
    get = shlex.join(["phala", "cvms", "get", app.name, "--json"])
    update_cmd = shlex.join(deploy_args(app, target, update=True, **flags))
    if update:
        return _script(STEP, [f"{update_cmd} >&2", get], reads_compose=True)
    create_cmd = shlex.join(deploy_args(app, target, update=False, **flags))
    body = [
        "# an interrupted earlier run may have made this CVM already: adopt it instead of making a second one",
        f'if {get} > "$work/existing" 2>&1; then',
        f"  echo {shlex.quote(f'a CVM named {app.name} exists (left by an interrupted run): updating it in place')} >&2",
        f"  {update_cmd} >&2",
        f"elif grep -qiE {shlex.quote(NOT_FOUND)} \"$work/existing\"; then",
        f"  {create_cmd} >&2",
        "else",
        f"  echo {shlex.quote(f'cannot tell whether a CVM named {app.name} exists, so none is created:')} >&2",
        '  cat "$work/existing" >&2',
        "  exit 1",
        "fi",
        get,
    ]
    return _script(STEP, body, reads_compose=True)


def create_script(app, target, *, with_env: bool, with_pre_launch: bool) -> str:
    return deploy_script(app, target, update=False, with_env=with_env, with_pre_launch=with_pre_launch)


def update_script(app, target, *, with_env: bool, with_pre_launch: bool) -> str:
    return deploy_script(app, target, update=True, with_env=with_env, with_pre_launch=with_pre_launch)


def delete_script(app) -> str:
    return _script(None, [shlex.join(["phala", "cvms", "delete", app.name, "--yes"]) + " >&2"], reads_compose=False)


def env_file(env: Mapping[str, str]) -> str:
    """``KEY=VALUE`` lines for ``phala deploy -e``; a value must fit on one line (never shown)."""
    lines = []
    for key in sorted(env):
        if not ENV_NAME_RE.fullmatch(key):
            raise PhalaError(f"secret env name {key!r} is not a valid environment variable name")
        if "\n" in env[key] or "\r" in env[key]:
            raise PhalaError(f"secret env {key}: the value spans several lines, which an env file cannot carry")
        lines.append(f"{key}={env[key]}")
    return "\n".join(lines)


def _json_documents(text: str) -> list[Any]:
    decoder = json.JSONDecoder()
    found, index = [], 0
    while index < len(text):
        start = min((i for i in (text.find("{", index), text.find("[", index)) if i >= 0), default=-1)
        if start < 0:
            break
        try:
            value, end = decoder.raw_decode(text, start)
        except ValueError:
            index = start + 1
            continue
        found.append(value)
        index = end
    return found


def _hex(value: Any, length: int, field: str, where: str) -> str:
    text = str(value or "").strip().lower()
    for prefix in ("0x", "app_"):
        text = text.removeprefix(prefix)
    if not re.fullmatch(rf"[0-9a-f]{{{length}}}", text):
        raise PhalaError(f"{where}: {field} {value!r} is not {length} hex digits")
    return text


def parse_cvm_info(stdout: str, *, where: str = "phala cvms get --json") -> dict[str, Any]:
    """The reported facts of a CVM from the CLI's JSON: the last JSON object in the output, unwrapped from
    ``{"success": ..., "data": {...}}`` if the CLI wraps it. Extra fields are ignored."""
    objects = [d for d in _json_documents(stdout or "") if isinstance(d, dict)]
    if not objects:
        raise PhalaError(f"{where}: no JSON object in the output ({len(stdout or '')} characters)")
    info = objects[-1]
    if isinstance(info.get("data"), dict) and "success" in info:
        info = info["data"]
    if info.get("success") is False:
        raise PhalaError(f"{where}: the CLI reported failure: {' '.join(str(info.get('error') or info.get('message')).split())}")
    missing = [k for k in ("app_id", "compose_hash") if not info.get(k)]
    if missing:
        raise PhalaError(f"{where}: the response has no {' or '.join(missing)} (fields: {', '.join(sorted(info)) or 'none'})")
    gateway = info.get("gateway") if isinstance(info.get("gateway"), dict) else {}
    return {
        "appId": _hex(info["app_id"], 40, "app_id", where),
        "composeHash": _hex(info["compose_hash"], 64, "compose_hash", where),
        "cvmId": str(info.get("vm_uuid") or info.get("id") or ""),
        "name": str(info.get("name") or ""),
        "status": str(info.get("status") or ""),
        "gatewayDomain": str(gateway.get("base_domain") or ""),
    }


def app_urls(app_id: str, ports: list[int], gateway_domain: str) -> list[str]:
    return [f"https://{app_id}-{port}.{gateway_domain}" for port in ports]


def offline_cvm_stdout(ctx) -> str:
    """Offline stand-in for the step's stdout (``fleet.offline.COMMAND_STEPS``): a ``phala cvms get
    --json`` document of the real shape whose values are fake, derived from the step's URN."""
    script = ctx.inputs.get("create") or ""
    name = next((shlex.split(line)[3] for line in script.splitlines() if line.startswith("phala cvms get ")), ctx.name)
    digest = ctx.digest("phala")
    return json.dumps({
        "id": f"cvm_{digest[:16]}", "name": name, "app_id": ctx.digest("app-id")[:40],
        "vm_uuid": str(uuid.UUID(digest[:32])), "instance_id": None,
        "resource": {"instance_type": "tdx.small", "vcpu": 1, "memory_in_gb": 2, "disk_in_gb": 20},
        "node_info": {"object_type": "node", "id": 1, "name": "offline", "region": "offline"},
        "os": {"name": "dstack-0.5.x", "version": "0.5.x", "is_dev": False, "os_image_hash": None},
        "kms_type": "phala", "status": "running", "in_progress": False,
        "compose_hash": ctx.digest("compose-hash"), "gateway": {"base_domain": None, "cname": None},
        "public_logs": True, "public_sysinfo": True, "listed": False,
    }, indent=2)


def target_problems(app) -> list[str]:
    target = app.config.phala
    problems = [p for p in (name_problem(app.name),) if p]
    if target.kms != "phala":
        problems.append(f"app {app.name}: an on-chain KMS ({target.kms}) needs a deployer key and RPC URL, which "
                        "dstack-fleet does not pass to the phala CLI yet; use kms: phala")
    if app.config.kms and app.config.kms.app_id:
        problems.append(f"app {app.name}: a pinned app id on Phala needs --custom-app-id with a --nonce, which "
                        "dstack-fleet does not configure yet")
    problems += [f"app {app.name}: {message}" for _, message in unsupported_settings(app.config.settings)]
    return problems


def unsupported_settings(settings) -> list[tuple[str, str]]:
    """``(settings key, message)`` for app settings the pinned CLI cannot pass to Phala Cloud."""
    out = []
    if settings.public_tcbinfo is not None:
        out.append(("publicTcbinfo", f"phala {CLI_VERSION} has no flag for public TCB info; remove "
                                     "settings.publicTcbinfo for a phala target (Phala Cloud decides it)"))
    if settings.secure_time:
        out.append(("secureTime", f"phala {CLI_VERSION} has no flag for secure time; remove settings.secureTime for "
                                  "a phala target"))
    return out
