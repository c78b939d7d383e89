"""`--vae` by the names users use (speed_fast.vae): hub ids (DiT's ema / mse too) through the hub's
offline cache layout built here, a single .safetensors file, AutoencoderTiny, the latent format in
the sidecar, and `speed-fast sample` refusing a VAE whose latents differ from the run's data.
Everything is small and built in the test; nothing reaches the internet (HF_HUB_OFFLINE=1)."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from speed_fast.cli import main
from speed_fast.data import read_latent_meta
from speed_fast.data.encode import load_image

RES = 16
WEIGHTS = "diffusion_pytorch_model.safetensors"


def _kl(scaling_factor, seed=0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                         norm_num_groups=4, sample_size=RES, scaling_factor=scaling_factor)


def _tiny():
    from diffusers import AutoencoderTiny

    torch.manual_seed(1)
    return AutoencoderTiny(encoder_block_out_channels=(8, 8, 8), decoder_block_out_channels=(8, 8, 8),
                           num_encoder_blocks=(1, 1, 1), num_decoder_blocks=(1, 1, 1), latent_channels=4,
                           scaling_factor=0.7, shift_factor=0.1)


@pytest.fixture(scope="module")
def vaes(tmp_path_factory):
    """Saved VAEs: kl (scale 0.5), kl_other (same layout, scale 0.25), tiny (AutoencoderTiny, 4x down)."""
    root = tmp_path_factory.mktemp("vaes")
    out = {}
    for name, model in (("kl", _kl(0.5)), ("kl_other", _kl(0.25, seed=2)), ("tiny", _tiny())):
        model.save_pretrained(root / name)
        out[name] = str(root / name)
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (root / cls).mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (RES + 3 * i, RES + 5, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    return str(root)


def encode(images, vae, out, *extra):
    return main(["encode", images, "--vae", str(vae), "--out", str(out), "--resolution", str(RES), "--batch-size",
                 "1", "--workers", "0", "--no-progress", *map(str, extra)])


def stored_latents(path) -> torch.Tensor:
    """int16 bit patterns [N, C, H, W] of a latent .beton's records, read through its record table."""
    from speed_fast.data.beton import read_records

    meta = read_latent_meta(path)
    raw = np.fromfile(path, dtype=np.uint8)
    n = int(np.prod(meta["shape"])) * 2
    recs = [raw[p: p + n].view(np.int16).reshape(meta["shape"]) for p in read_records(path, meta["num_records"])["f0"]]
    return torch.from_numpy(np.stack(recs))


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _snapshot(cache, repo, commit, files, sub=""):
    """The hub cache's layout: models--org--name/{refs/main, snapshots/<commit>/<files>}."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    dest = folder / "snapshots" / commit / sub
    dest.mkdir(parents=True)
    for f in files:
        shutil.copy(f, dest / os.path.basename(f))


HUB_SCRIPT = textwrap.dedent("""
    import json, sys
    from speed_fast.cli import main
    from speed_fast.vae import load_vae, vae_record

    images, out, lone = sys.argv[1:4]
    result = {"rc": main(["encode", images, "--vae", "ema", "--out", out, "--resolution", "16",
                          "--batch-size", "1", "--workers", "0", "--no-progress"])}
    for name in ("stabilityai/sd-vae-ft-ema", "org/pipeline/vae", lone, "mse"):
        try:
            vae = load_vae(name, "cpu")
            vae.save_pretrained(out + "." + name.replace("/", "_"))  # for comparing the weights outside
            result[name] = vae_record(vae)
        except ValueError as exc:
            result[name] = str(exc)
    print(json.dumps(result))
