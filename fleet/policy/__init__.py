"""Policy rules as pure functions over a normalized view of resources, with an offline adapter (the
plan) and a CrossGuard adapter (``policies/``). Imports ``gcp``, ``config`` and ``apps`` (image
references); never ``components``."""
