"""Offline long-context evaluation tasks (RULER-style, passkey, needle heatmap) and their scoring.

    from parca.evals import get_task, score, parse_length
    sample = get_task("niah_single_2").generate(tokenizer, parse_length("32k"), seed=0, index=3, depth=50.0)
    output = model_generate(sample.prompt, max_new_tokens=sample.max_new_tokens)   # greedy
    value = score(sample.metric, output, sample.answers)                         # 0..1

``length`` is the whole budget: ``len(tokenizer.encode(sample.prompt)) + sample.max_new_tokens`` lands
within 1% under it (never over). Everything ships with the package; nothing is downloaded.
"""

from parca.evals.haystack import EvalError, Tokenizer, count_tokens
from parca.evals.scoring import first_integer, match_all, match_part, passkey_match, score
from parca.evals.tasks import RULER_TASKS, TASKS, get_task, register_task
from parca.evals.tasks.base import Sample, TaskSpec, parse_length

__all__ = [
    "EvalError",
    "RULER_TASKS",
    "Sample",
    "TASKS",
    "TaskSpec",
    "Tokenizer",
    "count_tokens",
    "first_integer",
    "get_task",
    "match_all",
    "match_part",
    "parse_length",
    "passkey_match",
    "register_task",
    "score",
]

# The runner, fidelity, perplexity and user data (library API; torch is imported inside the functions, so
# importing parca.evals stays light):
#     result = run_eval(model, tokenizer, tasks="niah_single_1,vt", lengths="4k,8k", samples=5, out="runs/x")
#     fid = fidelity(model, tokenizer, "docs/", lengths=[4096]); ppl = perplexity(model, tokenizer, "docs/")
from parca.evals.fidelity import fidelity, load_texts  # noqa: E402
from parca.evals.perplexity import perplexity  # noqa: E402
from parca.evals.run import EvalResult, run_eval  # noqa: E402
from parca.evals.userdata import UserRecord, load_user_data  # noqa: E402

__all__ += ["EvalResult", "UserRecord", "fidelity", "load_texts", "load_user_data", "perplexity", "run_eval"]
