"""Token healing, measured: prompts cut from a run's validation text (right after a word, inside a
word, after a space), decoded greedily with and without healing; how often is the first new
character the one the text has next?

    python benchmarks/healing.py runs/austen          # 1,000 prompts of each kind, both ways
    python benchmarks/healing.py runs/word --prompts 300

Each prompt is the 300 characters before the cut. Prints JSON: the fraction that matched, per kind.
"""
from __future__ import annotations

import argparse
import json
import random
import re
import sys

import lmforge
from lmforge.generation import SamplingConfig

KINDS = {  # where a prompt stops: (pattern, where in the match to cut)
    "after a word": (r"[A-Za-z]+(?=[ ,.;!?])", lambda m, rng: m.end()),
    "inside a word": (r"[A-Za-z]{4,}", lambda m, rng: m.start() + rng.randint(1, len(m.group()) - 1)),
    "after a space": (r"(?<=[a-z,]) (?=[A-Za-z])", lambda m, rng: m.end()),
}
CONTEXT = 300


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run")
    parser.add_argument("--prompts", type=int, default=1000, help="prompts of each kind")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.prompts < 1:
        parser.error(f"--prompts must be at least 1, got {args.prompts}")
    lm = lmforge.load(args.run)
    text = "".join(part for _, part in lm.validation_documents())
    rng = random.Random(args.seed)
    out = {"run": args.run, "tokenizer": lm.tokenizer.kind, "prompts": args.prompts, "first_character_matches": {}}
    for kind, (pattern, cut) in KINDS.items():
        ends = [cut(m, rng) for m in re.finditer(pattern, text) if m.start() > CONTEXT]
        cuts = rng.sample(ends, min(args.prompts, len(ends)))
        for healing in (True, False):
            same = sum(lm.complete(text[c - CONTEXT:c], SamplingConfig(4, 0.0, token_healing=healing)).text[:1]
                       == text[c] for c in cuts)
            name = f"{kind}, {'healed' if healing else 'as typed'}"
            out["first_character_matches"][name] = round(same / len(cuts), 3)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    from lmforge.errors import LmforgeError

    try:
        main()
    except LmforgeError as e:  # bad input: one line, as lmforge's own commands say it
        sys.exit(f"error: {e}")
