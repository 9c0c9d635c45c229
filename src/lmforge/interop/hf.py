"""Hugging Face GPT-2 and Llama checkpoints <-> lmforge Transformer runs (config.json + safetensors +
tokenizer.json), converting names and layouts only: the Transformer's options express both exactly.

In: a local HF folder (import) or a run folder (export). Out: a run folder, or an HF folder that
`transformers.AutoModelForCausalLM` / `AutoTokenizer.from_pretrained` load. Needs no `transformers`.
"""
from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import asdict
from pathlib import Path

import torch

from .. import checkpoint as ckpt
from ..config import ModelConfig, RunConfig, TokenizerConfig, is_number
from ..data.examples import run_template
from ..errors import LmforgeError
from ..models import TransformerConfig
from ..tokenizers import BPETokenizer, declared_eos, load_tokenizer

MAX_IMPORT_CONTEXT = 8192  # the KV cache and RoPE tables are allocated for context_len positions
GPT2 = {"norm": "layernorm", "pos": "learned", "mlp": "gelu", "qk_norm": False, "logit_softcap": None,
        "value_residual": False}
LLAMA = {"norm": "rmsnorm", "pos": "rope", "mlp": "swiglu", "qk_norm": False, "logit_softcap": None,
         "value_residual": False}


# ---- import ----------------------------------------------------------------------------------------

