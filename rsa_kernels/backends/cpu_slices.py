"""The `cpu` slice kernels: one rank's share of the vocabulary-parallel statistics in C++
(csrc/slices.cpp; the contract is in rsa_kernels/backends/__init__.py).

The kernels read a chunk's rows where they lie (row indices, any row stride) and keep
nothing of (rows x width) size but the search's candidates, typically a fraction of the row,
in buffers that are only touched as far as they fill: for cvar and ra_dpo_cvar the items
inside the slice's sample bracket of the quantile, kept by partials in its one read of the
row (so the search reads the row no second time where the group's quantile lies among them:
COLLECTS); in a search again without a bracket, the items under the first chosen digit.
16-bit input is converted to float32 first (a copy of the chunk's rows).
"""
from __future__ import annotations

import threading

import torch

from ..reference import accumulation_dtype
from ..risk import Risk
from .cpu_rows import _C, fresh_like, unsupported  # noqa: F401  (ImportError: the extension is not built)
from .slice_keys import NO_KEY, RADIX_BITS, key_bits, key_order

COLLECTS = True  # Chunk.collected(): cvar's and ra_dpo_cvar's candidates from partials' read
_SLACK = 16  # a vector store may write this many values past the last candidate (csrc/simd.h SLACK)
_kept = threading.local()  # per thread: dtype -> the candidates' storage (see _candidates)


def _candidates(n: int, width: int, dtype: torch.dtype) -> tuple:
    """Two (n, width + _SLACK) buffers for a search's candidates. They are reused from call to
    call: each row touches only the first pages of its stretch, and fresh pages would fault
    in every call (measured: a fifth of the search's time). What is resident stays so, at most
    the pages the largest candidate sets have touched."""
    numel = n * (width + _SLACK)
    buffers = _kept.__dict__.setdefault("buffers", {})  # one search at a time per thread
    store = buffers.get(dtype)
    if store is None or store.numel() < 2 * numel:
        store = buffers[dtype] = torch.empty(2 * numel, dtype=dtype)
    return store[:numel].view(n, width + _SLACK), store[numel:2 * numel].view(n, width + _SLACK)


def chunk_row_bytes(width: int, acc: torch.dtype, risk: Risk) -> int:
    """The candidates (D and q) and the histogram, per row of a chunk."""
    cand = 2 * (width + _SLACK) * torch.finfo(acc).bits // 8 if risk.kind in ("cvar", "ra_dpo_cvar") else 0
    return cand + 8 * (1 << RADIX_BITS) + 64


