"""The default model shipped in parca/assets/default: loads, has the stated sizes, tokenizes, retrieves.

Trained by scripts/train_default_model.py; sizes and scores are in parca/assets/default/MODEL_CARD.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from parca.checkpoint import load_model
from parca.config import load_config
from parca.tokenizer import Tokenizer

DEFAULT = Path(__file__).resolve().parents[1] / "parca" / "assets" / "default"
MAX_DIR_BYTES = 40 * 1024 * 1024


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(DEFAULT)


@pytest.fixture(scope="module")
def model():
    return load_model(DEFAULT, context=4096)


def test_files_present_and_small() -> None:
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "MODEL_CARD.md"):
        assert (DEFAULT / name).is_file(), name
    total = sum(p.stat().st_size for p in DEFAULT.rglob("*") if p.is_file())
    assert total <= MAX_DIR_BYTES, f"{DEFAULT} holds {total / 2**20:.1f} MiB (limit 40 MiB)"


def test_config_is_the_stated_one() -> None:
    cfg = load_config(DEFAULT)
    raw = json.loads((DEFAULT / "config.json").read_text())
    assert cfg.architecture == "LlamaForCausalLM" and cfg.family == "llama"
    assert raw["torch_dtype"] == "bfloat16" and cfg.torch_dtype == "bfloat16"
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers) == (8192, 256, 5)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (4, 4, 64)
    assert cfg.intermediate_size == 704
    assert cfg.max_position_embeddings == 32768
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling is None
    assert 8_000_000 <= cfg.parameter_count() <= 20_000_000


def test_weights_load_in_bf16_with_the_config_param_count(model) -> None:
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    n = sum(p.numel() for p in model.parameters())
    assert n == model.config.parameter_count()
    assert all(torch.isfinite(p.float()).all() for p in model.parameters())


def test_tokenizer_round_trips_and_has_specials(tok) -> None:
    assert tok.vocab_size == 8192
    assert tok.bos_id is not None and tok.eos_id is not None and tok.bos_id != tok.eos_id
    cfg = load_config(DEFAULT)
    assert cfg.bos_token_id == tok.bos_id and cfg.eos_token_id == [tok.eos_id]
    for text in ["The pass key is 31415. Remember it.", "To be, or not to be: that is the question.\n\n  x",
                 "ünïcödé — 日本語 ✓", "VAR ABCDE = VAR FGHIJ."]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
    ids = tok.encode("hello", add_special_tokens=True)
    assert ids[0] == tok.bos_id


def test_tokenizer_cuts_numbers_into_two_digit_tokens(tok) -> None:
    """The shipped tokenizer is the digit-pair one (scripts/train_default_model.py ``digit_pair_tokenizer``): a
    needle's value is a string of frequent one- and two-digit tokens, never a rare whole-number token."""
    pieces = [tok.decode([i]) for i in tok.encode("The pass key is 4281010. Remember it.")]
    assert pieces[pieces.index(" is") + 1 : pieces.index(" is") + 7] == [" ", "42", "81", "01", "0", "."]
    for n in ("7", "31415", "25238", "1458143", "100000000"):
        digits = [p for p in (tok.decode([i]) for i in tok.encode(f" {n}.")) if p.strip().isdigit()]
        assert "".join(digits) == n and all(len(p) <= 2 for p in digits), (n, digits)


def test_chat_template_renders(tok) -> None:
    text = tok.apply_chat_template([{"role": "user", "content": "What is the pass key?"}])
    assert text.startswith(tok.bos_token) and text.endswith("<|assistant|>\n")
    ids = tok.encode_chat([{"role": "user", "content": "hi"}])
    assert ids[0] == tok.bos_id and tok.eos_id in ids


def _passkey_outputs(model, tok, n: int = 2):
    from parca.engine import Engine, SamplingParams
    from parca.evals.tasks import get_task

    task = get_task("passkey")
    eng = Engine(model, tok, max_slots=n, max_len=1100)
    samples = [task.generate(tok, 1024, seed=0, index=i) for i in range(n)]
    outs = eng.generate([s.prompt for s in samples], SamplingParams(max_new_tokens=8))
    return samples, [r.text for r in outs]


def test_greedy_passkey_answer_has_the_trained_format(model, tok) -> None:
    """It answers a passkey prompt with a number and a full stop (the trained answer format)."""
    from parca.evals.scoring import first_integer

    _, texts = _passkey_outputs(model, tok)
    for text in texts:
        assert first_integer(text) is not None, text


def test_prose_is_modelled_better_than_chance(model, tok) -> None:
    from parca.evals.haystack import prose_text

    ids = torch.tensor([tok.encode(prose_text()[600_000:604_000], add_special_tokens=True)[:512]])
    with torch.no_grad():
        logits = model(ids).float()
    nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).item()
    assert nll < 7.0  # uniform over 8192 tokens is 9.01 nats; the shipped model measures ~5.9 here


def test_greedy_passkey_at_1k_is_correct(model, tok) -> None:
    """The shipped model retrieves (MODEL_CARD.md: passkey 10/10 at 1K with seeds 0-9; here the first two)."""
    from parca.evals.scoring import score

    samples, texts = _passkey_outputs(model, tok)
    for s, text in zip(samples, texts):
        assert score("passkey", text, s.answers) == 1.0, (s.answers, text)


def test_shipped_adapter_matches_the_model():
    from parca.assets import DEFAULT_INDEXER, DEFAULT_MODEL
    from parca.checkpoint import load_model

    m = load_model(DEFAULT_MODEL, indexer=DEFAULT_INDEXER)  # refused if made for other weights
    assert m.sparse_config.index_topk == 2048 and m.sparse_config.index_n_heads == 4
    assert (DEFAULT_INDEXER / "training.json").is_file()
