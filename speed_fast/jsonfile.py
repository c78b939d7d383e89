"""Reading a JSON file that must hold one object (presets, DeepSpeed configs, a run's config.json).

`read_json_object(path)` returns the dict or raises `JSONFileError` (a ValueError) whose message
starts with the path and says what is wrong (missing, unreadable, not JSON, not an object); the
callers put their own context in front of it. A leaf: it imports nothing from speed_fast.
"""

from __future__ import annotations

import json
import os


class JSONFileError(ValueError):
    """A JSON file that is missing, unreadable, not valid JSON, or not a JSON object."""


def read_json_object(path: str | os.PathLike) -> dict:
    """The JSON object in `path`; JSONFileError naming the path and the problem."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            value = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        raise JSONFileError(f"{path}: no such file") from None
    except json.JSONDecodeError as exc:
        raise JSONFileError(f"{path} is not valid JSON (JSONDecodeError: {exc})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise JSONFileError(f"{path} is unreadable ({type(exc).__name__}: {exc})") from None
    if not isinstance(value, dict):
        raise JSONFileError(f"{path} holds {type(value).__name__}, expected a JSON object")
    return value
