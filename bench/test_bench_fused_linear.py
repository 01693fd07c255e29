"""Benchmark of issue 5: the preference loss from hidden states, forward + backward.

N = 2048 tokens (8 sequences of 256), H = 1024, V = 32000, float32, every token labelled.
Variants: (a) "plain" both models' logits materialised + the plain formulation of the
published Ra-DPO code, and "compiled" the same under torch.compile (rsa/bench/baselines.py;
compiled in an untimed warm-up at the measured size), (b) "fused"
fused_linear_preference_loss (and "fused_tokens", the token schedule forced), (c) "liger"
LigerFusedLinearDPOLoss (dpo only). Time by pytest-benchmark (median of BENCH_ROUNDS,
default 3); peak resident memory above inputs, weights and their gradients in a fresh
subprocess per measurement (median of BENCH_MEMORY_REPEATS, default 2). Goals, reported
as ratios, each naming its baseline, not asserted (the machine may be shared): rsa2/cvar:0.9
fused extra memory <= 1/4 of plain's; dpo fused no slower than Liger and no larger in memory.

    .venv/bin/python -m pytest bench/test_bench_fused_linear.py -s
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
MEMORY_REPEATS = int(os.environ.get("BENCH_MEMORY_REPEATS", "2"))
CASES = [("rsa2", "cvar:0.9", v) for v in ("plain", "compiled", "fused", "fused_tokens")] + \
        [("dpo", "kl", v) for v in ("plain", "compiled", "fused", "liger")]
RESULTS: dict = {}
OUT = HERE.parent / "out" / "bench_fused_linear.json"


def _available(variant):
    if variant == "liger":
        pytest.importorskip("liger_kernel.chunked_loss")


@pytest.mark.parametrize("objective,risk,variant", CASES, ids=[f"{o}-{v}" for o, _, v in CASES])
def test_time(benchmark, objective, risk, variant):
    _available(variant)
    make_step(variant, objective, risk, sequences=2, length=16, hidden_size=32, vocab=256)[0]()  # warm-up
    step, _ = make_step(variant, objective, risk)
    benchmark.group = objective
    # one warm-up round at this size: torch.compile compiles there for "compiled"
    benchmark.pedantic(step, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    RESULTS.setdefault((objective, variant), {})["seconds"] = benchmark.stats.stats.median


@pytest.mark.parametrize("objective,risk,variant", CASES, ids=[f"{o}-{v}" for o, _, v in CASES])
def test_memory(objective, risk, variant):
    _available(variant)
    runs = []
    for _ in range(MEMORY_REPEATS):
        out = subprocess.run([sys.executable, str(HERE / "peak_memory_fused.py"), variant, "--objective", objective,
                              "--risk", risk], capture_output=True, text=True, check=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1])["extra_bytes"])
    RESULTS.setdefault((objective, variant), {})["extra_bytes"] = statistics.median(runs)


def _ratio(objective, a, b, key):
    try:
        return RESULTS[(objective, a)][key] / RESULTS[(objective, b)][key]
    except KeyError:
        return None


def test_report():
    """Ratios against the baselines measured in this run, printed and written to out/."""
    goals = {
        "rsa2 fused/plain extra memory (goal <= 0.25)": (_ratio("rsa2", "fused", "plain", "extra_bytes"), 0.25),
        "rsa2 fused_tokens/plain extra memory": (_ratio("rsa2", "fused_tokens", "plain", "extra_bytes"), None),
        "rsa2 fused/plain time": (_ratio("rsa2", "fused", "plain", "seconds"), None),
        "rsa2 fused/compiled time": (_ratio("rsa2", "fused", "compiled", "seconds"), None),
        "dpo fused/liger time (goal <= 1)": (_ratio("dpo", "fused", "liger", "seconds"), 1.0),
        "dpo fused/liger extra memory (goal <= 1)": (_ratio("dpo", "fused", "liger", "extra_bytes"), 1.0),
        "dpo fused/plain time": (_ratio("dpo", "fused", "plain", "seconds"), None),
        "dpo fused/compiled time": (_ratio("dpo", "fused", "compiled", "seconds"), None),
        "dpo fused/plain extra memory": (_ratio("dpo", "fused", "plain", "extra_bytes"), None),
    }
    report = {"results": {f"{o}/{v}": r for (o, v), r in RESULTS.items()},
              "ratios": {k: {"value": v, "goal": g, "met": None if v is None or g is None else v <= g}
                         for k, (v, g) in goals.items()}}
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(report, indent=2))
    print()
    for (o, v), r in sorted(RESULTS.items()):
        mib = r.get("extra_bytes", float("nan")) / 2**20
        print(f"{o:5s} {v:13s} {r.get('seconds', float('nan')):8.2f} s  {mib:9.1f} MiB extra")
    for k, entry in report["ratios"].items():
        v = entry["value"]
        print(f"{k}: {'n/a' if v is None else f'{v:.3f}'}" + ("" if entry["met"] is None else
                                                              f"  {'met' if entry['met'] else 'NOT met'}"))
