"""Shared pytest set-up.

Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors; it must be switched
on before triton is first imported, which is why it happens here (conftest is imported before
any test module). `seeded` makes a test's random inputs the same on every run.

Every test starts and ends with torch's thread count of a fresh process: FFCV's loader and the
launcher-style helpers set it, and CPU convolutions round differently with another thread count,
so a test comparing bytes with a subprocess (which starts with the default) would depend on which
tests ran before it in the same process (e.g. under pytest-xdist).

transformers' and diffusers' loggers get their stderr handler here, at start-up: each library binds
its handler to whatever sys.stderr is when it first logs, and a test's `capsys` stream is closed
after that test, so a later test in the same process would get "--- Logging error ---" tracebacks
in its stderr whenever the library warned.
"""

import importlib
import os
import sys

import pytest
import torch

if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

_THREADS = torch.get_num_threads()

for _library in ("transformers", "diffusers"):
    try:
        importlib.import_module(f"{_library}.utils.logging").get_logger()  # binds the handler to this sys.stderr
    except ImportError:
        pass


@pytest.fixture(autouse=True)
def _default_torch_threads():
    torch.set_num_threads(_THREADS)
    yield
    torch.set_num_threads(_THREADS)  # before the next test's higher-scoped fixtures run


@pytest.fixture
def seeded():
    torch.manual_seed(0)
