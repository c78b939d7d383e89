"""The prompts of a generated set, for CLIP score: one per image, in the images' order.

    prompts, source = read_prompts("samples.npz", None, n)      # the npz's `prompts` array
    prompts, source = read_prompts("samples.npz", "prompts.txt", n)

From `--prompts FILE` when given (UTF-8 text, one prompt per line, line ends (\n or \r\n) removed
and nothing else), else from the `prompts` member of the --gen .npz: a unicode array (dtype '<U..') [N], as
`speed-fast sample --prompt/--prompts` writes it beside arr_0, read with allow_pickle=False. Any
other case is one line (ValueError): no prompts anywhere, an empty file, a count that is not the
number of images (both named), an array of another dtype or shape.
"""

from __future__ import annotations

import os
import zipfile

import numpy as np

from .arrays import check_npz_headers

PROMPTS_KEY = "prompts"


def _from_file(path: str, n: int) -> list[str]:
    if not os.path.isfile(path):
        raise ValueError(f"--prompts {path!r} is not a file; expected UTF-8 text, one prompt per line")
    try:
        with open(path, encoding="utf-8", newline="") as f:
            lines = f.read().split("\n")  # "\n" only: a prompt may hold other Unicode line breaks
    except UnicodeDecodeError as exc:
        raise ValueError(f"--prompts {path!r} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if lines[-1] == "":
        lines.pop()  # the last line's end
    prompts = [line[:-1] if line.endswith("\r") else line for line in lines]
    if not prompts:
        raise ValueError(f"--prompts {path!r} is empty; expected one prompt per line, {n} lines for the {n} images")
    if len(prompts) != n:
        raise ValueError(f"--prompts {path!r} holds {len(prompts)} prompts but --gen holds {n} images; expected one "
                         "prompt per line, one per image, in order")
    return prompts


def _from_npz(gen: str, n: int) -> list[str]:
    missing = (f"--gen {gen!r} holds no prompts (no '{PROMPTS_KEY}' array, as `speed-fast sample --prompts` writes); "
               f"pass --prompts FILE, one prompt per line for its {n} images")
    if not gen.endswith(".npz"):
        raise ValueError(missing)
    check_npz_headers(gen)
    with zipfile.ZipFile(gen) as z:
        if f"{PROMPTS_KEY}.npy" not in z.namelist():
            raise ValueError(missing)
    with np.load(gen, allow_pickle=False) as z:
        arr = z[PROMPTS_KEY]
    if arr.dtype.kind != "U" or arr.ndim != 1:
        raise ValueError(f"--gen {gen!r}[{PROMPTS_KEY}] is {arr.dtype} {list(arr.shape)}; expected a unicode array "
                         f"(dtype '<U..') of {n} prompts")
    if arr.shape[0] != n:
        raise ValueError(f"--gen {gen!r} holds {arr.shape[0]} prompts for {n} images; expected one prompt per image")
    return [str(p) for p in arr]


def read_prompts(gen: str, prompts_file: str | None, n: int) -> tuple[list[str], str]:
    """(the n prompts, where they came from) of the set in `gen` (module docstring)."""
    if prompts_file is not None:
        return _from_file(os.fspath(prompts_file), n), f"--prompts {prompts_file}"
    gen = os.fspath(gen)
    return _from_npz(gen, n), f"{gen}[{PROMPTS_KEY}]"