def _rows(t: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    t = t.detach()
    if t.dtype != acc:
        t = t.to(acc)
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


class Chunk:
    """The rows ``rows`` of one rank's columns z, zr: read in place (float32 / float64)."""

    def __init__(self, z, zr, rows):
        acc = accumulation_dtype(z.dtype)
        if z.dtype != acc or zr.dtype != acc:  # 16-bit rows: convert only the chunk's
            z, zr, rows = z.index_select(0, rows), zr.index_select(0, rows), torch.arange(len(rows))
        self.z, self.zr, self.rows = _rows(z, acc), _rows(zr, acc), rows.contiguous()
        self.kept = None  # cvar, ra_dpo_cvar: (z, zr) candidate buffers from partials, their counts

    def partials(self, local: torch.Tensor, risk: Risk) -> torch.Tensor:
        # cvar, ra_dpo_cvar: the sample bracket of the quantile rides along (bracket()), and the
        # items in it are kept (collected())
        level = {"ra_dpo_cvar": 1.0 - float(risk.param), "cvar": float(risk.param)}.get(risk.kind, -1.0)
        none = torch.empty(0, dtype=self.z.dtype)
        keep = level >= 0 and COLLECTS
        cand = _candidates(len(self.rows), self.z.shape[1], self.z.dtype) if keep else (none, none)
        out = _C.slice_partials(self.z, self.zr, self.rows, local.contiguous(), risk.kind == "erm",
                                float(risk.param), level if keep or risk.kind == "ra_dpo_cvar" else -1.0,
                                risk.kind == "cvar", *cand)
        self._bracket, self._collected = out[:, 9:11], torch.cat([out[:, 9:17], out[:, 18:19]], 1).double()
        self.kept = (*cand, out[:, 17].long()) if keep else None
        return out[:, :9]

    def bracket(self) -> torch.Tensor:
        """(n, 2): this slice's bracket of ra_dpo_cvar's quantile in u = zr - z, from partials."""
        return self._bracket

    def collected(self) -> torch.Tensor:
        """(n, 9): what partials kept of cvar's or ra_dpo_cvar's candidates (rsa_kernels.backends)."""
        return self._collected

    def subset(self, idx: torch.Tensor) -> "Chunk":
        """The rows ``idx`` of this chunk (a search the group's bracket missed runs again on them)."""
        sub = object.__new__(Chunk)
        sub.z, sub.zr, sub.rows, sub.kept = self.z, self.zr, self.rows[idx].contiguous(), None
        return sub

    def search(self, a: torch.Tensor, ar: torch.Tensor, risk: Risk, target: float) -> "Search":
        return Search(self, a, ar, risk, target)


class Search:
    """State of the search between levels: the candidates, the sums above, the next key."""

    def __init__(self, chunk: Chunk, a, ar, risk: Risk, target: float):
        n, width = len(chunk.rows), chunk.z.shape[1]
        self.chunk, self.a, self.ar, self.target = chunk, a.contiguous(), ar.contiguous(), float(target)
        self.weighted = risk.kind == "cvar"
        self.levels = key_bits(chunk.z.dtype) // RADIX_BITS
        # the candidates partials kept (read once by bracket, which writes their D and q over them)
        kept = chunk.kept  # set by partials for cvar and ra_dpo_cvar only
        self.cand_d, self.cand_q = kept[:2] if kept else _candidates(n, width, chunk.z.dtype)
        self.stored = kept[2] if kept else torch.empty(0, dtype=torch.int64)
        self._kept_keys = self._pending = None  # candidates(): the keys close() compares whole
        chunk.kept = None
        i64, f64 = dict(dtype=torch.int64), dict(dtype=torch.float64)
        self.sums = torch.zeros(n, 3, **f64)
        self.min_above = torch.full((n,), NO_KEY, **i64)
        # count, sums, min_above, and level 0's guess of the top digit with what it prepared
        self.state = [torch.zeros(n, **i64), self.sums, self.min_above, torch.full((n,), -1, **i64),
                      torch.zeros(n, 1 << RADIX_BITS, **f64), torch.zeros(n, 2, **f64), torch.full((n,), NO_KEY, **i64)]

    def _level(self, level: int, prefix: torch.Tensor, histogram: bool = True) -> torch.Tensor:
        c = self.chunk
        return _C.slice_search(c.z, c.zr, c.rows, self.a, self.ar, self.weighted, level, prefix.contiguous(),
                               self.target, self.cand_d, self.cand_q, self.state, histogram)

    def histogram(self, level: int, prefix: torch.Tensor) -> torch.Tensor:
        return self._level(level, prefix)

    def bracket(self, lo: torch.Tensor, hi: torch.Tensor):
        """Level 0 within the group's bracket [lo, hi] of keys (ra_dpo_cvar's counts): the
        histogram of the top digit of the items in it (its candidates), the counts below and
        above; over the candidates partials kept where it kept them (else over the rows)."""
        c = self.chunk
        out = _C.slice_bracket(c.z, c.zr, c.rows, self.a, self.ar, lo.contiguous(), hi.contiguous(), self.target,
                               self.weighted, self.cand_d, self.cand_q, self.state, self.stored)
        self.stored = torch.empty(0, dtype=torch.int64)
        return out[:, :-2], out[:, -2], out[:, -1]

    def candidates(self, level: int, prefix: torch.Tensor, most: int) -> torch.Tensor:
        """The candidates under the prefix's top ``level`` digits (narrowed as histogram(level)
        does; use_candidates() if the search ends with them), the first ``most`` of each row,
        as one (n, 2 + 2 most) int64 payload: their count, the smallest key above the prefix
        of the items that left (slice_keys.key_order), their keys (NO_KEY past the count) and
        weights (float64 bits: q, or 1 for counts)."""
        self._level(level, prefix, histogram=False)
        payload = _C.slice_candidates(self.cand_d, self.cand_q, self.state, self.weighted, most)
        self._pending = payload[:, 2:2 + min(most, self.cand_d.shape[1])]  # their keys, for close()
        return payload

    @staticmethod
    def finish(parts: torch.Tensor, below: torch.Tensor, target: float, empty_key: torch.Tensor):
        """The selection from the ranks' gathered candidates() (P, n, ...), the same on every
        rank: (key, below, at, the smallest key above)."""
        out = _C.slice_gathered_pick(parts.contiguous(), below.contiguous(), float(target), empty_key.contiguous())
        return out[:, 0], out[:, 1].view(torch.float64), out[:, 2].view(torch.float64), out[:, 3]

    def use_candidates(self):
        """The group finished the search from candidates(): close() compares their whole keys."""
        self._kept_keys = self._pending

    def close(self, prefix: torch.Tensor):
        if self._kept_keys is None:
            self._level(self.levels, prefix)
            return self.sums, self.min_above
        # after candidates(): the sums over the candidates above and at the whole key
        key = key_order(prefix, key_bits(self.chunk.z.dtype)).contiguous()
        _C.slice_close_gathered(self.cand_d, self.cand_q, self._kept_keys, key, self.sums, self.min_above)
        return self.sums, self.min_above

    def sums_above(self, idx: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
        c = self.chunk
        return _C.slice_tail_sums(c.z, c.zr, c.rows[idx].contiguous(), self.a[idx].contiguous(),
                                  self.ar[idx].contiguous(), threshold.to(c.z.dtype).contiguous())


def pick(hist, below, target: float, shift: int, prefix):
    """slice_keys.radix_pick in C++ (the same bits; a fraction of its time on CPU tensors)."""
    below, prefix = below.clone(), prefix.clone()
    at = _C.slice_pick(hist.contiguous(), below, prefix, float(target), int(shift))
    return below, at, prefix


def backward(z, zr, local, saved, grads, risk: Risk, out, chunk_size: int | None = None):
    """The slice's gradient into ``out``; local: label column, -1 elsewhere, -2 masked."""
    acc = accumulation_dtype(z.dtype)
    target = out if out.dtype == acc else torch.empty(out.shape, dtype=acc)
    if target.stride(-1) != 1 and target.shape[-1] > 1:
        target = torch.empty(out.shape, dtype=acc)
    with torch.no_grad():
        _C.slice_backward(_rows(z, acc), _rows(zr, acc), local.contiguous(), saved.to(acc).contiguous(),
                          grads.to(acc).contiguous(), risk.code, float(risk.param), target)
        if target is not out:
            out.copy_(target)
    return out
