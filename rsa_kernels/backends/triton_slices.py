"""The `triton` slice kernels: one rank's share of the vocabulary-parallel statistics as
Triton kernels (triton/slices.py; the contract is in rsa_kernels/backends/__init__.py).

float32 math for float32, bfloat16 and float16 rows, as the triton backend; float64 goes to
the torch slice kernels under backend="auto". Each search level reads the chunk's rows
again and keeps nothing but per-row sums between levels. CUDA tensors, or CPU tensors under
TRITON_INTERPRET=1 (the tests).
"""
from __future__ import annotations

import types

import torch

from ..risk import Risk
from ..triton_modes import interpreting, row_kernel_module
from .slice_keys import NO_KEY, RADIX_BITS, open_bracket, radix_pick as pick  # noqa: F401
from .torch_slices import fresh_like  # noqa: F401
from .triton_rows import BLOCK, unsupported  # noqa: F401  (ImportError: triton is not installed)

SLICE_BLOCK = 1024          # items per step of partials, tail
SEARCH_BLOCK = 32           # items per step of a search level: (SEARCH_BLOCK x 256) one-hot tiles
INTERPRET_SEARCH_BLOCK = 128
NUM_WARPS = 8


def _kernels():
    mod = row_kernel_module("slices")
    return types.SimpleNamespace(partials=mod.partials_kernel, search=mod.search_kernel, tail=mod.tail_kernel,
                                 backward=row_kernel_module("backward").backward_kernel)


def _opts(fusion: bool) -> dict:
    """As triton_rows: FMA contraction on for the sums, off for the search (D and the
    comparisons with the same roundings everywhere); not an interpreter option."""
    return {"num_warps": NUM_WARPS} if interpreting() else {"num_warps": NUM_WARPS, "enable_fp_fusion": fusion}


def chunk_row_bytes(width: int, acc: torch.dtype, risk: Risk) -> int:
    """The histogram and the per-row sums."""
    return 8 * (1 << RADIX_BITS) + 64


class Chunk:
    """The rows ``rows`` of one rank's columns z, zr, read where they lie."""

    def __init__(self, z, zr, rows):
        for t in (z, zr):
            reason = unsupported(t)
            if reason:
                raise RuntimeError(reason)
        if z.shape[1] > 1 and (z.stride(1) != 1 or zr.stride(1) != 1):
            z, zr = z.contiguous(), zr.contiguous()
        self.z, self.zr, self.rows = z, zr, rows.contiguous()

    def partials(self, local: torch.Tensor, risk: Risk) -> torch.Tensor:
        n = len(self.rows)
        out = torch.empty(n, 9, dtype=torch.float32, device=self.z.device)
        if n:
            mu = risk.param if risk.kind == "erm" else 0.0
            _kernels().partials[(n,)](self.z, self.zr, self.rows, local.contiguous(), out, self.z.stride(0),
                                      self.zr.stride(0), self.z.shape[1], mu, ERM=risk.kind == "erm",
                                      BLOCK=SLICE_BLOCK, **_opts(True))
        return out

    def bracket(self) -> torch.Tensor:
        return open_bracket(len(self.rows), torch.float32, self.z.device)  # no bracketed search here

    def search(self, a, ar, risk: Risk, target: float) -> "Search":
        return Search(self, a, ar, risk)


class Search:
    """Per-row sums between levels; every level reads the rows again."""

    def __init__(self, chunk: Chunk, a, ar, risk: Risk):
        n = len(chunk.rows)
        self.chunk, self.a, self.ar = chunk, a.float().contiguous(), ar.float().contiguous()
        self.weighted = risk.kind == "cvar"
        self.sums = torch.zeros(n, 3, dtype=torch.float64, device=a.device)
        self.min_above = torch.full((n,), NO_KEY, dtype=torch.int64, device=a.device)

    def _level(self, level: int, prefix: torch.Tensor) -> torch.Tensor:
        c, n = self.chunk, len(self.chunk.rows)
        levels = 32 // RADIX_BITS
        hist = torch.zeros(n if level < levels else 0, 1 << RADIX_BITS, dtype=torch.float64, device=self.a.device)
        if n:
            _kernels().search[(n,)](c.z, c.zr, c.rows, self.a, self.ar, prefix.contiguous(),
                                    hist if level < levels else self.sums, self.sums, self.min_above,
                                    c.z.stride(0), c.zr.stride(0), c.z.shape[1], LEVEL=level, LEVELS=levels,
                                    WEIGHTED=self.weighted,
                                    BLOCK=INTERPRET_SEARCH_BLOCK if interpreting() else SEARCH_BLOCK, **_opts(False))
        return hist

    def histogram(self, level: int, prefix: torch.Tensor) -> torch.Tensor:
        return self._level(level, prefix)

    def close(self, prefix: torch.Tensor):
        self._level(32 // RADIX_BITS, prefix)
        return self.sums, self.min_above

    def sums_above(self, idx: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
        c = self.chunk
        out = torch.empty(len(idx), 2, dtype=torch.float64, device=self.a.device)
        if len(idx):
            _kernels().tail[(len(idx),)](c.z, c.zr, c.rows[idx].contiguous(), self.a[idx].contiguous(),
                                         self.ar[idx].contiguous(), threshold.float().contiguous(), out,
                                         c.z.stride(0), c.zr.stride(0), c.z.shape[1], BLOCK=SLICE_BLOCK, **_opts(False))
        return out


def backward(z, zr, local, saved, grads, risk: Risk, out, chunk_size: int | None = None):
    """The slice's gradient into ``out`` (backward.py's kernel: label -1 is no column of the
    slice, -2 is the ignore_index of masked rows)."""
    n, v = z.shape
    if n == 0:
        return out
    if v > 1 and (z.stride(1) != 1 or zr.stride(1) != 1):
        z, zr = z.contiguous(), zr.contiguous()
    target = out if out.stride(-1) == 1 or v <= 1 else torch.empty_like(out)
    mu = risk.param if risk.kind == "erm" else 0.0
    _kernels().backward[(n,)](z, zr, local.contiguous(), saved.float().contiguous(), grads.float().contiguous(),
                              target, z.stride(0), zr.stride(0), target.stride(0), v, -2, mu,
                              RISK=risk.code, BLOCK=BLOCK, **_opts(True))
    if target is not out:
        out.copy_(target)
    return out
