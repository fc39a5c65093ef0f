"""``python -m fleet``: argument parsing and exit codes, the real Pulumi CLI (deploy), the benchmark.
The top layer; each subcommand imports what it needs when it runs, so a command pays only for its own."""
