"""The mkosi container build step, run for real against stand-in mkosi (writes a tar) and skopeo
(records its arguments, "pushes" by reading the layout), with the real ``python -m fleet.ocilayout``
in between; its settings, configuration checks, input hash and offline stand-in."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from fleet.images import mkosibuild as mb
from fleet.images import ocilayout as ol
from fleet.plan import offline

from .conftest import ROOT

EPOCH = 1701475200
CONF = """\
[Distribution]
Distribution=debian
Release=bookworm

[Output]
Format=tar
Output=mkosi.output  # the step names the output itself

[Content]
Packages=ca-certificates
         nodejs
WithDocs=no
SourceDateEpoch=1701475200
"""
SETTINGS = {"directory": "apps/simple-app", "command": ["/usr/bin/node", "/opt/app/server.js"],
            "workingDir": "/opt/app", "env": {"NODE_ENV": "production"}, "ports": [3000]}
REPOSITORY = "us-central1-docker.pkg.dev/acme-tee-ops/fleet/simple-app"
SHELLCHECK = str(Path(sys.executable).parent / "shellcheck")


def rootfs_tar(server_js: bytes = b"console.log('hi')\n") -> bytes:
    """What the stand-in mkosi writes: a small tree, in mkosi's unsorted style."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in ((".", None), ("./usr", None), ("./opt", None), ("./opt/app", None),
                           ("./opt/app/server.js", server_js), ("./usr/bin", None), ("./usr/bin/node", b"ELF")):
            info = tarfile.TarInfo(name)
            info.mtime, info.mode = EPOCH, 0o755
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


FAKE_MKOSI = f"""#!{sys.executable}
import io, json, os, sys
sys.path.insert(0, {str(ROOT)!r})
from tests.test_mkosibuild import rootfs_tar
argv = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(json.dumps(["mkosi", *argv]) + "\\n")
if argv == ["--version"]:
    print("mkosi " + os.environ.get("FAKE_MKOSI_VERSION", "25.3"))
    sys.exit(0)
if not argv or argv[-1] != "build":
    sys.exit("stand-in mkosi: the verb must come last: " + repr(argv))
options = {{}}
for arg in argv[:-1]:
    if arg == "--wipe-build-dir":
        continue
    name, sep, value = arg.partition("=")
    if not sep or name not in ("--directory", "--output-directory", "--output", "--compress-output", "--incremental"):
        sys.exit("stand-in mkosi: unexpected argument " + repr(arg))
    options[name] = value
if not os.path.isfile(os.path.join(options["--directory"], "mkosi.conf")):
    sys.exit("stand-in mkosi: no mkosi.conf in " + repr(options["--directory"]))
counter = os.path.join(os.environ["FAKE_STATE"], "builds")
count = int(open(counter).read()) + 1 if os.path.exists(counter) else 1
open(counter, "w").write(str(count))
differ = os.environ.get("FAKE_MKOSI_DIFFER") == "1" and count == 2
data = rootfs_tar(b"console.log('built at', Date.now())\\n" if differ else b"console.log('hi')\\n")
with open(os.path.join(options["--output-directory"], options["--output"] + ".tar"), "wb") as f:
    f.write(data)
print("stand-in mkosi wrote the image")  # the real one logs too; the step sends it to stderr
"""

FAKE_SKOPEO = f"""#!{sys.executable}
import hashlib, json, os, shutil, sys
argv = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(json.dumps(["skopeo", *argv]) + "\\n")
policy = json.load(open(argv[argv.index("--policy") + 1]))
assert policy == {{"default": [{{"type": "insecureAcceptAnything"}}]}}, policy
if "inspect" in argv:
    assert argv[-1].startswith("docker://") and "--no-tags" in argv and "--format" in argv, argv
    if not os.environ.get("FAKE_SKOPEO_EXISTING"):
        sys.exit("FATA[0000] Error parsing image name: reading manifest: manifest unknown")
    print(os.environ["FAKE_SKOPEO_EXISTING"])
    sys.exit(0)
source, destination = argv[-2], argv[-1]
assert source.startswith("oci:") and destination.startswith("docker://"), argv
path, _, tag = source[len("oci:"):].partition(":")
index = json.load(open(os.path.join(path, "index.json")))
[manifest] = [m for m in index["manifests"] if m["annotations"]["org.opencontainers.image.ref.name"] == tag]
blob = open(os.path.join(path, "blobs", "sha256", manifest["digest"].split(":")[1]), "rb").read()
assert "sha256:" + hashlib.sha256(blob).hexdigest() == manifest["digest"]
shutil.copytree(path, os.path.join(os.environ["FAKE_STATE"], "pushed"))
with open(argv[argv.index("--digestfile") + 1], "w") as f:
    f.write(os.environ.get("FAKE_SKOPEO_DIGEST") or manifest["digest"])
print("Writing manifest to image destination")
"""


