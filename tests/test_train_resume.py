"""Exact resume through the real entry point: `deepspeed --num_gpus 2 train/main.py` (ZeRO-2, 2 CPU
ranks, gradient accumulation 2) run straight for N steps, versus the same run stopped by SIGTERM
(clean preemption: checkpoint, exit 0), resumed, killed with SIGKILL (no warning: resume from the
last periodic checkpoint, half-written ones ignored), and resumed to N. Every logged loss and the
final weights must be identical."""

import os
import signal
import time

import psutil
import pytest
import torch

from ds_launch import MAIN, deepspeed_cmd, metrics, popen, run, tiny_preset

N = 60


def _wait_for_steps(proc, run_dir, n, timeout=240):
    start = time.monotonic()
    while len(metrics(run_dir)) < n:
        assert proc.poll() is None, f"run ended (rc={proc.returncode}) before step {n}"
        assert time.monotonic() - start < timeout, f"no step {n} after {timeout} s"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from speed_fast.data import ensure_digits_beton

    base = tmp_path_factory.mktemp("resume")
    data = ensure_digits_beton()
    preset = tiny_preset(str(base / "tiny.json"), data)
    straight, interrupted = str(base / "straight"), str(base / "interrupted")
    args = ["--preset", preset, "--max-steps", str(N)]

    a = run(deepspeed_cmd(MAIN, args + ["--run-dir", straight]), timeout=300)
    assert a.returncode == 0, a.stdout[-2000:] + a.stderr[-3000:]

    # 1. SIGTERM to the whole job (as a cluster scheduler or Ctrl-C delivers it: every process; the
    #    DeepSpeed launcher also forwards one to the ranks): they agree, save, exit 0.
    log1 = str(base / "sigterm.log")
    p = popen(deepspeed_cmd(MAIN, args + ["--run-dir", interrupted]), log1)
    _wait_for_steps(p, interrupted, 5)
    job = [p_ for p_ in psutil.Process(p.pid).children(recursive=True)]
    os.killpg(p.pid, signal.SIGTERM)
    p.wait(timeout=120)
    _, alive = psutil.wait_procs(job, timeout=120)
    assert not alive
    with open(log1) as f:
        sigterm_log = f.read()
    stopped_at = metrics(interrupted)[-1]["step"]

    # 2. Resume, with a checkpoint every 5 steps, then SIGKILL the whole job (launcher and ranks).
    log2 = str(base / "sigkill.log")
    p = popen(deepspeed_cmd(MAIN, args + ["--run-dir", interrupted, "--ckpt-every", "5"]), log2)
    _wait_for_steps(p, interrupted, stopped_at + 12)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait(timeout=60)
    killed_at = metrics(interrupted)[-1]["step"]

    # 3. Resume to the end (the same command; --resume makes a missing checkpoint an error).
    c = run(deepspeed_cmd(MAIN, args + ["--run-dir", interrupted, "--resume"]), timeout=300)
    assert c.returncode == 0, c.stdout[-2000:] + c.stderr[-3000:]
    return {"straight": straight, "interrupted": interrupted, "sigterm_log": sigterm_log,
            "stopped_at": stopped_at, "killed_at": killed_at, "resume_log": c.stderr}


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(runs):
    assert 5 <= runs["stopped_at"] < N
    # Printed by rank 0 after both ranks passed the checkpoint's final barrier.
    assert f"stopped by signal at step {runs['stopped_at']}; checkpoint " in runs["sigterm_log"]
    assert f"step-{runs['stopped_at']:08d}" in runs["sigterm_log"]
    assert runs["killed_at"] > runs["stopped_at"]
    assert "resuming from" in runs["resume_log"]


def test_every_step_after_resume_equals_the_uninterrupted_run(runs):
    # Bit for bit: the runs use CPU ranks even on a GPU machine (ds_launch.env), because only CPU
    # arithmetic repeats exactly; on CUDA, atomics in backward and cuBLAS kernel choices differ in rounding.
    a, b = metrics(runs["straight"]), metrics(runs["interrupted"])
    assert [r["step"] for r in a] == list(range(1, N + 1))
    assert [r["step"] for r in b] == list(range(1, N + 1))  # no duplicates from the killed segment
    for ra, rb in zip(a, b):
        for key in ("loss", "mse", "vb", "grad_norm", "loss_acceleration", "loss_deceleration",
                    "loss_convergence", "lr", "epoch"):
            assert ra[key] == rb[key], (ra["step"], key, ra[key], rb[key])


def test_final_weights_and_ema_are_identical(runs):
    def final(run_dir, name):
        with open(os.path.join(run_dir, "checkpoints", "latest")) as f:
            tag = f.read().strip()
        assert tag == f"step-{N:08d}"
        return torch.load(os.path.join(run_dir, "checkpoints", tag, name), weights_only=True)

    for name in ("model.pt", "ema.pt"):
        a, b = final(runs["straight"], name), final(runs["interrupted"], name)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)


def test_run_directory_layout(runs):
    d = runs["straight"]
    for name in ("config.json", "metrics.jsonl", "samples.png", "loss.png"):
        assert os.path.isfile(os.path.join(d, name)), name
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(d, "tensorboard")))
    rec = metrics(d)[-1]
    for key in ("step", "loss", "lr", "grad_norm", "samples_per_s", "loss_acceleration", "loss_deceleration",
                "loss_convergence", "frac_acceleration", "mean_weight", "skipped_steps"):
        assert key in rec, key
    assert not [x for x in os.listdir(os.path.join(runs["interrupted"], "checkpoints")) if x.startswith(".tmp-")]


def test_load_for_inference_reads_the_run(runs):
    from speed_fast.training import load_for_inference

    model, config, schedule, meta = load_for_inference(runs["straight"], ema=True)
    assert config["train"]["max_steps"] == N and schedule.T == 1000 and meta["num_classes"] == 10
    out = model(torch.zeros(2, 1, 8, 8), torch.tensor([5, 500]), torch.tensor([1, 2]))
    assert out.shape == (2, 2, 8, 8) and torch.isfinite(out).all()
