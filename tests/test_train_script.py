"""scripts/train_default_model.py: the copy-row generators and the two diagnostics the model card quotes."""

from __future__ import annotations

import importlib.util
import math
import random
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("train_default_model", ROOT / "scripts" / "train_default_model.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["train_default_model"] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def data(script):
    from parca.tokenizer import Tokenizer

    return script.DataSource(Tokenizer(ROOT / "parca" / "assets" / "default"), 0.0, 20.0, repeat_alphabet=1000)


def test_gap_row_copies_one_segment_and_supervises_only_its_predictable_part(data):
    for seed in range(20):
        ids, w = data.gap_row(random.Random(seed), 64)
        assert len(ids) == len(w) == 64 and ids[0] == data.bos
        assert all(data.repeat_lo <= t < data.repeat_hi for t in ids[1:])
        sup = [i for i, x in enumerate(w) if x > 0]
        assert sup == list(range(sup[0], sup[-1] + 1))  # one contiguous supervised run
        # each supervised target ids[i] is predictable: the pair (ids[i-1], ids[i]) occurred earlier
        for i in sup:
            assert any(ids[j - 1] == ids[i - 1] and ids[j] == ids[i] for j in range(2, sup[0] - 1)), (seed, i)


def test_periodic_row_repeats_with_a_fixed_period(data):
    ids, w = data.repeat_row(random.Random(3), 48)
    s = next(i for i, x in enumerate(w) if x > 0) - 1  # the period
    assert 10 <= s <= 12
    assert all(ids[i] == ids[i - s] for i in range(1 + s, 48))


def test_induction_probe_reports_curve_and_held_out_table(script, tmp_path):
    parser_args = ["--induction-probe", "--probe-rows", "gap", "--probe-len", "32", "--probe-steps", "10",
                   "--tokens-per-step", "128", "--hidden", "32", "--intermediate", "64", "--layers", "1",
                   "--heads", "2", "--kv-heads", "2", "--threads", "1", "--work-dir", str(tmp_path)]
    out = {}
    orig = script.induction_probe
    script.induction_probe = lambda a: out.update(orig(a))  # main() discards the result; keep it
    try:
        script.main(parser_args)
    finally:
        script.induction_probe = orig
    assert out["rows"] == "gap" and out["batch"] == 4 and [s for s, _ in out["curve"]] == [10]
    assert len(out["held_out"]) == 8 and all(math.isfinite(v) and v > 0 for v in out["held_out"].values())


def test_copy_heads_of_the_shipped_model(script):
    import argparse

    a = argparse.Namespace(threads=1, model_dir=None, out=str(ROOT / "parca" / "assets" / "default"))
    res = script.copy_heads(a)
    assert len(res) == 5
    for layer in res.values():
        assert len(layer["previous_token"]) == len(layer["induction"]) == 4
        assert all(0.0 <= x <= 1.0 for x in layer["previous_token"] + layer["induction"])
    # what the card states: a previous-token head in layer 0 and induction heads in layer 1 (uniform ~0.005)
    assert max(res["layer0"]["previous_token"]) > 0.4
    assert sum(x > 0.3 for x in res["layer1"]["induction"]) >= 2


def test_induction_plateau_script_runs_each_flag():
    """scripts/induction_plateau.py: a few updates with every flag on give a finite curve and the JSON fields."""
    path = Path(__file__).resolve().parents[1] / "scripts" / "induction_plateau.py"
    spec = importlib.util.spec_from_file_location("induction_plateau", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.main(["--steps", "3", *[f"--{f}" for f in mod.FLAGS]])
    assert out["flags"] == list(mod.FLAGS) and out["steps"] == 3 and out["curve"][-1][0] == 3
    assert math.isfinite(out["final_loss"]) and out["uniform_nats"] == round(math.log(256), 3)
    assert mod.main(["--steps", "1", "--classes", "512"])["classes"] == 512
    out = mod.main(["--steps", "4", "--vocab8k", "--candidates", "batch", "--widen-after", "2"])
    assert out["candidates"] == "batch" and out["widen_after"] == 2 and math.isfinite(out["final_loss"])
    with pytest.raises(SystemExit):
        mod.main(["--steps", "1", "--vocab8k", "--alpha", "9000"])  # more symbols than output classes


def test_batch_candidates_restrict_the_softmax_to_tokens_in_the_batch(script):
    """weighted_loss(candidates="batch") is the CE over the classes present in ids, absent rows of the output layer
    get no gradient, and ``full`` receives the unrestricted loss (what candidates="all" returns)."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    V, d = 50, 8

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm_head = torch.nn.Linear(d, V, bias=False)

    m = Head()
    ids = torch.randint(0, 20, (2, 6))  # only classes < 20 occur
    hidden = torch.randn(2, 6, d)
    w = torch.rand(2, 6) + 0.5
    w[:, 0] = 0
    full: list = []
    loss, _ = script.weighted_loss(m, hidden, ids, w, "batch", full)
    logits = m.lm_head(hidden[:, :-1]).reshape(-1, V)
    present = torch.zeros(V, dtype=torch.bool)
    present[ids.reshape(-1)] = True
    ce = F.cross_entropy(logits[:, present], torch.cumsum(present.long(), 0)[ids[:, 1:].reshape(-1)] - 1,
                         reduction="none")
    wf = w[:, 1:].reshape(-1)
    torch.testing.assert_close(loss, (ce * wf).sum() / wf.sum())
    loss.backward()
    assert m.lm_head.weight.grad[~present].abs().max() == 0 and m.lm_head.weight.grad[present].abs().max() > 0
    all_loss, _ = script.weighted_loss(m, hidden, ids, w, "all")
    torch.testing.assert_close(full[0], all_loss.detach())
    assert all_loss > loss  # the restricted softmax drops the absent classes' mass
    with pytest.raises(ValueError, match="candidates"):
        script.weighted_loss(m, hidden, ids, w, "row")
    # "gap": row 0 restricted to its own ids, row 1 keeps the full softmax
    m.zero_grad()
    gap_loss, _ = script.weighted_loss(m, hidden, ids, w, "gap", rows=torch.tensor([True, False]))
    p0 = torch.zeros(V, dtype=torch.bool)
    p0[ids[0]] = True
    l0 = m.lm_head(hidden[0, :-1])
    ce0 = F.cross_entropy(l0[:, p0], torch.cumsum(p0.long(), 0)[ids[0, 1:]] - 1, reduction="none")
    ce1 = F.cross_entropy(m.lm_head(hidden[1, :-1]), ids[1, 1:], reduction="none")
    want = ((ce0 * w[0, 1:]).sum() + (ce1 * w[1, 1:]).sum()) / w[:, 1:].sum()
    torch.testing.assert_close(gap_loss, want)
    none_flagged, _ = script.weighted_loss(m, hidden, ids, w, "gap", rows=torch.tensor([False, False]))
    torch.testing.assert_close(none_flagged, all_loss)


def test_frequent_token_alphabet_of_gap_rows(script):
    from parca.tokenizer import Tokenizer

    tok = Tokenizer(ROOT / "parca" / "assets" / "default")
    alpha = script.frequent_tokens(tok, 64)
    assert len(alpha) == len(set(alpha)) == 64 and min(alpha) >= 3 + len(script.ROLE_TOKENS)
    assert alpha == script.frequent_tokens(tok, 64)  # deterministic
    src = script.DataSource(tok, 0.0, 20.0, gap_frac=1.0, gap_alphabet=64)
    ids, w = src.batch(7, 64, 3)
    assert set(ids[:, 1:].reshape(-1).tolist()) <= set(alpha) and (ids[:, 0] == tok.bos_id).all()
    assert (w > 0).any(1).all()  # every row supervises its copy
    assert src.last_gap_rows.all()
    mixed = script.DataSource(tok, 0.5, 20.0, gap_frac=0.5, gap_alphabet=64)
    ids, w = mixed.batch(3, 64, 8)
    for b in range(8):  # flagged rows are exactly the gap rows (tokens from the alphabet only)
        assert bool(mixed.last_gap_rows[b]) == (set(ids[b, 1:].tolist()) <= set(alpha)), b
    nums = script.number_tokens(tok)
    assert [t for t in tok.encode(" 25238") if t in nums] == tok.encode(" 25238")[1:]  # " ", "25", "23", "8"
    assert all(tok.decode([t]).strip().isdigit() for t in nums) and len(nums) == len(set(nums))
    both = script.DataSource(tok, 0.0, 20.0, gap_frac=1.0, gap_alphabet=64, gap_numbers=True)
    assert both.gap_alphabet[:64] == alpha and set(both.gap_alphabet) == set(alpha) | set(nums)


def _tiny_stage_setup():
    """(tokenizer, its dir, a 1-layer model over the shipped vocabulary, run_stage's args) for stage tests."""
    import argparse

    import torch

    from parca.config import ModelConfig
    from parca.models.llama import LlamaForCausalLM
    from parca.tokenizer import Tokenizer

    tok_dir = ROOT / "parca" / "assets" / "default"
    tok = Tokenizer(tok_dir)
    cfg = ModelConfig(architecture="LlamaForCausalLM", family="llama", vocab_size=tok.vocab_size, hidden_size=32,
                      intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                      head_dim=16, max_position_embeddings=256, torch_dtype="float32", bos_token_id=tok.bos_id,
                      eos_token_id=[tok.eos_id])
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg, dtype=torch.float32)
    args = argparse.Namespace(device="cpu", seed=1, answer_weight=20.0, tokens_per_step=0, wd=0.0, fresh=False,
                              save_every=100, log_every=1)
    return tok, tok_dir, model, args


def test_stage_stops_early_once_the_full_softmax_loss_is_low_and_resume_skips_it(script, tmp_path):
    """A stage with ``stop_below`` ends (checkpoint + export) at the first step >= min_steps whose full-softmax
    EMA is below the threshold; rerunning it resumes as finished instead of training on."""
    tok, tok_dir, model, args = _tiny_stage_setup()
    stage = {"name": "s", "phases": "32:50", "lr": 1e-3, "warmup": 1, "tokens_per_step": 64, "prose_frac": 0.0,
             "copy_frac": 0.0, "gap_frac": 1.0, "gap_alphabet": 32, "candidates": "batch", "stop_below": 100.0,
             "min_steps": 3}
    st = script.run_stage(args, model, tok, tok_dir, tmp_path / "s", 0, stage, stage["phases"], None)
    assert st["stopped_at"] == 3 and st["steps"] == 3 and st["tokens_seen"] == 3 * 64
    assert (tmp_path / "s" / "ckpt.pt").is_file() and (tmp_path / "s" / "export_L32" / "model.safetensors").is_file()
    again = script.run_stage(args, model, tok, tok_dir, tmp_path / "s", 0, stage, stage["phases"], None)
    assert again["stopped_at"] == 3 and again["steps"] == 3


def test_stage_max_steps_stops_inside_a_longer_plan(script, tmp_path):
    """``max_steps`` ends a stage part-way through its phases with the LR of the whole plan (how stage3c ran: 530
    updates of a 900-update schedule); a checkpoint at the limit resumes as finished."""
    import torch

    tok, tok_dir, model, args = _tiny_stage_setup()
    stage = {"name": "s", "phases": "32:3,64:10", "max_steps": 5, "lr": 1e-3, "warmup": 1, "decay": "wsd",
             "tokens_per_step": 64, "prose_frac": 0.0, "copy_frac": 0.0, "gap_frac": 1.0, "gap_alphabet": 32,
             "candidates": "batch"}
    st = script.run_stage(args, model, tok, tok_dir, tmp_path / "s", 0, stage, stage["phases"], None)
    assert st["stopped_at"] == 5 and st["steps"] == 5 and st["tokens_seen"] == 5 * 64
    assert (tmp_path / "s" / "export_L64" / "model.safetensors").is_file()
    ck = torch.load(tmp_path / "s" / "ckpt.pt", weights_only=True)
    ck["meta"]["stopped_at"] = None  # as written by a run of the same plan that knew no limit
    torch.save(ck, tmp_path / "s" / "ckpt.pt")
    again = script.run_stage(args, model, tok, tok_dir, tmp_path / "s", 0, stage, stage["phases"], None)
    assert again["stopped_at"] == 5 and again["steps"] == 5
    assert script.lr_at(4, 13, 1e-3, 1, "wsd") == 1e-3  # step 5 of 13 is still on the flat part


def test_copy_eval_of_the_shipped_model(script):
    import argparse

    a = argparse.Namespace(threads=1, model_dir=None, out=str(ROOT / "parca" / "assets" / "default"), seed=0,
                           answer_weight=20.0)
    table = script.copy_eval(a)
    assert len(table) == 14 and all(math.isfinite(v) and v > 0 for v in table.values())
    # what the card states: the shipped model copies its 1,024 most frequent tokens (0.43 nats at 2,048; uniform
    # 6.93) but not random tokens of the whole vocabulary (8.7; uniform over 8,192 is 9.01)
    assert table["gap L=2048, frequent 1024"] < 1.0
    assert table["gap L=512, whole vocabulary"] > 5.0


def test_digit_pair_tokenizer_keeps_the_vocabulary_and_cuts_numbers(script, tmp_path):
    """``digit_pair_tokenizer``: a ByteLevel BPE tokenizer whose merges made whole-number tokens encodes numbers as
    two-digit groups afterwards, with the same vocabulary and ids, round-trips text, and is idempotent."""
    import json

    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from parca.tokenizer import Tokenizer

    src = tmp_path / "src"
    src.mkdir()
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, min_frequency=1, special_tokens=["<|bos|>", "<|eos|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    hf.train_from_iterator(["The pass key is 4281010. Remember 4281010 and 25238."] * 50, trainer=trainer)
    hf.save(str(src / "tokenizer.json"))
    (src / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|bos|>", "eos_token": "<|eos|>"}))
    before = Tokenizer(src)
    assert any(len(before.decode([i]).strip()) > 2 and before.decode([i]).strip().isdigit()
               for i in before.encode(" 4281010"))  # the merges made a long number token
    script.digit_pair_tokenizer(src, tmp_path / "pairs")
    after = Tokenizer(tmp_path / "pairs")
    assert after.vocab_size == before.vocab_size
    assert json.loads((tmp_path / "pairs" / "tokenizer.json").read_text())["model"] == \
        json.loads((src / "tokenizer.json").read_text())["model"]  # same vocabulary and merges
    pieces = [after.decode([i]) for i in after.encode("key is 4281010.")]
    digits = [p for p in pieces if p.isdigit()]
    assert "".join(digits) == "4281010" and all(len(p) <= 2 for p in digits) and pieces[-1] == "."
    for text in ["The pass key is 4281010. Remember it.", "x1.5 and 25238, 7", "no digits here"]:
        assert after.decode(after.encode(text)) == text
    script.digit_pair_tokenizer(tmp_path / "pairs", tmp_path / "again")  # already cut: unchanged
    assert (tmp_path / "again" / "tokenizer.json").read_text() == (tmp_path / "pairs" / "tokenizer.json").read_text()


def test_retrofit_indexer_step_writes_a_matching_adapter_and_resumes(script, tmp_path, monkeypatch):
    """The script's last step: ``INDEXER_RUNS`` of ``parca retrofit`` on the exported model, the second continuing
    the first, the last adapter copied to ``OUT/indexer``; a rerun skips finished runs."""
    import json

    from parca.checkpoint import load_model

    tok, tok_dir, model, _ = _tiny_stage_setup()
    out = tmp_path / "model"
    script.export(model, tok_dir, out)
    monkeypatch.setattr(script, "INDEXER_RUNS", [("a", 64, 2, 1, 8, 0, 1), ("b", 128, 1, 1, 16, 0, 1)])
    runs = script.retrofit_indexer(out, tmp_path / "indexer")
    assert [r["name"] for r in runs] == ["a", "b"] and [r["index_topk"] for r in runs] == [8, 16]
    cfg = json.loads((out / "indexer" / "indexer_config.json").read_text())
    assert cfg["index_topk"] == 16
    rec = json.loads((out / "indexer" / "training.json").read_text())
    assert rec["status"] == "done" and rec["seq_len"] == 128
    m = load_model(out, indexer=out / "indexer")  # refused if the adapter were made for other weights
    assert m.sparse_config.index_topk == 16
    stamp = (tmp_path / "indexer" / "a" / "indexer.safetensors").stat().st_mtime_ns
    again = script.retrofit_indexer(out, tmp_path / "indexer")
    assert [r["name"] for r in again] == ["a", "b"]
    assert (tmp_path / "indexer" / "a" / "indexer.safetensors").stat().st_mtime_ns == stamp  # skipped, not rerun
