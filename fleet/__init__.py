"""The pure core of dstack-fleet and its offline tools (``python -m fleet ...``).

Modules other than ``fleet.harness``, ``fleet.plan`` and ``fleet.cli`` import nothing from Pulumi:
they decide names, addresses, file bytes, hashes and measurements, and are tested as plain code.
"""
