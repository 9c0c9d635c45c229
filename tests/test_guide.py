"""The guide runs: every command and code block of docs/guide/, in order, at a tiny budget
(`python docs/make_figures.py --quick`), and the notebook made from the same source holds them all."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_every_block_of_the_guide_runs(tmp_path, gutenberg_dir):
    result = subprocess.run([sys.executable, str(REPO / "docs" / "make_figures.py"), "--quick"], cwd=REPO,
                            capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    blocks = sum(len(re.findall(r"```(?:bash|python)\n", p.read_text()))
                 for p in (REPO / "docs" / "guide").glob("[0-9][0-9]-*.md"))
    assert summary["chapters"] == 9 and summary["blocks"] == blocks


def test_the_notebook_comes_from_the_same_source():
    sys.path.insert(0, str(REPO / "docs"))
    try:
        import make_figures
    finally:
        sys.path.pop(0)
    chapters = [(p, p.read_text(), []) for p in make_figures.CHAPTERS]
    book = make_figures.notebook(chapters)
    code = [c for c in book["cells"] if c["cell_type"] == "code"]
    blocks = sum(len(make_figures.BLOCK.findall(text)) for _, text, _ in chapters)
    assert len(code) == blocks and book["nbformat"] == 4
    assert any("lmforge train" in "".join(c["source"]) for c in code)
    committed = json.loads(make_figures.NOTEBOOK.read_text(encoding="utf-8"))
    assert committed == book, "docs/guide.ipynb is stale: python docs/make_figures.py --notebook-only"


@pytest.mark.parametrize("page", ["README.md", "docs/guide.md"])
def test_every_linked_file_exists(page):
    text = (REPO / page).read_text()
    for link in re.findall(r"\]\(([^)#]+)\)", text):
        if not link.startswith("http"):
            assert (REPO / page).parent.joinpath(link).exists(), link
