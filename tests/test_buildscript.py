"""The generated build scripts, run for real against stand-in tools.

``git``, ``bitbake``, ``bitbake-layers``, ``cargo``, ``rustup``, ``curl``, ``gcloud`` (a local
directory as the bucket) and the dstack release's ``repro-build.sh`` are stand-ins on ``PATH`` (or in
the fetched tree); ``tar``, ``gzip``, ``patch``, ``awk``, ``sha256sum`` and ``python3`` are real. The
stand-in upstreams carry meta-dstack's real ``dstack-sync.bb`` and patches, so the recipe rewrite
and the PROD patch choice are checked against upstream's bytes. A real Yocto or dstack build cannot
run here (hours, network, hundreds of GB); everything around it does.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import os
import subprocess
import sys
import inspect
import struct
import tarfile
import time
import zlib
from pathlib import Path

import pytest

from fleet.apps import configdisk
from fleet.images import buildscript
from fleet.images import lock
from fleet.images import recipes
from fleet.images.buildscript import BuildScriptError, OutputsError, build_script, parse_outputs

SHELLCHECK = str(Path(sys.executable).parent / "shellcheck")
PY = sys.executable

INIT_SCRIPT = "#!/bin/sh\n# overlay init script\nDAEMON='/usr/bin/guest'\necho \"$DAEMON\" 'peers: a b'\n"
GUEST_BYTES = b"\x7fELF musl light client \x00\x01\x02"
GUEST_SHA256 = hashlib.sha256(GUEST_BYTES).hexdigest()
BUCKET = "acme-tee-build-fleet-images"
# the fleet's table-signing key version (fleet.project.bootstrap.Names.table_key_version) and a P-256
# public key the stand-in Cloud KMS hands out for it
TABLE_KEY_VERSION = ("projects/acme-tee-ops/locations/us-central1/keyRings/fleet-stack-secrets/cryptoKeys/"
                     "fleet-overlay-tables/cryptoKeyVersions/1")


def _table_public_key() -> str:
    from Crypto.PublicKey import ECC

    return ECC.generate(curve="P-256").public_key().export_key(format="PEM") + "\n"


TABLE_PUBLIC_KEY = _table_public_key()

# ---- upstream bytes the stand-in checkouts carry -------------------------------------------------------

# tpluslabs/meta-dstack@185fe293 recipes-core/dstack-sync/dstack-sync.bb, verbatim
DSTACK_SYNC_BB = "\n".join([
    'DESCRIPTION = "Syncs the date and time of the VM periodically using BusyBox ntpd"',
    'LICENSE = "CLOSED"',
    'FILESEXTRAPATHS:prepend := "${THISDIR}:"',
    "",
    'BINARY = "mini-server"',
    "",
    'SRC_URI += "file://init"',
    'SRC_URI += "file://${BINARY}"',
    "",
    'INITSCRIPT_NAME = "dstack-sync"',
    'INITSCRIPT_PARAMS = "defaults 80"',
    "",
    "inherit update-rc.d",
    "",
    "do_install() {",
    "    install -d ${D}${sysconfdir}/init.d",
    "    install -m 0755 ${WORKDIR}/init ${D}${sysconfdir}/init.d/dstack-sync",
    "    install -d ${D}${bindir}",
    "    install -m 0777 ${WORKDIR}/${BINARY} ${D}${bindir}",
    "}",
    "",
])
# ... patches/cvm.conf.patch, patches/local.conf.patch and prod-patches/local.conf.patch, verbatim
CVM_CONF_PATCH = "\n".join([
    "--- meta-confidential-compute/conf/distro/cvm.conf.orig\t2025-02-26 23:20:05.181112374 +0000",
    "+++ meta-confidential-compute/conf/distro/cvm.conf\t2025-02-26 23:20:56.005807148 +0000",
    "@@ -79,7 +79,7 @@",
    ' #DISTRO_FEATURES:class-native = "${CVM_DISTRO_FEATURES_NATIVE} tpm2"',
    ' #DISTRO_FEATURES:class-nativesdk = "${CVM_DISTRO_FEATURES_NATIVE} tpm2"',
    " ",
    '-DISTRO_EXTRA_RDEPENDS = "date-sync ca-certificates"',
    '+DISTRO_EXTRA_RDEPENDS = "date-sync dstack-sync ca-certificates podman"',
    """ DISTRO_EXTRA_RDEPENDS:append = '${@bb.utils.contains_any("IMAGE_FEATURES", [ "debug-tweaks" ], """
    """" dropbear", "",d)}'""",
    " ",
    ' # FIXME: Consider adding "modules" to MACHINE_FEATURES and using that in',
    "",
])
_MACHINE_HUNK = [
    ' MACHINE_FEATURES:append = " efi"',
    ' EXTRA_IMAGEDEPENDS += "ovmf"',
    " ",
    '-MACHINE ?= "tdx"',
    '+MACHINE ?= "tdx-gcp"',
    ' DISTRO ?= "cvm"',
]
LOCAL_CONF_PATCH = "\n".join([
    "--- build/conf/local.conf.orig\t2025-02-26 23:16:06.017726147 +0000",
    "+++ build/conf/local.conf\t2025-02-26 23:16:21.477850046 +0000",
    "@@ -290,5 +290,5 @@",
    *_MACHINE_HUNK,
    "",
])
PROD_LOCAL_CONF_PATCH = "\n".join([
    "--- build/conf/local.conf.orig\t2025-02-26 23:16:06.017726147 +0000",
    "+++ build/conf/local.conf\t2025-02-27 02:59:47.674407959 +0000",
    "@@ -1,3 +1,4 @@",
    "+",
    " #",
    " # This file is your local configuration file and is where all local user settings",
    " # are placed. The comments in this file give some guide to the options a new user",
    "@@ -146,7 +147,7 @@",
    " # meta/classes-recipe/image.bbclass and",
    " # meta/classes-recipe/core-image.bbclass for more details.",
    " # We default to enabling the debugging tweaks.",
    '-EXTRA_IMAGE_FEATURES ?= "debug-tweaks"',
    '+# EXTRA_IMAGE_FEATURES ?= "debug-tweaks"',
    " ",
    " #",
    " # Additional image features",
    "@@ -290,5 +291,5 @@",
    *_MACHINE_HUNK,
    "",
])


def original_from_patch(patch: str) -> str:
    """A file the patch applies to: its hunks' old lines at their line numbers, filler elsewhere."""
    lines: dict[int, str] = {}
    number = 0
    for line in patch.splitlines():
        if line.startswith("@@"):
            number = int(line.split()[1].lstrip("-").split(",")[0])
        elif line.startswith(("---", "+++")) or not number:
            continue
        elif line.startswith((" ", "-")):
            lines[number] = line[1:]
            number += 1
    return "".join(lines.get(n, f"# upstream line {n}") + "\n" for n in range(1, max(lines) + 4))


# ---- stand-in tools -----------------------------------------------------------------------------------------

RECORD = r'''
import json, os, sys
def record(tool, args, **extra):
    with open(os.environ["STUB_LOG"], "a") as log:
        log.write(json.dumps({"tool": tool, "args": args, "cwd": os.getcwd(), **extra}) + "\n")
'''

