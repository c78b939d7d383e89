"""The convergence benchmark's statistics (benchmarks/bench_convergence.py) on synthetic curves:
acceleration ratios at several thresholds, the paired bootstrap intervals and the verdicts."""

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_convergence.py"
_spec = importlib.util.spec_from_file_location("bench_convergence", _PATH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

STEPS = [250 * i for i in range(1, 13)]  # 250 .. 3000
AREAS = {"acceleration": 1.0, "deceleration": 0.5, "convergence": 0.25}


def curve(speed: float, noise: np.ndarray) -> np.ndarray:
    """A quality curve falling as 1 / (speed * step), with multiplicative seed noise."""
    return 1000.0 / (speed * np.asarray(STEPS, dtype=np.float64)) * np.exp(noise)


def runs(arm, speed, seeds, rng, spread=0.05):
    out = []
    for s in range(seeds):
        q = curve(speed, rng.normal(0, spread) + rng.normal(0, spread / 5, len(STEPS)))
        out.append({"arm": arm, "seed": s, "steps": STEPS, "quality": q.tolist(), "online_quality": q.tolist(),
                    "area_mse_heldout": AREAS, "area_loss_train": AREAS})
    return out


def test_ratios_at_thresholds_on_exact_curves():
    base, fast = curve(1.0, np.zeros(12)), curve(2.0, np.zeros(12))
    # A curve that is the baseline at half the steps reaches each target in half the steps.
    # (75%: the crossing at 1125 lies between two evaluations; linear interpolation of a 1/step curve)
    assert bench.ratios_at(STEPS, base, fast) == [2.0, pytest.approx(2.0, rel=0.02), 2.0]
    assert bench.ratios_at(STEPS, base, base) == [1.0, 1.0, 1.0]
    slow = curve(0.5, np.zeros(12))  # never reaches the baseline's final value: ratio 0 there
    r = bench.ratios_at(STEPS, base, slow)
    assert r[0] == pytest.approx(0.5) and r[2] == 0.0


def test_paired_bootstrap_verdicts():
    rng = np.random.default_rng(0)
    base = runs("uniform", 1.0, 8, rng)
    # "same": the baseline's own curves with the seeds rotated, so the paired differences sum to 0.
    same = [{**r, "arm": "same", "seed": (r["seed"] + 1) % 8} for r in base]
    results = base + runs("fast", 2.0, 8, rng) + same + runs("slow", 0.6, 3, rng)
    bench.ARMS.update({"fast": ("speed", {}), "same": ("uniform", {}), "slow": ("p2", {})})
    try:
        summary = bench.summarize(results, {"uniform": 8, "fast": 8, "same": 8, "slow": 3}, resamples=2000)
    finally:
        for k in ("fast", "same", "slow"):
            bench.ARMS.pop(k)
    fast = summary["fast"]["vs_baseline"]
    assert fast["seeds"] == 8 and fast["verdict"] == "faster"
    for key in ("50%", "75%", "100%"):
        t = fast["thresholds"][key]
        assert t["ci95"][0] > 1.0 and t["verdict"] == "faster" and t["ratio"] == pytest.approx(2.0, rel=0.15)
        assert len(t["per_seed"]) == 8
    assert fast["log_auc"]["ci95"][1] < 0 and fast["log_auc"]["quality_ratio"] == pytest.approx(0.5, rel=0.1)
    same = summary["same"]["vs_baseline"]
    assert same["verdict"] == "no significant difference"
    assert same["log_auc"]["ci95"][0] < 0 < same["log_auc"]["ci95"][1]
    slow = summary["slow"]["vs_baseline"]
    assert slow["seeds"] == 3 and slow["verdict"] == "slower"  # paired on the 3 seeds both arms ran
    assert slow["thresholds"]["100%"]["ratio"] == 0.0 and slow["thresholds"]["100%"]["per_seed"] == [None] * 3
    band = summary["uniform"]["band95"]
    assert all(lo <= m <= hi for lo, m, hi in zip(band[0], summary["uniform"]["mean"], band[1]))
    table = bench.table(summary, ["uniform", "fast", "same", "slow"])
    assert "| fast | 8 |" in table and "faster" in table and "no significant difference" in table
    slow_row = next(line for line in table.splitlines() if line.startswith("| slow |"))
    assert "not reached [" in slow_row and "0.00x" not in slow_row  # the 100% threshold the slow arm never reaches


def test_arm_specs_and_schedule():
    assert bench.parse_arms("uniform,speed_dual:3,p2", 8) == {"uniform": 8, "speed_dual": 3, "p2": 8}
    for bad, needle in (("uniform", "at least one more"), ("uniform,nope", "unknown arm"),
                        ("uniform,p2,p2", "twice"), ("uniform,p2:x", "integer"), ("uniform,p2:0", "at least 1")):
        with pytest.raises(ValueError, match=needle):
            bench.parse_arms(bad, 5)
    args = bench.parse_args(["--arms", "uniform,speed,p2:1", "--seeds", "2", "--out", "x.json"])
    assert bench.schedule(args) == [("uniform", 0), ("speed", 0), ("p2", 0), ("uniform", 1), ("speed", 1)]
    cmd = bench.trainer_command(args, "d.beton", "speed_dual", 3, "rd")
    assert cmd[cmd.index("--strategy") + 1] == "speed" and "--dual" in cmd and "--eval-online" in cmd
    cmd = bench.trainer_command(args, "d.beton", "asym_only", 0, "rd")
    assert cmd[cmd.index("--weighting") + 1] == "none" and "--no-dual" in cmd
    # The presets run SpeeD with dual: an arm without it says so, and the trainer takes it.
    cmd = bench.trainer_command(args, "d.beton", "speed", 0, "rd")
    assert "--no-dual" in cmd and "--dual" not in cmd
    from speed_fast.training.config import parse_args as trainer_args
    configs = os.path.join(bench.ROOT, "train", "configs")
    for flag, dual in (([], True), (["--no-dual"], False), (["--dual"], True)):
        cfg, _ = trainer_args(["--preset", "digits", *flag], configs)
        assert cfg.strategy_params["dual"] is dual, flag
    # The adaptive arms: the trainer parses the bench's flags into the loss_moment strategy's parameters.
    for arm, iw in (("loss_moment", False), ("loss_moment_iw", True)):
        cmd = bench.trainer_command(args, "d.beton", arm, 0, "rd")
        cfg, _ = trainer_args(cmd[cmd.index("--preset"):], configs)
        assert cfg.strategy == "loss_moment" and cfg.strategy_params.get("importance_weights", False) is iw, cmd


def test_clts_ramp_scales_with_the_run():
    assert bench.arm_params("clts", 3000) == {"ramp_steps": 375}
    assert bench.arm_params("clts", 4) == {"ramp_steps": 1}
    assert bench.arm_params("speed_dual", 3000) == bench.ARMS["speed_dual"][1]


def test_the_benchmark_end_to_end(tmp_path):
    """The README's command at toy size, through every stage: real trainer runs (2 arms x 1 seed),
    the held-out per-area MSE of each final checkpoint, the summary, the plot and the JSON; then a
    rerun reuses the finished runs (the per-(arm, seed) cache) and writes the same summary."""
    import json
    import subprocess
    import sys

    out = tmp_path / "conv.json"
    cmd = [sys.executable, str(_PATH), "--dataset", "digits", "--steps", "4", "--eval-every", "1",
           "--eval-samples", "16", "--arms", "uniform,clts", "--seeds", "1", "--bootstrap", "200",
           "--work-dir", str(tmp_path / "runs"), "--out", str(out), "--jobs", "2",
           "--trainer-arg=--sample-steps=2", "--trainer-arg=--eval-sampler=ddim3"]  # toy samplers: CI time
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    assert "2 of 2 runs to do" in first.stdout
    doc = json.loads(out.read_text())
    assert doc["seeds"] == {"uniform": [0], "clts": [0]}
    # the code the rules came from: this checkout's commit (a git checkout in CI and here)
    import subprocess as sp
    head = sp.run(["git", "-C", os.path.dirname(os.path.dirname(str(_PATH))), "rev-parse", "HEAD"],
                  capture_output=True, text=True)
    assert doc["meta"]["code"]["commit"] == (head.stdout.strip() if head.returncode == 0 else None)
    assert doc["meta"]["code"]["trained_here"] is True
    assert os.path.getsize(tmp_path / "conv.png") > 1000
    for r in doc["results"]:
        assert r["steps"] == [1, 2, 3, 4] and len(r["quality"]) == 4
        assert set(r["area_mse_heldout"]) == set(AREAS) and all(v > 0 for v in r["area_mse_heldout"].values())
    with open(tmp_path / "runs" / "clts-seed0" / "config.json") as f:
        assert json.load(f)["train"]["strategy_params"]["ramp_steps"] == 1  # 4 steps / 8, at least 1
    vs = doc["summary"]["clts"]["vs_baseline"]
    assert vs["seeds"] == 1 and set(vs["thresholds"]) == {"50%", "75%", "100%"}
    assert "| clts | 1 |" in doc["table"]
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert again.returncode == 0 and "0 of 2 runs to do" in again.stdout, again.stderr[-3000:]
    assert json.loads(out.read_text())["summary"] == doc["summary"]
    # --finished-only trains nothing: p2 has no finished run and is left out, the rest is summarised.
    partial = [*cmd[:cmd.index("--arms")], "--arms", "uniform,clts,p2", *cmd[cmd.index("--arms") + 2:]]
    partial[partial.index(str(out))] = str(tmp_path / "partial.json")
    third = subprocess.run(partial + ["--finished-only"], capture_output=True, text=True, timeout=900, env=env)
    assert third.returncode == 0, third.stderr[-3000:]
    assert "finished runs summarised: {'uniform': 1, 'clts': 1}" in third.stdout
    assert json.loads((tmp_path / "partial.json").read_text())["summary"] == doc["summary"]
    # --reuse: the committed JSON stands in for run directories this machine does not have.
    moved = [*cmd[:cmd.index("--work-dir")], "--work-dir", str(tmp_path / "empty"), *cmd[cmd.index("--work-dir") + 2:]]
    moved[moved.index(str(out))] = str(tmp_path / "reused.json")
    fourth = subprocess.run(moved + ["--reuse", str(out)], capture_output=True, text=True, timeout=900, env=env)
    assert fourth.returncode == 0 and "0 of 2 runs to do" in fourth.stdout, fourth.stderr[-3000:]
    assert "reused from" in fourth.stdout and not os.listdir(tmp_path / "empty")
    assert json.loads((tmp_path / "reused.json").read_text())["summary"] == doc["summary"]
    other = [*moved[:moved.index("--eval-samples")], "--eval-samples", "8", *moved[moved.index("--eval-samples") + 2:]]
    fifth = subprocess.run(other + ["--reuse", str(out), "--finished-only"], capture_output=True, text=True,
                           timeout=900, env=env)
    assert fifth.returncode != 0 and "eval_samples 16 there, 8 here" in fifth.stderr, fifth.stderr[-3000:]


def test_the_adaptive_trace_is_read_oldest_first(tmp_path):
    """sampler_trace reads adaptive_speed's (k, tau) per update from a final checkpoint's sampler.pt:
    a real FusedSpeeD state after a few updates, and the ring once more updates than rows were made."""
    import torch

    from speed_fast.ops import FusedSpeeD
    from speed_fast.schedule import NoiseSchedule
    from speed_fast.timesteps import make_strategy

    lin = NoiseSchedule.make("linear")
    fused = FusedSpeeD(lin, make_strategy("adaptive_speed", lin, bins=10, history=2, update_every=1), seed=0)
    x0 = torch.zeros(64, 1, 2, 2)
    for step in range(5):
        t, _ = fused.sample_and_noise(x0, step=step)
        fused.observe(t, torch.exp(-t / 100.0) * 0.5 ** step)  # falling losses: k and tau move
        fused.end_step(step + 1)
    ckpt = tmp_path / "checkpoints" / "step-00000005"
    ckpt.mkdir(parents=True)
    state = fused.adaptive.state_dict()
    torch.save(state, ckpt / "sampler.pt")
    trace = bench.sampler_trace(str(tmp_path), 5)
    assert len(trace) == 5 and trace[-1] == [float(fused.adaptive.k), float(fused.adaptive.tau)]
    assert trace[0] == [5.0, 700.0] and trace != [trace[0]] * 5  # the start, then it moved
    assert bench.sampler_trace(str(tmp_path), 4) is None  # no such checkpoint
    # 1030 updates in a ring of 1024 rows: row (w - 1) % 1024 holds update w; oldest first is update 7.
    rows = torch.zeros(1024, 2, dtype=torch.float64)
    for w in range(7, 1031):
        rows[(w - 1) % 1024, 0] = w
    ring = dict(state, windows=torch.tensor(1030), trace=rows)
    torch.save(ring, ckpt / "sampler.pt")
    assert [k for k, _ in bench.sampler_trace(str(tmp_path), 5)] == [float(w) for w in range(7, 1031)]
    png = tmp_path / "t_adaptive.png"
    assert bench.plot_traces([{"arm": "uniform", "seed": 0, "sampler_trace": None}], str(png)) is None
    assert bench.plot_traces([{"arm": "adaptive_speed", "seed": 0, "sampler_trace": trace}], str(png)) == str(png)
    assert png.stat().st_size > 1000


def test_the_text_to_image_benchmark_end_to_end(tmp_path):
    """--dataset digits-t2i at toy size: the captioned digits and the digits-t2i preset's text model, two
    arms trained and evaluated on their captions, the held-out per-area MSE under each record's caption."""
    import json
    import subprocess
    import sys

    out = tmp_path / "t2i.json"
    cmd = [sys.executable, str(_PATH), "--dataset", "digits-t2i", "--steps", "2", "--eval-every", "1",
           "--eval-samples", "8", "--arms", "uniform,speed_dual", "--seeds", "1", "--bootstrap", "100",
           "--work-dir", str(tmp_path / "runs"), "--out", str(out), "--jobs", "2", "--trainer-arg=--sample-steps=2",
           "--trainer-arg=--eval-sampler=ddim3", "--trainer-arg=--global-batch=16"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["meta"]["preset"] == "digits-t2i" and doc["seeds"] == {"uniform": [0], "speed_dual": [0]}
    for r in doc["results"]:
        assert r["steps"] == [1, 2] and all(np.isfinite(r["quality"]))
        assert set(r["area_mse_heldout"]) == set(AREAS) and all(v > 0 for v in r["area_mse_heldout"].values())
    with open(tmp_path / "runs" / "uniform-seed0" / "config.json") as f:
        config = json.load(f)
    assert config["t2i_config"]["text_width"] == 32 and config["train"]["caption_dropout"] == 0.1
