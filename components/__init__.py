"""Thin Pulumi ComponentResources: each turns a decision of the core (``fleet``) into resources."""
