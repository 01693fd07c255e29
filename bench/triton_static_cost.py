"""Static cost of the triton kernels, without a GPU: compile for sm_90 and read the SASS.

For each kernel (at the launch shape the backend uses) it prints the registers per thread,
spill stack, and the instructions of the loop over the vocabulary: per step, per item
(thread instructions = body x threads / items per step), the barriers and shared-memory
operations inside it, and the issue-bound time of one pass over N x V items on an H200
(132 SMs x 4 warp instructions per clock x 1.98 GHz), next to the memory floor of its bytes
(bf16 elements read and written per item, at the 4282 GB/s a copy reached on the H200).
The larger of the two is the prediction; both are lower bounds (latency stalls, which
barriers make worse, are ignored). A prediction, not a measurement; bench/gpu_bench.py
measures.

    python bench/triton_static_cost.py [--n 16384] [--v 128256]
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from rsa_kernels.backends import triton_quantile as tq, triton_rows as tr  # noqa: E402

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
H200_WARP_ISSUE_PER_S = 132 * 4 * 1.98e9
H200_COPY_BYTES_PER_S = 4282e9  # device-to-device copy (read + write), measured (docs/gpu_h200.md)
BF16 = 2
ROWS = {"y_ptr": "*i64", "stats_ptr": "*fp32", "saved_ptr": "*fp32", "aux_ptr": "*fp32"}
INTS = {"stride_z": "i32", "stride_zr": "i32", "V": "i32", "ignore_index": "i32"}


def variants():
    """(name, kernel, signature, constexprs, items per loop step, warps, options, elements moved
    per item: 2 reads, or 2 reads and 1 write for the backward)."""
    k = tr._kernels()
    stats = {"z_ptr": "*bf16", "zr_ptr": "*bf16", **ROWS, **INTS, "mu": "fp32",
             "RISK": "constexpr", "RANGE": "constexpr", "BLOCK": "constexpr", "GROUP": "constexpr"}
    for risk, code in (("kl", 0), ("erm", 1), ("cvar", 2)):
        yield (f"stats ({risk})", k.stats, stats, {"RISK": code, "RANGE": code == 2, "BLOCK": tr.BLOCK, "GROUP": tr.GROUP},
               tr.BLOCK, 8, {"enable_fp_fusion": True}, 2)
    hist = {"z_ptr": "*bf16", "zr_ptr": "*bf16", **ROWS, "ist_ptr": "*i64", "fst_ptr": "*fp32", **INTS,
            "alpha": "fp32", "lo_rank": "i32", "hi_rank": "i32", "frac": "fp32",
            **{c: "constexpr" for c in ("FIRST", "RA", "NB", "BLOCK")}}
    for ra in (False, True):
        for nb in sorted({8, tq.NBINS, 32}):
            name = f"histogram ({'ra_dpo_cvar' if ra else 'cvar'}, NB={nb})"
            yield (name, k.histogram, hist, {"FIRST": False, "RA": ra, "NB": nb, "BLOCK": tq.HIST_BLOCK},
                   tq.HIST_BLOCK, tq.HIST_WARPS, {"enable_fp_fusion": False}, 2)
    collect = {"z_ptr": "*bf16", "zr_ptr": "*bf16", "rows_ptr": "*i64", "saved_ptr": "*fp32", "ist_ptr": "*i64",
               "d_ptr": "*fp32", "q_ptr": "*fp32", "fill_ptr": "*i32", "stride_z": "i32", "stride_zr": "i32", "V": "i32",
               "cap": "i32", "RA": "constexpr", "BLOCK": "constexpr"}
    yield ("collect (cvar)", k.collect, collect, {"RA": False, "BLOCK": tq.COLLECT_BLOCK}, tq.COLLECT_BLOCK,
           tq.HIST_WARPS, {"enable_fp_fusion": False}, 2)
    back = {"z_ptr": "*bf16", "zr_ptr": "*bf16", "y_ptr": "*i64", "saved_ptr": "*fp32", "grads_ptr": "*fp32",
            "out_ptr": "*bf16", "stride_z": "i32", "stride_zr": "i32", "stride_out": "i32", "V": "i32",
            "ignore_index": "i32", "mu": "fp32", "RISK": "constexpr", "BLOCK": "constexpr"}
    for risk, code in (("kl", 0), ("cvar", 2)):
        yield (f"backward ({risk})", k.backward, back, {"RISK": code, "BLOCK": tr.BLOCK}, tr.BLOCK, 8,
               {"enable_fp_fusion": True}, 3)


def largest_loop(sass: str) -> list[str]:
    """The instructions of the longest loop: from a label to the last branch back to it."""
    lines = sass.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"^(\.L_x_\d+):", line))}
    best = (0, 0)
    for i, line in enumerate(lines):
        m = re.search(r"BRA\s+`\((\.L_x_\d+)\)", line)
        if m and m.group(1) in labels and labels[m.group(1)] < i:
            best = max(best, (labels[m.group(1)], i + 1), key=lambda r: r[1] - r[0])
    return [x for x in lines[best[0]:best[1]] if re.search(r"/\*[0-9a-f]{4}\*/", x)]


def analyse(name, fn, signature, constexprs, items, warps, options, moved, n, v, tmp):
    out = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                         target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, **options})
    path = os.path.join(tmp, "k.cubin")
    with open(path, "wb") as f:
        f.write(out.asm["cubin"])
    usage = subprocess.run([os.path.join(BIN, "cuobjdump"), "-res-usage", path],
                           capture_output=True, text=True, check=True).stdout
    regs = int(re.search(r"REG:(\d+)", usage).group(1))
    stack = int(re.search(r"STACK:(\d+)", usage).group(1))
    sass = subprocess.run([os.path.join(BIN, "nvdisasm"), "-c", path], capture_output=True, text=True,
                          check=True).stdout
    body = largest_loop(sass)
    count = lambda op: sum(1 for x in body if re.search(rf"\b{op}\b", x))  # noqa: E731
    per_item = len(body) * 32 * warps / items
    ms = n * v * per_item / 32 / H200_WARP_ISSUE_PER_S * 1e3
    floor = n * v * moved * BF16 / H200_COPY_BYTES_PER_S * 1e3
    return (f"| {name} | {warps} | {items} | {regs} | {stack} | {len(body)} | {per_item:.0f} | "
            f"{count('BAR')} | {count('LDS') + count('STS')} | {count('SHFL')} | {ms:.1f} | {floor:.1f} | "
            f"{max(ms, floor):.1f} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--v", type=int, default=128256)
    args = ap.parse_args()
    os.environ.pop("TRITON_INTERPRET", None)  # compile, never interpret
    print(f"triton {triton.__version__}, sm_90, bf16 inputs; ms per pass at N={args.n}, V={args.v}: issue-bound, "
          "memory floor, and the larger (the prediction)\n")
    print("| kernel | warps | items/step | regs | stack | loop instr | thread instr/item | BAR | LDS+STS | SHFL "
          "| issue ms | memory ms | predicted ms |")
    print("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    with tempfile.TemporaryDirectory() as tmp:
        for variant in variants():
            print(analyse(*variant, args.n, args.v, tmp), flush=True)


if __name__ == "__main__":
    main()