class Rig:
    """A project root (the step's working directory) with the mkosi configuration, ``fleet`` and
    ``.venv`` linked from the repository, and stand-in tools on ``PATH``."""

    def __init__(self, base: Path, directory: str = "apps/simple-app", conf: str = CONF):
        self.root = base / "project"
        self.directory = directory
        (self.root / directory).mkdir(parents=True)
        (self.root / directory / "mkosi.conf").write_text(conf)
        (self.root / directory / "mkosi.build").write_text("#!/bin/sh\ncp -r app \"$DESTDIR/opt/\"\n")
        (self.root / "fleet").symlink_to(ROOT / "fleet")
        (self.root / ".venv").symlink_to(ROOT / ".venv")
        self.bin, self.state, self.tmp = base / "bin", base / "state", base / "tmp"
        for d in (self.bin, self.state, self.tmp):
            d.mkdir()
        self.log = base / "tools.log"
        self.tools({"mkosi": FAKE_MKOSI, "skopeo": FAKE_SKOPEO})

    def tools(self, scripts: dict[str, str]) -> None:
        for name, text in scripts.items():
            (self.bin / name).write_text(text)
            (self.bin / name).chmod(0o755)

    def settings(self, **changes) -> dict:
        return {**SETTINGS, "directory": self.directory, **changes}

    def script(self, **changes) -> tuple[str, str]:
        build = mb.MkosiBuild.from_settings(self.settings(**changes))
        digest = mb.input_hash(self.root, "simple-app", build)
        return digest, mb.step_script(build, key="simple-app", input_hash=digest, repository=REPOSITORY)

    def run(self, script: str, **env: str) -> subprocess.CompletedProcess:
        environment = dict(os.environ, PATH=f"{self.bin}:{os.environ['PATH']}", FAKE_LOG=str(self.log),
                           FAKE_STATE=str(self.state), TMPDIR=str(self.tmp))
        environment.update(env)
        return subprocess.run(["bash", "-c", script], capture_output=True, text=True, cwd=self.root, env=environment)

    def calls(self) -> list[list[str]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]


@pytest.fixture
def rig(tmp_path) -> Rig:
    return Rig(tmp_path)


def expected_layout(tmp_path: Path, build: mb.MkosiBuild) -> ol.Layout:
    (tmp_path / "expected.tar").write_bytes(rootfs_tar())
    return ol.build_layout(tmp_path / "expected.tar", tmp_path / "expected", settings=build.image_settings(),
                           source_date_epoch=EPOCH)


# ---- the step, run ------------------------------------------------------------------------------------------

def test_step_builds_twice_pushes_and_prints_the_lock_entry(rig, tmp_path):
    digest, script = rig.script()
    result = rig.run(script)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout  # mkosi's and skopeo's own output went to stderr
    entry = json.loads(lines[0])
    expected = expected_layout(tmp_path, mb.MkosiBuild.from_settings(rig.settings()))
    assert entry == {"image": REPOSITORY, "digest": expected.manifest_digest, "digest_kind": "manifest",
                     "source": f"images stack mkosi 25.3 build of apps/simple-app (input hash {digest}); "
                               f"image id {expected.image_id}"}
    assert mb.parse_step_stdout(result.stdout) == entry
    calls = rig.calls()
    builds = [c for c in calls if c[0] == "mkosi" and c[-1] == "build"]
    assert len(builds) == 2
    outputs = [next(a for a in c if a.startswith("--output-directory=")) for c in builds]
    assert outputs[0] != outputs[1]
    for call in builds:
        assert "--directory=apps/simple-app" in call and "--compress-output=no" in call
        assert "--incremental=no" in call and "--wipe-build-dir" in call and "--output=rootfs" in call
    inspect, push = [c for c in calls if c[0] == "skopeo"]
    tag = digest[:32]
    assert inspect[3] == "inspect" and inspect[-1] == f"docker://{REPOSITORY}:{tag}"  # asked first: not there
    assert push[1:3] == ["--policy", push[2]] and push[3] == "copy" and "--preserve-digests" in push
    assert push[-1] == f"docker://{REPOSITORY}:{tag}" and push[-2].startswith("oci:") and push[-2].endswith(f":{tag}")
    pushed = json.loads((rig.state / "pushed" / "index.json").read_text())
    assert pushed["manifests"][0]["digest"] == entry["digest"]
    assert list(rig.tmp.iterdir()) == []  # the work directory is gone


