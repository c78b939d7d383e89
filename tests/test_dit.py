"""DiT: family sizes (DiT-XL/2 counted on the meta device), adaLN-Zero init, label dropout,
patchify round trip, gradient checkpointing and torch.compile equivalence."""

import pytest
import torch

from speed_fast.models import DiT, DiTConfig, flops_per_image
from speed_fast.models.dit import DIT_SIZES, PATCH_SIZES, probe_attention, sincos_pos_embed_2d


def tiny(**kw):
    base = dict(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=10)
    return DiTConfig(**{**base, **kw})


def expected_params(c: DiTConfig) -> int:
    """Trainable parameters of DiT from its architecture, counted by hand."""
    D, p = c.hidden_size, c.patch_size
    hidden = int(D * c.mlp_ratio)
    linear = lambda i, o: i * o + o  # noqa: E731
    patch = c.in_channels * D * p * p + D
    t_emb = linear(256, D) + linear(D, D)
    y_emb = (c.num_classes + 1) * D
    block = linear(D, 3 * D) + linear(D, D) + linear(D, hidden) + linear(hidden, D) + linear(D, 6 * D)
    final = linear(D, p * p * c.out_channels) + linear(D, 2 * D)
    return patch + t_emb + y_emb + c.depth * block + final


def test_dit_xl2_parameter_count_on_meta_device():
    with torch.device("meta"):
        model = DiT(DiTConfig.named("DiT-XL/2"))
    trainable = sum(p.numel() for p in model.parameters())
    assert trainable == expected_params(model.config)
    # DiT's published count includes its fixed position embedding (a buffer here): 675,129,632.
    assert trainable + model.pos_embed.numel() == 675_129_632
    assert model.config.depth == 28 and model.config.hidden_size == 1152 and model.config.num_heads == 16
    assert abs(flops_per_image(model.config)["forward_gmacs"] - 118.6) < 0.1  # DiT paper, Table 4
    assert abs(flops_per_image(model.config)["train_gflops"] - 712) < 1


