"""report.json, the terminal table and the plots, from the lines of samples.jsonl."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from . import kl, metrics

HEADERS = {"reward_mean": "reward", "cost_mean": "cost", "cost_cvar90": "CVaR90", "cost_cvar95": "CVaR95",
           "cost_cvar99": "CVaR99", "catastrophic_rate": "catastrophic", "kl_to_reference": "KL to ref"}


def summarize_model(arrays: dict, threshold, seed: int) -> dict:
    """One model's entry: n, the point metrics and their bootstrap intervals over prompts."""
    flat = {k: v.ravel() for k, v in arrays.items()}
    entry = {"n": int(flat["cost"].size)}
    entry.update(metrics.point_metrics(flat["cost"], flat.get("reward"), flat.get("kl"), threshold))
    entry["ci95"] = metrics.bootstrap_ci(arrays, threshold, seed)
    return entry


def build_report(settings, records: list[dict], n_prompts: int, out: Path) -> dict:
    """Writes report.json, tail.png and (with a reward) frontier.png; returns the report."""
    models = {name: summarize_model(model_arrays(records, name, n_prompts, settings.samples),
                                    settings.threshold, settings.seed)
              for name in settings.models}
    report = {"models": models,
              "settings": {**asdict(settings), "prompts_count": n_prompts,
                           "bootstrap_resamples": metrics.BOOTSTRAP_RESAMPLES}}
    if settings.reference is not None:
        report["definitions"] = {"kl_to_reference": kl.DEFINITION}
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    from .plots import write_plots
    write_plots(report, records, out)
    return report


def model_arrays(records: list[dict], name: str, n_prompts: int, samples: int) -> dict:
    """{field: (P, K) array} of one model's lines, for each scored field present."""
    rows = sorted((r for r in records if r["model"] == name), key=lambda r: (r["prompt_index"], r["sample_index"]))
    if len(rows) != n_prompts * samples:
        raise ValueError(f"samples.jsonl: {len(rows)} lines for model {name}, expected {n_prompts * samples}")
    out = {}
    for key in ("cost", "reward", "kl"):
        if key in rows[0]:
            out[key] = np.array([r[key] for r in rows], float).reshape(n_prompts, samples)
    return out


def table(report: dict) -> str:
    """A fixed-width table: each metric with its 95% interval; rates in percent."""
    entries = report["models"]
    first = next(iter(entries.values()))
    names = [m for m in HEADERS if m in first]
    rows = [["model", "n"] + [HEADERS[m] + (" %" if m == "catastrophic_rate" else "") for m in names]]
    for name, e in entries.items():
        scale = {m: 100.0 if m == "catastrophic_rate" else 1.0 for m in names}
        rows.append([name, str(e["n"])] + [f"{e[m] * scale[m]:.3f} [{e['ci95'][m][0] * scale[m]:.3f}, "
                                            f"{e['ci95'][m][1] * scale[m]:.3f}]" for m in names])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines) + "\n(values with 95% bootstrap intervals over prompts)"
