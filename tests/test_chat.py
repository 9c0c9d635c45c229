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
    chat.command(r"/stop \n")
    assert said[-1] == "stop '\\n'\n"  # shown as typed, not as a Python list
    chat.command("/top_p 1.5")  # as --top-p 1.5 is, refused (not taken for "off")
    assert said[-1].startswith("cannot set top_p") and chat.sampling.top_p is None
    chat.command("/mode foo")
    assert said[-1] == "/mode takes chat or complete, not 'foo'\n" and chat.mode == "complete"
    chat.command("/eos")
    assert said[-1].startswith("/eos takes on or off") and not chat.sampling.ignore_eos
    chat.command("/top_k abc")  # what to type, not Python's words for it
    assert said[-1] == "cannot set top_k to 'abc': give a whole number\n"
    chat.command("/max")
    assert said[-1] == "cannot set max to '': give a whole number\n" and chat.sampling.max_new_tokens == 20
    chat.command("/temp 0.5")  # a command shortened while it stays unambiguous
    assert said[-1] == "temperature 0.5\n" and chat.sampling.temperature == 0.5
    chat.command("/t 1")  # temperature, top_p or top_k: not guessed
    assert said[-1] == "/t could be /temperature, /top_p, /top_k; type more of it\n"
    assert chat.sampling.temperature == 0.5
    chat.command("/x")
    assert said[-1].startswith("unknown command '/x'")


def test_chat_says_what_the_model_cannot_read(served_run):
    from lmforge.chat import Chat
    from lmforge.generation import SamplingConfig

    said = []
    lm = lmforge.load(served_run)
    chat = Chat(lm, SamplingConfig(3, 0.0), write=said.append)
    chat.answer("Emma €€ was")  # a character the tiny vocabulary lacks, as `generate` says
    assert "(note: the tokenizer can't represent '€'×2 in the prompt; replaced with <unk>)\n" in said
    gaps = lm.transcript_gaps()  # the tiny text has no capital U: the model cannot write "User:"
    assert "U" in gaps
    chat.command("/mode chat")
    assert said[-1].startswith("(this model's tokenizer cannot represent 'U'") and "/max" in said[-1]


def test_a_long_conversation_forgets_its_oldest_turns_and_says_so(served_run):
    from lmforge.chat import Chat
    from lmforge.generation import SamplingConfig

    lm = lmforge.load(served_run)  # a character model with a context of 64
    said, written = [], []
    chat = Chat(lm, SamplingConfig(10, temperature=0, seed=1), write=written.append, say=said.append)
    chat.command("/mode chat")
    for message in ["Emma", "Mr. Knightley", "Harriet Smith", "Miss Bates"]:
        chat.answer(message)
    assert any("outgrown the model's context of 64 tokens" in line for line in said)
    assert sum("outgrown" in line for line in said) == 1  # said once, not at every message
    prompt, _ = chat._prompt("Jane")  # what the next message reads: within 3/4 of the context, itself included
    assert len(lm.prompt_ids(prompt)) <= 48 and prompt.endswith("User: Jane\nAssistant:")
    assert ("user", "Emma") not in chat.messages  # the first exchange is gone


def test_a_completion_run_answers_each_line_alone_in_its_template(served_run, tmp_path):
    import json
    import subprocess

    rows = [{"prompt": f"say {i % 3}", "completion": "Emma " * (i % 3 + 1), "split": "val" if i < 4 else "train"}
            for i in range(30)]
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    lmforge.finetune(served_run, [str(tmp_path / "pairs.jsonl")], tmp_path / "tuned", task="completion",
                     max_steps=10, overrides=["train.threads=1", "train.progress=false",
                                              f"data.cache_dir={json.dumps(str(tmp_path / 'cache'))}"],
                     log=lambda *_: None)
    lm = lmforge.load(tmp_path / "tuned")
    alone = [lm.generate(q, 8, temperature=0) for q in ("say 1", "say 2")]
    done = subprocess.run([sys.executable, "-m", "lmforge", "chat", str(tmp_path / "tuned"), "--no-history",
                           "-n", "8", "-t", "0"], input="say 1\nsay 2\n", capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "".join(answer + "\n" for answer in alone)  # no echo, no earlier lines read


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


def test_a_chat_reply_starts_at_its_first_visible_character(served_run, monkeypatch):
    from lmforge import generation
    from lmforge.chat import Chat
    from lmforge.generation import SamplingConfig

    monkeypatch.setattr(generation, "stream", lambda *args: iter(["  ", " Emma", " was"]))  # "Assistant:" + " Emma"
    for mode, shown in (("chat", ["Emma", " was"]), ("complete", ["  ", " Emma", " was"])):
        written = []
        chat = Chat(lmforge.load(served_run), SamplingConfig(10), write=written.append, say=lambda _: None)
        chat.command(f"/mode {mode}")
        assert chat.answer("Who?") == "".join(shown) and written == shown  # as the server's chat replies
