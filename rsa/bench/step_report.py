"""The training-step section of report.md (and step.png) from results.json's "train_step".

Per contender and vocabulary: the median step time over every timed step of every round (wall
and the process's CPU time, the steadier on a shared machine), the step's memory (its peak above what was held at its start, less the gradients: so above the
model, the reference, the gradients and the optimizer state), and the split of the time.
Ratios read this / that (0.50x = half the time or memory of contender 1, or of 6).
"""
from __future__ import annotations

import statistics

from .step_contenders import LABELS

MiB = 2 ** 20
SPLIT = (("body_forward_cpu_s", "body fwd"), ("head_cpu_s", "lm head + loss"), ("body_backward_cpu_s", "body bwd"),
         ("optimizer_cpu_s", "optimizer"), ("other_cpu_s", "other"))


def summarize(train: dict) -> dict:
    """{(name, vocab): figures} over the rounds' timed steps; errors kept as {"error": text}."""
    out = {}
    for name in train["contenders"]:
        for vocab in train["sizes"]["vocabs"]:
            runs = [r for r in train["runs"] if r["name"] == name and r["vocab"] == vocab]
            steps = [s for r in runs if "steps" in r for s in r["steps"] if not s["warmup"]]
            if not steps:
                errs = [r.get("error") for r in runs if r.get("error")]
                out[(name, vocab)] = {"error": errs[0] if errs else "not measured"}
                continue
            grad = next((r["grad_bytes"] for r in runs if r.get("grad_bytes")), 0) or 0
            cpu = [s["total_cpu_s"] for s in steps if s.get("total_cpu_s") is not None]
            row = {"time_s": statistics.median(s["total_s"] for s in steps), "steps": len(steps),
                   "cpu_s": statistics.median(cpu) if cpu else None,
                   "rounds": sum(1 for r in runs if "steps" in r), "grad_bytes": grad,
                   "peak_bytes": max(s["peak_bytes"] for s in steps),
                   "memory_bytes": max(max(0, s["peak_bytes"] - grad) for s in steps),
                   "last_loss": next((r["losses"][-1] for r in runs if r.get("losses")), None),
                   "optimizer": next((r.get("optimizer") for r in runs if r.get("optimizer")), None)}
            for key, _ in SPLIT:
                vals = [s[key] for s in steps if s.get(key) is not None]
                row[key] = statistics.median(vals) if vals else None
            out[(name, vocab)] = row
    return out


def _ratio(a, b) -> str:
    return f"{a / b:.2f}x" if a is not None and b else "-"


def _fmt_mib(b) -> str:
    return f"{b / MiB:.3g} MiB"


def _fmt_s(s) -> str:
    return "-" if s is None else (f"{s:.3g} s" if s >= 1 else f"{s * 1e3:.3g} ms")


def table(train: dict, vocab: int, summary: dict | None = None) -> list[str]:
    s = summary or summarize(train)
    ref1, ref6 = s.get(("trl_dpo", vocab), {}), s.get(("plain", vocab), {})
    lines = ["| contender | step time | / 1 | / 6 | CPU time | / 1 | / 6 | step memory | / 1 | / 6 | "
             + " | ".join(f"{label} (CPU)" for _, label in SPLIT) + " |",
             "|---|---|---|---|---|---|---|---|---|---|" + "---|" * len(SPLIT)]
    for name in train["contenders"]:
        m = s[(name, vocab)]
        if "error" in m:
            lines.append(f"| {LABELS.get(name, name)} | not measured: {m['error'][:120]} |")
            continue
        lines.append(
            f"| {LABELS.get(name, name)} | {_fmt_s(m['time_s'])} | {_ratio(m['time_s'], ref1.get('time_s'))} | "
            f"{_ratio(m['time_s'], ref6.get('time_s'))} | {_fmt_s(m['cpu_s'])} | "
            f"{_ratio(m['cpu_s'], ref1.get('cpu_s'))} | {_ratio(m['cpu_s'], ref6.get('cpu_s'))} | "
            f"{_fmt_mib(m['memory_bytes'])} | "
            f"{_ratio(m['memory_bytes'], ref1.get('memory_bytes'))} | "
            f"{_ratio(m['memory_bytes'], ref6.get('memory_bytes'))} | "
            + " | ".join(_fmt_s(m[k]) for k, _ in SPLIT) + " |")
    return lines


