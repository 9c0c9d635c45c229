"""The pretraining job: the config's corpus, prepared and batched, and a freshly built model.

In: a RunConfig (and, to continue a run, its own tokenizer). Out: a Job for training.loop.train.
"""
from __future__ import annotations

from ..config import RunConfig
from ..data import lm_batches, prepare_data
from ..device import seed_everything
from ..models import build_model, resolve_config
from ..tokenizers import resolve_options
from .loop import Job


def check(config: RunConfig) -> None:
    """Fail now, before any data is read, on a model or tokenizer the config cannot build."""
    resolve_options(config.tokenizer.kind, config.tokenizer.options)
    resolve_config(config.model.arch, **{"vocab_size": 1, **config.model.options})


def language_model_job(config: RunConfig, tokenizer=None, prepared=None) -> Job:
    """Next-token prediction on the config's sources (`prepared`, if the caller has read them); a given
    `tokenizer` (a resumed run's) encodes them, else one is trained on the training split."""
    if prepared is None:
        prepared = prepare_data(config, tokenizer)
    seed_everything(config.train.seed)
    model = build_model(config.model.arch, **{**config.model.options, "vocab_size": prepared.tokenizer.vocab_size})
    t = config.train
    batches = lm_batches(prepared, model.config.context_len, t.batch_size, t.seed, t.eval_batches, t.sampling)
    return Job(model, prepared.tokenizer, batches, data_key=prepared.text_digest)
