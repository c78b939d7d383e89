"""Text-to-image (issue 20, paper Tab. 5): the text-conditioned DiT (shapes, a zero-initialised
cross-attention that makes each block DiT's, the text reaching the output once it is trained), the
registry and config.json round trip, training on the captioned digits (1 rank; 2 ranks under the
deepspeed launcher with ZeRO-2, resumed bit-exactly), sampling from prompts, and the bad inputs."""

import torch

from speed_fast.models.dit import DiTBlock
from speed_fast.models.dit_t2i import DiTT2I, DiTT2IConfig
from speed_fast.models.registry import build_model, config_key, model_config, run_model_config


def tiny_config(**kw) -> DiTT2IConfig:
    return DiTT2IConfig(input_size=8, in_channels=1, hidden_size=32, depth=2, num_heads=2, patch_size=2,
                        text_width=12, **kw)


def test_forward_shapes_and_starts_at_zero():
    torch.manual_seed(0)
    model = DiTT2I(tiny_config())
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([0, 500, 999])
    out = model(x, t, torch.randn(3, 7, 12), torch.randn(3, 12))  # (B, 2C, H, W): eps and v
    assert out.shape == (3, 2, 8, 8) and torch.equal(out, torch.zeros_like(out))  # DiT's adaLN-Zero start
    assert DiTT2I(tiny_config(learn_sigma=False))(x, t, torch.randn(3, 5, 12), torch.randn(3, 12)).shape == (3, 1, 8, 8)


def test_zero_initialised_cross_attention_is_ditblock():
    """A fresh block is DiT's block on the same weights, bit for bit, whatever the caption; once its
    cross-attention's output projection moves, the caption changes the output."""
    torch.manual_seed(1)
    model = DiTT2I(tiny_config())
    block = model.blocks[0]
    for p in block.adaLN_modulation.parameters():  # a trained-looking modulation (zero at init)
        torch.nn.init.normal_(p, std=0.5)
    dit = DiTBlock(32, 2, 4.0, "auto")
    missing, unexpected = dit.load_state_dict(block.state_dict(), strict=False)
    assert not missing and all(k.startswith("cross_attn.") for k in unexpected)
    x, c = torch.randn(2, 16, 32), torch.randn(2, 32)
    ctx_a, ctx_b = torch.randn(2, 7, 32), torch.randn(2, 3, 32)
    assert torch.equal(block(x, c, ctx_a), dit(x, c)) and torch.equal(block(x, c, ctx_b), dit(x, c))
    # The projection gets a gradient, so training moves it off zero; then the caption matters.
    block(x, c, ctx_a).square().sum().backward()
    assert block.cross_attn.proj.weight.grad.abs().sum() > 0
    torch.nn.init.normal_(block.cross_attn.proj.weight, std=0.5)
    assert not torch.allclose(block(x, c, ctx_a), block(x, c, ctx_b))


def test_tokens_and_pooled_caption_both_reach_the_output():
    torch.manual_seed(2)
    model = DiTT2I(tiny_config())
    for p in model.parameters():  # away from the zero start, so every path reaches the output
        if p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.2)
    x, t, tokens = torch.randn(2, 1, 8, 8), torch.tensor([3, 700]), torch.randn(2, 7, 12)
    a = model(x, t, tokens, torch.randn(2, 12))
    b = model(x, t, tokens, torch.randn(2, 12))
    c = model(x, t, torch.randn(2, 7, 12), torch.randn(2, 12))
    assert not torch.allclose(a, b) and not torch.allclose(b, c)


