// Registers the compiled kernels as torch ops in the namespace sma_kernels_C.
//
// Loading the library (`import sma_kernels._C`, or torch.ops.load_library on the CMake build) runs
// these static registrations; Python then calls torch.ops.sma_kernels_C.<op>.
#include <torch/library.h>

#include "cpu/kept_attention.h"
#include "cpu/self_guided_mask.h"

TORCH_LIBRARY(sma_kernels_C, m) {
  m.def(
      "self_guided_mask(Tensor q, Tensor k, Tensor valid, Tensor query_pool, Tensor query_rank, "
      "Tensor head, Tensor token_rank, float ratio, int num_per_query, bool head_mix_random, "
      "bool mask_self, float noise, float scale) -> Tensor");
  m.def("kept_attention_forward(Tensor q, Tensor k, Tensor v, Tensor keep, float scale) -> (Tensor, Tensor)");
  m.def(
      "kept_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor keep, Tensor out, "
      "Tensor lse, float scale) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(sma_kernels_C, CPU, m) {
  m.impl("self_guided_mask", &sma_kernels::cpu::self_guided_mask);
  m.impl("kept_attention_forward", &sma_kernels::cpu::kept_attention_forward);
  m.impl("kept_attention_backward", &sma_kernels::cpu::kept_attention_backward);
}

#ifdef TORCH_EXTENSION_NAME
// Built by setup.py as the Python module sma_kernels._C: an empty module whose import loads the
// library above. The CMake build is a plain shared library and needs no Python.
#include <Python.h>

PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "Compiled kernels of sma_kernels.", -1, nullptr,
                               nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module);
}
#endif
