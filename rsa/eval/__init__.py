"""Evaluation of local models on prompts: the cost tail under the user's own scorers (`rsa eval`).

Modules: prompts (reading and rendering), nexttoken (the sampler's next-token distribution and
its KL to the reference's), sampling (the token loop and its seeded draws), kl (what the
reported KL is, and recomputing it for given responses), scorers (model folders and Python
functions), metrics (SPEC section 8 and bootstrap intervals), samples_file (resumable
samples.jsonl), settings, runner, report, plots, and memory (the peak memory formula). See
docs/eval.md.
"""
import importlib

# Loaded on first use, so that `rsa eval` checks its settings before torch is imported (seconds).
_WHERE = {"bootstrap_ci": "metrics", "cvar": "metrics", "point_metrics": "metrics", "run_eval": "runner",
          "FunctionScorer": "scorers", "ModelScorer": "scorers", "ScorerError": "scorers", "load_scorer": "scorers",
          "EvalSettings": "settings", "parse_models": "settings"}
__all__ = sorted(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
