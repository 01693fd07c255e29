"""The triton slice kernels under a process group: two processes on the one GPU, over gloo.

    python bench/gpu_check_vocab_parallel.py                  # on CUDA: N=4096, V=128256
    python bench/gpu_check_vocab_parallel.py --device cpu --tiny   # the dry run (TRITON_INTERPRET=1)

Each rank holds an uneven slice of the vocabulary; rsa_kernels.token_stats with
process_group= and backend="triton" must give the statistics and the slice's gradient of the
single-process triton kernels on the whole rows (computed by each rank itself, on the same
inputs from the same seed). Every risk, float32 and bfloat16; then the median time of one
forward + backward of both. Nothing in the tests covers this on a GPU (tests/test_vocab_parallel.py
runs the triton slice kernels interpreted on CPU tensors). Exit status 1 if any check fails.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

RISKS = ("kl", "erm:1", "cvar:0.9", "ra_dpo_cvar:0.95")
# the dry run's cases (the interpreter takes seconds per call): one risk without a search, two with
TINY = (("float32", "kl"), ("float32", "cvar:0.9"), ("bfloat16", "ra_dpo_cvar:0.95"))
TOL = {"float32": dict(rtol=2e-4, atol=2e-5), "bfloat16": dict(rtol=2e-2, atol=2e-3)}


def _sync(dev):
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize()


def worker(rank: int, world: int, init_file: str, device: str, tiny: bool, out: str) -> None:
    import torch
    import torch.distributed as dist

    import rsa_kernels as rk

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    dev = torch.device("cuda:0" if device == "cuda" else "cpu")   # both ranks on the one GPU
    n, v = (12, 300) if tiny else (4096, 128256)
    widths = [int(v * 0.45)] + [v - int(v * 0.45)]                  # uneven slices
    start = sum(widths[:rank])
    cols = slice(start, start + widths[rank])
    rows = []
    cases = TINY if tiny else [(dt, r) for dt in ("float32", "bfloat16") for r in RISKS]
    for seed, (dtype, risk) in enumerate(cases):
        dt = getattr(torch, dtype)
        if True:  # (one block per case)
            g = torch.Generator(device=dev).manual_seed(seed)
            z = (torch.randn(n, v, generator=g, device=dev) * 2).to(dt)
            zr = (torch.randn(n, v, generator=g, device=dev) * 2).to(dt)
            y = torch.randint(0, v, (n,), generator=g, device=dev)
            y[::5] = -100
            w = torch.randn(4, n, generator=g, device=dev)

            def loss(stats):
                return sum((wk * s.float()).sum() for wk, s in zip(w, stats))
            row = {"rank": rank, "dtype": dtype, "risk": risk, "n": n, "v": v}
            try:
                full = z.clone().requires_grad_()
                want = rk.token_stats(full, zr, y, risk=risk, backend="triton")
                loss(want).backward()
                part = z[:, cols].clone().requires_grad_()
                got = rk.token_stats(part, zr[:, cols], y, risk=risk, backend="triton", process_group=dist.group.WORLD)
                loss(got).backward()
                errs = [float((a.float() - b.float()).abs().nan_to_num().max()) for a, b in zip(got, want)]
                errs.append(float((part.grad.float() - full.grad[:, cols].float()).abs().nan_to_num().max()))
                row["max_abs_err"] = max(errs)
                for a, b in [*zip(got, want), (part.grad, full.grad[:, cols])]:
                    torch.testing.assert_close(a.float(), b.float(), equal_nan=True, **TOL[dtype])
                row["ok"] = True
                for name, x, kw in (("single_ms", z, {}), ("parallel_ms", z[:, cols], {"process_group": dist.group.WORLD})):
                    times = []
                    ref = zr if name == "single_ms" else zr[:, cols]
                    for _ in range(1 if tiny else 3):
                        t = x.clone().requires_grad_()
                        dist.barrier()
                        _sync(dev)
                        t0 = time.perf_counter()
                        loss(rk.token_stats(t, ref, y, risk=risk, backend="triton", **kw)).backward()
                        _sync(dev)
                        times.append((time.perf_counter() - t0) * 1e3)
                    row[name] = statistics.median(times)
            except Exception as err:  # noqa: BLE001 - recorded, so the other rank is not left waiting forever
                row["ok"], row["error"] = False, f"{type(err).__name__}: {err}"[:400]
            rows.append(row)
    Path(out).write_text(json.dumps(rows))
    dist.destroy_process_group()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--tiny", action="store_true", help="small sizes (the CPU dry run)")
    p.add_argument("--rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--init", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.rank is not None:
        worker(a.rank, 2, a.init, a.device, a.tiny, a.out)
        return 0
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS="1")
    if a.device == "cpu":
        env["TRITON_INTERPRET"] = "1"
    with tempfile.TemporaryDirectory() as tmp:
        procs = [subprocess.Popen([sys.executable, __file__, "--device", a.device, "--rank", str(r),
                                   "--init", f"{tmp}/rendezvous", "--out", f"{tmp}/rank{r}.json"]
                                  + (["--tiny"] if a.tiny else []), env=env) for r in range(2)]
        codes = [pr.wait(timeout=600) for pr in procs]
        results = [json.loads(Path(f"{tmp}/rank{r}.json").read_text()) if Path(f"{tmp}/rank{r}.json").exists()
                   else [] for r in range(2)]
    print("| rank | dtype | risk | N | V | ok | max abs err | single ms | 2 ranks ms | error |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    failed = any(codes) or not all(results)
    for rows in results:
        for r in rows:
            failed |= not r["ok"]
            print(f"| {r['rank']} | {r['dtype']} | {r['risk']} | {r['n']} | {r['v']} | {r['ok']} | "
                  f"{r.get('max_abs_err', float('nan')):.3g} | {r.get('single_ms', float('nan')):.3g} | "
                  f"{r.get('parallel_ms', float('nan')):.3g} | {r.get('error', '')} |")
    print(f"vocabulary-parallel triton slice kernels: {'FAILED' if failed else 'all passed'} (exit codes {codes})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
