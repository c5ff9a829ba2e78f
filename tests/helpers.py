"""Test-session helpers: where the tests run and whether the Triton backend is here.

What the tests compute and compare with (padding layouts, mask comparison, accuracy rule, loop
oracle) is in :mod:`sma_kernels.testing`.
"""

from __future__ import annotations

import pytest
import torch

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
needs_gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


def import_triton_backend():
    """The Triton backend module; skips the calling test module, with the reason, when it is
    unavailable here."""
    backend = pytest.importorskip("sma_kernels.triton")
    if backend.UNAVAILABLE is not None:
        pytest.skip(f"Triton backend unavailable: {backend.UNAVAILABLE}", allow_module_level=True)
    return backend