GOALS = (  # (text, contender, against, what, at most)
    ("RSA rsa2 (4) time <= 0.5x TRL DPO (1)", "rsa_rsa2", "trl_dpo", "time_s", 0.5),
    ("rsa train (5) time <= 0.5x TRL DPO (1)", "rsa_train", "trl_dpo", "time_s", 0.5),
    ("RSA rsa2 (4) step memory <= 0.4x TRL DPO (1)", "rsa_rsa2", "trl_dpo", "memory_bytes", 0.4),
    ("rsa train (5) step memory <= 0.4x TRL DPO (1)", "rsa_train", "trl_dpo", "memory_bytes", 0.4),
    ("RSA rsa2 (4) step memory <= TRL + Liger loss (2)", "rsa_rsa2", "trl_liger", "memory_bytes", 1.0),
    ("rsa train (5) step memory <= TRL + Liger loss (2)", "rsa_train", "trl_liger", "memory_bytes", 1.0),
    ("the risk nearly free: (4) time <= 1.1x RSA dpo (3)", "rsa_rsa2", "rsa_dpo", "time_s", 1.1),
    ("(4) time <= 1/3 of plain Ra-DPO (6)", "rsa_rsa2", "plain", "time_s", 1 / 3),
    ("(4) step memory <= 0.3x plain Ra-DPO (6)", "rsa_rsa2", "plain", "memory_bytes", 0.3),
    ("rsa train (5) time within 5% of (4)", "rsa_train", "rsa_rsa2", "time_s", 1.05),
)


def goals(train: dict, vocab: int, summary: dict | None = None) -> list[str]:
    s = summary or summarize(train)
    lines = []
    for text, a, b, key, limit in GOALS:
        ma, mb = s.get((a, vocab), {}), s.get((b, vocab), {})
        parts = []
        for label, k in ((("wall", "time_s"), ("CPU", "cpu_s")) if key == "time_s" else (("", key),)):
            if ma.get(k) is not None and mb.get(k):
                r = ma[k] / mb[k]
                parts.append(f"{label + ' ' if label else ''}{r:.2f}x, {'met' if r <= limit else 'NOT met'}")
        lines.append(f"- {text}: {'; '.join(parts) if parts else 'not measured'}")
    return lines


