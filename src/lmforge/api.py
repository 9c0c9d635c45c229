"""The Python API: `lmforge.train(...)`, `lmforge.finetune(...)`, `lmforge.load(run)`, then
`.generate()`, `.stream()`, `.evaluate()` and, for a classification run, `.classify()`.

The CLI and the server are thin shells over these functions, and every run folder starts here.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from . import checkpoint as ckpt
from .config import (RunConfig, absolute_sources, as_raw, build_config, default_embedding_lr_scale, default_lr,
                     default_warmup_steps, default_weight_decay, merge, parse_duration, parse_overrides)
from .data.examples import render, run_template
from .device import cpp_compiler, resolve_device
from .errors import LmforgeError, shell_join
from .generation import Decoder, Engine, Generation, SamplingConfig, default_weights
from .generation import generate as _generate
from .generation import stream as _stream
from .generation.healing import prompt_tail
from .tokenizers import bos_prefix, resolve_options

__all__ = ["LanguageModel", "build_config", "finetune", "load", "train"]


@dataclass
class LanguageModel:
    """A trained model with its tokenizer and config: what `lmforge.load` returns.

    `decoder` runs generation; on a CPU it may use int8 or fp16 copies of a Transformer's weights
    (`decoding` says which) and a bf16 KV cache (`decoding_cache`). `exact=True` on any call decodes
    with the fp32 weights (and cache) instead."""
    model: torch.nn.Module
    tokenizer: object
    config: dict
    run_dir: Path | None = None
    device: torch.device = torch.device("cpu")
    decoder: Decoder | None = None

    def __post_init__(self):
        self.decoder = self.decoder or Decoder(self.model)
        self._exact = self.decoder if self.decoder.weights == "fp32" else None

    @property
    def decoding(self) -> str:
        """The weights token-by-token decoding uses: fp32, fp16 or int8."""
        return self.decoder.weights

    @property
    def decoding_cache(self) -> str:
        """The dtype of the KV cache those decoding steps keep: fp32, or bf16 where measured faster."""
        return self.decoder.cache

    @property
    def template(self) -> str | None:
        """The prompt template of a prompt -> completion fine-tuned run, or of one imported from such a run's
        export (generation wraps prompts in it)."""
        return run_template(self.config)

    def prompt_ids(self, prompt: str) -> list[int]:
        """What the model reads for `prompt`: the run's template applied, then encoded (after the
        tokenizer's beginning-of-text token, for a model imported with one: a Llama's <s>)."""
        text = self._prompt_text(prompt)
        return bos_prefix(self.tokenizer) + (self.tokenizer.encode(text) if text else [])

    def prompt_tail(self, prompt: str) -> str:
        """The end of `prompt` (templated) when prompt_ids ends in <unk> for it (a word the vocabulary has
        only with a space after it, or part of a word): generation lets the model write it (token healing)."""
        return prompt_tail(self.tokenizer, self._prompt_text(prompt))

    def prompt_notes(self, prompt: str, token_healing: bool = True) -> list[str]:
        """What a user should know about how the model reads `prompt`: pieces its tokenizer cannot
        represent (read as <unk>, unless token healing lets the model write the last word itself), and
        stop words a tokenizer that removes them leaves out."""
        if not prompt:
            return []
        notes = []
        unknown = self.tokenizer.unknown(prompt)
        tail = self.prompt_tail(prompt) if token_healing else ""
        if unknown.get(tail):  # the model writes that word itself (token healing), if any entry begins with it
            from .generation.healing import heal

            if heal(self.tokenizer, self.prompt_ids(prompt), tail) is not None:
                unknown = {k: n - (k == tail) for k, n in unknown.items() if n - (k == tail)}
        if unknown:
            pieces = ", ".join(f"{k!r}×{v}" for k, v in unknown.items())
            notes.append(f"the tokenizer can't represent {pieces} in the prompt; replaced with <unk>")
        dropped = self.tokenizer.dropped(prompt) if hasattr(self.tokenizer, "dropped") else []
        if dropped:  # the model never sees them: what it continues is the prompt without them
            ids = self.prompt_ids(prompt)
            words = ", ".join(repr(w) for w in dropped[:8]) + (", ..." if len(dropped) > 8 else "")
            reads = f"the model reads {self.tokenizer.decode(ids)!r}" if ids else "the model reads none of it"
            notes.append(f"this run's tokenizer removes stop words (tokenizer.remove_stopwords), so {words} "
                         f"{'is' if len(dropped) == 1 else 'are'} left out of the prompt; {reads}")
        return notes

    def transcript_gaps(self) -> list[str]:
        """The pieces of the chat transcript's role markers ("User:", "Assistant:") the tokenizer cannot
        represent. Where there are any, the model cannot write the next turn's marker, so a chat reply ends
        only at the end-of-text token or its length limit (a word vocabulary without "User", say)."""
        return [] if self.template is not None else list(self.tokenizer.unknown("User: \nAssistant:"))

    def _prompt_text(self, prompt: str) -> str:
        if not isinstance(prompt, str):
            raise LmforgeError(f"the prompt must be a string, got {type(prompt).__name__}")
        return prompt if self.template is None else render(self.template, prompt)

    def chat_prompt(self, messages: list[tuple[str, str]]) -> tuple[str, list[str]]:
        """The prompt a conversation ([(role, text)], roles system/user/assistant) becomes, and the stop
        strings that end the assistant's turn. A plain language model reads a transcript:

            {system}                   (when there is one, then a blank line)
            User: {text}
            Assistant: {text}
            ...
            Assistant:

        and stops at the next "\nUser:". A prompt -> completion run puts the last user message into
        its own template, as `generate` does (earlier turns come first, as a transcript). Messages may
        also be OpenAI-style {"role", "content"} dicts."""
        if not isinstance(messages, (list, tuple)):
            raise LmforgeError(f"messages must be a list of (role, text) pairs or {{'role', 'content'}} dicts, "
                               f"got {type(messages).__name__}")
        messages = [_message(m) for m in messages]
        system = "\n".join(text for role, text in messages if role in ("system", "developer"))
        turns = [(role, text) for role, text in messages if role in ("user", "assistant")]
        lines = [f"{'User' if role == 'user' else 'Assistant'}: {text}" for role, text in turns]
        if self.template is not None:
            last = turns[-1][1] if turns and turns[-1][0] == "user" else ""
            history = "\n".join(lines[:-1] if last else lines)
            return "\n\n".join(part for part in (system, history, last) if part), []
        head = f"{system}\n\n" if system else ""
        return head + "\n".join(lines + ["Assistant:"]), ["\nUser:"]

    def decoder_for(self, exact: bool = False) -> Decoder:
        _check_flag("exact", exact)
        if not exact:
            return self.decoder
        if self._exact is None:
            self._exact = Decoder(self.model)
        return self._exact

    def engine(self, max_batch: int = 32, exact: bool = False, tune_threads: bool = True) -> Engine:
        """A batching engine over this model (the server's); tune_threads=False keeps the configured
        thread count, as a seeded or greedy `generate` does so that its text repeats exactly."""
        return Engine(self.decoder_for(exact), self.tokenizer, max_batch, tune_threads)

    def generate(self, prompt: str = "", max_new_tokens: int = 200, temperature: float = 0.8,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 stop: list[str] | None = None, on_text=None, exact: bool = False, token_healing: bool = True) -> str:
        """The text the model writes after `prompt`: up to `max_new_tokens` tokens, sampled at `temperature`
        (0: greedy) from the `top_k` likeliest tokens and/or the smallest set holding `top_p` of the
        probability; `seed` makes it repeatable, and it ends early at the end of text or at any of the `stop`
        strings (which are left out). `on_text(piece)` is called with each piece as it comes; `exact` decodes
        with the fp32 weights; `token_healing=False` feeds the prompt's last token as it is."""
        sampling = SamplingConfig(max_new_tokens, temperature, top_k, top_p, seed, stop or [],
                                  token_healing=token_healing)
        return self.complete(prompt, sampling, on_text, exact).text

    def complete(self, prompt: str, sampling: SamplingConfig, on_text=None, exact: bool = False) -> Generation:
        """The continuation of `prompt`, and how it ended (what `lmforge generate` prints)."""
        if not isinstance(sampling, SamplingConfig):
            raise LmforgeError(f"sampling must be a lmforge.generation.SamplingConfig, got {type(sampling).__name__}")
        if on_text is not None and not callable(on_text):
            raise LmforgeError(f"on_text must be a function taking each piece of text, got {type(on_text).__name__}")
        return _generate(self.decoder_for(exact), self.tokenizer, self.prompt_ids(prompt), sampling, on_text,
                         self.prompt_tail(prompt))

    def stream(self, prompt: str = "", max_new_tokens: int = 200, temperature: float = 0.8,
               top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
               stop: list[str] | None = None, exact: bool = False, token_healing: bool = True) -> Iterator[str]:
        """Yield text pieces as they are generated (the arguments are generate's)."""
        sampling = SamplingConfig(max_new_tokens, temperature, top_k, top_p, seed, stop or [],
                                  token_healing=token_healing)
        return _stream(self.decoder_for(exact), self.tokenizer, self.prompt_ids(prompt), sampling,
                       self.prompt_tail(prompt))

    def prepared_data(self):
        """The run's prepared data: the text it trained on, split and tokenized as it was then."""
        from .data import prepare_data

        try:
            return prepare_data(self.run_config(), self.tokenizer)
        except LmforgeError as e:
            raise LmforgeError(f"{e} (the run's own train and validation text is read from the sources it trained "
                               f"on; to score other text, give it with --text FILE)") from None

    def validation_documents(self) -> list[tuple[str, str]]:
        """(name, text) of each document's validation part, as the run's prepared data holds them."""
        task = (self.config.get("finetune") or {}).get("task")
        if task in ("classify", "completion"):
            held = "labelled examples" if task == "classify" else "prompt -> completion pairs"
            raise LmforgeError(f"{self.run_dir} is a {task} fine-tune: it holds out {held}, not text to score; "
                               f"`{shell_join(['lmforge', 'eval', self.run_dir])}` gives its own figures, or give "
                               f"text to score "
                               f"(--text FILE, lm.evaluate(text))")

        return self.prepared_data().validation_documents()

    def run_config(self) -> RunConfig:
        return RunConfig.from_dict({k: v for k, v in self.config.items()
                                    if k in ("data", "tokenizer", "model", "train", "finetune")}, "run config")

    def evaluate(self, text: str | None = None) -> dict:
        """Bits per byte, perplexity and accuracy on `text`, or on the run's validation split."""
        from .evaluation.likelihood import evaluate_documents

        if text is not None and not isinstance(text, str):
            raise LmforgeError(f"evaluate takes a string (or nothing: the run's validation split), got "
                               f"{type(text).__name__}")
        if text is not None and not text:
            raise LmforgeError("nothing to evaluate: the text is empty")
        docs = [("text", text)] if text is not None else self.validation_documents()
        return evaluate_documents(self.model, self.tokenizer, docs, device=self.device)

    def classify(self, texts: list[str]) -> list[dict[str, float]]:
        """For a classification run (`lmforge finetune --task classify`): each text's probability for
        every label, as {label: probability}."""
        from .finetuning.run import class_probabilities

        if isinstance(texts, str):  # one text, not its characters
            texts = [texts]
        if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
            raise LmforgeError("classify takes a list of strings (or one string)")
        return class_probabilities(self, list(texts))

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def load(run: str | Path, device: str = "cpu", decoding: str = "auto", cache: str = "auto") -> LanguageModel:
    """Load a run folder made by `lmforge train` (weights, tokenizer and config). `decoding` picks the
    weights of token-by-token generation: auto (on a CPU, int8 or fp16 for a Transformer), fp32,
    fp16 or int8; everything else (prompts, evaluation, training) always runs the fp32 weights.
    `cache` is the dtype of the KV cache those int8/fp16 steps keep: auto (what the probe measured
    faster here), fp32 or bf16; fp32 decoding always keeps an fp32 cache."""
    if not isinstance(run, (str, Path)):
        raise LmforgeError(f"load takes the path of a run folder, got {type(run).__name__}")
    for name, value in (("device", device), ("decoding", decoding), ("cache", cache)):
        if not isinstance(value, str):
            raise LmforgeError(f"{name} must be a string such as 'auto' or 'cpu', got {value!r}")
    run = Path(run).expanduser()
    if run.is_file():
        raise LmforgeError(f"{run} is a file; load takes a run folder (the one holding config.json)")
    model, tokenizer, config = ckpt.load_model(run)
    dev = resolve_device(device)
    model = model.to(dev)
    decoder = Decoder(model, *decoding_setup(model, dev, decoding, cache))
    return LanguageModel(model, tokenizer, config, run, dev, decoder)


def decoding_setup(model, dev: torch.device, decoding: str = "auto", cache: str = "auto") -> tuple[str, str]:
    """The (weights, cache) a Decoder of `model` takes, "auto" resolved as `load` resolves it: for a
    CPU Transformer, what this machine's probe measured fastest; fp32 everywhere else."""
    weights = default_weights(model, dev) if decoding == "auto" else decoding
    measured = {}
    if weights != "fp32" and dev.type == "cpu" and "auto" in (decoding, cache):
        from .probe import choices

        measured = choices(dev)  # a CPU Transformer: what the probe measured fastest here
    if decoding == "auto" and not (cache == "bf16" and measured.get("decoding") == "fp32"):
        weights = measured.get("decoding", weights)  # (a bf16 cache asked for needs int8 or fp16 weights)
    if cache == "auto":
        cache = measured.get("cache", "fp32") if weights != "fp32" else "fp32"
    return weights, cache


def train(config: str | Path | dict | RunConfig | None = None, out: str | Path | None = None, *,
          preset: str | None = None, overrides: list[str] | None = None, resume: bool = False,
          log=print, final_eval: bool = True, budget: float | None = None, on_step=None):
    """Train a model (or a fine-tuning run: a config with a [finetune] section) and return
    (LanguageModel, TrainResult). `out` defaults to runs/<arch>-<time>. `budget` (seconds) is the
    training time, and sizes the Transformer for it on this machine (training.sizing)."""
    from .finetuning.run import finetune_job
    from .tokenizers import load_tokenizer
    from .training import distributed as dist
    from .training.jobs import check, language_model_job
    from .training.loop import train as run_loop
    from .training.sizing import check_budget, regularise_for_passes, size_for_budget

    if overrides is not None and (isinstance(overrides, str) or not all(isinstance(o, str) for o in overrides)):
        raise LmforgeError("overrides must be a list of 'section.key=value' strings, e.g. ['train.max_steps=5']")
    if out is not None and not isinstance(out, (str, Path)):
        raise LmforgeError(f"out must be the path of a run folder, got {out!r}")
    out = None if out is None else Path(out).expanduser()
    log = _quiet if log is None else log
    for name, value in (("log", log), ("on_step", on_step)):
        if value is not None and not callable(value):
            raise LmforgeError(f"{name} must be a function (or None), got {value!r}")
    _check_flag("resume", resume)
    if budget is not None:  # seconds, or a duration as the CLI takes it ("5m")
        budget = parse_duration(budget)
        keys = [o.split("=")[0].strip() for o in overrides or []]
        limits = [k for k in keys if k in ("train.max_steps", "train.max_time")]
        if limits:  # as --budget with --max-steps or --max-time is
            raise LmforgeError(f"--budget is the training time; drop {limits[0]}, or drop --budget")
    if resume:
        if out is None:
            raise LmforgeError("resume needs the run folder: --resume RUN")
        if preset is not None:
            raise LmforgeError(f"--preset sets up a new run; {out} resumes as it was set up: drop --preset")
        cfg = resume_config(Path(out), config, overrides)
        tokenizer = load_tokenizer(out)
        compiled = ckpt.read_config(out)["train"].get("compile")
        if compiled is not None and cfg.train.compile is not None and bool(compiled) != bool(cfg.train.compile):
            log(f"note: this run trained with train.compile={str(bool(compiled)).lower()}; it goes on from the "
                f"same weights, but its steps now round differently, so it will not end bit for bit as it would have")
    else:
        cfg = build_config(config, preset, overrides)
        tokenizer = None
    check(cfg)
    if cfg.train.lr is None:  # the family's own peak learning rate, written into the run's config.json
        cfg.train.lr = default_lr(cfg.model.arch)
    decay_given = cfg.train.weight_decay is not None
    if not decay_given:  # and its own weight decay
        cfg.train.weight_decay = default_weight_decay(cfg.model.arch, cfg.train.optimizer)
    if cfg.train.embedding_lr_scale is None:  # and its embeddings' rate
        cfg.train.embedding_lr_scale = default_embedding_lr_scale(cfg.model.arch)
    if cfg.train.warmup_steps is None:  # and its warm-up
        cfg.train.warmup_steps = default_warmup_steps(cfg.model.arch)
    if dist.launched():  # under torchrun: join the group first; process 0 alone writes and prints
        dist.start(resolve_device(cfg.train.device))
        if not dist.is_main():
            log = _quiet
    if budget is not None and resume:
        raise LmforgeError("--budget sizes a new model; a resumed run keeps its size and time budget")
    if budget is not None:
        check_budget(cfg, budget)
    if cfg.train.compile and resolve_device(cfg.train.device).type == "cpu" and cpp_compiler() is None:
        raise LmforgeError("train.compile=true needs a C++ compiler (torch.compile builds the CPU step with one) "
                           "and none was found; install g++ or clang++, or set train.compile=false")
    if out is None:
        out = Path("runs") / f"{preset or cfg.model.arch}-{time.strftime('%Y%m%d-%H%M%S')}"
    created = not Path(out).exists()
    # before the probe and any data: a taken --out fails at once (under torchrun, every process with its line)
    dist.on_main(ckpt.open_run_dir, Path(out), resume)
    if resume:
        dist.on_main(ckpt.not_in_training, Path(out))
    prepared = None
    try:
        if cfg.finetune is None:  # missing, unreadable or too little data fails now, not after the probe
            from .data import prepare_data
            from .data.batches import check_split
            from .models import resolve_config

            prepared = dist.main_first(lambda: prepare_data(cfg, tokenizer))
            check_split(len(prepared.train), resolve_config(cfg.model.arch, **{
                **cfg.model.options, "vocab_size": prepared.tokenizer.vocab_size}).context_len)
        # under torchrun process 0 probes first, alone, and the others read its cache (probing at once, on
        # shared cores, each would time a slower machine and could choose apart)
        cfg = dist.main_first(lambda: with_measured_choices(cfg, log))
        speedup = None
        if not resume:  # a resumed run compiles, or not, as it started
            cfg, speedup = with_compile_choice(cfg, log, budget)
        if budget is not None:
            cfg = size_for_budget(cfg, budget, log, decay_given, speedup, prepared)
        elif not resume:
            cfg = regularise_for_passes(cfg, log, decay_given, speedup, prepared)
        with contextlib.ExitStack() as held:
            dist.on_main(lambda: held.enter_context(ckpt.RunLock(out, resume)))  # process 0 holds the folder's lock
            if cfg.finetune is not None:  # weights: the resume point's if there is one, else the base's
                job = dist.main_first(lambda: finetune_job(cfg, tokenizer, log=log,
                                                           resume=resume and bool(ckpt.resume_points(out))))
            else:  # on the data prepared above (process 0 first; the others read its cache)
                job = language_model_job(cfg, tokenizer, prepared)
            result = run_loop(cfg, out, job, resume=resume, log=log, on_step=on_step)
    except BaseException:
        if dist.is_main() and not resume:  # bad data, say: no empty run folder left behind
            ckpt.remove_unstarted(Path(out), created)
        raise
    lm = load(result.run_dir, device=result.extra["device"])
    if final_eval and not result.interrupted:
        try:
            result.extra.update(final_figures(lm, log))
        except KeyboardInterrupt:
            log(f"\ninterrupted while scoring the trained model (it is saved); the same command with --resume "
                f"scores it: {ckpt.resume_command(result.run_dir)}")
            raise
        if dist.is_main():
            ckpt.write_json(result.run_dir / ckpt.SUMMARY, {
                "steps": result.steps, "tokens": result.tokens, "train_time_s": result.train_time,
                "tokens_per_s": result.tokens_per_s, "best_val_bpb": result.best_val_bpb, **result.extra})
    return lm, result


def _check_flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise LmforgeError(f"{name} must be True or False, got {value!r}")


def _quiet(*_) -> None:
    pass


ROLES = ("system", "developer", "user", "assistant")


def _message(message) -> tuple[str, str]:
    """A conversation message as (role, text): a pair, or an OpenAI-style {"role", "content"} dict."""
    if isinstance(message, dict):
        message = (message.get("role"), message.get("content"))
    if not (isinstance(message, (tuple, list)) and len(message) == 2 and isinstance(message[1], str)):
        raise LmforgeError(f"a message is a (role, text) pair or a {{'role', 'content'}} dict, got {message!r}")
    if message[0] not in ROLES:
        raise LmforgeError(f"message role {message[0]!r} is not one of {', '.join(ROLES)}")
    return message[0], message[1]


def with_measured_choices(cfg: RunConfig, log=print) -> RunConfig:
    """`cfg` with train.dtype and train.attention "auto" replaced by what the probe measured fastest on
    this machine (so the run's config.json records the choice)."""
    if cfg.train.dtype != "auto" and cfg.train.attention != "auto":
        return cfg
    from .probe import choices

    picked = choices(resolve_device(cfg.train.device), log=log)
    raw = cfg.to_dict()
    for key in ("dtype", "attention"):
        if raw["train"][key] == "auto":
            raw["train"][key] = picked[key]
    return RunConfig.from_dict(raw)


def with_compile_choice(cfg: RunConfig, log=print, budget: float | None = None) -> tuple[RunConfig, float | None]:
    """`cfg` with train.compile decided, where the user left it unset, for a new Transformer run on a
    CPU: compiled where the probe measured the compiled step faster on this machine by enough to win
    back the compile time over the run's planned length (lmforge.probe.compile_gain), eager otherwise.
    Elsewhere it stays unset (CUDA compiles; other devices and families, fine-tuning and torchrun jobs
    on a CPU run eagerly). Also returns the measured speed-up of a CPU run that will compile (None where
    not measured), for the sizing probes to time eager steps instead of compiling a model of their own.
    `budget`: a --budget's seconds, which replace the time limit."""
    from .models import build_model, resolve_config
    from .probe import (BATCH, COMPILE_MIN_GAIN, COMPILE_MIN_S, COMPILE_PAYBACK, SHAPE, choices, compile_gain,
                        train_variant)
    from .training import distributed as dist

    train = cfg.train
    cpu = resolve_device(train.device).type == "cpu"
    # under torchrun every process would time the step at once, on shared cores, and could decide apart
    if train.compile is not None or cfg.model.arch != "transformer" or cfg.finetune is not None or not cpu \
            or dist.launched():
        measured = compile_gain(train.dtype, train.attention, measure=False) \
            if train.compile and cpu and train.dtype != "auto" else None
        return cfg, measured["gain"] if measured and measured["gain"] > 0 else None
    seconds = budget if budget is not None else train.max_time if train.max_time is not None else math.inf
    if train.max_steps is not None:  # the steps' length, from the probe's step scaled by the work per step
        probe_ms = choices(torch.device("cpu")).get("train_step_ms", {}).get(
            train_variant(train.dtype, train.attention))
        options = {"vocab_size": SHAPE["vocab_size"], **cfg.model.options}
        with torch.device("meta"):
            run_flops = build_model("transformer", **options).flops_per_token()
            probe_flops = build_model("transformer", **SHAPE).flops_per_token()
        step_tokens = train.batch_size * train.grad_accum * resolve_config("transformer", **options).context_len
        if probe_ms is not None:
            per_step = probe_ms / 1e3 * run_flops * step_tokens / (probe_flops * BATCH * SHAPE["context_len"])
            seconds = min(seconds, train.max_steps * per_step)
    compile_, gain = False, None
    if seconds >= COMPILE_MIN_S:
        measured = compile_gain(train.dtype, train.attention, log=log)
        gain, compile_s = measured["gain"], measured.get("compile_s", math.inf)
        saved = seconds * (1 - 1 / gain) if gain > 0 else 0.0
        compile_ = gain >= COMPILE_MIN_GAIN and saved >= COMPILE_PAYBACK * compile_s
        how = f"{gain:.2f}× the eager step's speed here, {compile_s:.0f} s to compile" if gain > 0 else measured["why"]
        log(f"{'compiling' if compile_ else 'not compiling'} the training step ({how}; "
            f"train.compile=true/false decides)")
    raw = cfg.to_dict()
    raw["train"]["compile"] = compile_
    return RunConfig.from_dict(raw), gain if compile_ else None


FINAL_EVAL_CHARS = 1_000_000  # the end-of-training figure scores at most about this much validation text


def final_figures(lm: LanguageModel, log=print) -> dict:
    """What a finished run reports: bits per byte on the validation split, or a fine-tuning task's own
    figures. A split longer than FINAL_EVAL_CHARS (a corpus of more than about 10 MB) is scored on the
    same leading share of each document's validation text, cut at a line end, and says so
    ("scored_chars" of "val_chars"): scoring 24M validation characters took 9 minutes after a
    1-minute run. `lmforge eval RUN` scores all of it."""
    if lm.config.get("finetune"):
        from .finetuning.run import finetune_results

        return finetune_results(lm, log=log)
    from .evaluation.likelihood import evaluate_documents

    docs = lm.validation_documents()
    total = sum(len(text) for _, text in docs)
    if total <= FINAL_EVAL_CHARS:
        return {"val": evaluate_documents(lm.model, lm.tokenizer, docs, device=lm.device)}

    def lead(text: str) -> str:
        """Its share, back to the last line end within it (forward, a short document ending in one was whole)."""
        cut = max(1, len(text) * FINAL_EVAL_CHARS // total)
        line_end = text.rfind("\n", max(0, cut - 10_000), cut)
        return text[:cut if line_end < 0 else line_end + 1]

    docs = [(name, lead(text)) for name, text in docs]
    val = evaluate_documents(lm.model, lm.tokenizer, docs, device=lm.device)
    return {"val": {**val, "scored_chars": sum(len(text) for _, text in docs), "val_chars": total}}


def finetune(base, data, out=None, *, task: str = "lm", mode: str = "full", max_time: float | None = None,
             max_steps: int | None = None, lr: float | None = None, overrides: list[str] | None = None,
             log=print, **options):
    """Fine-tune the run `base` on `data` (text sources, or one .jsonl for the completion and classify
    tasks); returns (LanguageModel, TrainResult). `options` are the [finetune] fields: freeze_layers,
    lora_rank, lora_alpha, lora_dropout, lora_targets, pooling, template, from_scratch."""
    from .finetuning.run import finetune_config

    config = finetune_config(base, data, task=task, mode=mode, max_time=max_time, max_steps=max_steps, lr=lr,
                             overrides=overrides, **options)
    if out is None:
        out = Path("runs") / f"{Path(base).name}-{task}-{mode}-{time.strftime('%Y%m%d-%H%M%S')}"
    return train(config, out, log=log)


# What a resumed run may change: its budget and how it runs here (threads, device, progress, resume
# points, the printed sample). Anything else (the learning rate, the seed, the batch...) would not
# continue the same run.
RESUME_MAY_CHANGE = {"max_steps", "max_time", "threads", "device", "compile", "progress", "checkpoint_interval",
                     "checkpoint_time", "keep_checkpoints", "sample_prompt", "sample_tokens", "parallel"}


def resume_config(run_dir: Path, config=None, overrides: list[str] | None = None) -> RunConfig:
    """The run's own config, with the caller's changes to the training budget and to how it runs;
    changes to the data, tokenizer, model, optimisation or fine-tuning setup would not continue the
    same run, and are refused."""
    ckpt.check_manifest(Path(run_dir))  # first: an edited config.json is damage, whatever its values say
    stored = ckpt.read_config(run_dir)
    base = {k: stored[k] for k in ("data", "tokenizer", "train", "finetune") if stored.get(k) is not None}
    base["model"] = {"arch": stored["model"]["arch"], "options": stored["model"]["options"]}
    changes = merge(as_raw(config), parse_overrides(overrides or []))
    conflicts = []
    for section, values in changes.items():
        for key, value in values.items():
            if section == "train" and key in RESUME_MAY_CHANGE:
                continue
            have = stored.get(section, {}) or {}
            if section == "tokenizer" and key != "kind":  # options as given; restating a default is no change
                have = resolve_options(have.get("kind"), have.get("options")).get(key)
            elif section == "model" and key != "arch":  # options resolved, defaults included
                have = have.get("options", {}).get(key, have.get(key))
            else:
                have = have.get(key)
            if section == "data" and key == "sources" and isinstance(value, list):  # as the run recorded them
                value = absolute_sources(value)
            if have != value:
                conflicts.append(f"{section}.{key}={value!r} (the run has {have!r})")
    if conflicts:
        raise LmforgeError("--resume: options conflict with the run: " + "; ".join(conflicts)
                           + "; drop them, or start a new run with another --out")
    given = changes.get("train", {})
    for named, other in (("max_steps", "max_time"), ("max_time", "max_steps")):
        limit = given.get(named)
        if limit not in (None, 0) and str(limit).strip().lower() not in ("none", "null", "0") and other not in given:
            given[other] = None  # a new budget of one kind replaces the run's budget, of either kind
    return RunConfig.from_dict(merge(base, changes.get("train") and {"train": changes["train"]} or {}), "run config")
