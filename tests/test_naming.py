"""Names and labels always satisfy GCP's limits; distinct inputs never collapse onto one name."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from fleet.gcp.naming import (
    BUCKET_RE,
    LABEL_KEY_RE,
    LABEL_VALUE_RE,
    MAX_SERVICE_ACCOUNT_ID,
    NAME_RE,
    Namer,
    gcp_name,
    label_key,
    label_value,
)

parts = st.lists(st.text(min_size=1, max_size=80), min_size=1, max_size=5)


@given(parts)
def test_any_parts_give_a_valid_name(values):
    name = gcp_name(*values)
    assert NAME_RE.match(name) and len(name) <= 63


@given(parts, st.integers(min_value=6, max_value=63))
def test_names_respect_shorter_limits(values, limit):
    assert len(gcp_name(*values, max_length=limit)) <= limit


@given(st.text(max_size=200))
def test_label_values_and_keys_are_valid(value):
    assert LABEL_VALUE_RE.match(label_value(value))
    assert LABEL_KEY_RE.match(label_key(value or "x"))


def test_long_values_are_truncated_with_a_hash_of_the_whole():
    digest_a = "a" * 64
    digest_b = "a" * 63 + "b"
    assert len(label_value(digest_a)) == 63
    assert label_value(digest_a) != label_value(digest_b)
    long_a, long_b = gcp_name("image", digest_a), gcp_name("image", digest_b)
    assert long_a != long_b and len(long_a) == 63


def test_short_names_are_kept_readably():
    assert gcp_name("fleet", "prod", "overlay", "3") == "fleet-prod-overlay-3"
    assert gcp_name("Fleet", "us_central1") == "fleet-us-central1"
    assert gcp_name("3rd") == "n-3rd"


def test_namer_includes_the_stack_in_project_unique_names():
    dev = Namer(prefix="fleet", stack="dev", project="acme-tee")
    prod = Namer(prefix="fleet", stack="prod", project="acme-tee")
    assert dev.name("vpc") != prod.name("vpc")
    assert dev.name("vpc") == "fleet-dev-vpc"
    bucket = dev.bucket("images")
    assert BUCKET_RE.match(bucket) and "acme-tee" in bucket
    account = dev.service_account_id("dstack", "node", "prod")
    assert len(account) <= MAX_SERVICE_ACCOUNT_ID and NAME_RE.match(account)
    assert dev.labels(group="overlay") == {"group": "overlay", "managed_by": "dstack-fleet", "stack": "dev"}
