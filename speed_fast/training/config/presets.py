"""Presets: train/configs/<name>.json (any `TrainConfig` field), read into a TrainConfig."""

from __future__ import annotations

import os

from ...jsonfile import JSONFileError, read_json_object
from .schema import ConfigError, TrainConfig

DEFAULT_PRESET = "digits"


def preset_names(configs_dir: str) -> list[str]:
    return sorted(f[:-5] for f in os.listdir(configs_dir) if f.endswith(".json"))


def load_preset(name: str, configs_dir: str) -> TrainConfig:
    """The TrainConfig of train/configs/<name>.json (or of a JSON file path)."""
    path = name if name.endswith(".json") else os.path.join(configs_dir, f"{name}.json")
    if not os.path.isfile(path):
        raise ConfigError(f"--preset {name!r}: no such preset; available: {preset_names(configs_dir)} "
                          f"(or a path to a JSON file)")
    try:
        d = read_json_object(path)
    except JSONFileError as exc:
        raise ConfigError(f"preset {exc}") from None
    d.setdefault("preset", os.path.basename(path)[:-5])
    return TrainConfig.from_dict(d, where=f"preset {path}")
