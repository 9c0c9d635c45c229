"""`lmforge chat` through a pseudo-terminal: settings change in place, text streams, Ctrl-C stops an
answer without leaving, Ctrl-D leaves."""
import os
import signal
import sys
from pathlib import Path

import pytest

import lmforge

pexpect = pytest.importorskip("pexpect")


def test_chat_in_a_terminal(served_run, tmp_path):
    import shutil

    lm = lmforge.load(served_run)
    (tmp_path / "cache").mkdir()
    shutil.copy(Path(os.environ["LMFORGE_CACHE"]) / "probe.json", tmp_path / "cache")  # measured once already
    env = {**os.environ, "LMFORGE_CACHE": str(tmp_path / "cache"), "TERM": "xterm", "PROMPT_TOOLKIT_NO_CPR": "1"}
    # Started with SIGINT ignored, as a shell's background job starts its commands: the chat still
    # promises that Ctrl-C stops an answer, so it must take Ctrl-C back.
    child = pexpect.spawn(sys.executable, ["-m", "lmforge", "chat", str(served_run), "--max-new-tokens", "40"],
                          env=env, encoding="utf-8", timeout=60, dimensions=(40, 200),
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        child.expect("Ctrl-D leaves")
        child.expect("you>")
        # Each command's reply, not its echo on the prompt line ("you> /max ..."), is awaited before the next
        # line is typed: the prompt is redrawn as a line is typed, so "you>" alone can match too early.
        child.send("/temperature 0\r")
        child.expect(r"(?<!/)temperature 0")
        child.expect("you>")
        expected = lm.generate("Emma", 40, temperature=0)
        first_line = expected.split("\n")[0][:20]
        assert first_line
        child.send("Emma\r")
        child.expect_exact("Emma" + first_line)  # the greedy continuation, after the echoed prompt
        child.expect("you>")

        child.send("/max 100000\r")  # a long answer, to interrupt
        child.expect(r"(?<!/)max 100000")
        child.expect("you>")
        child.send("/eos off\r")  # and no end-of-text to end it early
        child.expect(r"(?<!/)eos off")
        child.expect("you>")
        child.send("Emma\r")
        child.expect_exact("\x1b[?2004lEmma")  # the prompt has returned the line: the answer is being written
        child.expect(r"[^\x1b]{40}")  # ... some way into it
        child.sendintr()  # Ctrl-C: stop the answer, stay in the session
        child.expect(r"\[stopped\]")
        child.expect("you>")
        child.send("/settings\r")
        child.expect("temperature 0.0")
        child.expect("you>")
        child.send("/top_p nonsense\r")
        child.expect("cannot set top_p")
        child.expect("you>")
        child.sendeof()  # Ctrl-D leaves cleanly
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
    assert (tmp_path / "cache" / "chat_history").read_text().count("Emma") == 2  # the history is kept


def test_chat_commands_keep_what_was_typed(served_run):
    from lmforge.chat import Chat
    from lmforge.generation import SamplingConfig

    said = []
    chat = Chat(lmforge.load(served_run), SamplingConfig(20), write=said.append)
    chat.command("/stop é")  # typed text, accents included, is the stop string as typed
    assert chat.sampling.stop == ["é"]
    chat.command(r"/stop \n\n")  # \n, \t and \\ are the escapes one can type
    assert chat.sampling.stop == ["\n\n"]
    assert chat.command(r"/stop \x")  # any other backslash is kept, and the session goes on
    assert chat.sampling.stop == ["\\x"]
    chat.command("/seed -1")
    assert said[-1].startswith("cannot set seed") and chat.sampling.seed is None
    chat.command("/stop off")
    assert chat.sampling.stop == []


def test_chat_reads_piped_lines_and_writes_only_the_answers(served_run):
    import subprocess

    lm = lmforge.load(served_run)
    expected = lm.generate("Emma", 20, temperature=0)
    # the last line has no newline: it is a message all the same
    done = subprocess.run([sys.executable, "-m", "lmforge", "chat", str(served_run), "--no-history", "-n", "20"],
                          input="/temperature 0\n\nEmma", capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "Emma" + expected + "\n"  # no prompts, no terminal control codes
    assert "temperature 0" in done.stderr and "not a terminal" not in done.stderr
