"""Fault injection against the real trainer (issue 12), on one small real run reused for every fault.

The run: the default preset (digits) for 4 steps on one rank with a checkpoint every 2 steps,
through `python train/main.py` (a short run must end cleanly). Copies of it then get, one at a
time: every file of the newest checkpoint corrupted, truncated or deleted (resume walks back to
step 2 and says why); crafted files that would run code when unpickled, with state.json forged
to match (nothing runs: every load refuses, naming the file); a second trainer on the same run
directory (refused, naming the holder) and a dead holder's lock (taken over). The launcher's
signals are injected into a real `deepspeed --num_gpus 2` job of stand-in ranks
(tests/preempt_worker.py); tests/test_train_resume.py signals the real trainer's launcher.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest
import torch

from damage import flip_byte, truncate
from ds_launch import MAIN, ROOT, deepspeed_cmd, env, metrics, popen, run
from speed_fast.training import checkpoint as ckpt
from speed_fast.training import main as train_main
from speed_fast.training.config import parse_args, resolve
from speed_fast.training.runlock import LOCK_FILE, RunLock

CONFIGS = os.path.join(ROOT, "train", "configs")
NEWEST, OLDER = "step-00000004", "step-00000002"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The default preset for 4 steps on one rank, checkpoints at steps 2 and 4 (a 10-step sample
    grid at the end instead of 250 steps: the same code, in a tenth of the time)."""
    d = tmp_path_factory.mktemp("faults")
    run_dir = str(d / "base")
    proc = run([sys.executable, MAIN, "--max-steps", "4", "--ckpt-every", "2", "--keep-ckpts", "3", "--run-dir",
                run_dir, "--sample-steps", "10", "--no-progress"], timeout=600)
    return {"run": run_dir, "proc": proc}


@pytest.fixture
def one_rank(monkeypatch):
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)


def _copy(base, dest) -> str:
    shutil.copytree(base["run"], dest)
    return str(dest)


