#!/usr/bin/env bash
# Configures and builds CMakeLists.txt (csrc/ as a shared library for C++ users) in a temporary
# folder against the torch of the current Python, then loads the library in a fresh Python and
# checks that it registered the ops.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python}"
build="$(mktemp -d)"
trap 'rm -rf "$build"' EXIT
prefix="$("$python" -c 'import torch; print(torch.utils.cmake_prefix_path)')"
cmake -S . -B "$build" -DCMAKE_PREFIX_PATH="$prefix" -DCMAKE_BUILD_TYPE=Release > "$build/configure.log" \
  || { cat "$build/configure.log"; exit 1; }
cmake --build "$build" -j "${MAX_JOBS:-2}"
"$python" - "$build/libsma_kernels.so" <<'PY'
import sys

import torch

torch.ops.load_library(sys.argv[1])
print("cmake build OK:", torch.ops.sma_kernels_C.self_guided_mask)
PY
