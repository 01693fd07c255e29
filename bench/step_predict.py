"""What a measured training-step split predicts for a 7B model: arithmetic, not a measurement.

    python bench/step_predict.py out/bench/step.json     # (or results.json of `rsa bench --train`)

From each contender's median split at each measured vocabulary (rsa/bench/step_meter.py) and
the machine's matrix-product rate (the lm head's four products, timed apart at the step's
size by rsa/bench/step_run.py):
- body: 8 P N flops (the policy's forward 2PN and backward 4PN, the reference's forward 2PN)
  plus attention's 16 L T^2 H per sequence, at the measured product rate (the small body's
  own time is not scaled: its small products run far below that rate);
- the contender's lm-head-and-loss time, split into products (at most the four measured
  apart) scaled with tokens x H x V, and the rest (log-softmax, statistics, copies) with tokens x V;
- optimizer and other (clipping, zero_grad) with all parameters.
The 7B model is Llama-2-7B's body (32 layers, H=4096, intermediate 11008: 6.48e9 parameters)
with an untied head of the same V; a step is 2 pairs of sequences of T tokens (N = 4 T).
Memory: what a contender holds at its peak beyond RSA's rsa2 step, in float32 (tokens, V)
copies at the measured size, held at 7B's token counts (RSA's own chunks stay at their
memory budget, 128 MiB of logits by default, whatever N and V).
"""
from __future__ import annotations

import json
import statistics
import sys

H7, L7, I7 = 4096, 32, 11008
SEQS = (512, 2048)


def body_params(layers, hidden, intermediate, heads=None, kv_heads=None) -> int:
    kv = hidden if not heads else hidden * (kv_heads or heads) // heads
    return layers * (2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * intermediate)


def split(train: dict, name: str, vocab: int) -> dict | None:
    steps = [s for r in train["runs"] if r["name"] == name and r["vocab"] == vocab and "steps" in r
             for s in r["steps"] if not s["warmup"]]
    if not steps:
        return None
    cpu = all(s.get("total_cpu_s") is not None for s in steps)  # CPU time where recorded: steadier when shared
    med = {k: statistics.median(s[k.replace("_s", "_cpu_s") if cpu else k] for s in steps)
           for k in ("total_s", "body_forward_s", "head_s", "body_backward_s", "optimizer_s", "other_s")}
    return med


def predict(train: dict) -> list[str]:
    z = train["sizes"]
    n = 2 * z["pairs"] * (z["prompt"] + z["response"])
    pb = body_params(z["layers"], z["hidden"], z["intermediate"], z["heads"], z["kv_heads"])
    pb7 = body_params(L7, H7, I7)
    lines = [f"Measured: {z['layers']} layers, H={z['hidden']} ({pb / 1e6:.1f}M body parameters), N={n} tokens a "
             f"step. Predicted for a 7B body ({pb7 / 1e9:.2f}e9 parameters, H={H7}), 2 pairs of T-token sequences, "
             "on the machine measured (seconds are this machine's, the shares and ratios are the point):",
             "", "| V | contender | T | body | lm head products | head rest | optimizer + other | step | "
             "head share | step / TRL's |", "|---|---|---|---|---|---|---|---|---|---|"]
    for vocab in z["vocabs"]:
        prod = train.get("products", {}).get(str(vocab), {})
        four = prod.get("four_products_cpu_s") or prod.get("four_products_s")
        if not four:
            continue
        per_prod = four / (prod["n"] * prod["h"] * vocab)           # seconds per (token x H x V), 4 products
        rate = 4 * 2 * prod["n"] * prod["h"] * vocab / four          # flop/s of a large product here
        p_all, p_all7 = pb + 2 * vocab * z["hidden"], pb7 + 2 * vocab * H7
        base = {}
        for name in train["contenders"]:
            m = split(train, name, vocab)
            if m is None:
                continue
            products = min(m["head_s"], per_prod * n * z["hidden"] * vocab)
            rest = m["head_s"] - products
            opt = m["optimizer_s"] + m["other_s"]
            for t in SEQS:
                n7 = 4 * t
                b7 = (8 * pb7 * n7 + 4 * 16 * L7 * t * t * H7) / rate
                pr7 = products * (n7 * H7) / (n * z["hidden"])
                re7 = rest * n7 / n
                o7 = opt * p_all7 / p_all
                step = b7 + pr7 + re7 + o7
                base.setdefault(t, step) if name == "trl_dpo" else None
                rel = f"{step / base[t]:.2f}x" if t in base else "-"
                lines.append(f"| {vocab} | {name} | {t} | {b7:.0f} s | {pr7:.0f} s | {re7:.0f} s | {o7:.0f} s | "
                             f"{step:.0f} s | {(pr7 + re7) / step:.0%} | {rel} |")
    lines += ["", "| V | contender | step memory beyond RSA rsa2's, in (N, V) float32 copies | predicted beyond RSA's "
              "at T=512 | at T=2048 |", "|---|---|---|---|---|"]
    from rsa.bench.step_report import summarize

    summ = summarize(train)
    for vocab in z["vocabs"]:
        ours = summ.get(("rsa_rsa2", vocab), {}).get("memory_bytes")
        if ours is None:
            continue
        for name in train["contenders"]:
            mem = summ.get((name, vocab), {}).get("memory_bytes")
            if mem is None:
                continue
            copies = (mem - ours) / (n * vocab * 4)
            gib = [copies * 4 * t * vocab * 4 / 2 ** 30 for t in SEQS]
            lines.append(f"| {vocab} | {name} | {copies:.2f} | {gib[0]:.1f} GiB | {gib[1]:.1f} GiB |")
    return lines


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    data = json.loads(open(argv[0]).read())
    train = data.get("train_step", data)
    print("\n".join(predict(train)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