def render_section(results: dict) -> list[str]:
    train = results.get("train_step")
    if not train:
        return []
    z = train["sizes"]
    s = summarize(train)
    opt = next((m["optimizer"] for m in s.values() if m.get("optimizer")), "?")
    lines = [
        "", "## One training step: TRL's DPOTrainer, Liger, RSA and the plain formulation", "",
        f"`{train.get('command') or 'rsa bench --train'}` ({train.get('mode')}), {train['seconds']:.0f} s. "
        f"A Llama-shaped model from a config (random weights, untied head): {z['layers']} layers, H={z['hidden']}, "
        f"{z['heads']} heads, intermediate {z['intermediate']}; {z['pairs']} pairs a step, prompt {z['prompt']} and "
        f"responses {z['response']} tokens ({z['pairs'] * 2 * (z['prompt'] + z['response'])} tokens a step), "
        f"{train['dtype']}, optimizer {opt}, {train['threads']} torch thread(s), one process; the same model, pairs "
        f"and seed for every contender. Each contender runs in a fresh process per vocabulary and round "
        f"({z['rounds']} round(s), contenders' order rotated each round): {z['warmup']} untimed step(s) first (the "
        f"first creates the optimizer state), then {z['steps']} timed steps.", "",
        "Step time: the median over every timed step (Trainer's on_step_begin to on_step_end: forward of both "
        "models, loss, backward, clipping, optimizer, zero_grad). Step memory: the peak during the step above what "
        "was held at its start (model, reference, optimizer state), less the gradients' size (so above the model, "
        "reference, gradients and optimizer state), the largest over the timed steps; "
        + ("the CUDA allocator's peak." if train["device"].startswith("cuda") else
           "CPU resident set: VmHWM reset by writing 5 to /proc/self/clear_refs at the step's start, glibc returning "
           "large blocks at once (MALLOC_MMAP_THRESHOLD_).")
        + " Ratios: this / that, so 0.50x is half the time or memory of contender 1 (TRL's DPOTrainer) or of 6 "
        "(the plain formulation). CPU time: the process's (one torch thread: what the step costs whatever share of a "
        "core it got, so the steadier figure on a shared machine). The split's columns are CPU-time medians over the "
        "same steps (rsa/bench/step_meter.py).", ""]
    for vocab in z["vocabs"]:
        p = train.get("products", {}).get(str(vocab), {})
        cpu = f" ({_fmt_s(p['four_products_cpu_s'])} CPU)" if p.get("four_products_cpu_s") else ""
        prod = (f" The lm head's four products (policy forward and its two backward products, reference forward) "
                f"at N={p['n']}, H={p['h']}, V={vocab}, measured apart: {_fmt_s(p['four_products_s'])}{cpu}."
                if p.get("four_products_s") else "")
        lines += [f"### V = {vocab}", "", *table(train, vocab, s), "", f"Goals at V = {vocab}:{prod}", "",
                  *goals(train, vocab, s), ""]
    losses = {k: m["last_loss"] for k, m in s.items() if m.get("last_loss") is not None}
    if losses:
        lines += ["The last step's loss in round 1. 1, 2 and 3 compute the same dpo loss, 4, 5 and 6 the same rsa2 "
                  "loss (tests/test_bench_train_step.py); from policy = reference the first gradients are tiny and "
                  "Adam's normalised steps amplify their rounding, so after a few updates the losses agree only where "
                  "the implementation is the same (4 and 5): "
                  + ", ".join(f"{n} V={v}: {x:.7g}" for (n, v), x in sorted(losses.items())), ""]
    return lines


def write_plot(results: dict, path) -> None:
    """step.png: per vocabulary, the step time split into its parts, and the step memory."""
    train = results.get("train_step")
    if not train:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = summarize(train)
    vocabs = train["sizes"]["vocabs"]
    names = train["contenders"]
    fig, axes = plt.subplots(len(vocabs), 2, figsize=(12, 3.8 * len(vocabs)), squeeze=False)
    for vocab, (ax_t, ax_m) in zip(vocabs, axes):
        ok = [n for n in names if "error" not in s[(n, vocab)]]
        labels = [LABELS.get(n, n).split(" ", 1)[0] + " " + n for n in ok]
        left = [0.0] * len(ok)
        for key, label in SPLIT:
            vals = [s[(n, vocab)][key] or 0.0 for n in ok]
            ax_t.barh(labels, vals, left=left, label=label)
            left = [a + b for a, b in zip(left, vals)]
        ax_t.set_xlabel("CPU seconds per step (medians of the parts)")
        ax_t.set_title(f"step time, V={vocab}", fontsize=10)
        ax_t.invert_yaxis()
        ax_t.legend(fontsize=7)
        ax_m.barh(labels, [s[(n, vocab)]["memory_bytes"] / MiB for n in ok], color="tab:gray")
        ax_m.set_xlabel("MiB above model, reference, gradients, optimizer state")
        ax_m.set_title(f"step memory, V={vocab}", fontsize=10)
        ax_m.invert_yaxis()
    fig.suptitle(f"One training step, {results['machine']['device_name']} ({train['dtype']})", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