def test_registry_names_and_config_round_trip():
    cfg = model_config("dit-t2i-xl2", {}, input_size=32, in_channels=4, text_width=768)
    assert (cfg.depth, cfg.hidden_size, cfg.num_heads, cfg.patch_size, cfg.text_width) == (28, 1152, 16, 2, 768)
    small = model_config("dit-t2i-s2", {"learn_sigma": False}, input_size=8, in_channels=1, text_width=32)
    assert (small.depth, small.hidden_size, small.learn_sigma) == (4, 128, False)
    doc = {config_key(small): small.to_dict()}
    assert list(doc) == ["t2i_config"] and run_model_config(doc, "config.json") == small
    custom = model_config("dit-t2i-custom", {"hidden_size": 32, "depth": 1, "num_heads": 2}, input_size=8,
                          in_channels=1, text_width=12)
    assert isinstance(build_model(custom), DiTT2I)
    for bad, why in (({"depth": 3}, "fixes ['depth']"), ({"num_classes": 3}, "unknown key(s) ['num_classes']")):
        try:
            model_config("dit-t2i-s2", bad, input_size=8, in_channels=1, text_width=32)
        except ValueError as exc:
            assert why in str(exc), exc
        else:
            raise AssertionError(bad)


# ---- training, resume, sampling and bad inputs on the captioned digits ----------------------------------

import json  # noqa: E402
import os  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from ds_launch import MAIN, ROOT, deepspeed_cmd, metrics, run, tiny_preset  # noqa: E402

CONFIGS = os.path.join(ROOT, "train", "configs")
T2I = {"hidden_size": 32, "depth": 2, "num_heads": 2, "patch_size": 2}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """160 captioned digits, embedded by a tiny CLIP of width 16 (seed 0)."""
    from speed_fast.data.digits import write_captioned_digits

    out = tmp_path_factory.mktemp("captioned")
    write_captioned_digits(out, seed=0, width=16, limit=160)
    return str(out / "digits-captions.beton")


@pytest.fixture(scope="module")
def preset(data, tmp_path_factory):
    return tiny_preset(str(tmp_path_factory.mktemp("preset") / "t2i.json"), data, model="dit-t2i-custom", dit={},
                       t2i=T2I, caption_dropout=0.3)


@pytest.fixture(scope="module")
def one_rank(preset, tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("one") / "run")
    proc = run([__import__("sys").executable, MAIN, "--preset", preset, "--max-steps", "4", "--run-dir", run_dir],
               timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def two_ranks(preset, tmp_path_factory):
    """2 ranks, ZeRO-2, accumulation 2: 6 steps straight (a checkpoint at step 3), and a copy of that run cut
    back to step 3 (its step-6 checkpoint and later records removed) resumed to 6."""
    import shutil

    base = tmp_path_factory.mktemp("two")
    straight, resumed = str(base / "straight"), str(base / "resumed")
    args = ["--preset", preset, "--max-steps", "6", "--ckpt-every", "3"]
    proc = run(deepspeed_cmd(MAIN, args + ["--run-dir", straight]), timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    shutil.copytree(straight, resumed)
    shutil.rmtree(os.path.join(resumed, "checkpoints", "step-00000006"))
    with open(os.path.join(resumed, "metrics.jsonl")) as f:
        kept = [line for line in f if json.loads(line)["step"] <= 3]
    with open(os.path.join(resumed, "metrics.jsonl"), "w") as f:
        f.writelines(kept)
    proc = run(deepspeed_cmd(MAIN, args + ["--run-dir", resumed]), timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return straight, resumed, proc.stderr


def test_one_rank_trains_and_records_the_text_model(one_rank):
    recs = metrics(one_rank)
    assert [r["step"] for r in recs] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in recs)
    with open(os.path.join(one_rank, "config.json")) as f:
        config = json.load(f)
    assert config["t2i_config"]["text_width"] == 16 and "dit_config" not in config
    assert config["train"]["caption_dropout"] == 0.3
    assert os.path.isfile(os.path.join(one_rank, "samples.png"))  # the grid, on training captions
    from speed_fast.training import load_for_inference

    model, _, _, meta = load_for_inference(one_rank, ema=True)
    assert isinstance(model, DiTT2I) and model.text_width == meta["text"]["width"] == 16


def test_two_ranks_zero2_resume_bit_exactly(two_ranks):
    straight, resumed, log = two_ranks
    assert "resuming from" in log and "step-00000003" in log
    a, b = metrics(straight), metrics(resumed)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 7))
    for ra, rb in zip(a, b):
        for key in ("loss", "mse", "vb", "grad_norm", "lr"):
            assert ra[key] == rb[key], (ra["step"], key, ra[key], rb[key])
    for name in ("model.pt", "ema.pt"):
        wa, wb = (torch.load(os.path.join(d, "checkpoints", "step-00000006", name), weights_only=True)
                  for d in (straight, resumed))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name
    assert any(k.startswith("blocks.0.cross_attn.") for k in wa)


