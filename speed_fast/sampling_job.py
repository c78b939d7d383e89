"""One sample set of a run, drawn by one job of one or many ranks, written in ADM's format, resumable.

What `speed-fast sample` runs (one process, or N ranks under torchrun / deepspeed:
speed_fast.distributed):

    with launch_job(device) as job:                                  # speed_fast.distributed
        sampler = RunSampler(run_dir, device=job.device, **options)   # speed_fast.generate
        settings = settings_of(sampler, options, n)
        plan = job.on_main(prepare_outputs, "samples.npz", "grid.png", settings)   # refuses other settings
        draw_chunks(job, sampler, parts_dir("samples.npz"), n, batch_size, set(plan["done"]))
        job.on_main(assemble, parts_dir("samples.npz"), n, batch_size, settings, "samples.npz", "grid.png",
                    None, MAX_GRID_IMAGES)

The sharding rule. Samples 0 .. N-1 of a set are cut into global chunks of `batch_size`
consecutive indices (the last one shorter, so exactly N samples are drawn); chunk c goes to rank
c mod world (`Job.shard`). Every sample draws its label and noise from its own seed
(speed_fast.sampling: the seed and the sample's index), and a chunk is one batch of the model, so a
chunk's bytes do not depend on the number of ranks: the output is byte-identical for any number of
ranks at the same batch size (on the same kind of device). Across batch sizes the samples agree up
to the model's floating-point differences between batch shapes.

The files.
* `--out X.npz` (ADM's sample format, what openai/guided-diffusion's evaluator and `speed-fast eval`
  read): `arr_0` uint8 [N, H, W, 3] (images in [-1, 1] quantised by speed_fast.sampling.to_uint8;
  latent runs decoded by the VAE first; 1-channel data repeated to 3 channels), `arr_1` int64 [N]
  (the class labels; a text-to-image run: each sample's prompt index) and, for a text-to-image run,
  `prompts` unicode [N] ('<U...', no pickle: each sample's prompt, what `speed-fast eval --clip-model`
  reads). Stored uncompressed, as np.savez writes it.
* `--grid G.png` (or `--out G.png` alone): the first min(N, MAX_GRID_IMAGES) samples as a PNG grid.
* `<out>.json`: the settings the output was made with (`settings`, below), written with it.
* While the job runs, `<out>.parts/`: `manifest.json` (the settings) and one `chunk-NNNNNNNN.npz`
  per finished chunk (`images` uint8 [k, H, W, 3], `labels` int64 [k]), each written under a
  temporary name and renamed. Rerunning the same command keeps every finished chunk and draws the
  rest; when all are there, rank 0 streams them in order into the outputs, which are published
  together with the sidecar (speed_fast.atomic), and removes the parts. A job that fails (or is
  killed) before its first chunk leaves nothing that binds a rerun: parts without a finished
  chunk are discarded, whatever their settings.

The settings are everything that changes the bytes: the weights (SHA-256 of the loaded state
dict), --ema, --steps, --method, --eta, --cfg, --cfg-channels, --seed, --labels, --batch-size,
--clip-denoised, the VAE (SHA-256 of its state dict), --precision, --compile, the device kind,
--num-samples, and for a text-to-image run the prompts (SHA-256 of the list) and the text encoder
(its name and the SHA-256 of its weights). Unfinished parts or a finished output made with other
settings are refused with the differences named (ValueError), unless `overwrite`; the number of
ranks is not a setting.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import sys
import time

import numpy as np
import torch

FORMAT, VERSION = "speed_fast.samples", 1

# setting -> the flag that sets it (for naming differences)
SETTING_FLAGS = {
    "num_samples": "--num-samples", "weights": "--ckpt/--ema (the weights' SHA-256)", "ema": "--ema",
    "steps": "--steps", "method": "--method", "eta": "--eta", "cfg": "--cfg", "cfg_channels": "--cfg-channels",
    "seed": "--seed", "labels": "--labels", "batch_size": "--batch-size", "clip_denoised": "--clip-denoised",
    "vae": "--vae (the VAE's SHA-256)", "precision": "--precision", "compile": "--compile",
    "device": "--device (the kind: cpu or cuda)", "image_shape": "the run's image shape",
    "prompts": "--prompt/--prompts (the prompts' SHA-256)", "text_encoder": "--text-encoder (name, weights' SHA-256)",
}


def state_hash(module) -> str:
    """SHA-256 of a module's state dict (names, dtypes, shapes and bytes, in name order)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def settings_of(sampler, options: dict, num_samples: int) -> dict:
    """The settings that make the bytes of a sample set (see the module docstring)."""
    c, h, w = sampler.shape
    if sampler.decoder is not None:  # an AutoencoderKL halves the size once per block but the last
        factor = 2 ** (len(sampler.decoder.config.block_out_channels) - 1)
        h, w = factor * h, factor * w
    return {"num_samples": int(num_samples), "weights": state_hash(sampler.model), "ema": bool(options["ema"]),
            "steps": str(options["steps"]), "method": options["method"], "eta": float(options["eta"]),
            "cfg": float(options["cfg"]), "cfg_channels": options["cfg_channels"], "seed": int(options["seed"]),
            "labels": options["labels"], "batch_size": int(options["batch_size"]),
            "clip_denoised": bool(options["clip_denoised"]),
            "vae": state_hash(sampler.decoder) if sampler.decoder is not None else None,
            "precision": options["precision"], "compile": bool(options["compile"]), "device": sampler.device.type,
            "image_shape": [h, w, 3], **text_settings(sampler)}


