"""The long-context quality runner: tasks dense vs sparse (artefacts, resume, user data), fidelity (recall, KL,
top-1, delta NLL, selection dumps) and perplexity, on tiny random models (CPU, seconds)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from parca.checkpoint import load_model, save_adapter
from parca.cli import main
from parca.config import SparseConfig
from parca.engine import Engine
from parca.evals import fidelity, load_user_data, perplexity, run_eval
from parca.evals.fidelity import RecallStats
from parca.evals.run import SampleStore
from parca.evals.userdata import parse_user_lines
from parca.errors import ParcaError
from parca.models.base import Layerview
from parca.sparse import attention_recall, head_summed_probs
from parca.tokenizer import Tokenizer

SC = dict(index_n_heads=2, index_head_dim=16, index_rope_dim=8)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matmuls gain nothing from threads, and on a shared 2-core box two spinning OpenMP threads made every
    forward ~20x slower; restore the session's setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _adapter(model_dir, out, topk):
    m = load_model(model_dir)
    m.add_indexers(SparseConfig(index_topk=topk, **SC), seed=0)
    save_adapter(m, out)
    return out


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """The conftest tiny llama (context 512; built alone here, not all six architectures of ``hf_dirs``) with a
    saved indexer adapter (k = 8)."""
    from conftest import hf_model, save_hf

    d = tmp_path_factory.mktemp("small")
    model_dir = save_hf(hf_model("llama"), d / "model")
    return model_dir, _adapter(model_dir, d / "adapter", 8)


@pytest.fixture(scope="module")
def small_model(small):
    m = load_model(small[0], indexer=small[1])
    return m, Tokenizer(small[0])


@pytest.fixture(scope="module")
def long_dirs(tmp_path_factory):
    """A tiny llama with a 2K context (the RULER tasks need ~600 tokens with the tiny byte-level tokenizer)
    whose EOS set is half the vocabulary, so greedy answers end within a token or two: the end-to-end run
    exercises prefill, decode, scoring and every artefact without 128-step decodes on a shared CPU."""
    from conftest import hf_model, save_hf

    d = tmp_path_factory.mktemp("long")
    model_dir = save_hf(hf_model("llama", max_position_embeddings=2048, eos_token_id=list(range(1, 300, 2))),
                        d / "model")
    return model_dir, _adapter(model_dir, d / "adapter", 64)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    from conftest import WORDS

    rng = random.Random(0)
    words = [rng.choice(WORDS) for _ in range(700)]
    p = tmp_path_factory.mktemp("text") / "doc.txt"
    p.write_text(" ".join(words) + ".\n")
    return p


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# ---- fidelity -------------------------------------------------------------------------------------------
def test_fidelity_topk_covering_context_is_exact(small_model, text_file):
    model, tok = small_model
    res = fidelity(model, tok, text_file, [256], index_topk=512, decode_window=8, progress=False)
    (entry,) = res["lengths"]
    assert entry["documents"] == 1
    for part in ("prefill", "decode"):
        rec, out = entry[part]["recall"], entry[part]["output"]["overall"]
        assert rec["mean"] == 1.0 and all(r["recall"] == 1.0 for r in rec["per_layer"])
        assert rec["positions"] == 0  # every query sees <= k keys: the selection is the full set
        assert out["kl"] < 1e-6 and out["kl_max"] < 1e-6
        assert out["top1"] == 1.0
        assert abs(out["delta_nll"]) < 1e-5
    assert entry["prefill"]["output"]["overall"]["tokens"] == 256
    assert entry["prefill"]["output"]["overall"]["nll_tokens"] == 255
    assert entry["decode"]["output"]["overall"]["tokens"] == 8
    assert entry["prefill"]["output"]["buckets"][0]["bucket"] == "0-4K"


def test_fidelity_small_topk_cli_and_selection_dump(capsys, small, text_file, tmp_path):
    model_dir, adapter = small
    out = tmp_path / "fid"
    code, stdout, err = run(capsys, "eval", "fidelity", "--model", model_dir, "--indexer", adapter, "--text", text_file,
                            "--lengths", "128,256", "--index-topk", "8", "--decode-window", "8", "--dump-selection", "1",
                            "--out", out, "--json", "--no-progress")
    assert code == 0, err
    res = json.loads(stdout)
    assert res["index_topk"] == 8
    for entry in res["lengths"]:
        length = entry["length"]
        pre = entry["prefill"]
        for r in pre["recall"]["per_layer"]:
            assert 0.0 <= r["recall"] <= 1.0 + 1e-6
            assert r["positions"] == length - 8  # queries t >= k only
        assert pre["recall"]["mean"] < 1.0  # a random indexer keeping 8 keys misses attention mass
        assert entry["decode"]["recall"]["positions"] == 8
        for part in ("prefill", "decode"):
            o = entry[part]["output"]["overall"]
            assert o["kl"] >= 0.0 and 0.0 <= o["top1"] <= 1.0
            assert all(b["kl"] is None or b["kl"] >= 0 for b in entry[part]["output"]["buckets"])
        assert pre["output"]["overall"]["kl"] > 1e-6  # k = 8 really changes the output
        npz = out / f"selection_layer1_{length}.npz"
        png = out / f"selection_layer1_{length}.png"
        assert npz.is_file() and png.is_file() and png.stat().st_size > 1000
        d = np.load(npz)
        assert d["selected"].shape == (length, 8) and d["dense_map"].shape == (min(256, length),) * 2
        sel, q = d["selected"], d["q_positions"]
        assert (sel <= q[:, None]).all()  # causal: a query never selects a later key
        assert ((sel >= 0).sum(1) == np.minimum(q + 1, 8)).all()
    assert (out / "fidelity.json").is_file()
    # the readable card
    code, stdout, _ = run(capsys, "eval", "fidelity", "--model", model_dir, "--indexer", adapter, "--text", text_file,
                          "--lengths", "128", "--decode-window", "4", "--no-progress")
    assert code == 0 and "recall" in stdout and "KL(d||s)" in stdout and "0-4K" in stdout
    # --dump-selection without --out, and a layer the model lacks
    code, _, err = run(capsys, "eval", "fidelity", "--model", model_dir, "--indexer", adapter, "--text", text_file,
                       "--dump-selection", "0")
    assert code == 2 and "--out" in err


def test_recall_chunking_matches_whole_matrix():
    """RecallStats (chunked, counted positions only) == attention_recall on the whole [T, T] probabilities."""
    g = torch.Generator().manual_seed(0)
    t, h, hkv, d, k = 40, 4, 2, 8, 6
    q, kk = torch.randn(1, t, h, d, generator=g), torch.randn(1, t, hkv, d, generator=g)
    pos = torch.arange(t)[None]
    pad = torch.nn.functional.pad
    picks = [torch.randperm(p + 1, generator=g)[:k] for p in range(t)]
    idx = torch.stack([pad(r, (0, k - len(r)), value=-1) for r in picks])[None]  # (1,T,k) distinct visible keys
    stats = RecallStats(1, row=0, max_chunk_bytes=1)  # one query row per chunk
    stats.observe(Layerview(layer=0, row=0, q=q, k=kk, q_pos=pos, scale=d**-0.5, idx=idx))
    whole = attention_recall(head_summed_probs(q, kk, pos, d**-0.5), idx)[0]
    expect = whole[k:].mean().item()
    got = stats.to_dict()["per_layer"][0]
    assert got["positions"] == t - k and abs(got["recall"] - expect) < 1e-6
    full_idx = torch.stack([pad(torch.arange(p + 1), (0, t - p - 1), value=-1) for p in range(t)])[None]
    assert torch.allclose(attention_recall(head_summed_probs(q, kk, pos, d**-0.5), full_idx), torch.ones(1, t))


# ---- the task runner --------------------------------------------------------------------------------------
def test_run_end_to_end_artefacts_and_resume(capsys, long_dirs, tmp_path, monkeypatch):
    model_dir, adapter = long_dirs
    out = tmp_path / "run"
    argv = ["eval", "--model", model_dir, "--indexer", adapter, "--tasks", "passkey,niah_single_1,vt",
            "--lengths", "640,768", "--samples", "1", "--depths", "25,75", "--out", out, "--no-progress"]
    code, stdout, err = run(capsys, *argv)
    assert code == 0, err
    assert "delta" in stdout and "niah_single_1" in stdout and "generated 24" in stdout
    res = json.loads((out / "results.json").read_text())
    rows = res["rows"]
    assert len(rows) == 3 * 2 * 2
    for r in rows:
        assert set(r) >= {"task", "length", "attention", "score", "samples"}
        assert 0.0 <= r["score"] <= 100.0 and r["samples"] == 2  # 2 depths x 1 sample
    assert {r["length"] for r in rows} == {640, 768} and {r["attention"] for r in rows} == {"dense", "sparse"}
    csv_lines = (out / "results.csv").read_text().strip().splitlines()
    assert csv_lines[0] == "task,length,attention,score,samples" and len(csv_lines) == 13
    for name in ("scores.png", "heatmap_dense.png", "heatmap_sparse.png"):
        assert (out / name).stat().st_size > 1000
    recs = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(recs) == 24
    # every prompt fits its budget: prompt + max_new_tokens <= length
    limits = {"passkey": 16, "niah_single_1": 128, "vt": 30}
    assert all(r["prompt_tokens"] + limits[r["task"]] <= r["length"] for r in recs)
    # same prompts in both modes
    by = {}
    for r in recs:
        by.setdefault((r["task"], r["length"], r["index"], r["depth"]), set()).add(r["prompt_tokens"])
    assert all(len(v) == 1 for v in by.values())

    # the second run finds every cell done: no generation at all, same rows
    calls = []
    real = Engine.generate
    monkeypatch.setattr(Engine, "generate", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    code, stdout, err = run(capsys, *argv)
    assert code == 0, err
    assert calls == [] and "generated 0, resumed 24" in stdout
    assert json.loads((out / "results.json").read_text())["rows"] == rows

    # an interrupted run (last record cut short) redoes exactly that cell
    lines = (out / "samples.jsonl").read_text().splitlines()
    (out / "samples.jsonl").write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20])
    code, stdout, err = run(capsys, *argv)
    assert code == 0 and len(calls) == 1 and "generated 1, resumed 23" in stdout
    assert len(SampleStore(out).records) == 24

    # a different seed in the same --out is refused
    code, _, err = run(capsys, *argv, "--seed", "1")
    assert code == 2 and "different run" in err


def test_dense_equals_sparse_scores_when_k_covers_context(small_model):
    model, tok = small_model
    res = run_eval(model, tok, tasks="passkey", lengths=[384], samples=2, index_topk=512, progress=False)
    dense = {r["index"]: r for r in res.records if r["attention"] == "dense"}
    sparse = {r["index"]: r for r in res.records if r["attention"] == "sparse"}
    assert len(dense) == len(sparse) == 2
    for i in dense:
        assert dense[i]["prediction"] == sparse[i]["prediction"]
        assert dense[i]["completion_tokens"] > 0
    scores = {r["attention"]: r["score"] for r in res.rows}
    assert scores["dense"] == scores["sparse"]
    assert "passkey" in res.table()


def test_lengths_beyond_context_refused(capsys, small):
    code, _, err = run(capsys, "eval", "--model", small[0], "--indexer", small[1], "--tasks", "passkey",
                       "--lengths", "256,1k")
    assert code == 2 and "1024" in err and "context of 512" in err
    # no --model: the shipped default model (context 32768) is used, and 64k is refused before any work
    code, _, err = run(capsys, "eval", "--tasks", "passkey", "--lengths", "64k")
    assert code == 2 and "context of 32768" in err
    code, _, err = run(capsys, "eval", "--model", small[0], "--indexer", small[1], "--tasks", "no_such_task",
                       "--lengths", "256")
    assert code == 2 and "unknown task" in err


# ---- user data --------------------------------------------------------------------------------------------
def test_user_data_runs_through_the_runner(small_model, tmp_path):
    model, tok = small_model
    from conftest import WORDS

    rows = [
        {"context": "the pass key is 7 and the log says cache", "question": "What is the pass key?", "answers": ["7"],
         "max_new_tokens": 8},
        {"context": " ".join(WORDS * 6), "question": "Which word comes first?", "answers": ["the", "a"],
         "id": "long", "max_new_tokens": 4},
    ]
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    res = run_eval(model, tok, lengths=[128, 256], data=data, out=tmp_path / "out", progress=False)
    assert res.tasks == ["user"]
    recs = sorted(res.records, key=lambda r: (r["index"], r["attention"]))
    assert len(recs) == 4 and {r["metric"] for r in recs} == {"match_part"}
    short, long_ = recs[0], recs[2]
    assert short["length"] == 128 and not short["truncated"]
    assert long_["length"] == 256 and long_["truncated"] and long_["prompt_tokens"] + 4 <= 256
    assert long_["id"] == "long" and long_["line"] == 2
    assert {(r["task"], r["length"]) for r in res.rows} == {("user", 128), ("user", 256)}
    assert all(r["samples"] == 1 for r in res.rows)
    assert (tmp_path / "out" / "results.csv").is_file()


def test_bad_user_data_reports_line_numbers(capsys, small, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join([
        json.dumps({"context": "c", "question": "q", "answers": ["a"]}),
        "{not json",
        json.dumps({"context": "c", "question": "q"}),
        "",
        json.dumps({"context": "c", "question": "q", "answers": "a"}),
    ]))
    with pytest.raises(ParcaError) as e:
        load_user_data(data)
    msg = str(e.value)
    assert "3 bad line(s)" in msg and "line 2" in msg and "line 3" in msg and "line 5" in msg and "line 1:" not in msg
    code, _, err = run(capsys, "eval", "--model", small[0], "--indexer", small[1], "--data", data, "--lengths", "256")
    assert code == 2 and "line 2" in err and "answers" in err
    with pytest.raises(ParcaError):
        parse_user_lines(["", "  "])


def test_sample_store_survives_a_cut_line(tmp_path):
    (tmp_path / "samples.jsonl").write_text(json.dumps({"task": "t", "length": 1, "attention": "dense", "index": 0,
                                                        "depth": None, "score": 1.0}) + "\n{\"task\": \"t\", \"len")
    store = SampleStore(tmp_path)
    assert len(store.records) == 1 and store.bad_lines == 1
    store.append({"task": "t", "length": 1, "attention": "sparse", "index": 0, "depth": None, "score": 0.0})
    assert len(SampleStore(tmp_path).records) == 2


# ---- perplexity -------------------------------------------------------------------------------------------
def test_perplexity_modes_dense_equals_sparse_when_k_covers(small_model, text_file):
    model, tok = small_model
    n_doc = len(tok.encode(text_file.read_text()))
    assert n_doc > 300
    tr = perplexity(model, tok, text_file, mode="truncate", lengths=[128, 256], index_topk=512, progress=False)
    assert {(r["length"], r["attention"]) for r in tr["rows"]} == {(128, "dense"), (128, "sparse"), (256, "dense"),
                                                                   (256, "sparse")}
    for length in (128, 256):
        d, s = (next(r for r in tr["rows"] if r["length"] == length and r["attention"] == a) for a in ("dense", "sparse"))
        assert d["tokens"] == length - 1 and abs(d["ppl"] - s["ppl"]) <= 1e-5 * d["ppl"]
    # truncate == a plain full forward's mean NLL
    ids = torch.tensor([tok.encode(text_file.read_text())[:128]])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).double(), -1)
    ref = -logp[0, :-1].gather(-1, ids[0, 1:, None]).mean().item()
    d128 = next(r for r in tr["rows"] if r["length"] == 128 and r["attention"] == "dense")
    assert abs(d128["nll"] - ref) < 1e-4
    st = perplexity(model, tok, text_file, mode="strided", window=128, stride=48, index_topk=512, progress=False)
    assert st["window"] == 128 and st["stride"] == 48 and "last S" in st["scored"]
    d, s = (next(r for r in st["rows"] if r["attention"] == a) for a in ("dense", "sparse"))
    assert d["tokens"] == n_doc - 1  # every token but the first scored exactly once
    assert abs(d["ppl"] - s["ppl"]) <= 1e-5 * d["ppl"]
    # a small k is measurably different but well-formed
    sm = perplexity(model, tok, text_file, mode="truncate", lengths=[256], index_topk=8, progress=False)
    d, s = (next(r for r in sm["rows"] if r["attention"] == a) for a in ("dense", "sparse"))
    assert s["ppl"] > 0 and abs(d["ppl"] - s["ppl"]) > 1e-6


def test_perplexity_cli(capsys, small, text_file):
    code, out, err = run(capsys, "eval", "ppl", "--model", small[0], "--indexer", small[1], "--text", text_file,
                         "--mode", "strided", "--window", "128", "--stride", "64", "--no-progress")
    assert code == 0, err
    assert "window" in out and "stride" in out and "BOS" in out and "sparse" in out
    code, out, err = run(capsys, "eval", "ppl", "--model", small[0], "--text", text_file, "--lengths", "128", "--json",
                         "--no-progress")
    assert code == 0, err
    res = json.loads(out)
    assert res["mode"] == "truncate" and [r["attention"] for r in res["rows"]] == ["dense"]


def test_bos_counts_toward_the_length_and_is_never_scored(small, small_model, text_file, tmp_path):
    """A tokenizer that adds BOS: prompts carry it within the budget; perplexity scores every text token once."""
    import shutil

    model, _ = small_model
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(small[0] / name, tok_dir / name)
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({**cfg, "add_bos_token": True}))
    tok = Tokenizer(tok_dir)
    assert tok.encode("x", add_special_tokens=True)[0] == tok.bos_id
    res = run_eval(model, tok, tasks="passkey", lengths=[306], samples=1, attentions="dense", progress=False)
    (rec,) = res.records
    assert rec["prompt_tokens"] + 16 <= 306 and "<s>" in res.config["bos"]
    n_doc = len(tok.encode(text_file.read_text()))
    st = perplexity(model, tok, text_file, mode="strided", window=128, stride=64, attentions="dense", progress=False)
    assert st["rows"][0]["tokens"] == n_doc  # BOS predicts the first token; BOS itself is never a target
    with pytest.raises(ParcaError, match="at least 291"):  # passkey needs 290 without BOS
        run_eval(model, tok, tasks="passkey", lengths=[288], samples=1, attentions="dense", progress=False)
