"""Outputs that appear whole or not at all: a command writes each file under a temporary name
next to it, then `publish` moves the finished set into place, restoring what was there before if
any move fails (so a data file never appears without its sidecar, and a failed run leaves every
existing file as it was). A leaf: imports nothing of speed_fast."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid


def temporary_name(path: str) -> str:
    """A hidden name next to `path` for writing it (same directory, so the final rename is atomic)."""
    path = os.path.abspath(os.fspath(path))
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def check_replaceable(path: str, flag: str) -> None:
    """ValueError unless `path` is absent or a regular file (a directory, FIFO or device is never replaced)."""
    if os.path.lexists(path) and not os.path.islink(path) and not os.path.isfile(path):
        kind = "a directory" if os.path.isdir(path) else "not a regular file"
        raise ValueError(f"{flag} {path!r} is {kind}; expected a file path (nothing was written)")


def publish(moves: list[tuple[str, str]]) -> None:
    """os.replace(tmp, final) for each pair, all or nothing: the previous finals are kept (as hard
    links, or copies where links are not supported) until every move has succeeded, and put back
    when one fails. The temporaries are removed on failure."""
    backups: list[tuple[str, str | None]] = []  # (final, its backup or None when it did not exist)
    try:
        for tmp, final in moves:
            backup = None
            if os.path.lexists(final):
                backup = temporary_name(final) + ".old"
                try:
                    os.link(final, backup, follow_symlinks=False)
                except OSError:
                    shutil.copy2(final, backup, follow_symlinks=False)
            backups.append((final, backup))
            os.replace(tmp, final)
    except BaseException:
        for final, backup in reversed(backups):
            with contextlib.suppress(OSError):
                if backup is not None:
                    os.replace(backup, final)
                elif os.path.lexists(final) and not os.path.isdir(final):
                    os.remove(final)
        for tmp, _ in moves:
            with contextlib.suppress(OSError):
                os.remove(tmp)
        raise
    finally:
        for _, backup in backups:
            if backup is not None:
                with contextlib.suppress(OSError):
                    os.remove(backup)