def test_step_refuses_when_the_two_builds_differ(rig):
    _, script = rig.script()
    result = rig.run(script, FAKE_MKOSI_DIFFER="1")
    assert result.returncode != 0 and result.stdout == ""
    assert "the two mkosi builds differ" in result.stderr and "nothing is published" in result.stderr
    assert not [c for c in rig.calls() if c[0] == "skopeo" and "copy" in c]


def test_an_existing_immutable_tag_is_resolved_to_its_digest_and_nothing_is_built_or_pushed(rig):
    digest, script = rig.script()
    existing = "sha256:" + "7" * 64
    result = rig.run(script, FAKE_SKOPEO_EXISTING=existing)
    assert result.returncode == 0, result.stderr
    entry = mb.parse_step_stdout(result.stdout)
    assert entry["image"] == REPOSITORY and entry["digest"] == existing and entry["digest_kind"] == "manifest"
    assert "an existing immutable tag, resolved to its digest" in entry["source"]
    assert "already exists (tags are immutable)" in result.stderr
    calls = rig.calls()
    assert not [c for c in calls if c[0] == "mkosi" and c[-1] == "build"]
    assert [c[3] for c in calls if c[0] == "skopeo"] == ["inspect"]  # no copy


def test_step_refuses_another_mkosi_version_before_building(rig):
    _, script = rig.script()
    result = rig.run(script, FAKE_MKOSI_VERSION="26")
    assert result.returncode != 0 and result.stdout == ""
    assert "mkosi --version says 'mkosi 26', but this build is pinned to mkosi 25.3" in result.stderr
    assert rig.calls() == [["mkosi", "--version"]]


def test_step_refuses_without_mkosi(rig):
    (rig.bin / "mkosi").unlink()
    _, script = rig.script()
    result = rig.run(script, PATH=f"{rig.bin}:/usr/bin:/bin")
    assert result.returncode != 0 and "mkosi is not installed" in result.stderr and mb.MKOSI_COMMIT in result.stderr


@pytest.mark.parametrize("conf, message", [
    (CONF.replace("SourceDateEpoch=1701475200\n", ""), "no SourceDateEpoch= in [Content]"),
    (CONF.replace("Format=tar", "Format=disk"), "Format=disk; a container image is built from Format=tar"),
    (CONF.replace("Format=tar\n", ""), "no Format= (mkosi builds a disk image by default)"),
])
def test_step_refuses_a_configuration_that_is_not_reproducible(tmp_path, conf, message):
    rig = Rig(tmp_path, conf=conf)
    _, script = rig.script()
    result = rig.run(script)
    assert result.returncode != 0 and result.stdout == ""
    assert message in result.stderr and "nothing is built" in result.stderr
    assert rig.calls() == []


def test_step_refuses_when_the_registry_reports_another_digest(rig):
    _, script = rig.script()
    other = "sha256:" + "e" * 64
    result = rig.run(script, FAKE_SKOPEO_DIGEST=other)
    assert result.returncode != 0 and result.stdout == ""
    assert f"the registry reports {other}" in result.stderr and "no lock entry" in result.stderr


@pytest.mark.parametrize("directory", ["apps/my app's \"conf\" $(touch pwned-dir) `touch pwned-tick`",
                                       "-leading dash/$HOME"])
def test_hostile_paths_and_values_are_inert(tmp_path, directory):
    base = tmp_path / "it's a \"$HOME\" dir $(touch pwned-root)"
    base.mkdir()
    rig = Rig(base, directory=directory)
    env = {"NODE_OPTIONS": "$(touch pwned-env) `touch pwned-env2` ' \" ;", "EMPTY": ""}
    command = ["/bin/sh", "-c", "echo $(touch pwned-cmd); exit 0", "--not-an-option"]
    digest, script = rig.script(env=env, command=command)
    result = rig.run(script)
    assert result.returncode == 0, result.stderr
    assert not list(tmp_path.rglob("pwned*")) and not list(Path.cwd().glob("pwned*"))
    builds = [c for c in rig.calls() if c[0] == "mkosi" and c[-1] == "build"]
    assert builds and all(f"--directory={directory}" in c for c in builds)
    pushed = rig.state / "pushed"
    manifest = json.loads((pushed / "blobs" / "sha256" /
                           json.loads((pushed / "index.json").read_text())["manifests"][0]["digest"][7:]).read_text())
    config = json.loads((pushed / "blobs" / "sha256" / manifest["config"]["digest"][7:]).read_text())
    assert config["config"]["Cmd"] == command
    assert config["config"]["Env"] == ["EMPTY=", "NODE_OPTIONS=" + env["NODE_OPTIONS"]]
    assert json.loads(result.stdout)["source"].startswith(f"images stack mkosi 25.3 build of {directory} ")


