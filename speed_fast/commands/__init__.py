"""Sub-commands of the `speed-fast` CLI (see speed_fast/cli.py)."""
