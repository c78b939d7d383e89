"""facebookresearch/DiT checkpoints in and out: a DiT-format state dict (built here, nothing is
downloaded) loads into our DiT and gives the same outputs; a wrong position embedding or a
missing tensor is refused; our weights written in DiT's format come back unchanged; and
`speed-fast export-dit` writes a run's EMA in that format."""

import json
import os

import numpy as np
import pytest
import torch

from speed_fast.cli import main as cli
from speed_fast.models import DiT, DiTConfig, dit_model_name, from_dit_state_dict, load_dit_state_dict, \
    to_dit_state_dict


def dit_pos_embed(dim: int, grid: int) -> torch.Tensor:
    """DiT's fixed table [1, grid*grid, dim], derived here from its definition: row-major tokens;
    the first dim/2 channels encode the token's column, the last dim/2 its row; each half is
    sin then cos of the coordinate times 1 / 10000^(k / (dim/4)), k = 0 .. dim/4 - 1."""
    k = np.arange(dim // 4, dtype=np.float64)
    freq = 1.0 / 10000 ** (k / (dim / 4))
    rows, cols = np.divmod(np.arange(grid * grid), grid)
    halves = []
    for coord in (cols, rows):
        angle = coord[:, None] * freq[None]  # (N, dim/4)
        halves.append(np.concatenate([np.sin(angle), np.cos(angle)], axis=1))
    return torch.from_numpy(np.concatenate(halves, axis=1)).float().unsqueeze(0)


def tiny(**kw):
    base = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10)
    return DiTConfig(**{**base, **kw})


def perturbed(cfg, seed):
    torch.manual_seed(seed)
    model = DiT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def in_dit_format(model) -> dict:
    """What facebookresearch/DiT's state_dict() holds for the same weights."""
    sd = {("x_embedder.proj." + k.split(".")[1] if k.startswith("x_embedder.") else k): v.clone()
          for k, v in model.state_dict().items()}
    c = model.config
    sd["pos_embed"] = dit_pos_embed(c.hidden_size, c.input_size // c.patch_size)
    return sd


def outputs(model):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 8, 8, generator=g)
    return model(x, torch.tensor([0, 500, 999]), torch.tensor([1, 2, 10]))


def test_a_dit_state_dict_loads_and_gives_the_same_outputs():
    source = perturbed(tiny(), seed=1)
    target = perturbed(tiny(), seed=2)
    assert not torch.equal(outputs(source), outputs(target))
    load_dit_state_dict(target, in_dit_format(source))
    torch.testing.assert_close(outputs(target), outputs(source), rtol=0, atol=0)
    # A DiT training checkpoint: its EMA weights are taken, as DiT's own find_model does.
    other = perturbed(tiny(), seed=3)
    load_dit_state_dict(other, {"model": in_dit_format(target), "ema": in_dit_format(source), "opt": {}})
    torch.testing.assert_close(outputs(other), outputs(source), rtol=0, atol=0)


def test_our_table_is_dits():
    for dim, grid in ((32, 4), (1152, 16)):
        ours = from_dit_state_dict({"pos_embed": dit_pos_embed(dim, grid)},
                                   tiny(hidden_size=dim, num_heads=2, input_size=2 * grid))
        assert ours == {}  # only the table was given, and it matched


@pytest.mark.parametrize("change, message", [
    (lambda sd: sd.update(pos_embed=torch.cat([sd["pos_embed"][..., 16:], sd["pos_embed"][..., :16]], -1)),
     "pos_embed differs from this model's 2-D sin-cos table"),
    (lambda sd: sd.update(pos_embed=dit_pos_embed(32, 8)), r"pos_embed has shape \(1, 64, 32\), this model's is "
                                                           r"\(1, 16, 32\)"),
    (lambda sd: sd.pop("pos_embed"), "not a facebookresearch/DiT state dict: no 'pos_embed'"),
    (lambda sd: sd.pop("blocks.1.mlp.fc2.bias"), r"missing \['blocks.1.mlp.fc2.bias'\]"),
    (lambda sd: sd.update({"y_embedder.embedding_table.weight": torch.zeros(1001, 32)}),
     "y_embedder.embedding_table.weight"),
])
def test_mismatches_are_refused_by_name(change, message):
    sd = in_dit_format(perturbed(tiny(), seed=1))
    change(sd)
    target = perturbed(tiny(), seed=2)
    before = outputs(target)
    with pytest.raises(ValueError, match=message):
        load_dit_state_dict(target, sd)
    torch.testing.assert_close(outputs(target), before, rtol=0, atol=0)  # nothing was half-loaded


def test_export_writes_dits_names_and_round_trips():
    cfg = DiTConfig.named("DiT-S/8", input_size=16, in_channels=4, num_classes=10)
    model = perturbed(cfg, seed=0)
    assert dit_model_name(cfg) == "DiT-S/8"
    sd = to_dit_state_dict(model.state_dict(), cfg)
    assert "x_embedder.proj.weight" in sd and "x_embedder.weight" not in sd
    torch.testing.assert_close(sd["pos_embed"], dit_pos_embed(384, 2), rtol=0, atol=0)
    assert set(sd) == set(in_dit_format(model))
    back = from_dit_state_dict(sd, cfg)
    ours = model.state_dict()
    assert back.keys() == ours.keys() and all(torch.equal(back[k], ours[k]) for k in ours)


def test_models_dit_cannot_express_are_refused():
    with pytest.raises(ValueError, match=r"in_channels=1 \(DiT: 4.*learn_sigma=False"):
        dit_model_name(DiTConfig.named("DiT-B/4", input_size=8, in_channels=1, learn_sigma=False))
    with pytest.raises(ValueError, match="32/2/2 is not a DiT"):
        to_dit_state_dict(perturbed(tiny(), 0).state_dict(), tiny())


def test_export_dit_command(tmp_path, capsys):
    """A run directory as train/main.py lays it out (config.json, a complete checkpoint), exported."""
    cfg = DiTConfig.named("DiT-S/8", input_size=16, in_channels=4, num_classes=10)
    ema = perturbed(cfg, seed=0)
    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "step-00000010"
    ckpt.mkdir(parents=True)
    torch.save(ema.state_dict(), ckpt / "ema.pt")
    os.link(ckpt / "ema.pt", ckpt / "model.pt")  # the raw weights (not exported here)
    (ckpt / "state.json").write_text(json.dumps({"step": 10}))
    (run / "checkpoints" / "latest").write_text("step-00000010\n")
    (run / "config.json").write_text(json.dumps({
        "train": {"schedule": {"kind": "linear", "T": 1000, "beta_start": 1e-4, "beta_end": 0.02}},
        "dit_config": cfg.to_dict(), "data_meta": {"num_classes": 10, "shape": [4, 16, 16]}}))
    out = tmp_path / "dit.pt"
    assert cli(["export-dit", str(run), str(out)]) == 0
    printed = capsys.readouterr().out
    assert "DiT-S/8, EMA weights" in printed and "sample.py --model DiT-S/8 --image-size 128 --num-classes 10" in printed
    target = DiT(cfg).eval()
    load_dit_state_dict(target, torch.load(out, weights_only=True))
    torch.testing.assert_close(outputs(target), outputs(ema), rtol=0, atol=0)
    assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]
