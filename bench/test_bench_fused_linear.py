"""Benchmark of the preference loss from hidden states (issues 5 and 22), forward + backward.

N = 2048 tokens (8 sequences of 256: 4 pairs), H = 1024, float32, every token labelled, at
V = 32000 (every variant) and at Llama-3's V = 128256 (dpo: fused and Liger only; BENCH_VOCAB2=0
leaves it out). Variants: (a) "plain" both models' logits materialised + the plain formulation
of the published Ra-DPO code, and "compiled" the same under torch.compile
(rsa/bench/baselines.py; compiled in an untimed warm-up at the measured size), (b) "fused"
fused_linear_preference_loss with its default chunks (and "fused_tokens", the token schedule
forced), (c) "liger" LigerFusedLinearDPOLoss (dpo only). Time by pytest-benchmark (median of
BENCH_ROUNDS, default 3, at V = 32000 and of BENCH_ROUNDS2, default 2, at V = 128256, after
one warm-up round), of every variant but "compiled"; peak resident memory above inputs,
weights and their gradients in a fresh subprocess per measurement (median of
BENCH_MEMORY_REPEATS, default 2; the baselines once), of every variant. Goals, reported as ratios, each naming its baseline, not asserted (the machine may
be shared): rsa2/cvar:0.9 fused extra memory <= 1/4 of plain's; dpo fused at least 0.95x
Liger's speed and no larger in memory, at both vocabularies.

    .venv/bin/python -m pytest bench/test_bench_fused_linear.py -s    # writes out/bench_fused_linear.json
"""
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from peak_memory_fused import make_step  # noqa: E402

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
ROUNDS2 = int(os.environ.get("BENCH_ROUNDS2", "2"))          # at VOCAB2, where a step takes ~30 s
MEMORY_REPEATS = int(os.environ.get("BENCH_MEMORY_REPEATS", "2"))
VOCAB, VOCAB2 = 32000, int(os.environ.get("BENCH_VOCAB2", "128256"))
BASELINES = ("plain", "compiled")
# memory of every variant; time of all but "compiled" (its compilation, minutes at this size
# on a CPU, would double the run; `rsa bench` times it at the fused centre)
MEMORY_CASES = [("rsa2", "cvar:0.9", v, VOCAB) for v in ("plain", "compiled", "fused", "fused_tokens")] + \
               [("dpo", "kl", v, VOCAB) for v in ("plain", "compiled", "fused", "liger")] + \
               ([("dpo", "kl", v, VOCAB2) for v in ("fused", "liger")] if VOCAB2 else [])
TIME_CASES = [c for c in MEMORY_CASES if c[2] != "compiled"]


def _ids(cases):
    return [f"{o}-{v}-V{vocab}" for o, _, v, vocab in cases]


RESULTS: dict = {}
OUT = HERE.parent / "out" / "bench_fused_linear.json"


def _available(variant):
    if variant == "liger":
        pytest.importorskip("liger_kernel.chunked_loss")


@pytest.mark.parametrize("objective,risk,variant,vocab", TIME_CASES, ids=_ids(TIME_CASES))
def test_time(benchmark, objective, risk, variant, vocab):
    _available(variant)
    make_step(variant, objective, risk, sequences=2, length=16, hidden_size=32, vocab=256)[0]()  # warm-up
    step, _ = make_step(variant, objective, risk, vocab=vocab)
    benchmark.group = f"{objective}-V{vocab}"
    # one warm-up round at this size (first-touch allocations; the compilation for "compiled")
    benchmark.pedantic(step, rounds=ROUNDS if vocab == VOCAB else ROUNDS2, iterations=1, warmup_rounds=1)
    s = benchmark.stats.stats
    RESULTS.setdefault((objective, variant, vocab), {}).update(seconds=s.median, min_s=s.min, max_s=s.max)


@pytest.mark.parametrize("objective,risk,variant,vocab", MEMORY_CASES, ids=_ids(MEMORY_CASES))
def test_memory(objective, risk, variant, vocab):
    _available(variant)
    runs = []
    # a baseline is read once (a low reading could only understate it; its compile is minutes)
    for _ in range(1 if variant in BASELINES else MEMORY_REPEATS):
        out = subprocess.run([sys.executable, str(HERE / "peak_memory_fused.py"), variant, "--objective", objective,
                              "--risk", risk, "--vocab", str(vocab)], capture_output=True, text=True, check=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1])["extra_bytes"])
    RESULTS.setdefault((objective, variant, vocab), {})["extra_bytes"] = statistics.median(runs)


def _ratio(objective, a, b, key, vocab=VOCAB):
    try:
        return RESULTS[(objective, a, vocab)][key] / RESULTS[(objective, b, vocab)][key]
    except KeyError:
        return None


def _speed(objective, a, b, vocab=VOCAB):
    """b's time / a's: a's speed as a multiple of b's."""
    return _ratio(objective, b, a, "seconds", vocab)


def test_report():
    """Ratios against the baselines measured in this run, printed and written to out/."""
    goals = {
        "rsa2 fused/plain extra memory (goal <= 0.25)": (_ratio("rsa2", "fused", "plain", "extra_bytes"), 0.25, "<="),
        "rsa2 fused_tokens/plain extra memory": (_ratio("rsa2", "fused_tokens", "plain", "extra_bytes"), None, ""),
        "rsa2 fused/compiled extra memory": (_ratio("rsa2", "fused", "compiled", "extra_bytes"), None, ""),
        "rsa2 fused speed, x plain": (_speed("rsa2", "fused", "plain"), None, ""),
        "dpo fused speed, x plain": (_speed("dpo", "fused", "plain"), None, ""),
        "dpo fused/compiled extra memory": (_ratio("dpo", "fused", "compiled", "extra_bytes"), None, ""),
        "dpo fused/plain extra memory": (_ratio("dpo", "fused", "plain", "extra_bytes"), None, ""),
    }
    for vocab in (VOCAB, VOCAB2) if VOCAB2 else (VOCAB,):
        goals[f"V={vocab} dpo fused speed, x liger (goal >= 0.95)"] = (_speed("dpo", "fused", "liger", vocab), 0.95, ">=")
        goals[f"V={vocab} dpo fused/liger extra memory (goal <= 1)"] = (
            _ratio("dpo", "fused", "liger", "extra_bytes", vocab), 1.0, "<=")

    def met(v, g, how):
        return None if v is None or g is None else (v <= g if how == "<=" else v >= g)
    report = {"results": {f"{o}/{v}/V{vocab}": r for (o, v, vocab), r in RESULTS.items()},
              "ratios": {k: {"value": v, "goal": g, "met": met(v, g, how)} for k, (v, g, how) in goals.items()}}
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(report, indent=2))
    print()
    print("| objective | variant | V | time, median (min-max) | extra memory |")
    print("|---|---|---|---|---|")
    for (o, v, vocab), r in sorted(RESULTS.items(), key=lambda kv: (kv[0][2], kv[0][0], kv[0][1])):
        t = f"{r['seconds']:.2f} s ({r['min_s']:.2f}-{r['max_s']:.2f})" if "seconds" in r else "not timed"
        mem = f"{r['extra_bytes'] / 2**20:.1f} MiB" if "extra_bytes" in r else "-"
        print(f"| {o} | {v} | {vocab} | {t} | {mem} |")
    for k, entry in report["ratios"].items():
        v = entry["value"]
        print(f"{k}: {'n/a' if v is None else f'{v:.3f}'}" + ("" if entry["met"] is None else
                                                              f"  {'met' if entry['met'] else 'NOT met'}"))
