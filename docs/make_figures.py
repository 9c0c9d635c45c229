"""Run the guide: every command and code block of docs/guide/, in order, and every figure and table.

    python docs/make_figures.py            # full: the published figures, outputs and tables (an hour or two)
    python docs/make_figures.py --quick    # every block at a tiny budget, in a scratch folder (5-11 minutes)
    python docs/make_figures.py --quick --only 01,06  # those chapters only
    python docs/make_figures.py --notebook # also write docs/guide.ipynb from the same source
    python docs/make_figures.py --notebook-only  # only that (a test checks the committed one is current)

Each chapter is Markdown whose ```bash and ```python blocks run in one working folder (docs/guide/work/
in full mode), python blocks sharing one namespace per chapter, as a learner who copies them in
order would run them. After a block, the region between `<!-- output -->` and `<!-- /output -->`
holds what it printed (full mode rewrites it, with the machine, date and this command); figures are
files the blocks write under figures/, copied to docs/guide/figures/. Quick mode shrinks every
training budget (--max-time, --budget, --max-steps, max_time=...) to a few seconds or steps and
checks that every block runs and every figure appears, without touching the published files.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

GUIDE = Path(__file__).resolve().parent / "guide"
CHAPTERS = sorted(p for p in GUIDE.glob("[0-9][0-9]-*.md"))
BLOCK = re.compile(r"```(bash|python)\n(.*?)```\n(?:\n?<!-- output -->\n.*?<!-- /output -->\n)?", re.S)
QUICK = [  # (pattern, replacement): training budgets shrunk to a few steps (a time budget of a few
    # seconds would evaluate after every step, as a tenth of its budget is under one step)
    (r"--max-time \S+", "--max-steps 3"), (r"--budget \S+", "--budget 0 --max-steps 3"),
    (r"--max-steps \d+", "--max-steps 4"), (r"max_time=[\d.]+", "max_steps=3"), (r"max_steps=\d+", "max_steps=4"),
    (r"--prompts \d+", "--prompts 4"), (r"train\.max_time=\S+", "train.max_steps=3"), (r"--duration \S+", "--duration 2s"),
    (r"--clients [\d,]+", "--clients 1,2"), (r"--new-tokens \d+", "--new-tokens 20"), (r"--rounds \d+", "--rounds 1"),
    (r"\[:150_000\]", "[:3_000]"), (r"PASSAGES = \d+", "PASSAGES = 12"),
    (r"in \(0\.1, 0\.3, 1\.0\)", "in (0.1,)"),  # one point of the transfer curve
]


def machine() -> str:
    from lmforge.probe import machine as facts

    m = facts()
    return f"{m['cpu']}, {m['logical_cpus']} logical CPUs, torch {m['torch']}"


def run_bash(code: str, cwd: Path, env: dict) -> str:
    result = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", code], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=7200)
    if result.returncode != 0:
        raise RuntimeError(f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result.stdout


def run_python(code: str, namespace: dict, cwd: Path) -> str:
    out = io.StringIO()
    previous = Path.cwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(code, "<guide block>", "exec"), namespace)  # the guide's own blocks, from this repository
    finally:
        os.chdir(previous)
    return out.getvalue()


def shrink(code: str) -> str:
    for pattern, replacement in QUICK:
        code = re.sub(pattern, replacement, code)
    return code


def run_chapter(path: Path, work: Path, quick: bool, env: dict, stamp: str) -> tuple[str, list]:
    """Run a chapter's blocks in order; return its text with fresh output regions, and (block, output)."""
    text = path.read_text(encoding="utf-8")
    namespace = {"__name__": "__guide__"}
    pieces, cells, at = [], [], 0
    for match in BLOCK.finditer(text):
        kind, code = match.group(1), match.group(2)
        tic = time.time()
        runnable = shrink(code) if quick else code
        try:
            output = run_bash(runnable, work, env) if kind == "bash" else run_python(runnable, namespace, work)
        except Exception as exc:
            detail = exc if isinstance(exc, RuntimeError) else traceback.format_exc()
            raise SystemExit(f"{path.name}: a {kind} block failed:\n{code}\n{detail}") from None
        print(f"  {path.name}: {kind} block ran in {time.time() - tic:.0f} s", file=sys.stderr)
        pieces.append(text[at:match.start()])
        block = f"```{kind}\n{code}```\n"
        shown = output.strip("\n").rstrip()  # keep the first line's indentation (aligned columns)
        if shown:
            markdown = shown.startswith("|")  # a table prints as Markdown
            body = shown if markdown else f"```text\n{shown}\n```"
            block += f"\n<!-- output -->\n{body}\n\n<sub>{stamp}</sub>\n<!-- /output -->\n"
        pieces.append(block)
        cells.append((kind, code, shown))
        at = match.end()
    pieces.append(text[at:])
    return "".join(pieces), cells


