"""`parca retrofit`: the warm-up learns (KL down, recall up on held-out data), the chunked layer-by-layer
objective equals plain autograd, resume == uninterrupted, 2 gloo ranks == 1 rank, adapters round-trip and
merge, bad data is refused with the file named, and the CLI runs in-process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from parca import sparse as dsa
from parca.checkpoint import load_model
from parca.cli import main
from parca.config import SparseConfig
from parca.data import DataError, batch_indices, load_packed
from parca.errors import ConfigError, ParcaError
from parca.models.base import ForwardContext
from parca.tokenizer import Tokenizer
from parca.train import RetrofitConfig, evaluate_indexers, init_indexers, merge_adapter, retrofit
from parca.train.objective import TrainObserver

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(seq_len=128, index_topk=16, index_n_heads=2, eval_seqs=1, progress=False)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """conftest's tiny Llama (the very weights of ``hf_dirs['llama']``, seed 0), built alone: this file needs no
    other architecture."""
    from conftest import hf_model, save_hf

    return save_hf(hf_model("llama"), tmp_path_factory.mktemp("train") / "llama")


@pytest.fixture(scope="module")
def warm(llama, tmp_path_factory):
    """A 2-step warm-up adapter (derived init), shared by the tests that only need some adapter."""
    out = tmp_path_factory.mktemp("warm") / "adapter"
    retrofit(cfg(llama, out, steps=2))
    return out


def cfg(model, out, **kw) -> RetrofitConfig:
    base = dict(model=str(model), data=["synthetic"], out=str(out), steps=4, batch_size=2, save_every=0,
                eval_every=0, **SMALL)
    base.update(kw)
    return RetrofitConfig(**base)


def adapter_tensors(d) -> dict[str, torch.Tensor]:
    return load_file(str(Path(d) / "indexer.safetensors"))


# ---- learning -------------------------------------------------------------------------------------------
def test_warmup_lowers_kl_and_raises_recall(llama, tmp_path):
    """Random init, a few dozen warm-up steps: held-out KL falls and recall@16 rises (t >= k only)."""
    r = retrofit(cfg(llama, tmp_path / "a", init="random", index_head_dim=16, index_rope_dim=8, index_n_heads=4,
                     steps=24, batch_size=2, eval_every=12, eval_seqs=2))
    b, a = r["before"], r["after"]
    assert a["kl"] < 0.7 * b["kl"], (b["kl"], a["kl"])
    assert a["recall"] > b["recall"] + 0.01, (b["recall"], a["recall"])
    assert len(a["recall_per_layer"]) == 2 and a["positions"] == 2 * (128 - 16)
    lines = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    evals = [x["step"] for x in lines if x["event"] == "eval"]
    assert evals == [0, 12, 24] and sum(x["event"] == "train" for x in lines) == 24
    rec = json.loads((tmp_path / "a" / "training.json").read_text())
    assert rec["status"] == "done" and rec["steps"] == 24 and rec["tokens_seen"] == 24 * 2 * 128
    assert rec["base_model"]["fingerprint"] and rec["data"] == ["synthetic"] and rec["seed"] == 0
    assert rec["metrics"]["final"]["recall"] == pytest.approx(a["recall"])


def test_chunked_layerwise_objective_equals_autograd(llama):
    """The observer's per-layer, per-chunk gradients == autograd of the whole mean KL (tiny chunks too)."""
    m = load_model(llama)
    init_indexers(m, SparseConfig(index_n_heads=2, index_head_dim=16, index_topk=8, index_rope_dim=8), "random")
    for p in m.parameters():
        p.requires_grad_(False)
    params = [p for n, p in m.named_parameters() if ".indexer." in n]
    for p in params:
        p.requires_grad_(True)
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(0))
    ctx = dict(slots=[0, 1], starts=[0, 0])
    views = []
    with torch.no_grad():
        m(ids, None, ForwardContext(**ctx, observer=views.append))
    loss = 0.0
    for v in views:
        sc = dsa.index_scores(v.indexer.queries(v.x, v.index_cos, v.index_sin), v.indexer.head_weights(v.x),
                              v.indexer.keys(v.x, v.index_cos, v.index_sin), v.q_pos)
        loss = loss + dsa.indexer_kl(sc, dsa.head_summed_probs(v.q, v.k, v.q_pos, v.scale)) / len(views)
    ref = torch.autograd.grad(loss, params)
    for budget in (1 << 30, 3000):  # one chunk, and one query row per chunk
        obs = TrainObserver(n_layers=2, n_rows=2, chunk_bytes=budget)
        with torch.no_grad():
            m(ids, None, ForwardContext(**ctx, observer=obs))
        assert obs.kl_sum == pytest.approx(float(loss.detach()), rel=1e-5)
        for p, g in zip(params, ref):
            assert torch.allclose(obs.grads[p], g, atol=1e-7, rtol=1e-4)


