"""Stop requests that reach every rank: SIGTERM/SIGINT, and the death of the job's launcher.

`install()` (each rank, before training) makes SIGTERM and SIGINT only set a flag; the loop
reads `requested()` after each step, all ranks agree through the step's all-reduce, save a
checkpoint and exit 0. Under DeepSpeed's launcher (`deepspeed` -> `deepspeed.launcher.launch`
-> ranks) a signal sent to the `deepspeed` process alone (what `timeout` and many supervisors
do) kills it without telling anyone, and its child `launch.py` and the ranks would train on
orphaned. So each rank also:

  * asks the kernel for SIGTERM when its parent (`launch.py`) dies (PR_SET_PDEATHSIG, Linux);
  * watches, from a daemon thread, whether `launch.py` still has the parent it started with,
    and raises a stop request itself when that parent (the `deepspeed` command) is gone.

Either way the ranks finish the step in flight, save, and exit; `launch.py` then sees them all
exit and ends too, so nothing of the job is left running.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

_PR_SET_PDEATHSIG = 1
POLL_S = 0.5

_state = {"signum": 0, "reason": "", "installed": False}


def requested() -> int:
    """The signal number of the first stop request (0: none)."""
    return _state["signum"]


def reason() -> str:
    return _state["reason"]


def request(signum: int, why: str) -> None:
    if not _state["signum"]:
        _state["signum"] = signum
        _state["reason"] = why


def _on_signal(signum, frame):
    # Only a flag: the step in flight finishes. Repeated signals change nothing (Ctrl-C reaches the
    # launcher and the ranks, and the launcher then sends SIGTERM on top); SIGKILL is the hard stop.
    request(signum, signal.Signals(signum).name)


def _die_with_parent() -> None:
    """SIGTERM to this process when its parent exits (Linux only; elsewhere a no-op)."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _deepspeed_launch_parent() -> tuple[int, int] | None:
    """(pid of launch.py, pid of its parent) when this process is a rank started by DeepSpeed's
    local launcher, else None."""
    import psutil

    try:
        parent = psutil.Process(os.getppid())
        if not any("deepspeed.launcher.launch" in part for part in parent.cmdline()):
            return None
        return parent.pid, parent.ppid()
    except psutil.Error:
        return None


def _watch(launch_pid: int, launcher_pid: int) -> None:
    import psutil

    while True:
        time.sleep(POLL_S)
        try:
            gone = psutil.Process(launch_pid).ppid() != launcher_pid
        except psutil.NoSuchProcess:
            gone = True
        if gone:
            request(signal.SIGTERM, f"the deepspeed launcher (pid {launcher_pid}) is gone")
            return


def install() -> None:
    """Route SIGTERM/SIGINT to the stop flag and watch the launcher (see the module docstring).
    Called again (main, then the trainer's fit), it does nothing."""
    if _state["installed"]:
        return
    _state["installed"] = True
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _on_signal)
    parents = _deepspeed_launch_parent()
    if parents is None:
        return
    launch_pid, launcher_pid = parents
    _die_with_parent()
    if os.getppid() != launch_pid:  # launch.py died before the kernel was told to tell us
        request(signal.SIGTERM, "the deepspeed launcher's launch.py is gone")
    threading.Thread(target=_watch, args=(launch_pid, launcher_pid), name="speed_fast-launcher-watch",
                     daemon=True).start()
