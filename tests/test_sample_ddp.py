"""`speed-fast sample` as one job of one or many ranks (speed_fast.sampling_job): the same bytes for
any number of ranks under torchrun and deepspeed (CPU, gloo), ADM's .npz format, resuming a killed
job, one writer per output, refused settings and bad input; guidance on 3 of 4 channels (DiT's
forward_with_cfg) against an independent computation; bf16 autocast and torch.compile."""

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
import torch
from ds_launch import ROOT, free_port
from test_sampling import PointModel, _tiny_run

from speed_fast.cli import main as cli

N, BATCH = 10, 4  # 3 chunks (4, 4, 2): rank 0 draws two, rank 1 one


def job_env() -> dict:
    e = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    e.update(OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="",
             PYTHONPATH=ROOT + os.pathsep + e.get("PYTHONPATH", ""))
    return e


def speed_fast_script() -> list[str]:
    """`$(which speed-fast)` of this interpreter's environment (else the module)."""
    script = shutil.which("speed-fast", path=os.path.dirname(sys.executable))
    return [script] if script else ["-m", "speed_fast.cli"]


def torchrun(args, nproc=2):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master-port",
            str(free_port()), *speed_fast_script(), *args]


def deepspeed(args, nproc=2):
    script = speed_fast_script()
    assert len(script) == 1, "the deepspeed launcher runs a script file"
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc), "--master_port",
            str(free_port()), script[0], *args]