def text_settings(sampler) -> dict:
    """A text-to-image sampler's prompts and text encoder as settings (none for a class-conditional run)."""
    if sampler.prompts is None:
        return {}
    prompts = hashlib.sha256(json.dumps(sampler.prompts, ensure_ascii=False).encode()).hexdigest()
    return {"prompts": prompts, "text_encoder": [sampler.encoder.name, state_hash(sampler.encoder.model)]}


def differences(old: dict, new: dict) -> list[str]:
    """'<flag>: <old> then, <new> now' for every setting that differs."""
    out = []
    for key in sorted(set(old) | set(new), key=lambda k: list(SETTING_FLAGS).index(k) if k in SETTING_FLAGS else 99):
        if old.get(key) != new.get(key):
            a, b = old.get(key), new.get(key)
            if key in ("weights", "vae", "prompts"):
                a, b = (v[:12] if isinstance(v, str) else v for v in (a, b))
            out.append(f"{SETTING_FLAGS.get(key, key)}: {a!r} then, {b!r} now")
    return out


def parts_dir(out: str) -> str:
    return os.path.abspath(out) + ".parts"


def sidecar(out: str) -> str:
    return os.path.abspath(out) + ".json"


def chunk_path(parts: str, chunk: int) -> str:
    return os.path.join(parts, f"chunk-{chunk:08d}.npz")


def _read_record(path: str) -> dict | None:
    """The JSON object at path, or None when it is absent, unreadable or not ours."""
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("format") != FORMAT or not isinstance(record.get("settings"), dict):
        return None
    return record


def _write_json(path: str, obj: dict) -> None:
    from .atomic import publish, temporary_name

    tmp = temporary_name(path)
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
    publish([(tmp, path)])


def prepare_outputs(out: str, grid: str | None, settings: dict, overwrite: bool = False) -> dict:
    """Rank 0, under the output lock: compare what exists with `settings` and set up the parts
    directory. Returns {"complete": True} when `out` was already written with these settings (and
    the grid asked for exists), else {"complete": False, "done": [finished chunk ids]}. ValueError
    naming the differences for an output or unfinished parts made with other settings (unless
    `overwrite`), or an output this command did not write."""
    record = _read_record(sidecar(out)) if os.path.isfile(out) else None
    diff = differences(record["settings"], settings) if record is not None else None
    if diff == [] and (not grid or (record.get("grid") == os.path.abspath(grid) and os.path.isfile(grid))):
        return {"complete": True}
    if diff and not overwrite:
        raise ValueError(f"--out {out} exists, made with other settings ({'; '.join(diff)}); pass --overwrite to "
                         "replace it, or choose another --out")
    for flag, path in (("--out", out), ("--grid", grid)):
        if path and os.path.lexists(path) and not overwrite and not (flag == "--out" and diff == []):
            raise ValueError(f"{flag} {path} exists and was not written by `speed-fast sample` (no "
                             f"{os.path.basename(sidecar(out))} of --out with these settings); pass --overwrite to "
                             "replace it, or choose another path")
    parts = parts_dir(out)
    manifest = os.path.join(parts, "manifest.json")
    if os.path.lexists(parts) and not os.path.isdir(parts):
        raise ValueError(f"{parts} exists and is not a directory; remove it (it holds the unfinished chunks of --out)")
    if os.path.isdir(parts):
        old = _read_record(manifest)
        diff = ["no readable manifest.json"] if old is None else differences(old["settings"], settings)
        if diff and not finished_chunks(parts):  # nothing drawn yet: nothing to keep
            shutil.rmtree(parts)
        elif diff and not overwrite:
            raise ValueError(f"{parts} holds unfinished chunks made with other settings ({'; '.join(diff)}); rerun "
                             "with those settings to finish them, or pass --overwrite to discard them")
        if diff:
            shutil.rmtree(parts)
    os.makedirs(parts, exist_ok=True)
    if _read_record(manifest) is None:
        _write_json(manifest, {"format": FORMAT, "version": VERSION, "settings": settings})
    return {"complete": False, "done": finished_chunks(parts)}


