"""lmforge: build, train, evaluate and fine-tune your own small language model from scratch.

    import lmforge
    lm, result = lmforge.train(overrides=["train.max_time=60"])   # Emma + Persuasion by default
    lm = lmforge.load("runs/austen")
    print(lm.generate("Emma Woodhouse", max_new_tokens=100))
    print(lm.evaluate()["bits_per_byte"])
"""
from .errors import LmforgeError

__version__ = "0.1.0"
__all__ = ["LmforgeError", "build_config", "finetune", "load", "prepare", "train"]


def __getattr__(name):
    # Keep `import lmforge` light: torch and friends load on first use of the API.
    if name in ("train", "finetune", "load", "build_config", "LanguageModel"):
        from . import api

        return getattr(api, name)
    if name == "prepare":
        from .data import prepare

        return prepare
    raise AttributeError(f"module 'lmforge' has no attribute {name!r}")
