"""`lmforge chat RUN`: talk to a trained model in the terminal.

In: lines typed at a prompt (with history; Alt-Enter or Esc then Enter starts a new line). Out: the
model's text, streamed as it is generated. Settings change in place (`/temperature 0.7`, `/top_p
0.9`, `/max 200`, `/help` lists them); Ctrl-C stops a generation and returns to the prompt; Ctrl-D or
`/quit` leaves. By default each message stands alone (`/mode complete`): a plain language model
continues what you type, a prompt -> completion run answers it in its template. `/mode chat` keeps a
conversation (lmforge's transcript template, as the server's chat endpoint uses); when it outgrows the
model's context, the oldest turns are left out, and the chat says so. With input or output
redirected, each line read is one message, and only the answers are written out (replies to
commands go to stderr).
"""
from __future__ import annotations

import re
import signal
import sys
from dataclasses import replace

from .errors import LmforgeError
from .generation import SamplingConfig
from .generation.engine import refill_length

HELP = """commands (each may be shortened while it stays unambiguous: /temp 0.7):
  /temperature T   sampling temperature (0 = greedy)      /top_p P    nucleus sampling (1 = off)
  /top_k K         keep the K likeliest tokens (0 = off)  /max N      new tokens per answer
  /seed S          fixed seed (off = random)              /stop TEXT  stop string (off = none)
  /mode chat|complete   a conversation, or continue the text you type
  /eos on|off      stop at the end-of-text token (off: write on to /max tokens)
  /reset           forget the conversation                /settings   show the settings
  /help            this list                              /quit       leave (or Ctrl-D)"""


COMMANDS = ("temperature", "top_p", "top_k", "max", "seed", "stop", "mode", "eos", "reset", "settings", "help",
            "quit", "exit")  # a command may be shortened to a prefix only one of them has: /temp, /set

ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


def unescape(text: str) -> str:
    """`\\n`, `\\t`, `\\r` and `\\\\` as typed at the prompt; every other character, backslashes included, as it is."""
    return re.sub(r"\\([ntr\\])", lambda m: ESCAPES[m.group(1)], text)


class Chat:
    """The state of one session: sampling settings, mode and the conversation so far."""

    def __init__(self, lm, sampling: SamplingConfig, write=sys.stdout.write, say=None):
        """`write`: where answers go; `say`: where replies to commands go (by default the same)."""
        self.lm, self.sampling, self.write, self.say = lm, sampling, write, say or write
        self.mode = "complete"
        self.messages: list[tuple[str, str]] = []
        self.forgetting = False  # whether the conversation has been cut to fit the context (said once)

    @property
    def echoes(self) -> bool:
        """Whether the typed line is written before its answer: a plain model's answer continues it."""
        return self.mode == "complete" and self.lm.template is None

    def command(self, line: str) -> bool:
        """Apply a /command; False when it asks to leave."""
        name, _, arg = line[1:].strip().partition(" ")
        arg = arg.strip()
        numbers = {"temperature": ("temperature", float), "top_p": ("top_p", float), "top_k": ("top_k", int),
                   "max": ("max_new_tokens", int), "seed": ("seed", int)}
        starting = [c for c in COMMANDS if c.startswith(name)] if name else []
        if name not in COMMANDS and len(starting) == 1:  # /temp for /temperature
            name = starting[0]
        elif name not in COMMANDS and starting:
            self.say(f"/{name} could be {', '.join('/' + c for c in starting)}; type more of it\n")
            return True
        if name in ("quit", "exit"):
            return False
        if name == "help":
            self.say(HELP + "\n")
        elif name == "settings":
            self.say(self.describe() + "\n")
        elif name == "reset":
            self.messages, self.forgetting = [], False
            self.say("conversation cleared\n")
        elif name == "mode":
            if arg not in ("chat", "complete"):
                self.say(f"/mode takes chat or complete, not {arg!r}\n")
            else:
                self.mode, self.messages, self.forgetting = arg, [], False
                self.say(f"mode {arg}\n")
                gaps = self.lm.transcript_gaps() if arg == "chat" else []
                if gaps:
                    self.say(f"(this model's tokenizer cannot represent {', '.join(map(repr, gaps))}, which the "
                             f"conversation marks turns with: an answer ends only at the end of text or after /max "
                             f"tokens)\n")
        elif name == "eos":
            if arg not in ("on", "off"):
                self.say(f"/eos takes on or off, not {arg!r}\n")
            else:
                self.sampling = replace(self.sampling, ignore_eos=arg == "off")
                self.say(f"eos {arg}\n")
        elif name == "stop":
            self.sampling = replace(self.sampling, stop=[] if arg in ("", "off") else [unescape(arg)])
            self.say(f"stop {_shown(self.sampling.stop)}\n")
        elif name in numbers:
            field, kind = numbers[name]
            try:
                try:
                    value = None if arg == "off" or (field in ("top_k",) and arg == "0") else kind(arg)
                except ValueError:
                    raise LmforgeError("give a whole number" if kind is int else "give a number") from None
                if field == "top_p" and value == 1.0:  # 1 keeps every token: the same as off
                    value = None
                self.sampling = replace(self.sampling, **{field: value})
            except LmforgeError as exc:
                self.say(f"cannot set {name} to {arg!r}: {exc}\n")
            else:
                self.say(f"{name} {arg}\n")
        else:
            self.say(f"unknown command {line.strip()!r}; /help lists the commands\n")
        return True

    def describe(self) -> str:
        s = self.sampling
        compiled = ", compiled step" if self.lm.decoder.compiled else ""
        return (f"mode {self.mode}, temperature {s.temperature}, top_p {s.top_p or 'off'}, top_k {s.top_k or 'off'}, "
                f"max {s.max_new_tokens}, seed {s.seed if s.seed is not None else 'random'}, "
                f"stop {_shown(s.stop)}, {self.lm.decoding} weights, {self.lm.decoding_cache} cache{compiled}")

    def _prompt(self, text: str) -> tuple[str, list[str]]:
        """The prompt for a typed message, and its stop strings. In chat mode the oldest turns are left
        out while the conversation fills more than 3/4 of the model's context (room for the answer)."""
        if self.mode != "chat":
            return text, []
        limit = self.lm.decoder.max_context
        while True:
            prompt, stops = self.lm.chat_prompt(self.messages + [("user", text)])
            if limit is None or not self.messages or len(self.lm.prompt_ids(prompt)) <= refill_length(limit):
                return prompt, stops
            self.messages = self.messages[2:]  # the oldest exchange: a message and its answer
            if not self.forgetting:
                self.forgetting = True
                self.say(f"(the conversation has outgrown the model's context of {limit} tokens: from now on "
                         f"its oldest turns are left out)\n")

    def answer(self, text: str) -> str:
        """Generate for one typed message, writing pieces as they come; returns the whole answer."""
        for note in self.lm.prompt_notes(text, self.sampling.token_healing and self.mode != "chat"):
            self.say(f"(note: {note})\n")
        prompt, stops = self._prompt(text)
        ids, tail = self.lm.prompt_ids(prompt), self.lm.prompt_tail(prompt)
        limit = self.lm.decoder.max_context
        if limit is not None and len(ids) >= limit:
            self.say(f"(the prompt is {len(ids)} tokens, for a context of {limit}: the model reads its last "
                     f"{refill_length(limit)})\n")
        sampling = replace(self.sampling, stop=list(self.sampling.stop) + stops)
        from .generation import stream

        pieces = []
        try:
            for piece in stream(self.lm.decoder, self.lm.tokenizer, ids, sampling, tail):
                if self.mode == "chat" and not pieces:  # a reply starts at its first visible character
                    piece = piece.lstrip()
                    if not piece:
                        continue
                pieces.append(piece)
                self.write(piece)
                sys.stdout.flush()
        finally:  # Ctrl-C keeps what was said so far
            answer = "".join(pieces)
            if self.mode == "chat":
                self.messages += [("user", text), ("assistant", answer.strip())]
        return answer