@pytest.mark.parametrize("size", list(DIT_SIZES))
@pytest.mark.parametrize("patch", PATCH_SIZES)
def test_family_configs_build_on_meta(size, patch):
    cfg = DiTConfig.named(f"DiT-{size}/{patch}", input_size=32, in_channels=4, num_classes=1000)
    with torch.device("meta"):
        model = DiT(cfg)
    assert sum(p.numel() for p in model.parameters()) == expected_params(cfg)
    assert model.pos_embed.shape == (1, (32 // patch) ** 2, cfg.hidden_size)


def test_invalid_configs_name_the_value():
    with pytest.raises(ValueError, match="DiT-M/2"):
        DiTConfig.named("DiT-M/2")
    with pytest.raises(ValueError, match="DiT-S/3"):
        DiTConfig.named("DiT-S/3")
    with pytest.raises(ValueError, match="input_size \\(9\\)"):
        tiny(input_size=9)
    with pytest.raises(ValueError, match="num_heads \\(5\\)"):
        tiny(num_heads=5)
    with pytest.raises(ValueError, match="attn_backend"):
        tiny(attn_backend="flash")


def test_adaln_zero_starts_at_zero_output_and_shapes():
    torch.manual_seed(0)
    model = DiT(tiny())
    x = torch.randn(3, 1, 8, 8)
    out = model(x, torch.tensor([0, 500, 999]), torch.tensor([1, 2, 3]))
    assert out.shape == (3, 2, 8, 8)  # learned sigma: 2C channels
    assert torch.count_nonzero(out) == 0  # zero-initialised final layer
    # Every block starts as the identity: its gates are zero.
    for block in model.blocks:
        assert torch.count_nonzero(block.adaLN_modulation[-1].weight) == 0
    assert DiT(tiny(learn_sigma=False))(x, torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long)).shape \
        == (3, 1, 8, 8)


def _perturbed(cfg, seed=0):
    torch.manual_seed(seed)
    model = DiT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def test_unpatchify_inverts_patchify_layout():
    model = DiT(tiny(in_channels=3, learn_sigma=False, patch_size=2, input_size=8))
    img = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    p = 2
    tokens = img.view(2, 3, 4, p, 4, p).permute(0, 2, 4, 3, 5, 1).reshape(2, 16, p * p * 3)  # (B, N, p*p*C)
    torch.testing.assert_close(model.unpatchify(tokens), img, rtol=0, atol=0)


def test_label_dropout_uses_null_class():
    model = _perturbed(tiny())
    x, t = torch.randn(4, 1, 8, 8), torch.full((4,), 10)
    y = torch.tensor([1, 2, 3, 4])
    drop = torch.tensor([True, False, True, False])
    dropped = model(x, t, y, drop)
    null = model(x, t, torch.tensor([10, 2, 10, 4]))
    torch.testing.assert_close(dropped, null, rtol=0, atol=0)
    model.eval()  # no random dropout in eval mode
    torch.testing.assert_close(model(x, t, y), model(x, t, y), rtol=0, atol=0)
    with pytest.raises(ValueError, match="class_dropout_prob"):
        _perturbed(tiny(class_dropout_prob=0.0))(x, t, y, drop)


def test_pos_embed_is_sincos_of_column_then_row():
    emb = sincos_pos_embed_2d(8, 3)  # (9, 8): tokens row-major
    assert emb.shape == (9, 8)
    # Token (row 0, col 1) and (row 1, col 1) share the column half, differ in the row half.
    assert (emb[1, :4] == emb[4, :4]).all() and not (emb[1, 4:] == emb[4, 4:]).all()


def test_grad_checkpointing_gives_same_outputs_and_grads():
    base = _perturbed(tiny())
    ckpt = _perturbed(tiny(grad_checkpointing=True))
    x = torch.randn(3, 1, 8, 8)
    t, y = torch.tensor([1, 2, 3]), torch.tensor([0, 1, 2])
    keep = torch.zeros(3, dtype=torch.bool)  # no random label dropout: both models see the same labels
    outs = []
    for model in (base, ckpt):
        out = model(x, t, y, keep)
        out.square().mean().backward()
        outs.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=0, atol=0)
    for g0, g1 in zip(outs[0][1], outs[1][1]):
        torch.testing.assert_close(g0, g1, rtol=1e-6, atol=1e-7)


def test_torch_compile_captures_the_model():
    model = _perturbed(tiny())
    x = torch.randn(3, 1, 8, 8)
    t, y = torch.tensor([1, 2, 3]), torch.tensor([0, 1, 2])
    drop = torch.tensor([False, True, False])
    compiled = torch.compile(model, backend="eager", fullgraph=True)  # graph capture, no codegen
    torch.testing.assert_close(compiled(x, t, y, drop), model(x, t, y, drop), rtol=1e-5, atol=1e-6)


def test_attention_probe_fails_early_with_the_reason():
    probe_attention("sdpa", "cpu")  # the default needs no probe
    probe_attention("auto", "cpu")
    with pytest.raises(ValueError, match="attn_backend 'xformers' needs a CUDA device, got cpu"):
        probe_attention("xformers", "cpu")

    def broken(q, k, v):  # what a wheel built for another torch does at its first call
        raise RuntimeError("No operator found for `memory_efficient_attention_forward`")

    with pytest.raises(ValueError, match="does not run here .*torch .*RuntimeError: No operator found"):
        probe_attention("xformers", "cpu", dtype=torch.float32, attention=broken)
    with pytest.raises(ValueError, match="gives wrong results here"):
        probe_attention("xformers", "cpu", dtype=torch.float32, attention=lambda q, k, v: q)
    probe_attention("xformers", "cpu", dtype=torch.float32,  # a correct implementation passes
                    attention=lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(
                        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2))