def notebook(chapters: list[tuple[Path, str, list]]) -> dict:
    """The guide as a Jupyter notebook (nbformat 4): prose as Markdown cells, blocks as code cells."""
    cells = []
    for path, text, _ in chapters:
        for part in re.split(r"(```(?:bash|python)\n.*?```\n(?:\n?<!-- output -->\n.*?<!-- /output -->\n)?)", text,
                             flags=re.S):
            block = BLOCK.fullmatch(part)
            if block:
                kind, code = block.group(1), block.group(2)
                source = code if kind == "python" else "\n".join(f"!{line}" for line in code.splitlines() if line)
                cells.append({"cell_type": "code", "metadata": {}, "execution_count": None, "outputs": [],
                              "source": source.splitlines(keepends=True)})
            elif part.strip():
                cells.append({"cell_type": "markdown", "metadata": {}, "source": part.splitlines(keepends=True)})
    return {"nbformat": 4, "nbformat_minor": 5, "cells": cells,
            "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
                         "language_info": {"name": "python"}}}


NOTEBOOK = GUIDE.parent / "guide.ipynb"


def write_notebook(chapters: list[tuple[Path, str, list]]) -> None:
    NOTEBOOK.write_text(json.dumps(notebook(chapters), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny budgets, a scratch folder, nothing published")
    p.add_argument("--notebook", action="store_true", help="also write docs/guide.ipynb")
    p.add_argument("--notebook-only", action="store_true", help="write docs/guide.ipynb from the chapters, run nothing")
    p.add_argument("--only", help="run only the chapters whose file names contain one of these comma-separated "
                   "parts (e.g. 01,02,06); a chapter that reuses an earlier one's run needs that chapter too")
    args = p.parse_args()
    if args.notebook_only:
        write_notebook([(c, c.read_text(encoding="utf-8"), []) for c in CHAPTERS])
        return
    parts = [part for part in (args.only or "").split(",") if part]
    chapters = [c for c in CHAPTERS if not parts or any(part in c.name for part in parts)]
    if not chapters:
        raise SystemExit(f"--only {args.only}: no chapter matches; chapters are {[c.name for c in CHAPTERS]}")
    scratch = Path(tempfile.mkdtemp(prefix="lmforge-guide-")) if args.quick else GUIDE / "work"
    work = scratch
    work.mkdir(parents=True, exist_ok=True)
    (work / "figures").mkdir(exist_ok=True)
    env = {**os.environ, "MPLBACKEND": "Agg"}
    command = "python docs/make_figures.py" + (f" --only {args.only}" if args.only else "")
    stamp = f"{machine()}; {time.strftime('%Y-%m-%d')}; `{command}`"
    done = []
    tic = time.time()
    try:
        for path in chapters:
            text, cells = run_chapter(path, work, args.quick, env, stamp)
            done.append((path, text, cells))
            if not args.quick:
                path.write_text(text, encoding="utf-8")
        figures = sorted((work / "figures").glob("*.png"))
        if not args.quick:
            (GUIDE / "figures").mkdir(exist_ok=True)
            for figure in figures:
                shutil.copy(figure, GUIDE / "figures" / figure.name)
        referenced = {m for _, text, _ in done for m in re.findall(r"\(figures/([\w.-]+\.png)\)", text)}
        missing = referenced - {f.name for f in figures} - ({f.name for f in (GUIDE / "figures").glob("*.png")}
                                                              if not args.quick else set())
        if missing:
            raise SystemExit(f"figures referenced but not made: {sorted(missing)}")
        if args.notebook:
            write_notebook(done)
        print(json.dumps({"chapters": len(done), "blocks": sum(len(c) for _, _, c in done), "figures": len(figures),
                          "seconds": round(time.time() - tic), "quick": args.quick}))
    finally:
        if args.quick:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
