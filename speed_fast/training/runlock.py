"""One trainer per run directory: an exclusive POSIX (fcntl) lock on <run_dir>/.lock.

Rank 0 takes the lock before it reads or writes anything in the run directory and holds it
until the process ends; a second trainer on the same directory fails at once, naming the holder
(host, pid, start time) recorded in the lock file. The kernel (or the NFS lock manager) drops
the lock when its process dies, however it dies, so a lock left by a dead trainer is simply
taken over; the file's old contents only serve to say whose lock it was.

fcntl locks work across machines on NFS (v3 with lockd, v4), Lustre mounted with `flock`, GPFS
and local file systems. On a file system without locks (lockf fails with ENOLCK/EOPNOTSUPP/
ENOSYS) the trainer warns and runs unprotected. The lock itself is speed_fast.lockfile's,
shared with the data and sampling commands' output locks.
"""

from __future__ import annotations

import os

from ..lockfile import FileLock, Locked

LOCK_FILE = ".lock"


class RunDirLocked(Locked):
    """Another live process holds the run directory's lock."""


class RunLock(FileLock):
    """The lock of one run directory (speed_fast.lockfile.FileLock on <run_dir>/.lock). `acquire()`
    creates the directory if needed; `release()` unlocks (and, with cleanup=True, removes what
    acquire created when nothing else was written)."""

    def __init__(self, run_dir: str):
        super().__init__(os.path.join(run_dir, LOCK_FILE), busy=lambda holder: (
            f"{run_dir} is in use by another trainer: {holder}. Wait for it to end (or stop it), or choose "
            "another --run-dir"))
        self.run_dir = run_dir
        self.created_dir = False

    def acquire(self) -> "RunLock":
        if not os.path.isdir(self.run_dir):
            os.makedirs(self.run_dir, exist_ok=True)
            self.created_dir = True
        try:
            return super().acquire()
        except Locked as exc:
            raise RunDirLocked(str(exc)) from None

    def release(self, cleanup: bool = False) -> None:
        if self.fd is None:
            return
        if cleanup and self.created_dir and os.listdir(self.run_dir) == [LOCK_FILE]:
            super().release(remove=True)
            os.rmdir(self.run_dir)
        else:
            super().release()
