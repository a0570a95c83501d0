"""`parca bench`: the measured cost curve and the your-documents report, on tiny models (no timed assertions:
timings belong in benchmarks; here only that every artefact exists and the numbers are consistent)."""

from __future__ import annotations

import json
import math

import pytest

from conftest import hf_model, save_hf
from parca.bench import report
from parca.bench.curve import measure_curve, write_curve_report
from parca.bench.docs import normalise, read_documents, run_docs, write_docs_report
from parca.checkpoint import load_model, save_adapter
from parca.cli import main
from parca.config import SparseConfig
from parca.errors import ParcaError
from parca.tokenizer import Tokenizer

SC = dict(index_n_heads=2, index_head_dim=16, index_rope_dim=8)
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def long_dir(tmp_path_factory):
    """A tiny Llama with a 1024-token context, plus an indexer adapter (top-k 32)."""
    base = tmp_path_factory.mktemp("bench")
    path = save_hf(hf_model("llama", max_position_embeddings=1024), base / "llama1k")
    m = load_model(path)
    m.add_indexers(SparseConfig(index_topk=32, **SC), seed=0)
    save_adapter(m, base / "adapter")
    return path, base / "adapter"


def sparse_model(path, topk):
    m = load_model(path)
    m.add_indexers(SparseConfig(index_topk=topk, **SC), seed=0)
    return m


# ---- report helpers ---------------------------------------------------------------------------
def test_break_even_rules():
    pos = [1024, 2048, 4096, 8192]
    # crossover between 2K (ratio 1.2) and 4K (0.8): interpolated in log2 at the middle, 2^11.5
    be = report.break_even(pos, [1, 1, 1, 1], [1.1, 1.2, 0.8, 0.5])
    assert be["status"] == "crossover" and be["position"] == 4096
    assert be["interpolated"] == pytest.approx(2 ** 11.5)
    # a noisy dip at 1K does not count: sparse must stay cheaper at every later point
    assert report.break_even(pos, [1] * 4, [0.9, 1.1, 0.99, 0.7])["position"] == 8192
    assert report.break_even(pos, [1] * 4, [0.5] * 4)["status"] == "always"
    never = report.break_even(pos, [1] * 4, [1.0, 1.0, 0.99, 1.3])
    assert never["status"] == "never" and never["position"] is None
    assert "not reached up to 8K" in report.describe_break_even(never)
    assert [report.fmt_pos(p) for p in (100, 1024, 1536, 131072, 2**20)] == ["100", "1K", "1.5K", "128K", "1M"]


# ---- curve ----------------------------------------------------------------------------------
def test_curve_artefacts(long_dir, tmp_path):
    m = sparse_model(long_dir[0], 32)
    doc = measure_curve(m, [512, 64, 256], chunk=32, reps=1, warmup=1, price_per_hour=2.0, progress=False)
    paths = write_curve_report(doc, tmp_path / "out")
    for key in ("png", "markdown", "json"):
        assert (tmp_path / "out").joinpath(paths[key].rsplit("/", 1)[-1]).is_file()
    assert open(paths["png"], "rb").read(8) == PNG
    res = json.loads(open(paths["json"]).read())
    assert [r["position"] for r in res["rows"]] == [64, 256, 512]
    for r in res["rows"]:
        for ph in ("prefill", "decode"):
            for mode in ("dense", "sparse"):
                v = r[f"{ph}_{mode}"]
                assert v > 0 and math.isfinite(v)
                # $/M = seconds per token x price per second x 1e6
                assert v == pytest.approx(r[f"{ph}_{mode}_s"] * 2.0 / 3600 * 1e6)
            assert r[f"{ph}_ratio"] == pytest.approx(r[f"{ph}_sparse"] / r[f"{ph}_dense"])
        assert r["prefill_dense_s"] == pytest.approx(r["prefill_dense_step_s"] / 32)
        assert r["sparse_selects"]["decode"]  # every position is past k = 32
    assert res["price_per_hour"] == 2.0 and res["settings"]["index_topk"] == 32
    for key in ("cpu", "threads", "torch", "parca", "commit"):
        assert key in res["machine"]
    assert set(res["break_even"]) == {"prefill", "decode"} and res["longest"]["position"] == 512
    assert [r["position"] for r in res["analytic"]["rows"]] == [64, 256, 512]
    md = open(paths["markdown"]).read()
    assert "curve.png" in md and "| 512 |" in md and "break-even" in md


