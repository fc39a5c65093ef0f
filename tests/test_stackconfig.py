"""The program reads every config key from the runtime, however the CLI delivers it."""

from __future__ import annotations

import json

import pulumi
import pytest
from pulumi.runtime import config as runtime_config

from components import stackconfig


@pytest.fixture(autouse=True)
def clean_config(monkeypatch):
    monkeypatch.delenv("PULUMI_CONFIG", raising=False)
    monkeypatch.delenv("PULUMI_CONFIG_SECRET_KEYS", raising=False)
    pulumi.runtime.set_all_config({}, [])
    yield
    pulumi.runtime.set_all_config({}, [])


def test_reads_the_language_host_environment(monkeypatch):
    """`pulumi up` hands config to Python programs as PULUMI_CONFIG (JSON) and the secret key list."""
    monkeypatch.setenv("PULUMI_CONFIG", json.dumps({"dstack-fleet:nodez": "[]", "gcp:project": "p-123456"}))
    monkeypatch.setenv("PULUMI_CONFIG_SECRET_KEYS", json.dumps(["dstack-fleet:secrets"]))
    values, secrets = stackconfig.runtime_values()
    assert values == {"dstack-fleet:nodez": "[]", "gcp:project": "p-123456"}
    assert secrets == {"dstack-fleet:secrets"}


def test_reads_the_in_process_map():
    pulumi.runtime.set_all_config({"dstack-fleet:role": "env"}, ["dstack-fleet:secrets"])
    values, secrets = stackconfig.runtime_values()
    assert values == {"dstack-fleet:role": "env"}
    assert "dstack-fleet:secrets" in secrets


def test_internal_names_still_exist():
    """Pins the SDK internals this module relies on; an SDK upgrade that moves them fails here."""
    assert hasattr(runtime_config, "CONFIG") and hasattr(runtime_config, "_SECRET_KEYS")
    assert callable(runtime_config.get_config_env) and callable(runtime_config.get_config_secret_keys_env)