def finished_chunks(parts: str) -> list[int]:
    """The ids of the finished chunks in a parts directory (none when it does not exist)."""
    done = []
    for name in sorted(os.listdir(parts)) if os.path.isdir(parts) else ():
        if name.startswith("chunk-") and name.endswith(".npz"):
            with contextlib.suppress(ValueError):
                done.append(int(name[len("chunk-"):-len(".npz")]))
    return done


def discard_if_empty(parts: str) -> None:
    """Rank 0, after a failed job: a parts directory without a finished chunk holds nothing worth
    keeping (only the manifest), so the failure leaves no files behind."""
    if os.path.isdir(parts) and not finished_chunks(parts):
        shutil.rmtree(parts, ignore_errors=True)


def to_adm_images(x: torch.Tensor) -> np.ndarray:
    """uint8 [k, H, W, 3] of images float [k, C, H, W] in [-1, 1] (C = 1 is repeated to 3)."""
    from .sampling import to_uint8

    if x.shape[1] not in (1, 3):
        raise ValueError(f"samples have {x.shape[1]} channels; expected images (1 or 3 channels; pass --vae DIR to "
                         "decode latents)")
    u8 = to_uint8(x)  # (k, C, H, W)
    if u8.shape[1] == 1:
        u8 = u8.expand(-1, 3, -1, -1)
    return u8.permute(0, 2, 3, 1).contiguous().numpy()  # (k, H, W, 3)


def write_chunk(parts: str, chunk: int, images: np.ndarray, labels: np.ndarray) -> None:
    """chunk-NNNNNNNN.npz, written under a temporary name and renamed (a killed job leaves none half-written)."""
    from .atomic import temporary_name

    path = chunk_path(parts, chunk)
    tmp = temporary_name(path) + ".npz"
    try:
        np.savez(tmp, images=images, labels=labels.astype(np.int64))
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def read_chunk(parts: str, chunk: int, k: int, image_shape) -> tuple[np.ndarray, np.ndarray]:
    """A finished chunk, checked (ValueError naming the file when it is damaged or of another shape)."""
    import zipfile

    path = chunk_path(parts, chunk)
    try:
        with np.load(path, allow_pickle=False) as z:
            images, labels = z["images"], z["labels"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{path} is damaged ({type(exc).__name__}: {exc}); remove it and rerun to draw it "
                         "again") from None
    if images.dtype != np.uint8 or images.shape != (k, *image_shape) or labels.shape != (k,) \
            or labels.dtype != np.int64:
        raise ValueError(f"{path} holds {images.dtype} {list(images.shape)} and {labels.dtype} {list(labels.shape)}; "
                         f"expected uint8 {[k, *image_shape]} and int64 [{k}]; remove it and rerun")
    return images, labels


def chunk_sizes(n: int, batch_size: int) -> list[int]:
    return [min(batch_size, n - start) for start in range(0, n, batch_size)]


class Progress:
    """Rank 0's progress line (stderr): images of the set finished, images/s, ETA. The rate is this
    rank's, times the number of ranks (every rank draws the same number of chunks, to one)."""

    def __init__(self, total: int, done: int, world: int, enabled: bool, every_s: float = 5.0):
        self.total, self.done, self.world, self.enabled, self.every_s = total, done, world, enabled, every_s
        self.start = self.last = time.monotonic()
        self.mine = 0

    def update(self, k: int, final: bool = False) -> None:
        self.mine += k
        now = time.monotonic()
        if not self.enabled or (now - self.last < self.every_s and not final):
            return
        self.last = now
        rate = self.world * self.mine / max(now - self.start, 1e-9)
        shown = min(self.total, self.done + self.world * self.mine)
        eta = (self.total - shown) / rate if rate > 0 else float("inf")
        print(f"[sample] {shown:,}/{self.total:,} images, {rate:.3g} images/s, ETA {_duration(eta)}",
              file=sys.stderr, flush=True)


