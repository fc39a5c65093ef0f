"""Everything that makes an image: pinned recipes and their input hash, generated build scripts,
reproducible mkosi containers and OCI layouts, the lock file and the GCP image versions resolved from it.
Imports ``fleet.gcp``, ``fleet.config`` and ``fleet.project``."""
