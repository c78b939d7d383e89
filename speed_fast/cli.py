"""The `speed-fast` command line: one sub-command per module in `speed_fast.commands`.

Each command module exposes `HELP` (one line), `add_arguments(parser)` and
`run(args) -> int`; modules are imported only when their command runs, so
`speed-fast plan` never pays for DeepSpeed or FFCV imports.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

# command name -> module under speed_fast.commands
COMMANDS = {
    "plan": "plan",
    "env": "env",
    "encode": "encode",
    "write-latents": "write_latents",
    "write-pixels": "write_pixels",
    "sample": "sample",
    "eval": "evaluate",
    "export-dit": "export_dit",
}


def _load(name: str):
    return importlib.import_module(f"speed_fast.commands.{COMMANDS[name]}")


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="speed-fast", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for name in COMMANDS:
        if name == wanted:
            mod = _load(name)
            p = sub.add_parser(name, help=mod.HELP, description=mod.HELP)
            mod.add_arguments(p)
            p.set_defaults(_run=mod.run)
        else:
            # Listed for --help without importing the module.
            sub.add_parser(name, help=f"see `speed-fast {name} --help`")
    return parser


def strip_local_rank(argv: list[str]) -> list[str]:
    """argv without the `--local_rank=N` (or `--local_rank N`) that the deepspeed launcher puts before
    the command: a rank's place comes from the environment (speed_fast.distributed.launcher_env)."""
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        name = argv[i].split("=", 1)[0]
        if name in ("--local_rank", "--local-rank"):
            del argv[i:i + (1 if "=" in argv[i] else 2)]
        else:
            i += 1
    return argv


def main(argv: list[str] | None = None) -> int:
    argv = strip_local_rank(sys.argv[1:] if argv is None else list(argv))
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 2
    from .lockfile import Locked

    try:
        return int(args._run(args) or 0)
    except (ValueError, Locked) as exc:  # invalid user input, or an output in use: a clear message, no traceback
        if getattr(exc, "echo", True):  # a multi-rank job's agreed error is said once, by rank 0
            print(f"speed-fast {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file that cannot be read or written (full disk, permissions): named, one line
        print(f"speed-fast {args.command}: error: {exc.strerror or exc}"
              f"{f': {exc.filename}' if exc.filename else ''}", file=sys.stderr)
        return 2


def console() -> None:
    """The `speed-fast` program (and `python -m speed_fast.cli`): main(), then exit with its status. A
    rank of a multi-rank job leaves through os._exit after flushing, once its process group is gone
    (speed_fast.distributed's module docstring says why)."""
    code = main()
    job = sys.modules.get("speed_fast.distributed")
    if job is not None and job.ended_a_process_group():
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    console()
