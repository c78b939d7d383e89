"""--init-from with files that are not the run's model (issue 22): a pickle, wrong shapes, a missing
key, a truncated, empty or text file, NaN or complex weights. Each stops train/main.py with exit 2
and one line naming the file, before a run directory exists (checked where the run is resolved:
speed_fast.models.interop.read_dit_checkpoint); a matching file passes the same check."""

import os
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from ds_launch import MAIN, ROOT, run, tiny_preset
from speed_fast.models import DiT
from speed_fast.models.dit import sincos_pos_embed_2d
from speed_fast.models.interop import _OURS_TO_DIT, read_dit_checkpoint
from speed_fast.training.config import parse_args, resolve

CASES = {
    "pickle": "not a loadable weights-only torch file",
    "wrong_shape": "shapes",
    "missing_key": "missing",
    "truncated": "not a loadable weights-only torch file",
    "empty": "is empty",
    "text": "not a loadable weights-only torch file",
    "nan": "NaN",
    "complex": "complex",
}


class Payload:
    def __reduce__(self):
        return (print, ("this ran",))


def damaged(path, kind, good):
    sd = dict(good)
    key = next(k for k, v in sd.items() if v.ndim == 2 and k != "pos_embed")
    if kind == "pickle":
        torch.save({"weights": Payload()}, path)  # would call print when unpickled: refused, never run
        return
    if kind == "wrong_shape":
        sd[key] = torch.zeros(3, 7)
    elif kind == "missing_key":
        del sd[key]
    elif kind == "nan":
        sd[key] = sd[key].clone()
        sd[key][0, 0] = float("nan")
    elif kind == "complex":
        sd[key] = sd[key].to(torch.complex64)
    torch.save(sd, path)
    if kind == "truncated":
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    elif kind == "empty":
        open(path, "wb").close()
    elif kind == "text":
        with open(path, "w") as f:
            f.write("these are not weights\n")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from speed_fast.data import ensure_digits_beton

    tmp = tmp_path_factory.mktemp("init")
    preset = tiny_preset(str(tmp / "tiny.json"), ensure_digits_beton())
    cfg, _ = parse_args(["--preset", preset, "--run-dir", str(tmp / "unused")], os.path.join(ROOT, "train", "configs"))
    plan = resolve(cfg, 1, os.path.join(ROOT, "train", "configs"), False)
    # The tiny model is no DiT-{S,B,L,XL} (to_dit_state_dict refuses it): DiT's naming by hand.
    good = {_OURS_TO_DIT.get(k, k): v for k, v in DiT(plan.model).state_dict().items()}
    grid = plan.model.input_size // plan.model.patch_size
    good["pos_embed"] = torch.from_numpy(sincos_pos_embed_2d(plan.model.hidden_size, grid)).float().unsqueeze(0)
    torch.save(good, tmp / "good.pt")
    paths = {}
    for kind in CASES:
        paths[kind] = str(tmp / f"{kind}.pt")
        damaged(paths[kind], kind, good)
    return {"tmp": tmp, "preset": preset, "plan": plan, "paths": paths, "good": str(tmp / "good.pt")}


def test_a_matching_file_passes_and_each_damage_is_named(files):
    read_dit_checkpoint(files["good"], files["plan"].model)
    for kind, expected in CASES.items():
        with pytest.raises(ValueError, match=expected) as info:
            read_dit_checkpoint(files["paths"][kind], files["plan"].model)
        assert files["paths"][kind] in str(info.value) and "\n" not in str(info.value)


def test_train_main_stops_with_one_line_and_no_run_directory(files):
    tmp = files["tmp"]

    def one(kind):
        run_dir = tmp / f"run-{kind}"
        proc = run([sys.executable, MAIN, "--preset", files["preset"], "--run-dir", str(run_dir), "--init-from",
                    files["paths"][kind], "--max-steps", "1"], timeout=300)
        return kind, proc, run_dir

    with ThreadPoolExecutor(2) as pool:
        for kind, proc, run_dir in pool.map(one, ["pickle", "wrong_shape", "nan", "empty"]):
            lines = proc.stderr.strip().splitlines()
            assert proc.returncode == 2, proc.stderr[-2000:]
            assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
            assert lines[0].startswith("train/main.py: error: --init-from ") and files["paths"][kind] in lines[0]
            assert not run_dir.exists()


def test_a_named_model_replaces_the_presets_custom_sizes():
    """`train/main.py --model DiT-S/2` on the default (digits) preset, whose custom sizes used to reach
    DiTConfig.named a second time ("multiple values for keyword argument 'hidden_size'")."""
    configs = os.path.join(ROOT, "train", "configs")
    default, _ = parse_args([], configs)
    assert default.model == "custom" and "hidden_size" in default.dit
    cfg, _ = parse_args(["--model", "DiT-S/2"], configs)
    assert not set(cfg.dit) & {"depth", "hidden_size", "num_heads", "patch_size"}
    plan = resolve(cfg, 1, configs, False)
    assert (plan.model.depth, plan.model.hidden_size, plan.model.num_heads, plan.model.patch_size) == (12, 384, 6, 2)
    assert plan.model.input_size == 8 and plan.model.in_channels == 1  # still fixed by the data


def test_the_end_of_run_grid_is_bounded_by_the_runs_length():
    from speed_fast.training.artefacts import grid_sampler

    configs = os.path.join(ROOT, "train", "configs")
    for flags, expected in ((["--max-steps", "4", "--sample-steps", "10"], ("10", "ddpm")),  # 1000 <= 3 x 4 x 128
                            (["--max-steps", "2000"], ("250", "ddpm")),
                            (["--max-steps", "20"], ("ddim25", "ddim")),  # 25000 > 7680 >= 2500 calls
                            (["--max-steps", "2"], ("7", "ddim"))):  # 768 // 100 DDIM steps
        cfg, _ = parse_args(flags, configs)
        steps, method, why = grid_sampler(resolve(cfg, 1, configs, False), 100)
        assert (steps, method) == expected, flags
        assert (why == "") == (expected[0] in ("10", "250")), why


def test_a_stop_signal_ends_the_end_of_run_grid_promptly(tmp_path):
    """SIGTERM's flag (what preemption's handler sets) while the 250-step grid is being drawn: the
    grid is skipped at the next model call and finish returns at once with the loss plot."""
    import json
    import signal
    import threading
    import time

    from speed_fast.training import artefacts, preemption

    configs = os.path.join(ROOT, "train", "configs")
    cfg, _ = parse_args(["--max-steps", "400000"], configs)
    plan = resolve(cfg, 1, configs, False)
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2)))
    timer = threading.Timer(1.0, preemption.request, (signal.SIGTERM, "SIGTERM"))
    t0 = time.time()
    timer.start()
    try:
        paths = artefacts.finish(plan, str(tmp_path), DiT(plan.model), "cpu")
    finally:
        timer.cancel()
        preemption._state.update(signum=0, reason="")
    assert time.time() - t0 < 30
    assert paths[0] == "skipped (SIGTERM)" and os.path.isfile(paths[1])
    assert not (tmp_path / "samples.png").exists()
