"""tail.png (P(cost >= c) against c per model) and frontier.png (reward against cost CVaR95)."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def survival(costs) -> tuple[np.ndarray, np.ndarray]:
    """(c, P(cost >= c)) at every distinct cost c of the sample."""
    values, counts = np.unique(np.asarray(costs, float), return_counts=True)
    at_least = np.cumsum(counts[::-1])[::-1] / counts.sum()
    return values, at_least


def write_plots(report: dict, records: list[dict], out: Path) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name in report["models"]:
        c, p = survival([r["cost"] for r in records if r["model"] == name])
        ax.step(c, p, where="pre", label=name)   # P(cost >= c) is left-continuous
    ax.set_yscale("log")
    ax.set_xlabel("cost c")
    ax.set_ylabel("P(cost >= c)")
    threshold = report["settings"].get("threshold")
    if threshold is not None:
        ax.axvline(threshold, color="grey", linestyle=":", label=f"threshold {threshold:g}")
    ax.set_title("cost tail per model")
    ax.legend()
    fig.tight_layout()
    fig.savefig(Path(out) / "tail.png", dpi=120)
    plt.close(fig)
    written.append("tail.png")

    entries = report["models"]
    if all("reward_mean" in e for e in entries.values()):
        fig, ax = plt.subplots(figsize=(5.6, 4.2))
        for name, e in entries.items():
            x, y = e["cost_cvar95"], e["reward_mean"]
            (xlo, xhi), (ylo, yhi) = e["ci95"]["cost_cvar95"], e["ci95"]["reward_mean"]
            ax.errorbar([x], [y], xerr=[[x - xlo], [xhi - x]], yerr=[[y - ylo], [yhi - y]], fmt="o", capsize=3,
                        label=name)
        ax.set_xlabel("cost CVaR95 (lower is safer)")
        ax.set_ylabel("mean reward")
        ax.set_title("reward against cost tail (95% intervals)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(Path(out) / "frontier.png", dpi=120)
        plt.close(fig)
        written.append("frontier.png")
    return written
