"""Test-session set-up.

Without a CUDA GPU, the Triton backend runs in Triton's interpreter on CPU tensors. Triton reads
TRITON_INTERPRET when a kernel is defined, so it is set here, before any test module imports
sma_kernels. On a GPU machine the variable is left alone and the kernels compile.

Under CI (CI=true) hypothesis draws the same examples on every run, so a red CI always
reproduces; locally it keeps exploring new ones.
"""

import os

import pytest
import torch
from helpers import TRITON_PATHS, use_triton_path
from hypothesis import settings

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture(params=TRITON_PATHS)
def triton_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs a test once per path of the Triton backend (tests/helpers.py); the path's name."""
    use_triton_path(monkeypatch, request.param)
    return request.param
