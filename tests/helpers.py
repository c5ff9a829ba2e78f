"""Test-session helpers: where the tests run, whether the Triton backend is here, and the
checks that several test modules make of error messages and measured times.

What the tests compute and compare with (padding layouts, mask comparison, accuracy rule, loop
oracle) is in :mod:`sma_kernels.testing`.
"""

from __future__ import annotations

import math
import re

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


# The Triton backend's two paths for the mask and the fused forward: "short" (one program per
# sample, short_sequence.py) for sequences of at most SHORT_LENGTH, "general" (score kernel,
# selection, attention) otherwise. Tests of either at tiny shapes force the general one.
TRITON_PATHS = ("short", "general")


def use_triton_path(monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    """Make the Triton backend take ``path`` (see TRITON_PATHS) at the shapes of a test."""
    from sma_kernels.triton import short_sequence
    if path == "general":
        monkeypatch.setattr(short_sequence, "SHORT_LENGTH", 0)



def record_loads(monkeypatch: pytest.MonkeyPatch) -> list:
    """Under Triton's interpreter, from now on: the addresses every masked load reads (only the
    lanes its mask enables), one NumPy int64 array per load, appended to the returned list."""
    from triton.runtime.interpreter import InterpreterBuilder
    loaded = []
    masked_load = InterpreterBuilder.create_masked_load

    def recording_load(self, ptrs, mask, *args):
        loaded.append(ptrs.data[mask.data].astype("int64"))
        return masked_load(self, ptrs, mask, *args)

    monkeypatch.setattr(InterpreterBuilder, "create_masked_load", recording_load)
    return loaded


def element_addresses(x: torch.Tensor) -> torch.Tensor:
    """The address of every element of x (any strides), shaped like x."""
    offsets = sum(torch.arange(size)[(...,) + (None,) * (x.dim() - 1 - axis)] * stride
                  for axis, (size, stride) in enumerate(zip(x.shape, x.stride())))
    return x.data_ptr() + offsets * x.element_size()


def blames(name: str, prefix: str = "") -> str:
    """A ``pytest.raises(match=...)`` pattern: the message starts with ``prefix`` (e.g. the C++
    ops' "self_guided_mask: ") and then names the argument ``name``, as a whole word."""
    return rf"^{re.escape(prefix)}{re.escape(name)}\b"


def is_duration(value: object) -> bool:
    """Whether ``value`` can be a measured time: a finite, non-negative number. How long a call
    takes is a benchmark's business, never a test's."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and value >= 0)
