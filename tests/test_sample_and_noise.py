"""sample_and_noise / add_noise: the same t (exactly) and eps / x_t (to 1e-5, or the dtype's own
error) on torch, cpp and triton, for awkward shapes, offsets, strides and dtypes; bad input
raises ValueError."""

import pytest
import torch
from fused_cases import FLOAT_DTYPES, KERNEL_BACKENDS, assert_dtype_close, require, tables

from speed_fast import rng
from speed_fast.ops import FusedSpeeD, add_noise, add_noise_ref, sample_and_noise, sample_and_noise_ref
from speed_fast.schedule import NoiseSchedule
from speed_fast.timesteps import make_strategy

pytestmark = pytest.mark.usefixtures("seeded")

SHAPES = [(9, 3, 17, 5), (1, 4, 8, 8), (5, 7), (3, 1, 1, 3)]  # odd sizes, B = 1, numel % 4 != 0


def _reference(x0, prob, alias, sqrt_ab, sqrt_1mab, seed, step, offset):
    """(t, x_t in fp32, x_t rounded to x0's dtype) of the torch reference, on the CPU."""
    x0, tabs = x0.cpu(), [v.cpu() for v in (prob, alias, sqrt_ab, sqrt_1mab)]
    t, xt_dtype = sample_and_noise_ref(x0, *tabs, seed, step, offset)
    _, xt32 = sample_and_noise_ref(x0.float(), *tabs, seed, step, offset)
    return t, xt32, xt_dtype


