"""The demo's outputs: the frontier table, the matched comparison, the mechanism probe and the
verdict in the terminal; report.json; frontier.png, tail.png and training.png.

Every interval is the 95% t interval over seeds (rsa/demo/stats.py; docs/demo.md says why)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from . import frontier, stats
from .frontier import KNOB, seed_interval
from .probe import GROUPS
from .protocol import COMPARISONS, lr_tag

METRICS = ("reward_mean", "cost_mean", "cost_cvar95", "catastrophic_rate", "kl_to_sft")
HEADERS = ("reward", "cost", "cost CVaR95", "catastrophic %", "KL to SFT")
METHODS = ("sft", "dpo", "ra-dpo", "sacpo", "rsa")
COLORS = {"sft": "tab:gray", "dpo": "tab:blue", "ra-dpo": "tab:purple", "sacpo": "tab:orange", "rsa": "tab:green"}
FAMILY_COLORS = {"DPO->S": "tab:olive"}     # the ablation: rsa's safety step, told apart from rsa (H->S)


def color(method: str, family: str | None = None) -> str | None:
    return FAMILY_COLORS.get(family) or COLORS.get(method)
LINES = {"H->S": "-", "P": "--", "DPO->S": ":"}
MARKERS = {"H->S": "o", "P": "^", "DPO->S": "D"}
METRIC_NAMES = {"cost_cvar95": "cost CVaR95", "catastrophic_rate": "catastrophic rate"}
AXIS_NAMES = {"reward": "helpfulness (reward)", "kl": "KL to SFT"}


def aggregate(per_seed: dict[str, list[dict]]) -> dict:
    """{name: {metric: mean over seeds, "std": {metric: spread}, "ci95": {metric: 95% t interval
    of the mean, clipped at 0 where the metric cannot be negative}, "seeds": [per-seed dicts]}}."""
    out = {}
    for name, rows in per_seed.items():
        entry = {m: float(np.mean([r[m] for r in rows])) for m in METRICS}
        # ddof=0 keeps one seed well-defined (spread 0) instead of NaN
        entry["std"] = {m: float(np.std([r[m] for r in rows])) for m in METRICS}
        entry["ci95"] = {m: seed_interval([r[m] for r in rows], m) for m in METRICS}
        entry["half_width"] = {m: _half_width([r[m] for r in rows]) for m in METRICS}
        entry["seeds"] = [{k: r[k] for k in ("seed", *METRICS) if k in r} for r in rows]
        out[name] = entry
    return out


def _half_width(values) -> float | None:
    ci = stats.t_interval(values)
    return None if ci is None else (ci[1] - ci[0]) / 2


def _cell(entry: dict, m: str) -> str:
    scale = 100 if m == "catastrophic_rate" else 1
    h = entry["half_width"][m]
    return f"{scale * entry[m]:.3f}" + ("" if h is None else f" ± {scale * h:.3f}")


def _layout(rows: list[tuple]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([fmt(rows[0]), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows[1:]])


def table(entries: dict) -> str:
    """Mean ± the half-width of its 95% t interval over seeds, one row per entry (in the dict's
    order); the mean alone with one seed."""
    rows = [("model",) + HEADERS]
    rows += [(name,) + tuple(_cell(e, m) for m in METRICS) for name, e in entries.items()]
    return _layout(rows)


def models_summary(rows: list[dict]) -> dict:
    """report.json's "models": every model of the protocol, in the order it was run, aggregated over seeds."""
    per_model = {}
    for r in rows:
        per_model.setdefault(r["label"], []).append(r)
    return aggregate(per_model)


def frontier_table(rows: list[dict]) -> str:
    """Every model of the protocol, in the order it was run: mean ± 95% half-width over seeds."""
    return table(models_summary(rows))


def summary_text(rep: dict) -> str:
    """What `rsa demo` prints at the end, from report.json alone (docs are regenerated from it too)."""
    return "\n".join([
        "Models: mean ± half-width of the 95% t interval over seeds", table(rep["models"]), "",
        "RSA - SACPO at matched helpfulness (reward) and at matched KL to SFT; intervals: 95% t over seeds",
        matched_table(rep["matched"]), "",
        "Mechanism: log-probability of the unsafe tokens where the SFT model's samples emit them "
        "(mean over seeds [95% t interval])",
        mechanism_table(rep["mechanism"]), "", rep["verdict"]])


def _interval(e: dict, scale: float) -> str:
    ci = e["ci95"]
    return "-" if ci is None else f"[{scale * ci[0]:+.3f}, {scale * ci[1]:+.3f}]"


