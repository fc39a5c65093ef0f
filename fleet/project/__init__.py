"""The project plumbing every environment relies on, as data: enabled APIs, KMS keys, CI federation,
service-account identities and their grants. Imports ``fleet.gcp`` and ``fleet.config``."""
