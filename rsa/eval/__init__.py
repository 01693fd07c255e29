"""Evaluation of local models on prompts: the cost tail under the user's own scorers (`rsa eval`).

Modules: prompts (reading and rendering), nexttoken (the sampler's next-token distribution and
its KL to the reference's), sampling (the token loop and its seeded draws), kl (what the
reported KL is, and recomputing it for given responses), scorers (model folders and Python
functions), metrics (SPEC section 8 and bootstrap intervals), samples_file (resumable
samples.jsonl), settings, runner, report, plots, and memory (the peak memory formula). See
docs/eval.md.
"""
from .metrics import bootstrap_ci, cvar, point_metrics
from .runner import run_eval
from .scorers import FunctionScorer, ModelScorer, ScorerError, load_scorer
from .settings import EvalSettings, parse_models

__all__ = ["EvalSettings", "FunctionScorer", "ModelScorer", "ScorerError", "bootstrap_ci", "cvar", "load_scorer",
           "parse_models", "point_metrics", "run_eval"]
