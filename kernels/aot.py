"""Ahead-of-time compilation of every Triton kernel variant for real GPUs, without a GPU.

Triton's interpreter (TRITON_INTERPRET=1, how the tests run the kernels on a CPU) accepts code
the compiler rejects, so `speed-fast env --compile sm_80,sm_90` compiles each variant that a
launch can produce (each kernel module's `compile_cases()`) for the requested architectures,
binding the arguments with Triton's own launch-time specialisation, and reports per variant:
registers, spills, shared memory (from the cubin, `cuobjdump --dump-resource-usage`, which
Triton ships) and SASS instructions per element (`cuobjdump -sass`, what one thread executes
for the elements it handles in one loop iteration). The RNG arguments (seed, step, offset) are
typed u64 / u32 / i64, so every seed width runs one compiled variant; `compile_case` checks that.
"""

from __future__ import annotations

import collections
import importlib
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

MODULES = ("speed_fast.kernels.sample_timesteps", "speed_fast.kernels.sample_and_noise",
           "speed_fast.kernels.weighted_mse")
# Special-function (MUFU), half-rate integer multiply and conversion instructions: reported apart
# because they run on narrower units than plain integer / float32 instructions.
_MUFU = re.compile(r"^MUFU\.")
_IMAD_WIDE = re.compile(r"^IMAD\.(WIDE|HI)")
_CONVERT = re.compile(r"^(I2F|F2I|F2F|I2FP|F2FP)")


@dataclass
class Result:
    op: str
    dtype: str
    variant: str
    arch: int
    ok: bool
    error: str = ""
    registers: int | None = None
    spills: int | None = None  # bytes of local memory per thread (STACK + LOCAL)
    shared: int | None = None  # bytes per program
    instructions: int | None = None  # SASS instructions of the kernel (NOP padding excluded)
    per_element: float | None = None  # per `unit` (element, or draw) that one thread handles
    unit: str = "elem"
    mix: dict = field(default_factory=dict)  # per unit: mufu, imad_wide, convert

    def line(self) -> str:
        name = f"{self.op} {self.dtype} {self.variant}".strip()
        if not self.ok:
            return f"  {name:<38} sm_{self.arch}  FAILED  {self.error}"
        per = (f"{self.per_element:6.1f} instr/{self.unit} (mufu {self.mix['mufu']:.2f}, "
               f"imad.wide {self.mix['imad_wide']:.2f})" if self.per_element is not None
               else f"{self.instructions:6d} instr")
        return (f"  {name:<38} sm_{self.arch}  ok  {self.registers:3d} regs  spills {self.spills} B  "
                f"shared {self.shared:5d} B  {per}")


def parse_archs(text: str) -> list[int]:
    """"sm_80,sm_90" (or "80,90") -> [80, 90]; ValueError naming a bad entry."""
    archs = []
    for part in text.split(","):
        m = re.fullmatch(r"(?:sm_)?(\d{2,3})a?", part.strip())
        if not m or int(m.group(1)) < 70:
            raise ValueError(f"--compile takes architectures like sm_80,sm_90 (sm_70 or newer), got {part.strip()!r}")
        archs.append(int(m.group(1)))
    return archs


def load_cases(module_files: list[str] | None = None) -> list:
    """The compile cases of the package's kernel modules, or of the given module files (a kernel
    under development, or a deliberately broken one in a test)."""
    if not module_files:
        return [case for name in MODULES for case in importlib.import_module(name).compile_cases()]
    cases = []
    for path in module_files:
        spec = importlib.util.spec_from_file_location(f"speed_fast_aot_{Path(path).stem}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # triton.jit reads the source through the module
        spec.loader.exec_module(module)
        cases += module.compile_cases()
    return cases


def _tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def _bind(case, backend, seed: int):
    """Triton's launch-time binding of the case's arguments: (signature, constexprs, attrs, options)."""
    from triton.runtime.jit import create_function_from_signature

    kernel = case.kernel
    kwargs = dict(case.args, **case.constexprs)
    for name, value in (("seed", seed), ("step", 2**32 - 1), ("offset", 2**40 + 3)):
        if name in kernel.arg_names:
            kwargs[name] = value
    options = dict(num_warps=case.num_warps, enable_fp_fusion=True)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, opts = binder(**kwargs, **options)
    return kernel._pack_args(backend, options, bound, specialization, opts)


def _sass_stats(cubin: bytes) -> tuple[dict, collections.Counter]:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", path], capture_output=True, text=True,
                               check=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", path], capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage.split("Function", 1)[-1]))
    ops = collections.Counter()
    for line in sass.splitlines():
        m = re.match(r"\s+/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)", line)
        if m and m.group(1) != "NOP":
            ops[m.group(1)] += 1
    return {k: int(v) for k, v in fields.items()}, ops


def compile_case(case, arch: int) -> Result:
    """Compile one case for sm_<arch>; a compiler error gives ok=False with its message."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend

    result = Result(case.op, case.dtype, case.variant, arch, ok=False, unit=case.unit)
    try:
        target = GPUTarget("cuda", arch, 32)
        backend = make_backend(target)
        options, signature, constexprs, attrs = _bind(case, backend, seed=2**64 - 1)
        if "seed" in case.kernel.arg_names and _bind(case, backend, seed=5)[1:] != (signature, constexprs, attrs):
            raise RuntimeError("a 32-bit seed binds another variant than a 64-bit one (type the seed argument)")
        compiled = triton.compile(ASTSource(case.kernel, signature, constexprs, attrs), target=target,
                                  options=options.__dict__)
        usage, ops = _sass_stats(compiled.asm["cubin"])
    except Exception as exc:  # the report names every failure; the caller turns any into exit status 1
        result.error = " ".join(f"{type(exc).__name__}: {exc}".split())[:2000]
        return result
    result.ok = True
    result.registers = usage.get("REG", 0)
    result.spills = usage.get("STACK", 0) + usage.get("LOCAL", 0)
    result.shared = max(usage.get("SHARED", 0), compiled.metadata.shared)
    result.instructions = sum(ops.values())
    if case.elements:
        per_thread = case.elements / (32 * case.num_warps)
        result.per_element = result.instructions / per_thread
        count = lambda pattern: sum(n for op, n in ops.items() if pattern.match(op)) / per_thread  # noqa: E731
        result.mix = dict(mufu=count(_MUFU), imad_wide=count(_IMAD_WIDE), convert=count(_CONVERT))
    return result


def _compile_indexed(job):
    module_files, index, arch = job
    return compile_case(load_cases(module_files)[index], arch)


def compile_all(archs: list[int], module_files: list[str] | None = None, jobs: int = 1) -> list[Result]:
    """Every case for every architecture, in `jobs` processes (each compiles on one core)."""
    n = len(load_cases(module_files))
    work = [(module_files, i, arch) for arch in archs for i in range(n)]
    if jobs <= 1:
        return [_compile_indexed(job) for job in work]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(_compile_indexed, work))
