"""The four public functions' process_group branches: check, agree, then the usual path.

Each builds the local checks of its single-process twin (with labels checked against the
global vocabulary only after the group agrees), lets agreement.agree turn any local or
cross-rank inconsistency into a ValueError on every rank, and then runs the twin's own
path with a VocabParallelRows backend in place of the single-process one.
"""
from __future__ import annotations

import torch

from ..risk import parse_risk
from ..validation import check_logits, check_objective_args
from .agreement import Local, agree
from .replicated import replicated
from .rows import VocabParallelRows

BACKENDS = ("auto", "torch")


def _check_backend(backend) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend: with process_group the per-slice work runs in plain PyTorch, so backend must "
                         f"be 'auto' or 'torch', got {backend!r}")


def _settings(function: str, labels, risk, ignore_index, dtype, backend, chunk_size, *more) -> list:
    """What every rank must share; the label *shape* first, so that its message comes first."""
    return [("function", function), ("labels (shape)", tuple(labels.shape)), ("labels", labels),
            ("risk", str(risk)), ("ignore_index", ignore_index), ("dtype", str(dtype)),
            ("backend", backend), ("chunk_size", chunk_size), *more]


def logits_backend(group, logits, ref_logits, labels, *, risk, ignore_index, backend, chunk_size, inplace):
    """token_stats: (parsed risk, the backend object) once the group agrees."""
    def check():
        r = parse_risk(risk)
        check_logits(logits, ref_logits, labels, ignore_index=ignore_index, global_labels=True)
        _check_backend(backend)
        settings = _settings("token_stats", labels, r, ignore_index, logits.dtype, backend, chunk_size,
                             ("ref_logits (dtype)", str(ref_logits.dtype)), ("inplace_backward", inplace))
        return Local(logits.shape[-1], labels, ignore_index, settings), r
    layout, r = agree(group, check)
    return r, VocabParallelRows(layout)


def preference_setup(group, logits, ref_logits, labels, *, risk, objective, beta, alpha, gamma,
                     label_smoothing, ignore_index, shift, backend, sequence_ids, num_sequences, chunk_size):
    """preference_loss: (parsed risk, sequence layout, backend object) once the group agrees."""
    from ..loss import make_layout

    def check():
        r = parse_risk(risk)
        check_objective_args(objective, beta, alpha, gamma, label_smoothing)
        check_logits(logits, ref_logits, labels, ignore_index=ignore_index, global_labels=True)
        _check_backend(backend)
        seq = make_layout(labels, ignore_index=ignore_index, shift=shift, sequence_ids=sequence_ids,
                          num_sequences=num_sequences)
        settings = _settings("preference_loss", labels, r, ignore_index, logits.dtype, backend, chunk_size,
                             ("ref_logits (dtype)", str(ref_logits.dtype)),
                             ("objective", objective), ("beta", beta), ("alpha", alpha), ("gamma", gamma),
                             ("label_smoothing", label_smoothing), ("shift", shift),
                             ("sequence_ids", sequence_ids), ("num_sequences", num_sequences))
        return Local(logits.shape[-1], seq.labels, ignore_index, settings), (r, seq)
    layout, (r, seq) = agree(group, check)
    return r, seq, VocabParallelRows(layout)


def _fused_check(function, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, r, *, ignore_index,
                 backend, chunk_size, memory_budget, schedule, more=()):
    from ..fused_linear.checks import check_chunking, check_linear

    check_linear(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, ignore_index=ignore_index,
                 global_labels=True)
    check_chunking(chunk_size, schedule, memory_budget)
    if schedule == "kernel":
        raise ValueError("schedule: 'kernel' (the fused Triton kernel) does not take a process_group; "
                         "use 'tokens', 'pairs' or 'auto'")
    _check_backend(backend)
    # the hidden gradient's all-reduce runs only where autograd wants it: every rank alike
    wants = hidden.requires_grad and torch.is_grad_enabled()
    return _settings(function, labels, r, ignore_index, hidden.dtype, backend, chunk_size,
                     ("memory_budget", memory_budget), ("schedule", schedule),
                     ("hidden (requires_grad)", wants), ("bias", bias is None), ("ref_bias", ref_bias is None),
                     *more)