def test_a_short_run_of_the_default_preset_ends_cleanly(base):
    proc, run_dir = base["proc"], base["run"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "[speed_fast] done: 4 steps" in proc.stderr
    assert [r["step"] for r in metrics(run_dir)] == [1, 2, 3, 4]
    for name in ("config.json", "samples.png", "loss.png"):
        assert os.path.isfile(os.path.join(run_dir, name)), name
    assert not os.path.exists(os.path.join(run_dir, "quality.png"))  # --eval-every 500: nothing evaluated yet
    assert ckpt.checkpoint_tags(os.path.join(run_dir, "checkpoints")) == [OLDER, NEWEST]
    with open(os.path.join(run_dir, "config.json")) as f:
        config = json.load(f)
    assert config["deepspeed"]["zero_optimization"]["stage"] == 1 and config["precision"] == "fp32"
    assert not os.path.exists(os.path.join(run_dir, LOCK_FILE)) or not open(os.path.join(run_dir, LOCK_FILE)).read()


def test_a_short_run_of_the_default_preset_on_two_ranks_ends_cleanly(tmp_path):
    run_dir = str(tmp_path / "run")
    proc = run(deepspeed_cmd(MAIN, ["--max-steps", "2", "--sample-steps", "10", "--run-dir", run_dir, "--no-progress"]),
               timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "[speed_fast] done: 2 steps" in proc.stderr and "Traceback" not in proc.stderr
    assert [r["step"] for r in metrics(run_dir)] == [1, 2]
    assert os.path.isfile(os.path.join(run_dir, "samples.png")) and os.path.isfile(os.path.join(run_dir, "loss.png"))
    assert not os.path.exists(os.path.join(run_dir, "quality.png"))
    assert ckpt.verify(os.path.join(run_dir, "checkpoints", "step-00000002"))["world_size"] == 2


def _drop_world_size(path):
    with open(path) as f:
        state = json.load(f)
    del state["world_size"]
    with open(path, "w") as f:
        json.dump(state, f)


def test_each_damaged_file_of_the_newest_checkpoint_walks_back(base, tmp_path, capsys, one_rank):
    run_dir = _copy(base, tmp_path / "run")
    cfg, _ = parse_args(["--run-dir", run_dir, "--max-steps", "6"], CONFIGS)
    plan = resolve(cfg, 1, CONFIGS, cuda_available=False)
    newest = os.path.join(run_dir, "checkpoints", NEWEST)
    damages = {"corrupted": flip_byte, "truncated": truncate, "deleted": os.remove}
    state_damages = {"deleted": (os.remove, "state.json is missing"),
                     "truncated": (truncate, "JSONDecodeError"),
                     "not text": (lambda p: open(p, "wb").write(b"\xff\xfe\x00{"), "UnicodeDecodeError"),
                     "key missing": (_drop_world_size, "lacks ['world_size']")}
    names = sorted(os.listdir(newest))
    assert len(names) == 6  # state, model, ema, rng, DeepSpeed model states, ZeRO-1 optimizer states
    for name in names:
        path = os.path.join(newest, name)
        cases = state_damages if name == ckpt.STATE_FILE else {k: (fn, name) for k, fn in damages.items()}
        for kind, (damage, reason) in cases.items():
            saved = open(path, "rb").read()
            damage(path)
            assert train_main._resume_path(cfg, plan, rank=0) == os.path.join(run_dir, "checkpoints", OLDER), \
                (name, kind)
            err = capsys.readouterr().err
            assert f"[speed_fast] skipping checkpoint {NEWEST}: " in err and reason in err, (name, kind, err)
            with open(path, "wb") as f:
                f.write(saved)
    assert train_main._resume_path(cfg, plan, rank=0).endswith(NEWEST)  # restored: the newest again

    # Nothing verifies: a clear refusal, not a traceback, and nothing is deleted.
    truncate(os.path.join(newest, "model.pt"))
    os.remove(os.path.join(run_dir, "checkpoints", OLDER, "ema.pt"))
    assert train_main.main(["--run-dir", run_dir, "--max-steps", "6"], CONFIGS) == 2
    err = capsys.readouterr().err
    assert f"none of its checkpoints ['{OLDER}', '{NEWEST}'] verifies" in err and "Traceback" not in err
    assert ckpt.checkpoint_tags(os.path.join(run_dir, "checkpoints")) == [OLDER, NEWEST]


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_crafted_checkpoint_files_never_run(base, tmp_path):
    marker = tmp_path / "code-ran"
    names = ["rng-rank0.pt", "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
             "ema.pt", "model.pt"]
    assert sorted(names) == sorted(n for n in os.listdir(os.path.join(base["run"], "checkpoints", NEWEST))
                                   if n.endswith(".pt"))  # every torch file of a real checkpoint
    cases = []
    for name in names:
        case = _copy(base, tmp_path / name.replace(".pt", ""))
        ckpt_dir = os.path.join(case, "checkpoints", NEWEST)
        torch.save({"state": _RunsCode(marker)}, os.path.join(ckpt_dir, name))
        state_file = os.path.join(ckpt_dir, ckpt.STATE_FILE)
        with open(state_file) as f:
            state = json.load(f)
        state["files"][name] = ckpt.describe_file(os.path.join(ckpt_dir, name))  # forged to match
        with open(state_file, "w") as f:
            json.dump(state, f)
        cases.append(case)
    out = tmp_path / "results.json"
    proc = run([sys.executable, os.path.join(ROOT, "tests", "fault_worker.py"), str(out), base["run"], *cases],
               timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    results = json.loads(out.read_text())
    assert not marker.exists()
    for name, case in zip(names, cases):
        r = results[case]
        resumes_read = name != "model.pt"  # model.pt is for inference; resume restores DeepSpeed's states
        inference_reads = {"inference_ema": name == "ema.pt", "inference_raw": name == "model.pt"}
        if resumes_read:
            assert r["resume"]["error"] == "UnsafeCheckpointError", (name, r)
            assert name in r["resume"]["message"] and "posix.system" in r["resume"]["message"], r
        else:
            assert r["resume"]["error"] is None, (name, r)
        for key, reads in inference_reads.items():
            if reads:
                assert r[key]["error"] == "ValueError" and "refused to load" in r[key]["message"], (name, key, r)
            else:
                assert r[key]["error"] is None, (name, key, r)
    assert results["main_rc"] == 2
    assert "train/main.py: error: " in proc.stderr and "rng-rank0.pt: refused to load" in proc.stderr
    # The control: the same file really runs code when unpickled without restriction.
    torch.load(os.path.join(cases[0], "checkpoints", NEWEST, "rng-rank0.pt"), weights_only=False)
    assert marker.exists()


_HOLDER = """
import sys, time
from speed_fast.training.runlock import RunLock
lock = RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(300)
"""


def test_one_trainer_per_run_directory_and_stale_locks_are_taken_over(base, tmp_path, capsys, one_rank):
    run_dir = _copy(base, tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, run_dir], stdout=subprocess.PIPE, text=True, env=env())
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert train_main.main(["--run-dir", run_dir, "--max-steps", "6"], CONFIGS) == 2
        err = capsys.readouterr().err
        assert (f"{run_dir} is in use by another trainer: host {socket.gethostname()}, pid {holder.pid}"
                in err), err
        holder.kill()  # dies without unlocking: the kernel drops the lock, its details stay in the file
        holder.wait()
    finally:
        if holder.poll() is None:
            holder.kill()
    # The next trainer takes over (here it stops at a later check, --max-steps below the checkpoint).
    assert train_main.main(["--run-dir", run_dir, "--max-steps", "3"], CONFIGS) == 2
    err = capsys.readouterr().err
    assert f"took over the run directory's lock from host {socket.gethostname()}, pid {holder.pid}" in err
    assert "--max-steps 3 is below step 4 of the checkpoint" in err
    lock = RunLock(run_dir).acquire()  # released by the failed start
    assert lock.took_over is None
    lock.release()


def test_a_rank_above_zero_prints_its_error_if_nobody_stops_it(monkeypatch, capsys):
    for name, value in (("RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "1")):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(train_main, "ERROR_GRACE_S", 0.5)
    start = time.monotonic()
    assert train_main.main(["--strategy", "bogus"], CONFIGS) == 2
    assert time.monotonic() - start >= 0.5  # rank 0 (which finds the same error) gets to print first
    assert "train/main.py: error: (rank 1) --strategy must be one of" in capsys.readouterr().err


def _stand_in_job(tmp_path):
    out = tmp_path / "ranks"
    out.mkdir()
    p = popen(deepspeed_cmd(os.path.join(ROOT, "tests", "preempt_worker.py"), [str(out)]), str(tmp_path / "log"))
    start = time.monotonic()
    while not all((out / f"ready-{r}").exists() for r in (0, 1)):
        assert p.poll() is None, open(tmp_path / "log").read()[-3000:]
        assert time.monotonic() - start < 120
        time.sleep(0.05)
    return p, out, psutil.Process(p.pid).children(recursive=True)


@pytest.mark.parametrize("kill", ["SIGINT to the launcher", "SIGKILL to launch.py"])
def test_a_dead_launcher_stops_every_rank(tmp_path, kill):
    p, out, job = _stand_in_job(tmp_path)
    if kill.startswith("SIGINT"):
        os.kill(p.pid, signal.SIGINT)  # the `deepspeed` process alone
        want = f"the deepspeed launcher (pid {p.pid}) is gone"
    else:
        launch = next(c for c in job if any("deepspeed.launcher.launch" in a for a in c.cmdline()))
        launch.kill()  # the kernel sends the ranks SIGTERM (PR_SET_PDEATHSIG)
        want = "SIGTERM"
    # DeepSpeed's launch.py gives its ranks up to 30 s after a signal; on a loaded machine the whole
    # shutdown took over 60 s once (the fresh-clone suite beside a training run), so allow 120.
    p.wait(timeout=120)
    _, alive = psutil.wait_procs(job, timeout=120)
    assert not alive, [a.cmdline() for a in alive]
    for r in (0, 1):
        assert (out / f"stopped-{r}").read_text() == want


def test_sample_and_eval_command_line_edges(base, tmp_path, capsys):
    from speed_fast.cli import main as cli

    run_dir, out = base["run"], str(tmp_path / "grid.png")
    common = ["sample", "--ckpt", run_dir, "--num-samples", "4", "--steps", "5", "--device", "cpu"]
    npz = str(tmp_path / "s.npz")
    # Output paths and flag values are checked before the model is loaded or anything is sampled.
    for extra, message in ((["--out", str(tmp_path)], f"--out '{tmp_path}' is a directory"),
                           (["--out", str(tmp_path / "grid")], "--out '" + str(tmp_path / "grid") + "' must end in"),
                           (["--out", npz, "--grid", str(tmp_path)], f"--grid '{tmp_path}' is a directory"),
                           (["--out", npz, "--grid", str(tmp_path / "g.gif")], "must end in .png"),
                           (["--out", out, "--cfg", "inf"], "--cfg must be a finite number >= 0, got inf"),
                           (["--out", out, "--device", "foo"], "--device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'foo'"),
                           (["--out", out, "--device", "cuda:1"], "CUDA is not available")):
        assert cli(common[:-2] + extra) == 2, extra
        assert message in capsys.readouterr().err, extra
    # A guidance scale that blows the samples up: a non-zero exit that says how many, and no files.
    assert cli(common + ["--cfg", "1e30", "--out", npz, "--grid", out]) == 2
    assert "4 of 4 samples are not finite (NaN or infinity) with --cfg 1e+30" in capsys.readouterr().err
    assert not os.path.exists(out) and not os.path.exists(npz) and not os.path.exists(npz + ".parts")
    assert cli(common + ["--out", npz, "--grid", out]) == 0
    assert os.path.isfile(out) and os.path.isfile(tmp_path / "s.npz")
    # eval: empty or broken array files are named, not a traceback.
    (tmp_path / "empty.npy").write_bytes(b"")
    assert cli(["eval", "--gen", str(tmp_path / "empty.npy"), "--ref", "digits"]) == 2
    assert f"--gen '{tmp_path / 'empty.npy'}' is empty (0 bytes)" in capsys.readouterr().err
    assert cli(["eval", "--gen", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "empty.npy")]) == 2
    assert "--ref" in capsys.readouterr().err
    assert cli(["eval", "--gen", str(tmp_path / "s.npz"), "--ref", "digits", "--device", "foo"]) == 2
    assert "--device must be" in capsys.readouterr().err
