"""Backends of the per-token statistics: where the one pass over the vocabulary runs.

Each backend module exposes the same row-kernel contract on 2-D (N, V) logits:

    forward(z, zr, labels, risk, ignore_index, chunk_size=None) -> (stats (N, 4), saved (N, 5))
    backward(z, zr, labels, saved, grads (N, 3), risk, ignore_index, inplace=False,
             chunk_size=None) -> grad_z (N, V) in z's dtype
    unsupported(tensor) -> None, or the reason it cannot run on that tensor

stats columns are (logp, ref_logp, kl, risk), grads columns the upstream gradients of
(logp, kl, risk), both in the accumulation dtype (float64 for float64 input, else float32);
saved holds the per-row scalars listed in rsa_kernels.risk. Rows are unit-stride in V.

Each backend also has slice kernels (torch_slices, cpu_slices, triton_slices): one rank's
share of the same statistics when the vocabulary is split across a process group, which
rsa_kernels/vocab_parallel/rows.py combines with all-reduces. On a rank's columns z, zr
(N, w) and the row indices ``rows`` of a chunk (n of them):

    Chunk(z, zr, rows)
      .partials(local, risk) -> (n, 9) in the accumulation dtype: max z, max zr, then with
          a, ar = those maxima (0 where infinite): S = sum exp(z - a), Sr = sum e, e =
          exp(zr - ar), U = sum of e u, u = (zr - ar) - (z - a), T = logsumexp of (zr - ar) +
          MU u (erm; else -inf), both over the items with e != 0 and z != -inf, z_y and zr_y
          at the label's column local (-1: not in this slice; then 0), M = max zr over the
          items with z = -inf (they make kl and erm +inf where exp(zr - Ar) != 0)
      .bracket() -> (n, 2): after partials, the slice's bounds of u = zr - z that bracket
          ra_dpo_cvar's quantile (its sample's; (-inf, inf) where the kernels draw none)
      .collected() -> (n, 9) float64, only in kernels with COLLECTS = True (cpu): cvar's and
          ra_dpo_cvar's candidates kept in partials' read, the items with u = zr - z in the
          slice's bracket [lo, hi] (or NaN u); columns lo, hi, the counts of the items below
          and above it, Sr and U over those above, the row's smallest finite zr, the largest
          finite |z|, |zr| (no longer read: D's bracket is exact), the candidates, Sr over
          those below (vocab_parallel/rows.py proves
          from these whether the group's quantile lies among the candidates; its
          Search.bracket then reads them, not the rows)
      .subset(idx) -> the Chunk of the rows idx (needed only by kernels whose brackets bound)
      .search(A, Ar, risk, target) -> Search over the keys of D = (zr - z) + (A - Ar)
          (slice_keys), weighing cvar's support (q > 0) by q and counting every item for
          ra_dpo_cvar; target, the fraction of the total weight the search reaches, is a
          hint (the cpu kernels prepare the digit where the slice's own weight reaches it):
        .histogram(level, prefix) -> (n, 256) float64: the weight of the items whose top
            `level` key digits (8 bits each) are the prefix's, by their next digit; levels
            are asked in order, 0 first
        .bracket(lo, hi) -> (hist, below, above): level 0 over the items whose keys lie
            in [lo, hi] (ra_dpo_cvar's counts), with the counts below and above; later levels
            narrow those items (only kernels whose brackets bound need it)
        .close(prefix) -> ((n, 3) float64: sum q D and sum q over the keys above the key
            `prefix`, sum q at it; (n,) int64 the smallest key above it, as
            slice_keys.key_order, NO_KEY where none: ra_dpo_cvar's HI, which a cvar search
            need not track)
        .sums_above(idx, threshold) -> (m, 2) float64: sum q D and sum q over D > threshold
            of the rows idx
        .candidates(level, prefix, most) -> (n, 2 + 2 most) int64, optional (cpu): the
            candidates under the prefix's top `level` digits as one payload (their count, the
            smallest key above that left, up to `most` keys and weights as float64 bits);
            .use_candidates() when the group ends the search with them (close() then compares
            whole keys), and .finish(parts, below, target, empty_key) -> (key, below, at, next
            key) from every rank's payloads (vocab_parallel/quantile.py: the gathered end,
            taken where the kernels the group agreed on have Search.finish, whatever the
            rank's own search is: an all-padding slice's sends an empty payload)
    pick(hist, below, target, shift, prefix) -> (below, at, prefix): one round's choice from
        the group's histogram (slice_keys.radix_pick, or the same in C++)
    backward(z, zr, local, saved, grads, risk, out, chunk_size=None) -> out, the gradient of
        the columns (local: the label's column, -1 where another rank holds it, -2 masked)
    chunk_row_bytes(width, acc, risk) -> temporaries per row of a chunk
    fresh_like(z) -> a new uninitialised tensor like z for the slice's gradient (the cpu kernels'
        on 2 MiB pages, as the cpu backend's: its first touch costs less)
    unsupported(tensor) -> None, or the reason
"""
from __future__ import annotations

import importlib
import os
import warnings

import torch

NAMES = ("torch", "cpu", "triton")
_MODULES = {"torch": "torch_rows", "cpu": "cpu_rows", "triton": "triton_rows"}
_SLICES = {"torch": "torch_slices", "cpu": "cpu_slices", "triton": "triton_slices"}
_loaded: dict = {}
_warned_cpu = False


def _load(name: str, modules: dict = _MODULES):
    """The backend module, or the reason it cannot be loaded here (a string)."""
    module = modules[name]
    if module not in _loaded:
        try:
            _loaded[module] = importlib.import_module(f".{module}", __name__)
        except ImportError as err:  # the extension is not built, or triton is not installed
            _loaded[module] = f"{name} backend unavailable: {err}"
    return _loaded[module]


def available_backends() -> list[str]:
    """The backends usable on this machine, from "torch", "cpu", "triton"."""
    out = []
    for name in NAMES:
        mod = _load(name)
        if isinstance(mod, str):
            continue
        if name == "triton" and not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
            continue
        out.append(name)
    return out


def get_backend(name: str, tensor: torch.Tensor):
    """Resolve ``backend`` for ``tensor``; "auto" picks the fastest that can run it."""
    global _warned_cpu
    if name == "auto":
        if tensor.is_cuda:
            mod = _load("triton")
            # float64 (or a vocabulary past the kernels' limit) stays on the torch backend
            return _load("torch") if isinstance(mod, str) or mod.unsupported(tensor) else mod
        if tensor.device.type == "cpu":
            mod = _load("cpu")
            if not isinstance(mod, str):
                return mod
            if not _warned_cpu:
                _warned_cpu = True
                warnings.warn(f"{mod}; using the slower torch backend", RuntimeWarning, stacklevel=3)
        return _load("torch")
    if name not in NAMES:
        raise ValueError(f"backend: unknown backend {name!r}; expected 'auto' or one of {NAMES}")
    mod = _load(name)
    if isinstance(mod, str):
        raise RuntimeError(mod)
    reason = mod.unsupported(tensor)
    if reason:
        raise RuntimeError(f"backend {name!r} cannot run here: {reason}")
    return mod


def get_slices(name: str, tensor: torch.Tensor):
    """(slice kernels, backend name) for ``backend`` on ``tensor``: the backend get_backend
    resolves, its slice kernels (see above)."""
    module = get_backend(name, tensor)
    resolved = next(n for n, m in _MODULES.items() if _loaded.get(m) is module)
    slices = _load(resolved, _SLICES)
    if isinstance(slices, str):
        raise RuntimeError(slices)
    return slices, resolved