def _chunk_rows(layout, dtype, chunk_size, memory_budget) -> int:
    """Logit rows per chunk, from the widest slice: every rank must cut the same chunks, so the
    default is the fixed MEMORY_BUDGET, not one sized by each rank's free memory."""
    from ..fused_linear.linear import budget_rows

    return chunk_size or budget_rows(layout.max_width, dtype, memory_budget)


def fused_token_stats(group, hidden, weight, ref_hidden, ref_weight, labels, *, bias, ref_bias, risk,
                      ignore_index, backend, chunk_size, memory_budget, schedule):
    """fused_linear_token_stats over this rank's lm-head rows (token chunks)."""
    from ..fused_linear.tokens import fused_rows_token_stats
    from ..token_stats import TokenStats

    def check():
        r = parse_risk(risk)
        if schedule != "tokens":
            raise ValueError(f"schedule must be 'tokens' with process_group, got {schedule!r}")
        settings = _fused_check("fused_linear_token_stats", hidden, weight, bias, ref_hidden, ref_weight, ref_bias,
                                labels, r, ignore_index=ignore_index, backend=backend, chunk_size=chunk_size,
                                memory_budget=memory_budget, schedule=schedule)
        return Local(weight.shape[0], labels, ignore_index, settings), r
    layout, r = agree(group, check)
    rows = _chunk_rows(layout, hidden.dtype, chunk_size, memory_budget)
    h = replicated(hidden, group)
    out = fused_rows_token_stats(h.reshape(-1, h.shape[-1]), weight, bias, ref_hidden.reshape(-1, ref_hidden.shape[-1]),
                                 ref_weight, ref_bias, labels.reshape(-1), risk=r, ignore_index=ignore_index,
                                 backend=VocabParallelRows(layout), rows=rows)
    return TokenStats(*(t.view(labels.shape) for t in out))


def fused_preference_loss(group, hidden, weight, ref_hidden, ref_weight, labels, *, bias, ref_bias, objective, risk,
                          beta, alpha, gamma, label_smoothing, ignore_index, shift, backend, sequence_ids,
                          num_sequences, chunk_size, schedule, memory_budget):
    """fused_linear_preference_loss over this rank's lm-head rows (pair or token chunks)."""
    from ..fused_linear import choose_schedule
    from ..fused_linear.pairs import fused_pair_loss
    from ..fused_linear.tokens import fused_rows_token_stats
    from ..loss import loss_from_token_stats, make_layout
    from ..token_stats import TokenStats

    def check():
        r = parse_risk(risk)
        check_objective_args(objective, beta, alpha, gamma, label_smoothing)
        settings = _fused_check("fused_linear_preference_loss", hidden, weight, bias, ref_hidden, ref_weight,
                                ref_bias, labels, r, ignore_index=ignore_index, backend=backend,
                                chunk_size=chunk_size, memory_budget=memory_budget, schedule=schedule,
                                more=(("objective", objective), ("beta", beta), ("alpha", alpha), ("gamma", gamma),
                                      ("label_smoothing", label_smoothing), ("shift", shift),
                                      ("sequence_ids", sequence_ids), ("num_sequences", num_sequences)))
        seq = make_layout(labels, ignore_index=ignore_index, shift=shift, sequence_ids=sequence_ids,
                          num_sequences=num_sequences)
        return Local(weight.shape[0], seq.labels, ignore_index, settings), (r, seq)
    layout, (r, seq) = agree(group, check)
    rows = _chunk_rows(layout, hidden.dtype, chunk_size, memory_budget)
    impl = VocabParallelRows(layout)
    loss_args = dict(objective=objective, beta=beta, alpha=alpha, gamma=gamma, label_smoothing=label_smoothing)
    h = replicated(hidden, group)
    h, rh = h.reshape(-1, h.shape[-1]), ref_hidden.reshape(-1, ref_hidden.shape[-1])
    if choose_schedule(seq, rows, schedule) == "pairs":
        return fused_pair_loss(h, weight, bias, rh, ref_weight, ref_bias, seq, risk=r, ignore_index=ignore_index,
                               backend=impl, rows=rows, loss_args=loss_args)
    out = fused_rows_token_stats(h, weight, bias, rh, ref_weight, ref_bias, seq.labels.reshape(-1), risk=r,
                                 ignore_index=ignore_index, backend=impl, rows=rows)
    stats = TokenStats(*(t.view(seq.labels.shape) for t in out))
    return loss_from_token_stats(stats, seq, **loss_args)
