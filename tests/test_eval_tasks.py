"""Shared test matrix for every eval task (parca/evals/tasks), plus scorers, lengths and data files.

Every registered task goes through the same checks, so a new task file is covered by adding it to the
registry (see parca/evals/ADDING_A_TASK.md). Two tokenizers: a word/punctuation tokenizer defined here
and a small byte-level BPE trained here on the shipped prose with the ``tokenizers`` library.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from importlib import resources

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from parca.evals import (
    TASKS,
    EvalError,
    Sample,
    first_integer,
    get_task,
    match_all,
    match_part,
    parse_length,
    passkey_match,
    score,
)
from parca.evals.haystack import NOISE, fit_to_budget, insert_at_depths, load_words, prose_text
from parca.evals.tasks.cwe import composition
from parca.evals.tasks.fwe import DOTS, zipf_counts

EXPECTED_TASKS = {
    "niah_single_1",
    "niah_single_2",
    "niah_single_3",
    "niah_multikey_1",
    "niah_multikey_2",
    "niah_multikey_3",
    "niah_multivalue",
    "niah_multiquery",
    "vt",
    "cwe",
    "fwe",
    "passkey",
}
ALL = sorted(TASKS)
WITH_DEPTH = sorted(n for n, t in TASKS.items() if t.has_depth)
HAY_SENTENCE_END = re.compile(r"""[.!?]['")\]]*(?=\s|$)|\n[ \t]*\n""")
SENTENCE_END = re.compile(r"""([.!?]['")\]]*\s*|\n[ \t]*\n)$""")


class WordTokenizer:
    """Words and single punctuation marks are tokens; ids are assigned on first sight."""

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}
        self.inverse: list[str] = []
        self.calls = 0

    def encode(self, text: str) -> list[int]:
        self.calls += 1
        ids = []
        for piece in re.findall(r"\w+|[^\w\s]", text):
            if piece not in self.vocab:
                self.vocab[piece] = len(self.inverse)
                self.inverse.append(piece)
            ids.append(self.vocab[piece])
        return ids

    def decode(self, ids: list[int]) -> str:
        return " ".join(self.inverse[i] for i in ids)


class BPETokenizer:
    """A byte-level BPE (vocab 1000) trained on 300 KB of the shipped prose; counts encode calls."""

    def __init__(self) -> None:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=1000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
        )
        tok.train_from_iterator([prose_text()[:300_000]], trainer)
        self.tok = tok
        self.calls = 0

    def encode(self, text: str) -> list[int]:
        self.calls += 1
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)


@pytest.fixture(scope="session")
def bpe() -> BPETokenizer:
    return BPETokenizer()


@pytest.fixture(scope="session")
def words() -> WordTokenizer:
    return WordTokenizer()


def _tokenizer(request: pytest.FixtureRequest, kind: str):
    return request.getfixturevalue(kind)


def _depth_arg(name: str, depth: float = 37.0) -> float | None:
    return depth if TASKS[name].has_depth else None


# ---------------------------------------------------------------------------------------------
# registry


def test_registry_has_the_contract_tasks():
    assert set(TASKS) == EXPECTED_TASKS
    for name, spec in TASKS.items():
        assert get_task(name) is spec
        assert spec.name == name
        assert spec.metric in ("match_all", "match_part", "passkey")
        assert spec.max_new_tokens > 0
    assert TASKS["passkey"].metric == "passkey"
    assert not TASKS["cwe"].has_depth and not TASKS["fwe"].has_depth


def test_unknown_task_is_a_value_error_listing_names():
    with pytest.raises(ValueError, match="niah_single_1"):
        get_task("niah_single_9")


# ---------------------------------------------------------------------------------------------
# the shared matrix: budget, answers present, prompt shape


