"""parca.documents: the one reader behind --data (retrofit), --text (fidelity) and --docs (bench docs)."""

from __future__ import annotations

import json

import pytest

from parca.bench.docs import read_documents as bench_read
from parca.data import DataError, read_documents as data_read
from parca.documents import DocumentError, read_documents
from parca.evals.fidelity import load_texts
from parca.evals.haystack import EvalError


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "docs"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("alpha text", encoding="utf-8")
    (d / "sub" / "b.md").write_bytes("\ufeffbeta with a BOM".encode("utf-8"))
    (d / "c.jsonl").write_text("\n".join([json.dumps({"text": "one"}), "", json.dumps({"context": "two"}),
                                          json.dumps({"text": "  "})]) + "\n", encoding="utf-8")
    (d / ".hidden.txt").write_text("never read", encoding="utf-8")
    (d / ".git").mkdir()
    (d / ".git" / "x.txt").write_text("never read", encoding="utf-8")
    (d / "empty.txt").write_text("\n  \n", encoding="utf-8")
    (d / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00")
    return d


def test_folder_order_names_fields_and_skips(folder):
    docs, skipped = read_documents(folder, strict=False)
    assert [(d.name, d.text) for d in docs] == [
        ("a.txt", "alpha text"), ("c.jsonl:1", "one"), ("c.jsonl:3", "two"), ("sub/b.md", "beta with a BOM")]
    reasons = {s.name: s.reason for s in skipped}
    assert reasons["c.jsonl:4"] == "empty 'text'"
    assert reasons["empty.txt"] == "empty"
    assert reasons["image.png"].startswith("unsupported file type .png")
    assert not any("hidden" in s.name or ".git" in s.name for s in skipped)


def test_strict_raises_naming_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "x"}) + "\n", encoding="utf-8")
    with pytest.raises(DocumentError, match=r"--data .*bad\.jsonl:2: no 'text' field"):
        read_documents(bad)
    broken = tmp_path / "broken.jsonl"
    broken.write_text("{not json\n", encoding="utf-8")
    with pytest.raises(EvalError, match=r"--text .*broken\.jsonl:1: not valid JSON"):
        read_documents(broken, flag="--text", error_cls=EvalError)
    binary = tmp_path / "blob.txt"
    binary.write_bytes(b"abc\x00def")
    with pytest.raises(DocumentError, match="blob.txt: binary file"):
        read_documents(binary)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DocumentError, match="latin.txt: not UTF-8 text"):
        read_documents(latin)


def test_lenient_lists_what_strict_raises(tmp_path):
    (tmp_path / "good.txt").write_text("fine", encoding="utf-8")
    (tmp_path / "blob.txt").write_bytes(b"\x00\x01")
    (tmp_path / "lines.jsonl").write_text('{"text": "x"}\n[1, 2]\n', encoding="utf-8")
    docs, skipped = read_documents(tmp_path, strict=False)
    assert [d.name for d in docs] == ["good.txt", "lines.jsonl:1"]
    assert {s.name for s in skipped} == {"blob.txt", "lines.jsonl:2"}
    with pytest.raises(DocumentError):
        read_documents(tmp_path, strict=True)


def test_missing_path_and_textless_folder(tmp_path):
    with pytest.raises(DocumentError, match="no such file or directory"):
        read_documents(tmp_path / "nope", strict=False)
    (tmp_path / "only.bin").write_bytes(b"\x00")
    with pytest.raises(DocumentError, match="folder holds no"):
        read_documents(tmp_path)
    docs, skipped = read_documents(tmp_path, strict=False)  # lenient: listed, the caller decides
    assert docs == [] and [s.name for s in skipped] == ["only.bin"]


def test_the_three_callers_agree_on_the_same_folder(folder):
    """retrofit, fidelity and bench docs read the same documents from one folder (their policies differ)."""
    texts = {d.text for d in read_documents(folder, strict=False)[0]}
    assert {t for _, t in data_read([folder])} == texts  # the unsupported .png is ignored, not fatal, here too
    assert {t for _, t in load_texts(folder)} == texts
    assert {d.text for d in bench_read(folder)[0]} == texts
    (folder / "blob.txt").write_bytes(b"\x00\x00")
    with pytest.raises(DataError, match="blob.txt: binary"):
        list(data_read([folder]))
    with pytest.raises(EvalError, match="blob.txt: binary"):
        load_texts(folder)
    assert "blob.txt" in {s["name"] for s in bench_read(folder)[1]}
