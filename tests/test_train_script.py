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
    # what the card states: no induction head (attention to the target stays near uniform)
    assert max(max(v["induction"]) for v in res.values()) < 0.05


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
    with pytest.raises(SystemExit):
        mod.main(["--steps", "1", "--vocab8k", "--alpha", "9000"])  # more symbols than output classes
