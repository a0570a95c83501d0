"""Which of the default model's choices keep a small transformer on the induction plateau?

A two-layer transformer (hidden 128, 4 heads, RoPE) learns to copy on "gap" rows: 128 random tokens in which one
segment (L/8..L/3 tokens) reappears after a random gap, the loss on the copy after its first token. Guessing costs
ln(alphabet) nats; an induction head (a previous-token head feeding a content-matching head) drives the loss to
~0, and it appears abruptly after a plateau. The baseline is the textbook setup (LayerNorm, no MLP, PyTorch's default
init, AdamW 0.9/0.999, RoPE base 10,000, output classes = the alphabet); each flag switches one choice to what
``scripts/train_default_model.py`` uses, so one run per flag shows which choice lengthens the plateau.

    python scripts/induction_plateau.py                 # baseline
    python scripts/induction_plateau.py --vocab8k       # 8,192 output classes, 256 used
    python scripts/induction_plateau.py --vocab8k --init02 --candidates batch   # the same, with the training
                                                        # softmax restricted to the tokens in the batch

The reported copy loss is always the full softmax over every output class; ``--candidates`` only changes what the
training loss normalises over (a sampled softmax), ``--widen-after N`` then draws the random tokens from every class
with the full softmax.

Prints the loss every 100 steps and one JSON line (the step where the loss first fell below 2 nats, or null).
Standalone: imports torch only.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time

import torch
import torch.nn.functional as F
from torch import nn

FLAGS = {
    "mlp": "a SwiGLU MLP after each attention block (intermediate 2x hidden)",
    "rms": "RMSNorm (eps 1e-5) instead of LayerNorm",
    "init02": "GPT-2 init: normal(0, 0.02) everywhere, output projections / sqrt(2 * layers)",
    "vocab8k": "8,192 output classes and embedding rows (the default model's vocabulary), only --alpha used",
    "adam95": "AdamW betas 0.9/0.95, gradient clipping at 1.0, 20 warm-up steps",
    "theta500k": "RoPE base 500,000",
    "bos": "a BOS token at the start of every row",
    "tied": "the output layer shares the embedding matrix (tie_word_embeddings)",
}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f, h in FLAGS.items():
        ap.add_argument("--" + f, action="store_true", help=h)
    ap.add_argument("--alpha", type=int, default=256, help="alphabet of the random tokens (default 256)")
    ap.add_argument("--classes", type=int, default=0,
                    help="output classes and embedding rows (default: --alpha, or 8,192 with --vocab8k)")
    ap.add_argument("--candidates", choices=("all", "row", "batch"), default="all",
                    help="classes the softmax of the training loss ranges over: all (default), the tokens present in "
                         "the row (row) or in the batch (batch); the full-softmax loss is still reported")
    ap.add_argument("--full-after", type=int, default=0,
                    help="switch the training loss to the full softmax after this many updates (0: never)")
    ap.add_argument("--widen-after", type=int, default=0,
                    help="after this many updates draw the random tokens from all output classes and train on the "
                         "full softmax (0: never)")
    ap.add_argument("--steps", type=int, default=1000, help="updates of 64 rows x 128 tokens (default 1000)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    torch.manual_seed(a.seed)
    torch.set_num_threads(a.threads)
    L, d, H, B = 128, 128, 4, 64
    V = a.classes or (8192 if a.vocab8k else a.alpha)
    if a.alpha > V:
        ap.error(f"--alpha {a.alpha} exceeds the {V} output classes (add --vocab8k or --classes)")

    def gap_row(rng: random.Random) -> tuple[list[int], list[float]]:
        s = rng.randint(L // 8, L // 3)
        toks = [rng.randrange(alpha[0]) for _ in range(L)]
        p2 = rng.randint(s + 1, L - s)
        p1 = rng.randint(0, p2 - s)
        toks[p2 : p2 + s] = toks[p1 : p1 + s]
        w = [0.0] * L
        for i in range(p2 + 1, p2 + s):
            w[i] = 1.0
        if a.bos:
            toks, w = [V - 1] + toks[:-1], [0.0] + w[:-1]
        return toks, w

    def norm() -> nn.Module:
        return nn.RMSNorm(d, eps=1e-5) if a.rms else nn.LayerNorm(d)

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln = norm()
            self.qkv = nn.Linear(d, 3 * d, bias=False)
            self.o = nn.Linear(d, d, bias=False)
            if a.mlp:
                self.ln2 = norm()
                self.gate = nn.Linear(d, 2 * d, bias=False)
                self.up = nn.Linear(d, 2 * d, bias=False)
                self.down = nn.Linear(2 * d, d, bias=False)

        def forward(self, x, cos, sin):
            b, t, _ = x.shape
            q, k, v = self.qkv(self.ln(x)).view(b, t, 3, H, d // H).permute(2, 0, 3, 1, 4)

            def rot(z):
                h = z.shape[-1] // 2
                return z * cos + torch.cat([-z[..., h:], z[..., :h]], -1) * sin

            att = F.scaled_dot_product_attention(rot(q), rot(k), v, is_causal=True)
            x = x + self.o(att.transpose(1, 2).reshape(b, t, d))
            if a.mlp:
                y = self.ln2(x)
                x = x + self.down(F.silu(self.gate(y)) * self.up(y))
            return x

    emb, blocks, fnorm, head = nn.Embedding(V, d), nn.ModuleList([Block(), Block()]), norm(), nn.Linear(d, V, bias=False)
    if a.tied:
        head.weight = emb.weight
    mods = [emb, blocks, fnorm, head]
    if a.init02:
        for m in mods:
            for n, p in m.named_parameters():
                if p.dim() > 1:
                    out_proj = n.endswith("o.weight") or n.endswith("down.weight")
                    nn.init.normal_(p, 0.0, 0.02 / math.sqrt(4) if out_proj else 0.02)
    params = list({id(p): p for m in mods for p in m.parameters()}.values())  # a tied matrix once
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0, betas=(0.9, 0.95) if a.adam95 else (0.9, 0.999))
    base = 500000.0 if a.theta500k else 10000.0
    inv = 1.0 / (base ** (torch.arange(0, d // H, 2).float() / (d // H)))
    fr = torch.arange(L).float()[:, None] * inv
    fr = torch.cat([fr, fr], -1)
    cos, sin = fr.cos(), fr.sin()
    rng = random.Random(a.seed)
    alpha = [a.alpha]
    t0, ema, fema, escaped, curve = time.time(), None, None, None, []
    for step in range(1, a.steps + 1):
        if a.widen_after and step == a.widen_after + 1:
            alpha[0] = V
            print(f"step {step}: tokens now drawn from all {V} classes, full softmax", flush=True)
        rows = [gap_row(rng) for _ in range(B)]
        ids = torch.tensor([r for r, _ in rows])
        w = torch.tensor([x for _, x in rows])
        x = emb(ids)
        for blk in blocks:
            x = blk(x, cos, sin)
        sel = w[:, 1:] > 0
        logits = head(fnorm(x[:, :-1])[sel])
        target = ids[:, 1:][sel]
        full_loss = F.cross_entropy(logits, target)
        restrict = a.candidates != "all" and not (a.full_after and step > a.full_after) and alpha[0] != V
        if restrict:
            present = torch.zeros(B, V, dtype=torch.bool).scatter_(1, ids, True)
            if a.candidates == "batch":
                present = present.any(0, keepdim=True).expand(B, V)
            rows_of = torch.arange(B)[:, None].expand_as(sel)[sel]
            loss = F.cross_entropy(logits.masked_fill(~present[rows_of], float("-inf")), target)
        else:
            loss = full_loss
        opt.zero_grad()
        loss.backward()
        if a.adam95:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            for g in opt.param_groups:
                g["lr"] = a.lr * min(1.0, step / 20)
        opt.step()
        ema = loss.item() if ema is None else 0.9 * ema + 0.1 * loss.item()
        fema = full_loss.item() if fema is None else 0.9 * fema + 0.1 * full_loss.item()
        if escaped is None and fema < 2.0:
            escaped = step
        if step % 100 == 0 or step == a.steps:
            curve.append((step, round(fema, 3)))
            extra = f", trained on {ema:.3f}" if restrict else ""
            print(f"step {step}: copy loss {fema:.3f}{extra} ({time.time() - t0:.0f}s)", flush=True)
    out = {"flags": [f for f in FLAGS if getattr(a, f)], "alpha": a.alpha, "classes": V, "lr": a.lr, "steps": a.steps,
           "candidates": a.candidates, "full_after": a.full_after,
           "widen_after": a.widen_after,
           "uniform_nats": round(math.log(a.alpha), 3), "final_loss": round(fema, 3), "escaped_at": escaped,
           "curve": curve, "wall_s": round(time.time() - t0, 1)}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
