"""Ways to damage a checkpoint file in place, shared by the fault-injection tests."""

import os


def flip_byte(path):
    """Invert the middle byte (same size, different content: only a checksum notices)."""
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))


def truncate(path):
    """Cut the file to half its size."""
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
