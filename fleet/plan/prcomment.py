"""``python -m fleet comment``: post the offline plan diffs of a pull request as one comment.

Runs in the trusted ``pr-comment`` workflow with a token that may comment. The artifact it reads
was written by pull-request code (possibly from a fork), so it is data and nothing more:

* only regular files named ``diff-<stack>.md`` are read (no links), at most ``MAX_FILE_BYTES`` each;
* the hidden marker and HTML comment openers are removed, ``@mentions`` and ``#123`` references
  get a zero-width joiner so the comment pings nobody and links no issue;
* the body stays under GitHub's 65,536-character limit (counted in UTF-8 bytes, to be safe), each
  stack's diff truncated with a note.

The pull request is the open one whose head is ``--sha`` (the run's head commit, reported by
GitHub, not by the artifact): for a fork the ``workflow_run`` event lists no pull requests. The
comment to update is the one that starts with the marker *and* was written by ``--author``
(the token's bot user): anyone can write the marker into a comment, and updating theirs would
put the plan under their name, where they could later edit it.

Only the standard library is used. Exit codes: 0 posted (or no open pull request has that head
any more), 1 a GitHub API call failed, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import stat
import sys
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

EXIT_OK, EXIT_API, EXIT_INPUT = 0, 1, 2

DEFAULT_MARKER = "dstack-fleet-plan"
DEFAULT_AUTHOR = "github-actions[bot]"
DEFAULT_API_URL = "https://api.github.com"

GITHUB_BODY_LIMIT = 65_536
BODY_BUDGET = GITHUB_BODY_LIMIT - 536  # headroom below GitHub's limit
MAX_FILE_BYTES = 1 << 20
MAX_FILES = 8
STACK_ORDER = ("dev", "staging", "prod")

DIFF_NAME = re.compile(r"diff-([a-z0-9][a-z0-9-]{0,62})\.md")
SHA = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")
REPO = re.compile(r"[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+")
MARKER_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
ZWJ = "\u200d"
# A mention starts after anything that cannot be part of an e-mail address or a word.
MENTION = re.compile(r"(?<![A-Za-z0-9_.+-])@(?=[A-Za-z0-9])")
# `#12` and `owner/repo#12` link (and notify) an issue; `&#39;` is an HTML entity.
ISSUE_REF = re.compile(r"(?<!&)#(?=[0-9])")
CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
FENCE = re.compile(r"^ {0,3}(```|~~~)", re.MULTILINE)


class InputError(Exception):
    """Bad arguments, environment or artifact: exit 2."""


class ApiError(Exception):
    """A GitHub API call failed: exit 1."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect would carry the token to wherever it points; report it as an error instead."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


def marker_line(name: str) -> str:
    return f"<!-- {name} -->"


# --- the artifact -----------------------------------------------------------------------------


@dataclass
class Section:
    stack: str
    text: str


def read_sections(directory: Path) -> list[Section]:
    """The diffs in the artifact, in deployment order; nothing else is opened."""
    try:
        with os.scandir(directory) as entries:
            wanted = sorted(
                (e for e in entries if DIFF_NAME.fullmatch(e.name) and e.is_file(follow_symlinks=False)),
                key=lambda e: e.name,
            )
    except OSError as exc:
        raise InputError(f"cannot read the artifact directory {directory}: {exc.strerror}") from None
    if not wanted:
        raise InputError(f"no diff-<stack>.md files in {directory}")
    if len(wanted) > MAX_FILES:
        raise InputError(f"{len(wanted)} diff files in {directory}; at most {MAX_FILES} are expected")
    sections = []
    for entry in wanted:
        raw = _read_regular(Path(entry.path), MAX_FILE_BYTES + 1)
        if raw is None:
            continue
        text = raw[:MAX_FILE_BYTES].decode("utf-8", errors="replace")
        if len(raw) > MAX_FILE_BYTES:
            text += "\n\n(the file is larger than 1 MiB; the rest was not read)\n"
        sections.append(Section(DIFF_NAME.fullmatch(entry.name).group(1), text))
    rank = {name: i for i, name in enumerate(STACK_ORDER)}
    return sorted(sections, key=lambda s: (rank.get(s.stack, len(rank)), s.stack))


