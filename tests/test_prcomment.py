"""``python -m fleet comment`` against a fake GitHub API on 127.0.0.1 that records every request."""

from __future__ import annotations

import json
import os
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from fleet.plan import prcomment

REPO = "acme/dstack-fleet"
SHA = "a" * 40
OTHER_SHA = "b" * 40
BOT = "github-actions[bot]"
MARKER = "<!-- dstack-fleet-plan -->"


class FakeGitHub:
    """Just enough of the REST API: pull requests by commit, open pull requests, issue comments."""

    def __init__(self, page_size: int = 2):
        self.page_size = page_size
        self.pulls: list[dict] = []
        self.commit_pulls: dict[str, list[int]] = {}  # sha -> numbers the commit endpoint returns
        self.comments: dict[int, list[dict]] = {}
        self.requests: list[dict] = []
        self.fail: dict[tuple[str, str], int] = {}  # (method, path regex) -> status
        self.next_id = 1000
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                fake.requests.append({
                    "method": self.command, "path": self.path,
                    "auth": self.headers.get("Authorization"),
                    "body": json.loads(raw) if raw else None,
                })
                status, payload, link = fake.route(self.command, self.path, json.loads(raw) if raw else None)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if link:
                    self.send_header("Link", link)
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PATCH = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    # --- state helpers
    def add_pull(self, number: int, head_sha: str, *, state: str = "open", base_repo: str = REPO,
                 listed_by_commit: bool = True) -> None:
        self.pulls.append({"number": number, "state": state, "head": {"sha": head_sha},
                           "base": {"repo": {"full_name": base_repo}}})
        if listed_by_commit:
            self.commit_pulls.setdefault(head_sha, []).append(number)

    def add_comment(self, number: int, login: str, body: str) -> dict:
        self.next_id += 1
        comment = {"id": self.next_id, "user": {"login": login}, "body": body,
                   "html_url": f"https://github.test/{REPO}/pull/{number}#issuecomment-{self.next_id}"}
        self.comments.setdefault(number, []).append(comment)
        return comment

    def calls(self, method: str, pattern: str = "") -> list[dict]:
        return [r for r in self.requests if r["method"] == method and re.search(pattern, r["path"])]

    # --- routing
    def _page(self, path: str, items: list) -> tuple[int, list, str | None]:
        query = parse_qs(urlsplit(path).query)
        page = int(query.get("page", ["1"])[0])
        start = (page - 1) * self.page_size
        link = None
        if start + self.page_size < len(items):
            base = urlsplit(path).path
            link = f'<{self.url}{base}?per_page=100&page={page + 1}>; rel="next", <{self.url}{base}?page=99>; rel="last"'
        return 200, items[start:start + self.page_size], link

    def route(self, method: str, path: str, body):
        route = urlsplit(path).path
        for (fail_method, pattern), status in self.fail.items():
            if fail_method == method and re.search(pattern, route):
                return status, {"message": "Server Error" if status >= 500 else "Validation Failed"}, None
        prefix = f"/repos/{REPO}"
        if method == "GET" and (m := re.fullmatch(prefix + r"/commits/([0-9a-f]+)/pulls", route)):
            numbers = self.commit_pulls.get(m.group(1), [])
            return self._page(path, [p for p in self.pulls if p["number"] in numbers])
        if method == "GET" and route == prefix + "/pulls":
            return self._page(path, [p for p in self.pulls if p["state"] == "open"])
        if method == "GET" and (m := re.fullmatch(prefix + r"/issues/(\d+)/comments", route)):
            return self._page(path, self.comments.get(int(m.group(1)), []))
        if method == "POST" and (m := re.fullmatch(prefix + r"/issues/(\d+)/comments", route)):
            return 201, self.add_comment(int(m.group(1)), BOT, body["body"]), None
        if method == "PATCH" and (m := re.fullmatch(prefix + r"/issues/comments/(\d+)", route)):
            for comments in self.comments.values():
                for comment in comments:
                    if comment["id"] == int(m.group(1)):
                        comment["body"] = body["body"]
                        return 200, comment, None
        return 404, {"message": "Not Found"}, None


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    """urllib honours *_proxy variables; the fake API is reached directly."""
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(name, "127.0.0.1")


@pytest.fixture
def github(monkeypatch):
    fake = FakeGitHub()
    fake.thread.start()
    monkeypatch.setenv("GITHUB_API_URL", fake.url)
    monkeypatch.setenv("GITHUB_TOKEN", "test-token")
    yield fake
    fake.server.shutdown()
    fake.server.server_close()


