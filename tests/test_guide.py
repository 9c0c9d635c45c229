"""The guide runs: its code blocks, in order, at a tiny budget (`python docs/make_figures.py --quick`),
and the notebook made from the same source holds them all.

The whole guide takes 5-11 minutes even at tiny budgets (every command still prepares its data and
evaluates on the whole validation split), so the suite runs the chapters of the README's main job
(1-3 and 6: prepare, train on Austen, evaluate, generate) and leaves the rest to the slow check,
`python -m pytest -m slow`, which CI runs after the suite: every chapter, including the evaluation
report and the server and torchrun of chapters 7 and 9 (a minute and a half of the suite before).
"""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FAST = "01,02,03,06"


def run_guide(only: str | None) -> None:
    command = [sys.executable, str(REPO / "docs" / "make_figures.py"), "--quick"] + (["--only", only] if only else [])
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    chapters = [p for p in (REPO / "docs" / "guide").glob("[0-9][0-9]-*.md")
                if only is None or any(part in p.name for part in only.split(","))]
    blocks = sum(len(re.findall(r"```(?:bash|python)\n", p.read_text())) for p in chapters)
    assert summary["chapters"] == len(chapters) and summary["blocks"] == blocks


def test_the_guide_chapters_of_the_main_job_run(gutenberg_dir):
    run_guide(FAST)


@pytest.mark.slow
def test_every_block_of_the_guide_runs(gutenberg_dir):
    run_guide(None)


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