FAKE_GIT = RECORD + r'''
import re, shutil
args = sys.argv[1:]
where = os.getcwd()
if args[:1] == ["-C"]:
    where, args = args[1], args[2:]
record("git", args, where=where)
state = os.path.join(where, ".fakegit")
command = args[0]
if command == "init":
    os.makedirs(state, exist_ok=True)
elif command == "remote":
    with open(os.path.join(state, "url"), "w") as f:
        f.write(args[3])
elif command == "fetch":
    wanted = [a for a in args[1:] if not a.startswith("-") and a not in ("origin", "1")]
    if os.environ.get("FAKE_GIT_REFUSE_COMMITS") and wanted and re.fullmatch("[0-9a-f]{40}", wanted[-1]):
        sys.exit("fatal: remote error: upload-pack: not our ref " + wanted[-1])
elif command == "checkout":
    url = open(os.path.join(state, "url")).read()
    name = url.rstrip("/").rsplit("/", 1)[-1].removesuffix(".git")
    fixture = os.path.join(os.environ["FAKE_UPSTREAMS"], name)
    if not os.path.isdir(fixture):
        sys.exit("fake git: no stand-in checkout for " + url)
    shutil.copytree(fixture, where, dirs_exist_ok=True)
    with open(os.path.join(state, "HEAD"), "w") as f:
        f.write(args[-1])
elif command == "rev-parse":
    print(os.environ.get("FAKE_GIT_HEAD") or open(os.path.join(state, "HEAD")).read())
elif command == "submodule":
    pass
else:
    sys.exit("fake git: unsupported command " + command)
'''

FAKE_GCLOUD = RECORD + r'''
import base64, hashlib
args = sys.argv[1:]
record("gcloud", args)
root = os.environ["FAKE_GCS"]
def local(url):
    return os.path.join(root, "objects", url[len("gs://"):])
def meta(url):
    return os.path.join(root, "meta", url[len("gs://"):] + ".json")
def need(url):
    if not os.path.exists(local(url)):
        sys.exit("ERROR: (gcloud.storage) The following URLs matched no objects: " + url)
if args[:2] == ["storage", "cp"]:
    source, target = args[2], args[3]
    if source.startswith("gs://"):
        need(source)
        source = local(source)
    data = open(source, "rb").read()
    if target.startswith("gs://"):
        os.makedirs(os.path.dirname(local(target)), exist_ok=True)
        os.makedirs(os.path.dirname(meta(target)), exist_ok=True)
        counter = os.path.join(root, "generation")
        generation = int(open(counter).read()) + 1 if os.path.exists(counter) else 1712000000000001
        open(counter, "w").write(str(generation))
        open(local(target), "wb").write(data)
        crc = base64.b64encode(hashlib.sha256(data).digest()[:4]).decode()
        json.dump({"generation": str(generation), "crc32c_hash": crc}, open(meta(target), "w"))
    else:
        open(target, "wb").write(data)
elif args[:3] == ["storage", "objects", "describe"]:
    url = args[3]
    need(url)
    fields = next(a for a in args if a.startswith("--format=value("))[len("--format=value("):-1].split(",")
    values = dict(json.load(open(meta(url))), name=url.split("/", 3)[3])
    print("\t".join(values[f] for f in fields))
elif args[:2] == ["storage", "cat"]:
    need(args[2])
    sys.stdout.buffer.write(open(local(args[2]), "rb").read())
elif args[:2] == ["storage", "rm"]:
    need(args[2])
    os.remove(local(args[2]))
elif args[:4] == ["kms", "keys", "versions", "get-public-key"]:
    flags = dict(zip(args[5::2], args[6::2]))
    name = (f"projects/{flags['--project']}/locations/{flags['--location']}/keyRings/{flags['--keyring']}/"
            f"cryptoKeys/{flags['--key']}/cryptoKeyVersions/{args[4]}")
    if name != os.environ["FAKE_KMS_VERSION"]:
        sys.exit("ERROR: (gcloud.kms.keys.versions.get-public-key) NOT_FOUND: " + name)
    open(flags["--output-file"], "w").write(os.environ["FAKE_KMS_PUBLIC_KEY"])
else:
    sys.exit("fake gcloud: unsupported " + " ".join(args))
'''

# A GPT disk of a partition from LBA 2048 to its end, as the stand-in builds write them (MiB-sized, as
# the release's mkimage.sh makes them); the build must pad it to a whole GiB.
GPT_WRITER = inspect.getsource(configdisk.write_gpt) + """
def stand_in_disk(path, size):
    write_gpt(path, size, "rootfs", "5c3d1a9e-6b1f-4b7e-9c52-1d7a0b6e4f21", "9b2e4c71-3a5d-4f08-b6c9-7e1d2a3b4c5d",
              "0fc63daf-8483-4772-8e79-3d69d8477de4")
"""

# bitbake writes a sparse GPT "disk" holding the recipe's files, so the tarball proves what went in
FAKE_BITBAKE = RECORD + GPT_WRITER + r'''
record("bitbake", sys.argv[1:], builddir=os.environ.get("BUILDDIR"))
noise = os.environ.get("FAKE_BITBAKE_NOISE", "").encode() and os.environ["BUILDDIR"].encode()
recipe = os.path.join(os.getcwd(), "meta-dstack", "recipes-core", "dstack-sync")
deploy = os.path.join(os.environ["BUILDDIR"], "tmp", "deploy", "images", "tdx-gcp")
os.makedirs(deploy, exist_ok=True)
dated = "core-image-minimal-tdx-gcp.rootfs-20250101000000.wic"
if os.environ.get("FAKE_NO_GPT"):  # a disk whose size cannot be changed safely
    with open(os.path.join(deploy, dated), "wb") as disk:
        disk.truncate(8 << 20)
else:
    stand_in_disk(os.path.join(deploy, dated), 8 << 20)
with open(os.path.join(deploy, dated), "r+b") as disk:
    for n, name in enumerate(("guest", "init", "dstack-sync.bb", "table-key.pem"), start=1):
        disk.seek(n << 20)
        disk.write(open(os.path.join(recipe, name), "rb").read())
    disk.seek(6 << 20)
    disk.write(noise)  # a build that stamps its own path: not reproducible
    disk.truncate(8 << 20)
os.symlink(dated, os.path.join(deploy, "core-image-minimal-tdx-gcp.rootfs.wic"))
'''

FAKE_CARGO = RECORD + r'''
args = sys.argv[1:]
record("cargo", args, target_dir=os.environ.get("CARGO_TARGET_DIR"))
target = args[args.index("--target") + 1]
binary = args[args.index("--bin") + 1]
out = os.path.join(os.environ["CARGO_TARGET_DIR"], target, "release")
os.makedirs(out, exist_ok=True)
with open(os.path.join(out, binary), "w") as f:
    f.write("light client " + binary + " built in " + os.getcwd() + "\n")
'''

FAKE_CURL = RECORD + r'''
import shutil
args = sys.argv[1:]
record("curl", args)
url = args[-1]
shutil.copy(os.path.join(os.environ["FAKE_HTTP"], url.rsplit("/", 1)[-1]), args[args.index("--output") + 1])
'''

FAKE_RECORD_ONLY = RECORD + r'''
record(os.path.basename(sys.argv[0]), sys.argv[1:])
'''

FAKE_RUNUSER = RECORD + r'''
args = sys.argv[1:]
record("runuser", args)
command = args[args.index("--") + 1:]
os.execvp(command[0], command)
'''

FAKE_REFUSE = RECORD + r'''
record(os.path.basename(sys.argv[0]), sys.argv[1:])
sys.exit(os.path.basename(sys.argv[0]) + " must not be used: the manifest tracks branches")
'''

# stand-in checkouts -----------------------------------------------------------------------------------------

FAKE_SETUP = """#!/bin/bash
# stand-in for yocto-manifests config_files/tdx-base/setup
CURRENT_PATH=$(pwd)
pushd "$CURRENT_PATH/srcs/poky/" >/dev/null
source oe-init-build-env
bitbake-layers add-layer ../meta-confidential-compute
popd >/dev/null
"""

