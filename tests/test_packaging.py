"""What `pip install` pulls and builds: a lean core, a typed package, and a clear stop when the
build cannot see the installed torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_a_build_that_cannot_see_torch_stops_at_once_with_the_command_to_run(tmp_path):
    # What pip's build isolation looks like to setup.py: no importable torch.
    hidden = tmp_path / "torch"
    hidden.mkdir()
    (hidden / "__init__.py").write_text("raise ImportError(\"No module named 'torch'\")\n")
    # It stops at once: a build that hung or went on would run past the timeout, which fails.
    result = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, capture_output=True,
                            text=True, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path)},
                            timeout=60, check=False)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [lines[0]] and "pip install --no-build-isolation ." in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_the_build_system_does_not_pull_torch():
    requires = (ROOT / "pyproject.toml").read_text().split("[build-system]")[1].split("[")[1]
    assert "torch" not in requires.split("]")[0]


def test_the_core_imports_nothing_of_the_extras():
    code = """
import sys
import torch
before = set(sys.modules)  # torch itself imports some of them (tqdm) when they are installed
import sma_kernels as sk
import sma_kernels.nn
x = torch.randn(2, 2, 8, 4)
out, mask = sk.self_guided_attention(x, x, x, ratio=0.3, num_per_query=2, mask_self=True)
layer = sma_kernels.nn.SelfGuidedAttention(8, 2)
layer(torch.randn(2, 5, 8))
added = {name.split(".")[0] for name in set(sys.modules) - before}
print(" ".join(sorted(added & {"matplotlib", "tqdm", "numpy", "pandas", "hypothesis", "pytest", "sma"})))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""


def test_the_package_is_typed():
    assert (ROOT / "sma_kernels" / "py.typed").is_file()
    assert '"py.typed"' in (ROOT / "setup.py").read_text()
