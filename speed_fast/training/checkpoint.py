"""Checkpoints: atomic publication, verification and walk-back on resume, safe loading, and loading
a run for inference.

Layout of <run_dir>/checkpoints:

    latest                 the tag of the newest checkpoint written (for people and tools; resume
                           does not trust it, it verifies)
    step-00001000/         one checkpoint:
        (DeepSpeed files)  model/optimizer states of every rank (engine.save_checkpoint)
        model.pt           full fp32 master weights {name: tensor} (rank 0)
        ema.pt             full fp32 EMA weights {name: tensor} (rank 0)
        rng-rank<r>.pt     torch / numpy / python (/ CUDA) RNG states of rank r, as tensors and numbers
        sampler.pt         an adaptive time-step strategy's statistics and tables in force (rank 0;
                           the same on every rank)
        state.json         step, micro-step, data position, counters, and "files": the size and
                           SHA-256 of every other file (written last)
    .tmp-step-00001000/    a checkpoint being written (never read; removed on the next start)

Publication: every rank writes into the `.tmp-` directory and hashes the files it wrote, all
ranks meet, then rank 0 writes state.json, renames the directory to its final tag and replaces
`latest` (write + fsync + rename). A crash at any point leaves the previous checkpoint or the new
one, never half of one. The directory must be on a file system all ranks share.

Verification (`verify`, `find_resumable`): a checkpoint counts only when state.json parses, has
the keys resume needs, names the directory's own step, and every file it lists has the listed
size and SHA-256. Resume takes the newest checkpoint that verifies and reports each newer one it
skipped and why (truncated, deleted, corrupted, half-copied), so a damaged newest checkpoint
costs the steps since the previous one, not the run.

Safe loading: nothing stored in a checkpoint can run code. Every file is read with
`torch.load(weights_only=True)`: our own files hold only tensors, numbers and strings, and
DeepSpeed's model/optimizer files are read through `SafeLoads`, which adds exactly the
non-tensor types DeepSpeed writes for ZeRO 0-3 (`deepspeed_safe_globals`). A file that needs any
other type is refused with `UnsafeCheckpointError` naming the file and the type, before any of
it runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import re
import shutil

import numpy as np
import torch

from ..jsonfile import JSONFileError, read_json_object

STATE_FILE = "state.json"
LATEST = "latest"
TMP_PREFIX = ".tmp-"
MODEL_FILE = "model.pt"
EMA_FILE = "ema.pt"
SAMPLER_FILE = "sampler.pt"
_TAG = re.compile(r"^step-(\d+)$")
# The rank that writes (and hashes) a file: the number in zero_pp_rank_<r>_... / rng-rank<r>.pt, else rank 0.
_OWNER = re.compile(r"^(?:zero_pp_rank_|rng-rank)(\d+)[_.]")
# What resume reads from state.json.
_STATE_KEYS = ("step", "micro_step", "skipped_steps", "nonfinite_streak", "loader", "world_size", "files")
_HASH_BLOCK = 1 << 24
_PART_PREFIX = ".files-rank"  # each rank's list of the files it wrote, merged into state.json by rank 0


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the checkpoint or file and why."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file that would need types outside the allow-list to load (possibly crafted to run code)."""


def tag_for(step: int) -> str:
    return f"step-{step:08d}"


def step_of(tag: str) -> int | None:
    m = _TAG.match(tag)
    return int(m.group(1)) if m else None


def checkpoint_tags(ckpt_root: str) -> list[str]:
    """Every `step-N` directory in `ckpt_root`, verified or not, oldest first."""
    if not os.path.isdir(ckpt_root):
        return []
    tags = [d for d in os.listdir(ckpt_root) if _TAG.match(d) and os.path.isdir(os.path.join(ckpt_root, d))]
    return sorted(tags, key=step_of)


def remove_stale(ckpt_root: str) -> None:
    """Delete leftovers of interrupted saves (rank 0, before training starts)."""
    if os.path.isdir(ckpt_root):
        for d in os.listdir(ckpt_root):
            if d.startswith(TMP_PREFIX):
                shutil.rmtree(os.path.join(ckpt_root, d), ignore_errors=True)