FAKE_OE_INIT = """# stand-in for poky's oe-init-build-env
mkdir -p build/conf
cp "$FAKE_LOCAL_CONF" build/conf/local.conf
export BUILDDIR="$PWD/build"
cd build
"""

# Dstack-TEE/meta-dstack's dstack-uki.bb (excerpt: the variable the overrides extend)
DSTACK_UKI_BB = """SUMMARY = "dstack Unified Kernel Image"
UKI_CMDLINE_BASE = "console=ttyS0 init=/init panic=1 net.ifnames=0 biosdevname=0 \\
mce=off oops=panic pci=noearly pci=nommconf random.trust_cpu=y random.trust_bootloader=n \\
tsc=reliable no-kvmclock"
"""
ROOTFS_HASH = "5e" * 32

# stand-in for the release's repro-build.sh: two builds with the release's output layout
FAKE_REPRO = f"""#!{PY}
import hashlib, json, os, sys
""" + GPT_WRITER + f"""
here = os.path.dirname(os.path.abspath(__file__))
with open(os.environ["STUB_LOG"], "a") as log:
    log.write(json.dumps({{"tool": "repro-build.sh", "args": sys.argv[1:], "cwd": os.getcwd()}}) + "\\n")
uki = open(os.path.join(here, "..", "meta-dstack", "recipes-core", "images", "dstack-uki.bb"), "rb").read()
for build in ("build-a", "build-b"):
    out = os.path.join(here, build, "images", "dstack-0.6.0.a2")
    os.makedirs(out, exist_ok=True)
    files = {{"bzImage": b"kernel", "ovmf.fd": b"firmware", "initramfs.cpio.gz": b"initramfs",
             "metadata.json": json.dumps({{"cmdline": "console=ttyS0 init=/init dstack.rootfs_hash={ROOTFS_HASH} "
                                                     "dstack.rootfs_size=1048576", "version": "0.6.0.a2"}},
                                          indent=4).encode()}}
    for name, data in files.items():
        open(os.path.join(out, name), "wb").write(data)
    listing = "".join(hashlib.sha256(files[n]).hexdigest() + "  " + n + "\\n"
                      for n in ("ovmf.fd", "bzImage", "initramfs.cpio.gz", "metadata.json"))
    open(os.path.join(out, "sha256sum.txt"), "w").write(listing)
    open(os.path.join(out, "digest.txt"), "w").write(hashlib.sha256(listing.encode()).hexdigest() + "\\n")
    if not os.environ.get("FAKE_NO_AUTH_HASH"):
        open(os.path.join(out, "auth_hash.txt"), "w").write("a7" * 32 + "\\n")
    stand_in_disk(os.path.join(out, "disk.raw"), 4 << 20)
    with open(os.path.join(out, "disk.raw"), "r+b") as disk:
        disk.seek(1 << 20)
        disk.write(uki)
        if build == "build-b" and os.environ.get("FAKE_REPRO_DIFFER"):
            disk.write(b"a timestamp that leaked into build-b")
# like the release's check.sh, this stand-in passes: the script must compare by itself
"""


def write_tree(root: Path, files: dict[str, str | bytes], executable: tuple[str, ...] = ()) -> None:
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
        if name in executable:
            path.chmod(0o755)


class Toolchain:
    """Stand-in tools on PATH, stand-in upstream checkouts, a directory as the bucket."""

    def __init__(self, root: Path):
        self.root = root
        self.bin = root / "bin"
        self.log = root / "stub.log"
        self.gcs = root / "gcs"
        self.upstreams = root / "upstreams"
        self.http = root / "http"
        for d in (self.bin, self.gcs, self.upstreams, self.http):
            d.mkdir(parents=True)
        tools = {"git": FAKE_GIT, "gcloud": FAKE_GCLOUD, "bitbake": FAKE_BITBAKE, "cargo": FAKE_CARGO,
                 "curl": FAKE_CURL, "runuser": FAKE_RUNUSER, "repo": FAKE_REFUSE}
        for name in ("bitbake-layers", "rustup", "apt-get", "useradd", "usermod", "chown", "sysctl", "systemctl",
                     "shutdown"):
            tools[name] = FAKE_RECORD_ONLY
        for name, body in tools.items():
            path = self.bin / name
            path.write_text(f"#!{PY}\n{body}")
            path.chmod(0o755)
        (self.http / "guest-musl").write_bytes(GUEST_BYTES)
        local_conf = root / "local.conf.sample"
        local_conf.write_text(original_from_patch(PROD_LOCAL_CONF_PATCH))
        self.env = dict(os.environ, PATH=f"{self.bin}:{os.environ['PATH']}", STUB_LOG=str(self.log),
                        FAKE_GCS=str(self.gcs), FAKE_UPSTREAMS=str(self.upstreams), FAKE_HTTP=str(self.http),
                        FAKE_LOCAL_CONF=str(local_conf), FAKE_KMS_VERSION=TABLE_KEY_VERSION,
                        FAKE_KMS_PUBLIC_KEY=TABLE_PUBLIC_KEY)
        self._tplus_upstreams()
        self._dstack_upstream()

    def _tplus_upstreams(self) -> None:
        u = self.upstreams
        write_tree(u / "yocto-manifests", {"config_files/tdx-base/setup": FAKE_SETUP,
                                           "config_files/Makefile": "build:\n\tcd srcs/poky && bitbake cvm-image-azure\n"})
        write_tree(u / "poky", {"oe-init-build-env": FAKE_OE_INIT, "meta/conf/layer.conf": "# core\n"})
        write_tree(u / "meta-openembedded", {f"{layer}/conf/layer.conf": "# layer\n" for layer in
                                             ("meta-oe", "meta-python", "meta-networking", "meta-filesystems")})
        write_tree(u / "meta-confidential-compute", {
            "conf/distro/cvm.conf": original_from_patch(CVM_CONF_PATCH),
            "recipes-core/cvm-init/cvm-init.bb": "# removed by get-modular.sh\n",
            "recipes-core/date-sync/date-sync.bb": "# kept\n"})
        write_tree(u / "meta-virtualization", {"conf/layer.conf": "# virtualization\n"})
        write_tree(u / "meta-custom-podman", {"recipes-core/images/cvm-initramfs.bbappend": "# podman in the image\n"})
        write_tree(u / "meta-dstack", {
            "recipes-core/dstack-sync/dstack-sync.bb": DSTACK_SYNC_BB,
            "recipes-core/dstack-sync/init": "#!/bin/sh\nexec /usr/bin/mini-server\n",
            "recipes-core/dstack-sync/mini-server": b"prebuilt mini-server",
            "patches/cvm.conf.patch": CVM_CONF_PATCH,
            "patches/local.conf.patch": LOCAL_CONF_PATCH,
            "prod-patches/local.conf.patch": PROD_LOCAL_CONF_PATCH})
        write_tree(u / "tplus-examples", {"dstack-helios-tdx/Cargo.toml": "[workspace]\n"})

    def _dstack_upstream(self) -> None:
        # Dstack-TEE/meta-dstack has the same basename as tpluslabs'; a dstack test swaps it in
        write_tree(self.root / "dstack-meta-dstack", {
            "repro-build/repro-build.sh": FAKE_REPRO,
            "meta-dstack/recipes-core/images/dstack-uki.bb": DSTACK_UKI_BB}, executable=("repro-build/repro-build.sh",))

    def use_dstack_upstream(self) -> None:
        import shutil

        shutil.rmtree(self.upstreams / "meta-dstack")
        shutil.copytree(self.root / "dstack-meta-dstack", self.upstreams / "meta-dstack")

    def run(self, script: str, *args: str, path: Path | None = None, **env: str) -> subprocess.CompletedProcess:
        path = path or self.root / "build script.sh"
        path.write_text(script)
        return subprocess.run(["/bin/bash", str(path), *args], env={**self.env, **env}, capture_output=True,
                              text=True, cwd=self.root, timeout=120)

    def calls(self, tool: str | None = None) -> list[dict]:
        if not self.log.exists():
            return []
        entries = [json.loads(line) for line in self.log.read_text().splitlines()]
        return [e for e in entries if tool is None or e["tool"] == tool]

    def object(self, name: str) -> Path:
        return self.gcs / "objects" / BUCKET / name


