"""Every flag of every `speed-fast` sub-command reaches the command untouched through the launchers'
own parsers: torchrun (`torch.distributed.run`), and deepspeed's runner and its per-node launcher
(`deepspeed.launcher.runner`, `deepspeed.launcher.launch`). They read options after the script name
by prefix, so a program flag that is a prefix of one of theirs (`--n` of `--nnodes`) stops the
launch with "ambiguous option"."""

import sys

import pytest

from speed_fast.cli import COMMANDS, build_parser

SCRIPT = "/venv/bin/speed-fast"

# (command, option) -> why it may stop a launcher: aliases kept for one process only, and flags of
# commands that no launcher runs.
KNOWN_EXCEPTIONS = {
    ("sample", "--n"): "the old name of --num-samples, kept as an alias for one process",
    ("eval", "--n"): "the old name of --num-samples, kept as an alias for one process",
    ("plan", "--r"): "`plan` is a one-process calculator (nothing to launch); r is the paper's symbol for the "
                     "noise-magnitude ratio (torchrun: ambiguous with --rdzv-*, --role, --run-path)",
}


def options_of(command: str) -> list[str]:
    parser = build_parser([command])
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return [s for action in sub.choices[command]._actions for s in action.option_strings]


def torchrun(argv):
    from torch.distributed.run import get_args_parser

    a = get_args_parser().parse_args(argv)
    return [a.training_script, *a.training_script_args]


def deepspeed_runner(argv):
    from deepspeed.launcher.runner import parse_args

    a = parse_args(argv)
    return [a.user_script, *a.user_args]


def deepspeed_launch(argv):
    from deepspeed.launcher import launch

    saved = sys.argv
    sys.argv = ["launch.py", "--world_info", "e30=", *argv]
    try:
        a = launch.parse_args()
    finally:
        sys.argv = saved
    return [a.training_script, *a.training_script_args]


LAUNCHERS = {"torchrun": torchrun, "deepspeed": deepspeed_runner, "deepspeed.launch": deepspeed_launch}


def reaches_the_script(parse, argv) -> bool:
    try:
        return parse(argv) == argv
    except SystemExit:  # argparse's error exit: "ambiguous option", or a launcher option taken
        return False


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_option_reaches_the_command_through_every_launcher(command, capsys):
    options = options_of(command)
    assert "--help" in options
    stopped = []
    for option in options:
        for name, parse in LAUNCHERS.items():
            for argv in ([SCRIPT, command, option, "1"], [SCRIPT, command, f"{option}=1"]):
                if not reaches_the_script(parse, argv) and (command, option) not in KNOWN_EXCEPTIONS:
                    stopped.append(f"{name}: {' '.join(argv[1:])}")
    capsys.readouterr()
    assert not stopped, f"launchers stop on these `speed-fast {command}` flags (give them full names): {stopped}"


def test_the_known_exceptions_are_still_exceptions(capsys):
    """Each listed alias exists and really stops a launcher (else it need not be listed)."""
    for (command, option), why in KNOWN_EXCEPTIONS.items():
        assert option in options_of(command), (command, option, why)
        assert not reaches_the_script(torchrun, [SCRIPT, command, option, "1"]), (command, option)
    assert "ambiguous option: --n could match" in capsys.readouterr().err