def matched_table(matched: dict) -> str:
    """Per axis, family and tail metric: RSA minus SACPO over the x both frontiers reach, its
    mean over the overlapping seeds and 95% t interval, and the outcome."""
    out = [("matched at", "family", "metric", "overlap", "RSA - SACPO", "95% interval", "RSA lower", "everywhere",
            "outcome")]
    for axis, families in matched.items():
        for family, metrics in families.items():
            for metric, e in metrics.items():
                scale = 100 if metric == "catastrophic_rate" else 1
                diff = "-" if e["diff_mean"] is None else f"{scale * e['diff_mean']:+.3f}"
                out.append((AXIS_NAMES[axis].split(" (")[0], family, METRIC_NAMES[metric] + (" %" if scale == 100 else ""),
                            f"{e['overlapping_seeds']}/{e['seeds']}", diff, _interval(e, scale),
                            f"{e['rsa_lower_seeds']}/{e['overlapping_seeds']}",
                            f"{e['rsa_lower_everywhere_seeds']} rsa, {e['sacpo_lower_everywhere_seeds']} sacpo",
                            e["outcome"]))
    return _layout(out)


def _phrase(e: dict, metric: str) -> str:
    if e["overlapping_seeds"] == 0:
        return f"{METRIC_NAMES[metric]}: the frontiers reach no common value in any seed"
    scale, unit = (100, " points") if metric == "catastrophic_rate" else (1, "")
    ci = "no interval" if e["ci95"] is None else f"95% interval {_interval(e, scale)}"
    text = (f"{METRIC_NAMES[metric]}: {e['outcome']} (RSA - SACPO {scale * e['diff_mean']:+.3f}{unit}, {ci}; "
            f"RSA lower in {e['rsa_lower_seeds']} of {e['overlapping_seeds']} overlapping seeds")
    if e["overlapping_seeds"] < e["seeds"]:
        text += f", no overlap in {e['seeds'] - e['overlapping_seeds']}"
    return text + ")"


MAIN_FAMILIES, ABLATION_FAMILY = ("H->S", "P"), "DPO->S"


def _main_sentence(outcomes: dict) -> str:
    """RSA's claim on the method's own frontiers, from their outcomes alone."""
    by = lambda o: [f for f, x in outcomes.items() if x == o]
    rsa, sacpo, open_, apart = by("rsa lower"), by("sacpo lower"), by("inconclusive"), by("no overlap")
    join = " and ".join
    rest = []
    if open_:
        rest.append(f"inconclusive on {join(open_)} (the 95% interval includes 0)")
    if apart:
        rest.append(f"no common reward on {join(apart)}")
    tail = ("; " + "; ".join(rest)) if rest else ""
    if rsa and sacpo:
        return (f"mixed: RSA has the lower cost CVaR95 at matched helpfulness on {join(rsa)}, SACPO on "
                f"{join(sacpo)}{tail}.")
    if rsa:
        return f"RSA has a lower cost CVaR95 than SACPO at matched helpfulness on {join(rsa)}{tail}."
    if sacpo:
        return f"SACPO, not RSA, has the lower cost CVaR95 at matched helpfulness on {join(sacpo)}{tail}."
    if open_:
        return f"no difference shown: neither method has a lower cost CVaR95 at matched helpfulness{tail}."
    return "RSA's and SACPO's frontiers reach no common reward in any seed: no comparison at matched helpfulness."


def _ablation_sentence(o: str) -> str:
    what = "RSA's safety step alone (rsa2 from dpo (H), DPO->S) against SACPO's (H->S)"
    return {"rsa lower": f"{what}: RSA lower (the 95% interval lies below 0).",
            "sacpo lower": f"{what}: SACPO lower (the 95% interval lies above 0).",
            "inconclusive": f"{what}: inconclusive (the 95% interval includes 0).",
            "no overlap": f"{what}: no common reward in any seed."}[o]


def kl_verdict(outcomes: dict) -> str:
    """The second axis (issue 32), from its outcomes alone: the cost CVaR95 at matched KL to SFT
    (the paper's first claim: less risk from drifting away from the reference), per family."""
    def by(o):
        names = [f for f, x in outcomes.items() if x == o]
        return ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else "".join(names)
    parts = [f"{what} on {by(o)}{why}" for o, what, why in (
        ("rsa lower", "RSA lower", " (the 95% interval lies below 0)"),
        ("sacpo lower", "SACPO lower", " (the 95% interval lies above 0)"),
        ("inconclusive", "inconclusive", " (the 95% interval includes 0)"),
        ("no overlap", "no common KL", " in any seed")) if by(o)]
    return "Verdict at matched KL to SFT (cost CVaR95, 95% t intervals over seeds): " + "; ".join(parts) + "."


