"""The grammar of free-text values (fleet.config.grammar), checked against the tools that consume them
where they are installed here (git), and against the rules they were taken from."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from hypothesis import given, settings, strategies as st

from fleet.config import grammar

# ---- subnets: GCP's valid and invalid IPv4 ranges (cloud.google.com/vpc/docs/subnets) -------------


@pytest.mark.parametrize("cidr", ["10.30.0.0/20", "172.16.0.0/12", "192.168.10.0/24", "100.64.0.0/20",
                                  "198.18.0.0/15", "192.0.2.0/24", "240.0.0.0/20"])
def test_gcp_accepts_these_subnets(cidr):
    assert grammar.subnet_problem(cidr) is None


@pytest.mark.parametrize("cidr, reason", [
    ("127.0.0.0/20", "loopback"), ("169.254.0.0/20", "link-local"), ("0.0.0.0/20", "current network"),
    ("224.0.0.0/20", "multicast"), ("8.8.8.0/24", "not a private range"), ("10.0.0.0/30", "too small"),
    ("10.0.0.1/20", "not an IPv4 CIDR block"), ("100.128.0.0/20", "not a private range"),
])
def test_subnets_gcp_refuses_are_refused_with_the_reason(cidr, reason):
    assert reason in grammar.subnet_problem(cidr)


# ---- git branch names -------------------------------------------------------------------------------

GIT = shutil.which("git")


def git_accepts_branch(name: str, cwd) -> bool:
    result = subprocess.run([GIT, "check-ref-format", "--branch", name], cwd=cwd, capture_output=True)
    return result.returncode == 0


@pytest.mark.skipif(GIT is None, reason="git is not installed")
@settings(max_examples=150, deadline=None, derandomize=True)
@given(st.lists(st.sampled_from(list("ab/._-@{}~^:?*[\\ '\")|&!\t") + ["..", ".lock", "HEAD", "a/b", "\x7f"]),
                min_size=1, max_size=8).map("".join))
def test_branch_rules_agree_with_git_check_ref_format(tmp_path_factory, name):
    cwd = tmp_path_factory.getbasetemp()  # outside any repository: git takes the name literally
    assert (grammar.git_branch_problem(name) is None) == git_accepts_branch(name, cwd), name


@pytest.mark.parametrize("name", ["x'])||true||('", "a'||'b", "main\"", "feat(x)", "a|b", "a&&b", "x!y"])
def test_legal_but_hostile_branch_names_never_reach_the_condition(name):
    assert grammar.git_branch_problem(name) is None  # git takes them...
    assert "reaches the Workload Identity condition" in grammar.ci_branch_problem(name)  # ...we do not


@pytest.mark.parametrize("name", ["main", "release/1.2", "feature_x", "v1.0-rc.1"])
def test_ordinary_branch_names_pass(name):
    assert grammar.ci_branch_problem(name) is None


@pytest.mark.parametrize("name, ok", [("prod", True), ("Prod-EU_1.x", True), ("", False), ("a" * 256, False),
                                      ("pr'od", False), ("prod' || true || '", False), ("a/b", False)])
def test_github_environment_names(name, ok):
    assert (grammar.github_environment_problem(name) is None) is ok


# ---- URLs -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("url", ["https://kms.prod.acme.internal:8000", "https://vmm:9080/prpc", "http://127.0.0.1:9080",
                                 "https://ethereum-rpc.publicnode.com", "https://[::1]:8000/info?json=1"])
def test_plain_urls_pass(url):
    assert grammar.url_problem(url) is None


@pytest.mark.parametrize("url, reason", [
    ("https://user:pass@vmm.example.com:9080", "carries credentials"),
    ("https://mainnet.infura.io/v3/9aa3d95b3bc440fa88ea12eaa4456161", "looks like an API key"),
    ("https://kms.example.com?token=abc", "'token' looks like a credential"),
    ("https://kms.example.com/x?api_key=abc", "'api_key' looks like a credential"),
    ("not a url", "is not a URL"), ("ftp://x.example.com", "scheme"), ("https://-h", "not a host name"),
    ("https://h.example.com/#frag", "#fragment"), ("https://h.example.com:99999", "is not a URL"),
])
def test_urls_with_credentials_or_nonsense_are_refused(url, reason):
    assert reason in grammar.url_problem(url)


@pytest.mark.parametrize("url", ["ftp://admin:hunter2@h.example.com", "https://admin:hunter2@-bad-", "x://a:hunter2@b c"])
def test_a_refused_url_with_credentials_is_never_repeated(url):
    assert "hunter2" not in grammar.url_problem(url)


def test_prod_requires_https():
    assert grammar.url_problem("http://vmm.example.com:9080") is None
    assert "prod requires https" in grammar.url_problem("http://vmm.example.com:9080", prod=True)


# ---- docker compose ---------------------------------------------------------------------------------

@pytest.mark.parametrize("port, ok", [("3000:3000", True), ("127.0.0.1:8080:80", True), ("53:53/udp", True),
                                      ("8000-8005:8000-8005", True), ("[::1]:80:80", True), ("0:80", False),
                                      ("-h", False), ("80:80/quic", False), ("a:80", False), ("999.1.1.1:80:80", False)])
def test_compose_ports(port, ok):
    assert (grammar.compose_port_problem(port) is None) is ok


@pytest.mark.parametrize("volume, ok", [("data:/var/lib/app", True), ("/var/run/dstack.sock:/var/run/dstack.sock:ro", True),
                                        ("/cache", True), ("./conf:/etc/app:ro,z", True), ("data:relative", False),
                                        ("data:/x:sometimes", False), ("$(id):/x", False), ("a:b:c:d", False)])
def test_compose_volumes(volume, ok):
    assert (grammar.compose_volume_problem(volume) is None) is ok


@pytest.mark.parametrize("path, ok", [("apps/hello", True), ("./apps", True), ("../../etc", False), ("/etc", False),
                                      ("apps/../..", False), ("-h", False), ("a\\b", False), ("x" * 300, False)])
def test_repository_paths(path, ok):
    assert (grammar.repo_path_problem(path) is None) is ok