def test_caption_dropout_swaps_in_the_null_caption_by_seed_and_micro_step():
    """The trainer's own _captions on a real LabelDropout: dropped rows are the null caption's, the
    others untouched, the mask a function of (seed, micro-step) at the asked rate."""
    from types import SimpleNamespace

    from speed_fast.training.label_dropout import CAPTION_DROP_STREAM, LabelDropout
    from speed_fast.training.trainer import Trainer

    def trainer(seed):
        return SimpleNamespace(device=torch.device("cpu"), null_tokens=torch.full((5, 3), -7.0),
                               null_pooled=torch.full((3,), -7.0),
                               caption_drop=LabelDropout(seed, 0.3, 8, stream=CAPTION_DROP_STREAM))

    tokens, pooled = torch.randn(8, 5, 3).half(), torch.randn(8, 3).half()
    dropped = []
    for m in range(200):
        t, p = Trainer._captions(trainer(0), tokens, pooled, m)
        drop = (p == -7.0).all(dim=1)
        assert torch.equal((t == -7.0).all(dim=2).all(dim=1), drop)
        assert torch.equal(t[~drop], tokens[~drop].float()) and torch.equal(p[~drop], pooled[~drop].float())
        dropped.append(drop)
    rate = torch.stack(dropped).float().mean().item()
    assert 0.25 < rate < 0.35, rate
    again = Trainer._captions(trainer(0), tokens, pooled, 17)[1]  # a fresh generator: the same draw
    assert torch.equal(again == -7.0, dropped[17][:, None].expand(-1, 3))
    other = trainer(1).caption_drop
    assert any(not torch.equal(other(m), dropped[m]) for m in range(20))  # another seed, other draws
    label_stream = LabelDropout(0, 0.3, 8)
    assert any(not torch.equal(label_stream(m), dropped[m]) for m in range(20))  # a stream of its own


