"""Backend dispatch of the fused ops: which backends run here and why, no silent fallback when
a build fails or a backend is missing, and torch.compile(fullgraph=True) through the custom ops."""

import argparse
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from fused_cases import KERNEL_BACKENDS, require

from speed_fast.commands import env
from speed_fast.ops import FusedSpeeD, backend_status, resolve_backend
from speed_fast.schedule import NoiseSchedule
from speed_fast.timesteps import make_strategy

pytestmark = pytest.mark.usefixtures("seeded")


def _env_args(*argv):
    parser = argparse.ArgumentParser()
    env.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_cpp_builds_here_and_env_reports_it(capsys):
    require("cpp")
    ok, why = backend_status("cpp")
    assert "C++/OpenMP kernels" in why and "built in" in why
    assert resolve_backend("auto", "cpu") == "cpp"
    report = env.collect()
    assert report["backends"]["cpp"]["available"] and report["auto"]["cpu"] == "cpp"
    env.run(_env_args())
    out = capsys.readouterr().out
    assert "cpp     active" in out and "triton" in out


def test_failed_build_and_missing_gpu_are_reported_and_raise(tmp_path):
    """A compiler that cannot run: cpp is unavailable with the compiler's complaint, an explicit
    backend="cpp" raises, "auto" warns once and uses torch. Without CUDA (and without the
    interpreter) backend="triton" raises too."""
    script = textwrap.dedent("""
        import argparse, warnings, torch
        from speed_fast.alias import build_alias_table
        from speed_fast.ops import BackendUnavailable, backend_status, sample_timesteps
        from speed_fast.commands import env
        prob, alias = build_alias_table(torch.ones(10))
        ok, why = backend_status("cpp")
        assert not ok and "/nonexistent/c++" in why, why
        try:
            sample_timesteps(prob, alias, 3, backend="cpp")
            raise AssertionError("no error for an unavailable backend")
        except BackendUnavailable as exc:
            assert "cpp" in str(exc) and "/nonexistent/c++" in str(exc)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t = sample_timesteps(prob, alias, 3, backend="auto")
        assert t.shape == (3,) and any("cpp backend unavailable" in str(w.message) for w in caught)
        if not torch.cuda.is_available():
            assert not backend_status("triton")[0]
            try:
                sample_timesteps(prob, alias, 3, backend="triton")
                raise AssertionError("no error for an unavailable backend")
            except BackendUnavailable as exc:
                assert "triton" in str(exc)
        parser = argparse.ArgumentParser()
        env.add_arguments(parser)
        env.run(parser.parse_args([]))
    """)
    environ = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    environ.update(CXX="/nonexistent/c++", SPEED_FAST_BUILD_DIR=str(tmp_path / "build"))
    proc = subprocess.run([sys.executable, "-c", script], env=environ, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "cpp     unavailable" in proc.stdout and "/nonexistent/c++" in proc.stdout


def test_unknown_backend_and_wrong_device_raise():
    with pytest.raises(ValueError, match="backend must be one of"):
        backend_status("cuda")
    require("cpp")
    with pytest.raises(ValueError, match="backend 'cpp' needs CPU tensors"):
        resolve_backend("cpp", "meta")


def test_cpp_instruction_set_selection():
    require("cpp")
    from speed_fast.ops import _cpp

    isas = _cpp.supported_isas()
    assert isas[-1] == "scalar" and _cpp.cpu_isa() == isas[0]
    with pytest.raises(ValueError, match="isa must be 'auto'"):
        _cpp.cpu_isa("sse9")


@pytest.mark.parametrize("backend, device", KERNEL_BACKENDS)
def test_torch_compile_fullgraph_through_the_ops(backend, device):
    """A training step (sample + noise, model, fused loss) compiles as one graph through the custom
    ops (triton: in the interpreter where there is no GPU), for a changing step, and gives the eager
    results."""
    require(backend)
    torch.manual_seed(0)
    s = NoiseSchedule.make("linear", T=1000, beta_start=1e-4, beta_end=0.02)
    fused = FusedSpeeD(s, make_strategy("speed", s, k=5.0, tau=700, lam=0.6), device=device, backend=backend, seed=1)
    model = torch.nn.Linear(6, 6).to(device)

    def train_step(x0, step):
        t, xt = fused.sample_and_noise(x0, step)
        loss, mse = fused.loss(model(xt), t, step)
        return loss, mse, t

    compiled = torch.compile(train_step, fullgraph=True)
    x0 = torch.randn(4, 3, 6, device=device)
    for step in (0, 1, 7):
        loss_c, mse_c, t_c = compiled(x0, step)
        grads_c = torch.autograd.grad(loss_c, list(model.parameters()))
        loss_e, mse_e, t_e = train_step(x0, step)
        grads_e = torch.autograd.grad(loss_e, list(model.parameters()))
        assert torch.equal(t_c, t_e)
        assert torch.allclose(loss_c, loss_e, rtol=1e-6) and torch.allclose(mse_c, mse_e, rtol=1e-6)
        assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(grads_c, grads_e))
