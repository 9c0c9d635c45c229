"""Shared fixtures: the read-only corpora beside the project, and tiny texts for fast tests."""
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
NLTK_DATA = SHARED / "nltk_data"
MORE = SHARED / "corpora" / "gutenberg-more"

TINY_TEXT = (
    "Emma Woodhouse, handsome, clever, and rich, with a comfortable home\n"
    "and happy disposition, seemed to unite some of the best blessings\n"
    "of existence; and had lived nearly twenty-one years in the world\n"
    "with very little to distress or vex her.\n\n"
) * 20


def _corpus_folder():
    """An NLTK data folder holding the Gutenberg corpus: the user's NLTK_DATA first, then the shared copy."""
    for folder in os.environ.get("NLTK_DATA", "").split(os.pathsep) + [str(NLTK_DATA)]:
        if folder and (Path(folder) / "corpora" / "gutenberg").is_dir():
            return Path(folder)
    return None


CORPUS = _corpus_folder()


@pytest.fixture(autouse=True, scope="session")
def _own_cache(tmp_path_factory):
    """The tests' own cache folder (prepared data, the machine probe), so they never touch the user's:
    a session-wide folder, shared by the child processes some tests start."""
    folder = tmp_path_factory.mktemp("lmforge-cache")
    previous = os.environ.get("LMFORGE_CACHE")
    os.environ["LMFORGE_CACHE"] = str(folder)
    yield folder
    if previous is None:
        del os.environ["LMFORGE_CACHE"]
    else:
        os.environ["LMFORGE_CACHE"] = previous


@pytest.fixture(autouse=True)
def _offline_nltk(monkeypatch):
    """Point NLTK at a local copy of the corpus (the user's own NLTK_DATA, else the shared one); tests
    never download. Without either, the tests that need the corpus skip."""
    if CORPUS is not None:
        monkeypatch.setenv("NLTK_DATA", str(CORPUS))


@pytest.fixture
def gutenberg_dir() -> Path:
    if CORPUS is None:
        pytest.skip("no Gutenberg corpus here: set NLTK_DATA to a folder holding corpora/gutenberg")
    return CORPUS / "corpora" / "gutenberg"


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


KEY = "test-key"


class Server:
    """uvicorn serving `app` on a free loopback port, in a thread of this process."""

    def __init__(self, app):
        import socket
        import threading
        import time

        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline, "the server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="session")
def served_run(tmp_path_factory):
    """A tiny character Transformer trained on TINY_TEXT, for the server, the page and the chat."""
    import lmforge

    folder = tmp_path_factory.mktemp("serve")
    (folder / "tiny.txt").write_text(TINY_TEXT)
    config = {"data": {"sources": [str(folder / "tiny.txt")], "cache_dir": str(folder / "cache")},
              "tokenizer": {"kind": "char"},
              "model": {"arch": "transformer", "d_model": 32, "n_layers": 2, "n_heads": 2, "context_len": 64},
              "train": {"max_steps": 120, "max_time": 0, "batch_size": 8, "warmup_steps": 5, "eval_interval": 40,
                        "progress": False, "threads": 1}}
    lmforge.train(config, out=folder / "austen", log=lambda *_: None)
    return folder / "austen"


@pytest.fixture(scope="session")
def served(served_run):
    """(LanguageModel, Server) for served_run, behind the API key KEY."""
    pytest.importorskip("fastapi")
    import lmforge
    from lmforge.serving.app import Settings, create_app

    lm = lmforge.load(served_run)
    server = Server(create_app(lm, Settings("austen", api_key=KEY, max_batch=8, max_waiting=8, max_tokens=300)))
    yield lm, server
    server.stop()