def test_curve_rejects_bad_input(long_dir):
    m = load_model(long_dir[0])
    with pytest.raises(ParcaError, match="indexers"):
        measure_curve(m, [64], chunk=8, progress=False)
    m.add_indexers(SparseConfig(index_topk=32, **SC), seed=0)
    with pytest.raises(ParcaError, match="context of 1,024"):
        measure_curve(m, [1000], chunk=32, progress=False)


# ---- docs -----------------------------------------------------------------------------------
WORDS = ("the contract clause says the party must pay the payment term after notice to the court and the record "
         "of the log shows an error in the request for the model token cost").split()


def text_of(n_words: int, shift: int = 0) -> str:
    return " ".join(WORDS[(i + shift) % len(WORDS)] for i in range(n_words))


@pytest.fixture
def docs_dir(tmp_path):
    d = tmp_path / "docs"
    d.mkdir()
    (d / "a_good.txt").write_text(text_of(60))
    (d / "b_long.md").write_text(text_of(400, 3))  # more tokens than the 512-token context: truncated
    (d / "c_lines.jsonl").write_text(json.dumps({"text": text_of(40, 5)}) + "\n"
                                     + "{not json\n" + json.dumps({"context": text_of(30, 7)}) + "\n")
    (d / "d_empty.txt").write_text("")
    (d / "e_blob.txt").write_bytes(bytes(range(256)) * 4)
    (d / "f_latin1.md").write_bytes("caf\xe9 au lait".encode("latin-1"))
    return d


def test_read_documents_names_every_skip(docs_dir):
    docs, skipped = read_documents(docs_dir)
    assert [d.name for d in docs] == ["a_good.txt", "b_long.md", "c_lines.jsonl:1", "c_lines.jsonl:3"]
    reasons = {s["name"]: s["reason"] for s in skipped}
    assert reasons["d_empty.txt"] == "empty"
    assert "binary" in reasons["e_blob.txt"]
    assert "UTF-8" in reasons["f_latin1.md"]
    assert "not valid JSON" in reasons["c_lines.jsonl:2"]
    assert normalise("  The Answer:  42!\n") == normalise("the answer 42") == "the answer 42"


def test_docs_report(hf_dirs, docs_dir, tmp_path):
    path = hf_dirs["llama"][0]
    m, tok = sparse_model(path, 16), Tokenizer(path)
    doc = run_docs(m, tok, docs_dir, max_new_tokens=4, price_per_hour=3.6, prefill_chunk=64, progress=False)
    paths = write_docs_report(doc, tmp_path / "out")
    res = json.loads(open(paths["json"]).read())
    assert [r["document"] for r in res["requests"]] == ["a_good.txt", "b_long.md", "c_lines.jsonl:1",
                                                        "c_lines.jsonl:3"]
    for r in res["requests"]:
        # billed prompt tokens = the tokenizer's count of the prompt sent (after truncation)
        assert r["prompt_tokens"] == len(tok.encode(r["prompt"], add_special_tokens=True))
        assert r["prompt_tokens"] <= 512 - 4
        for mode in ("dense", "sparse"):
            mt = r[mode]
            assert mt["attention"] == mode and mt["prompt_tokens"] == r["prompt_tokens"]
            assert mt["completion_tokens"] == len(mt["token_ids"]) <= 4
            assert mt["total_tokens"] == mt["prompt_tokens"] + mt["completion_tokens"]
            assert mt["cost_usd"] == pytest.approx((mt["prefill_s"] + mt["decode_s"]) * 3.6 / 3600)  # time x price
            assert 0 < mt["ttft_s"] <= mt["e2e_s"]
        assert r["agree_exact"] == (r["dense"]["token_ids"] == r["sparse"]["token_ids"])
    long = res["requests"][1]
    assert long["truncated"] and long["document_tokens"] > long["prompt_tokens"]
    assert not res["requests"][0]["truncated"]
    md = open(paths["markdown"]).read()
    for name in ("d_empty.txt", "e_blob.txt", "f_latin1.md", "c_lines.jsonl:2"):
        assert name in md
    line = res["summary"]["line"]
    assert line.startswith("at your lengths sparse saves ") and "prefill" in line and "decode" in line
    assert "break-even" in line and f"answers agreed in {res['summary']['agreed_exact']} of 4 requests" in line
    assert md.rstrip().endswith(line + ".")
    for key in ("png_cost", "png_latency", "png_savings"):
        assert open(paths[key], "rb").read(8) == PNG


