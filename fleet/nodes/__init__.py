"""The confidential nodes of a stack: stable identity (group, ordinal, zone, address), overlay
topology and its init script, the network, each node's spec, the images the nodes boot, and the
configuration checks about them. Imports ``gcp``, ``config``, ``project`` and ``images``."""