def artifact(tmp_path: Path, diffs: dict[str, str], pr: dict | None = None) -> Path:
    directory = tmp_path / "pr-plan"
    directory.mkdir(exist_ok=True)
    for stack, text in diffs.items():
        (directory / f"diff-{stack}.md").write_text(text, encoding="utf-8")
    if pr is not None:
        (directory / "pr.json").write_text(json.dumps(pr), encoding="utf-8")
    return directory


def comment(directory: Path, sha: str = SHA, *extra: str) -> int:
    return prcomment.main(["--dir", str(directory), "--repo", REPO, "--sha", sha, *extra])


DIFFS = {"dev": "## dev\n\n+ 2 nodes\n", "staging": "## staging\n\nno changes\n", "prod": "## prod\n\nno changes\n"}


def test_first_run_creates_one_comment_starting_with_the_marker(github, tmp_path):
    github.add_pull(7, SHA)
    assert comment(artifact(tmp_path, DIFFS), SHA, "--run-url", "https://github.test/run/1") == 0
    posts = github.calls("POST")
    assert len(posts) == 1 and posts[0]["path"] == f"/repos/{REPO}/issues/7/comments"
    assert posts[0]["auth"] == "Bearer test-token"
    body = posts[0]["body"]["body"]
    assert body.startswith(MARKER + "\n") and body.count(MARKER) == 1
    assert body.index("+ 2 nodes") < body.index("## staging") < body.index("## prod")  # deployment order
    assert "https://github.test/run/1" in body and SHA[:12] in body
    assert not github.calls("PATCH")


def test_second_run_updates_the_same_comment(github, tmp_path):
    github.add_pull(7, SHA)
    github.add_comment(7, "alice", "looks good")
    assert comment(artifact(tmp_path, DIFFS)) == 0
    created_id = github.comments[7][-1]["id"]
    assert comment(artifact(tmp_path, {**DIFFS, "dev": "## dev\n\n+ 3 nodes\n"})) == 0
    assert len(github.calls("POST")) == 1
    patches = github.calls("PATCH")
    assert [p["path"] for p in patches] == [f"/repos/{REPO}/issues/comments/{created_id}"]
    bot_comments = [c for c in github.comments[7] if c["user"]["login"] == BOT]
    assert len(bot_comments) == 1 and "+ 3 nodes" in bot_comments[0]["body"]
    assert github.comments[7][0]["body"] == "looks good"


def test_finds_our_comment_beyond_the_first_page(github, tmp_path):
    github.add_pull(7, SHA)
    for i in range(5):
        github.add_comment(7, "alice", f"comment {i}")
    ours = github.add_comment(7, BOT, MARKER + "\nold plan")
    assert comment(artifact(tmp_path, DIFFS)) == 0
    assert [p["path"] for p in github.calls("PATCH")] == [f"/repos/{REPO}/issues/comments/{ours['id']}"]
    assert not github.calls("POST")
    assert len(github.calls("GET", r"/issues/7/comments")) == 3  # pages of 2 followed by Link


def test_fork_pull_request_is_found_by_head_sha_alone(github, tmp_path):
    """A fork's commit: the commit endpoint knows no pull request and the event listed none."""
    github.add_pull(3, OTHER_SHA)
    github.add_pull(4, "c" * 40)
    github.add_pull(9, SHA, listed_by_commit=False)
    assert comment(artifact(tmp_path, DIFFS)) == 0
    assert [p["path"] for p in github.calls("POST")] == [f"/repos/{REPO}/issues/9/comments"]
    assert github.calls("GET", r"/commits/" + SHA + "/pulls")


def test_fork_commit_unknown_to_the_commit_endpoint(github, tmp_path):
    github.fail[("GET", r"/commits/")] = 422
    github.add_pull(9, SHA, listed_by_commit=False)
    assert comment(artifact(tmp_path, DIFFS)) == 0
    assert [p["path"] for p in github.calls("POST")] == [f"/repos/{REPO}/issues/9/comments"]


def test_a_pull_request_whose_head_moved_on_gets_no_comment(github, tmp_path, capsys):
    github.add_pull(7, OTHER_SHA)
    github.commit_pulls[SHA] = [7]  # the endpoint still associates the old commit
    assert comment(artifact(tmp_path, DIFFS)) == 0
    assert not github.calls("POST") and not github.calls("PATCH")
    assert "no open pull request" in capsys.readouterr().out


def test_closed_or_foreign_pull_requests_are_ignored(github, tmp_path):
    github.add_pull(5, SHA, state="closed")
    github.add_pull(6, SHA, base_repo="mallory/dstack-fleet")
    assert comment(artifact(tmp_path, DIFFS)) == 0
    assert not github.calls("POST")