def read_folder(directory: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json, every tensor of the folder's *.safetensors files)."""
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        what = "is a file" if directory.exists() else "does not exist"
        raise LmforgeError(f"{directory} {what}; point at a Hugging Face model folder "
                           "(config.json + *.safetensors + tokenizer.json)")
    if not (directory / "config.json").is_file():
        raise LmforgeError(f"{directory} has no config.json; point at a Hugging Face model folder "
                           "(config.json + *.safetensors + tokenizer.json)")
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise LmforgeError(f"{directory} has no *.safetensors weights; save the model with "
                           "save_pretrained(..., safe_serialization=True)")
    state = {}
    for f in files:
        try:
            state.update(ckpt.load_tensors(f))
        except LmforgeError as e:  # its advice is for run folders
            raise LmforgeError(f"{str(e).split('; restore')[0]}; download or save the model again") from None
    from ..config import read_json

    return read_json(directory / "config.json", "Hugging Face config"), state


def _check_sizes(c: dict, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> None:
    """The config's sizes are positive whole numbers (an optional one may also be absent or null)."""
    for key in required + optional:
        value = c.get(key)
        if value is None and key in optional:
            continue
        if key not in c:
            raise LmforgeError(f"the Hugging Face config.json has no {key}; save the model's config again")
        if not is_number(value, integer=True) or value < 1:
            raise LmforgeError(f"the Hugging Face config.json's {key} must be a positive whole number, got {value!r}")


def gpt2_fields(c: dict) -> dict:
    _check_sizes(c, ("vocab_size", "n_embd", "n_layer", "n_head", "n_positions"), ("n_inner",))
    if c.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise LmforgeError(f"GPT-2 activation {c['activation_function']!r} is not supported; lmforge matches gelu_new")
    if c.get("scale_attn_by_inverse_layer_idx") or not c.get("scale_attn_weights", True):
        raise LmforgeError("this GPT-2 config scales attention unusually; lmforge matches scale_attn_weights=True only")
    return {**GPT2, "vocab_size": c["vocab_size"], "d_model": c["n_embd"], "n_layers": c["n_layer"],
            "n_heads": c["n_head"], "n_kv_heads": c["n_head"], "context_len": c["n_positions"],
            "d_ff": c.get("n_inner") or 4 * c["n_embd"], "bias": True,
            "tie_embeddings": c.get("tie_word_embeddings", True), "norm_eps": c.get("layer_norm_epsilon", 1e-5),
            "dropout": c.get("resid_pdrop", 0.1), "attention_dropout": c.get("attn_pdrop", 0.1)}


def llama_fields(c: dict) -> dict:
    _check_sizes(c, ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"),
                 ("num_key_value_heads", "max_position_embeddings", "head_dim"))
    heads, d = c["num_attention_heads"], c["hidden_size"]
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    bias = f"attention_bias={c.get('attention_bias', False)!r} with mlp_bias={c.get('mlp_bias', False)!r}"
    problems = [problem for problem, ok in [
        (f"hidden_act={c.get('hidden_act')!r}", c.get("hidden_act", "silu") == "silu"),
        (f"head_dim={c.get('head_dim')!r}", c.get("head_dim") in (None, d // heads)),
        (f"rope_type={rope_type!r}", rope_type == "default"),
        (bias, c.get("mlp_bias", False) == c.get("attention_bias", False))] if not ok]
    if problems:
        raise LmforgeError(f"unsupported Llama option(s) {', '.join(problems)}; lmforge imports SiLU, head_dim = "
                           "hidden_size / heads, default RoPE and equal attention/MLP bias")
    return {**LLAMA, "vocab_size": c["vocab_size"], "d_model": d, "n_layers": c["num_hidden_layers"],
            "n_heads": heads, "n_kv_heads": c.get("num_key_value_heads") or heads,
            "context_len": c.get("max_position_embeddings") or 2048, "d_ff": c["intermediate_size"],
            "bias": bool(c.get("attention_bias", False)), "tie_embeddings": c.get("tie_word_embeddings", False),
            "dropout": 0.0, "attention_dropout": c.get("attention_dropout", 0.0),
            "rope_theta": float(rope.get("rope_theta", c.get("rope_theta", 10000.0))),
            "norm_eps": c.get("rms_norm_eps", 1e-6)}


# GPT-2 block module names -> ours (the same both ways)
GPT2_BLOCK_NAMES = {"ln_1": "attn_norm", "ln_2": "mlp_norm", "attn.c_attn": "attn.qkv", "attn.c_proj": "attn.proj",
                    "mlp.c_fc": "mlp.fc", "mlp.c_proj": "mlp.proj"}


def gpt2_to_lmforge(state: dict, fields: dict) -> dict:
    """GPT-2 names -> ours; Conv1D weights are (in, out), so every block matrix is transposed."""
    s = {k.removeprefix("transformer."): v for k, v in state.items()}
    out = {"tok_emb.weight": s["wte.weight"], "pos_emb.weight": s["wpe.weight"][:fields["context_len"]],
           "norm.weight": s["ln_f.weight"], "norm.bias": s["ln_f.bias"]}
    for i in range(fields["n_layers"]):
        for theirs, ours in GPT2_BLOCK_NAMES.items():
            w = s[f"h.{i}.{theirs}.weight"]
            out[f"blocks.{i}.{ours}.weight"] = w if theirs.startswith("ln") else w.t()
            out[f"blocks.{i}.{ours}.bias"] = s[f"h.{i}.{theirs}.bias"]
    if not fields["tie_embeddings"]:
        out["lm_head.weight"] = state["lm_head.weight"]
    return out


def llama_to_lmforge(state: dict, fields: dict) -> dict:
    """Llama names -> ours; q, k and v projections are stacked into qkv (query rows, key rows, value rows)."""
    s = state
    out = {"tok_emb.weight": s["model.embed_tokens.weight"], "norm.weight": s["model.norm.weight"]}
    for i in range(fields["n_layers"]):
        p, q = f"model.layers.{i}.", f"blocks.{i}."
        out[q + "attn_norm.weight"] = s[p + "input_layernorm.weight"]
        out[q + "mlp_norm.weight"] = s[p + "post_attention_layernorm.weight"]
        names = [("self_attn.o_proj", "attn.proj"), ("mlp.gate_proj", "mlp.gate"), ("mlp.up_proj", "mlp.fc"),
                 ("mlp.down_proj", "mlp.proj")]
        for kind in ("weight", "bias") if fields["bias"] else ("weight",):
            out[q + f"attn.qkv.{kind}"] = torch.cat([s[p + f"self_attn.{n}_proj.{kind}"] for n in "qkv"])
            for theirs, ours in names:
                out[q + f"{ours}.{kind}"] = s[p + f"{theirs}.{kind}"]
    if not fields["tie_embeddings"]:
        out["lm_head.weight"] = s["lm_head.weight"]
    return out


def import_hf(directory, out, *, context_len: int | None = None, log=print) -> Path:
    """Convert a local GPT-2 or Llama folder into an lmforge run folder at `out`."""
    directory, out = Path(directory), Path(out)
    config, state = read_folder(directory)
    kind = config.get("model_type")
    if kind is None and "format_version" in config:
        raise LmforgeError(f"{directory} is an lmforge run already; use it as it is (import reads Hugging Face "
                           f"folders)")
    if kind not in ("gpt2", "llama"):
        raise LmforgeError(f"{directory}: model_type {kind!r} is not supported; lmforge imports gpt2 and llama")
    if not (directory / "tokenizer.json").is_file():
        raise LmforgeError(f"{directory} has no tokenizer.json; save the tokenizer with "
                           "tokenizer.save_pretrained() (a fast tokenizer) into the same folder")
    if out.exists() and any(out.iterdir()):
        raise LmforgeError(f"{out} exists and is not empty; choose another --out (nothing was written)")
    if context_len is not None and (not isinstance(context_len, int) or context_len < 2):
        raise LmforgeError(f"--context-len must be a whole number of at least 2, got {context_len!r}")
    fields = gpt2_fields(config) if kind == "gpt2" else llama_fields(config)
    limit = context_len or min(fields["context_len"], MAX_IMPORT_CONTEXT)
    if limit < fields["context_len"]:
        log(f"note: context_len {fields['context_len']} capped to {limit} (set it with --context-len)")
    fields["context_len"] = min(limit, fields["context_len"])
    fields = asdict(TransformerConfig(**fields))  # validates and resolves
    try:
        weights = (gpt2_to_lmforge if kind == "gpt2" else llama_to_lmforge)(state, fields)
    except KeyError as exc:
        raise LmforgeError(f"{directory}: tensor {exc.args[0]} is missing; is it a complete {kind} "
                           "checkpoint?") from None
    tokenizer = with_declared_eos(load_tokenizer(directory), directory, config)
    if fields["vocab_size"] > tokenizer.vocab_size:  # rows padded to a round number (nanoGPT's 50304)
        log(f"note: the model has {fields['vocab_size']} vocabulary rows and its tokenizer {tokenizer.vocab_size} "
            f"tokens; the {fields['vocab_size'] - tokenizer.vocab_size} rows no token reaches are left out")
        weights = {k: v[:tokenizer.vocab_size] if k in ("tok_emb.weight", "lm_head.weight") else v
                   for k, v in weights.items()}
        fields["vocab_size"] = tokenizer.vocab_size
    elif fields["vocab_size"] < tokenizer.vocab_size:
        raise LmforgeError(f"{directory}: the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                           f"{fields['vocab_size']} vocabulary rows; they are not a pair (save both from one model)")
    run = RunConfig(tokenizer=TokenizerConfig(tokenizer.kind, tokenizer.options),
                    model=ModelConfig("transformer", fields))
    run.train.sample_prompt = ""
    imported = {"from": str(directory), "model_type": kind}
    template = declared_template(directory)
    if template is not None:  # a completion run's export: its prompts go on in their template
        imported["template"] = template
    tmp = out.parent / f".tmp-{out.name}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir(parents=True)
    except OSError as e:
        raise LmforgeError(f"cannot write {out}: {e.strerror or e}; choose another --out") from None
    try:
        ckpt.save_config(tmp, run, fields, extra={"imported": imported})
        ckpt.save_tensors(tmp / ckpt.WEIGHTS, {k: v.float() for k, v in weights.items()})
        tokenizer.save(tmp)
        try:
            ckpt.load_model(tmp)  # fails here, not later, if anything does not fit
        except LmforgeError as e:  # it names the temporary folder, and gives a run folder's advice
            problem = str(e).replace(str(tmp), str(directory)).split("; ")[0]
            raise LmforgeError(f"{problem}; download or save the model again") from None
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    strings = tokenizer.token_strings()
    bos = "" if tokenizer.bos_id is None else f", and begins every text with {strings[tokenizer.bos_id]}"
    log(f"imported {kind} ({sum(v.numel() for v in weights.values()) / 1e6:.2f}M parameters) into {out}; "
        f"it ends a text with {strings[tokenizer.eos_id]}{bos}")
    if template is not None:
        log(f"it answers prompts in the template it was fine-tuned with, {template!r}: generate, chat and serve wrap "
            f"prompts in it")
    return out


def with_declared_eos(tokenizer, directory: Path, config: dict):
    """The folder's tokenizer with the end-of-text token its model declares: tokenizer_config.json's
    eos_token (load_tokenizer reads it), else generation_config.json's or config.json's eos_token_id
    (the first, when it lists several), else the first known name (EOS_NAMES) the vocabulary holds."""
    if declared_eos(directory) is not None:
        return tokenizer
    from ..config import read_json

    generation = directory / "generation_config.json"
    sources = ([read_json(generation, "Hugging Face generation config")] if generation.is_file() else []) + [config]
    for source in sources:
        eos = source.get("eos_token_id")
        eos = eos[0] if isinstance(eos, list) and eos else eos
        if isinstance(eos, int) and 0 <= eos < tokenizer.vocab_size:
            if eos == tokenizer.eos_id:
                return tokenizer
            return BPETokenizer.from_json(tokenizer.to_json(), directory, eos=tokenizer.token_strings()[eos])
    return tokenizer


# ---- export ----------------------------------------------------------------------------------------

def hf_family(fields: dict) -> str:
    """"gpt2" or "llama": the Hugging Face architecture that computes exactly what this model does."""
    for name, required, extra in (("gpt2", GPT2, {"bias": True}), ("llama", LLAMA, {})):
        need = {**required, **extra}
        heads_ok = name == "llama" or fields["n_kv_heads"] == fields["n_heads"]  # GPT-2 has no GQA
        if heads_ok and all(fields.get(k) == v for k, v in need.items()):
            return name
    gpt2 = [f"{k}={fields.get(k)!r} (GPT-2 has {v!r})" for k, v in {**GPT2, "bias": True}.items()
            if fields.get(k) != v]
    if fields["n_kv_heads"] != fields["n_heads"]:
        gpt2.append(f"n_kv_heads={fields['n_kv_heads']} (GPT-2 has no grouped-query attention: n_heads)")
    llama = [f"{k}={fields.get(k)!r} (Llama has {v!r})" for k, v in LLAMA.items() if fields.get(k) != v]
    closer, differences = ("GPT-2", gpt2) if len(gpt2) < len(llama) else ("Llama", llama)
    raise LmforgeError(f"this model matches neither GPT-2 nor Llama; closest is {closer}, which differs in "
                       f"{', '.join(differences)}: train with those settings to export")


def lmforge_to_gpt2(w: dict, f: dict) -> dict:
    out = {"transformer.wte.weight": w["tok_emb.weight"], "transformer.wpe.weight": w["pos_emb.weight"],
           "transformer.ln_f.weight": w["norm.weight"], "transformer.ln_f.bias": w["norm.bias"]}
    for i in range(f["n_layers"]):
        for theirs, ours in GPT2_BLOCK_NAMES.items():
            weight = w[f"blocks.{i}.{ours}.weight"]
            out[f"transformer.h.{i}.{theirs}.weight"] = weight if theirs.startswith("ln") else weight.t()
            out[f"transformer.h.{i}.{theirs}.bias"] = w[f"blocks.{i}.{ours}.bias"]
    if not f["tie_embeddings"]:
        out["lm_head.weight"] = w["lm_head.weight"]
    return out


def lmforge_to_llama(w: dict, f: dict) -> dict:
    hd = f["d_model"] // f["n_heads"]
    sizes = [f["n_heads"] * hd, f["n_kv_heads"] * hd, f["n_kv_heads"] * hd]
    out = {"model.embed_tokens.weight": w["tok_emb.weight"], "model.norm.weight": w["norm.weight"]}
    for i in range(f["n_layers"]):
        p, q = f"model.layers.{i}.", f"blocks.{i}."
        out[p + "input_layernorm.weight"] = w[q + "attn_norm.weight"]
        out[p + "post_attention_layernorm.weight"] = w[q + "mlp_norm.weight"]
        for kind in ("weight", "bias") if f["bias"] else ("weight",):
            for name, part in zip("qkv", w[q + f"attn.qkv.{kind}"].split(sizes)):
                out[p + f"self_attn.{name}_proj.{kind}"] = part
            for theirs, ours in [("self_attn.o_proj", "attn.proj"), ("mlp.gate_proj", "mlp.gate"),
                                 ("mlp.up_proj", "mlp.fc"), ("mlp.down_proj", "mlp.proj")]:
                out[p + f"{theirs}.{kind}"] = w[q + f"{ours}.{kind}"]
    if not f["tie_embeddings"]:
        out["lm_head.weight"] = w["lm_head.weight"]
    return out


def hf_config(family: str, f: dict, eos_id: int, bos_id: int | None = None) -> dict:
    common = {"vocab_size": f["vocab_size"], "tie_word_embeddings": f["tie_embeddings"],
              "bos_token_id": eos_id if bos_id is None else bos_id, "eos_token_id": eos_id, "dtype": "float32",
              "torch_dtype": "float32"}
    if family == "gpt2":
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": f["d_model"],
                "n_layer": f["n_layers"], "n_head": f["n_heads"], "n_positions": f["context_len"],
                "n_inner": f["d_ff"], "activation_function": "gelu_new", "layer_norm_epsilon": f["norm_eps"],
                "resid_pdrop": f["dropout"], "embd_pdrop": f["dropout"], "attn_pdrop": f["attention_dropout"], **common}
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": f["d_model"],
            "num_hidden_layers": f["n_layers"], "num_attention_heads": f["n_heads"],
            "num_key_value_heads": f["n_kv_heads"], "head_dim": f["d_model"] // f["n_heads"],
            "intermediate_size": f["d_ff"], "max_position_embeddings": f["context_len"], "hidden_act": "silu",
            "rms_norm_eps": f["norm_eps"], "rope_theta": f["rope_theta"],
            "rope_parameters": {"rope_type": "default", "rope_theta": f["rope_theta"]},
            "attention_bias": f["bias"], "mlp_bias": f["bias"], "attention_dropout": f["attention_dropout"],
            **common}


def export_hf(run, directory, log=print) -> Path:
    """Write `run` as a Hugging Face folder: config.json, model.safetensors, tokenizer.json, tokenizer_config.json."""
    run, directory = Path(run), Path(directory)
    data = ckpt.read_config(run)
    if data["model"]["arch"] != "transformer":
        raise LmforgeError(f"{run} holds a model of the {data['model']['arch']} family; only Transformers export to "
                           f"Hugging Face")
    fields = data["model"]["options"]
    family = hf_family(fields)
    tokenizer = load_tokenizer(run)
    if tokenizer.kind != "bpe":
        raise LmforgeError(f"{run} uses a {tokenizer.kind} tokenizer; export needs a bpe (Hugging Face) tokenizer — "
                           "train with --tokenizer bpe")
    if directory.exists() and any(directory.iterdir()):
        raise LmforgeError(f"{directory} exists and is not empty; choose another folder (nothing was written)")
    weights = ckpt.load_tensors(run / ckpt.WEIGHTS)
    converted = (lmforge_to_gpt2 if family == "gpt2" else lmforge_to_llama)(weights, fields)
    directory.mkdir(parents=True, exist_ok=True)
    bos_id = getattr(tokenizer, "bos_id", None)
    ckpt.write_json(directory / "config.json", hf_config(family, fields, tokenizer.eos_id, bos_id))
    ckpt.save_tensors(directory / "model.safetensors", converted, metadata={"format": "pt"})
    tokenizer.save(directory)
    strings = tokenizer.token_strings()
    eos = strings[tokenizer.eos_id]
    special = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos,
               "bos_token": eos if bos_id is None else strings[bos_id],
               "model_max_length": fields["context_len"], "clean_up_tokenization_spaces": False}
    template = run_template(data)
    if template is not None:  # lmforge import reads it back; transformers' apply_chat_template applies it
        special.update({TEMPLATE_KEY: template, "chat_template": chat_template(template)})
    ckpt.write_json(directory / "tokenizer_config.json", special)
    if (data.get("finetune") or {}).get("task") == "classify":  # a causal LM folder has no place for them
        log(f"note: exported the language model only; the classifier head ({run / 'classifier.safetensors'}) "
            f"has no place in a Hugging Face causal LM folder")
    elif template is not None:
        log(f"note: this run answers prompts in its template {template!r}: tokenizer_config.json carries it, as a "
            f"chat template for transformers (apply_chat_template with the prompt as the user message) and for "
            f"lmforge import")
    return directory


TEMPLATE_KEY = "lmforge_prompt_template"  # tokenizer_config.json's key for a completion run's prompt template


def chat_template(template: str) -> str:
    """`template` as a Jinja chat template: the last message's content in place of {prompt}. The text
    around it goes in as string literals (ascii() escapes what Jinja's literals read back)."""
    parts = [ascii(part) for part in template.split("{prompt}")]
    return "{{ " + " + messages[-1]['content'] + ".join(parts) + " }}"


def declared_template(directory: Path) -> str | None:
    """The prompt template an exported completion run wrote into tokenizer_config.json, if any."""
    from ..config import read_json

    path = directory / "tokenizer_config.json"
    template = read_json(path, "Hugging Face tokenizer config").get(TEMPLATE_KEY) if path.is_file() else None
    return template if isinstance(template, str) and "{prompt}" in template else None
