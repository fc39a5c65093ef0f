"""dstack apps as data: image references pinned by digest, docker-compose and app-compose bytes,
app identity, the node configuration disk and the VMM API. Imports ``gcp``, ``config``, ``attest``
and ``images``."""