def launch(cmd, timeout=240):
    proc = subprocess.run(cmd, env=job_env(), cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    return proc


def sample_args(run, out, *extra, n=N, batch=BATCH, steps="5"):
    return ["sample", "--ckpt", str(run), "--num-samples", str(n), "--batch-size", str(batch), "--steps", steps,
            "--cfg", "1.5", "--seed", "3", "--device", "cpu", "--out", str(out), *extra]


def one_line_error(capsys, code, *names):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("[sample]")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    for name in names:
        assert name in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The in-process commands on one thread, as the launched ranks (OMP_NUM_THREADS=1): a tiny
    model's forward pass on two threads of a loaded machine is ~100x slower (threads spinning)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return _tiny_run(tmp_path_factory.mktemp("ddp") / "run", 1, 8)


@pytest.fixture(scope="module")
def reference(run, tmp_path_factory):
    """The one-process output (and grid) of sample_args."""
    d = tmp_path_factory.mktemp("ref")
    assert cli(sample_args(run, d / "s.npz", "--grid", str(d / "g.png"))) == 0
    return d


def test_one_process_writes_adms_format_with_every_sample_seeded_by_its_index(run, reference):
    from speed_fast.generate import generate
    from speed_fast.sampling import to_uint8

    with np.load(reference / "s.npz") as z:
        assert z.files == ["arr_0", "arr_1"]
        images, labels = z["arr_0"], z["arr_1"]
    assert images.dtype == np.uint8 and images.shape == (N, 8, 8, 3)
    assert labels.dtype == np.int64 and labels.shape == (N,)
    assert (images[..., 0] == images[..., 1]).all() and (images[..., 0] == images[..., 2]).all()  # 1 channel x 3
    x, y = generate(str(run), N, steps="5", cfg=1.5, seed=3, batch_size=BATCH, device="cpu", return_labels=True)
    np.testing.assert_array_equal(images[..., 0], to_uint8(x)[:, 0].numpy())
    np.testing.assert_array_equal(labels, y.numpy())
    assert 0 < len(set(labels.tolist())) and images.std() > 10
    assert not os.path.exists(str(reference / "s.npz") + ".parts")  # the finished chunks are removed


def test_eval_reads_the_npz_of_a_one_channel_run_against_its_data(reference, capsys):
    capsys.readouterr()
    assert cli(["eval", "--gen", str(reference / "s.npz"), "--ref", "digits", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n_generated"] == N and result["fd_raw"] > 0


def test_two_ranks_under_torchrun_and_deepspeed_write_the_same_bytes(run, reference, tmp_path):
    proc = launch(torchrun(sample_args(run, tmp_path / "t.npz", "--grid", str(tmp_path / "t.png"))))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "t.npz").read_bytes() == (reference / "s.npz").read_bytes()
    assert (tmp_path / "t.png").read_bytes() == (reference / "g.png").read_bytes()
    assert "3 chunk(s) drawn on 2 rank(s)" in proc.stdout and proc.stdout.count("wrote") == 2  # said once, rank 0
    # Progress on rank 0 only: images of the whole set, images/s and ETA.
    progress = [line for line in proc.stderr.splitlines() if line.startswith("[sample]")]
    assert progress and all(re.fullmatch(r"\[sample\] \d+/10 images, [0-9.e+]+ images/s, ETA \d+m\d\ds", line)
                            for line in progress), progress
    assert progress[-1].startswith("[sample] 10/10 images") and sum("10/10" in line for line in progress) == 1
    proc = launch(deepspeed(sample_args(run, tmp_path / "d.npz")))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert (tmp_path / "d.npz").read_bytes() == (reference / "s.npz").read_bytes()


def test_a_killed_job_resumes_to_the_same_bytes_and_a_second_job_is_refused(run, tmp_path, capsys):
    """A 2-rank job is killed after its first chunks; meanwhile a second job on its output is refused.
    The same command then finishes it (here on one rank) with the bytes of an uninterrupted run; a
    changed flag is refused naming it."""
    n, batch, steps = 12, 2, "1000"  # 6 chunks, 3 per rank (~1 s each): the kill lands before the last
    out = tmp_path / "s.npz"
    parts = tmp_path / "s.npz.parts"
    job = subprocess.Popen(torchrun(sample_args(run, out, "--no-progress", n=n, batch=batch, steps=steps)),
                           env=job_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           start_new_session=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and not (parts.is_dir() and any(p.startswith("chunk-") for p in os.listdir(parts))):
            assert job.poll() is None, job.stdout.read().decode()[-3000:]
            time.sleep(0.05)
        capsys.readouterr()
        code = cli(sample_args(run, out, n=n, batch=batch, steps=steps))
        one_line_error(capsys, code, "is being written by another sample", "pid")
    finally:  # the launcher and its ranks (torchrun may put them in sessions of their own)
        procs = [psutil.Process(job.pid), *psutil.Process(job.pid).children(recursive=True)]
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(signal.SIGKILL)
        _, alive = psutil.wait_procs(procs, timeout=60)
        job.wait()
    assert not alive, alive
    assert not out.exists()
    kept = sorted(p for p in os.listdir(parts) if p.startswith("chunk-"))
    assert 0 < len(kept) < n // batch, kept
    code = cli(sample_args(run, out, "--cfg", "2", n=n, batch=batch, steps=steps))
    line = one_line_error(capsys, code, "--cfg: 1.5 then, 2.0 now", "unfinished chunks")
    assert "--seed" not in line
    assert cli(sample_args(run, out, n=n, batch=batch, steps=steps)) == 0
    assert f"continuing: {len(kept)} finished chunk(s)" in capsys.readouterr().out
    assert cli(sample_args(run, tmp_path / "whole.npz", n=n, batch=batch, steps=steps)) == 0
    assert out.read_bytes() == (tmp_path / "whole.npz").read_bytes()
    assert not parts.exists() and not [f for f in os.listdir(tmp_path) if ".tmp-" in f]


def test_existing_outputs_and_bad_input_get_one_line(run, reference, tmp_path, capsys):
    out = tmp_path / "s.npz"
    shutil.copy(reference / "s.npz", out)
    shutil.copy(reference / "s.npz.json", tmp_path / "s.npz.json")
    before = out.read_bytes()
    capsys.readouterr()
    # The same settings: already complete, nothing drawn, nothing rewritten.
    assert cli(sample_args(run, out)) == 0
    assert "already complete" in capsys.readouterr().out and out.read_bytes() == before
    # Other settings: refused naming each difference; --overwrite replaces.
    line = one_line_error(capsys, cli(sample_args(run, out, "--ema", "--seed", "4")), "--ema: False then, True now",
                          "--seed: 3 then, 4 now", "--overwrite")
    assert "--cfg" not in line and out.read_bytes() == before
    assert cli(sample_args(run, out, "--ema", "--seed", "4", "--overwrite")) == 0 and out.read_bytes() != before
    # A file this command did not write.
    (tmp_path / "foreign.npz").write_bytes(b"not ours")
    one_line_error(capsys, cli(sample_args(run, tmp_path / "foreign.npz")), "exists and was not written by")
    assert (tmp_path / "foreign.npz").read_bytes() == b"not ours"
    for extra, names in ((["--num-samples", "0"], ["--num-samples must be >= 1, got 0"]),
                         (["--n", "-2"], ["--num-samples must be >= 1, got -2"]),
                         (["--cfg-channels", "2"], ["--cfg-channels 2", "1-channel data"]),
                         (["--cfg-channels", "0"], ["--cfg-channels must be >= 1"]),
                         (["--grid", str(tmp_path / "g.png"), "--out", str(tmp_path / "x.png")], ["--grid", "goes with"]),
                         (["--out", str(tmp_path / "x.png"), "--num-samples", "2000"], ["at most 1024"]),
                         (["--batch-size", "0"], ["--batch-size must be >= 1"])):
        one_line_error(capsys, cli(sample_args(run, tmp_path / "new.npz") + extra), *names)
    assert not (tmp_path / "new.npz").exists() and not (tmp_path / "new.npz.parts").exists()


def test_a_png_out_alone_is_a_grid_of_the_same_samples(run, reference, tmp_path):
    assert cli(sample_args(run, tmp_path / "g.png")) == 0
    assert (tmp_path / "g.png").read_bytes() == (reference / "g.png").read_bytes()
    assert os.path.isfile(tmp_path / "g.png.json")


def dit_cfg_reference(model, schedule, z, y, null, scale, kept):
    """DiT's sample.py loop written out independently: the batch doubled with the null label,
    forward_with_cfg guiding eps channels 0-2 only, then DDIM (eta 0) on the respaced abar."""
    abar_all = schedule.alphas_cumprod
    x = torch.cat([z, z]).double()
    yy = torch.cat([y, torch.full_like(y, null)])
    for i in reversed(range(len(kept))):
        t = torch.full((x.shape[0],), kept[i], dtype=torch.int64)
        half = x[: len(x) // 2]
        out = model(torch.cat([half, half]).float(), t, yy).double()  # forward_with_cfg, as DiT writes it
        eps, rest = out[:, :3], out[:, 3:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + scale * (cond_eps - uncond_eps)
        model_out = torch.cat([torch.cat([half_eps, half_eps]), rest], dim=1)
        e = model_out[:, :4]
        ab = abar_all[kept[i]]
        ab_prev = abar_all[kept[i - 1]] if i > 0 else torch.tensor(1.0, dtype=torch.float64)
        x0 = (x - (1 - ab).sqrt() * e) / ab.sqrt()
        x = ab_prev.sqrt() * x0 + (1 - ab_prev).sqrt() * e
    return x[: len(x) // 2].float()


def test_guidance_on_three_of_four_channels_is_dits_forward_with_cfg():
    from speed_fast.models import DiT, DiTConfig
    from speed_fast.sampling import sample, sample_seed, space_timesteps
    from speed_fast.schedule import NoiseSchedule

    schedule = NoiseSchedule.make("linear", T=1000)
    # Single-point classes: guided channels land on x_u + s (x_c - x_u), the others on x_c.
    torch.manual_seed(0)
    points = torch.rand(3, 4, 4, 4) * 2 - 1
    x0 = sample(PointModel(schedule, points), schedule, 2, torch.tensor([0, 1]), steps="ddim25", method="ddim",
                cfg_scale=1.5, seed=0, guided_channels=3)
    target = points[2] + 1.5 * (points[[0, 1]] - points[2])
    torch.testing.assert_close(x0[:, :3], target[:, :3], rtol=0, atol=2e-4)
    torch.testing.assert_close(x0[:, 3], points[[0, 1], 3], rtol=0, atol=2e-4)
    # A tiny real DiT against DiT's own loop written out in the test.
    torch.manual_seed(1)
    model = DiT(DiTConfig(input_size=4, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2,
                          num_classes=5)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        y = torch.tensor([1, 3, 4])
        got = sample(model, schedule, 3, y, steps="ddim10", method="ddim", cfg_scale=4.0, seed=2, guided_channels=3)
        z = torch.stack([torch.randn((4, 4, 4), generator=torch.Generator().manual_seed(sample_seed(2, i)))
                         for i in range(3)])
        want = dit_cfg_reference(model, schedule, z, y, 5, 4.0, space_timesteps(1000, "ddim10"))
        every = sample(model, schedule, 3, y, steps="ddim10", method="ddim", cfg_scale=4.0, seed=2)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    assert (every - want).abs().max() > 1e-2  # guiding all channels is another sampler
    with pytest.raises(ValueError, match="guided_channels must be in"):
        sample(model, schedule, 1, y[:1], steps=2, cfg_scale=2.0, guided_channels=5)


def test_bf16_autocast_and_compile_draw_close_images(run, reference, tmp_path, capsys):
    ref = np.load(reference / "s.npz")["arr_0"].astype(np.int16)
    assert cli(sample_args(run, tmp_path / "b.npz", "--precision", "bf16")) == 0
    bf16 = np.load(tmp_path / "b.npz")["arr_0"].astype(np.int16)
    diff = np.abs(bf16 - ref)
    assert diff.max() > 0 and diff.mean() < 8, (diff.max(), diff.mean())  # bf16 forward passes, fp32 sampler
    capsys.readouterr()
    one_line_error(capsys, cli(sample_args(run, tmp_path / "b.npz")), "--precision: 'bf16' then, 'fp32' now")
    assert cli(sample_args(run, tmp_path / "c.npz", "--compile", n=BATCH)) == 0  # one chunk: one compilation
    compiled = np.load(tmp_path / "c.npz")["arr_0"].astype(np.int16)
    assert np.abs(compiled - ref[:BATCH]).max() <= 1