def test_derived_init_beats_random_and_checks_shapes(llama):
    path = llama
    tok = Tokenizer(path)
    data = load_packed(["synthetic"], tok, 128, n_heldout=2)
    m = load_model(path)
    init_indexers(m, SparseConfig(index_n_heads=2, index_head_dim=16, index_topk=16, index_rope_dim=8), "random")
    rand = evaluate_indexers(m, data.heldout, 16)
    init_indexers(m, SparseConfig(index_n_heads=2, index_head_dim=16, index_topk=16, index_rope_dim=16), "derived",
                  calibration=data.train[:2])
    der = evaluate_indexers(m, data.heldout, 16)
    assert der["recall"] > rand["recall"] and der["kl"] < rand["kl"]
    attn = m.model.layers[0].self_attn
    assert torch.equal(attn.indexer.wq_b.weight[16:32], attn.q_proj.weight[32:48])  # head 1 of 2 <- head 2 of 4
    with pytest.raises(ConfigError, match="head_dim"):
        init_indexers(m, SparseConfig(index_n_heads=2, index_head_dim=8, index_topk=16, index_rope_dim=8), "derived")


# ---- checkpoints, resume, output safety -------------------------------------------------------------------
def test_resume_equals_uninterrupted(llama, tmp_path):
    path = llama
    full = retrofit(cfg(path, tmp_path / "full", steps=4, save_every=2, batch_size=1))
    retrofit(cfg(path, tmp_path / "part", steps=2, save_every=2, batch_size=1))
    resumed = retrofit(cfg(path, tmp_path / "part", steps=4, save_every=2, batch_size=1, resume=True))
    a, b = adapter_tensors(tmp_path / "full"), adapter_tensors(tmp_path / "part")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # bitwise
    assert resumed["tokens_seen"] == full["tokens_seen"] == 4 * 1 * 128
    assert resumed["before"] == full["before"]  # the pre-training eval is carried in the checkpoint
    steps = [json.loads(x)["step"] for x in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()
             if json.loads(x)["event"] == "train"]
    assert steps == list(range(1, 5))
    assert not [p for p in (tmp_path / "part").rglob("*.tmp")]  # atomic writes leave no temp files


def test_refuses_missing_checkpoint_and_foreign_runs(llama, warm, tmp_path):
    path = llama
    with pytest.raises(ParcaError, match="no checkpoint"):
        retrofit(cfg(path, tmp_path / "none", resume=True))
    with pytest.raises(ParcaError, match="already holds a run.*--resume"):
        retrofit(cfg(path, warm, steps=2))
    with pytest.raises(ParcaError, match="different run.*seed"):
        retrofit(cfg(path, warm, steps=4, seed=1, resume=True))
    # an adapter from `parca indexer init` is not clobbered either
    assert main(["indexer", "init", "--model", str(path), "--out", str(tmp_path / "ad"), "--index-n-heads", "2",
                 "--index-head-dim", "16"]) == 0
    with pytest.raises(ParcaError, match="already holds an adapter"):
        retrofit(cfg(path, tmp_path / "ad"))


@pytest.mark.slow
def test_kill_leaves_a_loadable_adapter_and_resume_works(llama, tmp_path):
    """SIGKILL a real run mid-training: the adapter on disk still loads, and --resume finishes the run."""
    path, out = llama, tmp_path / "killed"
    args = ["retrofit", "--model", str(path), "--data", "synthetic", "--out", str(out), "--seq-len", "128",
            "--index-topk", "16", "--index-n-heads", "2", "--batch-size", "1", "--eval-seqs", "1",
            "--eval-every", "0", "--save-every", "1", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "parca", *args, "--steps", "1000"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = out / "checkpoint" / "state.safetensors"
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not ckpt.exists():
            time.sleep(0.2)
        time.sleep(0.5)
        assert proc.poll() is None, "the run ended before it could be killed"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    m = load_model(path, indexer=out)  # whatever moment the kill hit, the adapter is whole
    assert m.has_indexers
    from parca.train.state import read_record

    done = read_record(ckpt)["step"]
    assert done >= 1
    assert main([*args, "--steps", str(done + 1), "--resume"]) == 0
    assert json.loads((out / "training.json").read_text())["steps"] == done + 1


# ---- distributed -------------------------------------------------------------------------------------------
def test_two_gloo_ranks_match_one_rank(llama, tmp_path):
    path = llama
    common = ["--model", str(path), "--data", "synthetic", "--seq-len", "128", "--index-topk", "16",
              "--index-n-heads", "2", "--batch-size", "2", "--steps", "2", "--eval-seqs", "1", "--eval-every", "0",
              "--save-every", "0", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "parca",
           "retrofit", *common, "--out", str(tmp_path / "ddp")]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    last = json.loads(res.stdout.strip().splitlines()[-1])
    assert last["world_size"] == 2 and last["steps"] == 2
    assert main(["retrofit", *common, "--out", str(tmp_path / "one")]) == 0
    a, b = adapter_tensors(tmp_path / "ddp"), adapter_tensors(tmp_path / "one")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), (k, (a[k] - b[k]).abs().max())
    assert json.loads((tmp_path / "ddp" / "training.json").read_text())["world_size"] == 2