def _check_sample(s: Sample, tok, length: int) -> None:
    spec = TASKS[s.task]
    total = len(tok.encode(s.prompt)) + s.max_new_tokens
    assert total <= length, f"{s.task}@{length}: {total} tokens exceeds the budget"
    assert total >= 0.98 * length, f"{s.task}@{length}: {total} tokens is more than 2% under the budget"
    assert s.meta["prompt_tokens"] == total - s.max_new_tokens
    assert s.length == length and s.metric == spec.metric and s.max_new_tokens == spec.max_new_tokens
    assert s.context and s.context in s.prompt
    assert s.prompt.index(s.context) > 0, "the instruction comes first"
    tail = s.prompt[s.prompt.index(s.context) + len(s.context) :]
    assert "?" in tail, "a question follows the context"
    last_line = s.prompt.rsplit("\n", 1)[-1]
    assert last_line.strip() and not last_line.endswith(" "), "the answer prefix is the last thing"
    assert s.answers and all(isinstance(a, str) and a for a in s.answers)
    for a in s.answers:
        assert a in s.context, f"{s.task}: answer {a!r} not in the context"
    if spec.has_depth:
        assert s.depth is not None and 0.0 <= s.depth <= 100.0
    else:
        assert s.depth is None
    json.dumps(s.to_dict())


@pytest.mark.parametrize("length", [1024, 4096, 8192])
@pytest.mark.parametrize("kind", ["words", "bpe"])
@pytest.mark.parametrize("name", ALL)
def test_matrix_budget_and_answers(request, name, kind, length):
    tok = _tokenizer(request, kind)
    s = get_task(name).generate(tok, length, seed=11, index=length % 7, depth=_depth_arg(name))
    _check_sample(s, tok, length)


@pytest.mark.parametrize("name", ALL)
def test_deterministic_under_seed_index_depth(words, name):
    spec = get_task(name)
    a = spec.generate(words, 2048, seed=5, index=3, depth=_depth_arg(name, 61.5))
    b = spec.generate(words, 2048, seed=5, index=3, depth=_depth_arg(name, 61.5))
    assert a.to_dict() == b.to_dict()
    c = spec.generate(words, 2048, seed=5, index=4, depth=_depth_arg(name, 61.5))
    d = spec.generate(words, 2048, seed=6, index=3, depth=_depth_arg(name, 61.5))
    assert c.prompt != a.prompt and d.prompt != a.prompt
    assert c.answers != a.answers and d.answers != a.answers
    # Keys and values do not depend on the length: a length sweep varies only the hay.
    e = spec.generate(words, 4096, seed=5, index=3, depth=_depth_arg(name, 61.5))
    assert e.answers == a.answers
    # An unset depth is drawn from the seed, reproducibly.
    if spec.has_depth:
        f = spec.generate(words, 2048, seed=5, index=3)
        g = spec.generate(words, 2048, seed=5, index=3)
        assert f.to_dict() == g.to_dict() and f.depth is not None


def test_global_rng_untouched(words):
    import random

    random.seed(1234)
    expected = random.random()
    random.seed(1234)
    get_task("niah_multikey_2").generate(words, 2048, seed=1, index=1)
    get_task("cwe").generate(words, 2048, seed=1, index=1)
    assert random.random() == expected


# ---------------------------------------------------------------------------------------------
# depth


def _strip_needles(context: str, needles: list[dict]) -> str:
    """The haystack without its needles (each was inserted with one space beside it)."""
    hay = context
    for n in sorted(needles, key=lambda n: -n["char_offset"]):
        o, end = n["char_offset"], n["char_offset"] + len(n["text"])
        assert hay[o:end] == n["text"]
        if end < len(hay) and hay[end] == " " and (o == 0 or hay[o - 1].isspace()):
            hay = hay[:o] + hay[end + 1 :]
        elif o > 0 and hay[o - 1] == " ":
            hay = hay[: o - 1] + hay[end:]
        else:
            hay = hay[:o] + hay[end:]
    return hay


def _first_answer_needle(s: Sample) -> dict:
    return next(n for n in s.meta["needles"] if n["role"] == "answer")


