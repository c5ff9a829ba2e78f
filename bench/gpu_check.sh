#!/usr/bin/env bash
# GPU check, run from the repository root on a CUDA host (torch, Triton, nvcc, ninja installed;
# no network needed):
#
#   bash bench/gpu_check.sh                     # results in runs/bench/ (git-ignored)
#   OUT=/some/dir bash bench/gpu_check.sh
#   OUT=bench/results bash bench/gpu_check.sh   # into the committed results (then
#                                               # python -m bench.report --readme README.md)
#   SMA_KERNELS_COMMIT=<sha> bash bench/gpu_check.sh   # names the commit of a copy (its .git,
#                                                      # if any, may be another commit's)
#
# 1. installs the package in place against the torch already there (no dependency is fetched),
#    without the C++ extension: it serves CPU tensors only, which no step here uses, and building
#    it took 30 s of the budget on the H200 host,
# 2. runs a short selection of the GPU tests in one pytest session, most important first: the
#    GPU masks equal to the reference's (both Triton paths, and the short-sequence kernel's own
#    tests; at logits near FLT_MAX and of order 1e8 too, where the score kernel's two passes
#    must round each logit alike, in fp32, fp16 and bf16), the attention forward's weight of
#    exactly 1 at a row's largest logit near 2^32, the dK/dV kernel's zero rows for the entries
#    past the kept keys where their unmasked probabilities overflow, the token scores where row
#    blocks share partial rows (the score kernel's ACCUMULATE variant), repeated calls (direct
#    launches, sma_kernels/triton/launch.py) equal to the first,
#    the bf16 workloads at full size, CUDA-graph capture and torch.compile(mode="reduce-overhead")
#    (tests/test_cuda_graphs.py), no host sync and the launch budget (the whole GPU suite takes
#    longer than this check may),
# 3. counts the launches of every call (python -m bench.launches, bf16) and fails if a compiled
#    16-bit Triton kernel (the first config of each, as in the tests) spills registers,
# 4. runs the benchmark on the GPU: every backend and baseline at the four workloads of
#    bench/README.md ("Workloads") at full size (forward, forward+backward, peak extra memory,
#    host time and launches per call), an L sweep and the end-to-end training steps, in the
#    time left but the last two steps' shares; the torch.compile baselines only with
#    GPU_CHECK_COMPILE_BUDGET seconds (default 0: they took 40 s of a 5-minute check),
# 5. profiles one forward and forward+backward per workload, SDPA's and the Triton path's: host
#    time, and each kernel's device time (python -m bench.profile),
# 6. times the score kernel at the pixel workload under each candidate config
#    (python -m bench.score_configs, which starts no config past its time limit), to inform
#    mask_scores.score_config,
# and prints a short table last. Every step has a time limit so that the whole check ends in
# under 5 minutes on an H100; a failing step does not stop the later ones, but the exit status is
# non-zero if any step failed. Output: $OUT (default runs/bench, git-ignored, so that the check
# leaves the checkout clean) gets the benchmark JSON (dated + latest-<gpu>.json), the launch
# counts (launches-<gpu>.json), the profile (profile-<gpu>.json), the score configs
# (score-configs-<gpu>.json), the plots, gpu_check.log and the test report (at most 11 files).
# On the H200 host the tests took about 3 minutes in four sessions of 4 workers, with the
# extension built; GPU_CHECK_BUDGET=420 GPU_CHECK_BENCH_SHARE=150 (and a 40 s compile budget)
# then ran every step of that time (before the profile and score-config steps) in 377 s. The
# one-session test step, the install without the extension and the default 285 s budget have
# not yet run on a GPU.
# DRY_RUN=1 prints the steps without running them (any machine).
set -u
export PYTHONUNBUFFERED=1
OUT_DIR="${OUT:-runs/bench}"
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_check.log"
: > "$LOG"
PY="${PYTHON:-python3}"
# The whole check must end within BUDGET seconds (5 minutes on an H100, with a margin).
BUDGET="${GPU_CHECK_BUDGET:-285}"
failed=()

# Steps end by END: BUDGET less 15 s for the final table, and during the tests less the
# benchmark's share too, so that slow tests cannot crowd the benchmark out.
BENCH_SHARE="${GPU_CHECK_BENCH_SHARE:-90}"
END=$((BUDGET - 15))

# step NAME SECONDS COMMAND...: run with a time limit (cut to what is left before END; the
# final table keeps 15 s), log everything, remember failures.
step() {
    local name=$1 limit=$2
    shift 2
    local left=$((END - SECONDS))
    if [ "$left" -lt "$limit" ]; then limit=$left; fi
    if [ "$limit" -le 5 ]; then
        echo "=== $name: not run, the time budget is spent" | tee -a "$LOG"
        failed+=("$name (no time left)")
        return 0
    fi
    local start=$SECONDS
    echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
    if [ -n "${DRY_RUN:-}" ]; then return 0; fi
    # SIGINT first: pytest then still prints the failures it has seen (the benchmark has saved
    # its JSON after each case).
    timeout --signal=INT --kill-after=15 "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $((SECONDS - start))s" | tee -a "$LOG"
    if [ "$rc" -ne 0 ]; then failed+=("$name (exit $rc)"); fi
    return 0
}

