"""Evaluation of local models on prompts: the cost tail under the user's own scorers (`rsa eval`).

Modules: prompts (reading and rendering), sampling (the token loop and its seeded draws), kl
(KL to a reference along the samples), scorers (model folders and Python functions),
metrics (SPEC section 8 and bootstrap intervals), samples_file (resumable samples.jsonl),
settings, runner, report and plots. See docs/eval.md.
"""
from .metrics import bootstrap_ci, cvar, point_metrics
from .runner import run_eval
from .scorers import FunctionScorer, ModelScorer, ScorerError, load_scorer
from .settings import EvalSettings, parse_models

__all__ = ["EvalSettings", "FunctionScorer", "ModelScorer", "ScorerError", "bootstrap_ci", "cvar", "load_scorer",
           "parse_models", "point_metrics", "run_eval"]