@pytest.mark.parametrize("depth", [0.0, 10.0, 50.0, 90.0, 100.0])
@pytest.mark.parametrize("name", WITH_DEPTH)
def test_needle_sits_at_requested_depth(words, name, depth):
    s = get_task(name).generate(words, 4096, seed=2, index=1, depth=depth)
    assert s.depth == pytest.approx(depth)
    nd = _first_answer_needle(s)
    off = nd["char_offset"]
    assert s.context[off:].startswith(nd["text"])
    if s.meta.get("haystack") == "needles":
        lines = [line for line in s.context.split("\n") if line.startswith("One of the special magic")]
        row = lines.index(nd["text"])
        assert abs(100.0 * row / (len(lines) - 1) - depth) <= 5.0
        return
    # Where it sits: right after a sentence end (or at the very start) ...
    before = s.context[:off]
    assert off == 0 or SENTENCE_END.search(before), f"needle not at a sentence start: ...{before[-40:]!r}"
    # ... and that sentence end is the last one before the requested position of the bare haystack.
    hay = _strip_needles(s.context, s.meta["needles"])
    hay_pos = off - sum(len(n["text"]) + 1 for n in s.meta["needles"] if n["char_offset"] < off)
    pos = round(len(hay) * depth / 100.0)
    assert hay_pos <= pos + 1
    later = [m for m in HAY_SENTENCE_END.finditer(hay, hay_pos, pos) if hay_pos < m.end() <= pos]
    assert not later, f"a later sentence end before the requested depth: {hay[hay_pos:pos][-80:]!r}"
    if name in ("niah_single_1", "passkey", "vt"):  # noise sentences are short: moved back by at most one
        assert pos - hay_pos <= max(len(x) for x in NOISE.split(". ")) + 2
    assert 0 <= nd["token_offset"] <= s.meta["prompt_tokens"]


def test_multi_needle_layout(words):
    s = get_task("niah_multivalue").generate(words, 4096, seed=3, index=0, depth=20.0)
    depths = [n["depth"] for n in s.meta["needles"] if n["role"] == "answer"]
    assert len(depths) == 4 and depths == sorted(depths)
    assert depths[0] == pytest.approx(20.0, abs=10) and depths[-1] == pytest.approx(80.0, abs=10)
    vt = get_task("vt").generate(words, 4096, seed=3, index=0, depth=30.0)
    offsets = [n["char_offset"] for n in vt.meta["needles"]]
    assert offsets == sorted(offsets), "the chain appears in order"


# ---------------------------------------------------------------------------------------------
# per-family content


