"""The loss from final hidden states and lm-head weights, never materialising full logits.

Public: fused_linear_token_stats, fused_linear_preference_loss (SPEC section 6). Both hold
at most one chunk of (rows x V) logits per model at a time, and reuse the row kernels of
the active backend (rsa_kernels.backends) for everything over the vocabulary.
"""
from __future__ import annotations

import torch

from ..dispatch import Call, plan, shared_settings
from ..loss import Layout, loss_from_token_stats, make_layout, objective_settings
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


def _checks(function, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, risk, *, ignore_index,
            chunk_size, memory_budget, schedule, grouped, more=()):
    """Both fused functions' checks of their linear inputs; the settings a group must share."""
    check_linear(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, ignore_index=ignore_index,
                 global_labels=grouped)
    check_chunking(chunk_size, schedule, memory_budget)
    if grouped and schedule == "kernel":
        raise ValueError("schedule: 'kernel' (the fused Triton kernel) does not take a process_group; "
                         "use 'tokens', 'pairs' or 'auto'")
    # the hidden gradient's all-reduce runs only where autograd wants it: every rank alike;
    # and every rank must hold the same hidden states (compared by checksums)
    wants = hidden.requires_grad and torch.is_grad_enabled()
    return shared_settings(function, labels, risk, ignore_index, hidden.dtype, chunk_size,
                           ("memory_budget", memory_budget), ("schedule", schedule),
                           ("hidden (requires_grad)", wants), ("bias, ref_bias (given)", (bias is None, ref_bias is None)),
                           ("hidden, ref_hidden (checksums)", (hidden, ref_hidden)), *more)


def _chunk_rows(where, hidden, chunk_size, memory_budget, largest_pair: int | None = None) -> int:
    """Logit rows per chunk: the same on every rank of a group, sized for the widest slice.
    ``largest_pair``: the pair schedules' largest pair, which a default chunk grows to hold
    (linear.pair_chunk_rows)."""
    if chunk_size:
        return chunk_size
    if largest_pair is not None:
        return pair_chunk_rows(largest_pair, where.columns, hidden.dtype, memory_budget)
    return budget_rows(where.columns, hidden.dtype, memory_budget)