def _duration(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def draw_chunks(job, sampler, parts: str, n: int, batch_size: int, done: set[int], progress: bool = True) -> int:
    """This rank's unfinished chunks (Job.shard of all of them), drawn and written; the number drawn."""
    sizes = chunk_sizes(n, batch_size)
    mine = [c for c in job.shard(len(sizes)) if c not in done]
    bar = Progress(n, sum(sizes[c] for c in done), job.world, progress and job.is_main)
    for c in mine:
        x, y = sampler.draw(c * batch_size, sizes[c])
        write_chunk(parts, c, to_adm_images(x), y.numpy())
        bar.update(sizes[c], final=c == mine[-1])
    return len(mine)


def assemble(parts: str, n: int, batch_size: int, settings: dict, out: str, grid: str | None,
             nrow: int | None = None, max_grid: int = 1024, prompts: list[str] | None = None) -> dict:
    """Rank 0: the finished chunks, in order, streamed into the outputs (one chunk in memory at a
    time, plus the grid's images), published together with `<out>.json`; the parts removed. With
    `prompts` (P of them), the .npz also holds `prompts`: sample i's prompt, prompts[i mod P]."""
    import zipfile

    from .atomic import publish, temporary_name
    from .sampling import save_grid

    image_shape = tuple(settings["image_shape"])
    sizes = chunk_sizes(n, batch_size)
    npz = out if out.lower().endswith(".npz") else None
    grid = out if npz is None else grid
    temps, moves, shown = [], [], []
    try:
        if npz is not None:
            tmp = temporary_name(npz)
            temps.append(tmp)
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as z:  # what np.savez writes
                labels = []
                with z.open("arr_0.npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False,
                                                             "shape": (n, *image_shape)})
                    for c, k in enumerate(sizes):
                        images, y = read_chunk(parts, c, k, image_shape)
                        f.write(images.tobytes())
                        labels.append(y)
                        if sum(len(s) for s in shown) < max_grid:
                            shown.append(images[: max_grid - sum(len(s) for s in shown)].copy())
                with z.open("arr_1.npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array_header_1_0(f, {"descr": "<i8", "fortran_order": False, "shape": (n,)})
                    f.write(np.concatenate(labels).astype("<i8").tobytes())
                if prompts is not None:
                    with z.open("prompts.npy", "w", force_zip64=True) as f:
                        np.lib.format.write_array(f, np.array([prompts[i % len(prompts)] for i in range(n)],
                                                              dtype=np.str_), allow_pickle=False)
            moves.append((tmp, os.path.abspath(npz)))
        else:
            for c, k in enumerate(sizes):
                if sum(len(s) for s in shown) >= max_grid:
                    break
                images, _ = read_chunk(parts, c, k, image_shape)  # every chunk before the grid's end is checked
                shown.append(images[: max_grid - sum(len(s) for s in shown)].copy())
        if grid is not None:
            tmp_grid = temporary_name(grid) + os.path.splitext(grid)[1]  # PIL picks the format from the suffix
            temps.append(tmp_grid)
            images = torch.from_numpy(np.concatenate(shown)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
            k = images.shape[0]
            save_grid(images, tmp_grid, nrow=nrow or max(1, math.isqrt(k - 1) + 1))
            moves.append((tmp_grid, os.path.abspath(grid)))
        arrays = {"arr_0": "uint8 [N, H, W, 3] images", "arr_1": "int64 [N] labels"}
        if prompts is not None:
            arrays.update(arr_1="int64 [N] prompt indices", prompts="unicode [N] each sample's prompt")
        record = {"format": FORMAT, "version": VERSION, "settings": settings,
                  "grid": os.path.abspath(grid) if grid else None, "arrays": arrays}
        tmp_json = temporary_name(sidecar(out))
        temps.append(tmp_json)
        with open(tmp_json, "w") as f:
            json.dump(record, f, indent=1)
            f.write("\n")
        moves.append((tmp_json, sidecar(out)))
        publish(moves)
    finally:
        for path in temps:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
    shutil.rmtree(parts, ignore_errors=True)
    return {"grid_images": sum(len(s) for s in shown)}
