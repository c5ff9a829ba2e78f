"""The READMEs' code runs as written and their references resolve, so the docs match the code."""

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
# Documents whose Python blocks run and whose commands follow the --out rule.
RUNNABLE = [README, ROOT / "python" / "sma" / "README.md"]
# Documents whose links are checked.
DOCUMENTS = [*RUNNABLE, ROOT / "bench" / "README.md", ROOT / "docs" / "design.md", ROOT / "CHANGELOG.md"]
DESIGN_SECTIONS = ["The computation", "The randomness plan", "Rules at the edges",
                   "Differences from the published code", "Backends", "Kernels", "Testing", "Layout"]
# Files that code and docs cite by section name: `docs/design.md, "The computation"`.
CITED = ("docs/design.md", "python/sma/README.md", "bench/README.md")
CITATION = re.compile(r"(" + "|".join(re.escape(name) for name in CITED) + r")`?[,\s(]*\"([A-Z][^\"]*)\"")


def _name(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _headings(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.DOTALL)
    return [line.lstrip("#").strip() for line in text.splitlines() if re.match(r"#{1,6} ", line)]


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


@pytest.mark.parametrize("doc", RUNNABLE, ids=_name)
def test_python_examples_run(doc):
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.DOTALL)
    assert blocks, f"{_name(doc)} has no python example"
    for block in blocks:
        exec(compile(block, str(doc), "exec"), {})  # noqa: S102  (running the docs is the test)


@pytest.mark.parametrize("doc", RUNNABLE, ids=_name)
def test_commands_leave_tracked_files_alone(doc):
    """A command run as written writes under the git-ignored runs/ (or /tmp), never over a
    committed file such as docs/show_masks.png; regenerating committed results is a command of
    its own (python -m bench --save), or named in prose, never in a command block."""
    assert "/runs/" in (ROOT / ".gitignore").read_text().split()
    commands = "\n".join(re.findall(r"```bash\n(.*?)```", doc.read_text(), flags=re.DOTALL))
    outs = re.findall(r"--out\s+([^\s`]+)", commands)
    if doc != README:  # the model's commands write outputs; the library's README only sets up
        assert outs, f"{_name(doc)}'s commands name no --out"
    for out in outs:
        assert out.startswith(("runs/", "/tmp/")), out


def test_design_has_the_cited_sections():
    assert _headings(ROOT / "docs" / "design.md")[1:] == DESIGN_SECTIONS


@pytest.mark.parametrize("doc", DOCUMENTS, ids=_name)
def test_links_resolve(doc):
    """Every relative link of the document names an existing file, and its #anchor a heading."""
    text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.DOTALL)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        assert file.is_file(), f"{_name(doc)}: link to a missing file {target}"
        if anchor:
            assert anchor in {_anchor(h) for h in _headings(file)}, f"{_name(doc)}: no heading #{anchor}"


def test_section_citations_name_existing_sections():
    """A citation such as `docs/design.md, "Testing"` (or of the other cited documents) names a
    heading of that document, wherever it stands in the code or the docs."""
    headings = {name: set(_headings(ROOT / name)) for name in CITED}
    suffixes = {".py", ".md", ".cpp", ".h", ".sh", ".txt", ".toml"}
    files = [ROOT / ".ci" / "run"]
    for folder, subfolders, names in os.walk(ROOT):
        # Skip hidden folders (.git, .venv), outputs and build products.
        subfolders[:] = [name for name in subfolders if not name.startswith(".")
                         and name not in ("runs", "build", "dist", "__pycache__")
                         and not name.endswith(".egg-info")]
        files += [Path(folder) / name for name in names if Path(name).suffix in suffixes]
    for path in files:
        for name, section in CITATION.findall(path.read_text(errors="replace")):
            section = " ".join(section.replace("#", " ").split())  # a citation may wrap a line
            assert section in headings[name], f"{_name(path)} cites {name}, \"{section}\": no such section"
