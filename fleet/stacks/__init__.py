"""A whole stack, where the domains meet: loading a stack file (schema, then each domain's checks),
the expected measurements of its nodes and apps, and what the images stack builds for the env stacks.
Imports every domain package; nothing from ``plan`` or ``cli``."""
