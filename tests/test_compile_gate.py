"""The ahead-of-time compile gate: every Triton kernel variant compiles for an H100/H200 (sm_90)
without a GPU, at the instruction budget of a near-bandwidth kernel, and a kernel that cannot
compile makes `speed-fast env --compile` fail with the compiler's message.

Triton's interpreter (how the other tests run the kernels here) accepts code the compiler
rejects, which is why this gate exists. The compiles run in a subprocess without TRITON_INTERPRET.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

# What one thread executes per element in the hot loop, measured from SASS (kernels/aot.py). The
# kernels were ~200 before they were tuned (libdevice sin/cos/log with slow paths); a change that
# brings such code back fails here rather than only on a GPU.
MAX_INSTRUCTIONS_PER_ELEMENT = 40


def _env_compile(*args, timeout=600):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "speed_fast.cli", "env", "--compile", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_every_kernel_variant_compiles_for_sm_90():
    proc = _env_compile("sm_90", "--json", "--jobs", "2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(proc.stdout)["results"]
    assert all(r["ok"] for r in results), [r["error"] for r in results if not r["ok"]]
    variants = {(r["op"], r["dtype"], r["variant"]) for r in results}
    for dtype in ("fp32", "bf16", "fp16"):
        for op in ("sample_and_noise", "add_noise", "weighted_mse"):
            assert {(op, dtype, "aligned"), (op, dtype, "unaligned")} <= variants
    assert ("sample_timesteps", "-", "") in variants and ("weighted_mse_reduce", "fp32", "") in variants
    for r in results:
        assert r["arch"] == 90 and r["registers"] > 0 and r["spills"] == 0, r
        if r["variant"] == "aligned":  # the layout of every real latent (numel per sample % 4 == 0)
            assert r["per_element"] <= MAX_INSTRUCTIONS_PER_ELEMENT, r
            assert r["mix"]["mufu"] == 2.0, r  # lg2, sqrt, sin, cos per pair of normals: no libdevice


def test_a_kernel_that_cannot_compile_fails_the_gate(tmp_path):
    """The bug this gate was built for: an annotated global compiles in the interpreter only."""
    module = tmp_path / "broken_kernel.py"
    module.write_text(textwrap.dedent('''
        """A kernel that Triton's interpreter runs but its compiler rejects."""
        import torch
        import triton
        import triton.language as tl

        from speed_fast.kernels import launch

        STREAM: tl.constexpr = 1


        @triton.jit
        def _broken_kernel(out_ptr, n, BLOCK: tl.constexpr):
            i = tl.arange(0, BLOCK)
            tl.store(out_ptr + i, i + STREAM, mask=i < n)


        def compile_cases():
            args = dict(out_ptr=launch.Pointer(torch.int32), n=100)
            return [launch.Case("broken", "i32", "", _broken_kernel, args, dict(BLOCK=128), 4, 128)]
    '''))
    proc = _env_compile("sm_90", "--kernel-module", str(module), "--jobs", "1", timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "broken i32" in proc.stdout and "FAILED" in proc.stdout
    assert "Cannot access global variable STREAM" in proc.stdout


def test_bad_architecture_is_a_clear_error():
    proc = _env_compile("hopper", timeout=120)
    assert proc.returncode == 2 and "--compile takes architectures like sm_80,sm_90" in proc.stderr
