"""Helpers for the trainer tests: launch real DeepSpeed jobs (2 CPU ranks, also where there is a GPU) and read
their runs."""

import json
import os
import socket
import signal
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = os.path.join(ROOT, "train", "main.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    e = dict(os.environ)
    e["OMP_NUM_THREADS"] = "1"  # 2 ranks on a 2-core machine
    # CPU ranks everywhere, also on a machine with one GPU: the jobs start 2 ranks, and they compare
    # runs bit for bit (CPU arithmetic is deterministic; CUDA's atomics and kernel choices are not).
    e["DS_ACCELERATOR"] = "cpu"
    e.pop("RANK", None), e.pop("WORLD_SIZE", None), e.pop("LOCAL_RANK", None)
    return e


def deepspeed_cmd(script: str, args: list[str], nproc: int = 2, local_rank_flag: bool = True) -> list[str]:
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc),
           "--master_port", str(free_port())]
    if not local_rank_flag:
        cmd.append("--no_local_rank")
    return cmd + [script, *args]


def run(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env(), cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _default_signals() -> None:
    # The launcher's own SIGINT handling (KeyboardInterrupt -> stop the ranks) must not depend on how
    # the test process happens to treat SIGINT (a plugin or an earlier test may ignore or block it;
    # an ignored disposition and the signal mask are inherited across exec).
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT, signal.SIGTERM])


def popen(cmd: list[str], log_path: str) -> subprocess.Popen:
    log = open(log_path, "w")
    return subprocess.Popen(cmd, env=env(), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, preexec_fn=_default_signals)


def metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def tiny_preset(path: str, data: str, **overrides) -> str:
    """A preset JSON for a tiny DiT on `data` (CPU tests)."""
    preset = {
        "model": "custom",
        "dit": {"hidden_size": 32, "depth": 2, "num_heads": 2, "patch_size": 2},
        "data": data,
        "strategy": "speed",
        "strategy_params": {"k": 5.0, "tau": 700, "lam": 0.6},
        "global_batch": 16,
        "micro_batch": 4,
        "lr": 1e-3,
        "warmup_steps": 2,
        "grad_clip": 1.0,
        "ema_decay": 0.9,
        "ema_warmup": True,  # the exact-resume tests then cover the restored warm-up count too
        "zero_stage": 2,
        "ckpt_every": 1000,
        "eval_every": 0,
        "sample_steps": "10",
        "num_workers": 1,
        "progress": False,
        **overrides,
    }
    with open(path, "w") as f:
        json.dump(preset, f)
    return path
