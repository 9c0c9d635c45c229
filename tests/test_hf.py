"""Hugging Face import / export against the real `transformers` library: tiny random GPT-2 and Llama (GQA)
models built locally (no downloads) must give the same logits in lmforge, and exported runs in transformers."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import lmforge
from lmforge.cli import main
from lmforge.generation import SamplingConfig, generate
from lmforge.interop.hf import export_hf, import_hf
from lmforge.tokenizers import train_tokenizer

transformers = pytest.importorskip("transformers")
VOCAB = 300


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tokenizer():
    from conftest import TINY_TEXT

    return train_tokenizer("bpe", [TINY_TEXT], vocab_size=VOCAB)


def hf_model(kind: str):
    torch.manual_seed(0)
    if kind == "gpt2":
        config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                         resid_pdrop=0.1, attn_pdrop=0.2)
        return transformers.GPT2LMHeadModel(config).eval()
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      rope_theta=500.0, attention_dropout=0.2)
    return transformers.LlamaForCausalLM(config).eval()


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_import_then_export_matches_transformers(kind, tokenizer, tmp_path, capsys):
    model = hf_model(kind)
    with torch.no_grad():  # random weights for the norms and biases too, so their mapping is tested
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(tmp_path / "hf")
    tokenizer.save(tmp_path / "hf")
    assert main(["import", "hf", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 0
    lm = lmforge.load(tmp_path / "run")
    x = torch.randint(0, VOCAB, (2, 48))
    with torch.no_grad():
        reference, ours = model(x).logits, lm.model(x)[0]
    assert max_diff(reference, ours) < 1e-4
    ids = lm.prompt_ids("Emma Woodhouse")
    with torch.no_grad():  # greedy with the exact weights: token for token what transformers' own generate gives
        theirs = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=30)[0, len(ids):].tolist()
    # transformers feeds the prompt as it is: no token healing
    greedy = generate(lm.decoder_for(exact=True), lm.tokenizer, ids, SamplingConfig(30, 0.0, token_healing=False))
    assert greedy.token_ids == theirs[:len(greedy.token_ids)]
    assert greedy.finish_reason == "length" or theirs[len(greedy.token_ids)] == lm.tokenizer.eos_id
    assert main(["export", "hf", str(tmp_path / "run"), str(tmp_path / "out")]) == 0
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    rates = ("resid_pdrop", "attn_pdrop") if kind == "gpt2" else ("attention_dropout",)  # Llama drops only there
    assert [getattr(again.config, k) for k in rates] == [getattr(model.config, k) for k in rates]
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        assert max_diff(again(x).logits, ours) < 1e-4
    text = "Emma Woodhouse, handsome, clever"
    assert hf_tok(text)["input_ids"] == lm.tokenizer.encode(text)
    assert hf_tok.decode(lm.tokenizer.encode(text)) == text


def test_imported_model_fine_tunes_and_trained_llama_exports(tokenizer, tmp_path, tiny_file):
    hf_model("llama").save_pretrained(tmp_path / "hf")
    tokenizer.save(tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "run", context_len=32, log=lambda *_: None)
    _, result = lmforge.finetune(tmp_path / "run", [str(tiny_file)], tmp_path / "tuned", mode="lora", max_steps=4,
                                 overrides=["train.threads=1", "train.progress=false", "train.batch_size=4",
                                            f"data.cache_dir={json.dumps(str(tmp_path / 'cache'))}"],
                                 log=lambda *_: None)
    run = result.run_dir
    assert result.extra["val_bits_per_byte"] == pytest.approx(lmforge.load(run).evaluate()["bits_per_byte"])
    export_hf(run, tmp_path / "export")
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_key_value_heads"] == 2
    x = torch.randint(0, VOCAB, (1, 20))
    with torch.no_grad():
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
        assert max_diff(hf(x).logits, lmforge.load(run).model(x)[0]) < 1e-4


def test_a_completion_run_keeps_its_prompt_template_through_export_and_import(tokenizer, tmp_path, capsys):
    hf_model("gpt2").save_pretrained(tmp_path / "hf")
    tokenizer.save(tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "run", context_len=32, log=lambda *_: None)
    rows = [{"prompt": f"say {i % 3}", "completion": " Emma" * (i % 3 + 1), "split": "val" if i < 4 else "train"}
            for i in range(20)]
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    template = 'Q: {prompt} — "quoted" {{x}}\nA:'  # Jinja's own braces and quotes are text here
    _, result = lmforge.finetune(tmp_path / "run", [str(tmp_path / "pairs.jsonl")], tmp_path / "tuned",
                                 task="completion", template=template, mode="lora", max_steps=3,
                                 overrides=["train.threads=1", "train.progress=false", "train.batch_size=4"],
                                 log=lambda *_: None)
    assert main(["export", "hf", str(result.run_dir), str(tmp_path / "export")]) == 0
    assert "tokenizer_config.json carries it" in capsys.readouterr().out
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "export")  # for transformers, a chat template
    messages = [{"role": "user", "content": "say 1"}]
    assert hf_tok.apply_chat_template(messages, tokenize=False) == template.replace("{prompt}", "say 1")
    assert main(["import", "hf", str(tmp_path / "export"), "--out", str(tmp_path / "back")]) == 0
    assert "wrap prompts in it" in capsys.readouterr().out
    tuned, back = lmforge.load(result.run_dir), lmforge.load(tmp_path / "back")
    assert back.template == template and back.prompt_ids("say 1") == tuned.prompt_ids("say 1")
    greedy = {"max_new_tokens": 8, "temperature": 0.0, "exact": True}
    assert back.generate("say 1", **greedy) == tuned.generate("say 1", **greedy)


def test_a_vocabulary_padded_past_the_tokenizer_imports_without_the_padding(tokenizer, tmp_path, capsys):
    torch.manual_seed(0)  # rows rounded up past the tokenizer's tokens, as nanoGPT's 50304 are
    config = transformers.GPT2Config(vocab_size=VOCAB + 20, n_positions=64, n_embd=32, n_layer=2, n_head=4)
    model = transformers.GPT2LMHeadModel(config).eval()
    model.save_pretrained(tmp_path / "hf")
    tokenizer.save(tmp_path / "hf")
    capsys.readouterr()
    assert main(["import", "hf", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 0
    assert "20 rows no token reaches are left out" in capsys.readouterr().out
    lm = lmforge.load(tmp_path / "run")
    x = torch.randint(0, VOCAB, (1, 24))
    with torch.no_grad():
        assert max_diff(model(x).logits[..., :VOCAB], lm.model(x)[0]) < 1e-4  # the same logits, less the padding
    assert lm.generate("Emma", max_new_tokens=5, seed=0)
    for bad in ("0", "-5", "1"):  # a window of one token leaves decoding nothing to re-read
        assert main(["import", "hf", str(tmp_path / "hf"), "--out", str(tmp_path / "r"), "--context-len", bad]) == 2
        assert "--context-len" in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_a_llama_that_begins_with_bos_and_ends_with_its_own_eos_reads_and_stops_as_in_transformers(
        tokenizer, tmp_path):
    from tokenizers import Tokenizer, processors

    hf_tok = Tokenizer.from_str(tokenizer.to_json())  # Llama-3's shape: <|begin_of_text|> before every text, and
    hf_tok.add_special_tokens(["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"])  # two end-of-text names
    bos, eot = hf_tok.token_to_id("<|begin_of_text|>"), hf_tok.token_to_id("<|eot_id|>")
    hf_tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                          special_tokens=[("<|begin_of_text|>", bos)])
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB + 3, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      bos_token_id=bos, eos_token_id=eot)  # only the model's configs name <|eot_id|>
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # make <|eot_id|> likely, so greedy decoding meets it
        model.lm_head.weight[eot] = model.model.norm.weight * 3
    model.save_pretrained(tmp_path / "hf")
    hf_tok.save(str(tmp_path / "hf" / "tokenizer.json"))
    import_hf(tmp_path / "hf", tmp_path / "run", log=lambda *_: None)
    lm = lmforge.load(tmp_path / "run", decoding="fp32")
    assert lm.tokenizer.eos_id == eot and lm.tokenizer.bos_id == bos
    text = "Emma Woodhouse, handsome, clever, and rich"
    ids = hf_tok.encode(text).ids
    assert lm.prompt_ids(text) == ids and ids[0] == bos  # the prompt as transformers' tokenizer gives it
    with torch.no_grad():
        theirs = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=40)[0, len(ids):].tolist()
        nats = torch.nn.functional.cross_entropy(model(torch.tensor([ids])).logits[0, :-1], torch.tensor(ids[1:]),
                                                 reduction="sum").item()
    ours = lm.complete(text, SamplingConfig(40, 0.0, token_healing=False))
    assert eot in theirs and ours.token_ids == theirs[:theirs.index(eot)] and ours.finish_reason == "stop"
    bits = nats / torch.log(torch.tensor(2.0)).item() / len(text.encode())
    assert lm.evaluate(text)["bits_per_byte"] == pytest.approx(bits, rel=1e-4)  # scored after <|begin_of_text|>
    export_hf(tmp_path / "run", tmp_path / "out")
    exported = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (exported["bos_token_id"], exported["eos_token_id"]) == (bos, eot)
    again = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert (again.bos_token_id, again.eos_token_id) == (bos, eot) and again(text)["input_ids"] == ids
    import_hf(tmp_path / "out", tmp_path / "back", log=lambda *_: None)  # and back: the same two tokens
    back = lmforge.load(tmp_path / "back")
    assert (back.tokenizer.bos_id, back.tokenizer.eos_id) == (bos, eot)


def test_a_hugging_face_folder_with_bad_sizes_or_weights_is_refused_in_one_line(tokenizer, tmp_path, capsys):
    hf_model("llama").save_pretrained(tmp_path / "hf")
    tokenizer.save(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    for key, value in [("hidden_size", "32"), ("num_attention_heads", 0), ("num_hidden_layers", None)]:
        (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, key: value}))
        capsys.readouterr()
        assert main(["import", "hf", str(tmp_path / "hf"), "--out", str(tmp_path / "r")]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and f"{key} must be a positive whole number, got {value!r}" in err
    # an option lmforge cannot import is named as the user set it; a file is not a model folder
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "attention_bias": True}))
    assert main(["import", "hf", str(tmp_path / "hf"), "--out", str(tmp_path / "r")]) == 2
    assert "unsupported Llama option(s) attention_bias=True with mlp_bias=False;" in capsys.readouterr().err
    assert main(["import", "hf", str(tmp_path / "hf" / "config.json"), "--out", str(tmp_path / "r")]) == 2
    assert "config.json is a file; point at a Hugging Face model folder" in capsys.readouterr().err
    # an absent context length takes the default, as transformers does
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "max_position_embeddings": None}))
    assert main(["import", "hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ok")]) == 0
    weights = (tmp_path / "ok" / "model.safetensors").read_bytes()
    assert main(["train", "--resume", str(tmp_path / "ok"), "--max-steps", "2"]) == 2  # no resume point to go on from
    assert "was imported, so it has no resume points" in capsys.readouterr().err
    assert (tmp_path / "ok" / "model.safetensors").read_bytes() == weights
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    weights = load_file(tmp_path / "hf" / "model.safetensors")
    save_file({**weights, "model.norm.weight": torch.ones(7)}, tmp_path / "hf" / "model.safetensors")
    capsys.readouterr()
    assert main(["import", "hf", str(tmp_path / "hf"), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: {tmp_path / 'hf' / 'model.safetensors'} does not match its config.json (norm.weight is "
                   f"[7], the model needs [32]); download or save the model again")
    assert not (tmp_path / "r").exists()
