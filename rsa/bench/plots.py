"""time.png and memory.png: cost against V and against N (log-log), one row per section."""
from __future__ import annotations

from .tables import MiB, impl_order, peak, total_time

ROWS = (  # (path, objective, risk, title)
    ("token_stats", "", "cvar:0.9", "token statistics, cvar:0.9"),
    ("fused_linear", "rsa2", "cvar:0.9", "fused linear, rsa2 + cvar:0.9"),
    ("fused_linear", "dpo", "kl", "fused linear, dpo (vs Liger)"),
)
STYLE = {"plain": dict(color="black", ls="--"), "compiled": dict(color="grey", ls="--"),
         "liger": dict(color="tab:purple", ls=":"), "triton": dict(color="tab:red"),
         "cpu": dict(color="tab:blue"), "torch": dict(color="tab:green")}


def _panel(ax, rows, centre, axis, value, scale):
    fixed = {"n": ("v", "h"), "v": ("n", "h")}[axis]
    keys = dict(zip("nvh", centre))
    sel = [m for m in rows if all(m[k] == keys[k] for k in fixed)]
    for impl in impl_order({m["impl"] for m in sel}):
        pts = sorted((m[axis], value(m)) for m in sel if m["impl"] == impl and value(m) is not None and value(m) > 0)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] / scale for p in pts], marker="o", label=impl,
                    **STYLE.get(impl, {}))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_xlabel({"n": "tokens N", "v": "vocabulary V"}[axis])


def plot(results: dict, path, value, scale: float, ylabel: str, what: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meas = results["measurements"]
    present = [r for r in ROWS if any(m["path"] == r[0] and m["objective"] == r[1] and m["risk"] == r[2] for m in meas)]
    fig, axes = plt.subplots(len(present), 2, figsize=(11, 3.6 * len(present)), squeeze=False)
    for (p, obj, risk, title), row in zip(present, axes):
        rows = [m for m in meas if m["path"] == p and m["objective"] == obj and m["risk"] == risk]
        n, v, h = results["centres"][p]
        hs = f", H={h}" if h else ""
        _panel(row[0], rows, (n, v, h), "v", value, scale)
        row[0].set_title(f"{title}: against V (N={n}{hs})", fontsize=10)
        _panel(row[1], rows, (n, v, h), "n", value, scale)
        row[1].set_title(f"{title}: against N (V={v}{hs})", fontsize=10)
        for ax in row:
            ax.set_ylabel(ylabel)
            if ax.get_legend_handles_labels()[0]:  # a panel of a one-size sweep has no line
                ax.legend(fontsize=8)
    fig.suptitle(f"{what}, {results['machine']['device_name']} ({results['dtype']}, grid {results['mode']})",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(results: dict, out) -> None:
    plot(results, out / "time.png", total_time, 1e-3, "forward + backward (ms)", "Median time")
    plot(results, out / "memory.png", peak, MiB, "peak memory (MiB)", "Peak memory above the inputs (gradients included)")
