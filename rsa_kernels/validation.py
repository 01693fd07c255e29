"""Input checks of SPEC section 5: a ValueError naming the argument, before any work."""
from __future__ import annotations

import math

import torch

OBJECTIVES = ("dpo", "rsa1", "rsa2")


def check_logits(logits, ref_logits, labels, *, ignore_index: int, names=("logits", "ref_logits"),
                 global_labels: bool = False):
    """``global_labels``: the logits are one rank's vocabulary slice (SPEC section 7), so labels
    are checked against the global vocabulary later, by the group (rsa_kernels.vocab_parallel)."""
    for name, t in zip(names, (logits, ref_logits)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor")
        if t.dim() < 1 or t.shape[-1] < (0 if global_labels else 1):  # a rank's slice may be empty
            raise ValueError(f"{name} must have shape (..., V) with V >= 1, got {tuple(t.shape)}")
    if ref_logits.shape != logits.shape:
        raise ValueError(f"{names[1]} has shape {tuple(ref_logits.shape)}, {names[0]} {tuple(logits.shape)}: they must match")
    check_labels(labels, logits.shape[:-1], None if global_labels else logits.shape[-1], ignore_index=ignore_index)


def check_labels(labels, leading, vocab: int | None, *, ignore_index: int):
    """``vocab=None``: only the lower bound (the global vocabulary is not known here)."""
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError("labels must be an integer tensor")
    if labels.shape != leading:
        raise ValueError(f"labels has shape {tuple(labels.shape)}, expected the leading shape {tuple(leading)}")
    bad = ((labels < 0) if vocab is None else (labels < 0) | (labels >= vocab)) & (labels != ignore_index)
    if bool(bad.any()):
        bound = "global vocabulary" if vocab is None else vocab
        raise ValueError(f"labels must lie in [0, {bound}) or equal ignore_index={ignore_index}, "
                         f"found {labels[bad].flatten()[0].item()}")


def check_positive(name: str, value: float):
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def check_objective_args(objective, beta, alpha, gamma, label_smoothing):
    if objective not in OBJECTIVES:
        raise ValueError(f"objective: unknown objective {objective!r}; expected one of {OBJECTIVES}")
    check_positive("beta", beta)
    if not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha < 0:
        raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
    if not isinstance(gamma, (int, float)) or not 0 < gamma <= 1:
        raise ValueError(f"gamma must lie in (0, 1], got {gamma!r}")
    if not isinstance(label_smoothing, (int, float)) or not 0 <= label_smoothing <= 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5], got {label_smoothing!r}")


def check_pairs(num_sequences: int, name: str = "labels"):
    if num_sequences % 2:
        raise ValueError(f"{name}: a pair loss needs an even number of sequences (chosen then rejected), got {num_sequences}")
