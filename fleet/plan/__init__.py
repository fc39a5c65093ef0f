"""The offline plan: the program run in-process under Pulumi mocks (the harness and its stand-ins),
rendered as a tree, Markdown or JSON; how changes land, the diff of two revisions, the PR comment.
Imports ``stacks`` and everything below it."""
