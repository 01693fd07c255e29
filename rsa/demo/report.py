"""The demo's outputs: the frontier table, the matched comparison and the verdict in the
terminal; report.json; frontier.png, tail.png and training.png."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .frontier import KNOB

METRICS = ("reward_mean", "cost_mean", "cost_cvar95", "catastrophic_rate", "kl_to_sft")
HEADERS = ("reward", "cost", "cost CVaR95", "catastrophic %", "KL to SFT")
METHODS = ("sft", "dpo", "ra-dpo", "sacpo", "rsa")
COLORS = {"sft": "tab:gray", "dpo": "tab:blue", "ra-dpo": "tab:purple", "sacpo": "tab:orange", "rsa": "tab:green"}
LINES = {"H->S": "-", "P": "--"}
METRIC_NAMES = {"cost_cvar95": "cost CVaR95", "catastrophic_rate": "catastrophic rate"}
AXIS_NAMES = {"reward": "helpfulness (reward)", "kl": "KL to SFT"}


def aggregate(per_seed: dict[str, list[dict]]) -> dict:
    """{name: {metric: mean over seeds, "std": {metric: spread}, "seeds": [per-seed dicts]}}."""
    out = {}
    for name, rows in per_seed.items():
        entry = {m: float(np.mean([r[m] for r in rows])) for m in METRICS}
        # ddof=0 keeps one seed well-defined (spread 0) instead of NaN
        entry["std"] = {m: float(np.std([r[m] for r in rows])) for m in METRICS}
        entry["seeds"] = [{k: r[k] for k in ("seed", *METRICS) if k in r} for r in rows]
        out[name] = entry
    return out


def _cell(entry: dict, m: str) -> str:
    mean, std = entry[m], entry["std"][m]
    if m == "catastrophic_rate":
        mean, std = 100 * mean, 100 * std
    return f"{mean:.3f} ± {std:.3f}"


def _layout(rows: list[tuple]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([fmt(rows[0]), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows[1:]])


def table(entries: dict) -> str:
    """Mean ± spread over seeds, one row per entry (in the dict's order)."""
    rows = [("model",) + HEADERS]
    rows += [(name,) + tuple(_cell(e, m) for m in METRICS) for name, e in entries.items()]
    return _layout(rows)


def frontier_table(rows: list[dict]) -> str:
    """Every model of the protocol, in the order it was run: mean ± spread over seeds."""
    per_model = {}
    for r in rows:
        per_model.setdefault(r["label"], []).append(r)
    return table(aggregate(per_model))


def matched_table(matched: dict) -> str:
    """Per axis, family and tail metric: RSA minus SACPO over the x both frontiers reach."""
    out = [("matched at", "family", "metric", "overlap", "RSA - SACPO", "RSA lower", "everywhere", "outcome")]
    for axis, families in matched.items():
        for family, metrics in families.items():
            for metric, e in metrics.items():
                scale = 100 if metric == "catastrophic_rate" else 1
                diff = "-" if e["diff_mean"] is None else f"{scale * e['diff_mean']:+.3f} ± {scale * e['diff_std']:.3f}"
                out.append((AXIS_NAMES[axis].split(" (")[0], family, METRIC_NAMES[metric] + (" %" if scale == 100 else ""),
                            f"{e['overlapping_seeds']}/{e['seeds']}", diff,
                            f"{e['rsa_lower_seeds']}/{e['overlapping_seeds']}",
                            f"{e['rsa_lower_everywhere_seeds']} rsa, {e['sacpo_lower_everywhere_seeds']} sacpo",
                            e["outcome"]))
    return _layout(out)


def _phrase(e: dict, metric: str) -> str:
    if e["overlapping_seeds"] == 0:
        return f"{METRIC_NAMES[metric]}: the frontiers reach no common value in any seed"
    scale, unit = (100, " points") if metric == "catastrophic_rate" else (1, "")
    text = (f"{METRIC_NAMES[metric]}: RSA lower in {e['rsa_lower_seeds']} of {e['overlapping_seeds']} "
            f"overlapping seeds (RSA - SACPO {scale * e['diff_mean']:+.3f} ± {scale * e['diff_std']:.3f}{unit})")
    if e["overlapping_seeds"] < e["seeds"]:
        text += f", no overlap in {e['seeds'] - e['overlapping_seeds']}"
    return text


def verdict(matched: dict) -> str:
    """Per axis and family what the matched comparison found, then one plain sentence on RSA's
    claim (a lower cost tail at the same helpfulness), whichever way the numbers go."""
    lines = []
    for axis, families in matched.items():
        for family, metrics in families.items():
            lines.append(f"matched {AXIS_NAMES[axis]}, {family}: "
                         + "; ".join(_phrase(e, m) for m, e in metrics.items()) + ".")
    cvar = {f: m["cost_cvar95"] for f, m in matched["reward"].items()}
    compared = [f for f, e in cvar.items() if e["outcome"] != "no overlap"]
    apart = [f for f in cvar if f not in compared]
    tail = f"; the {' and '.join(apart)} frontiers reach no common reward" if apart and compared else ""

    def counts(who: str) -> str:
        return "; ".join(f"{f}: {cvar[f][f'{who}_lower_seeds']} of {cvar[f]['overlapping_seeds']} overlapping seeds, "
                         f"lower at every shared reward in {cvar[f][f'{who}_lower_everywhere_seeds']}" for f in compared)

    plural = "s" if len(compared) > 1 else ""
    if not compared:
        lines.append("Verdict: RSA's and SACPO's frontiers reach no common reward in any seed, so this demo "
                     "cannot compare their cost tails at matched helpfulness.")
    elif all(cvar[f]["outcome"] == "rsa lower" for f in compared):
        lines.append(f"Verdict: at matched helpfulness RSA has a lower cost CVaR95 than SACPO, on average over "
                     f"the rewards both reach, on the {' and '.join(compared)} frontier{plural} in every seed where "
                     f"they overlap ({counts('rsa')}){tail}.")
    elif all(cvar[f]["outcome"] == "sacpo lower" for f in compared):
        lines.append(f"Verdict: at matched helpfulness SACPO, not RSA, has the lower cost CVaR95, on average over "
                     f"the rewards both reach, on the {' and '.join(compared)} frontier{plural} in every seed where "
                     f"they overlap ({counts('sacpo')}){tail}.")
    else:
        parts = ", ".join(f"{f}: {e['outcome']}" for f, e in cvar.items())
        lines.append(f"Verdict: neither RSA nor SACPO has the lower cost CVaR95 at matched helpfulness across "
                     f"seeds and frontiers ({parts}).")
    return "\n".join(lines)


def write_json(out: Path, methods: dict, extra: dict) -> Path:
    path = Path(out) / "report.json"
    path.write_text(json.dumps({"methods": methods, **extra}, indent=2) + "\n")
    return path


# ---------------------------------------------------------------------------- plots


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def tail_picks(fronts: dict) -> dict:
    """Per family, the sacpo point and the rsa point (seed means) whose rewards are closest: the
    best-matched pair of models the frontiers hold (ties: the first in knob order)."""
    picks = {}
    for family, entries in fronts.items():
        sacpo = [e for e in entries if e["method"] == "sacpo"]
        rsa = [e for e in entries if e["method"] == "rsa"]
        if sacpo and rsa:
            picks[family] = list(min(((a, b) for a in sacpo for b in rsa),
                                     key=lambda ab: abs(ab[0]["reward_mean"] - ab[1]["reward_mean"])))
    return picks


def point_label(family: str, p: dict) -> str:
    knob = "β/λ" if family == "H->S" else "w"
    return f"{p['method']} ({family}) {knob}={p[KNOB[family]]:g}, reward {p['reward_mean']:.2f}"


def plot_tail(out: Path, costs: dict[str, np.ndarray]) -> Path:
    """Complementary CDF P(cost >= c) per model (label -> costs, all seeds pooled), log scale."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.8, 4.4))
    for label, c in costs.items():
        x = np.sort(np.asarray(c, float))
        levels = np.unique(x)
        ccdf = 1.0 - np.searchsorted(x, levels, side="left") / len(x)   # P(C >= level)
        method = label.split()[0]
        ax.step(levels, ccdf, where="post", label=label, color=COLORS.get(method),
                ls=LINES["P"] if "(P)" in label else "-")
    ax.set_yscale("log")
    ax.set_xlabel("cost c(x, y)")
    ax.set_ylabel("P(cost ≥ c)")
    ax.set_title("Cost tail of the best reward-matched sacpo / rsa pair per family (seeds pooled)", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(out) / "tail.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


PANELS = (("reward_mean", "cost_cvar95", "reward", "cost CVaR95"),
          ("reward_mean", "catastrophic_rate", "reward", "catastrophic rate %"),
          ("kl_to_sft", "cost_cvar95", "KL to SFT", "cost CVaR95"))


def plot_frontier(out: Path, fronts: dict, anchors: dict) -> Path:
    """The frontiers (seed means, error bars = spread over seeds) in three planes; ``anchors``:
    name -> aggregate entry of the models the frontiers start from (sft, dpo (H), ra-dpo (H))."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(PANELS), figsize=(5.0 * len(PANELS), 4.4))
    marks = {"sft": ("*", "tab:gray"), "dpo (H)": ("s", COLORS["sacpo"]), "ra-dpo (H)": ("s", COLORS["rsa"])}
    for ax, (x, y, xl, yl) in zip(axes, PANELS):
        sy = 100 if y == "catastrophic_rate" else 1
        for family, entries in fronts.items():
            for method in ("sacpo", "rsa"):
                pts = [e for e in entries if e["method"] == method]
                if not pts:
                    continue
                ax.errorbar([e[x] for e in pts], [sy * e[y] for e in pts], xerr=[e["std"][x] for e in pts],
                            yerr=[sy * e["std"][y] for e in pts], color=COLORS[method], ls=LINES[family],
                            marker="o" if family == "H->S" else "^", ms=4, lw=1.2, capsize=2,
                            label=f"{method} ({family})")
                for e in pts:
                    ax.annotate(f"{e[KNOB[family]]:g}", (e[x], sy * e[y]), fontsize=6, color=COLORS[method],
                                xytext=(3, 3), textcoords="offset points")
        for name, e in anchors.items():
            marker, color = marks.get(name, ("D", "k"))
            ax.errorbar([e[x]], [sy * e[y]], xerr=[e["std"][x]], yerr=[sy * e["std"][y]], marker=marker, ms=8,
                        mfc="none" if name != "sft" else color, color=color, ls="none", capsize=2, label=name)
        if x == "kl_to_sft":
            # KL spans two orders of magnitude across methods; linear below 1 keeps the SFT model's 0
            ax.set_xscale("symlog", linthresh=1.0)
        ax.set_xlabel(xl + (" (linear below 1, log above)" if x == "kl_to_sft" else ""))
        ax.set_ylabel(yl)
        ax.grid(True, alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.suptitle("Helpfulness-safety frontiers (mean ± spread over seeds; labels: β/λ for H->S, merge weight for P)",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    path = Path(out) / "frontier.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


CURVES = (("loss", "loss"), ("rewards/accuracy", "reward accuracy"),
          ("kl/chosen", "sequence KL (chosen)"), ("risk/chosen", "sequence risk (chosen)"))


def plot_training(out: Path, logs: dict[str, dict[str, list[dict]]]) -> Path:
    """Training curves: rows = metrics, columns = stages, one line per run (seed 0's log).

    ``logs`` maps run name -> stage name -> the stage's list of logged steps.
    """
    plt = _plt()
    stages = []
    for run in logs.values():
        stages += [s for s in run if s not in stages]
    fig, axes = plt.subplots(len(CURVES), max(len(stages), 1), figsize=(3.4 * max(len(stages), 1), 2.3 * len(CURVES)),
                             squeeze=False, sharex="col")
    for j, stage in enumerate(stages):
        for i, (key, label) in enumerate(CURVES):
            ax = axes[i][j]
            for run, per_stage in logs.items():
                rows = [r for r in per_stage.get(stage, []) if key in r and "step" in r]
                if rows:
                    ax.plot([r["step"] for r in rows], [r[key] for r in rows], label=run,
                            color=COLORS.get(run.split()[0], None), lw=1.2)
            if i == 0:
                ax.set_title(f"stage: {stage}", fontsize=10)
            if j == 0:
                ax.set_ylabel(label)
            if i == len(CURVES) - 1:
                ax.set_xlabel("step")
            ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    path = Path(out) / "training.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