@pytest.fixture
def tools(tmp_path: Path) -> Toolchain:
    return Toolchain(tmp_path)


def tplus_spec(guest: dict | None = None, prod: bool | None = None) -> recipes.BuildSpec:
    inputs: dict = {"recipe": "tplus-overlay",
                    "guest": guest or {"binary": {"url": "https://downloads.example/guest-musl", "sha256": GUEST_SHA256}}}
    if prod is not None:
        inputs["prod"] = prod
    derived = {"init_script_sha256": hashlib.sha256(INIT_SCRIPT.encode()).hexdigest(),
               "table_key_version": TABLE_KEY_VERSION}
    return recipes.build_spec("overlay-a", inputs, derived, init_script=INIT_SCRIPT)


SOURCE_GUEST = {"source": {"repository": "https://github.com/tpluslabs/tplus-examples",
                           "commit": "3eb04cad11664a381227d77a469e68bca7e94c30", "workspace": "dstack-helios-tdx",
                           "binary": "light_client", "features": ["quic", "tdx"]}}


def dstack_spec(**overrides: str) -> recipes.BuildSpec:
    inputs: dict = {"recipe": "dstack-os", "version": "0.6.0.a2"}
    if overrides:
        inputs["cmdlineOverrides"] = overrides
    return recipes.build_spec("dstack-a", inputs)


def local_script(spec: recipes.BuildSpec, out: Path, *, bucket: str | None = BUCKET, **kwargs) -> str:
    return build_script(spec, mode="local", bucket=bucket, output_dir=str(out), **kwargs)


def check_gce_tarball(path: Path, into: Path) -> Path:
    """GCE's format: a gzip'd tar holding exactly disk.raw, GNU (oldgnu) headers, a whole number of GiB
    (sparse). Returns disk.raw, extracted into ``into``."""
    raw = path.read_bytes()
    assert raw[3] & 0x08 == 0 and raw[4:8] == bytes(4)  # gzip -n: no file name, no time stamp
    with gzip.open(path) as stream:
        header = stream.read(512)
    assert header[257:265] == b"ustar  \x00"  # the GNU magic (POSIX ustar is b"ustar\x0000")
    with tarfile.open(path, "r:gz") as archive:
        members = archive.getmembers()
        assert [m.name for m in members] == ["disk.raw"]
        (member,) = members
        assert member.issparse() and member.type == tarfile.GNUTYPE_SPARSE
        assert (member.mtime, member.uid, member.gid, member.mode) == (0, 0, 0, 0o644)
        assert member.size % (1 << 30) == 0 and member.size >= 1 << 30
        into.mkdir(parents=True, exist_ok=True)
        archive.extract(member, into, filter="data")
    return into / "disk.raw"


def read_at(path: Path, offset: int, length: int) -> bytes:
    with path.open("rb") as f:
        f.seek(offset)
        return f.read(length)


def gpt_at(raw: Path, lba: int) -> dict:
    header = read_at(raw, lba * 512, 92)
    assert header[:8] == b"EFI PART"
    assert struct.unpack("<I", header[16:20])[0] == zlib.crc32(header[:16] + bytes(4) + header[20:])
    current, other, first_usable, last_usable = struct.unpack("<QQQQ", header[24:56])
    array_lba, count, size, crc = struct.unpack("<QIII", header[72:92])
    array = read_at(raw, array_lba * 512, count * size)
    assert zlib.crc32(array) == crc
    return {"current": current, "other": other, "first_usable": first_usable, "last_usable": last_usable,
            "array_lba": array_lba, "array": array}


def check_padded_gpt(raw: Path) -> None:
    """A whole-GiB disk whose GPT is written for that size: the backup header is the last LBA."""
    last = raw.stat().st_size // 512 - 1
    primary, backup = gpt_at(raw, 1), gpt_at(raw, last)
    assert (primary["current"], primary["other"], backup["current"], backup["other"]) == (1, last, last, 1)
    assert primary["array"] == backup["array"] and backup["array_lba"] == last - 32
    assert primary["last_usable"] == backup["last_usable"] == last - 33


# ---- tplus-overlay -----------------------------------------------------------------------------------------

def test_tplus_build_publishes_a_gce_tarball_and_the_outputs_the_lock_needs(tools, tmp_path):
    spec = tplus_spec()
    out = tmp_path / "out"
    result = tools.run(local_script(spec, out))
    assert result.returncode == 0, result.stderr

    tarball = tools.object(f"{spec.input_hash}/disk.tar.gz")
    disk = check_gce_tarball(tarball, tmp_path / "x")
    assert tarball.read_bytes() == (out / "disk.tar.gz").read_bytes()
    assert tarball.stat().st_size < 1 << 20  # padded with a hole: the tarball stays small
    # the disk bitbake made holds the verified guest, the overlay init script and the rewritten recipe
    assert read_at(disk, 1 << 20, len(GUEST_BYTES)) == GUEST_BYTES
    assert read_at(disk, 2 << 20, len(INIT_SCRIPT)) == INIT_SCRIPT.encode()
    check_padded_gpt(disk)  # bitbake made 8 MiB: padded to 1 GiB, its GPT rewritten for that size
    assert "padding it to a whole GiB" in tools.object(f"{spec.input_hash}/build.log").read_text()
    sha256 = hashlib.sha256(tarball.read_bytes()).hexdigest()
    assert tools.object(f"{spec.input_hash}/disk.tar.gz.sha256").read_text() == f"{sha256}  disk.tar.gz\n"

    digest, entry = parse_outputs(tools.object(f"{spec.input_hash}/outputs.json").read_text(),
                                  expect_input_hash=spec.input_hash)
    assert digest == spec.input_hash
    described = next(json.loads(p.read_text()) for p in (tools.gcs / "meta").rglob("disk.tar.gz.json"))
    assert entry["artifact"] == {"url": f"gs://{BUCKET}/{spec.input_hash}/disk.tar.gz", "sha256": sha256,
                                 "generation": described["generation"], "crc32c": described["crc32c_hash"]}
    assert entry["recipe"] == "tplus-overlay" and entry["label"] == spec.label
    assert not {"os_image_hash", "rootfs_hash", "uki_hash"} & set(entry)
    # built twice, in two complete trees, and compared before anything was published
    assert tools.object(f"{spec.input_hash}/build.log").read_text().count("bitbake core-image-minimal") == 2
    assert "both builds are byte-identical" in tools.object(f"{spec.input_hash}/build.log").read_text()
    # outputs.json is uploaded last: its presence means the build is complete
    uploads = [c["args"][3] for c in tools.calls("gcloud") if c["args"][:2] == ["storage", "cp"]]
    assert uploads[-1] == f"gs://{BUCKET}/{spec.input_hash}/outputs.json"
    assert set(uploads) == {f"gs://{BUCKET}/{spec.input_hash}/{n}" for n in
                            ("disk.tar.gz", "disk.tar.gz.sha256", "build.log", "outputs.json")}
    full = json.loads((out / "outputs.json").read_text())
    assert full["details"]["guest_sha256"] == GUEST_SHA256
    # the image carries the fleet key's public half, fetched by its key version, and the lock records it
    assert read_at(disk, 4 << 20, len(TABLE_PUBLIC_KEY)) == TABLE_PUBLIC_KEY.encode()
    assert full["details"]["table_key_sha256"] == hashlib.sha256(TABLE_PUBLIC_KEY.encode()).hexdigest()
    lock.merge(lock.LockFile(version=1), {"images": {digest: entry}})  # what make lock does


