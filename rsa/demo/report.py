"""The demo's outputs: the terminal table, report.json, tail.png and training.png."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

METRICS = ("reward_mean", "cost_mean", "cost_cvar95", "catastrophic_rate", "kl_to_sft")
HEADERS = ("reward", "cost", "cost CVaR95", "catastrophic %", "KL to SFT")
METHODS = ("sft", "dpo", "sacpo", "rsa")
COLORS = {"sft": "tab:gray", "dpo": "tab:blue", "sacpo": "tab:orange", "rsa": "tab:green"}


def aggregate(per_seed: dict[str, list[dict]]) -> dict:
    """{method: {metric: mean over seeds, "std": {metric: spread}, "seeds": [per-seed dicts]}}."""
    out = {}
    for method, rows in per_seed.items():
        entry = {m: float(np.mean([r[m] for r in rows])) for m in METRICS}
        # ddof=0 keeps one seed well-defined (spread 0) instead of NaN
        entry["std"] = {m: float(np.std([r[m] for r in rows])) for m in METRICS}
        entry["seeds"] = rows
        out[method] = entry
    return out


def verdict(methods: dict) -> str:
    """What the numbers say about RSA against SACPO, whichever way they go."""
    if "rsa" not in methods or "sacpo" not in methods:
        return "rsa or sacpo missing: no comparison"
    r, s = methods["rsa"], methods["sacpo"]
    pairs = list(zip(r["seeds"], s["seeds"]))
    wins = sum(a["cost_cvar95"] < b["cost_cvar95"] for a, b in pairs)
    cat_wins = sum(a["catastrophic_rate"] < b["catastrophic_rate"] for a, b in pairs)
    lines = [
        f"cost CVaR95: rsa {r['cost_cvar95']:.2f} ± {r['std']['cost_cvar95']:.2f} vs sacpo "
        f"{s['cost_cvar95']:.2f} ± {s['std']['cost_cvar95']:.2f} (rsa lower in {wins} of {len(pairs)} seeds)",
        f"catastrophic rate: rsa {100 * r['catastrophic_rate']:.2f}% vs sacpo {100 * s['catastrophic_rate']:.2f}% "
        f"(rsa lower in {cat_wins} of {len(pairs)} seeds)",
        f"reward: rsa {r['reward_mean']:.3f} vs sacpo {s['reward_mean']:.3f}; KL to SFT: rsa "
        f"{r['kl_to_sft']:.3f} vs sacpo {s['kl_to_sft']:.3f}",
    ]
    if wins == len(pairs) and r["cost_cvar95"] < s["cost_cvar95"]:
        lines.append("RSA reduced the cost tail relative to SACPO in every seed.")
    elif wins == 0:
        lines.append("RSA did NOT reduce the cost tail relative to SACPO on this task.")
    else:
        lines.append("Mixed: RSA reduced the cost tail in some seeds only; the difference is within seed noise.")
    return "\n".join(lines)


def table(methods: dict) -> str:
    """Mean ± spread over seeds, one row per method."""
    def cell(entry, m):
        mean, std = entry[m], entry["std"][m]
        if m == "catastrophic_rate":
            mean, std = 100 * mean, 100 * std
        return f"{mean:.3f} ± {std:.3f}"

    rows = [("method",) + HEADERS]
    rows += [(name,) + tuple(cell(methods[name], m) for m in METRICS) for name in METHODS if name in methods]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    sep = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(rows[0]), sep] + [fmt(r) for r in rows[1:]])


def write_json(out: Path, methods: dict, extra: dict) -> Path:
    path = Path(out) / "report.json"
    path.write_text(json.dumps({"methods": methods, **extra}, indent=2) + "\n")
    return path


def plot_tail(out: Path, costs: dict[str, np.ndarray]) -> Path:
    """Complementary CDF P(cost >= c) per method, all seeds pooled, log scale."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name in METHODS:
        if name not in costs:
            continue
        x = np.sort(costs[name])
        levels = np.unique(x)
        ccdf = 1.0 - np.searchsorted(x, levels, side="left") / len(x)   # P(C >= level)
        ax.step(levels, ccdf, where="post", label=name, color=COLORS[name])
    ax.set_yscale("log")
    ax.set_xlabel("cost c(x, y)")
    ax.set_ylabel("P(cost ≥ c)")
    ax.set_title("Tail of the safety cost (all seeds pooled)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(out) / "tail.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


CURVES = (("loss", "loss"), ("rewards/accuracy", "reward accuracy"),
          ("kl/chosen", "sequence KL (chosen)"), ("risk/chosen", "sequence risk (chosen)"))


def plot_training(out: Path, logs: dict[str, dict[str, list[dict]]]) -> Path:
    """Training curves: rows = metrics, columns = stages, one line per run (seed 0's log).

    ``logs`` maps run name -> stage name -> the stage's list of logged steps.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = []
    for run in logs.values():
        stages += [s for s in run if s not in stages]
    fig, axes = plt.subplots(len(CURVES), max(len(stages), 1), figsize=(4.2 * max(len(stages), 1), 2.4 * len(CURVES)),
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
                ax.set_title(f"stage: {stage}")
            if j == 0:
                ax.set_ylabel(label)
            if i == len(CURVES) - 1:
                ax.set_xlabel("step")
            ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    path = Path(out) / "training.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