def test_sample_from_prompts_writes_images_and_prompts(one_rank, tmp_path, capsys):
    from speed_fast.cli import main

    out, grid = str(tmp_path / "s.npz"), str(tmp_path / "g.png")
    long = "a handwritten seven " + "seven " * 90
    rc = main(["sample", "--ckpt", one_rank, "--ema", "--prompt", "a handwritten seven", "--prompt", long,
               "--prompt", "the digit 3", "--num-samples", "5", "--batch-size", "4", "--steps", "4", "--out", out,
               "--grid", grid, "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert err.count("warning: 1 of 3 prompts are longer than the text encoder's 77 tokens") == 1, err
    with np.load(out, allow_pickle=False) as z:
        assert z["arr_0"].dtype == np.uint8 and z["arr_0"].shape == (5, 8, 8, 3)
        assert z["prompts"].dtype.kind == "U" and z["prompts"].tolist() == [
            "a handwritten seven", long, "the digit 3", "a handwritten seven", long]
        assert z["arr_1"].tolist() == [0, 1, 2, 0, 1]
        assert len({z["arr_0"][i].tobytes() for i in range(5)}) == 5
    assert os.path.isfile(grid)
    with open(out + ".json") as f:
        settings = json.load(f)["settings"]
    assert settings["cfg"] == 1.5 and settings["text_encoder"][0].endswith("clip")
    # The same set on 2 ranks (torchrun, gloo): each rank embeds its own chunks' prompts; the same bytes.
    import subprocess
    import sys

    from ds_launch import env, free_port

    two = str(tmp_path / "two.npz")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master-port", str(free_port()),
           "-m", "speed_fast.cli", "sample", "--ckpt", one_rank, "--ema", "--prompt", "a handwritten seven",
           "--prompt", long, "--prompt", "the digit 3", "--num-samples", "5", "--batch-size", "4", "--steps", "4",
           "--out", two, "--no-progress"]
    proc = subprocess.run(cmd, env={**env(), "PYTHONPATH": ROOT}, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("prompts are longer than") == 1, proc.stderr[-3000:]
    with np.load(out) as a, np.load(two) as b:
        assert all(np.array_equal(a[k], b[k]) for k in ("arr_0", "arr_1", "prompts"))


def test_sample_refuses_bad_prompt_input(one_rank, tmp_path, capsys):
    from speed_fast.cli import main
    from speed_fast.text import build_tiny_clip

    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    out = str(tmp_path / "x.npz")
    narrow = build_tiny_clip(str(tmp_path / "clip8"), seed=0, width=8)
    cases = [
        (["--prompts", str(empty)], f"--prompts {str(empty)!r} holds no prompts (empty file)"),
        ([], f"{one_rank} is a text-to-image run: pass --prompt TEXT (repeatable) or --prompts FILE"),
        (["--prompt", "a seven", "--labels", "3"], f"--labels '3': {one_rank} is a text-to-image run"),
        (["--prompt", "a seven", "--text-encoder", narrow],
         f"embeds captions with width 8, but the model of {one_rank} has text_width 16"),
        (["--prompt", "  "], "--prompt '  ': only whitespace; expected text, or \"\" for the null caption"),
    ]
    for extra, line in cases:
        rc = main(["sample", "--ckpt", one_rank, "--num-samples", "2", "--steps", "2", "--out", out, *extra])
        err = capsys.readouterr().err
        assert rc == 2 and line in err, (extra, err)
        assert len([ln for ln in err.splitlines() if "error:" in ln]) == 1, err
    assert not os.path.exists(out)


def test_empty_prompt_is_the_stored_null_caption(one_rank):
    """`--prompt ""` draws unconditional samples: the data's stored null bits, whatever the encoder gives for ""."""
    from speed_fast.generate import RunSampler, read_prompts

    prompts = read_prompts(["", "a handwritten seven"], None)
    sampler = RunSampler(one_rank, steps="2", prompts=prompts, device="cpu")
    tokens, pooled, idx = sampler.prompt_text(0, 3)
    assert idx.tolist() == [0, 1, 0]
    for i in (0, 2):
        assert torch.equal(tokens[i], sampler.null[0].float()) and torch.equal(pooled[i], sampler.null[1].float())
    assert not torch.equal(tokens[1], sampler.null[0].float())
    x, y = sampler.draw(0, 3)
    assert x.shape[0] == 3 and torch.isfinite(x).all() and y.tolist() == [0, 1, 0]


def test_bad_model_data_pairs_are_one_line(preset, data, tmp_path):
    from speed_fast.training.config import ConfigError, parse_args, resolve

    def error(*argv):
        cfg, _ = parse_args(["--preset", preset, "--run-dir", str(tmp_path / "r"), *argv], CONFIGS)
        with pytest.raises(ConfigError) as exc:
            resolve(cfg, 1, CONFIGS, False)
        return str(exc.value)

    assert "is a text-to-image model but --data" in error("--data", "digits") and "has no captions" in error(
        "--data", "digits")
    msg = error("--model", "DiT-S/2", "--caption-dropout", "0.1")
    assert f"--data {os.path.realpath(data)} is captioned (text [77, 16]" in msg and "class-conditional" in msg
    assert "--caption-dropout 0.3 applies to text-to-image models" in error("--model", "DiT-S/2", "--data", "digits")
    assert "must be a number in [0.0, 1.0), got 1.0" in error("--caption-dropout", "1.0")
    wide = tiny_preset(str(tmp_path / "wide.json"), data, model="dit-t2i-custom", dit={},
                       t2i={**T2I, "text_width": 24})
    cfg, _ = parse_args(["--preset", wide, "--run-dir", str(tmp_path / "r")], CONFIGS)
    with pytest.raises(ConfigError, match="embeddings of width 16 .* the model's text_width is 24"):
        resolve(cfg, 1, CONFIGS, False)
    # Through the entry point: exit 2, one line, nothing trained.
    proc = run([__import__("sys").executable, MAIN, "--preset", preset, "--data", "digits", "--run-dir",
                str(tmp_path / "cli")], timeout=120)
    lines = [ln for ln in proc.stderr.splitlines() if "error" in ln]
    assert proc.returncode == 2 and len(lines) == 1 and "has no captions" in lines[0], proc.stderr[-2000:]
    assert not os.path.exists(tmp_path / "cli" / "checkpoints")


def test_presets_describe_the_digits_and_the_paper_recipe():
    from speed_fast.training.config import load_preset

    digits = load_preset("digits-t2i", CONFIGS)
    assert (digits.model, digits.data, digits.caption_dropout, digits.sample_cfg) == ("dit-t2i-s2", "digits-t2i",
                                                                                     0.1, 1.5)
    coco = load_preset("coco-t2i-dit-xl2", CONFIGS)
    assert (coco.model, coco.t2i, coco.lr, coco.weight_decay, coco.sample_cfg) == (
        "dit-t2i-xl2", {"text_width": 768}, 1e-4, 0.0, 1.5)


def test_eval_of_a_text_run_samples_from_prompts_and_scores_each_against_its_own(one_rank, tmp_path, capsys):
    """`speed-fast eval --gen RUN_DIR` on a text run: --prompts FILE is what it samples from (sample i,
    prompt i mod P); the samples serve fd_raw and the CLIP score, which equals the CLIP score of the
    same set drawn by `speed-fast sample --prompts` and scored as a file."""
    from test_clip_score import build_clip

    from speed_fast.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a handwritten seven\n\nthe digit 3\n")  # the blank line is skipped, as sample does
    draw = ["--num-samples", "6", "--batch-size", "4", "--steps", "4", "--method", "ddpm", "--ema"]
    assert main(["eval", "--gen", one_rank, "--ref", "digits", *draw]) == 2
    err = capsys.readouterr().err
    assert f"--gen {one_rank!r} is a text-to-image run: pass --prompts FILE" in err and len(err.splitlines()) == 1
    clip, _ = build_clip(tmp_path / "clip", seed=4)
    assert main(["eval", "--gen", one_rank, "--ref", "digits", "--prompts", str(prompts), "--clip-model", clip,
                 "--no-clip-denoised", *draw, "--json"]) == 0  # sample's sampler: not the run's evaluator's
    result = json.loads(capsys.readouterr().out)
    assert result["n_generated"] == 6 and result["fd_raw"] > 0
    assert result["clip_prompts"] == f"{prompts} (sample i: prompt i mod 2)"
    out = str(tmp_path / "s.npz")
    assert main(["sample", "--ckpt", one_rank, "--prompts", str(prompts), "--cfg", "1", "--out", out,
                 "--no-progress", *draw]) == 0
    capsys.readouterr()
    assert main(["eval", "--gen", out, "--clip-model", clip, "--json"]) == 0
    from_file = json.loads(capsys.readouterr().out)
    assert from_file["clip_prompts"].endswith("[prompts]")
    assert from_file["clip_score"] == pytest.approx(result["clip_score"], abs=1e-6)
    assert from_file["clip_score_std"] == pytest.approx(result["clip_score_std"], abs=1e-6)
    # --prompts for a run directory needs no --clip-model: the same samples, the same fd_raw
    assert main(["eval", "--gen", one_rank, "--ref", "digits", "--prompts", str(prompts), "--no-clip-denoised", *draw,
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["fd_raw"] == result["fd_raw"]
