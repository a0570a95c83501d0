"""The measured cost curve (`parca bench curve`), optionally on a random model built for the purpose.

    python benchmarks/curve.py --build-random /tmp/parca-rand512 --positions 1k,2k,4k,8k,16k,32k,64k --reps 3 \
        --threads 1 --out bench-out/curve-rand512

With ``--build-random DIR`` (built once, reused when DIR holds a config.json) the model is a random Llama of
the README's reference shape: hidden 512, 8 layers, 8 heads x 64, 2 KV heads, MLP 1536, vocab 32000, 128K
context, float32, with a random indexer of 4 heads x 64 (top-k 2048 unless --index-topk) -- cost does not
depend on the weights. Every other argument goes to `parca bench curve` unchanged; output is its card, then
ONE JSON line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from parca.cli import main as parca_main


def build_random_model(out: Path, *, hidden: int = 512, layers: int = 8, heads: int = 8, kv_heads: int = 2,
                       intermediate: int = 1536, vocab: int = 32000, context: int = 131072) -> Path:
    """A random transformers Llama saved with save_pretrained (no tokenizer: the curve uses random ids)."""
    import torch
    import transformers as tf

    if (out / "config.json").is_file():
        return out
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=context, rope_theta=500000.0, bos_token_id=0, eos_token_id=1,
                         tie_word_embeddings=False)
    tf.LlamaForCausalLM(cfg).eval().save_pretrained(str(out))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 add_help=False)
    ap.add_argument("--build-random", type=Path, default=None, metavar="DIR",
                    help="build (once) and measure the reference random model in DIR")
    known, rest = ap.parse_known_args(argv)
    if known.build_random is not None:
        build_random_model(known.build_random)
        rest = ["--model", str(known.build_random)] + (["--random-indexer"] if "--indexer" not in rest else []) + rest
    return parca_main(["bench", "curve", *rest])


if __name__ == "__main__":
    sys.exit(main())
