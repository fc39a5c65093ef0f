"""A stack file as typed configuration: the pydantic schema, reading ``stacks/Pulumi.<stack>.yaml``
as the CLI does, and turning mistakes into one-line problems. Imports only ``fleet.gcp``; checks that
need a domain (nodes, images, apps) live in that domain and run after parsing (``fleet.stacks.load``)."""
