"""Exact resume through the real entry point: `deepspeed --num_gpus 2 train/main.py` (ZeRO-2, 2 CPU
ranks, gradient accumulation 2) run straight for N steps, versus the same run stopped by SIGTERM
sent to the `deepspeed` command alone (the ranks notice, save and exit; nothing is left running),
resumed, killed with SIGKILL (no warning), and resumed to N after its newest checkpoint was
damaged (resume walks back to the one before; half-written ones are ignored). Every logged loss
and the final weights must be identical. While the first leg runs, a second trainer on the same
run directory is refused."""

import os
import signal
import socket
import sys
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

    # 1. SIGTERM to the `deepspeed` process alone (what `timeout` and many supervisors send): it
    #    dies at once without telling its child launch.py; the ranks notice, agree, save, exit 0,
    #    and launch.py ends with them. --max-steps is far away so only the signal can stop the job.
    log1 = str(base / "sigterm.log")
    p = popen(deepspeed_cmd(MAIN, args[:-1] + ["100000", "--run-dir", interrupted]), log1)
    _wait_for_steps(p, interrupted, 3)
    job = [p_ for p_ in psutil.Process(p.pid).children(recursive=True)]
    rank0 = next(c for c in job if "--local_rank=0" in c.cmdline())
    ranks = [c for c in job if "--local_rank=" in " ".join(c.cmdline())]
    for r in ranks:  # paused (still holding the lock) while a second trainer tries the run directory
        r.suspend()
    second = run([sys.executable, MAIN] + args + ["--run-dir", interrupted], timeout=300)
    for r in ranks:
        r.resume()
    assert second.returncode == 2, second.stderr[-3000:]
    assert (f"{interrupted} is in use by another trainer: host {socket.gethostname()}, pid {rank0.pid}"
            in second.stderr), second.stderr[-3000:]
    os.kill(p.pid, signal.SIGTERM)
    assert p.wait(timeout=60) == -signal.SIGTERM  # the launcher itself is gone at once
    _, alive = psutil.wait_procs(job, timeout=120)
    assert not alive, [a.cmdline() for a in alive]
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

    # 3. Damage the newest checkpoint (a half-copied rank file), then resume to the end (the same
    #    command; --resume makes a missing checkpoint an error): it walks back to the one before.
    tags = sorted(t for t in os.listdir(os.path.join(interrupted, "checkpoints")) if t.startswith("step-"))
    damaged, fallback = tags[-1], tags[-2]
    rng1 = os.path.join(interrupted, "checkpoints", damaged, "rng-rank1.pt")
    with open(rng1, "r+b") as f:
        f.truncate(os.path.getsize(rng1) // 2)
    c = run(deepspeed_cmd(MAIN, args + ["--run-dir", interrupted, "--resume"]), timeout=300)
    assert c.returncode == 0, c.stdout[-2000:] + c.stderr[-3000:]
    return {"straight": straight, "interrupted": interrupted, "sigterm_log": sigterm_log,
            "stopped_at": stopped_at, "killed_at": killed_at, "resume_log": c.stderr,
            "damaged": damaged, "fallback": fallback}


def test_sigterm_to_the_launcher_saves_a_checkpoint_and_exits_cleanly(runs):
    assert 3 <= runs["stopped_at"] < N
    # Printed by rank 0 after both ranks passed the checkpoint's final barrier.
    log = runs["sigterm_log"]
    assert "stopped (the deepspeed launcher (pid " in log, log[-3000:]
    assert f") is gone) at step {runs['stopped_at']}; checkpoint " in log, log[-3000:]
    assert f"step-{runs['stopped_at']:08d}" in runs["sigterm_log"]
    assert runs["killed_at"] > runs["stopped_at"]


def test_resume_walks_back_from_a_damaged_checkpoint(runs):
    log = runs["resume_log"]
    assert f"[speed_fast] skipping checkpoint {runs['damaged']}: " in log and "rng-rank1.pt is " in log, log[-3000:]
    assert f"resuming from {os.path.join(runs['interrupted'], 'checkpoints', runs['fallback'])}" in log
    assert f"[speed_fast] done: {N} steps" in log and "Traceback" not in log


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