def write_atomic(path: str, text: str) -> None:
    """Replace `path` with `text` all at once: a reader sees the old file or the new one, never a part."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def describe_file(path: str) -> dict:
    """{"bytes", "sha256"} of a file (one read)."""
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as f:
        while True:
            buf = f.read(_HASH_BLOCK)
            if not buf:
                return {"bytes": n, "sha256": h.hexdigest()}
            h.update(buf)
            n += len(buf)


# ---- safe loading -------------------------------------------------------------------------------

def deepspeed_safe_globals() -> list:
    """The non-tensor types in DeepSpeed's model/optimizer state files (ZeRO 0-3, fp32 and bf16):
    the static loss scaler, the ZeRO stage enum, and the fragment address of each parameter's
    slice of a flat partition. Plain data classes; none of them runs code when restored."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def _weights_only_reason(exc: Exception) -> str:
    """The informative lines of torch's weights-only refusal (without its generic advice)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    keep = [ln for ln in lines if not ln.startswith(("Weights only load failed", "Check the documentation",
                                                     "Please file an issue"))]
    return " ".join(keep) or lines[0]


def safe_load(path: str, map_location="cpu", allowed=()):
    """torch.load(weights_only=True), also accepting the types in `allowed`.

    Raises UnsafeCheckpointError when the file needs any other type (nothing of it has run) and
    CheckpointError when it is not a readable torch file at all."""
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = _weights_only_reason(exc)
        if "GLOBAL" in reason or "global" in reason:
            raise UnsafeCheckpointError(
                f"{path}: refused to load: {reason}. A checkpoint file may hold only tensors, numbers, "
                "strings, containers and the DeepSpeed types of speed_fast.training.checkpoint."
                "deepspeed_safe_globals; this one was written by something else (or crafted to run "
                "code) and nothing in it was run") from None
        raise CheckpointError(f"{path}: not a readable checkpoint file ({reason})") from None
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable checkpoint file ({type(exc).__name__}: {exc})") from None


class SafeLoads:
    """A DeepSpeed checkpoint engine's stand-in for loading: reads with `safe_load` and the
    DeepSpeed allow-list; everything else (saving, commit, ...) is the wrapped engine's."""

    def __init__(self, inner):
        self._inner = inner
        self._allowed = deepspeed_safe_globals()

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def load(self, path, map_location=None):
        return safe_load(path, map_location=map_location, allowed=self._allowed)


# ---- RNG states (tensors and numbers only, so they load with weights_only=True) ----------------