step environment 20 bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; \
    $PY -c 'import torch, triton; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \
\"triton\", triton.__version__, torch.cuda.get_device_name())'; nvcc --version | tail -n 2"
step install 60 env SMA_KERNELS_NO_EXT=1 "$PY" -m pip install --no-build-isolation --no-deps \
    --no-index -e .
step backends 20 "$PY" -c "import json, sma_kernels; print(json.dumps(sma_kernels.backends(), indent=1))"
# Tests check correctness, not speed: one Triton config per kernel (SMA_KERNELS_AUTOTUNE=0)
# saves compiling every autotune config for every test shape, and pytest-xdist, where installed,
# spreads the tests and their kernel compilations over 8 processes (the H200 host has 16 cores).
# One session: its workers start once (importing torch and Triton, and a CUDA context each).
# Most important first.
parallel=()
if "$PY" -c "import xdist" 2> /dev/null; then parallel=(-n 8); fi
END=$((BUDGET - 15 - BENCH_SHARE))
step gpu-tests 150 env SMA_KERNELS_AUTOTUNE=0 "$PY" -m pytest -q -p no:cacheprovider \
    "${parallel[@]}" --junitxml="$OUT_DIR/tests-gpu.xml" \
    tests/test_triton_mask.py::test_mask_matches_reference \
    tests/test_triton_mask.py::test_counts_round_exact_halves_to_even \
    tests/test_triton_mask.py::test_gpu_workload_mask_bf16 \
    "tests/test_triton_mask.py::test_mask_non_finite_inputs[general-cross-mean-overflow-torch.float16]" \
    "tests/test_triton_mask.py::test_mask_non_finite_inputs[general-cross-mean-overflow-torch.float32]" \
    "tests/test_triton_mask.py::test_mask_non_finite_inputs[general-cross-mean-overflow-torch.bfloat16]" \
    tests/test_triton_mask.py::test_score_passes_compute_the_same_logits \
    tests/test_triton_attention.py::test_forward_weights_a_rows_largest_logit_by_exactly_one \
    tests/test_triton_attention.py::test_dropped_entries_get_zero_gradients_where_their_probabilities_overflow \
    "tests/test_triton_mask.py::test_token_scores_close_to_reference[dtype0-mean-partials1]" \
    "tests/test_triton_mask.py::test_token_scores_close_to_reference[dtype1-random-partials4]" \
    tests/test_triton_launch.py::test_repeated_calls_match_the_first_on_gpu \
    tests/test_triton_short_sequence.py \
    tests/test_triton_attention.py::test_gpu_workload_attention_bf16 \
    tests/test_cuda_graphs.py tests/test_no_host_sync.py tests/test_launch_budget.py
step launches 40 env SMA_KERNELS_AUTOTUNE=0 "$PY" -m bench.launches --device cuda --out "$OUT_DIR" \
    --fail-on-spills
END=$((BUDGET - 15))
# The benchmark saves its JSON after every case, starts no case after 90% of --time-limit and
# no end-to-end step after it. On a fresh machine Triton's JIT and autotuning take 15-40 s per
# workload and each torch.compile ~20 s (H100, measured), hence the compile budget.
# The profile and the score configs follow with the kernels the benchmark compiled (Triton's
# cache on disk).
PROFILE_SHARE="${GPU_CHECK_PROFILE_SHARE:-30}"
SCORE_SHARE="${GPU_CHECK_SCORE_SHARE:-30}"
bench_limit=$((END - SECONDS - PROFILE_SHARE - SCORE_SHARE))
time_limit=$((bench_limit - 20))
if [ "$time_limit" -lt 1 ]; then time_limit=1; fi
step benchmark "$bench_limit" "$PY" -m bench --device cuda --out "$OUT_DIR" \
    --compile-budget "${GPU_CHECK_COMPILE_BUDGET:-0}" --min-run-time 0.05 --time-limit "$time_limit"
step profile "$((END - SECONDS - SCORE_SHARE))" "$PY" -m bench.profile --device cuda \
    --out "$OUT_DIR" --repeats 10
score_limit=$((END - SECONDS))
step score-configs "$score_limit" "$PY" -m bench.score_configs --device cuda --out "$OUT_DIR" \
    --time-limit "$((score_limit > 20 ? score_limit - 15 : 5))"

echo | tee -a "$LOG"
if ls "$OUT_DIR"/latest-*.json > /dev/null 2>&1; then
    timeout 15 "$PY" -m bench.report --short "$OUT_DIR"/latest-*.json 2>&1 | grep -v '^$' | tee -a "$LOG"
fi
echo "gpu_check: ${SECONDS}s in all" | tee -a "$LOG"
if [ ${#failed[@]} -ne 0 ]; then
    echo "gpu_check FAILED steps: ${failed[*]}" | tee -a "$LOG"
    exit 1
fi
echo "gpu_check: all steps passed" | tee -a "$LOG"
