"""Backends of the per-token statistics: where the one pass over the vocabulary runs.

Each backend module exposes the same row-kernel contract on 2-D (N, V) logits:

    forward(z, zr, labels, risk, ignore_index, chunk_size=None) -> (stats (N, 4), saved (N, 5))
    backward(z, zr, labels, saved, grads (N, 3), risk, ignore_index, inplace=False,
             chunk_size=None) -> grad_z (N, V) in z's dtype
    unsupported(tensor) -> None, or the reason it cannot run on that tensor

stats columns are (logp, ref_logp, kl, risk), grads columns the upstream gradients of
(logp, kl, risk), both in the accumulation dtype (float64 for float64 input, else float32);
saved holds the per-row scalars listed in rsa_kernels.risk. Rows are unit-stride in V.
"""
from __future__ import annotations

import importlib
import os
import warnings

import torch

NAMES = ("torch", "cpu", "triton")
_MODULES = {"torch": "torch_rows", "cpu": "cpu_rows", "triton": "triton_rows"}
_loaded: dict = {}
_warned_cpu = False


def _load(name: str):
    """The backend module, or the reason it cannot be loaded here (a string)."""
    if name not in _loaded:
        try:
            _loaded[name] = importlib.import_module(f".{_MODULES[name]}", __name__)
        except ImportError as err:  # the extension is not built, or triton is not installed
            _loaded[name] = f"{name} backend unavailable: {err}"
    return _loaded[name]


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