def test_a_disk_that_is_not_whole_gib_and_has_no_gpt_is_refused(tools, tmp_path):
    spec = tplus_spec()
    result = tools.run(local_script(spec, tmp_path / "out"), FAKE_NO_GPT="1")
    assert result.returncode != 0
    assert (f"disk.raw is {8 << 20} bytes, not a whole number of GiB (1073741824 bytes); GCE imports raw disks only "
            "in whole GB, and this one has no GPT to rewrite for a padded size") in result.stderr
    assert not tools.object(f"{spec.input_hash}/disk.tar.gz").exists()
    assert not tools.object(f"{spec.input_hash}/outputs.json").exists()


def make_gpt(path: Path, size: int) -> None:
    configdisk.write_gpt(str(path), size, "dstack-rootfs", configdisk.DATA_DISK_GUID, configdisk.DATA_PART_GUID,
                         configdisk.LINUX_DATA_TYPE)


def test_pad_gpt_disk_rewrites_the_gpt_for_the_padded_size(tmp_path):
    disk = tmp_path / "disk.raw"
    make_gpt(disk, 5 << 20)
    with disk.open("r+b") as f:
        f.seek(1 << 20)
        f.write(b"partition data")
    before = gpt_at(disk, 1)
    assert buildscript.pad_gpt_disk(str(disk), 1 << 30) == 1 << 30 == disk.stat().st_size
    assert disk.stat().st_blocks * 512 < 8 << 20  # the padding is a hole
    check_padded_gpt(disk)
    after = gpt_at(disk, 1)
    assert after["array"] == before["array"]  # the partition itself is unchanged (it still ends where it did)
    assert struct.unpack("<QQ", after["array"][32:48]) == (2048, (5 << 20) // 512 - 34)
    assert after["first_usable"] == before["first_usable"] and after["array_lba"] == before["array_lba"] == 2
    assert read_at(disk, 1 << 20, 14) == b"partition data"
    assert struct.unpack("<I", read_at(disk, 458, 4))[0] == (1 << 30) // 512 - 1  # protective MBR spans the disk
    assert read_at(disk, (5 << 20) - 512, 8) == bytes(8)  # the old backup header is gone
    # what GPT tools check: the padded disk is the same layout write_gpt gives a 1 GiB disk, but the partition
    fresh = tmp_path / "fresh.raw"
    make_gpt(fresh, 1 << 30)
    assert {k: v for k, v in gpt_at(fresh, 1).items() if k != "array"} == {k: v for k, v in after.items() if k != "array"}
    # already whole GiB: untouched
    untouched = disk.read_bytes()[:4096]
    assert buildscript.pad_gpt_disk(str(disk), 1 << 30) == 1 << 30 and disk.read_bytes()[:4096] == untouched


def test_pad_gpt_disk_runs_from_its_own_source_and_refuses_what_it_cannot_pad(tmp_path):
    """The build step runs PAD_PROGRAM with python3 -c: the function must stand alone."""
    disk = tmp_path / "disk.raw"
    make_gpt(disk, 3 << 20)
    run = subprocess.run([sys.executable, "-I", "-c", buildscript.PAD_PROGRAM, str(disk), str(1 << 30)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    check_padded_gpt(disk)
    plain = tmp_path / "plain.raw"
    plain.write_bytes(bytes(4 << 20))
    run = subprocess.run([sys.executable, "-I", "-c", buildscript.PAD_PROGRAM, str(plain), str(1 << 30)],
                         capture_output=True, text=True)
    assert run.returncode != 0 and "no GPT header at LBA 1" in run.stderr and plain.stat().st_size == 4 << 20
    corrupt = tmp_path / "corrupt.raw"
    make_gpt(corrupt, 3 << 20)
    with corrupt.open("r+b") as f:
        f.seek(2 * 512 + 40)
        f.write(b"\xff")
    run = subprocess.run([sys.executable, "-I", "-c", buildscript.PAD_PROGRAM, str(corrupt), str(1 << 30)],
                         capture_output=True, text=True)
    assert run.returncode != 0 and "partition array's CRC32 does not match" in run.stderr


def test_a_table_key_that_is_not_p256_stops_the_build(tools, tmp_path):
    from Crypto.PublicKey import RSA

    rsa = RSA.generate(2048).public_key().export_key().decode() + "\n"
    result = tools.run(local_script(tplus_spec(), tmp_path / "out", bucket=None), FAKE_KMS_PUBLIC_KEY=rsa)
    assert result.returncode != 0 and "did not give an EC P-256 public key" in result.stderr
    assert not tools.calls("bitbake")


def test_tplus_recipe_is_patched_as_upstream_requires(tools, tmp_path):
    out = tmp_path / "out"
    result = tools.run(local_script(tplus_spec(), out, bucket=None))
    assert result.returncode == 0, result.stderr
    tree = out / "work" / "tree-a" / "srcs" / "poky"
    recipe = tree / "meta-dstack" / "recipes-core" / "dstack-sync"
    bb = (recipe / "dstack-sync.bb").read_text()
    # renaming the file is not enough: BINARY and SRC_URI name the guest, nothing names mini-server
    assert 'BINARY = "guest"' in bb.splitlines() and 'SRC_URI += "file://guest"' in bb.splitlines()
    assert "mini-server" not in bb and not (recipe / "mini-server").exists()
    upstream, ours = bb.split("\n# dstack-fleet:", 1)
    assert upstream.replace('"guest"', '"mini-server"').replace("file://guest", "file://${BINARY}") == DSTACK_SYNC_BB
    # the key goes where the init script reads it; the tools it calls are runtime dependencies of
    # dstack-sync, so they land in the initramfs the node runs (DISTRO_EXTRA_RDEPENDS holds dstack-sync)
    assert ('SRC_URI += "file://table-key.pem"' in ours.splitlines()
            and 'RDEPENDS:${PN} += "busybox e2fsprogs-mke2fs openssl-bin"' in ours.splitlines())
    assert "    install -m 0644 ${WORKDIR}/table-key.pem ${D}${sysconfdir}/dstack-fleet/table-key.pem" in ours
    assert recipes.TABLE_KEY_PATH == "/etc/dstack-fleet/table-key.pem"
    assert (recipe / "table-key.pem").read_text() == TABLE_PUBLIC_KEY
    assert (recipe / "guest").read_bytes() == GUEST_BYTES and os.access(recipe / "guest", os.X_OK)
    assert (recipe / "init").read_text() == INIT_SCRIPT
    # get-modular.sh's steps, at the pins: PROD drops debug-tweaks; cvm-* recipes go; podman's bbappend renamed
    local_conf = (tree / "build" / "conf" / "local.conf").read_text().splitlines()
    assert '# EXTRA_IMAGE_FEATURES ?= "debug-tweaks"' in local_conf and 'MACHINE ?= "tdx-gcp"' in local_conf
    assert 'DISTRO_EXTRA_RDEPENDS = "date-sync dstack-sync ca-certificates podman"' in (
        tree / "meta-confidential-compute" / "conf" / "distro" / "cvm.conf").read_text().splitlines()
    assert not (tree / "meta-confidential-compute" / "recipes-core" / "cvm-init").exists()
    assert (tree / "meta-confidential-compute" / "recipes-core" / "date-sync").exists()
    assert (tree / "meta-custom-podman" / "recipes-core" / "images" / "core-image-minimal.bbappend").exists()
    layers = [c["args"][1] for c in tools.calls("bitbake-layers") if "/work/tree-a/" in c["cwd"] + "/"]
    assert layers == ["../meta-confidential-compute", "meta-dstack", "./meta-openembedded/meta-oe/",
                      "./meta-openembedded/meta-python/", "./meta-openembedded/meta-networking",
                      "./meta-openembedded/meta-filesystems/", "meta-virtualization", "meta-custom-podman"]
    # every upstream at its pinned commit; the branch-tracking manifest tool is never used
    for name in ("tree-a", "tree-b"):
        checkouts = {c["where"].split(f"/work/{name}/")[1]: c["args"][-1] for c in tools.calls("git")
                     if c["args"][0] == "checkout" and f"/work/{name}/" in c["where"]}
        assert checkouts == {u.path: u.commit for u in recipes.TPLUS_UPSTREAMS}
    assert not tools.calls("repo")
    first, second = tools.calls("bitbake")
    assert first["args"] == second["args"] == ["core-image-minimal"]
    assert (first["cwd"], second["cwd"]) == (str(tree), str(tree).replace("tree-a", "tree-b"))
    # the two trees share only the checksummed source downloads
    assert f'DL_DIR = "{out}/work/downloads"' in local_conf


def test_two_tplus_builds_that_differ_publish_nothing(tools, tmp_path):
    spec = tplus_spec()
    result = tools.run(local_script(spec, tmp_path / "out"), FAKE_BITBAKE_NOISE="1")
    assert result.returncode != 0
    assert "the two builds differ" in result.stderr and "nothing is published" in result.stderr
    assert not tools.object(f"{spec.input_hash}/outputs.json").exists()
    assert tools.object(f"{spec.input_hash}/failure.txt").exists()  # and the log, for a look
    assert tools.object(f"{spec.input_hash}/build.log").exists()


def test_without_prod_debug_tweaks_stay(tools, tmp_path):
    out = tmp_path / "out"
    assert tools.run(local_script(tplus_spec(prod=False), out, bucket=None)).returncode == 0
    local_conf = (out / "work/tree-a/srcs/poky/build/conf/local.conf").read_text().splitlines()
    assert 'EXTRA_IMAGE_FEATURES ?= "debug-tweaks"' in local_conf and 'MACHINE ?= "tdx-gcp"' in local_conf


def test_two_runs_give_identical_tarball_bytes(tools, tmp_path):
    spec = tplus_spec()
    first, second = tmp_path / "first", tmp_path / "second"
    assert tools.run(local_script(spec, first, bucket=None)).returncode == 0
    time.sleep(1.1)  # every file of the second run has a different mtime
    assert tools.run(local_script(spec, second, bucket=None)).returncode == 0
    assert (first / "disk.tar.gz").read_bytes() == (second / "disk.tar.gz").read_bytes()
    assert check_gce_tarball(first / "disk.tar.gz", tmp_path / "x").stat().st_size == 1 << 30


def test_unchanged_inputs_never_rebuild(tools, tmp_path):
    spec = tplus_spec()
    script = local_script(spec, tmp_path / "out")
    assert tools.run(script).returncode == 0
    outputs = tools.object(f"{spec.input_hash}/outputs.json").read_bytes()
    builds = len(tools.calls("bitbake"))
    again = tools.run(local_script(spec, tmp_path / "elsewhere"))
    assert again.returncode == 0 and "already exists" in again.stderr
    assert len(tools.calls("bitbake")) == builds
    assert tools.object(f"{spec.input_hash}/outputs.json").read_bytes() == outputs


def test_a_wrong_guest_sha256_stops_the_build_before_anything_is_built(tools, tmp_path):
    spec = tplus_spec({"binary": {"url": "https://downloads.example/guest-musl", "sha256": "0" * 64}})
    result = tools.run(local_script(spec, tmp_path / "out"))
    assert result.returncode != 0
    assert f"sha256 is {GUEST_SHA256} but {'0' * 64} is expected" in result.stderr
    assert "dstack-fleet:images.overlay-a.build.guest.binary.sha256" in result.stderr
    assert not tools.calls("bitbake") and not [c for c in tools.calls("git") if c["args"][0] == "checkout"]
    assert not tools.object(f"{spec.input_hash}/outputs.json").exists()
    assert not tools.object(f"{spec.input_hash}/disk.tar.gz").exists()
    assert "failed with exit status 1" in tools.object(f"{spec.input_hash}/failure.txt").read_text()
    assert "is expected" in tools.object(f"{spec.input_hash}/build.log").read_text()


def test_guest_from_source_is_built_for_musl_at_its_commit(tools, tmp_path):
    out = tmp_path / "out"
    result = tools.run(local_script(tplus_spec(SOURCE_GUEST), out, bucket=None))
    assert result.returncode == 0, result.stderr
    (cargo,) = tools.calls("cargo")
    assert cargo["args"] == ["+1.86.0", "build", "--locked", "--release", "--target", "x86_64-unknown-linux-musl",
                             "--no-default-features", "--features", "quic,tdx", "--bin", "light_client"]
    assert cargo["cwd"] == str(out / "work" / "guest-src" / "dstack-helios-tdx")
    built = (out / "work/tree-a/srcs/poky/meta-dstack/recipes-core/dstack-sync/guest").read_text()
    assert built == f"light client light_client built in {cargo['cwd']}\n"
    guest_checkout = [c for c in tools.calls("git") if c["args"][0] == "checkout" and c["where"].endswith("guest-src")]
    assert guest_checkout[0]["args"][-1] == SOURCE_GUEST["source"]["commit"]
    assert tools.calls("rustup")[0]["args"] == ["toolchain", "install", "1.86.0", "--profile", "minimal", "--target",
                                                "x86_64-unknown-linux-musl"]
    outputs = json.loads((out / "outputs.json").read_text())
    assert outputs["details"]["guest_sha256"] == hashlib.sha256(built.encode()).hexdigest()


def test_a_server_that_refuses_bare_commits_is_fetched_by_branch_then_checked(tools, tmp_path):
    result = tools.run(local_script(tplus_spec(), tmp_path / "out", bucket=None), FAKE_GIT_REFUSE_COMMITS="1")
    assert result.returncode == 0, result.stderr
    fetches = [c["args"][-1] for c in tools.calls("git") if c["args"][0] == "fetch"]
    assert "scarthgap" in fetches and "v3" in fetches


def test_a_checkout_that_is_not_the_pin_fails(tools, tmp_path):
    result = tools.run(local_script(tplus_spec(), tmp_path / "out", bucket=None), FAKE_GIT_HEAD="f" * 40)
    assert result.returncode != 0
    assert f"checked out {'f' * 40}, but the pin is {recipes.TPLUS_UPSTREAMS[0].commit}" in result.stderr
    assert not tools.calls("bitbake")


def test_an_upstream_recipe_that_changed_stops_the_build(tools, tmp_path):
    bb = tools.upstreams / "meta-dstack/recipes-core/dstack-sync/dstack-sync.bb"
    bb.write_text(DSTACK_SYNC_BB.replace('BINARY = "mini-server"', 'BINARY ?= "server"'))
    result = tools.run(local_script(tplus_spec(), tmp_path / "out", bucket=None))
    assert result.returncode != 0
    assert "expected exactly one line 'BINARY = \"mini-server\"'; has the pinned upstream changed?" in result.stderr
    assert not tools.calls("bitbake")


HOSTILE = "dir with spaces 'quote\" $(touch pwned) `touch pwned2` $HOME ;touch pwned3"


def test_hostile_paths_are_inert(tools, tmp_path):
    out = tmp_path / HOSTILE / "out"
    guest = tmp_path / HOSTILE / "guest $(id)"
    guest.parent.mkdir(parents=True, exist_ok=True)
    guest.write_bytes(GUEST_BYTES)
    spec = tplus_spec({"binary": {"url": "guests/light-client", "sha256": GUEST_SHA256}})
    script = local_script(spec, out, bucket=None, guest_location=str(guest), work_dir=str(tmp_path / "work"))
    result = tools.run(script, path=tmp_path / HOSTILE / "build.sh")
    assert result.returncode == 0, result.stderr
    assert check_gce_tarball(out / "disk.tar.gz", tmp_path / "x").stat().st_size == 1 << 30
    assert (tmp_path / "work" / "tree-a" / "srcs" / "poky" / "meta-dstack").is_dir()
    assert (out / "build.log").is_file() and (out / "disk.tar.gz.sha256").is_file()
    assert json.loads((out / "outputs.json").read_text())["artifact"]["file"] == str(out / "disk.tar.gz")
    for where in (tmp_path, tmp_path / HOSTILE, Path.cwd(), out):
        assert not any((where / name).exists() for name in ("pwned", "pwned2", "pwned3"))
    lint = subprocess.run([SHELLCHECK, "-s", "bash", "-"], input=script, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout


# ---- the build host (remote mode) -----------------------------------------------------------------------------

def test_on_a_build_host_the_build_runs_unprivileged_and_the_vm_powers_off(tools, tmp_path):
    spec = tplus_spec({"binary": {"url": "guests/light-client", "sha256": GUEST_SHA256}})
    guest_object = tools.object(f"{spec.input_hash}/inputs/guest")
    guest_object.parent.mkdir(parents=True)
    guest_object.write_bytes(GUEST_BYTES)
    script = build_script(spec, mode="remote", bucket=BUCKET, work_dir=str(tmp_path / "vm"),
                          guest_location=f"gs://{BUCKET}/{spec.input_hash}/inputs/guest")
    result = tools.run(script)
    assert result.returncode == 0, result.stderr
    (install,) = [c for c in tools.calls("apt-get") if c["args"][0] == "install"]
    assert {"build-essential", "chrpath", "python3-git", "zstd", "lz4"} <= set(install["args"])
    (runuser,) = tools.calls("runuser")
    assert runuser["args"][:3] == ["-u", buildscript.BUILD_USER, "--"]
    assert runuser["args"][-2:] == [str(tmp_path / "vm" / "build.sh"), "build-phase"]
    assert tools.calls("shutdown") == [{"tool": "shutdown", "args": ["-h", "now"], "cwd": str(tools.root)}]
    log = [json.loads(line)["tool"] for line in tools.log.read_text().splitlines()]
    assert log.index("bitbake") < log.index("shutdown") and log[-1] == "shutdown"
    digest, entry = parse_outputs(tools.object(f"{spec.input_hash}/outputs.json").read_text())
    assert digest == spec.input_hash and entry["source"].startswith("dstack-fleet remote build")


def test_a_startup_script_run_without_a_file_reads_itself_from_the_metadata_server(tools, tmp_path):
    spec = tplus_spec()
    script = build_script(spec, mode="remote", bucket=BUCKET, work_dir=str(tmp_path / "vm"))
    (tools.http / "startup-script").write_text(script)
    result = subprocess.run(["/bin/bash", "-s"], input=script, env=tools.env, capture_output=True, text=True,
                            cwd=tools.root, timeout=120)
    assert result.returncode == 0, result.stderr
    metadata = [c for c in tools.calls("curl") if "Metadata-Flavor: Google" in c["args"]]
    assert metadata[0]["args"][-1].endswith("/instance/attributes/startup-script")
    assert (tmp_path / "vm" / "build.sh").read_text() == script
    assert tools.object(f"{spec.input_hash}/outputs.json").exists()


def test_a_failed_build_host_records_the_failure_and_still_powers_off(tools, tmp_path):
    spec = tplus_spec({"binary": {"url": "https://downloads.example/guest-musl", "sha256": "1" * 64}})
    result = tools.run(build_script(spec, mode="remote", bucket=BUCKET, work_dir=str(tmp_path / "vm")))
    assert result.returncode != 0
    assert tools.object(f"{spec.input_hash}/failure.txt").exists()
    assert tools.calls("shutdown")[-1]["args"] == ["-h", "now"]
    assert not tools.object(f"{spec.input_hash}/outputs.json").exists()


def test_a_rebooted_build_host_with_a_finished_build_only_powers_off(tools, tmp_path):
    spec = tplus_spec()
    done = tools.object(f"{spec.input_hash}/outputs.json")
    done.parent.mkdir(parents=True)
    done.write_text("{}")
    (tools.gcs / "meta" / BUCKET / spec.input_hash).mkdir(parents=True)
    (tools.gcs / "meta" / BUCKET / spec.input_hash / "outputs.json.json").write_text('{"generation": "1"}')
    result = tools.run(build_script(spec, mode="remote", bucket=BUCKET, work_dir=str(tmp_path / "vm")))
    assert result.returncode == 0, result.stderr
    assert not tools.calls("apt-get") and not tools.calls("bitbake")
    assert [c["tool"] for c in tools.calls()][-1] == "shutdown"


# ---- dstack-os ---------------------------------------------------------------------------------------------

def test_dstack_os_build_publishes_the_measured_hashes(tools, tmp_path):
    tools.use_dstack_upstream()
    spec = dstack_spec(**{"dstack.data_device": "/dev/disk/by-id/google-dstack-data"})
    out = tmp_path / "out"
    result = tools.run(local_script(spec, out))
    assert result.returncode == 0, result.stderr
    built = out / "work" / "src" / "meta-dstack" / "repro-build" / "build-a" / "images" / "dstack-0.6.0.a2"
    tarball = tools.object(f"{spec.input_hash}/disk.tar.gz")
    published = check_gce_tarball(tarball, tmp_path / "x")
    made = (built / "disk.raw").read_bytes()  # 4 MiB, as the release aligns it
    assert len(made) == 4 << 20 and published.stat().st_size == 1 << 30
    check_padded_gpt(published)
    # everything but the GPT structures is the release's bytes: the partitions' data did not move
    end = len(made) - 33 * 512  # where the release's backup partition array began
    assert read_at(published, 1024, end - 1024) == made[1024:end]
    assert read_at(published, end, 33 * 512) == bytes(33 * 512)  # the old backup structures are gone
    digest, entry = parse_outputs(tools.object(f"{spec.input_hash}/outputs.json").read_text(),
                                  expect_input_hash=spec.input_hash)
    assert entry["artifact"]["sha256"] == hashlib.sha256(tarball.read_bytes()).hexdigest()
    assert entry["os_image_hash"] == hashlib.sha256((built / "sha256sum.txt").read_bytes()).hexdigest()
    assert entry["os_image_hash"] == (built / "digest.txt").read_text().strip()
    assert entry["rootfs_hash"] == ROOTFS_HASH  # from metadata.json's kernel command line
    assert entry["uki_hash"] == "a7" * 32
    details = json.loads((out / "outputs.json").read_text())["details"]
    assert details["rootfs_size"] == "1048576"
    assert details["cmdline_overrides"] == {"dstack.data_device": "/dev/disk/by-id/google-dstack-data"}
    # the lock records the UKI's final command line: dstack-uki.bb's base, the override, the rootfs values
    assert entry["kernel_cmdline"] == spec.kernel_cmdline.replace("<rootfs_hash>", ROOTFS_HASH).replace(
        "<rootfs_size>", "1048576")
    assert " dstack.data_device=/dev/disk/by-id/google-dstack-data dstack.rootfs_hash=" in entry["kernel_cmdline"]
    # the override reached the UKI recipe before the build (the stand-in build put the recipe on the disk)
    uki = (out / "work/src/meta-dstack/meta-dstack/recipes-core/images/dstack-uki.bb").read_text()
    assert uki.endswith('UKI_CMDLINE_BASE:append = " dstack.data_device=/dev/disk/by-id/google-dstack-data"\n')
    assert b"dstack.data_device=/dev/disk/by-id/google-dstack-data" in (built / "disk.raw").read_bytes()
    git = tools.calls("git")
    assert [c["args"][-1] for c in git if c["args"][0] == "checkout"] == [recipes.DSTACK_OS_RELEASES["0.6.0.a2"]
                                                                         .upstream.commit]
    assert ["submodule", "update", "--init", "--recursive"] in [c["args"] for c in git]
    assert len(tools.calls("repro-build.sh")) == 1


def test_dstack_os_without_an_authenticode_hash_records_none(tools, tmp_path):
    tools.use_dstack_upstream()
    spec = dstack_spec()
    result = tools.run(local_script(spec, tmp_path / "out"), FAKE_NO_AUTH_HASH="1")
    assert result.returncode == 0, result.stderr
    _, entry = parse_outputs(tools.object(f"{spec.input_hash}/outputs.json").read_text())
    assert "uki_hash" not in entry and entry["os_image_hash"]
    uki = (tmp_path / "out/work/src/meta-dstack/meta-dstack/recipes-core/images/dstack-uki.bb").read_text()
    assert uki == DSTACK_UKI_BB  # no overrides, recipe untouched


def test_dstack_os_fails_when_the_two_builds_differ(tools, tmp_path):
    tools.use_dstack_upstream()
    spec = dstack_spec()
    result = tools.run(local_script(spec, tmp_path / "out"), FAKE_REPRO_DIFFER="1")
    assert result.returncode != 0
    assert "build-a and build-b differ in disk.raw" in result.stderr
    assert "not reproducible; nothing is published" in result.stderr
    assert not tools.object(f"{spec.input_hash}/disk.tar.gz").exists()
    assert not tools.object(f"{spec.input_hash}/outputs.json").exists()
    assert tools.object(f"{spec.input_hash}/failure.txt").exists()


# ---- shellcheck -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["tplus-binary-local", "tplus-source-remote", "tplus-path-remote", "dstack-remote",
                                     "dstack-overrides-local"])
def test_generated_scripts_pass_shellcheck(variant, tmp_path):
    if variant == "tplus-binary-local":
        script = local_script(tplus_spec(), tmp_path / "out")
    elif variant == "tplus-source-remote":
        script = build_script(tplus_spec(SOURCE_GUEST), mode="remote", bucket=BUCKET)
    elif variant == "tplus-path-remote":
        script = build_script(tplus_spec({"binary": {"url": "bin/guest", "sha256": GUEST_SHA256}}), mode="remote",
                              bucket=BUCKET, guest_location=f"gs://{BUCKET}/x/inputs/guest")
    elif variant == "dstack-remote":
        script = build_script(dstack_spec(), mode="remote", bucket=BUCKET)
    else:
        script = local_script(dstack_spec(**{"dstack.rootfs_device": "PARTLABEL=dstack-rootfs"}), tmp_path, bucket=None)
    lint = subprocess.run([SHELLCHECK, "-s", "bash", "-"], input=script, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout


def test_the_build_tree_must_live_at_a_path_the_upstream_tools_accept(tmp_path):
    # bitbake refuses spaces in its build directory; upstream's scripts expand paths unquoted
    with pytest.raises(BuildScriptError, match="the upstream build tools need an absolute path"):
        local_script(tplus_spec(), tmp_path / HOSTILE)
    with pytest.raises(BuildScriptError, match="pass another work directory"):
        build_script(dstack_spec(), mode="remote", bucket=BUCKET, work_dir="/var/lib/build $(reboot)")
    assert local_script(tplus_spec(), tmp_path / HOSTILE, work_dir=str(tmp_path / "work"))


def test_scripts_cannot_be_made_without_where_the_results_go():
    with pytest.raises(BuildScriptError, match="publishes to a bucket"):
        build_script(tplus_spec(), mode="remote", bucket=None)
    with pytest.raises(BuildScriptError, match="repository path"):
        build_script(tplus_spec({"binary": {"url": "bin/guest", "sha256": GUEST_SHA256}}), mode="remote", bucket=BUCKET)
    with pytest.raises(BuildScriptError, match="not a GCS bucket name"):
        build_script(tplus_spec(), mode="remote", bucket="Bad Bucket")


# ---- the outputs contract ---------------------------------------------------------------------------------------

H = "e" * 64


def outputs(**changes) -> str:
    document = {"inputHash": H, "recipe": "dstack-os", "label": "dstack-os 0.6.0.a2", "source": "a build",
                "built_at": "2026-07-01T00:00:00Z", "os_image_hash": "1" * 64, "rootfs_hash": "2" * 64,
                "artifact": {"url": f"gs://{BUCKET}/{H}/disk.tar.gz", "generation": "1712000000000001",
                             "crc32c": "AAAAAA==", "sha256": "3" * 64},
                "details": {"rootfs_size": "1"}}
    document.update(changes)
    return json.dumps({k: v for k, v in document.items() if v is not None})


def test_parse_outputs_gives_a_lock_entry():
    digest, entry = parse_outputs(outputs(uki_hash="4" * 64), expect_input_hash=H)
    assert digest == H
    assert entry == {"recipe": "dstack-os", "label": "dstack-os 0.6.0.a2", "source": "a build",
                     "built_at": "2026-07-01T00:00:00Z", "os_image_hash": "1" * 64, "rootfs_hash": "2" * 64,
                     "uki_hash": "4" * 64, "artifact": {"url": f"gs://{BUCKET}/{H}/disk.tar.gz",
                                                        "generation": "1712000000000001", "crc32c": "AAAAAA==",
                                                        "sha256": "3" * 64}}
    assert lock.ImageEntry.model_validate(entry)


@pytest.mark.parametrize("text,message", [
    ("not json", "outputs.json is not JSON"),
    (outputs(inputHash="f" * 64), f"is not the input hash of this build ({H})"),
    (outputs(recipe="tplus-overlay"), "a tplus-overlay build produces no os_image_hash"),
    (outputs(rootfs_hash=None), "rootfs_hash: is required from a dstack-os build"),
    (outputs(artifact={"url": f"gs://{BUCKET}/other/disk.tar.gz", "generation": "1", "crc32c": "AAAAAA==",
                       "sha256": "3" * 64}), f"is not the tarball of input hash {H}"),
    (outputs(artifact={"url": f"gs://{BUCKET}/{H}/disk.tar.gz", "generation": "1", "crc32c": "bad",
                       "sha256": "3" * 64}), "artifact.crc32c"),
    (outputs(artifact={"file": "/tmp/disk.tar.gz", "sha256": "3" * 64}), "built locally and never uploaded"),
    (outputs(extra=1), "extra: unknown field of outputs.json"),
    (outputs(recipe="nosuch"), "recipe: unknown recipe 'nosuch'"),
])
def test_parse_outputs_rejects_what_the_lock_cannot_hold(text, message):
    with pytest.raises(OutputsError) as info:
        parse_outputs(text, expect_input_hash=H)
    assert message in str(info.value) and "\n" not in str(info.value)