# ---- CLI ------------------------------------------------------------------------------------
def test_cli_curve(long_dir, tmp_path, capsys):
    path, adapter = long_dir
    out = tmp_path / "curve"
    code = main(["bench", "curve", "--model", str(path), "--indexer", str(adapter), "--positions", "64,256",
                 "--chunk", "16", "--reps", "1", "--price-per-hour", "2", "--out", str(out), "--no-analytic",
                 "--no-progress"])
    stdout, _ = capsys.readouterr()
    assert code == 0
    assert "parca bench curve" in stdout and "break-even" in stdout
    last = json.loads(stdout.strip().splitlines()[-1])  # ONE JSON line last
    assert [r["position"] for r in last["rows"]] == [64, 256] and "analytic" not in last
    assert (out / "curve.png").is_file() and (out / "report.md").is_file() and (out / "results.json").is_file()
    # --json: stdout is the JSON line alone; a user mistake is a one-line error, exit 2
    code = main(["bench", "curve", "--model", str(path), "--random-indexer", "--index-topk", "32", "--positions",
                 "64", "--chunk", "8", "--reps", "1", "--out", str(out), "--no-analytic", "--no-progress", "--json"])
    stdout, err = capsys.readouterr()
    assert code == 0 and len(stdout.strip().splitlines()) == 1 and "parca bench curve" in err
    assert json.loads(stdout)["indexer_note"].startswith("random indexer")
    assert main(["bench", "curve", "--model", str(path), "--indexer", str(adapter), "--positions", "2k"]) == 2
    assert "context of 1,024" in capsys.readouterr().err
    # no --model: the shipped default model is used, and this adapter (made for the tiny model) is refused
    assert main(["bench", "curve", "--indexer", str(adapter)]) == 2
    assert "indexer adapter was made for a model with hidden_size=64" in capsys.readouterr().err


def test_cli_docs(hf_dirs, docs_dir, tmp_path, capsys):
    path = hf_dirs["llama"][0]
    m = sparse_model(path, 16)
    save_adapter(m, tmp_path / "adapter")
    out = tmp_path / "docs-out"
    argv = ["bench", "docs", "--docs", str(docs_dir), "--model", str(path), "--indexer", str(tmp_path / "adapter"),
            "--max-new-tokens", "3", "--question", "What is the payment term?", "--out", str(out), "--no-progress"]
    code = main(argv)
    stdout, _ = capsys.readouterr()
    assert code == 0
    assert "skipped e_blob.txt: binary" in stdout and "at your lengths sparse saves" in stdout
    last = json.loads(stdout.strip().splitlines()[-1])
    assert last["summary"]["documents"] == 4 and {s["name"] for s in last["skipped"]} >= {"d_empty.txt", "e_blob.txt"}
    assert (out / "report.md").is_file() and (out / "results.json").is_file() and (out / "cost.png").is_file()
    res = json.loads((out / "results.json").read_text())
    assert all(r["prompt"].endswith("Question: What is the payment term?\nAnswer:") for r in res["requests"])
    # a folder with nothing usable: a ParcaError naming the file, exit 2
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "empty.txt").write_text("  \n")
    assert main(["bench", "docs", "--docs", str(bad), "--model", str(path), "--indexer",
                 str(tmp_path / "adapter"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "no usable document" in err and "empty.txt: empty" in err