def _read_regular(path: Path, limit: int) -> bytes | None:
    """At most ``limit`` bytes of a regular file; None for a link, FIFO or device."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            return None
        return handle.read(limit)


def read_hint(directory: Path, sha: str) -> int | None:
    """The pull-request number the artifact claims, used only to choose among pull requests whose
    head is ``sha``. An artifact recorded for another commit is refused."""
    path = directory / "pr.json"
    raw = _read_regular(path, 4097)
    if raw is None:
        return None
    try:
        data = json.loads(raw[:4096].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise InputError(f"{path}: not a small JSON document") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: not a JSON object")
    recorded = data.get("head_sha")
    if isinstance(recorded, str) and recorded.lower() != sha:
        raise InputError(f"the artifact was recorded for commit {recorded[:40]!r}, not {sha}")
    number = data.get("pr_number")
    return number if isinstance(number, int) and not isinstance(number, bool) else None


def sanitize(text: str, marker: str) -> str:
    text = CONTROL.sub("", text)
    text = re.sub(r"<!--\s*" + re.escape(marker) + r"\s*-->", "", text, flags=re.IGNORECASE)
    # An unclosed HTML comment would hide everything after it, truncation notes included.
    text = text.replace("<!--", "&lt;!--")
    text = MENTION.sub("@" + ZWJ, text)
    return ISSUE_REF.sub("#" + ZWJ, text)


def _size(text: str) -> int:
    """UTF-8 bytes: never fewer than the characters (or UTF-16 units) GitHub may be counting."""
    return len(text.encode("utf-8"))


def _truncate(text: str, limit: int) -> str:
    if _size(text) <= limit:
        return text
    note = (
        f"\n\n> **Truncated:** {_size(text) - limit:,} of {_size(text):,} bytes are not shown. "
        "The full diff is in the preview run's job summary and its `pr-plan` artifact.\n"
    )
    cut = text.encode("utf-8")[: max(0, limit - _size(note) - 8)].decode("utf-8", errors="ignore")
    if len(FENCE.findall(cut)) % 2:
        cut += "\n```"
    return cut + note


def render(sections: list[Section], *, sha: str, marker: str, run_url: str | None) -> str:
    """The comment body: marker first, then every stack's diff, each cut to a fair share."""
    source = f"[preview run]({run_url})" if run_url else "the preview workflow"
    header = (
        f"{marker_line(marker)}\n"
        "## Offline plan diff\n\n"
        f"Commit `{sha[:12]}`, from {source}. Computed from the pull request's code without "
        "credentials and posted as data.\n"
    )
    blocks = [(s.stack, sanitize(s.text, marker).strip("\n")) for s in sections]
    headings = {stack: f"\n\n### `{stack}`\n\n" for stack, _ in blocks}
    remaining = BODY_BUDGET - _size(header) - sum(map(_size, headings.values()))
    # Smallest first, so short diffs are shown whole and long ones share what is left.
    allowed: dict[str, int] = {}
    for i, (stack, text) in enumerate(sorted(blocks, key=lambda b: _size(b[1]))):
        allowed[stack] = min(_size(text), remaining // (len(blocks) - i))
        remaining -= allowed[stack]
    return header + "".join(headings[stack] + _truncate(text, allowed[stack]) for stack, text in blocks) + "\n"


# --- the GitHub API ---------------------------------------------------------------------------


class GitHub:
    def __init__(self, api_url: str, token: str, repo: str, timeout: float = 30.0):
        self.api_url = api_url.rstrip("/")
        self.token = token
        self.repo = repo
        self.timeout = timeout
        self._opener = urllib.request.build_opener(_NoRedirects)

    def _call(self, method: str, url: str, body: object = None):
        endpoint = urllib.parse.urlsplit(url).path
        data = None if body is None else json.dumps(body).encode("utf-8")
        request = urllib.request.Request(url, data=data, method=method, headers={
            "Accept": "application/vnd.github+json",
            "Authorization": f"Bearer {self.token}",
            "X-GitHub-Api-Version": "2022-11-28",
            "User-Agent": "dstack-fleet-comment",
            **({"Content-Type": "application/json"} if data is not None else {}),
        })
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                payload = response.read()
                link = response.headers.get("Link", "")
        except urllib.error.HTTPError as exc:
            raise ApiError(f"GitHub API {method} {endpoint}: HTTP {exc.code}{_api_message(exc)}", exc.code) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ApiError(f"GitHub API {method} {endpoint}: cannot connect ({reason})") from None
        try:
            return (json.loads(payload) if payload else None), link
        except ValueError:
            raise ApiError(f"GitHub API {method} {endpoint}: the response is not JSON") from None

    def call(self, method: str, path: str, body: object = None):
        return self._call(method, f"{self.api_url}{path}", body)[0]

    def pages(self, path: str):
        """Every item of a paginated list; ``next`` links are followed on this API host only."""
        url = f"{self.api_url}{path}"
        origin = urllib.parse.urlsplit(self.api_url)[:2]
        while url:
            items, link = self._call("GET", url)
            if not isinstance(items, list):
                raise ApiError(f"GitHub API GET {urllib.parse.urlsplit(url).path}: expected a list")
            yield from items
            url = _next_link(link)
            if url and urllib.parse.urlsplit(url)[:2] != origin:
                raise ApiError(f"GitHub API: refusing to follow a next-page link to another host ({url})")


def _api_message(exc: urllib.error.HTTPError) -> str:
    try:
        message = json.loads(exc.read(4096)).get("message")
    except Exception:  # noqa: BLE001 - the status alone still says what failed
        message = None
    return f" ({message})" if isinstance(message, str) and message else ""


def _next_link(header: str) -> str | None:
    for part in header.split(","):
        match = re.fullmatch(r'\s*<([^>]+)>\s*;\s*rel="?next"?\s*', part)
        if match:
            return match.group(1)
    return None


def _is_candidate(pull: object, repo: str, sha: str) -> bool:
    if not isinstance(pull, dict):
        return False
    head = pull.get("head") or {}
    base_repo = (pull.get("base") or {}).get("repo") or {}
    return (
        pull.get("state") == "open"
        and str(head.get("sha", "")).lower() == sha
        and str(base_repo.get("full_name", "")).lower() == repo.lower()
        and isinstance(pull.get("number"), int)
    )


def find_pull(api: GitHub, sha: str, hint: int | None) -> int | None:
    """The number of the open pull request of this repository whose head is ``sha``."""
    try:
        found = [p for p in api.pages(f"/repos/{api.repo}/commits/{sha}/pulls?per_page=100")
                 if _is_candidate(p, api.repo, sha)]
    except ApiError as exc:
        # A fork's commit may be unknown to this endpoint (422/404); the list below still has it.
        if exc.status not in (404, 422):
            raise
        found = []
    if not found:
        found = [p for p in api.pages(f"/repos/{api.repo}/pulls?state=open&per_page=100")
                 if _is_candidate(p, api.repo, sha)]
    numbers = sorted({p["number"] for p in found})
    if hint in numbers:
        return hint
    if len(numbers) > 1:
        raise InputError(
            f"open pull requests {', '.join(f'#{n}' for n in numbers)} all have head {sha}; "
            "the artifact names none of them"
        )
    return numbers[0] if numbers else None


def upsert_comment(api: GitHub, number: int, body: str, marker: str, author: str) -> tuple[str, object]:
    """Update our earlier comment on the pull request, or create the first one."""
    prefix = marker_line(marker)
    ours = [
        c for c in api.pages(f"/repos/{api.repo}/issues/{number}/comments?per_page=100")
        if isinstance(c, dict)
        and str(c.get("body") or "").startswith(prefix)
        and ((c.get("user") or {}).get("login")) == author
    ]
    if ours:
        comment = api.call("PATCH", f"/repos/{api.repo}/issues/comments/{ours[0]['id']}", {"body": body})
        return "updated", comment
    comment = api.call("POST", f"/repos/{api.repo}/issues/{number}/comments", {"body": body})
    return "created", comment or {}


# --- command line -----------------------------------------------------------------------------


def _configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--dir", required=True, type=Path, help="the downloaded pr-plan artifact")
    parser.add_argument("--repo", required=True, help="OWNER/NAME of the repository")
    parser.add_argument("--sha", required=True, help="head commit of the preview run")
    parser.add_argument("--marker", default=DEFAULT_MARKER,
                        help=f"name in the hidden <!-- NAME --> comment marker (default {DEFAULT_MARKER})")
    parser.add_argument("--author", default=DEFAULT_AUTHOR,
                        help=f"login the token comments as (default {DEFAULT_AUTHOR})")
    parser.add_argument("--run-url", help="link to the preview run, shown in the comment")
    parser.set_defaults(func=cmd_comment)
    return parser


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``comment`` on the ``python -m fleet`` command line."""
    return _configure(subparsers.add_parser(
        "comment",
        help="post or update the pull request's plan-diff comment (GITHUB_TOKEN, GITHUB_API_URL)",
        description=__doc__.split("\n\n")[0],
    ))


def _validate(args: argparse.Namespace) -> tuple[str, str, str]:
    token = os.environ.get("GITHUB_TOKEN", "").strip()
    if not token:
        raise InputError("GITHUB_TOKEN is not set")
    api_url = os.environ.get("GITHUB_API_URL", "").strip() or DEFAULT_API_URL
    if urllib.parse.urlsplit(api_url).scheme not in ("https", "http"):
        raise InputError(f"GITHUB_API_URL must be an http(s) URL, got {api_url!r}")
    sha = args.sha.strip().lower()
    if not SHA.fullmatch(sha):
        raise InputError(f"--sha must be a full commit hash, got {args.sha!r}")
    if not REPO.fullmatch(args.repo):
        raise InputError(f"--repo must be OWNER/NAME, got {args.repo!r}")
    if not MARKER_NAME.fullmatch(args.marker):
        raise InputError(f"--marker must match {MARKER_NAME.pattern}, got {args.marker!r}")
    if args.run_url and urllib.parse.urlsplit(args.run_url).scheme != "https":
        raise InputError(f"--run-url must be an https URL, got {args.run_url!r}")
    return token, api_url, sha


def cmd_comment(args: argparse.Namespace) -> int:
    try:
        token, api_url, sha = _validate(args)
        sections = read_sections(args.dir)
        hint = read_hint(args.dir, sha)
        body = render(sections, sha=sha, marker=args.marker, run_url=args.run_url)
        api = GitHub(api_url, token, args.repo)
        number = find_pull(api, sha, hint)
        if number is None:
            print(f"no open pull request in {args.repo} has head {sha}; nothing to comment on")
            return EXIT_OK
        action, comment = upsert_comment(api, number, body, args.marker, args.author)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    except ApiError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_API
    url = comment.get("html_url") if isinstance(comment, dict) else None
    print(f"{action} the plan comment on #{number}: {url or '(no url returned)'}")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    parser = _configure(argparse.ArgumentParser(prog="python -m fleet comment", description=__doc__))
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse has printed the usage line
        return exc.code if isinstance(exc.code, int) else EXIT_INPUT
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
