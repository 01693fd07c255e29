"""Input checks for the fused-linear entry points (SPEC section 5): ValueError naming the argument."""
from __future__ import annotations

import torch

from ..validation import check_labels


def _check_matrix(name: str, t) -> None:
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor")


def check_linear(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, *, ignore_index: int,
                 global_labels: bool = False) -> None:
    """hidden (..., H) with weight (V, H) and bias (V,); the reference may have its own H.
    ``global_labels``: the weights are one rank's vocabulary rows (validation.check_logits)."""
    for name, t in (("hidden", hidden), ("weight", weight), ("ref_hidden", ref_hidden), ("ref_weight", ref_weight)):
        _check_matrix(name, t)
    if hidden.dim() < 1 or hidden.shape[-1] < 1:
        raise ValueError(f"hidden must have shape (..., H) with H >= 1, got {tuple(hidden.shape)}")
    if ref_hidden.dim() < 1 or ref_hidden.shape[:-1] != hidden.shape[:-1]:
        raise ValueError(f"ref_hidden has shape {tuple(ref_hidden.shape)}; its leading shape must equal "
                         f"hidden's {tuple(hidden.shape[:-1])}")
    vocab = None
    for hname, wname, h, w in (("hidden", "weight", hidden, weight), ("ref_hidden", "ref_weight", ref_hidden, ref_weight)):
        if w.dim() != 2 or w.shape[0] < (0 if global_labels else 1) or w.shape[1] != h.shape[-1]:
            raise ValueError(f"{wname} has shape {tuple(w.shape)}, expected (V, {h.shape[-1]}) to match "
                             f"{hname}'s last dimension")
        if w.dtype != h.dtype:
            raise ValueError(f"{wname} has dtype {w.dtype}, {hname} {h.dtype}: they must match")
        if vocab is not None and w.shape[0] != vocab:
            raise ValueError(f"ref_weight has {w.shape[0]} vocabulary rows, weight {vocab}: they must match")
        vocab = w.shape[0]
    for name, b, w in (("bias", bias, weight), ("ref_bias", ref_bias, ref_weight)):
        if b is None:
            continue
        _check_matrix(name, b)
        if b.shape != (vocab,):
            raise ValueError(f"{name} has shape {tuple(b.shape)}, expected ({vocab},)")
        if b.dtype != w.dtype:
            raise ValueError(f"{name} has dtype {b.dtype}, its weight {w.dtype}: they must match")
    for name, t in (("weight", weight), ("ref_hidden", ref_hidden), ("ref_weight", ref_weight),
                    ("bias", bias), ("ref_bias", ref_bias), ("labels", labels)):
        if t is not None and isinstance(t, torch.Tensor) and t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device}, hidden on {hidden.device}: they must share a device")
    check_labels(labels, hidden.shape[:-1], None if global_labels else vocab, ignore_index=ignore_index)


def check_chunking(chunk_size, schedule: str, memory_budget) -> None:
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer (rows of logits per chunk) or None, got {chunk_size!r}")
    if schedule not in ("auto", "pairs", "tokens", "kernel"):
        raise ValueError(f"schedule must be 'auto', 'pairs', 'tokens' or 'kernel', got {schedule!r}")
    if memory_budget is not None and (isinstance(memory_budget, bool) or not isinstance(memory_budget, int)
                                      or memory_budget < 1):
        raise ValueError(f"memory_budget must be a positive number of bytes or None, got {memory_budget!r}")