def test_batch_not_divisible_by_ranks(llama, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")  # world 1: never touches torch.distributed
    from parca.train import loop

    monkeypatch.setattr(loop, "_dist_setup", lambda device: loop._Dist(rank=0, world=2))
    with pytest.raises(ConfigError, match="not divisible"):
        retrofit(cfg(llama, tmp_path / "x", batch_size=3))


# ---- adapters: round trip, merge, sparse stage, full checkpoint -------------------------------------------
def test_adapter_round_trip_and_merge(llama, warm, tmp_path):
    path = llama
    trained = adapter_tensors(warm)
    m = load_model(path, indexer=warm)
    assert m.sparse_config.index_topk == 16 and m.sparse_config.index_head_dim == 16  # derived: head_dim
    for k, v in m.indexer_state_dict().items():
        assert torch.equal(v, trained[k])
    merged = merge_adapter(path, warm, tmp_path / "merged")
    assert (merged / "tokenizer.json").is_file()
    m2 = load_model(merged)
    assert m2.has_indexers and m2.sparse_config == m.sparse_config
    ids = torch.randint(0, 300, (1, 48), generator=torch.Generator().manual_seed(3))
    sp = ForwardContext(slots=[0], starts=[0], modes=["sparse"], topks=[8])
    with torch.no_grad():
        assert torch.equal(m(ids, None, sp), m2(ids, None, ForwardContext(slots=[0], starts=[0], modes=["sparse"],
                                                                         topks=[8])))
    with pytest.raises(ParcaError, match="not an empty directory"):
        merge_adapter(path, warm, tmp_path / "merged")


def test_sparse_stage_frozen_and_train_model(llama, warm, tmp_path):
    path = llama
    r = retrofit(cfg(path, tmp_path / "sp", steps=1, stage="sparse", init=str(warm)))
    assert r["kind"] == "adapter" and r["init"].startswith("adapter:")
    before = adapter_tensors(warm)
    after = adapter_tensors(tmp_path / "sp")
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the selected-set KL does train
    base = load_model(path).state_dict()
    r = retrofit(cfg(path, tmp_path / "full", steps=2, stage="both", warmup_steps=1, train_model=True))
    assert r["kind"] == "checkpoint"
    m = load_model(tmp_path / "full")  # a full checkpoint with the indexers built in
    assert m.has_indexers and (tmp_path / "full" / "tokenizer.json").is_file()
    assert not torch.equal(m.state_dict()["model.layers.0.self_attn.q_proj.weight"],
                           base["model.layers.0.self_attn.q_proj.weight"])
    lines = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if x["event"] == "train"]
    assert [x["stage"] for x in train] == ["warmup", "sparse"] and train[1]["lm_loss"] > 0
    with pytest.raises(ConfigError, match="--stage sparse"):
        retrofit(cfg(path, tmp_path / "bad", train_model=True))