def rng_state() -> dict:
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
        "numpy_pos": int(pos),
        "numpy_has_gauss": int(has_gauss),
        "numpy_cached_gaussian": float(cached),
        "python_version": int(version),
        "python_internal": torch.tensor(internal, dtype=torch.int64),
        "python_gauss_next": gauss_next,
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict, where: str = "rng state") -> None:
    try:
        keys = state["numpy_keys"].numpy().astype(np.uint32)
        internal = tuple(int(v) for v in state["python_internal"].tolist())
        np_state = ("MT19937", keys, int(state["numpy_pos"]), int(state["numpy_has_gauss"]),
                    float(state["numpy_cached_gaussian"]))
        py_state = (int(state["python_version"]), internal, state["python_gauss_next"])
        torch_state = state["torch"]
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise CheckpointError(f"{where}: not an RNG state written by this trainer "
                              f"({type(exc).__name__}: {exc})") from None
    try:
        torch.set_rng_state(torch_state)
        np.random.set_state(np_state)
        random.setstate(py_state)
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])
    except (TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{where}: invalid RNG state ({exc})") from None


# ---- save ---------------------------------------------------------------------------------------

def _owned_files(directory: str, rank: int, world: int) -> dict:
    """{name: describe_file} of the files in `directory` that rank `rank` wrote."""
    out = {}
    for name in sorted(os.listdir(directory)):
        m = _OWNER.match(name)
        owner = int(m.group(1)) % world if m else 0
        if owner == rank and name != STATE_FILE and not name.startswith(_PART_PREFIX):
            out[name] = describe_file(os.path.join(directory, name))
    return out


def save(engine, ckpt_root: str, step: int, state: dict, model_sd: dict, ema_sd: dict, rank: int,
         barrier, keep: int, extra: dict | None = None) -> str:
    """Write one checkpoint collectively (every rank calls this) and publish it; returns its path.

    `state` must be JSON-serialisable; model_sd / ema_sd are the full fp32 state dicts (used on rank 0);
    `extra` maps more file names to dicts of CPU tensors that rank 0 writes (e.g. SAMPLER_FILE).
    Each rank hashes the files it wrote; rank 0 lists them all in state.json."""
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_initialized() else 1
    tag = tag_for(step)
    tmp_tag = TMP_PREFIX + tag
    tmp_dir = os.path.join(ckpt_root, tmp_tag)
    if rank == 0:
        os.makedirs(ckpt_root, exist_ok=True)
        shutil.rmtree(tmp_dir, ignore_errors=True)
    barrier()
    engine.save_checkpoint(ckpt_root, tag=tmp_tag, save_latest=False)
    torch.save(rng_state(), os.path.join(tmp_dir, f"rng-rank{rank}.pt"))
    if rank == 0:
        torch.save(model_sd, os.path.join(tmp_dir, MODEL_FILE))
        torch.save(ema_sd, os.path.join(tmp_dir, EMA_FILE))
        for name, tensors in (extra or {}).items():
            torch.save(tensors, os.path.join(tmp_dir, name))
    barrier()  # every rank's files are in tmp_dir
    # Each rank hashes what it wrote and leaves the list in a small file (no tensor traffic, so no
    # device synchronisation); rank 0 merges them into state.json.
    with open(os.path.join(tmp_dir, f"{_PART_PREFIX}{rank}.json"), "w") as f:
        json.dump(_owned_files(tmp_dir, rank, world), f)
    barrier()
    final = os.path.join(ckpt_root, tag)
    if rank == 0:
        files = {}
        for r in range(world):
            part = os.path.join(tmp_dir, f"{_PART_PREFIX}{r}.json")
            with open(part) as f:
                files.update(json.load(f))
            os.remove(part)
        missing = sorted(set(_required_files(world)) - set(files))
        if missing:
            raise CheckpointError(f"{tmp_dir}: files {missing} were not written; the checkpoint is not published")
        write_atomic(os.path.join(tmp_dir, STATE_FILE), json.dumps({**state, "files": files}, indent=1))
        if os.path.exists(final):  # the same step saved again (e.g. preempted right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp_dir, final)
        _fsync_dir(ckpt_root)
        write_atomic(os.path.join(ckpt_root, LATEST), tag + "\n")
        # Keep the newest `keep` up to this one; newer tags can only be leftovers of a timeline that
        # resume walked back from (they failed verification) and are left for the user to inspect.
        older = [t for t in checkpoint_tags(ckpt_root) if step_of(t) < step]
        for old in older[:max(0, len(older) - (keep - 1))]:
            shutil.rmtree(os.path.join(ckpt_root, old), ignore_errors=True)
    barrier()  # published before anyone moves on (or exits)
    return final


# ---- verify and find ----------------------------------------------------------------------------

def _required_files(world_size: int) -> list[str]:
    return [MODEL_FILE, EMA_FILE] + [f"rng-rank{r}.pt" for r in range(world_size)]


def read_state(path: str) -> dict:
    """state.json of the checkpoint at `path`; CheckpointError when it is missing or not a JSON object."""
    file = os.path.join(path, STATE_FILE)
    if not os.path.exists(file):
        raise CheckpointError(f"{file} is missing (an interrupted copy or a damaged checkpoint)")
    try:
        return read_json_object(file)
    except JSONFileError as exc:
        raise CheckpointError(str(exc)) from None


def verify(path: str, files: list[str] | None = None) -> dict:
    """state.json of the checkpoint at `path` after checking it; raises CheckpointError naming the
    first problem. `files`: check only these of the listed files (default: all, and those resume needs)."""
    state = read_state(path)
    missing = [k for k in _STATE_KEYS if k not in state]
    if missing:
        hint = " (written by an older speed_fast without a file list)" if missing == ["files"] else ""
        raise CheckpointError(f"{path}: state.json lacks {missing}{hint}")
    step, world, listed = state["step"], state["world_size"], state["files"]
    if not (isinstance(step, int) and isinstance(world, int) and world >= 1 and isinstance(listed, dict)):
        raise CheckpointError(f"{path}: state.json has step={step!r}, world_size={world!r}, files of type "
                              f"{type(listed).__name__}; expected integers and an object")
    tag = os.path.basename(os.path.normpath(path))
    if step_of(tag) not in (None, step):
        raise CheckpointError(f"{path}: state.json says step {step}, but the directory is {tag}")
    names = files if files is not None else sorted(set(listed) | set(_required_files(world)))
    for name in names:
        if name not in listed:
            raise CheckpointError(f"{path}: {name} is not in state.json's file list")
        want = listed[name]
        file = os.path.join(path, name)
        if not (isinstance(want, dict) and isinstance(want.get("bytes"), int) and isinstance(want.get("sha256"), str)):
            raise CheckpointError(f"{path}: state.json's entry for {name} is {want!r}, expected bytes and sha256")
        if not os.path.isfile(file):
            raise CheckpointError(f"{path}: {name} is missing")
        size = os.path.getsize(file)
        if size != want["bytes"]:
            raise CheckpointError(f"{path}: {name} is {size} bytes, written as {want['bytes']} (truncated or replaced)")
    for name in names:
        have = describe_file(os.path.join(path, name))
        if have["sha256"] != listed[name]["sha256"]:
            raise CheckpointError(f"{path}: {name} does not match its SHA-256 in state.json (corrupted)")
    return state


def find_resumable(ckpt_root: str) -> tuple[str | None, dict | None, list[tuple[str, str]]]:
    """(path, state) of the newest checkpoint under `ckpt_root` that verifies, or (None, None), and
    the (tag, reason) of every newer one that did not, newest first."""
    skipped = []
    for tag in reversed(checkpoint_tags(ckpt_root)):
        path = os.path.join(ckpt_root, tag)
        try:
            return path, verify(path), skipped
        except CheckpointError as exc:
            skipped.append((tag, str(exc)))
    return None, None, skipped


# ---- load ---------------------------------------------------------------------------------------

def load_extra(path: str, name: str) -> dict:
    """A file that `save` wrote from `extra` (e.g. SAMPLER_FILE), verified against state.json's list
    and loaded safely; CheckpointError when it is not listed, damaged or not a dict."""
    verify(path, files=[name])
    value = safe_load(os.path.join(path, name))
    if not isinstance(value, dict):
        raise CheckpointError(f"{os.path.join(path, name)} holds {type(value).__name__}, expected a dict")
    return value


def load(engine, path: str, rank: int) -> dict:
    """Restore model and optimizer (DeepSpeed), this rank's RNG states; returns state.json's dict.
    Every file is loaded safely (see the module docstring); DeepSpeed's are read through SafeLoads."""
    root, tag = os.path.split(os.path.normpath(path))
    inner = engine.checkpoint_engine
    engine.checkpoint_engine = SafeLoads(inner)
    try:
        load_path, _ = engine.load_checkpoint(root, tag=tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
    finally:
        engine.checkpoint_engine = inner
    if load_path is None:
        raise CheckpointError(f"DeepSpeed found no model states for this rank in {path}")
    rng_file = os.path.join(path, f"rng-rank{rank}.pt")
    set_rng_state(safe_load(rng_file), where=rng_file)
    return read_state(path)


def load_ema(path: str) -> dict:
    return safe_load(os.path.join(path, EMA_FILE))


def load_for_inference(run_dir: str, ema: bool = True, device="cpu", checkpoint: str | None = None):
    """(model, config dict, schedule, data meta) of a trained run, ready for sampling.

    run_dir: a run directory written by train/main.py (its newest checkpoint whose weights file
    verifies is used, or `checkpoint`, a tag such as "step-00001000" or a checkpoint path). ema=True
    loads the EMA weights (what DiT samples with), False the raw model weights. The model is the run's
    plain `speed_fast.models.DiT` or `UNet` (speed_fast.models.registry reads config.json's
    `dit_config` or `unet_config`) in eval mode, fp32, on `device`; the schedule is the run's
    NoiseSchedule; the data meta is the training file's sidecar (shape, classes, class names).
    The weights file is checked against state.json's size and SHA-256 when the checkpoint lists
    them, and always loaded with weights_only=True. Raises ValueError naming what is wrong."""
    from ..models.registry import build_model, run_model_config
    from ..schedule import NoiseSchedule

    name = EMA_FILE if ema else MODEL_FILE

    def check(path: str) -> None:
        state = read_state(path)
        if "files" in state:  # a trainer checkpoint: verify what we load
            verify(path, files=[name])
        elif not os.path.isfile(os.path.join(path, name)):
            raise CheckpointError(f"{path}: {name} is missing")

    try:
        if checkpoint is not None and os.path.isdir(checkpoint):
            path = checkpoint
            run_dir = os.path.dirname(os.path.dirname(os.path.normpath(path)))
            check(path)
        else:
            root = os.path.join(run_dir, "checkpoints")
            candidates = [checkpoint] if checkpoint else list(reversed(checkpoint_tags(root)))
            path, problems = None, []
            for tag in candidates:
                try:
                    check(os.path.join(root, tag))
                    path = os.path.join(root, tag)
                    break
                except CheckpointError as exc:
                    problems.append(str(exc))
            if path is None:
                raise CheckpointError(f"{run_dir}: no usable checkpoint under {root}"
                                      + (f" named {checkpoint!r}" if checkpoint else "")
                                      + (f": {'; '.join(problems)}" if problems else ""))
        weights = safe_load(os.path.join(path, name))
    except CheckpointError as exc:
        raise ValueError(str(exc)) from None
    with open(os.path.join(run_dir, "config.json")) as f:
        config = json.load(f)
    model = build_model(run_model_config(config, os.path.join(run_dir, "config.json"), grad_checkpointing=False))
    if not isinstance(weights, dict):
        raise ValueError(f"{os.path.join(path, name)} holds {type(weights).__name__}, expected a state dict")
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match the model: missing {missing}, unexpected {unexpected}")
    model.to(device).eval()
    schedule = NoiseSchedule.make(**config["train"]["schedule"])
    return model, config, schedule, config["data_meta"]
