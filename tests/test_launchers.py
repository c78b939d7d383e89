"""The Triton launchers (kernels/launch.py and the `<op>_fwd` functions): device guard, grid
limits and sizing, layouts, and the backend's test launch. Run in Triton's interpreter where there
is no GPU; the multi-GPU test needs two CUDA devices."""

import warnings

import pytest
import torch
from fused_cases import assert_dtype_close, require, tables

from speed_fast import rng
from speed_fast.ops import (BackendUnavailable, add_noise_ref, backends, resolve_backend, sample_and_noise,
                            sample_and_noise_ref, weighted_mse)
from speed_fast.ops.weighted_mse import weighted_mse_fwd_ref

pytest.importorskip("triton")
pytestmark = pytest.mark.usefixtures("seeded")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def triton_ops():
    require("triton")
    return torch.ops.speed_fast


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices (cuda:1 while cuda:0 is current)")
def test_tensors_on_another_device_run_there(triton_ops):
    prob, alias, sab, s1, w = tables(100, "cuda:1")
    x0 = torch.randn(3, 4, 8, 8, device="cuda:1")
    with torch.cuda.device(0):
        t, xt = sample_and_noise(x0, prob, alias, sab, s1, seed=1, step=2, backend="triton")
        loss, _ = weighted_mse(xt, t, w, seed=1, step=2, backend="triton")
    assert xt.device == torch.device("cuda:1") and loss.device == torch.device("cuda:1")
    t_ref, xt_ref = sample_and_noise_ref(x0.cpu(), prob.cpu(), alias.cpu(), sab.cpu(), s1.cpu(), 1, 2)
    assert torch.equal(t.cpu(), t_ref) and float((xt.cpu() - xt_ref).abs().max()) <= 1e-5


