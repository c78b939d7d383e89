"""Shared pytest set-up.

Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors; it must be switched
on before triton is first imported, which is why it happens here (conftest is imported before
any test module). `seeded` makes a test's random inputs the same on every run.
"""

import os
import sys

import pytest
import torch

if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def seeded():
    torch.manual_seed(0)