def _shown(stops: list[str]) -> str:
    return ", ".join(repr(s) for s in stops) or "off"


def run(lm, sampling: SamplingConfig, history_file=None) -> None:
    """The chat loop: interactive in a terminal (prompt_toolkit: line editing, history, multi-line
    input); with input or output redirected (`lmforge chat RUN < questions.txt > answers.txt`), one
    message per line read plainly, and only the answers written."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        # started where Ctrl-C is ignored (a shell's background job, nohup): Python keeps that, and
        # Ctrl-C could then never stop an answer, which is what this loop promises it does
        signal.signal(signal.SIGINT, signal.default_int_handler)
    terminal = sys.stdin.isatty() and sys.stdout.isatty()
    chat = Chat(lm, sampling, say=None if terminal else sys.stderr.write)
    if terminal:
        name = lm.run_dir.resolve().name if lm.run_dir else "model"
        print(f"lmforge chat: {name} ({lm.config['model']['arch']}, {lm.num_params / 1e6:.2f}M parameters). "
              f"{chat.describe()}.\n/help for commands, Ctrl-C stops an answer, Ctrl-D leaves.")
    for line in _typed_lines(history_file) if terminal else (line.rstrip("\r\n") for line in sys.stdin):
        if not line.strip():
            continue
        if line.startswith("/"):
            if not chat.command(line):
                break
            continue
        try:
            if chat.echoes:
                sys.stdout.write(line)
            chat.answer(line)
            sys.stdout.write("\n")
        except KeyboardInterrupt:  # the note goes where replies to commands go: not into redirected answers
            sys.stdout.write("\n")
            chat.say("[stopped]\n")
        sys.stdout.flush()


def _typed_lines(history_file):
    """What the user types at the `you>` prompt, one message at a time, until Ctrl-D (Ctrl-C clears
    the line)."""
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import FileHistory, InMemoryHistory
    from prompt_toolkit.key_binding import KeyBindings

    keys = KeyBindings()

    @keys.add("enter")
    def _submit(event):
        event.current_buffer.validate_and_handle()

    @keys.add("escape", "enter")
    def _newline(event):
        event.current_buffer.insert_text("\n")

    history = InMemoryHistory()
    if history_file is not None:
        try:
            history_file.parent.mkdir(parents=True, exist_ok=True)
            history = FileHistory(str(history_file))
        except OSError:
            pass  # an unwritable cache: history for this session only
    session = PromptSession(history=history, multiline=True, key_bindings=keys)
    while True:
        try:
            yield session.prompt("you> ")
        except KeyboardInterrupt:
            continue
        except EOFError:
            return
