"""The loss from final hidden states and lm-head weights, never materialising full logits.

Public: fused_linear_token_stats, fused_linear_preference_loss (SPEC section 6). Both hold
at most one chunk of (rows x V) logits per model at a time, and reuse the row kernels of
the active backend (rsa_kernels.backends) for everything over the vocabulary.
"""
from __future__ import annotations

from ..backends import get_backend
from ..loss import Layout, loss_from_token_stats, make_layout
from ..risk import parse_risk
from ..token_stats import TokenStats
from ..validation import check_objective_args
from .checks import check_chunking, check_linear
from .fused_kernel import kernel_rows_token_stats
from .linear import MEMORY_BUDGET, PAIR_BUDGET, budget_rows, pair_chunk_rows
from .pairs import fused_pair_loss, largest_pair_rows
from .tokens import fused_rows_token_stats


def _rows(hidden, ref_hidden, labels):
    return hidden.reshape(-1, hidden.shape[-1]), ref_hidden.reshape(-1, ref_hidden.shape[-1]), labels.reshape(-1)


def fused_linear_token_stats(hidden, weight, ref_hidden, ref_weight, labels, *, bias=None, ref_bias=None,
                             risk="kl", ignore_index: int = -100, backend: str = "auto",
                             chunk_size: int | None = None, memory_budget: int | None = None,
                             schedule: str = "tokens", process_group=None) -> TokenStats:
    """token_stats of the logits hidden @ weight.T + bias (policy) and likewise (reference).

    hidden (..., H), weight (V, H), bias (V,) or None; labels of hidden's leading shape.
    Gradients flow to hidden, weight and bias of the policy only. Token chunks with
    recomputation in the backward: ``chunk_size`` rows of logits at a time, or as many as
    ``memory_budget`` bytes (default: linear.MEMORY_BUDGET) allow for the two models' chunks.
    ``schedule="kernel"``: the fused Triton kernel instead (fused_kernel.py; kl and erm only).
    ``process_group``: the weights and biases are this rank's vocabulary rows (SPEC section 7).
    """
    if process_group is not None:
        from ..vocab_parallel.entry import fused_token_stats
        return fused_token_stats(process_group, hidden, weight, ref_hidden, ref_weight, labels, bias=bias,
                                 ref_bias=ref_bias, risk=risk, ignore_index=ignore_index, backend=backend,
                                 chunk_size=chunk_size, memory_budget=memory_budget, schedule=schedule)
    risk = parse_risk(risk)
    check_linear(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, ignore_index=ignore_index)
    check_chunking(chunk_size, "tokens", memory_budget)
    if schedule not in ("tokens", "kernel"):
        raise ValueError(f"schedule must be 'tokens' or 'kernel', got {schedule!r}")
    if schedule == "kernel":
        h, rh, lab = _rows(hidden, ref_hidden, labels)
        out = kernel_rows_token_stats(h, weight, bias, rh, ref_weight, ref_bias, lab, risk=risk,
                                      ignore_index=ignore_index, backend=backend)
        return TokenStats(*(t.view(labels.shape) for t in out))
    impl = get_backend(backend, hidden)
    rows = chunk_size or budget_rows(weight.shape[0], hidden.dtype, memory_budget)
    h, rh, lab = _rows(hidden, ref_hidden, labels)
    out = fused_rows_token_stats(h, weight, bias, rh, ref_weight, ref_bias, lab, risk=risk,
                                 ignore_index=ignore_index, backend=impl, rows=rows)
    return TokenStats(*(t.view(labels.shape) for t in out))


def choose_schedule(layout: Layout, rows: int, schedule: str) -> str:
    """'pairs' when the largest pair's unmasked rows fit a chunk (fewer products), else 'tokens'."""
    if schedule != "auto":
        return schedule
    return "pairs" if largest_pair_rows(layout) <= rows else "tokens"


