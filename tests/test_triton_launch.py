"""Direct launches (sma_kernels/triton/launch.py): a launch whose signature was seen before calls
the compiled kernel Triton returned for it, skipping Triton's per-call launch path.

Without a GPU, ``python -m bench.launch_overhead`` runs Triton's GPU launch path on stand-ins
for the driver and compiler (bench/fake_gpu.py), in a fresh process since the interpreter must
be off: ``--check`` requires every call of the backend to reach the compiled kernels' launchers
with the same kernel, grid and arguments either way, and without entering Triton's launch path.
The launch key is checked here: it must tell apart every launch Triton would compile apart. On a
GPU, repeated calls (direct launches, not through Triton's launch path) must give bit for bit
what calls through Triton give.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from helpers import DEVICE, import_triton_backend, is_duration, needs_gpu

import sma_kernels as sk
from bench.cases import WORKLOADS

triton_backend = import_triton_backend()
from triton.runtime.jit import JITFunction

from sma_kernels.triton import launch

ROOT = Path(__file__).resolve().parents[1]


def run_launch_overhead(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench.launch_overhead", *args],
                          capture_output=True, text=True, timeout=600, check=False, cwd=ROOT)


def test_direct_launches_pass_tritons_arguments():
    done = run_launch_overhead("--check")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if "launches," in line]
    calls = ("mask", "forward", "forward+backward", "masked_attention")
    assert [line.split(":")[0] for line in lines] == [
        f"{case.name} {call}{hooks}" for hooks in ("", ", launch hooks set") for case in WORKLOADS
        for call in calls]
    assert all(line.endswith("same") for line in lines), lines


def test_launch_overhead_times_each_route(tmp_path):
    # What it measures is a benchmark's business (bench/README.md); here, that it runs.
    done = run_launch_overhead("--out", str(tmp_path), "--blocks", "1", "--calls", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    (path,) = tmp_path.glob("launch-overhead-cpu-*.json")
    records = json.loads(path.read_text())["records"]
    assert [record["case"] for record in records] == [case.name for case in WORKLOADS]
    for record in records:
        short = record["case"] == "higgs"  # one kernel forward, one backward
        assert [record[metric]["launches"] for metric in ("mask", "fwd", "fwdbwd", "fwd_plan")] == \
            ([1, 1, 2, 1] if short else [2, 3, 5, 3])
        assert all(is_duration(record[metric][f"{route}_us"]) for metric in ("mask", "fwd")
                   for route in ("stubbed", "triton", "direct"))


def test_launch_key_tells_apart_what_triton_specializes():
    # The scalars are fixed by the Static (its identity is in the key); the tensors differ by
    # dtype and 16-byte alignment, which Triton specializes on, and by name.
    x = torch.zeros(8, dtype=torch.float32)
    static = launch.Static((1,), {"n": 16})
    base = {"X": x, "Y": None}
    key = launch.launch_key("kernel", 0, static, base)
    assert launch.launch_key("kernel", 0, static, {**base, "X": torch.ones(8)}) == key
    different = [{**base, "X": x.half()}, {**base, "X": x[1:]},  # 4 B past a 16-B boundary
                 {**base, "Y": x}, {"Y": None, "X": x}, {"X": x, "Z": None}]
    for tensors in different:
        assert launch.launch_key("kernel", 0, static, tensors) != key, tensors
    assert launch.launch_key("other kernel", 0, static, base) != key
    assert launch.launch_key("kernel", 1, static, base) != key  # compiled per device
    assert launch.launch_key("kernel", 0, launch.Static((1,), {"n": 16}), base) != key


def test_through_triton_turns_direct_launches_off_while_active(monkeypatch):
    monkeypatch.setattr(launch, "DIRECT", True)
    with launch.through_triton():
        assert launch.DIRECT is False
    assert launch.DIRECT is True


def test_launches_through_triton_hold_the_first_launch_lock(monkeypatch):
    # A launch through Triton may run the autotuner, which sets the best_config that a first
    # direct launch in another thread reads under this lock: it must not run beside one.
    held = []

    class Kernel:
        def __getitem__(self, grid):
            def run(**arguments):
                held.append((grid, arguments, launch._first_launch._is_owned()))
            return run

    monkeypatch.setattr(launch, "DIRECT", False)
    launch.launch(Kernel(), launch.Static((3,), {"n": 5}), X=None)
    assert held == [((3,), {"X": None, "n": 5}, True)]


def test_launchers_build_each_static_once_per_layout():
    # The Statics are memoized functions of the shapes, strides, dtype and options: a call with
    # the layout of an earlier one gets that call's Static, any other layout another.
    from sma_kernels.triton import attention
    q = torch.randn(2, 3, 40, 16)
    k = v = torch.randn(2, 3, 50, 16)
    args = (q.shape, v.shape, q.stride(), k.stride(), v.stride(), q.stride(), 50, q.dtype, 0.25)
    static = attention._forward_static(*args)
    assert attention._forward_static(*args) is static
    assert static.scalars["NK"] == 50 and static.scalars["stride_kh"] == 50 * 16
    k_t = k.transpose(2, 3).contiguous().transpose(2, 3)  # the same shape, other strides
    other = attention._forward_static(*args[:3], k_t.stride(), *args[4:])
    assert other is not static and other.scalars["stride_kn"] == 1
    assert attention._forward_static(*args[:-1], 0.5) is not static
    # Equal values of other types are other keys: Triton specializes 1 and 1.0 apart.
    assert attention._forward_static(*args[:-1], 1) is not attention._forward_static(*args[:-1], 1.0)


@needs_gpu
@pytest.mark.parametrize("length", [28, 300])  # the short-sequence kernel, and the general path
def test_repeated_calls_match_the_first_on_gpu(monkeypatch, length):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    q, k, v = (torch.randn(4, 2, length, 32, device=DEVICE, dtype=torch.bfloat16,
                           generator=g).requires_grad_() for _ in range(3))
    plan = sk.make_plan(4, length, length, 2, generator=g)

    def call():
        out, mask = sk.self_guided_attention(q, k, v, plan=plan, ratio=0.3, num_per_query=1,
                                             mask_self=True, backend="triton")
        return (out, mask, *torch.autograd.grad(out, (q, k, v), torch.ones_like(out)))

    with monkeypatch.context() as patch:
        patch.setattr(launch, "DIRECT", False)
        through_triton = call()
    first = call()  # keeps each compiled kernel
    with mock.patch.object(JITFunction, "run", autospec=True,
                           side_effect=JITFunction.run) as triton_run:
        repeated = call()
    assert not triton_run.called, "a repeated call went through JITFunction.run"
    for results in (first, repeated):
        for got, want in zip(results, through_triton, strict=True):
            assert torch.equal(got, want)
