"""Service-account identities, derived from names alone.

The bootstrap stack creates them and env stacks use them; both compute the ids and emails with
these functions, so an env stack's offline plan knows every email without reading another stack's
state, and a test proves the bootstrap stack creates exactly what env stacks expect.
"""

from __future__ import annotations

from fleet.gcp.naming import gcp_name, MAX_SERVICE_ACCOUNT_ID

NODE_KINDS = ("overlay", "dstack")


def node_account_id(prefix: str, environment: str, kind: str) -> str:
    if kind not in NODE_KINDS:
        raise ValueError(f"unknown node kind {kind!r}")
    return gcp_name(prefix, environment, kind, max_length=MAX_SERVICE_ACCOUNT_ID)


def email(account_id: str, project: str) -> str:
    return f"{account_id}@{project}.iam.gserviceaccount.com"


def node_account_email(prefix: str, environment: str, kind: str, project: str) -> str:
    """The service account nodes of ``kind`` run as in ``environment`` (created in its project)."""
    return email(node_account_id(prefix, environment, kind), project)
