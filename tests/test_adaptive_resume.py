"""Exact resume of an adaptive run through the real entry point on one CPU rank (`python
train/main.py`), for each adaptive strategy: loss_moment with importance weights and adaptive_speed
(SpeeD+dual whose k and tau move), their tables rebuilt every 3 steps. Run straight for N steps,
versus the same run stopped by SIGTERM (it saves and exits), resumed, killed with SIGKILL while it
writes a checkpoint (frozen with SIGSTOP while its `.tmp-` directory exists, so the kill lands
mid-save), and resumed to N. Every logged record and the final weights, EMA and sampler state must
be identical; the sampler must really have moved away from where it started."""

import os
import signal
import sys
import time

import pytest
import torch

from ds_launch import MAIN, metrics, popen, run, tiny_preset

N = 24
# Per strategy, the parameters of the run: tables rebuilt after steps 3, 6, ..., so that both the
# SIGTERM (after step 7) and the SIGKILL (after step 13) land between rebuilds with statistics in flight.
STRATEGIES = {
    "loss_moment": {"bins": 10, "history": 4, "update_every": 3, "importance_weights": True},
    # 5 bins: each gets a loss in most windows of 48 even at SpeeD's suppressed P (k = 5 below tau).
    "adaptive_speed": {"bins": 5, "history": 2, "update_every": 3, "dual": True},
}


def _wait_for_steps(proc, run_dir, n, timeout=240):
    start = time.monotonic()
    while len(metrics(run_dir)) < n:
        assert proc.poll() is None, f"run ended (rc={proc.returncode}) before step {n}"
        assert time.monotonic() - start < timeout, f"no step {n} after {timeout} s"
        time.sleep(0.01)


def _kill_mid_save(proc, ckpt_root, timeout=240) -> str:
    """SIGKILL `proc` while a checkpoint is being written; returns the unfinished directory's name."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        assert proc.poll() is None, f"run ended (rc={proc.returncode}) before a save could be interrupted"
        tmp = [d for d in os.listdir(ckpt_root) if d.startswith(".tmp-")] if os.path.isdir(ckpt_root) else []
        if tmp:
            os.kill(proc.pid, signal.SIGSTOP)
            still = [d for d in os.listdir(ckpt_root) if d.startswith(".tmp-")]
            if still:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=60)
                return still[0]
            os.kill(proc.pid, signal.SIGCONT)  # it had just published: try the next save
        time.sleep(0.0005)
    raise AssertionError(f"no save caught in {timeout} s")


@pytest.fixture(scope="module", params=sorted(STRATEGIES))
def runs(request, tmp_path_factory):
    from speed_fast.data import ensure_digits_beton

    name = request.param
    base = tmp_path_factory.mktemp(f"adaptive_resume_{name}")
    preset = tiny_preset(str(base / "tiny.json"), ensure_digits_beton(), strategy=name,
                         strategy_params=STRATEGIES[name])
    straight, interrupted = str(base / "straight"), str(base / "interrupted")
    args = [sys.executable, MAIN, "--preset", preset]

    a = run(args + ["--max-steps", str(N), "--run-dir", straight], timeout=300)
    assert a.returncode == 0, a.stdout[-2000:] + a.stderr[-3000:]

    # 1. SIGTERM after step 7 (two rebuilds done): the rank saves and exits 0.
    p = popen(args + ["--max-steps", "100000", "--run-dir", interrupted], str(base / "sigterm.log"))
    _wait_for_steps(p, interrupted, 7)
    os.kill(p.pid, signal.SIGTERM)
    assert p.wait(timeout=120) == 0
    stopped_at = metrics(interrupted)[-1]["step"]

    # 2. Resume, a checkpoint every step, and SIGKILL in the middle of one of them (after step 13).
    ckpt_root = os.path.join(interrupted, "checkpoints")
    p = popen(args + ["--max-steps", str(N), "--run-dir", interrupted, "--ckpt-every", "1"],
              str(base / "sigkill.log"))
    _wait_for_steps(p, interrupted, 13)
    unfinished = _kill_mid_save(p, ckpt_root)
    killed_at = metrics(interrupted)[-1]["step"]

    # 3. Resume to the end.
    c = run(args + ["--max-steps", str(N), "--run-dir", interrupted, "--resume"], timeout=300)
    assert c.returncode == 0, c.stdout[-2000:] + c.stderr[-3000:]
    return {"strategy": name, "straight": straight, "interrupted": interrupted, "stopped_at": stopped_at,
            "killed_at": killed_at, "unfinished": unfinished, "resume_log": c.stderr}


def test_interruptions_happened_where_intended(runs):
    assert 7 <= runs["stopped_at"] < 13 <= runs["killed_at"] < N
    assert runs["unfinished"].startswith(".tmp-step-")  # the kill landed in a save
    assert "resuming from" in runs["resume_log"]


def test_every_record_after_resume_equals_the_uninterrupted_run(runs):
    a, b = metrics(runs["straight"]), metrics(runs["interrupted"])
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, N + 1))
    for ra, rb in zip(a, b):
        for key in ("loss", "mse", "vb", "grad_norm", "mean_weight", "loss_acceleration", "loss_deceleration",
                    "loss_convergence", "frac_acceleration", "frac_deceleration", "frac_convergence"):
            assert ra[key] == rb[key], (ra["step"], key, ra[key], rb[key])
    if runs["strategy"] == "loss_moment":
        # The importance weights follow the adapted P(t): the mean weight leaves 1 once the bins are full.
        assert any(abs(r["mean_weight"] - 1.0) > 1e-3 for r in a)


def test_final_weights_ema_and_sampler_are_identical(runs):
    def final(run_dir, name):
        path = os.path.join(run_dir, "checkpoints", f"step-{N:08d}", name)
        return torch.load(path, weights_only=True)

    for name in ("model.pt", "ema.pt", "sampler.pt"):
        a, b = final(runs["straight"], name), final(runs["interrupted"], name)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
    sampler = final(runs["straight"], "sampler.pt")
    params = STRATEGIES[runs["strategy"]]
    if runs["strategy"] == "loss_moment":
        assert int(sampler["counts"].min()) >= params["history"]
        assert not torch.equal(sampler["prob"], torch.ones(1000))  # an adapted table, not the uniform one
        assert not torch.equal(sampler["weights"], torch.ones(1000))
    else:  # k and tau moved from SpeeD's start (5, 700), and the table in force is SpeeD's for them
        from speed_fast.alias import implied_probabilities
        from speed_fast.schedule import NoiseSchedule
        from speed_fast.timesteps import make_strategy

        updates = N // params["update_every"]
        assert int(sampler["windows"]) == updates
        trace = sampler["trace"][:updates].tolist()
        assert trace[-1] == [float(sampler["k"]), float(sampler["tau"])]
        assert any(k != 5.0 for k, _ in trace) and any(tau != 700.0 for _, tau in trace), trace
        now = make_strategy("speed", NoiseSchedule.make("linear"), k=float(sampler["k"]), tau=int(sampler["tau"]),
                            lam=0.6, dual=True)
        assert torch.allclose(implied_probabilities(sampler["prob"], sampler["alias"]), now.probs(), atol=1e-6)
        assert torch.equal(sampler["weights"], now.weights.float())
