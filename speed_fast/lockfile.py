"""One writer per path: an exclusive POSIX (fcntl) lock on a lock file, naming its holder.

The lock file records the holder (host, pid, start time); a second writer fails at once with
`Locked`, naming it. The kernel (or the NFS lock manager) drops the lock when its process dies,
however it dies, so a lock left by a dead process is simply taken over; the file's old contents
only say whose lock it was. The trainer's run-directory lock (speed_fast.training.runlock) and
the data/sampling commands' output locks (`output_lock`: `<out>.lock`) are both this lock.

fcntl locks work across machines on NFS (v3 with lockd, v4), Lustre mounted with `flock`, GPFS
and local file systems. On a file system without locks (lockf fails with ENOLCK/EOPNOTSUPP/
ENOSYS) `supported` is False and the caller runs unprotected (with a warning).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time

_UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class Locked(RuntimeError):
    """Another live process holds the lock."""


def describe(info: dict) -> str:
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


class FileLock:
    """An exclusive lock on the file `path` (created if needed). `busy(holder)` is the message of
    the `Locked` raised when a live process holds it (holder: describe()'s text)."""

    def __init__(self, path: str, busy=None):
        self.path = path
        self.busy = busy or (lambda holder: f"{path} is locked by {holder}")
        self.fd: int | None = None
        self.supported = True
        self.previous: dict = {}  # what the lock file said before we took it (a dead holder's details)

    def acquire(self):
        for _ in range(10):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in (errno.EACCES, errno.EAGAIN):
                    holder = _read(fd)
                    os.close(fd)
                    raise Locked(self.busy(describe(holder))) from None
                os.close(fd)
                if exc.errno in _UNSUPPORTED:
                    self.supported = False
                    return self
                raise
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the file was replaced or removed while we locked it: lock the one there now
                os.close(fd)
                continue
            self.fd = fd
            self.previous = _read(fd)
            info = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
            os.fsync(fd)
            return self
        raise Locked(f"{self.path} keeps being replaced while it is being locked")

    @property
    def took_over(self) -> str | None:
        """The details of a dead holder whose lock was taken over, or None."""
        return describe(self.previous) if self.previous else None

    def release(self, remove: bool = False) -> None:
        """Unlock; remove=True deletes the lock file first (a waiting locker then sees the file
        gone under its lock and locks the new one: the inode check in acquire)."""
        if self.fd is None:
            return
        if remove:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)
        else:
            os.ftruncate(self.fd, 0)
        os.close(self.fd)  # closing drops the lock
        self.fd = None


def lock_path(out: str) -> str:
    return os.fspath(out) + ".lock"


@contextlib.contextmanager
def output_lock(out: str, command: str, log=None):
    """Hold `<out>.lock` while `command` writes `out`: a second writer of the same output raises
    `Locked` naming the holder; a dead holder's lock is taken over (and said). In a multi-rank job
    (RANK set) only rank 0 locks, so a job's own ranks are never refused."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    if int(os.environ.get("RANK", "0") or 0) != 0:
        yield None
        return
    out = os.path.abspath(os.fspath(out))
    os.makedirs(os.path.dirname(out), exist_ok=True)
    lock = FileLock(lock_path(out), busy=lambda holder: (
        f"{out} is being written by another {command}: {holder}; wait for it to end (or stop it), or choose "
        "another output"))
    lock.acquire()
    if not lock.supported:
        log(f"[{command}] warning: {os.path.dirname(out)} has no fcntl locks; nothing stops a second writer of {out}")
    elif lock.took_over:
        log(f"[{command}] took over the lock of {out} from {lock.took_over}, which is gone")
    try:
        yield lock
    finally:
        lock.release(remove=True)
