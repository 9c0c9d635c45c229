"""Token ids -> text pieces as they are generated: incremental decoding and stop strings.

In: one generated token id at a time. Out: the new text that is safe to show, never half a
character and never the start of what may become a stop string; the text ends before the first stop.
"""
from __future__ import annotations

REPLACEMENT = "\ufffd"  # what a decoder writes for an incomplete UTF-8 sequence
CONTEXT_TOKENS = 4  # prompt tokens decoded before the first new one (tokenizers that strip a leading space)


class TextStream:
    """Decodes a growing list of ids the way Hugging Face's text-generation-inference does: each call
    decodes the ids from `prefix` on and keeps the part after what ids[prefix:read] decode to, so the
    cost per token stays constant and tokenizers whose decoding depends on neighbours stay right."""

    def __init__(self, tokenizer, stop: list[str], prompt_ids: list[int] = (), skip: int = 0):
        """`skip`: characters at the start of the generated text that are the prompt's already (token
        healing regenerates the prompt's last token); they are neither shown nor searched for stops."""
        self.tokenizer = tokenizer
        self.skip = skip
        self.stop = [s for s in stop if s]
        self.ids = list(prompt_ids)[-CONTEXT_TOKENS:]
        self.prefix, self.read = 0, len(self.ids)
        self.text = ""  # everything decoded so far (cut at a stop string once one appears)
        self.shown = 0  # how much of `text` has been handed out
        self.stopped_by: str | None = None

    def push(self, token_id: int) -> str:
        """Add one generated id; return the text that can be shown now (often ""). Nothing more comes
        once a stop string has appeared."""
        if self.stopped_by is not None:
            return ""
        self.ids.append(token_id)
        before = self.tokenizer.decode(self.ids[self.prefix:self.read])
        after = self.tokenizer.decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith(REPLACEMENT):
            self._add(after[len(before):])
            self.prefix, self.read = self.read, len(self.ids)
            self._cut_at_stop()
        return self._take(final=False)

    def finish(self) -> str:
        """The rest of the text at the end of generation (an unfinished character decodes as U+FFFD)."""
        if self.stopped_by is None and self.read < len(self.ids):
            before = self.tokenizer.decode(self.ids[self.prefix:self.read])
            self._add(self.tokenizer.decode(self.ids[self.prefix:])[len(before):])
            self.read = len(self.ids)
            self._cut_at_stop()
        return self._take(final=True)

    def _add(self, new: str) -> None:
        cut = min(self.skip, len(new))
        self.skip -= cut
        self.text += new[cut:]

    def _cut_at_stop(self) -> None:
        # A stop string can only be found where the new text is, or reach back into the old by its length.
        start = max(0, self.shown - max((len(s) for s in self.stop), default=0))
        hits = [(at, s) for s in self.stop if (at := self.text.find(s, start)) >= 0]
        if hits:
            at, self.stopped_by = min(hits)
            self.text = self.text[:at]

    def _take(self, final: bool) -> str:
        end = len(self.text)
        if not final and self.stopped_by is None:
            for s in self.stop:  # hold back a tail that could be the start of a stop string
                for k in range(min(len(s) - 1, end - self.shown), 0, -1):
                    if self.text.endswith(s[:k]):
                        end = min(end, len(self.text) - k)
                        break
        piece = self.text[self.shown:end]
        self.shown = max(self.shown, end)
        return piece
