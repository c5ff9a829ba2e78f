"""The README's code runs as written, so the docs match the code."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert blocks, "README.md has no python example"
    for block in blocks:
        exec(compile(block, str(README), "exec"), {})  # noqa: S102  (running the docs is the test)


def test_readme_commands_leave_tracked_files_alone():
    """A README command run as written writes under the git-ignored runs/ (or /tmp), never over a
    committed file such as docs/show_masks.png; regenerating committed results is a command of
    its own (python -m bench --save), or named in prose, never in a command block."""
    assert "/runs/" in README.with_name(".gitignore").read_text().split()
    commands = "\n".join(re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.DOTALL))
    outs = re.findall(r"--out\s+([^\s`]+)", commands)
    assert outs, "README.md's commands name no --out"
    for out in outs:
        assert out.startswith(("runs/", "/tmp/")), out