def test_grid_puts_the_batch_on_axis_0_and_sizes_without_empty_programs():
    from speed_fast.kernels import launch

    elements = 4 * launch.BLOCK_C
    assert launch.grid(2**31 - 1, 4096, True) == (2**31 - 1, 4096 // elements)
    for D in (4, 12, 1024, 3072, 4096, 16384, 4 * 64 * 64 * 3):
        B, P = launch.grid(7, D, True)
        assert P == -(-D // elements), D  # every program has elements of the sample (the last one partly)
    # Off counter boundaries a sample can touch one counter more (its first lane is not lane 0).
    assert launch.grid(5, elements, False) == (5, 2)
    assert launch.grid(5, launch.MAX_SAMPLE, True)[1] == launch.MAX_GRID_1  # axis 1 caps; the kernels loop
    with pytest.raises(ValueError, match=r"batch size must be <= 2147483647 for the triton backend, got 2\d+"):
        launch.check_sizes(2**31, 16, 0)
    with pytest.raises(ValueError, match="numel per sample must be <="):
        launch.check_sizes(1, 2**31, 0)
    with pytest.raises(ValueError, match=r"\(offset \+ B\) \* numel_per_sample must be < 2\^63"):
        launch.check_sizes(4, 2**30, 2**33)


@pytest.mark.parametrize("D", [2048 * 3, 2048 * 3 + 3], ids=["aligned", "unaligned"])
def test_samples_longer_than_the_grid_loop_over_their_blocks(triton_ops, monkeypatch, D):
    """With axis 1 capped at 2 programs, the 3-4 blocks of a sample are covered by the kernels' loop."""
    from speed_fast.kernels import launch

    monkeypatch.setattr(launch, "MAX_GRID_1", 2)
    assert launch.grid(2, D, D % 4 == 0)[1] == 2
    prob, alias, sab, s1, w = tables(50, DEVICE)
    x0 = torch.randn(2, D, device=DEVICE)
    t, xt = triton_ops.triton_sample_and_noise(x0, prob, alias, sab, s1, 7, 3, 5)
    t_ref, xt_ref = sample_and_noise_ref(x0.cpu(), prob.cpu(), alias.cpu(), sab.cpu(), s1.cpu(), 7, 3, 5)
    assert torch.equal(t.cpu(), t_ref) and float((xt.cpu() - xt_ref).abs().max()) <= 1e-5
    loss, grad, mse = triton_ops.triton_weighted_mse_fwd(x0, t, w, 7, 3, 5)
    loss_ref, grad_ref, mse_ref = weighted_mse_fwd_ref(x0.cpu(), t_ref, w.cpu(), 7, 3, 5)
    assert torch.allclose(mse.cpu(), mse_ref, rtol=1e-5) and torch.allclose(grad.cpu(), grad_ref, rtol=1e-4,
                                                                            atol=1e-10)


@pytest.mark.parametrize("layout", ["channels_last", "transposed", "expanded", "eps_half"])
def test_raw_ops_read_every_layout_correctly(triton_ops, layout):
    """The registered ops themselves (not only the public functions) give the values of the
    contiguous input for any layout, and contiguous outputs."""
    prob, alias, sab, s1, w = tables(100, DEVICE)
    base = torch.randn(4, 6, 5, 3, device=DEVICE)
    x = {"channels_last": base.to(memory_format=torch.channels_last), "transposed": base.transpose(2, 3),
         "expanded": base[:1].expand(4, -1, -1, -1), "eps_half": base[:, :3]}[layout]
    dense = x.contiguous()
    t, xt = triton_ops.triton_sample_and_noise(x, prob, alias, sab, s1, 1, 2, 0)
    t2, xt2 = triton_ops.triton_sample_and_noise(dense, prob, alias, sab, s1, 1, 2, 0)
    assert torch.equal(t, t2) and torch.equal(xt, xt2) and xt.is_contiguous()
    assert torch.equal(triton_ops.triton_add_noise(x, t, sab, s1, 1, 2, 0), xt)
    loss, grad, mse = triton_ops.triton_weighted_mse_fwd(x, t, w, 1, 2, 0)
    loss2, grad2, mse2 = triton_ops.triton_weighted_mse_fwd(dense, t, w, 1, 2, 0)
    assert torch.equal(loss, loss2) and torch.equal(grad, grad2) and torch.equal(mse, mse2) and grad.is_contiguous()


def test_eps_half_of_a_learned_sigma_output_is_read_in_place(triton_ops):
    """model_out[:, :C] goes to the kernels as it is (no contiguous copy); other layouts are copied."""
    from speed_fast.kernels import launch

    model_out = torch.randn(4, 8, 6, 6, device=DEVICE)
    eps_half = model_out[:, :4]
    assert not eps_half.is_contiguous() and launch.batch(eps_half) is eps_half
    channels_last = torch.randn(4, 3, 6, 5, device=DEVICE).to(memory_format=torch.channels_last)
    assert launch.batch(channels_last).is_contiguous()
    _, _, _, _, w = tables(100, DEVICE)
    t = torch.tensor([1, 2, 3, 4], device=DEVICE)
    _, grad, mse = triton_ops.triton_weighted_mse_fwd(eps_half, t, w, 3, 4, 0)
    _, grad_ref, mse_ref = weighted_mse_fwd_ref(eps_half.contiguous().cpu(), t.cpu(), w.cpu(), 3, 4, 0)
    assert torch.allclose(mse.cpu(), mse_ref, rtol=1e-5) and torch.allclose(grad.cpu(), grad_ref, rtol=1e-4,
                                                                            atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_awkward_shapes_and_offsets(triton_ops, dtype):
    """Sizes around the block length and every phase of a sample within its Philox counter."""
    _, _, sab, s1, _ = tables(30, DEVICE)
    for D in (1, 2047, 2049):
        for offset in (0, 3):
            x0 = torch.randn(3, D).to(dtype).to(DEVICE)
            t = torch.tensor([0, 29, 7], device=DEVICE)
            xt = triton_ops.triton_add_noise(x0, t, sab, s1, 2**63 + 5 - 2**64, 9, offset)  # the seed's int64 bits
            ref = add_noise_ref(x0.cpu(), t.cpu(), sab.cpu(), s1.cpu(), 2**63 + 5, 9, offset)
            ref32 = add_noise_ref(x0.cpu().float(), t.cpu(), sab.cpu(), s1.cpu(), 2**63 + 5, 9, offset)
            assert_dtype_close(xt, ref32, ref)


def test_noise_far_from_zero_counters(triton_ops):
    """Offsets whose element index needs the counter's high word; every seed and step bit in use."""
    zeros, ones = torch.zeros(10, device=DEVICE), torch.ones(10, device=DEVICE)
    x0 = torch.zeros(3, 4, 5, 7, device=DEVICE)
    for offset in (2**32 // 140 + 1, 2**40 + 1):
        t = torch.tensor([1, 2, 3], device=DEVICE)
        eps = triton_ops.triton_add_noise(x0, t, zeros, ones, -1, 2**32 - 1, offset)  # seed bits of 2^64 - 1
        ref = rng.normal_ref(x0.numel(), 2**64 - 1, 2**32 - 1, first_element=offset * 140).view(x0.shape)
        assert float((eps.cpu() - ref).abs().max()) <= 1e-5


def test_a_failing_test_launch_makes_triton_unavailable_with_the_reason(monkeypatch):
    """A kernel that fails to build: auto on CUDA warns with the message and uses torch; an explicit
    backend="triton" raises BackendUnavailable with it (status is re-probed here from scratch)."""
    import triton
    import triton.language as tl

    from speed_fast.kernels import sample_and_noise as kernels

    @triton.jit
    def broken(x0_ptr, xt_ptr, t_ptr, prob_ptr, alias_ptr, sqrt_ab_ptr, sqrt_1mab_ptr, T, D, stride_b, seed, step,
               offset, DRAW: tl.constexpr, ALIGNED: tl.constexpr, BLOCK_C: tl.constexpr):
        tl.static_assert(False, "this kernel cannot build")

    monkeypatch.setattr(kernels, "_sample_and_noise_fwd_kernel", broken)
    for table in ("_status", "_loaded"):
        monkeypatch.setattr(backends, table, {})
    monkeypatch.setattr(backends, "_warned_fallback", set())
    ok, why = backends.backend_status("triton")
    assert not ok and "a test launch failed" in why and "this kernel cannot build" in why
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert resolve_backend("auto", "cuda") == "torch"
    assert any("triton backend unavailable" in str(w.message) and "this kernel cannot build" in str(w.message)
               for w in caught)
    with pytest.raises(BackendUnavailable, match="this kernel cannot build"):
        resolve_backend("triton", DEVICE)