def fused_linear_preference_loss(hidden, weight, ref_hidden, ref_weight, labels, *, bias=None, ref_bias=None,
                                 objective: str = "rsa2", risk="cvar:0.9", beta: float = 0.1,
                                 alpha: float = 0.5, gamma: float = 1.0, label_smoothing: float = 0.0,
                                 ignore_index: int = -100, shift: bool = False, backend: str = "auto",
                                 sequence_ids=None, num_sequences: int | None = None,
                                 chunk_size: int | None = None, schedule: str = "auto",
                                 memory_budget: int | None = None, process_group=None):
    """preference_loss of the logits hidden @ weight.T + bias, without materialising them.

    Padded input: hidden (2B, T, H), labels (2B, T), chosen sequences first. Packed input:
    hidden (N, H), labels (N,), ``sequence_ids`` (N,). ``schedule``: "pairs" (each chunk
    holds whole pairs; gradients computed in the forward), "tokens" (recomputation in the
    backward; memory independent of sequence length) or "auto" (pairs when the largest pair
    fits ``chunk_size`` rows, or the ``memory_budget``; by default a chunk grows to hold the
    largest pair up to linear.PAIR_BUDGET), or "kernel" (the fused Triton kernel
    of fused_kernel.py: no logits in memory at all; kl and erm only). Gradients flow to
    hidden, weight and bias of the policy only. ``process_group``: the weights and biases are
    this rank's vocabulary rows (SPEC section 7).
    """
    if process_group is not None:
        from ..vocab_parallel.entry import fused_preference_loss
        return fused_preference_loss(process_group, hidden, weight, ref_hidden, ref_weight, labels, bias=bias,
                                     ref_bias=ref_bias, objective=objective, risk=risk, beta=beta, alpha=alpha,
                                     gamma=gamma, label_smoothing=label_smoothing, ignore_index=ignore_index,
                                     shift=shift, backend=backend, sequence_ids=sequence_ids,
                                     num_sequences=num_sequences, chunk_size=chunk_size, schedule=schedule,
                                     memory_budget=memory_budget)
    risk = parse_risk(risk)
    check_objective_args(objective, beta, alpha, gamma, label_smoothing)
    check_linear(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, ignore_index=ignore_index)
    check_chunking(chunk_size, schedule, memory_budget)
    layout = make_layout(labels, ignore_index=ignore_index, shift=shift,
                         sequence_ids=sequence_ids, num_sequences=num_sequences)
    impl = get_backend(backend, hidden)
    if chunk_size:
        rows = chunk_size
    elif schedule in ("auto", "pairs"):
        rows = pair_chunk_rows(largest_pair_rows(layout), weight.shape[0], hidden.dtype, memory_budget)
    else:
        rows = budget_rows(weight.shape[0], hidden.dtype, memory_budget)
    loss_args = dict(objective=objective, beta=beta, alpha=alpha, gamma=gamma, label_smoothing=label_smoothing)
    h, rh, _ = _rows(hidden, ref_hidden, labels)
    if schedule == "kernel":
        out = kernel_rows_token_stats(h, weight, bias, rh, ref_weight, ref_bias, layout.labels.reshape(-1),
                                      risk=risk, ignore_index=ignore_index, backend=backend)
    elif choose_schedule(layout, rows, schedule) == "pairs":
        return fused_pair_loss(h, weight, bias, rh, ref_weight, ref_bias, layout, risk=risk,
                               ignore_index=ignore_index, backend=impl, rows=rows, loss_args=loss_args)
    else:
        out = fused_rows_token_stats(h, weight, bias, rh, ref_weight, ref_bias, layout.labels.reshape(-1),
                                     risk=risk, ignore_index=ignore_index, backend=impl, rows=rows)
    stats = TokenStats(*(t.view(layout.labels.shape) for t in out))
    return loss_from_token_stats(stats, layout, **loss_args)


__all__ = ["fused_linear_token_stats", "fused_linear_preference_loss", "MEMORY_BUDGET", "PAIR_BUDGET"]
