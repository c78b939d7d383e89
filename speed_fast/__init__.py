"""speed_fast: SpeeD time-step sampling and change-aware weighting for diffusion transformers,
with fused kernels (Triton on GPU, C++ on CPU) and a DeepSpeed trainer."""

import importlib.abc
import importlib.util
import os
import sys

__version__ = "0.1.0"

# The kernel sources live at the checkout's top level (kernels/, csrc/); an install (editable or
# wheel) maps them to speed_fast.kernels and speed_fast.csrc. Run from a source tree instead
# (PYTHONPATH=<checkout>, as on a GPU machine that cannot install), this finder does the same
# mapping; it is consulted only after every installed finder has failed.
_SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SOURCE_PACKAGES = {f"{__name__}.kernels": "kernels", f"{__name__}.csrc": "csrc"}


class _SourceTreeFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        folder = _SOURCE_PACKAGES.get(fullname)
        if folder is None:
            return None
        init = os.path.join(_SOURCE_ROOT, folder, "__init__.py")
        if not os.path.isfile(init):
            return None
        return importlib.util.spec_from_file_location(
            fullname, init, submodule_search_locations=[os.path.dirname(init)])


if not any(isinstance(f, _SourceTreeFinder) for f in sys.meta_path):
    sys.meta_path.append(_SourceTreeFinder())