# ---- data ------------------------------------------------------------------------------------------------
def test_data_sources_and_errors(llama, tmp_path):
    tok = Tokenizer(llama)
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    text = "the needle is in the haystack and the key holds the value. " * 40
    (d / "a.txt").write_text(text)
    (d / "sub" / "b.md").write_text(text)
    (d / "sub" / "c.jsonl").write_text(json.dumps({"text": text}) + "\n\n" + json.dumps({"text": text}) + "\n")
    (d / "skip.bin").write_bytes(b"\x00\x01")  # not a text suffix: ignored inside directories
    data = load_packed([str(d)], tok, 64, n_heldout=2)
    assert data.documents == 4 and data.train.shape[1] == 64
    assert data.sources == sorted([str(d / "a.txt"), str(d / "sub" / "b.md"), str(d / "sub" / "c.jsonl")])
    n_eos = int((torch.cat([data.train, data.heldout]) == tok.eos_id).sum())
    assert 2 <= n_eos <= 4  # documents joined with EOS (the tail window is dropped)

    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(DataError, match="no text found"):
        load_packed([str(tmp_path / "empty.txt")], tok, 64)
    (tmp_path / "bin.txt").write_bytes(b"PK\x03\x04\x00\x00binary")
    with pytest.raises(DataError, match=r"bin\.txt: binary file"):
        load_packed([str(tmp_path / "bin.txt")], tok, 64)
    (tmp_path / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin\.txt: not UTF-8"):
        load_packed([str(tmp_path / "latin.txt")], tok, 64)
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: no 'text' field"):
        load_packed([str(tmp_path / "bad.jsonl")], tok, 64)
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\n\n{"text": \n')
    with pytest.raises(DataError, match=r"broken\.jsonl:3: not valid JSON"):
        load_packed([str(tmp_path / "broken.jsonl")], tok, 64)
    with pytest.raises(DataError, match="5 are needed"):
        load_packed([str(d / "a.txt")], tok, 512, n_heldout=4)
    with pytest.raises(DataError, match="no such file"):
        load_packed([str(tmp_path / "missing")], tok, 64)
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DataError, match="holds no"):
        load_packed([str(tmp_path / "nothing")], tok, 64)


def test_batch_order_is_a_function_of_step():
    """The data cursor: a resumed run reads exactly the windows an uninterrupted one would."""
    seq = [batch_indices(5, s, 3, seed=7) for s in range(4)]
    flat = [i for b in seq for i in b]
    assert sorted(flat[:5]) == list(range(5)) and sorted(flat[5:10]) == list(range(5))  # epochs are permutations
    assert batch_indices(5, 2, 3, seed=7) == seq[2] and batch_indices(5, 2, 3, seed=8) != seq[2]


# ---- CLI -------------------------------------------------------------------------------------------------
def test_cli_retrofit_then_generate_and_errors(llama, tmp_path, capsys):
    path = str(llama)
    out = tmp_path / "cli"
    argv = ["retrofit", "--model", path, "--data", "synthetic", "--out", str(out), "--seq-len", "128",
            "--index-topk", "16", "--index-n-heads", "2", "--steps", "3", "--batch-size", "1", "--eval-every", "2",
            "--eval-seqs", "1", "--save-every", "2"]
    assert main(argv) == 0
    o, e = capsys.readouterr()
    last = json.loads(o.strip().splitlines()[-1])  # ONE JSON line last
    assert "parca retrofit: adapter written" in o and "recall@16" in o
    assert last["steps"] == 3 and last["after"]["recall"] > 0 and last["kind"] == "adapter"
    assert "retrofit" in e  # the tqdm bar went to stderr
    for name in ("indexer.safetensors", "indexer_config.json", "training.json", "metrics.jsonl",
                 "checkpoint/state.safetensors"):
        assert (out / name).is_file(), name
    assert main(["generate", "--model", path, "--indexer", str(out), "--attention", "sparse", "--index-topk", "8",
                 "--prompt", "the key holds the value " * 4, "--max-new-tokens", "3", "--json"]) == 0
    assert json.loads(capsys.readouterr()[0])["attention"] == "sparse"

    def fails(*extra, match):
        assert main(["retrofit", "--model", path, "--out", str(tmp_path / "e"), *extra]) == 2
        err = capsys.readouterr()[1]
        assert "parca: error:" in err and match in err, err

    fails("--data", "synthetic", "--seq-len", "1024", match="beyond")
    fails("--data", "synthetic", "--seq-len", "128", "--index-topk", "128", match="smaller than --seq-len")
    (tmp_path / "bin.txt").write_bytes(b"\x00\x00\x00")
    fails("--data", str(tmp_path / "bin.txt"), "--seq-len", "64", match="bin.txt: binary file")
    (tmp_path / "e.jsonl").write_text('{"text": 5}\n')
    fails("--data", str(tmp_path / "e.jsonl"), "--seq-len", "64", match="e.jsonl:1:")
    fails("--data", "synthetic", "--seq-len", "128", "--init", "derived", "--index-head-dim", "8", match="head_dim")
    fails("--data", "synthetic", "--seq-len", "128", "--train-model", match="--stage sparse")
    assert not (tmp_path / "e").exists()  # nothing written on a refused run


def test_cli_indexer_init_derived_and_merge(capsys, hf_dirs, tmp_path):
    import json as _json

    from parca.checkpoint import load_model
    from parca.cli import main

    path = str(hf_dirs["llama"][0])
    assert main(["indexer", "init", "--model", path, "--out", str(tmp_path / "ad"), "--index-topk", "8"]) == 0
    assert "derived init" in capsys.readouterr().out
    meta = _json.loads((tmp_path / "ad" / "indexer_config.json").read_text())
    assert meta["init"] == "derived" and meta["index_head_dim"] == 16 == meta["index_rope_dim"]
    assert main(["indexer", "merge", "--model", path, "--indexer", str(tmp_path / "ad"), "--out", str(tmp_path / "m")]) == 0
    merged = load_model(tmp_path / "m")
    assert merged.sparse_config.index_topk == 8 and (tmp_path / "m" / "tokenizer.json").is_file()
    assert main(["indexer", "merge", "--model", path, "--indexer", str(tmp_path / "ad"), "--out", str(tmp_path / "m")]) == 2
