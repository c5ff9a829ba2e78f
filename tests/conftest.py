"""Without a CUDA GPU, run the Triton backend in Triton's interpreter on CPU tensors.

Triton reads TRITON_INTERPRET when a kernel is defined, so it is set here, before any test
module imports sma_kernels. On a GPU machine the variable is left alone and the kernels compile.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