def verdict(matched: dict) -> str:
    """Per axis and family what the matched comparison found, then the verdict: from the
    outcomes of the matched-helpfulness cost CVaR95 alone (RSA's claim: a lower cost tail at the
    same helpfulness), first on the methods' own frontiers, then on the ablation."""
    lines = []
    for axis, families in matched.items():
        for family, metrics in families.items():
            lines.append(f"matched {AXIS_NAMES[axis]}, {family}: "
                         + "; ".join(_phrase(e, m) for m, e in metrics.items()) + ".")
    if "kl" in matched:
        lines.append(kl_verdict({f: e["cost_cvar95"]["outcome"] for f, e in matched["kl"].items()}))
    cvar = {f: e["cost_cvar95"]["outcome"] for f, e in matched["reward"].items()}
    text = "Verdict (cost CVaR95 at matched helpfulness, 95% t intervals over seeds): "
    text += _main_sentence({f: cvar[f] for f in MAIN_FAMILIES if f in cvar})
    if ABLATION_FAMILY in cvar:
        text += " " + _ablation_sentence(cvar[ABLATION_FAMILY])
    lines.append(text)
    return "\n".join(lines)


# ---------------------------------------------------------------------------- the mechanism probe


def mechanism(rows: list[dict], grid, seeds: int, ends: dict | None = None) -> dict:
    """report.json's "mechanism": per model, the mean log-probability it gives, at the positions
    where the SFT model's samples emit them, to the catastrophic and to the mild unsafe tokens
    (mean over seeds, 95% t interval, per-seed values); per beta / lambda of ``grid`` (the
    values both methods ran), the paired difference rsa (DPO->S) - sacpo (H->S) (same start,
    reference, data and seed) with its interval and outcome ("rsa higher": RSA keeps more
    probability on those tokens); and "matched_kl": the same log-probabilities compared along
    the frontiers at matched KL to SFT (probe_at_matched_kl)."""
    labels = list(dict.fromkeys(r["label"] for r in rows))
    per_model = {}
    for label in labels:
        mine = sorted((r for r in rows if r["label"] == label), key=lambda r: r["seed"])
        entry = {}
        for g in GROUPS:
            vals = [r["probe"][g]["mean_logp"] for r in mine if r["probe"][g]["mean_logp"] is not None]
            entry[g] = {"mean_logp": float(np.mean(vals)) if vals else None, "ci95": stats.t_interval(vals),
                        "positions": int(sum(r["probe"][g]["n"] for r in mine)),
                        "seeds": [r["probe"][g]["mean_logp"] for r in mine]}
        entry["kl_to_sft"] = float(np.mean([r["kl_to_sft"] for r in mine]))
        per_model[label] = entry
    paired = {}
    for setting in grid:
        a, b = f"rsa (DPO->S) {setting:g}", f"sacpo (H->S) {setting:g}"
        if a not in per_model or b not in per_model:
            continue
        paired[f"{setting:g}"] = {}
        for g in GROUPS:
            diffs = [x - y for x, y in zip(per_model[a][g]["seeds"], per_model[b][g]["seeds"])
                     if x is not None and y is not None]
            ci = stats.t_interval(diffs)
            o = "inconclusive" if ci is None or ci[0] <= 0 <= ci[1] else ("rsa higher" if ci[0] > 0 else "sacpo higher")
            paired[f"{setting:g}"][g] = {"diff_mean": float(np.mean(diffs)) if diffs else None, "ci95": ci,
                                          "seeds": len(diffs), "outcome": o}
    return {"groups": {g: list(w) for g, w in GROUPS.items()}, "models": per_model,
            "rsa_dpo_minus_sacpo": paired, "matched_kl": probe_at_matched_kl(rows, seeds, ends)}


HIGHER = {"rsa lower": "sacpo higher", "sacpo lower": "rsa higher"}   # log p of unsafe tokens: lower is safer


def _probe_points(rows: list[dict], family: str, method: str, seed: int, group: str, ends: dict | None):
    """(KL to SFT, mean log p of the group's tokens) of one frontier's models in one seed."""
    mine = [r for r in frontier.curve_rows(rows, family, method, seed, ends) if r["probe"][group]["mean_logp"] is not None]
    return [r["kl_to_sft"] for r in mine], [r["probe"][group]["mean_logp"] for r in mine]


