"""`parca demo` end to end: on a tiny random model, and (the README's main command, shortened) on the shipped one."""

from __future__ import annotations

import json

from conftest import hf_model, save_hf
from parca.checkpoint import load_model, save_adapter
from parca.cli import main
from parca.config import SparseConfig


def test_demo_quick_writes_report(tmp_path, capsys):
    d = save_hf(hf_model("llama", max_position_embeddings=2048), tmp_path / "m")
    m = load_model(d)
    m.add_indexers(SparseConfig(index_n_heads=2, index_head_dim=16, index_topk=256, index_rope_dim=8), seed=0)
    save_adapter(m, d / "indexer")
    out = tmp_path / "demo"
    assert main(["demo", "--model", str(d), "--indexer", str(d / "indexer"), "--quick", "--context", "1k",
                 "--positions", "1k,2k", "--out", str(out), "--no-progress"]) == 0
    card = capsys.readouterr().out
    assert "pass key" in card and "decode $/M" in card
    doc = json.loads((out / "summary.json").read_text())
    assert [r["depth"] for r in doc["facts"]] == [20.0, 80.0]
    for r in doc["facts"]:
        assert r["prompt_tokens"] <= 1024 and r["dense"]["cost_usd"] > 0 and r["sparse"]["cost_usd"] > 0
    assert [r["position"] for r in doc["curve"]["rows"]] == [1024, 2048]
    assert (out / "report.md").read_text().startswith("# parca demo") and (out / "curve" / "curve.png").is_file()


def test_demo_quick_on_the_shipped_model(tmp_path, capsys):
    """The README's main command, shortened: default model and adapter, no --model given."""
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--context", "1k", "--positions", "1k,2k", "--out", str(out), "--no-progress"]) == 0
    doc = json.loads((out / "summary.json").read_text())
    assert doc["model"].endswith("default") and doc["indexer"].endswith("indexer") and doc["index_topk"] == 2048
    assert (out / "report.md").is_file() and len(doc["facts"]) == 2
    for r in doc["facts"]:  # it retrieves (k = 2048 covers a 1K document, so sparse attends to every key too)
        assert r["dense"]["correct"] and r["sparse"]["correct"], r