@pytest.mark.parametrize("backend, device", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(backend, device, dtype, shape):
    require(backend)
    prob, alias, sab, s1, _ = tables(1000, device)
    x0 = torch.randn(shape).to(dtype).to(device)
    seed, step, offset = 123, 7, 5
    t, xt = sample_and_noise(x0, prob, alias, sab, s1, seed=seed, step=step, offset=offset, backend=backend)
    t_ref, xt32, xt_dtype = _reference(x0, prob, alias, sab, s1, seed, step, offset)
    assert torch.equal(t.cpu(), t_ref)
    assert xt.dtype == dtype and xt.shape == x0.shape and xt.device == x0.device
    assert_dtype_close(xt, xt32, xt_dtype)


@pytest.mark.parametrize("backend, device", KERNEL_BACKENDS)
def test_eps_within_1e5_of_reference(backend, device):
    """x0 = 0 and sqrt(1 - abar) = 1 make x_t the noise itself."""
    require(backend)
    prob, alias, _, _, _ = tables(10, device)
    ones, zeros = torch.ones(10, device=device), torch.zeros(10, device=device)
    x0 = torch.zeros(6, 3, 11, 7, device=device)
    for seed, step, offset in ((0, 0, 0), (2**64 - 1, 2**32 - 1, 3), (9, 1, 2**30 + 1)):
        _, eps = sample_and_noise(x0, prob, alias, zeros, ones, seed=seed, step=step, offset=offset, backend=backend)
        ref = rng.normal_ref(x0.numel(), seed, step, first_element=offset * x0[0].numel()).view(x0.shape)
        assert float((eps.cpu() - ref).abs().max()) <= 1e-5


@pytest.mark.parametrize("backend, device", KERNEL_BACKENDS)
def test_non_contiguous_batch_slice(backend, device):
    """The eps half of a learned-sigma output, model_out[:, :C], is a batch-strided view."""
    require(backend)
    prob, alias, sab, s1, _ = tables(100, device)
    big = torch.randn(4, 8, 5, 3, device=device)
    view = big[:, :4]
    assert not view.is_contiguous()
    t1, xt1 = sample_and_noise(view, prob, alias, sab, s1, seed=1, step=2, backend=backend)
    t2, xt2 = sample_and_noise(view.contiguous(), prob, alias, sab, s1, seed=1, step=2, backend=backend)
    assert torch.equal(t1, t2) and torch.equal(xt1, xt2)
    channels_last = torch.randn(4, 3, 6, 5, device=device).to(memory_format=torch.channels_last)
    _, xt3 = sample_and_noise(channels_last, prob, alias, sab, s1, seed=1, step=2, backend=backend)
    _, xt4 = sample_and_noise(channels_last.contiguous(), prob, alias, sab, s1, seed=1, step=2, backend=backend)
    assert torch.equal(xt3, xt4)


@pytest.mark.parametrize("backend, device", KERNEL_BACKENDS)
def test_ranks_with_offsets_reassemble_the_batch(backend, device):
    require(backend)
    prob, alias, sab, s1, _ = tables(100, device)
    x0 = torch.randn(6, 5, 7, device=device)
    t, xt = sample_and_noise(x0, prob, alias, sab, s1, seed=3, step=4, offset=0, backend=backend)
    parts = [sample_and_noise(x0[2 * r:2 * r + 2], prob, alias, sab, s1, seed=3, step=4, offset=2 * r,
                              backend=backend) for r in range(3)]
    assert torch.equal(t, torch.cat([p[0] for p in parts]))
    assert torch.equal(xt, torch.cat([p[1] for p in parts]))


@pytest.mark.parametrize("backend, device", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_add_noise_matches_reference(backend, device, dtype):
    require(backend)
    _, _, sab, s1, _ = tables(50, device)
    x0 = torch.randn(5, 3, 9).to(dtype).to(device)
    t = torch.tensor([0, 49, 7, 7, 20], device=device)
    xt = add_noise(x0, t, sab, s1, seed=8, step=9, offset=2, backend=backend)
    ref_dtype = add_noise_ref(x0.cpu(), t.cpu(), sab.cpu(), s1.cpu(), 8, 9, 2)
    ref32 = add_noise_ref(x0.cpu().float(), t.cpu(), sab.cpu(), s1.cpu(), 8, 9, 2)
    assert_dtype_close(xt, ref32, ref_dtype)


def test_cpp_instruction_sets_give_identical_noise():
    """The AVX-512, AVX2 and scalar kernels evaluate the same float operations: bit-identical."""
    require("cpp")
    from speed_fast.ops import _cpp

    isas = _cpp.supported_isas()
    outs = {}
    for isa in isas:
        with _cpp.use_isa(isa):
            outs[isa] = _cpp.normal(20_011, seed=5, step=9, first_element=4 * 2**32 - 1000)
    ref = rng.normal_ref(20_011, 5, 9, first_element=4 * 2**32 - 1000)
    for isa in isas:
        assert torch.equal(outs[isa], outs[isas[0]]), isa
        assert float((outs[isa] - ref).abs().max()) <= 1e-5
    x0 = torch.randn(3, 1000).to(torch.bfloat16)
    prob, alias, sab, s1, _ = tables(100, "cpu")
    results = []
    for isa in isas:
        with _cpp.use_isa(isa):
            results.append(sample_and_noise(x0, prob, alias, sab, s1, seed=1, step=1, backend="cpp")[1])
    assert all(torch.equal(r, results[0]) for r in results)


@pytest.mark.parametrize("backend, device", KERNEL_BACKENDS)
def test_fused_speed_object_matches_reference(backend, device):
    require(backend)
    s = NoiseSchedule.make("linear", T=1000, beta_start=1e-4, beta_end=0.02)
    for strategy in (make_strategy("speed", s, k=5.0, tau=700, lam=0.6),
                     make_strategy("speed", s, k=5.0, tau=700, lam=0.6, dual=True)):
        fused = FusedSpeeD(s, strategy, device=device, backend=backend, seed=42)
        ref = FusedSpeeD(s, strategy, device="cpu", backend="torch", seed=42)
        x0 = torch.randn(6, 4, 5, 5)
        t, xt = fused.sample_and_noise(x0.to(device), step=3, offset=12)
        t_ref, xt_ref = ref.sample_and_noise(x0, step=3, offset=12)
        assert torch.equal(t.cpu(), t_ref)
        assert float((xt.cpu() - xt_ref).abs().max()) <= 1e-5


@pytest.mark.parametrize("backend, device", [("torch", "cpu")] + KERNEL_BACKENDS)
def test_bad_input_raises_value_error(backend, device):
    if backend != "torch":
        require(backend)
    prob, alias, sab, s1, _ = tables(10, device)
    x0 = torch.randn(4, 3, device=device)
    with pytest.raises(ValueError, match="x0 must be float32, bfloat16 or float16"):
        sample_and_noise(x0.long(), prob, alias, sab, s1, backend=backend)
    with pytest.raises(ValueError, match="at least 2 dims"):
        sample_and_noise(x0[0], prob, alias, sab, s1, backend=backend)
    with pytest.raises(ValueError, match="sqrt_ab must have length T=10"):
        sample_and_noise(x0, prob, alias, sab[:9], s1, backend=backend)
    with pytest.raises(ValueError, match="same length"):
        sample_and_noise(x0, prob, alias[:9], sab, s1, backend=backend)
    with pytest.raises(ValueError, match="must be on"):
        sample_and_noise(x0.to("meta"), prob, alias, sab, s1, backend=backend)
    with pytest.raises(ValueError, match="offset must be in"):
        sample_and_noise(x0, prob, alias, sab, s1, offset=-1, backend=backend)
    t = torch.tensor([0, 1, 2, 10], device=device)
    with pytest.raises(ValueError, match=r"t must lie in \[0, 10\)"):
        add_noise(x0, t, sab, s1, backend=backend)
    with pytest.raises(ValueError, match="t must be an int64 tensor of shape"):
        add_noise(x0, t[:3], sab, s1, backend=backend)
    with pytest.raises(ValueError, match="t must be an int64 tensor"):
        add_noise(x0, t.int(), sab, s1, backend=backend)


def test_cpp_ops_check_their_own_arguments():
    """Called directly (torch.ops), the C++ entry points validate too: ValueError, not a crash."""
    require("cpp")
    ops = torch.ops.speed_fast
    prob, alias, sab, s1, _ = tables(10, "cpu")
    x0 = torch.randn(4, 6)
    with pytest.raises(ValueError, match="x0 must be contiguous"):
        ops.cpp_sample_and_noise(x0.t(), prob, alias, sab, s1, 0, 0, 0)
    with pytest.raises(ValueError, match="x0 must be float32, bfloat16 or float16"):
        ops.cpp_sample_and_noise(x0.double(), prob, alias, sab, s1, 0, 0, 0)
    with pytest.raises(ValueError, match="sqrt_1mab must have length T=10"):
        ops.cpp_sample_and_noise(x0, prob, alias, sab, s1[:3], 0, 0, 0)
    with pytest.raises(ValueError, match="step must be in"):
        ops.cpp_sample_and_noise(x0, prob, alias, sab, s1, 0, 2**32, 0)
    with pytest.raises(ValueError, match=r"t must lie in \[0, 10\), got t\[1\] = -1"):
        ops.cpp_add_noise(x0, torch.tensor([0, -1, 0, 0]), sab, s1, 0, 0, 0)
    with pytest.raises(ValueError, match="numel_per_sample must be < 2"):
        ops.cpp_add_noise(x0, torch.zeros(4, dtype=torch.int64), sab, s1, 0, 0, 2**62)


@pytest.mark.parametrize("backend, device", [("torch", "cpu")] + KERNEL_BACKENDS)
def test_gradient_reaches_x0(backend, device):
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps: d x_t / d x0 = sqrt(abar_t), per sample."""
    if backend != "torch":
        require(backend)
    prob, alias, sab, s1, _ = tables(50, device)
    x0 = torch.randn(3, 2, 5, device=device, requires_grad=True)
    g = torch.randn(3, 2, 5, device=device)
    t, xt = sample_and_noise(x0, prob, alias, sab, s1, seed=4, step=2, backend=backend)
    (xt * g).sum().backward()
    assert torch.allclose(x0.grad, g * sab[t].view(3, 1, 1), rtol=1e-6)
    x0.grad = None
    xt = add_noise(x0, t, sab, s1, seed=4, step=2, backend=backend)
    (xt * g).sum().backward()
    assert torch.allclose(x0.grad, g * sab[t].view(3, 1, 1), rtol=1e-6)


@pytest.mark.parametrize("backend, device", [("torch", "cpu")] + KERNEL_BACKENDS)
def test_step_dependent_tables_draw_what_a_fresh_table_draws(backend, device):
    """CLTS changes P(t) every step of its ramp: FusedSpeeD's refreshed tables give exactly the t of a
    table built from strategy.probs(strategy_step) at that step."""
    if backend != "torch":
        require(backend)
    from speed_fast.alias import build_alias_table
    from speed_fast.ops import sample_timesteps_ref

    s = NoiseSchedule.make("linear", T=1000, beta_start=1e-4, beta_end=0.02)
    st = make_strategy("clts", s, mu=300.0, sigma=150.0, ramp_steps=4)
    fused = FusedSpeeD(s, st, device=device, backend=backend, seed=5)
    x0 = torch.randn(6, 4, 3, 3, device=device)
    for micro, opt in ((0, 0), (1, 0), (2, 1), (3, 3), (4, 3), (5, 9), (6, 2)):
        t, _ = fused.sample_and_noise(x0, step=micro, offset=6, strategy_step=opt)
        want = sample_timesteps_ref(*build_alias_table(st.probs(opt)), 6, 5, micro, 6)
        assert torch.equal(t.cpu(), want), (micro, opt)
        assert torch.equal(fused.sample_timesteps(6, micro, 6, strategy_step=opt).cpu(), want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="device synchronisation exists only on CUDA")
@pytest.mark.parametrize("strategy", ["clts", "speed_dual", "loss_moment"])
def test_fused_steps_never_synchronise_the_device(strategy):
    """The per-step calls (table refresh of a step-dependent P(t), dual draws, the loss, an adaptive
    P(t)'s statistics and its table rebuilt on the device) run under torch's sync debug mode set to
    raise on any synchronising call."""
    s = NoiseSchedule.make("linear", T=1000, beta_start=1e-4, beta_end=0.02)
    st = {"clts": lambda: make_strategy("clts", s, ramp_steps=10),
          "speed_dual": lambda: make_strategy("speed", s, k=5.0, tau=700, lam=0.6, dual=True),
          "loss_moment": lambda: make_strategy("loss_moment", s, bins=4, history=2, update_every=2,
                                               importance_weights=True)}[strategy]()
    fused = FusedSpeeD(s, st, device="cuda", seed=1)
    x0 = torch.randn(8, 4, 16, 16, device="cuda", dtype=torch.bfloat16)
    pred = torch.randn_like(x0, requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(5):
            t, xt = fused.sample_and_noise(x0, step=step, strategy_step=step)
            loss, mse = fused.loss(pred, t, step=step)
            loss.backward()
            fused.area_losses(t, mse)
            fused.observe(t, mse)
            fused.end_step(step + 1)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss).item()
    if strategy == "loss_moment":
        assert bool(fused.adaptive.ready()) and not bool((fused.prob == 1).all())  # it really adapted