@pytest.mark.parametrize("changes", [{}, {"entrypoint": ["/usr/bin/tini", "--"], "ports": ["53/udp", 8080],
                                          "env": {"A": "$(x)", "B": "'"}},
                                     {"workingDir": None, "env": {}, "ports": []}])
def test_step_passes_shellcheck(tmp_path, changes):
    build = mb.MkosiBuild.from_settings(dict(SETTINGS, directory="apps/x y", **changes))
    path = tmp_path / "step.sh"
    path.write_text(mb.step_script(build, key="k", input_hash="a" * 64, repository=REPOSITORY))
    result = subprocess.run([SHELLCHECK, "-s", "bash", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_step_is_marked_for_the_offline_plan():
    build = mb.MkosiBuild.from_settings(SETTINGS)
    script = mb.step_script(build, key="simple-app", input_hash="b" * 64, repository=REPOSITORY)
    assert offline.command_step(script) == "mkosi-build"
    with pytest.raises(mb.MkosiError, match="is not 64 lowercase hex digits"):
        mb.step_script(build, key="k", input_hash="abc", repository=REPOSITORY)
    with pytest.raises(mb.MkosiError, match="is not a registry path"):
        mb.step_script(build, key="k", input_hash="b" * 64, repository=REPOSITORY + "@sha256:" + "0" * 64)


# ---- the step's output and the offline stand-in -----------------------------------------------------------------

def test_offline_stand_in_prints_a_lock_entry_of_the_real_shape():
    build = mb.MkosiBuild.from_settings(SETTINGS)
    script = mb.step_script(build, key="simple-app", input_hash="c" * 64, repository=REPOSITORY)

    def context(name: str) -> offline.Context:
        return offline.Context(project="p", stack="images", type="command:local:Command", name=name,
                               urn=f"urn:pulumi:images::p::command:local:Command::{name}", inputs={"create": script})

    stdout = offline.command_stdout(context("container-simple-app-build"))
    entry = mb.parse_step_stdout(stdout)
    assert entry["image"] == REPOSITORY and entry["digest_kind"] == "manifest"
    assert entry["source"].startswith(mb.source_text(build, "c" * 64) + "; image id sha256:")
    assert offline.command_stdout(context("container-simple-app-build")) == stdout
    assert mb.parse_step_stdout(offline.command_stdout(context("other")))["digest"] != entry["digest"]


def test_parse_step_stdout_refuses_what_is_not_a_lock_entry():
    with pytest.raises(mb.MkosiError, match="printed nothing"):
        mb.parse_step_stdout("\n")
    with pytest.raises(mb.MkosiError, match="is not a lock entry"):
        mb.parse_step_stdout(json.dumps({"image": REPOSITORY, "digest": "sha256:abc", "digest_kind": "manifest",
                                         "source": "x"}))
    with pytest.raises(mb.MkosiError, match="is not a sha256"):
        mb.lock_entry(REPOSITORY, "sha256:" + "A" * 64, "x")


def test_helper_command_lines(tmp_path):
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "fleet.mkosibuild", *args], capture_output=True, text=True,
                              cwd=ROOT)

    (tmp_path / "mkosi.conf").write_text(CONF)
    assert run("check-conf", str(tmp_path)).stdout == f"{EPOCH}\n"
    (tmp_path / "mkosi.conf").write_text(CONF.replace("SourceDateEpoch=1701475200", "SourceDateEpoch=soon"))
    bad = run("check-conf", str(tmp_path))
    assert bad.returncode == 1 and "SourceDateEpoch=soon is not a non-negative integer" in bad.stderr
    layout = tmp_path / "layout.json"
    layout.write_text(json.dumps({"manifest_digest": "sha256:" + "1" * 64, "image_id": "sha256:" + "2" * 64}))
    assert run("read-layout", str(layout)).stdout.split() == ["sha256:" + "1" * 64, "sha256:" + "2" * 64]
    layout.write_text(json.dumps({"manifest_digest": "sha256:1", "image_id": "sha256:" + "2" * 64}))
    assert run("read-layout", str(layout)).returncode == 1
    line = run("lock-line", "--repository", REPOSITORY, "--digest", "sha256:" + "3" * 64, "--source", "s")
    assert json.loads(line.stdout) == {"image": REPOSITORY, "digest": "sha256:" + "3" * 64,
                                       "digest_kind": "manifest", "source": "s"}