@pytest.mark.parametrize("name", [n for n in ALL if n.startswith("niah")])
def test_niah_needles(words, name):
    s = get_task(name).generate(words, 4096, seed=7, index=2, depth=40.0)
    keys = s.meta["keys"]
    question = s.prompt[s.prompt.index(s.context) + len(s.context) :]
    for k in keys:
        assert k in question and s.context.count(f" for {k} is: ") == (4 if name == "niah_multivalue" else 1)
    answer_needles = [n["text"] for n in s.meta["needles"] if n["role"] == "answer"]
    assert len(answer_needles) == len(s.answers)
    for a, text in zip(s.answers, answer_needles):
        assert text.endswith(f" is: {a}.") and text.startswith("One of the special magic ")
    expected = {"niah_multivalue": 4, "niah_multiquery": 4}.get(name, 1)
    assert len(s.answers) == expected == len(set(s.answers))
    if "uuid" in s.prompt.lower() or name == "niah_single_3":
        assert all(re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", a) for a in s.answers)
    else:
        assert all(re.fullmatch(r"[1-9]\d{6}", a) for a in s.answers)
    if name in ("niah_multikey_2", "niah_multikey_3"):
        lines = [ln for ln in s.context.split("\n") if ln.startswith("One of the special magic")]
        assert len(lines) > 20, "the haystack is made of distractor needles"
        assert len({ln.split(" is: ")[0] for ln in lines}) == len(lines), "distractor keys are distinct"
    if name in ("niah_single_1",):
        assert "special magic" not in s.context.replace(answer_needles[0], "")
    if name == "niah_multikey_1":
        assert len(s.meta["needles"]) == 4


def test_vt_chain(words):
    s = get_task("vt").generate(words, 4096, seed=1, index=9, depth=15.0)
    names, value = s.answers, s.meta["value"]
    assert len(names) == 5 and len(set(names)) == 5
    assert all(re.fullmatch(r"[A-Z]{5}", n) for n in names)
    assert f"VAR {names[0]} = {value}." in s.context
    for a, b in zip(names, names[1:]):
        assert f"VAR {b} = VAR {a}." in s.context
    assert value in s.prompt.rsplit("\n", 2)[-1]


@pytest.mark.parametrize("length", [1024, 8192])
def test_cwe_answers_are_the_most_common(words, length):
    s = get_task("cwe").generate(words, length, seed=4, index=0)
    entries = [line.split(". ", 1)[1] for line in s.context.split("\n")]
    assert [line.split(". ", 1)[0] for line in s.context.split("\n")] == [str(i) for i in range(1, len(entries) + 1)]
    counts = Counter(entries)
    top = counts.most_common()
    assert {w for w, _ in top[:10]} == set(s.answers) and len(s.answers) == 10
    assert top[9][1] > top[10][1], "a strict gap after the 10 common words"
    pool = load_words("common_words")
    for a in s.answers:
        assert not any(a != w and a in w for w in pool), f"{a!r} is part of another pool word"


def test_cwe_composition_scales():
    pool = 1200
    for n in [40, 100, 500, 2000, 20000, 60000]:
        c, u, k = composition(n, pool)
        assert c > u and k <= pool and 10 * c + (k - 1) * u < n <= 10 * c + k * u


@pytest.mark.parametrize("length", [1024, 8192])
def test_fwe_answers_are_the_most_frequent(words, length):
    s = get_task("fwe").generate(words, length, seed=4, index=0)
    counts = Counter(s.context.split())
    assert counts.most_common(1)[0][0] == DOTS
    ranked = [w for w, _ in counts.most_common() if w != DOTS]
    assert ranked[:3] == s.answers
    assert counts[ranked[2]] > counts[ranked[3]]
    assert all(re.fullmatch(r"[a-z]{6}", w) for w in ranked)


def test_zipf_counts_strict():
    for n in [60, 100, 1000, 30000]:
        c = zipf_counts(n)
        assert sum(c) == n and all(a > b for a, b in zip(c[:5], c[1:5]))


def test_passkey(words):
    s = get_task("passkey").generate(words, 4096, seed=0, index=0, depth=50.0)
    key = s.answers[0]
    assert 1 <= int(key) <= 50000
    assert f"The pass key is {key}. Remember it. {key} is the pass key." in s.context
    assert s.prompt.endswith("What is the pass key? The pass key is")
    assert score("passkey", f" {key}. The rest is noise 999.", s.answers) == 1.0


# ---------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize("name", ALL)
def test_too_small_length_is_a_clear_value_error(words, name):
    spec = get_task(name)
    with pytest.raises(ValueError, match="too small"):
        spec.generate(words, spec.max_new_tokens, seed=0, index=0)
    length = spec.max_new_tokens + 30
    with pytest.raises(ValueError, match=rf"{name}: length {length} is too small.*at least \d+"):
        spec.generate(words, length, seed=0, index=0)


def test_bad_depth(words):
    with pytest.raises(ValueError, match="depth"):
        get_task("niah_single_1").generate(words, 2048, depth=101.0)
    with pytest.raises(ValueError, match="cwe has no needle depth"):
        get_task("cwe").generate(words, 2048, depth=50.0)
    assert issubclass(EvalError, ValueError)


def test_parse_length():
    assert parse_length("4k") == 4096
    assert parse_length("128K") == 131072
    assert parse_length(" 32k ") == 32768
    assert parse_length("1m") == 1048576
    assert parse_length("1.5k") == 1536
    assert parse_length("4096") == 4096
    assert parse_length(4096) == 4096
    for bad in ["4q", "", "k", "-1", "0", "4.1234k", "four", 0, -5, 4.5, None, True]:
        with pytest.raises(ValueError, match=re.escape(repr(bad))):
            parse_length(bad)  # type: ignore[arg-type]


def test_generate_accepts_length_strings(words):
    s = get_task("passkey").generate(words, "2k", seed=0, index=0)
    assert s.length == 2048


# ---------------------------------------------------------------------------------------------
# scoring


def test_match_all():
    answers = ["1234567", "7654321", "Quiet-River", "abc"]
    assert match_all("", answers) == 0.0
    assert match_all("The numbers are 1234567 and 7654321, quiet-river ABC.", answers) == 1.0
    assert match_all("1234567 and 7654321", answers) == 0.5
    assert match_all("12345678", ["1234567"]) == 1.0  # RULER's substring rule
    assert score("match_all", "THE QUIET-RIVER", ["quiet-river"]) == 1.0


def test_match_part():
    assert match_part("", ["a", "b"]) == 0.0
    assert match_part("I believe it is Paris.", ["london", "paris"]) == 1.0
    assert match_part("Rome", ["london", "paris"]) == 0.0
    assert score("match_part", "PARIS", ["paris"]) == 1.0


def test_passkey_scoring():
    assert passkey_match("", ["12345"]) == 0.0
    assert passkey_match("12345", ["12345"]) == 1.0
    assert passkey_match(" 12345. Remember it.", ["12345"]) == 1.0
    assert passkey_match("The pass key is 12345 and 67890", ["12345"]) == 1.0
    assert passkey_match("I think 42, no wait, 12345", ["12345"]) == 0.0  # only the first integer counts
    assert passkey_match("12,345", ["12345"]) == 1.0
    assert passkey_match("123456", ["12345"]) == 0.0
    assert passkey_match("no digits here", ["7"]) == 0.0
    assert first_integer("abc 0042 x") == 42 and first_integer("none") is None


def test_score_errors():
    with pytest.raises(ValueError, match="unknown metric 'bleu'.*match_all"):
        score("bleu", "x", ["x"])
    with pytest.raises(ValueError, match="answers"):
        score("match_all", "x", [])
    with pytest.raises(ValueError, match="answers"):
        score("match_all", "x", "x")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# sizing machinery


def test_sizing_is_frugal_with_encodes(bpe):
    for name in ["niah_single_2", "niah_multikey_3", "cwe", "vt"]:
        bpe.calls = 0
        s = get_task(name).generate(bpe, 32768, seed=0, index=0)
        total = len(bpe.encode(s.prompt)) + s.max_new_tokens
        assert 0.98 * 32768 <= total <= 32768
        assert bpe.calls - 1 == s.meta["encodes"] <= 12, f"{name}: {s.meta['encodes']} encodes"


@settings(max_examples=60, deadline=None)
@given(
    per_unit=st.integers(1, 40),
    fixed=st.integers(0, 500),
    budget=st.integers(600, 50_000),
    jitter=st.integers(0, 3),
)
def test_fit_to_budget_lands_in_window(per_unit, fixed, budget, jitter):
    def count(text: str) -> int:
        n = int(text)
        return fixed + per_unit * n + (n * 7919 % (jitter + 1))

    slack = max(1, budget // 100)
    fit = fit_to_budget(str, count, budget, n_min=1, slack=slack, probe=64)
    assert fit.tokens <= budget
    if per_unit + jitter <= slack:
        assert fit.tokens >= budget - slack
    else:  # units coarser than the window: the largest n that fits
        assert count(str(fit.n + 1)) > budget or fit.tokens >= budget - slack
    assert fit.encodes <= 40


@settings(max_examples=60, deadline=None)
@given(
    sentences=st.lists(st.text(alphabet="abc ,", min_size=1, max_size=30), min_size=1, max_size=30),
    depth=st.floats(0, 100),
)
def test_insert_at_depths_snaps_back_to_a_sentence_end(sentences, depth):
    hay = " ".join(s.strip() + "." for s in sentences)
    out = insert_at_depths(hay, [(depth, "NEEDLE.")])
    off = out.index("NEEDLE.")
    assert off <= round(len(hay) * depth / 100.0) + 1
    assert off == 0 or out[:off].rstrip().endswith(".")
    assert out.replace(" NEEDLE.", "", 1).replace("NEEDLE. ", "", 1) == hay or out.replace("NEEDLE.", "", 1) == hay


# ---------------------------------------------------------------------------------------------
# shipped data


def test_shipped_data_files():
    data = resources.files("parca.evals").joinpath("data")
    prose = data.joinpath("prose.txt").read_bytes()
    assert len(prose) <= 1_500_000
    text = prose.decode("utf-8")
    header = text.split("\n", 1)[0]
    assert header.startswith("#") and "public domain" in header.lower()
    assert len(prose_text().split()) > 150_000
    assert len(load_words("adjectives")) >= 100 and len(load_words("nouns")) >= 150
    assert len(load_words("common_words")) >= 500
    readme = data.joinpath("README.md").read_text(encoding="utf-8")
    for name in ["prose.txt", "adjectives.txt", "nouns.txt", "common_words.txt"]:
        assert name in readme
        assert data.joinpath(name).read_text(encoding="utf-8").startswith("# ")
