"""Shared fixtures: tiny random models built with transformers (the oracle), saved to temp dirs with a real
tokenizer, and loaded back through parca's own loader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)

WORDS = (
    "the a of to and in is was for on that with as by at from it be this are or an have not which one all "
    "their has but they were had been more can will would there other when what who some into only its new "
    "time about could may first than these two also over after most like then made out them any such many "
    "contract clause party payment term notice law court record log error request model token cost sparse "
    "attention memory cache index key value query needle haystack pass number magic special answer"
).split()


def make_tokenizer(out: Path, vocab_size: int = 256, chat_template_in: str = "config") -> None:
    """A small byte-level BPE tokenizer trained on a fixed text, saved as tokenizer.json (+ config / template)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    text = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(0, len(WORDS), 3)] * 4
    tok.train_from_iterator(text, trainer)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    template = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}<s>assistant:{% endif %}")
    cfg = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "add_bos_token": False,
           "tokenizer_class": "PreTrainedTokenizerFast"}
    if chat_template_in == "config":
        cfg["chat_template"] = template
    else:
        (out / "chat_template.jinja").write_text(template)
    (out / "tokenizer_config.json").write_text(json.dumps(cfg))


ARCHS = ["llama", "llama3_rope", "yarn", "qwen2", "qwen3", "mistral"]


def hf_model(arch: str, seed: int = 0, **over):
    """A tiny random transformers model of the given family (float32)."""
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=1, tie_word_embeddings=False)
    if arch == "llama":
        cfg = tf.LlamaConfig(**{**common, "rope_theta": 10000.0, **over})
        cls = tf.LlamaForCausalLM
    elif arch == "llama3_rope":
        rp = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
        cfg = tf.LlamaConfig(**{**common, "rope_parameters": rp, "tie_word_embeddings": True, **over})
        cls = tf.LlamaForCausalLM
    elif arch == "yarn":
        rp = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 128}
        cfg = tf.Qwen2Config(**{**common, "rope_parameters": rp, **over})
        cls = tf.Qwen2ForCausalLM
    elif arch == "qwen2":
        cfg = tf.Qwen2Config(**{**common, "rope_theta": 1000000.0, **over})
        cls = tf.Qwen2ForCausalLM
    elif arch == "qwen3":
        cfg = tf.Qwen3Config(**{**common, "head_dim": 32, "tie_word_embeddings": True, **over})
        cls = tf.Qwen3ForCausalLM
    elif arch == "mistral":
        cfg = tf.MistralConfig(**{**common, "sliding_window": 16, **over})
        cls = tf.MistralForCausalLM
    else:
        raise ValueError(arch)
    model = cls(cfg).eval()
    # Random init in HF is small; make weights larger so differences show up in logits.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.08)
            elif "bias" in name:
                p.normal_(0, 0.05)
            else:
                p.copy_(1 + 0.1 * torch.randn_like(p))
    return model


def save_hf(model, out: Path, **kw) -> Path:
    model.save_pretrained(str(out), **kw)
    make_tokenizer(out)
    return out


@pytest.fixture(scope="session")
def hf_dirs(tmp_path_factory):
    """One saved tiny model directory per architecture (built once per test session)."""
    base = tmp_path_factory.mktemp("hf")
    dirs = {}
    for arch in ARCHS:
        m = hf_model(arch)
        dirs[arch] = (save_hf(m, base / arch), m)
    return dirs


@pytest.fixture(scope="session")
def llama_dir(hf_dirs):
    return hf_dirs["llama"][0]
