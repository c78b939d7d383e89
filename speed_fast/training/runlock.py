"""One trainer per run directory: an exclusive POSIX (fcntl) lock on <run_dir>/.lock.

Rank 0 takes the lock before it reads or writes anything in the run directory and holds it
until the process ends; a second trainer on the same directory fails at once, naming the holder
(host, pid, start time) recorded in the lock file. The kernel (or the NFS lock manager) drops
the lock when its process dies, however it dies, so a lock left by a dead trainer is simply
taken over; the file's old contents only serve to say whose lock it was.

fcntl locks work across machines on NFS (v3 with lockd, v4), Lustre mounted with `flock`, GPFS
and local file systems. On a file system without locks (lockf fails with ENOLCK/EOPNOTSUPP/
ENOSYS) the trainer warns and runs unprotected.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time

LOCK_FILE = ".lock"
_UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class RunDirLocked(RuntimeError):
    """Another live process holds the run directory's lock."""


def _describe(info: dict) -> str:
    if not info:
        return "a process that left no details"
    started = info.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    return f"host {info.get('host', '?')}, pid {info.get('pid', '?')} (since {when})"


def _read(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, 65536).decode("utf-8") or "{}")
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


class RunLock:
    """The lock of one run directory. `acquire()` creates the directory if needed; `release()`
    unlocks (and, with cleanup=True, removes what acquire created when nothing else was written)."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, LOCK_FILE)
        self.fd: int | None = None
        self.created_dir = False
        self.supported = True
        self.previous: dict = {}  # what the lock file said before we took it (a dead holder's details)

    def acquire(self) -> "RunLock":
        if not os.path.isdir(self.run_dir):
            os.makedirs(self.run_dir, exist_ok=True)
            self.created_dir = True
        for _ in range(10):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in (errno.EACCES, errno.EAGAIN):
                    holder = _read(fd)
                    os.close(fd)
                    raise RunDirLocked(
                        f"{self.run_dir} is in use by another trainer: {_describe(holder)}. Wait for it to end "
                        f"(or stop it), or choose another --run-dir") from None
                os.close(fd)
                if exc.errno in _UNSUPPORTED:
                    self.supported = False
                    return self
                raise
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the file was replaced while we locked it: lock the one that is there now
                os.close(fd)
                continue
            self.fd = fd
            self.previous = _read(fd)
            info = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
            os.fsync(fd)
            return self
        raise RunDirLocked(f"{self.path} keeps being replaced while it is being locked")

    @property
    def took_over(self) -> str | None:
        """The details of a dead holder whose lock was taken over, or None."""
        return _describe(self.previous) if self.previous else None

    def release(self, cleanup: bool = False) -> None:
        if self.fd is None:
            return
        if cleanup and self.created_dir and os.listdir(self.run_dir) == [LOCK_FILE]:
            os.remove(self.path)
            os.rmdir(self.run_dir)
        else:
            os.ftruncate(self.fd, 0)
        os.close(self.fd)  # closing drops the lock
        self.fd = None
