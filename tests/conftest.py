"""Shared fixtures: the read-only corpora beside the project, and tiny texts for fast tests."""
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
NLTK_DATA = SHARED / "nltk_data"
GUTENBERG = NLTK_DATA / "corpora" / "gutenberg"
MORE = SHARED / "corpora" / "gutenberg-more"

TINY_TEXT = (
    "Emma Woodhouse, handsome, clever, and rich, with a comfortable home\n"
    "and happy disposition, seemed to unite some of the best blessings\n"
    "of existence; and had lived nearly twenty-one years in the world\n"
    "with very little to distress or vex her.\n\n"
) * 20


@pytest.fixture(autouse=True)
def _offline_nltk(monkeypatch):
    """Point NLTK at the local copy of the corpus; tests never download."""
    monkeypatch.setenv("NLTK_DATA", str(NLTK_DATA))


@pytest.fixture
def gutenberg_dir() -> Path:
    if not GUTENBERG.is_dir():
        pytest.skip("the shared Gutenberg corpus is not beside the project")
    return GUTENBERG


@pytest.fixture
def austen_text(gutenberg_dir) -> str:
    return (gutenberg_dir / "austen-emma.txt").read_text(encoding="latin-1")


@pytest.fixture
def tiny_text() -> str:
    return TINY_TEXT


@pytest.fixture
def tiny_file(tmp_path) -> Path:
    path = tmp_path / "tiny.txt"
    path.write_text(TINY_TEXT, encoding="utf-8")
    return path
