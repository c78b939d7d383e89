"""speed_fast.distributed: one job on N ranks under a real launcher (torchrun, gloo on the CPU).
Checked: the shards are disjoint and complete, an input error on one rank fails every rank alike and
is printed once, rank 0 holds the job's output lock (its own ranks never refused, a second job
refused), and the deepspeed launcher's `--local_rank=N` never reaches a command's parser."""

import os
import subprocess
import sys
import textwrap

import pytest

from speed_fast.cli import strip_local_rank
from speed_fast.distributed import Job, launch_job, launcher_env

WORKER = textwrap.dedent("""
    import json, os, sys, time
    from speed_fast.distributed import launch_job

    mode, out = sys.argv[1], sys.argv[2]

    def check(fail_rank):
        if int(os.environ["RANK"]) == fail_rank:
            raise ValueError(f"bad input seen by rank {fail_rank}")
        return "ok"

    try:
        with launch_job("cpu") as job:
            if mode == "shard":
                mine = list(job.shard(11))
                every = job.all_gather(mine)
                same = job.broadcast({"from": job.rank})
                # one file per rank: two ranks' prints share torchrun's stdout and can interleave
                with open(f"{out}.{job.rank}.json", "w") as f:
                    json.dump({"rank": job.rank, "world": job.world, "every": every, "same": same}, f)
            elif mode.startswith("fail"):
                job.agree(check, int(mode[4:]))
            elif mode == "lock":
                with job.output_lock(out, "test"):
                    job.barrier()
                    if job.is_main:
                        open(out + ".started", "w").close()
                    time.sleep(float(sys.argv[3]))
                    job.barrier()
    except ValueError as exc:
        if getattr(exc, "echo", True):
            print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
""")


def torchrun(tmp_path, *args, nproc=2, wait=True):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(script), *map(str, args)]
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)


def test_shards_are_disjoint_and_complete_and_objects_travel(tmp_path):
    import json

    r = torchrun(tmp_path, "shard", tmp_path / "shard")
    assert r.returncode == 0, r.stderr
    lines = [json.loads((tmp_path / f"shard.{rank}.json").read_text()) for rank in (0, 1)]
    assert sorted(x["rank"] for x in lines) == [0, 1] and all(x["world"] == 2 for x in lines)
    every = lines[0]["every"]
    assert every == lines[1]["every"]
    assert sorted(i for part in every for i in part) == list(range(11))
    assert all(x["same"] == {"from": 0} for x in lines)


@pytest.mark.parametrize("fail_rank", [0, 1])
def test_an_input_error_on_one_rank_fails_every_rank_and_is_said_once(tmp_path, fail_rank):
    r = torchrun(tmp_path, f"fail{fail_rank}", tmp_path / "unused")
    assert r.returncode != 0
    said = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(said) == 1, r.stderr
    assert f"bad input seen by rank {fail_rank}" in said[0]
    if fail_rank == 1:
        assert "(on rank 1)" in said[0]


def test_rank0_holds_the_jobs_lock_and_a_second_job_is_refused(tmp_path):
    import time

    out = tmp_path / "out.bin"
    first = torchrun(tmp_path, "lock", out, 20, wait=False)
    try:
        deadline = time.time() + 120
        while not (tmp_path / "out.bin.started").exists():
            assert first.poll() is None, first.communicate()
            assert time.time() < deadline, "the first job never started"
            time.sleep(0.2)
        second = torchrun(tmp_path, "lock", out, 0)
        assert second.returncode != 0
        said = [line for line in second.stderr.splitlines() if line.startswith("error:")]
        assert len(said) == 1 and "being written by another test" in said[0], second.stderr
    finally:
        stdout, stderr = first.communicate(timeout=120)
    assert first.returncode == 0, stderr  # its own rank 1 was never refused
    assert not (tmp_path / "out.bin.lock").exists()


def test_one_process_needs_no_launcher(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert launcher_env() == (0, 1, 0)
    with launch_job("cpu") as job:
        assert (job.rank, job.world, job.is_main) == (0, 1, True)
        assert list(job.shard(3)) == [0, 1, 2] and job.all_gather(5) == [5] and job.broadcast(7) == 7
        with pytest.raises(ValueError, match="nope"):
            job.agree(lambda: (_ for _ in ()).throw(ValueError("nope")))


@pytest.mark.parametrize("env, message", [({"WORLD_SIZE": "2", "RANK": "2"}, "0 <= RANK < WORLD_SIZE"),
                                          ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not an integer")])
def test_a_broken_launcher_environment_is_named(monkeypatch, env, message):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValueError, match=message):
        launcher_env()


def test_a_fixed_gpu_is_refused_in_a_multi_rank_job(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match="each rank takes the GPU of its LOCAL_RANK"):
        with launch_job("cuda:1"):
            pass


def test_deepspeeds_local_rank_never_reaches_a_commands_parser():
    assert strip_local_rank(["--local_rank=1", "sample", "--ckpt", "r"]) == ["sample", "--ckpt", "r"]
    assert strip_local_rank(["--local_rank", "0", "eval", "--gen", "g"]) == ["eval", "--gen", "g"]
    assert strip_local_rank(["sample", "--local_rank=1"]) == ["sample", "--local_rank=1"]  # a command's own flag
    assert Job().shard(0) == range(0, 0, 1)
