"""Text-to-image (issue 20, paper Tab. 5): the text-conditioned DiT (shapes, a zero-initialised
cross-attention that makes each block DiT's, the text reaching the output once it is trained), the
registry and config.json round trip, training on the captioned digits (1 rank; 2 ranks under the
deepspeed launcher with ZeRO-2, resumed bit-exactly), sampling from prompts, and the bad inputs."""

import torch

from speed_fast.models.dit import DiTBlock
from speed_fast.models.dit_t2i import DiTT2I, DiTT2IBlock, DiTT2IConfig
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
    assert isinstance(block, DiTT2IBlock)


def test_pooled_caption_conditions_every_block():
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