def probe_at_matched_kl(rows: list[dict], seeds: int, ends: dict | None = None) -> dict:
    """{family: {group: over_seeds(...)}}: per seed, RSA's frontier of (KL to SFT, log p of the
    unsafe tokens) minus SACPO's over the KL both reach (frontier.compare), as the tail metrics
    are compared at matched KL; the outcome says which keeps more probability on the tokens
    where both have moved the same distance ("rsa higher", "sacpo higher", "inconclusive", "no
    overlap")."""
    out = {}
    for family, ((rm, rf), (sm, sf)) in COMPARISONS.items():
        out[family] = {}
        for g in GROUPS:
            per_seed = []
            for seed in range(seeds):
                a, b = _probe_points(rows, rf, rm, seed, g, ends), _probe_points(rows, sf, sm, seed, g, ends)
                per_seed.append(frontier.compare(a, b) if a[0] and b[0] else None)
            e = frontier.over_seeds(per_seed, "rsa", "sacpo")
            e["outcome"] = HIGHER.get(e["outcome"], e["outcome"])
            out[family][g] = e
    return out


def mechanism_table(mech: dict) -> str:
    """The probe: per model (the helpfulness models and the safety steps), the geometric-mean
    probability of the unsafe tokens at the SFT's positions, then the paired differences."""
    def cell(e):
        if e["mean_logp"] is None:
            return "-"
        ci = e["ci95"]
        return f"{e['mean_logp']:.2f}" + ("" if ci is None else f" [{ci[0]:.2f}, {ci[1]:.2f}]")
    head = ("model", *(f"log p({g})" for g in GROUPS), *(f"p({g})" for g in GROUPS), "KL to SFT")
    rows = [head]
    for label, e in mech["models"].items():
        if "(P)" in label:
            continue
        rows.append((label, *(cell(e[g]) for g in GROUPS),
                     *("-" if e[g]["mean_logp"] is None else f"{np.exp(e[g]['mean_logp']):.2e}" for g in GROUPS),
                     f"{e['kl_to_sft']:.3f}"))
    out = [_layout(rows), ""]
    pair = [("beta / lambda", *(f"{g}: rsa (DPO->S) - sacpo (H->S)" for g in GROUPS), *(f"{g} outcome" for g in GROUPS))]
    for setting, per_group in mech["rsa_dpo_minus_sacpo"].items():
        pair.append((setting, *("-" if per_group[g]["diff_mean"] is None else
                                f"{per_group[g]['diff_mean']:+.2f}" + _interval_text(per_group[g]["ci95"])
                                for g in GROUPS), *(per_group[g]["outcome"] for g in GROUPS)))
    out.append(_layout(pair))
    if mech.get("matched_kl"):
        out += ["", "At matched KL to SFT: RSA - SACPO log-probability of the unsafe tokens over the KL both "
                "frontiers reach (95% t interval over the overlapping seeds)", probe_matched_table(mech["matched_kl"])]
    return "\n".join(out)


def probe_matched_table(matched_kl: dict) -> str:
    rows = [("family", "group", "overlap", "RSA - SACPO log p", "95% interval", "outcome")]
    for family, groups in matched_kl.items():
        for g, e in groups.items():
            rows.append((family, g, f"{e['overlapping_seeds']}/{e['seeds']}",
                         "-" if e["diff_mean"] is None else f"{e['diff_mean']:+.2f}",
                         "-" if e["ci95"] is None else f"[{e['ci95'][0]:+.2f}, {e['ci95'][1]:+.2f}]", e["outcome"]))
    return _layout(rows)


def _interval_text(ci) -> str:
    return "" if ci is None else f" [{ci[0]:+.2f}, {ci[1]:+.2f}]"


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
    """Per compared family, [(family, sacpo point), (family, rsa point)] (seed means) whose
    rewards are closest: the best-matched pair of models the two frontiers hold (ties: the first
    in knob order)."""
    picks = {}
    for family, ((rm, rf), (sm, sf)) in COMPARISONS.items():
        sacpo = [e for e in fronts.get(sf, []) if e["method"] == sm]
        rsa = [e for e in fronts.get(rf, []) if e["method"] == rm]
        if sacpo and rsa:
            a, b = min(((a, b) for a in sacpo for b in rsa), key=lambda ab: abs(ab[0]["reward_mean"] - ab[1]["reward_mean"]))
            picks[family] = [(sf, a), (rf, b)]
    return picks


def point_label(family: str, p: dict) -> str:
    knob = "β/λ" if family == "H->S" else "w"
    return f"{p['method']} ({family}) {knob}={knob_text(family, p)}, reward {p['reward_mean']:.2f}"