""")


def test_hub_ids_resolve_offline_through_the_hub_cache(vaes, images, tmp_path):
    """`ema`, `stabilityai/sd-vae-ft-ema` and `org/pipeline/vae` (a pipeline's vae folder) are read from
    a hub cache laid out as huggingface_hub writes it, with HF_HUB_OFFLINE=1; a lone .safetensors without
    a config gets the config diffusers infers (SD 1.5's vae folder) from the same cache; an id that is
    not cached is one line that says so. The hub-encoded file equals the directory-encoded one."""
    cache = tmp_path / "hub"
    kl = [os.path.join(vaes["kl"], f) for f in ("config.json", WEIGHTS)]
    _snapshot(cache, "stabilityai/sd-vae-ft-ema", "0123abcd", kl)
    _snapshot(cache, "org/pipeline", "feedbeef", [os.path.join(vaes["tiny"], f) for f in ("config.json", WEIGHTS)],
              sub="vae")
    _snapshot(cache, "stable-diffusion-v1-5/stable-diffusion-v1-5", "5eed", kl[:1], sub="vae")
    (tmp_path / "lone").mkdir()
    lone = tmp_path / "lone" / "sd-vae.safetensors"
    shutil.copy(kl[1], lone)
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE",
           "OMP_NUM_THREADS": "1"}
    out = tmp_path / "hub.beton"
    proc = subprocess.run([sys.executable, "-c", HUB_SCRIPT, images, str(out), str(lone)], capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["rc"] == 0
    rec = read_latent_meta(str(out))["source"]["vae"]
    assert {k: rec[k] for k in ("name", "source", "path", "revision", "class", "latent_channels", "downsampling",
                                "scaling_factor", "shift_factor")} == {
        "name": "ema", "source": "hub", "path": "stabilityai/sd-vae-ft-ema", "revision": "0123abcd",
        "class": "AutoencoderKL", "latent_channels": 4, "downsampling": 2, "scaling_factor": 0.5, "shift_factor": 0.0}
    full = result["stabilityai/sd-vae-ft-ema"]
    assert full["source"] == "hub" and full["config_sha256"] == rec["config_sha256"]
    pipe = result["org/pipeline/vae"]
    assert (pipe["class"], pipe["path"], pipe["revision"], pipe["downsampling"]) == (
        "AutoencoderTiny", "org/pipeline/vae", "feedbeef", 4)
    assert result[str(lone)]["source"] == "file" and result[str(lone)]["config_sha256"] == rec["config_sha256"]
    from diffusers import AutoencoderKL, AutoencoderTiny

    ref_kl = AutoencoderKL.from_pretrained(vaes["kl"])
    for name in ("stabilityai_sd-vae-ft-ema", str(lone).replace("/", "_")):
        assert same_weights(AutoencoderKL.from_pretrained(f"{out}.{name}"), ref_kl)
    assert same_weights(AutoencoderTiny.from_pretrained(f"{out}.org_pipeline_vae"),
                        AutoencoderTiny.from_pretrained(vaes["tiny"]))
    missing = result["mse"]
    assert missing.startswith("--vae 'mse': no such local path, and the hub repository stabilityai/sd-vae-ft-mse is "
                              f"not in the hub cache {cache} and HF_HUB_OFFLINE=1 forbids downloading it")
    local = tmp_path / "local.beton"
    assert encode(images, vaes["kl"], local) == 0
    assert out.read_bytes() == local.read_bytes()


def test_a_single_safetensors_file_loads_with_its_config_beside_it(vaes, tmp_path):
    from speed_fast.vae import decode_latents, load_vae, vae_record

    for name in ("kl", "tiny"):
        folder = tmp_path / name
        folder.mkdir()
        shutil.copy(os.path.join(vaes[name], "config.json"), folder)
        shutil.copy(os.path.join(vaes[name], WEIGHTS), folder / f"my-{name}.safetensors")
        single = load_vae(str(folder / f"my-{name}.safetensors"), "cpu")
        whole = load_vae(vaes[name], "cpu")
        assert type(single) is type(whole) and same_weights(single, whole)
        assert vae_record(single)["source"] == "file" and vae_record(whole)["source"] == "directory"
        z = torch.randn(2, 4, 4, 4)
        assert torch.equal(decode_latents(single, z), decode_latents(whole, z))
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(os.path.join(vaes["tiny"], "config.json"), bad)
    shutil.copy(os.path.join(vaes["kl"], WEIGHTS), bad / "kl.safetensors")  # AutoencoderKL weights, Tiny config
    with pytest.raises(ValueError, match=r"the weights do not fit the AutoencoderTiny"):
        load_vae(str(bad / "kl.safetensors"), "cpu")


def test_autoencoder_tiny_encodes_with_its_config_scale_and_shift(vaes, images, tmp_path, capsys):
    """An AutoencoderTiny's latents are its encoder output, stored as (z - shift_factor) * scaling_factor
    from its config (0.7 and 0.1 here), computed independently below; it has no posterior to sample."""
    from diffusers import AutoencoderTiny

    out = tmp_path / "tiny.beton"
    assert encode(images, vaes["tiny"], out) == 0
    meta = read_latent_meta(str(out))
    assert meta["shape"] == [4, RES // 4, RES // 4] and meta["source"]["space"] == "latents"
    assert meta["source"]["vae"]["class"] == "AutoencoderTiny"
    assert (meta["source"]["vae"]["scaling_factor"], meta["source"]["vae"]["shift_factor"]) == (0.7, 0.1)
    tiny = AutoencoderTiny.from_pretrained(vaes["tiny"]).eval()
    files = sorted(os.path.join(c, f) for c in ("a", "b") for f in os.listdir(os.path.join(images, c)))
    with torch.inference_mode():
        want = torch.cat([((tiny.encode(load_image(os.path.join(images, f), RES)[None]).latents - 0.1) * 0.7)
                          .to(torch.bfloat16) for f in files])
    assert torch.equal(stored_latents(str(out)), want.view(torch.int16))
    assert encode(images, vaes["tiny"], tmp_path / "p.beton", "--sample-posterior") == 2
    err = capsys.readouterr().err
    assert "--sample-posterior needs a VAE with a posterior (AutoencoderKL); AutoencoderTiny's" in err
    assert len(err.strip().splitlines()) == 1


def _run_on(data_meta, run_dir):
    """A run directory load_for_inference reads: a tiny random DiT on the data of `data_meta`."""
    from speed_fast.models import DiT, DiTConfig
    from speed_fast.training.checkpoint import LATEST, STATE_FILE, tag_for

    c, h, _ = data_meta["shape"]
    cfg = DiTConfig(input_size=h, patch_size=2, in_channels=c, hidden_size=32, depth=1, num_heads=2, num_classes=2)
    torch.manual_seed(0)
    model = DiT(cfg)
    ckpt = run_dir / "checkpoints" / tag_for(1)
    ckpt.mkdir(parents=True)
    torch.save(model.state_dict(), ckpt / "model.pt")
    torch.save(model.state_dict(), ckpt / "ema.pt")
    (ckpt / STATE_FILE).write_text(json.dumps({"step": 1}))
    (run_dir / "checkpoints" / LATEST).write_text(tag_for(1))
    (run_dir / "config.json").write_text(json.dumps({
        "dit_config": cfg.to_dict(), "data_meta": data_meta,
        "train": {"schedule": {"kind": "linear", "T": 1000, "beta_start": 1e-4, "beta_end": 0.02}}}))
    return str(run_dir)


def test_sample_refuses_a_vae_whose_latents_differ_from_the_runs_data(vaes, images, tmp_path, capsys):
    from speed_fast.generate import generate

    beton = tmp_path / "kl.beton"
    assert encode(images, vaes["kl"], beton) == 0
    run = _run_on(read_latent_meta(str(beton)), tmp_path / "run")
    base = ["sample", "--ckpt", run, "--n", "2", "--steps", "ddim2", "--method", "ddim", "--device", "cpu",
            "--out", str(tmp_path / "grid.png")]
    capsys.readouterr()
    assert main(base + ["--vae", vaes["kl_other"]]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert (f"--vae '{vaes['kl_other']}' (AutoencoderKL) does not match the latents of the data of {run}, encoded with "
            f"'{vaes['kl']}': scaling_factor 0.25 vs 0.5 (this VAE vs the data)") in err
    assert main(base + ["--vae", vaes["tiny"]]) == 2
    err = capsys.readouterr().err
    assert "(AutoencoderTiny)" in err and "downsampling 4 vs 2, scaling_factor 0.7 vs 0.5, shift_factor 0.1 vs 0" in err
    assert not (tmp_path / "grid.png").exists()
    with pytest.raises(ValueError, match="does not match the latents"):
        generate(run, 2, steps="ddim2", method="ddim", device="cpu", vae=vaes["kl_other"])
    assert main(base + ["--vae", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no such file or directory" in err
    assert main(base + ["--vae", vaes["kl"]]) == 0
    assert Image.open(tmp_path / "grid.png").size[0] > RES


def test_old_and_foreign_sidecars_are_checked_for_what_they_record(vaes):
    """Sidecars of earlier encodes (source.vae a path, flat scaling_factor) and of write-latents (no VAE
    record: channels only) are read for what they say; pixel data is never decoded."""
    from speed_fast.vae import check_vae_matches, load_vae

    kl = load_vae(vaes["kl"], "cpu")
    check_vae_matches(kl, {"shape": [4, 8, 8], "source": {"vae": "/old/vae", "scaling_factor": 0.5}})
    with pytest.raises(ValueError, match=r"encoded with '/old/vae': scaling_factor 0.5 vs 0.18215"):
        check_vae_matches(kl, {"shape": [4, 8, 8], "source": {"vae": "/old/vae", "scaling_factor": 0.18215}})
    check_vae_matches(kl, {"shape": [4, 8, 8], "source": {}})
    with pytest.raises(ValueError, match=r"latent_channels 4 vs 16"):
        check_vae_matches(kl, {"shape": [16, 8, 8]})
    with pytest.raises(ValueError, match=r"are pixels .* drop --vae"):
        check_vae_matches(kl, {"shape": [3, 8, 8], "source": {"space": "pixels"}})