# ---- mkosi.conf -----------------------------------------------------------------------------------------------

def conf_dir(tmp_path: Path, conf: str = CONF, drop_ins: dict[str, str] | None = None) -> Path:
    directory = tmp_path / "conf"
    directory.mkdir(parents=True)
    (directory / "mkosi.conf").write_text(conf)
    for name, text in (drop_ins or {}).items():
        (directory / "mkosi.conf.d" / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / "mkosi.conf.d" / name).write_text(text)
    return directory


def test_parse_ini_reads_as_mkosi_does():
    text = "[Output]\nFormat=tar # a comment\n\n[Content]\nPackages=a\n  b\nSourceDateEpoch = 5\n"
    assert list(mb.parse_ini(text)) == [("Output", "Format", "tar"), ("Content", "Packages", "a\nb"),
                                        ("Content", "SourceDateEpoch", "5")]
    with pytest.raises(mb.MkosiError, match="outside of a section"):
        list(mb.parse_ini("Format=tar\n"))


def test_conf_good_and_drop_ins_win(tmp_path):
    assert mb.read_conf(conf_dir(tmp_path)) == (EPOCH, [])
    override = conf_dir(tmp_path / "o", drop_ins={"10-format.conf": "[Output]\nFormat=disk\n",
                                                  "20-epoch.conf": "[Content]\nSourceDateEpoch=\n"})
    _, problems = mb.read_conf(override, label="x")
    assert problems == ["x/mkosi.conf.d/10-format.conf: Format=disk; a container image is built from Format=tar "
                        "in [Output]",
                        "x/mkosi.conf.d/20-epoch.conf: no SourceDateEpoch= in [Content]; without it the build stamps "
                        "the current time into the image and is not reproducible"]
    later = conf_dir(tmp_path / "l", drop_ins={"sub/mkosi.conf": "[Content]\nSourceDateEpoch=7\n"})
    assert mb.read_conf(later) == (7, [])


def test_conf_problems(tmp_path):
    wrong_section = conf_dir(tmp_path / "w", CONF.replace("SourceDateEpoch=1701475200\n", "")
                             .replace("[Output]\n", "[Output]\nSourceDateEpoch=1\n"))
    assert any("SourceDateEpoch= is in [Output]; mkosi 25.3 reads it from [Content]" in p
               for p in mb.read_conf(wrong_section)[1])
    matched = conf_dir(tmp_path / "m", drop_ins={"x.conf": "[Match]\nArchitecture=x86-64\n[Output]\nFormat=tar\n"})
    assert any("sets Format= in a file with [Match]" in p for p in mb.read_conf(matched)[1])
    local = conf_dir(tmp_path / "c")
    (local / "mkosi.local.conf").write_text("[Content]\nSourceDateEpoch=\n")
    assert any("mkosi.local.conf holds machine-local overrides" in p for p in mb.read_conf(local)[1])
    assert mb.read_conf(tmp_path / "nothing", label="apps/none") == (None, ["apps/none has no mkosi.conf"])


# ---- settings -------------------------------------------------------------------------------------------------

def test_validate_accepts_good_settings_and_names_each_bad_one(rig):
    assert mb.validate(rig.settings(), rig.root) == []
    bad = {"directory": "apps/simple-app", "command": [], "workingDir": "opt", "env": {"1X": "a", "OK": 3},
           "ports": [0, "80/sctp", "x", True], "image": "nope"}
    assert mb.validate(bad, rig.root) == [
        ("image", "unknown setting; known: directory, command, entrypoint, workingDir, env, ports"),
        ("command", "must be a non-empty list of strings"),
        ("workingDir", "'opt' is not an absolute path"),
        ("env.1X", "is not an environment variable name"),
        ("env.OK", "must be a string (got int)"),
        ("ports[0]", "exposed port '0' is not PORT or PORT/tcp|udp|sctp with a port from 1 to 65535"),
        ("ports[2]", "exposed port 'x' is not PORT or PORT/tcp|udp|sctp with a port from 1 to 65535"),
        ("ports[3]", "True is not a port"),
    ]
    for directory in ("../elsewhere", "/abs", ""):
        assert [p for p, _ in mb.validate(rig.settings(directory=directory), rig.root)] == ["directory"]
    assert mb.validate(rig.settings(directory="apps/missing"), rig.root) == [
        ("directory", "apps/missing: no such directory in the repository")]
    (rig.root / "apps/simple-app/mkosi.conf").write_text(CONF.replace("Format=tar", "Format=directory"))
    assert mb.validate(rig.settings(), rig.root) == [
        ("directory", "apps/simple-app/mkosi.conf: Format=directory; a container image is built from Format=tar "
                      "in [Output]")]
    with pytest.raises(mb.MkosiError, match="command: is required"):
        mb.MkosiBuild.from_settings({"directory": "x"})