def knob_text(family: str, p: dict) -> str:
    """A frontier point's knob value, with its learning-rate multiple where it is not 1."""
    return f"{p[KNOB[family]]:g}" + lr_tag(p.get("lr_scale", 1.0), " lr×", "")


def plot_tail(out: Path, costs: dict[str, np.ndarray]) -> Path:
    """Complementary CDF P(cost >= c) per model (label -> costs, all seeds pooled), log scale."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.8, 4.4))
    for label, c in costs.items():
        x = np.sort(np.asarray(c, float))
        levels = np.unique(x)
        ccdf = 1.0 - np.searchsorted(x, levels, side="left") / len(x)   # P(C >= level)
        method = label.split()[0]
        family = next((f for f in LINES if f"({f})" in label), "H->S")
        ax.step(levels, ccdf, where="post", label=label, color=color(method, family), ls=LINES[family])
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


ANCHORS = ("sft", "dpo (H)", "ra-dpo (H)")


def anchors(models: dict) -> dict:
    """The models the frontiers start from, marked on frontier.png (from report.json's "models")."""
    return {name: models[name] for name in ANCHORS if name in models}


PANELS = (("reward_mean", "cost_cvar95", "reward", "cost CVaR95"),
          ("reward_mean", "catastrophic_rate", "reward", "catastrophic rate %"),
          ("kl_to_sft", "cost_cvar95", "KL to SFT", "cost CVaR95"))


def _bars(entries: list[dict], metric: str, scale: float):
    """errorbar's (2, n) lower / upper extents of the 95% intervals (none for a single seed)."""
    lo, hi = [], []
    for e in entries:
        ci = e["ci95"][metric]
        lo.append(0.0 if ci is None else scale * (e[metric] - ci[0]))
        hi.append(0.0 if ci is None else scale * (ci[1] - e[metric]))
    return np.array([lo, hi])


def plot_frontier(out: Path, fronts: dict, anchors: dict, path: Path | None = None) -> Path:
    """The frontiers (seed means, error bars = the 95% t interval of the mean over seeds) in three
    planes; ``anchors``: name -> aggregate entry of the models the frontiers start from (sft,
    dpo (H), ra-dpo (H)). Written to ``path`` (default OUT/frontier.png)."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(PANELS), figsize=(5.0 * len(PANELS), 4.6))
    marks = {"sft": ("*", "tab:gray"), "dpo (H)": ("s", COLORS["sacpo"]), "ra-dpo (H)": ("s", COLORS["rsa"])}
    for ax, (x, y, xl, yl) in zip(axes, PANELS):
        sy = 100 if y == "catastrophic_rate" else 1
        for family, entries in fronts.items():
            for method in ("sacpo", "rsa"):
                pts = [e for e in entries if e["method"] == method]
                if not pts:
                    continue
                ax.errorbar([e[x] for e in pts], [sy * e[y] for e in pts], xerr=_bars(pts, x, 1),
                            yerr=_bars(pts, y, sy), color=color(method, family), ls=LINES[family],
                            marker=MARKERS[family], ms=4, lw=1.2, capsize=2, label=f"{method} ({family})")
                for e in pts:
                    ax.annotate(knob_text(family, e), (e[x], sy * e[y]), fontsize=6, color=color(method, family),
                                xytext=(3, 3), textcoords="offset points")
        for name, e in anchors.items():
            marker, c = marks.get(name, ("D", "k"))
            ax.errorbar([e[x]], [sy * e[y]], xerr=_bars([e], x, 1), yerr=_bars([e], y, sy), marker=marker, ms=8,
                        mfc="none" if name != "sft" else c, color=c, ls="none", capsize=2, label=name)
        if x == "kl_to_sft":
            # KL spans two orders of magnitude across methods; linear below 1 keeps the SFT model's 0
            ax.set_xscale("symlog", linthresh=1.0)
        ax.set_xlabel(xl + (" (linear below 1, log above)" if x == "kl_to_sft" else ""))
        ax.set_ylabel(yl)
        ax.grid(True, alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=(len(labels) + 1) // 2, fontsize=8, frameon=False)
    fig.suptitle("Helpfulness-safety frontiers: seed means, bars = 95% t intervals over seeds (clipped at 0); "
                 "labels: β/λ (H->S, DPO->S), merge weight (P)", fontsize=10)
    fig.tight_layout(rect=(0, 0.11, 1, 1))
    path = Path(path) if path is not None else Path(out) / "frontier.png"
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
                            color=color(run.split()[0], "DPO->S" if "DPO->S" in run else None), lw=1.2)
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
