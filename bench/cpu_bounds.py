"""How close the cpu kernels are to what bounds them: memory bandwidth and exp throughput.

    PYTHONPATH=. .venv/bin/python bench/cpu_bounds.py            # N=1024, V=32000, float32
    PYTHONPATH=. .venv/bin/python bench/cpu_bounds.py --reps 9 --n 256

In one run, interleaved repetition by repetition (medians reported), on the same (N, V)
float32 rows as the kernels:
  memory  read:  z.sum() + zr.sum()                  (the forward's traffic: both rows once)
          write: torch.add(z, zr, out=buf)            (the backward's: both rows in, one out)
          fresh: the same into a new gradient tensor  (plus first-touch page faults)
          fresh2M: the same into a new tensor on 2 MiB pages (_C.fresh_like: what the kernels'
                 backward returns; fresh stays the bound with RSA_CPU_HUGE_PAGES=0)
          copy:  buf.copy_(z)                          (for reference)
  exp     _C.exp_throughput(k N V): the kernels' own vectorised exp on cache-resident
          values, k = the exps per item of each pass (forward: 2 for kl, 3 for the others;
          backward: 2, erm 3)
  kernels cpu_rows.forward, cpu_rows.backward (into a fresh gradient, as autograd does)
For each pass: bound = max(memory, exp) (they overlap when the kernel streams), and the
kernel's time over it. The rest of a cvar / ra_dpo_cvar forward is the selection (select.h):
reported as forward - the kl forward - one extra exp sweep. Prints a table, and JSON with
--json. Threads: torch's (torch.set_num_threads / --threads).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from rsa_kernels import _C
from rsa_kernels.backends import cpu_rows
from rsa_kernels.risk import parse_risk

RISKS = ["kl", "erm:1", "cvar:0.9", "ra_dpo_cvar:0.95"]
FWD_EXPS = {"kl": 2, "erm": 3, "cvar": 3, "ra_dpo_cvar": 3}
BWD_EXPS = {"kl": 2, "erm": 3, "cvar": 2, "ra_dpo_cvar": 2}


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--v", type=int, default=32000)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", action="store_true", help="print the results as JSON too")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    n, v = args.n, args.v
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(n, v, generator=gen)
    zr = z + 0.5 * torch.randn(n, v, generator=gen)
    labels = torch.randint(0, v, (n,), generator=gen)
    grads = torch.randn(n, 3, generator=gen)
    buf = torch.zeros_like(z)
    risks = [parse_risk(r) for r in RISKS]
    saved = {r: cpu_rows.forward(z, zr, labels, r, -100)[1] for r in risks}

    jobs = {
        "mem_read": lambda: (z.sum(), zr.sum()),
        "mem_write": lambda: torch.add(z, zr, out=buf),
        "mem_fresh": lambda: torch.add(z, zr, out=torch.empty_like(z)),
        "mem_fresh2M": lambda: torch.add(z, zr, out=_C.fresh_like(z)),
        "copy": lambda: buf.copy_(z),
    }
    for k in sorted(set(FWD_EXPS.values()) | set(BWD_EXPS.values())):
        jobs[f"exp{k}"] = (lambda k=k: _C.exp_throughput(k * n * v))
    for r in risks:
        jobs[f"fwd {r}"] = (lambda r=r: cpu_rows.forward(z, zr, labels, r, -100))
        jobs[f"bwd {r}"] = (lambda r=r: cpu_rows.backward(z, zr, labels, saved[r], grads, r, -100))
    times = {k: [] for k in jobs}
    for fn in jobs.values():
        fn()  # warm up
    for _ in range(args.reps):
        for k, fn in jobs.items():
            times[k].append(timed(fn))
    med = {k: statistics.median(t) for k, t in times.items()}
    fresh = "mem_fresh2M" if cpu_rows.HUGE_PAGES else "mem_fresh"  # what the backward allocates

    rows = []
    for r in risks:
        fe, be = FWD_EXPS[r.kind], BWD_EXPS[r.kind]
        f_bound = max(med["mem_read"], med[f"exp{fe}"])
        b_bound = max(med[fresh], med[f"exp{be}"])
        row = {
            "risk": str(r),
            "fwd_s": med[f"fwd {r}"], "fwd_exp_s": med[f"exp{fe}"], "fwd_mem_s": med["mem_read"],
            "fwd_over_bound": med[f"fwd {r}"] / f_bound,
            "bwd_s": med[f"bwd {r}"], "bwd_exp_s": med[f"exp{be}"], "bwd_mem_s": med[fresh],
            "bwd_over_bound": med[f"bwd {r}"] / b_bound,
            "fwd_bound": "exp" if med[f"exp{fe}"] >= med["mem_read"] else "memory",
            "bwd_bound": "exp" if med[f"exp{be}"] >= med[fresh] else "memory",
        }
        if r.kind in ("cvar", "ra_dpo_cvar"):
            kl = parse_risk("kl")
            row["selection_s"] = med[f"fwd {r}"] - med[f"fwd {kl}"] - (med["exp3"] - med["exp2"])
        rows.append(row)

    ms = lambda s: f"{s * 1e3:7.1f}"  # noqa: E731
    print(f"N={n} V={v} float32, {torch.get_num_threads()} threads, median of {args.reps} interleaved reps (ms)")
    print(f"memory: read z+zr {ms(med['mem_read'])}  z+zr -> out {ms(med['mem_write'])}  "
          f"-> fresh out {ms(med['mem_fresh'])}  -> fresh on 2 MiB pages {ms(med['mem_fresh2M'])}  "
          f"copy z {ms(med['copy'])}")
    print("exp:    " + "  ".join(f"{k} per item {ms(med[f'exp{k}'])}" for k in sorted({*FWD_EXPS.values(), *BWD_EXPS.values()})))
    print(f"{'risk':18} {'fwd':>7} {'bound':>7} {'by':>6} {'x':>5} | {'bwd':>7} {'bound':>7} {'by':>6} {'x':>5} | select")
    for row in rows:
        fb = max(row["fwd_exp_s"], row["fwd_mem_s"])
        bb = max(row["bwd_exp_s"], row["bwd_mem_s"])
        sel = ms(row["selection_s"]) if "selection_s" in row else ""
        print(f"{row['risk']:18} {ms(row['fwd_s'])} {ms(fb)} {row['fwd_bound']:>6} {row['fwd_over_bound']:5.2f} | "
              f"{ms(row['bwd_s'])} {ms(bb)} {row['bwd_bound']:>6} {row['bwd_over_bound']:5.2f} | {sel}")
    result = {"n": n, "v": v, "threads": torch.get_num_threads(), "reps": args.reps, "median_s": med, "rows": rows}
    if args.json:
        print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
