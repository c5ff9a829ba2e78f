"""Smoke tests of the benchmark (bench/): every provider at tiny sizes on the CPU, the JSON
schema, the terminal and README tables, that a wrong provider fails the benchmark instead of
winning it, and that a run writes to the git-ignored runs/bench/ unless told to save."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import is_duration

import sma_kernels
from bench import __main__ as bench_main
from bench import e2e, measure, report, score_configs, suite
from bench import profile as bench_profile
from bench.cases import WORKLOADS, make_inputs, tiny_cases
from bench.providers import (
    Compiled,
    Flex,
    PublishedEager,
    SmaBackend,
    Vectorized,
    check_mask,
    check_output,
    reference_scores,
)

CPU = torch.device("cpu")
CASES = {case.name: case for case in tiny_cases()}


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny ops gain nothing from threads, and on a busy machine thread hand-offs cost more.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def reference(x):
    out, mask = sma_kernels.self_guided_attention(x.q, x.k, x.v, x.valid, query_valid=x.query_pool,
                                                  plan=x.plan, backend="reference", **x.options)
    return out, mask, *reference_scores(x)


def test_main_writes_valid_json_and_table(tmp_path, capsys):
    fast = ["sdpa", "sdpa+pad", "published", "vectorized"] + [
        f"sma:{name}{plan}" for name, info in sma_kernels.backends().items()
        if info["available"] and info["device"] == "cpu" for plan in ("", "+plan")]
    code = bench_main.main(["--device", "cpu", "--tiny", "--out", str(tmp_path), "--no-e2e",
                            "--no-plots", "--min-run-time", "0.002", "--providers", *fast])
    assert code == 0
    latest = json.loads((tmp_path / "latest-cpu.json").read_text())
    suite.validate(latest)
    assert [case["name"] for case in latest["cases"]] == list(CASES)
    for case in latest["cases"]:
        assert set(case["providers"]) == set(fast)
        for name, record in case["providers"].items():
            assert record["status"] == "ok", (case["name"], name, record["reason"])
            assert set(record["times"]) == ({"fwd", "fwdbwd"} if name.startswith("sdpa")
                                            else {"mask", "fwd", "fwdbwd"})
            if name not in ("sdpa", "sdpa+pad"):
                assert record["check"] is not None
            # beside each time: the host time of a call and its launches
            assert set(record["launches"]) == set(record["times"])
            assert all(is_duration(timing["host_median_ms"]) for timing in record["times"].values())
            assert all(count > 0 for count in record["launches"].values())
            if name.startswith("sma:"):  # as users call it, the op draws its plan: its launches show it
                draws = [launch for launch in record["launch_names"]["fwd"] if launch.startswith("randint")]
                assert record["plan"] == ("given" if name.endswith("+plan") else "generator")
                assert len(draws) == (0 if name.endswith("+plan") else 1), record["launch_names"]["fwd"]
    # a dated copy of the same run, and the table printed after the files are written
    assert len(list(tmp_path.glob("cpu-*.json"))) == 1
    out = capsys.readouterr().out
    lines = out[out.index("wrote "):].splitlines()
    header = next(i for i, line in enumerate(lines) if "fwd / SDPA" in line)
    # each ratio column says which way is better, on the header line below its name
    names, better = lines[header], lines[header + 1]
    for column, direction in (("fwd / SDPA", "(lower is better)"), ("fwd+bwd / SDPA", "(lower is better)"),
                              ("fwd speed-up vs published", "(higher is better)"),
                              ("mask speed-up vs vectorized", "(higher is better)")):
        end = names.index(column) + len(column)
        assert better[:end].endswith(direction), (column, better)
    # the mask check, one line per provider, before the timing table
    check = next(i for i, line in enumerate(lines) if line.startswith("mask check"))
    assert check < header
    for name in fast:
        (line,) = [line for line in lines[check + 1:header] if line.split()[:1] == [name]]
        verdict = "no mask" if name.startswith("sdpa") else "ok"
        assert line.split(None, 1)[1].startswith(verdict), line
        if verdict == "ok":
            assert f"same mask as the reference at {len(CASES)} of {len(CASES)} case(s) (exact" in line


@pytest.fixture
def checkout_copy(tmp_path):
    """A git repository holding a copy of this checkout's tracked files (as they are on disk),
    with everything committed, plus the built extension."""
    root = Path(__file__).resolve().parents[1]
    try:
        listed = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True,
                                check=True, timeout=60).stdout.decode()
    except (OSError, subprocess.SubprocessError):
        pytest.skip("not a git checkout")
    copy = tmp_path / "checkout"
    for name in filter(None, listed.split("\0")):
        if (root / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / name, copy / name)
    for built in root.glob("sma_kernels/_C*"):
        shutil.copy2(built, copy / "sma_kernels" / built.name)
    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "copy"]):
        subprocess.run(git + args, cwd=copy, check=True, capture_output=True, timeout=60)
    return copy


def _changed(copy):
    """``git status --porcelain`` of ``copy``: paths modified or added (ignored ones excepted)."""
    status = subprocess.run(["git", "status", "--porcelain"], cwd=copy, capture_output=True,
                            text=True, check=True, timeout=60).stdout
    return sorted(line[3:] for line in status.splitlines())


def test_default_runs_leave_the_checkout_clean(checkout_copy):
    copy = checkout_copy
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(copy), str(copy / "python")])}

    def run(*args):
        done = subprocess.run([sys.executable, "-m", *args], cwd=copy, env=env, capture_output=True,
                              text=True, timeout=600, check=False)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done.stdout

    quick = ["--tiny", "--no-e2e", "--min-run-time", "0.002", "--providers", "sdpa", "published",
             "vectorized"]
    assert _changed(copy) == []
    run("bench", *quick)
    run("bench.host_overhead", "--blocks", "1", "--calls", "1")
    # nothing tracked changed and nothing new outside the git-ignored runs/
    assert _changed(copy) == []
    local = copy / "runs" / "bench"
    assert {"latest-cpu.json", "latest-cpu-speedup.png"} <= {path.name for path in local.iterdir()}
    assert len(list(local.glob("cpu-*.json"))) == len(list(local.glob("host-overhead-cpu-*.json"))) == 1
    # --save writes into the committed results, and nowhere else
    out = run("bench", *quick, "--no-plots", "--save")
    changed = _changed(copy)
    assert "bench/results/latest-cpu.json" in changed
    assert all(path.startswith("bench/results/") for path in changed), changed
    assert str(copy / "bench" / "results" / "latest-cpu.json") in out


def test_a_named_commit_wins_over_the_checkouts(monkeypatch):
    # A GPU host's copy of the tree may carry a .git of another commit.
    monkeypatch.setenv("SMA_KERNELS_COMMIT", "0123456789")
    assert measure.environment(CPU)["git"] == {"commit": "0123456789", "dirty": None}
    monkeypatch.delenv("SMA_KERNELS_COMMIT")
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], check=False).stdout.strip()
    assert measure.environment(CPU)["git"]["commit"] == (head or None)


def test_readme_table_comes_from_committed_results_only(tmp_path):
    with pytest.raises(SystemExit):
        bench_main.parse_args(["--readme", str(tmp_path / "README.md")])  # needs --save
    assert bench_main.parse_args(["--save", "--readme", "README.md"]).out == report.RESULTS
    assert bench_main.parse_args([]).out == report.LOCAL
    local = tmp_path / "latest-cpu.json"
    shutil.copy2(report.RESULTS / "latest-cpu.json", local)
    readme = tmp_path / "README.md"
    readme.write_text(f"{report.START}\n{report.END}\n")
    with pytest.raises(SystemExit):
        report.main([str(local), "--readme", str(readme)])
    with pytest.raises(SystemExit):
        report.main(["--dir", str(tmp_path / "empty"), "--readme", str(readme)])
    assert readme.read_text() == f"{report.START}\n{report.END}\n"
    report.main(["--dir", str(tmp_path)])  # local results are readable, just not for the README


def test_readme_table_is_generated_from_the_committed_results():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    results = [json.loads(path.read_text()) for path in sorted(report.RESULTS.glob("latest-*.json"))]
    expected = report.markdown(results)
    assert f"{report.START}\n{expected}\n{report.END}" in readme, \
        "README.md's bench table is stale: python -m bench.report --readme README.md"
    headers = [line for line in expected.splitlines() if line.startswith("| workload")]
    assert headers and all("best / SDPA (lower is better)" in line
                           and "best speed-up vs published (higher is better)" in line
                           and "best mask speed-up vs vectorized (higher is better)" in line
                           for line in headers)


def test_time_limit_leaves_valid_partial_json(tmp_path):
    code = bench_main.main(["--device", "cpu", "--tiny", "--out", str(tmp_path), "--no-plots",
                            "--time-limit", "0.001", "--providers", "sdpa"])
    assert code == 0
    latest = json.loads((tmp_path / "latest-cpu.json").read_text())
    suite.validate(latest)
    assert latest["cases"] == [] and latest["not_run"] == list(CASES)
    assert latest["end_to_end"]["status"] in ("ok", "skipped")
    assert all(entry["status"] == "skipped" for setting in latest["end_to_end"].get("settings", [])
               for entry in setting["providers"].values())


@pytest.mark.parametrize("case", ["molecules", "pixels"])  # random + mask_self, mean + cross
def test_flex_route_matches_reference(case):
    x = make_inputs(CASES[case], CPU, torch.float32)
    ref_out, ref_mask, scores, forced = reference(x)
    flex = Flex()
    if flex.unavailable(CPU):
        pytest.skip(flex.unavailable(CPU))
    flex.prepare(x)
    out, mask = flex.forward(x, x.q, x.k, x.v)
    check_mask(mask, ref_mask, scores, x.valid, forced)
    check_output(out, ref_out, (mask == ref_mask).all(1))


def test_compiled_route_matches_reference():
    x = make_inputs(replace(CASES["higgs"], batch=2), CPU, torch.float32)
    ref_out, ref_mask, scores, forced = reference(x)
    compiled = Compiled()
    compiled.prepare(x)
    out, mask = compiled.forward(x, x.q, x.k, x.v)
    check_mask(mask, ref_mask, scores, x.valid, forced)
    check_output(out, ref_out, (mask == ref_mask).all(1))


def test_triton_provider_under_the_interpreter():
    provider = SmaBackend("triton", allow_interpreter=True)
    if provider.unavailable(CPU):
        pytest.skip(f"sma:triton: {provider.unavailable(CPU)}")
    assert SmaBackend("triton").unavailable(CPU) is not None  # never timed by default on the CPU
    x = make_inputs(CASES["molecules"], CPU, torch.float32)
    ref_out, ref_mask, scores, forced = reference(x)
    provider.prepare(x)  # seeds its generator: its first draw is x.plan
    out, mask = provider.forward(x, x.q, x.k, x.v)
    check_mask(mask, ref_mask, scores, x.valid, forced)
    check_output(out, ref_out, (mask == ref_mask).all(1))


class FlipsOneToken(PublishedEager):
    """Fast and wrong: unmasks one masked token and masks the free token of lowest score instead
    (same count, no padding, but far from any near-tie)."""

    name = "wrong"
    kind = "sma-kernels"

    def mask(self, x):
        mask = super().mask(x).clone()
        scores, _ = reference_scores(x)
        b = 0
        taken = mask[b].nonzero()[0, 0]
        free = (x.valid[b] & ~mask[b]).nonzero().squeeze(1)
        mask[b, taken] = False
        mask[b, free[scores[b, free].argmin()]] = True
        return mask

    def forward(self, x, q, k, v):
        mask = self.mask(x)
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=(x.valid & ~mask)[:, None, None, :], scale=x.options["scale"])
        return out, mask


def test_wrong_provider_fails_the_benchmark():
    result = suite.run_suite([CASES["proteins"]], [Vectorized(), FlipsOneToken()], CPU,
                             torch.float32, min_run_time=0.002, compile_budget=0, dense_budget_gb=1)
    record = result["cases"][0]["providers"]["wrong"]
    assert record["status"] == "failed" and "not a near-tie" in record["reason"]
    assert record["times"] == {}  # never timed
    assert result["failures"] == [f"proteins/wrong: {record['reason']}"]
    assert result["cases"][0]["providers"]["vectorized"]["status"] == "ok"


def test_check_mask_accepts_only_near_ties():
    valid = torch.tensor([[True, True, True, True, False]])
    scores = torch.tensor([[0.5, 0.3, 0.3 * (1 + 1e-7), 0.1, float("-inf")]])
    forced = torch.zeros_like(valid)
    ref = torch.tensor([[True, False, True, False, False]])
    assert check_mask(ref.clone(), ref, scores, valid, forced) == "exact"
    tie = torch.tensor([[True, True, False, False, False]])
    assert "near-tie" in check_mask(tie, ref, scores, valid, forced)
    for wrong in ([[True, False, False, True, False]],  # not a tie
                  [[True, True, True, False, False]],  # one too many
                  [[True, False, False, False, True]]):  # padding
        with pytest.raises(AssertionError):
            check_mask(torch.tensor(wrong), ref, scores, valid, forced)


def test_validate_rejects_broken_json(tmp_path):
    result = suite.run_suite([CASES["higgs"]], [Vectorized()], CPU, torch.float32,
                             min_run_time=0.002, compile_budget=0, dense_budget_gb=1)
    result["end_to_end"] = {"status": "skipped", "reason": "not part of this test"}
    suite.validate(result)
    broken = json.loads(json.dumps(result))
    del broken["cases"][0]["providers"]["vectorized"]["times"]["fwd"]
    with pytest.raises(ValueError, match="fwd"):
        suite.validate(broken)
    broken = json.loads(json.dumps(result))
    broken["ceilings"]["copy_gbps"] = "fast"
    with pytest.raises(TypeError, match="copy_gbps"):
        suite.validate(broken)
    # the README table is generated between the markers, the rest left as it was
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.START}\nold table\n{report.END}\noutro\n")
    report.update_readme(readme, [result])
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith(f"{report.END}\noutro\n")
    assert "old table" not in text and "| vectorized |" in text
    assert "| higgs (8, 2, 28, 28, 4, 4) |" in text


def test_summary_names_the_host_time_of_gpu_timings():
    result = json.loads((report.RESULTS / "latest-cpu.json").read_text())
    case = next(case for case in result["cases"] if case.get("summary"))
    timing = case["providers"][case["summary"]["best_backend"]]["times"]["fwd"]
    timing["host_median_ms"] = timing["median_ms"]
    assert not any("host" in line for line in report.summary_lines(result))  # CPU: host time = time
    result["device"]["type"] = "cuda"
    timing["host_median_ms"] = 0.0421
    line = next(line for line in report.summary_lines(result) if line.startswith(case["name"]))
    assert line.endswith(f"; host 0.0421 of {report._time(timing['median_ms'])} ms per fwd call")


def test_host_overhead_counts_every_launch(tmp_path):
    # A fresh process: the script must set TRITON_INTERPRET before Triton is imported.
    done = subprocess.run([sys.executable, "-m", "bench.host_overhead", "--out", str(tmp_path),
                           "--blocks", "1", "--calls", "2"], capture_output=True, text=True,
                          timeout=600, check=False, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-3000:]
    (path,) = tmp_path.glob("host-overhead-cpu-*.json")
    result = json.loads(path.read_text())
    assert [record["case"] for record in result["records"]] == [case.name for case in WORKLOADS]
    general = ["_chosen_row_scores_kernel", "_select_kernel"]
    general_backward = ["_attention_bwd_dq_kernel", "_attention_bwd_dkdv_kernel"]
    for record in result["records"]:
        if record["case"] == "higgs":  # L = 28: one kernel forward, one backward
            mask = forward = ["_short_sequence_kernel"]
            backward = ["_short_sequence_bwd_kernel"]
        else:  # the fused forward: the selection writes the kept-key order the attention reads
            mask, forward = general, general + ["_attention_fwd_kernel"]
            backward = general_backward
        assert record["launches"] == {"mask": mask, "fwd": forward, "fwdbwd": forward + backward,
                                      "fwd_plan": forward}
        # As users call: the plan's one random draw is the only aten op.
        assert all(record["aten_ops"][metric] == ["randint.low_generator"]
                   for metric in ("mask", "fwd", "fwdbwd"))
        assert all(is_duration(record[f"{route}_{metric}_us"]) for route in ("eager", "ops")
                   for metric in ("mask", "fwd", "fwdbwd", "fwd_plan"))


def test_profile_lists_each_calls_ops(tmp_path):
    assert bench_profile.main(["--device", "cpu", "--cases", "higgs", "--repeats", "1",
                               "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "profile-cpu.json").read_text())
    records = {(record["provider"], record["call"]): record for record in result["records"]}
    assert set(records) == {(provider, call) for provider in ("sdpa", "sma:cpp")
                            for call in bench_profile.CALLS}
    for record in records.values():
        assert is_duration(record["host_ms"]) and record["device_ms"] is None  # no device on the CPU
        assert record["host_functions"] and all(row["calls"] > 0 for row in record["host_functions"])
    # The C++ ops and sma-kernels' Python are the host time of its calls.
    assert any("sma_kernels" in row["function"]
               for row in records["sma:cpp", "fwd"]["host_functions"])
    names = [kernel["name"] for kernel in records["sma:cpp", "fwdbwd"]["kernels"]]
    assert any(name.startswith("sma_kernels") for name in names), names  # the C++ ops
    assert any("scaled_dot_product" in kernel["name"]
               for kernel in records["sdpa", "fwd"]["kernels"])


def test_profile_sees_a_backward_on_another_thread():
    # For CUDA tensors autograd runs the backward on its device thread; on the CPU it runs on the
    # caller's, so a thread of the test's own stands in for it.
    x = make_inputs(CASES["higgs"], CPU, torch.float32)
    leaves = [t.clone().requires_grad_() for t in (x.q, x.k, x.v)]

    def fwdbwd_on_a_thread():
        out, _ = sma_kernels.self_guided_attention(*leaves, x.valid, plan=x.plan, backend="cpp",
                                                   **x.options)
        worker = threading.Thread(target=lambda: out.sum().backward())
        worker.start()
        worker.join()

    rows = bench_profile._host_functions(fwdbwd_on_a_thread, CPU, repeats=2, top=200)
    calls = {row["function"]: row["calls"] for row in rows}  # per call of the function profiled
    assert [calls[name] for name in calls if name.startswith("sma_kernels/api.py:")
            and name.endswith("(self_guided_attention)")
            ] == [1], "the caller's thread"
    assert [calls[name] for name in calls if name.endswith("(_attention_grads)")] == [1], \
        "the other thread"


def test_score_configs_times_the_default_and_each_candidate(tmp_path):
    if sma_kernels.backends()["triton"]["reason"]:
        pytest.skip(f"triton: {sma_kernels.backends()['triton']['reason']}")
    assert score_configs.main(["--device", "cpu", "--repeats", "1", "--out", str(tmp_path)]) == 0
    records = json.loads((tmp_path / "score-configs-cpu.json").read_text())["records"]
    assert [record["default"] for record in records] == [True, False, False]
    assert all(record["case"] == "pixels" and is_duration(record["time_ms"])
               and record["kernel_ms"] is None for record in records)  # no device on the CPU
    assert records[0]["over_default"] == 1.0
    assert [record["config"] for record in records[1:]] == [
        score_configs._name(candidate) for candidate in score_configs.CANDIDATES[:2]]


def test_plots_are_written(tmp_path):
    pytest.importorskip("matplotlib")
    from bench import plots
    sweep = replace(CASES["pixels"], name="L=300", group="sweep-L", backward=False)
    result = suite.run_suite([CASES["higgs"], sweep], [PublishedEager(), Vectorized()], CPU,
                             torch.float32, min_run_time=0.002, compile_budget=0, dense_budget_gb=1)
    written = plots.make_plots(result, tmp_path / "run")
    assert sorted(path.name for path in written) == ["run-speedup.png", "run-time-vs-L.png"]
    assert all(path.stat().st_size > 1000 for path in written)


def test_end_to_end_training_step():
    record = e2e.run(CPU, min_run_time=0.002, log=lambda line: None, tiny=True,
                     providers=[PublishedEager(), Vectorized()])
    if record["status"] == "skipped":
        pytest.skip(record["reason"])
    for setting in record["settings"]:
        for name, entry in setting["providers"].items():
            assert entry["status"] == "ok", (setting["name"], name, entry["reason"])
            step, mask = entry["step"]["median_ms"], entry["mask"]["median_ms"]
            assert is_duration(step) and is_duration(mask)
            assert entry["mask_share"] == mask / step