def test_marker_in_the_artifact_cannot_hijack_another_comment(github, tmp_path):
    github.add_pull(7, SHA)
    planted = github.add_comment(7, "mallory", MARKER + "\nplan: no changes")
    hostile = f"{MARKER}\n## dev\n<!-- DSTACK-FLEET-PLAN -->\n<!--\nhidden\n"
    directory = artifact(tmp_path, {"dev": hostile})
    assert comment(directory) == 0
    assert comment(directory) == 0
    assert len(github.calls("POST")) == 1
    ours = github.comments[7][-1]
    assert ours["user"]["login"] == BOT
    assert [p["path"] for p in github.calls("PATCH")] == [f"/repos/{REPO}/issues/comments/{ours['id']}"]
    assert planted["body"] == MARKER + "\nplan: no changes"
    assert ours["body"].lower().count("dstack-fleet-plan") == 1
    assert "<!--\nhidden" not in ours["body"]  # an open HTML comment would hide the rest


def test_mentions_and_issue_references_are_neutralised(github, tmp_path):
    github.add_pull(7, SHA)
    text = "cc @octocat and @acme/security, see #12 and other/repo#3; sa: fleet@proj.iam.gserviceaccount.com &#39;"
    assert comment(artifact(tmp_path, {"dev": text})) == 0
    body = github.calls("POST")[0]["body"]["body"]
    assert not re.search(r"(?<![\w.+-])@[A-Za-z0-9]", body)
    assert not re.search(r"#[0-9]", body.replace("&#39;", ""))
    assert "fleet@proj.iam.gserviceaccount.com" in body and "&#39;" in body
    assert "@\u200doctocat" in body


def test_oversize_diffs_are_truncated_with_a_note(github, tmp_path):
    github.add_pull(7, SHA)
    huge = "```diff\n" + "".join(f"+ resource {i} " + "x" * 60 + "\n" for i in range(4000)) + "```\n"
    directory = artifact(tmp_path, {"dev": "## dev\n\nsmall\n", "prod": huge})
    # beyond the per-file read cap, and multi-byte: the limit must hold however GitHub counts
    (directory / "diff-staging.md").write_text("\u00e9\U0001f600 @x\n" * 300_000, encoding="utf-8")
    assert comment(directory) == 0
    body = github.calls("POST")[0]["body"]["body"]
    assert len(body.encode("utf-8")) < 65_536 and len(body.encode("utf-16-le")) // 2 < 65_536
    assert "\ufffd" not in body  # cut on a character boundary
    assert "## dev\n\nsmall" in body  # the small diff is shown whole
    assert body.count("**Truncated:**") == 2
    prod = body[body.index("### `prod`"):]
    assert len(re.findall(r"^```", prod, re.MULTILINE)) % 2 == 0  # the cut code block is closed


def test_only_expected_regular_files_are_read(github, tmp_path):
    github.add_pull(7, SHA)
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET")
    directory = artifact(tmp_path, {"dev": "dev diff"})
    (directory / "diff-link.md").symlink_to(secret)
    (directory / "notes.md").write_text("NOT-A-DIFF")
    (directory / "diff-Prod.md").write_text("ODD-NAME")
    (directory / "diff-dev.md.sh").write_text("ODD-NAME")
    os.mkfifo(directory / "diff-fifo.md")
    assert comment(directory) == 0
    body = github.calls("POST")[0]["body"]["body"]
    assert "dev diff" in body
    for unwanted in ("TOP-SECRET", "NOT-A-DIFF", "ODD-NAME"):
        assert unwanted not in body


def test_artifact_recorded_for_another_commit_is_refused(github, tmp_path, capsys):
    github.add_pull(7, SHA)
    assert comment(artifact(tmp_path, DIFFS, {"head_sha": OTHER_SHA, "pr_number": 7})) == 2
    assert "recorded for commit" in capsys.readouterr().err
    assert github.requests == []


def test_pr_number_in_the_artifact_only_chooses_among_matching_heads(github, tmp_path, capsys):
    github.add_pull(7, SHA)
    github.add_pull(8, SHA)
    assert comment(artifact(tmp_path, DIFFS, {"head_sha": SHA, "pr_number": 8})) == 0
    assert [p["path"] for p in github.calls("POST")] == [f"/repos/{REPO}/issues/8/comments"]
    # A number whose head is another commit is not taken; two candidates are then ambiguous.
    assert comment(artifact(tmp_path, DIFFS, {"head_sha": SHA, "pr_number": 3})) == 2
    assert "#7, #8" in capsys.readouterr().err