def fused_linear_token_stats(hidden, weight, ref_hidden, ref_weight, labels, *, bias=None, ref_bias=None,
                             risk="kl", ignore_index: int = -100, backend: str = "auto",
                             chunk_size: int | None = None, memory_budget: int | None = None,
                             schedule: str = "tokens", process_group=None,
                             vocab_size: int | None = None) -> TokenStats:
    """token_stats of the logits hidden @ weight.T + bias (policy) and likewise (reference).

    hidden (..., H), weight (V, H), bias (V,) or None; labels of hidden's leading shape.
    Gradients flow to hidden, weight and bias of the policy only. Token chunks with
    recomputation in the backward: ``chunk_size`` rows of logits at a time, or as many as
    ``memory_budget`` bytes (default: linear.MEMORY_BUDGET) allow for the two models' chunks.
    ``schedule="kernel"``: the fused Triton kernel instead (fused_kernel.py; kl and erm only).
    ``process_group``: the weights and biases are this rank's vocabulary rows (SPEC section 7),
    and ``vocab_size`` where the global rows from it on are padding.
    """
    def validate(grouped: bool) -> Call:
        r = parse_risk(risk)
        allowed = ("tokens",) if grouped else ("tokens", "kernel")
        if schedule not in allowed:
            raise ValueError(f"schedule must be {' or '.join(map(repr, allowed))}"
                             f"{' with process_group' if grouped else ''}, got {schedule!r}")
        settings = _checks("fused_linear_token_stats", hidden, weight, bias, ref_hidden, ref_weight, ref_bias,
                           labels, r, ignore_index=ignore_index, chunk_size=chunk_size, memory_budget=memory_budget,
                           schedule="tokens", grouped=grouped)
        return Call(weight.shape[0], labels, ignore_index, settings, r)

    where = plan(process_group, backend, hidden, validate, vocab_size)
    h, rh, lab = _rows(where.replicated(hidden), ref_hidden, labels)
    if schedule == "kernel":
        out = kernel_rows_token_stats(h, weight, bias, rh, ref_weight, ref_bias, lab, risk=where.result,
                                      ignore_index=ignore_index, backend=backend)
    else:
        out = fused_rows_token_stats(h, weight, bias, rh, ref_weight, ref_bias, lab, risk=where.result,
                                     ignore_index=ignore_index, backend=where.rows,
                                     rows=_chunk_rows(where, hidden, chunk_size, memory_budget))
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
                                 memory_budget: int | None = None, process_group=None,
                                 vocab_size: int | None = None):
    """preference_loss of the logits hidden @ weight.T + bias, without materialising them.

    Padded input: hidden (2B, T, H), labels (2B, T), chosen sequences first. Packed input:
    hidden (N, H), labels (N,), ``sequence_ids`` (N,). ``schedule``: "pairs" (each chunk
    holds whole pairs; gradients computed in the forward), "tokens" (recomputation in the
    backward; memory independent of sequence length) or "auto" (pairs when the largest pair
    fits ``chunk_size`` rows, or the ``memory_budget``; by default a chunk grows to hold the
    largest pair up to linear.PAIR_BUDGET), or "kernel" (the fused Triton kernel
    of fused_kernel.py: no logits in memory at all; kl and erm only). Gradients flow to
    hidden, weight and bias of the policy only. ``process_group``: the weights and biases are
    this rank's vocabulary rows (SPEC section 7), and ``vocab_size`` where the global rows
    from it on are padding.
    """
    def validate(grouped: bool) -> Call:
        r = parse_risk(risk)
        check_objective_args(objective, beta, alpha, gamma, label_smoothing)
        settings = _checks("fused_linear_preference_loss", hidden, weight, bias, ref_hidden, ref_weight, ref_bias,
                           labels, r, ignore_index=ignore_index, chunk_size=chunk_size, memory_budget=memory_budget,
                           schedule=schedule, grouped=grouped,
                           more=objective_settings(objective, beta, alpha, gamma, label_smoothing, shift,
                                                   sequence_ids, num_sequences))
        seq = make_layout(labels, ignore_index=ignore_index, shift=shift, sequence_ids=sequence_ids,
                          num_sequences=num_sequences)
        return Call(weight.shape[0], seq.labels, ignore_index, settings, (r, seq))

    where = plan(process_group, backend, hidden, validate, vocab_size)
    risk, layout = where.result
    pair = largest_pair_rows(layout) if schedule in ("auto", "pairs") else None
    rows = _chunk_rows(where, hidden, chunk_size, memory_budget, pair)
    loss_args = dict(objective=objective, beta=beta, alpha=alpha, gamma=gamma, label_smoothing=label_smoothing)
    h, rh, _ = _rows(where.replicated(hidden), ref_hidden, labels)
    if schedule == "kernel":
        out = kernel_rows_token_stats(h, weight, bias, rh, ref_weight, ref_bias, layout.labels.reshape(-1),
                                      risk=risk, ignore_index=ignore_index, backend=backend)
    elif choose_schedule(layout, rows, schedule) == "pairs":
        return fused_pair_loss(h, weight, bias, rh, ref_weight, ref_bias, layout, risk=risk,
                               ignore_index=ignore_index, backend=where.rows, rows=rows, loss_args=loss_args)
    else:
        out = fused_rows_token_stats(h, weight, bias, rh, ref_weight, ref_bias, layout.labels.reshape(-1),
                                     risk=risk, ignore_index=ignore_index, backend=where.rows, rows=rows)
    stats = TokenStats(*(t.view(layout.labels.shape) for t in out))
    return loss_from_token_stats(stats, layout, **loss_args)


__all__ = ["fused_linear_token_stats", "fused_linear_preference_loss", "MEMORY_BUDGET", "PAIR_BUDGET"]
