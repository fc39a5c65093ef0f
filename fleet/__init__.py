"""The pure core of dstack-fleet and its offline tools (``python -m fleet ...``), in packages by concern.

Layers, lowest first; a package imports only from the packages above it in this list (and the
standard library, pydantic, yaml), never from one below it (``tests/test_architecture.py``):

``gcp`` → ``config`` → ``attest``, ``project`` → ``images`` → ``nodes``, ``apps`` → ``policy``,
``stacks`` → ``plan`` → ``cli``.

Only ``fleet.plan`` (its harness), ``fleet.policy`` (its CrossGuard adapter) and ``fleet.cli`` touch
Pulumi; everything else decides names, addresses, file bytes, hashes and measurements as plain code.
See ARCHITECTURE.md.
"""