def test_settings_from_a_model_like_object_match_the_mapping():
    class Model:  # what a pydantic model with snake_case fields offers
        directory, command, entrypoint = "apps/simple-app", ["/usr/bin/node", "/opt/app/server.js"], []
        working_dir, env, ports = "/opt/app", {"NODE_ENV": "production"}, [3000]

    assert mb.MkosiBuild.from_settings(Model()) == mb.MkosiBuild.from_settings(SETTINGS)


# ---- input hash -----------------------------------------------------------------------------------------------

def test_input_hash_follows_files_modes_and_settings_only(rig):
    build = mb.MkosiBuild.from_settings(rig.settings())
    base = mb.input_hash(rig.root, "simple-app", build)
    assert mb.input_hash(rig.root, "simple-app", rig.settings()) == base
    reordered = rig.settings(env={"B": "2", "NODE_ENV": "production"}, ports=["3000/tcp", 3000])
    reordered_again = rig.settings(env={"NODE_ENV": "production", "B": "2"}, ports=[3000])
    assert mb.input_hash(rig.root, "simple-app", reordered) == mb.input_hash(rig.root, "simple-app", reordered_again)
    assert mb.input_hash(rig.root, "other-key", build) != base
    assert mb.input_hash(rig.root, "simple-app", rig.settings(command=["/usr/bin/node", "x.js"])) != base
    conf_dir_ = rig.root / rig.directory
    for state in mb.MKOSI_STATE_DIRS:  # what mkosi writes is not an input
        (conf_dir_ / state).mkdir()
        (conf_dir_ / state / "image.tar").write_bytes(b"x")
    assert mb.input_hash(rig.root, "simple-app", build) == base
    (conf_dir_ / "mkosi.build").chmod(0o755)
    executable = mb.input_hash(rig.root, "simple-app", build)
    assert executable != base
    (conf_dir_ / "mkosi.extra" / "etc").mkdir(parents=True)
    empty_dir = mb.input_hash(rig.root, "simple-app", build)
    assert empty_dir != executable
    (conf_dir_ / "mkosi.extra" / "etc" / "localtime").symlink_to("/usr/share/zoneinfo/UTC")
    link = mb.input_hash(rig.root, "simple-app", build)
    (conf_dir_ / "mkosi.extra" / "etc" / "localtime").unlink()
    (conf_dir_ / "mkosi.extra" / "etc" / "localtime").symlink_to("/usr/share/zoneinfo/CET")
    assert mb.input_hash(rig.root, "simple-app", build) not in (link, empty_dir)
    (conf_dir_ / "mkosi.conf").write_text(CONF + "\n")
    assert mb.input_hash(rig.root, "simple-app", build) != base


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is required")
def test_layout_args_round_trip_through_the_command_line(tmp_path):
    """What the step passes to python -m fleet.ocilayout is exactly the settings' image config."""
    build = mb.MkosiBuild.from_settings(dict(SETTINGS, command=["--flag", "-c", "a=b"], entrypoint=["/init"],
                                             env={"X": "--env=Y"}, ports=[3000, "53/udp"]))
    (tmp_path / "rootfs.tar").write_bytes(rootfs_tar())
    result = subprocess.run([sys.executable, "-m", "fleet.ocilayout", "--rootfs-tar", str(tmp_path / "rootfs.tar"),
                             "--out", str(tmp_path / "cli"), "--source-date-epoch", str(EPOCH),
                             *build.layout_args()], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    api = ol.build_layout(tmp_path / "rootfs.tar", tmp_path / "api", settings=build.image_settings(),
                          source_date_epoch=EPOCH)
    assert json.loads(result.stdout) == api.summary()
