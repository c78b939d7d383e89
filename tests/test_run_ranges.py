"""Every run-wide value is checked once, where the run is resolved: sent out of range through
train/main.py (a real subprocess, as a user runs it), each stops the job with exit status 2 and
one line on stderr that names the flag and its range, before an engine is built or a run
directory is made. The seed also through the launcher with 2 ranks."""

import os
import re
from concurrent.futures import ThreadPoolExecutor

import pytest

from ds_launch import MAIN, deepspeed_cmd, run, tiny_preset

# (flags, what the one line must say). The tiny preset: global batch 16, micro batch 4, 1 rank:
# accumulation 4, so 2^32 micro-steps are 2^30 steps.
CASES = {
    "seed-2^64": (["--seed", str(2**64)], "--seed must be an integer in [0, 2^64), got 18446744073709551616"),
    "seed-negative": (["--seed=-1"], "--seed must be an integer in [0, 2^64), got -1"),
    "max-steps-micro-steps": (["--max-steps", str(2**30 + 1)],
                              f"--max-steps must be an integer in [1, {2**30}] (2^32 micro-steps at 4 per step"),
    "max-steps-0": (["--max-steps", "0"], "--max-steps must be an integer >= 1, got 0"),
    "global-batch": (["--global-batch", "0"], "--global-batch must be an integer >= 1, got 0"),
    "micro-batch": (["--micro-batch", "0"], "--micro-batch must be an integer >= 1, got 0"),
    "log-every": (["--log-every", "0"], "--log-every must be an integer >= 1, got 0"),
    "ckpt-every": (["--ckpt-every", "0"], "--ckpt-every must be an integer >= 1, got 0"),
    "keep-ckpts": (["--keep-ckpts", "0"], "--keep-ckpts must be an integer >= 1, got 0"),
    "max-nonfinite": (["--max-nonfinite", "0"], "--max-nonfinite must be an integer >= 1, got 0"),
    "warmup-steps": (["--warmup-steps=-1"], "--warmup-steps must be an integer >= 0, got -1"),
    "eval-every": (["--eval-every=-1"], "--eval-every must be an integer >= 0, got -1"),
    "eval-samples": (["--eval-every", "10", "--eval-samples", "1"], "--eval-samples must be >= 2"),
    "num-workers": (["--num-workers", "100000"], "--num-workers must be <= "),
    "lr": (["--lr", "2"], "--lr must be a number in (0.0, 1.0], got 2.0"),
    "weight-decay": (["--weight-decay", "1.5"], "--weight-decay must be a number in [0.0, 1.0], got 1.5"),
    "ema-decay": (["--ema-decay", "1"], "--ema-decay must be a number in [0.0, 1.0), got 1.0"),
    "grad-clip": (["--grad-clip=-1"], "--grad-clip must be a number in [0.0, inf), got -1.0"),
    "sample-cfg": (["--sample-cfg", "nan"], "--sample-cfg must be a number in [0.0, inf), got nan"),
    "k": (["--k", "0.5"], "k must be a finite number in [1.0, inf), got 0.5"),
    "lam": (["--lam", "2"], "lam must be a finite number in [0.5, 1.0], got 2.0"),
    "tau": (["--tau", "5000"], "tau must be an integer in [1, 1000], got 5000"),
}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from speed_fast.data import ensure_digits_beton

    tmp = tmp_path_factory.mktemp("ranges")
    preset = tiny_preset(str(tmp / "tiny.json"), ensure_digits_beton())

    def one(name):
        flags, _ = CASES[name]
        run_dir = tmp / name
        proc = run([os.environ.get("PYTHON", __import__("sys").executable), MAIN, "--preset", preset,
                    "--run-dir", str(run_dir), *flags], timeout=300)
        return proc, run_dir

    with ThreadPoolExecutor(2) as pool:  # ~3 s each: parsing and resolving only
        return dict(zip(CASES, pool.map(one, CASES)))


@pytest.mark.parametrize("name", CASES)
def test_an_out_of_range_value_stops_the_run_with_one_line(results, name):
    proc, run_dir = results[name]
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("train/main.py: error: ") and CASES[name][1] in lines[0], lines[0]
    assert not run_dir.exists()  # nothing was started


def test_the_seed_is_checked_before_the_engine_on_two_ranks(tmp_path):
    proc = run(deepspeed_cmd(MAIN, ["--seed", str(2**64), "--max-steps", "1", "--run-dir", str(tmp_path / "run")]),
               timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert lines == ["train/main.py: error: --seed must be an integer in [0, 2^64), got 18446744073709551616"], \
        proc.stderr[-3000:]
    assert not re.search(r"Traceback|DeepSpeed (info|Engine)", proc.stdout + proc.stderr)
    assert not (tmp_path / "run").exists()