def test_api_error_is_one_clear_line_and_exit_1(github, tmp_path, capsys):
    github.add_pull(7, SHA)
    github.fail[("GET", r"/issues/7/comments")] = 502
    assert comment(artifact(tmp_path, DIFFS)) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        f"error: GitHub API GET /repos/{REPO}/issues/7/comments: HTTP 502 (Server Error)"
    ]
    assert "Traceback" not in err
    assert not github.calls("POST")


def test_unreachable_api_is_exit_1(monkeypatch, tmp_path, capsys):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("GITHUB_API_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("GITHUB_TOKEN", "test-token")
    assert comment(artifact(tmp_path, DIFFS)) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: GitHub API GET /repos/{REPO}/commits/{SHA}/pulls: cannot connect")
    assert "Traceback" not in err


def test_missing_token_is_exit_2_without_any_request(github, monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("GITHUB_TOKEN")
    assert comment(artifact(tmp_path, DIFFS)) == 2
    assert capsys.readouterr().err.strip() == "error: GITHUB_TOKEN is not set"
    assert github.requests == []


@pytest.mark.parametrize("argv, message", [
    (["--sha", "abc"], "--sha must be a full commit hash"),
    (["--repo", "not a repo"], "--repo must be OWNER/NAME"),
    (["--marker", "x -->"], "--marker must match"),
    (["--dir", "/nonexistent/pr-plan"], "cannot read the artifact directory"),
])
def test_bad_input_is_exit_2(github, tmp_path, capsys, argv, message):
    args = {"--dir": str(artifact(tmp_path, DIFFS)), "--repo": REPO, "--sha": SHA}
    args.update(dict(zip(argv[::2], argv[1::2])))
    assert prcomment.main([x for kv in args.items() for x in kv]) == 2
    assert message in capsys.readouterr().err
    assert github.requests == []


def test_empty_artifact_is_exit_2(github, tmp_path, capsys):
    assert comment(artifact(tmp_path, {})) == 2
    assert "no diff-<stack>.md files" in capsys.readouterr().err


def test_add_parser_registers_the_comment_subcommand(tmp_path):
    import argparse

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    prcomment.add_parser(sub)
    args = parser.parse_args(["comment", "--dir", str(tmp_path), "--repo", REPO, "--sha", SHA])
    assert args.func is prcomment.cmd_comment
    assert args.marker == "dstack-fleet-plan" and args.author == BOT


# --- the poster as the workflow runs it: a bare Python, nothing installed -------------------------

VECTOR = Path(__file__).parent / "vectors" / "pr-plan"
RECORDED_SHA = "c" * 40


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory) -> Path:
    """A fresh virtual environment with nothing installed in it (no pip, no project requirements)."""
    import subprocess
    import sys

    venv = tmp_path_factory.mktemp("bare") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    probe = subprocess.run([str(python), "-c", "import pydantic"], capture_output=True, text=True, check=False)
    assert probe.returncode != 0, "the fresh environment must not see the project's requirements"
    return python


def test_the_poster_runs_on_a_bare_python_and_posts_the_recorded_comment(github, bare_python):
    import subprocess
    import sys

    github.add_pull(42, RECORDED_SHA)
    root = Path(__file__).resolve().parent.parent
    env = {"PATH": os.environ.get("PATH", ""), "GITHUB_TOKEN": "test-token", "GITHUB_API_URL": github.url,
           "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}
    # as pr-comment.yml runs it, from the checkout's root; -X importtime lists every module loaded
    result = subprocess.run(
        [str(bare_python), "-X", "importtime", "-m", "fleet", "comment", "--dir", str(VECTOR), "--repo", REPO,
         "--sha", RECORDED_SHA, "--run-url", "https://github.test/acme/dstack-fleet/actions/runs/1"],
        cwd=root, env=env, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("created the plan comment on #42")
    (post,) = github.calls("POST")
    assert post["path"] == f"/repos/{REPO}/issues/42/comments"
    assert post["body"]["body"] == (VECTOR / "comment.md").read_text(encoding="utf-8")

    def loaded(stderr: str) -> set[str]:
        return {line.split("|")[-1].strip().split(".")[0] for line in stderr.splitlines()
                if line.startswith("import time:") and not line.rstrip().endswith("package")}

    # what this interpreter loads for any program (a distribution's sitecustomize, say) is not the poster's
    startup = loaded(subprocess.run([str(bare_python), "-X", "importtime", "-c", "pass"], cwd=root, env=env,
                                    capture_output=True, text=True, check=True).stderr)
    foreign = sorted(m for m in loaded(result.stderr) - startup if m not in sys.stdlib_module_names
                     # the standard library's copy module probes Jython's org.python.core and fails
                     and m not in ("fleet", "org"))
    assert foreign == [], f"the poster loaded modules outside the standard library: {foreign}"
    assert "fleet" in loaded(result.stderr)
