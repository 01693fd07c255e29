"""preference_loss: token statistics -> sequence sums -> pair objective (SPEC sections 2-3)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .dispatch import Call, plan, shared_settings
from .objectives import pair_logits, pair_loss, pair_metrics
from .risk import parse_risk
from .sequence import discount_weights, sequence_sums
from .token_stats import TokenStats, rows_token_stats
from .validation import check_logits, check_objective_args, check_pairs


@dataclass
class Layout:
    """Where each label row belongs: padded (S, T) or packed (N,) with sequence_ids."""
    labels: torch.Tensor            # shifted if asked, same shape as given
    mask: torch.Tensor
    sequence_ids: torch.Tensor | None
    num_sequences: int


def make_layout(labels, *, ignore_index: int, shift: bool, sequence_ids=None, num_sequences=None) -> Layout:
    """Validate the sequence layout and apply ``shift`` (logits at t score the label at t + 1)."""
    if sequence_ids is None:
        if labels.dim() != 2:
            raise ValueError(f"labels must be (sequences, tokens) for padded input, got shape {tuple(labels.shape)}; "
                             "pass sequence_ids for packed input")
        n_seq = labels.shape[0]
        if shift:
            pad = torch.full_like(labels[:, :1], ignore_index)
            labels = torch.cat([labels[:, 1:], pad], 1)
    else:
        if labels.dim() != 1 or not isinstance(sequence_ids, torch.Tensor) or sequence_ids.shape != labels.shape:
            raise ValueError("sequence_ids must be an integer tensor of the packed labels' shape (N,)")
        if sequence_ids.is_floating_point() or sequence_ids.dtype == torch.bool:
            raise ValueError("sequence_ids must be an integer tensor")
        sequence_ids = sequence_ids.long()
        n_seq = int(sequence_ids.max().item()) + 1 if num_sequences is None and labels.numel() else int(num_sequences or 0)
        if labels.numel() and (int(sequence_ids.min()) < 0 or int(sequence_ids.max()) >= n_seq):
            raise ValueError(f"sequence_ids must lie in [0, num_sequences={n_seq})")
        if shift:  # the next token of the same sequence, in array order
            order = torch.sort(sequence_ids, stable=True).indices
            ys, ids = labels[order], sequence_ids[order]
            nxt = torch.full_like(ys, ignore_index)
            nxt[:-1] = torch.where(ids[1:] == ids[:-1], ys[1:], ignore_index)
            labels = torch.empty_like(labels)
            labels[order] = nxt
    if n_seq == 0:
        raise ValueError("labels: a pair loss needs at least one pair of sequences")
    check_pairs(n_seq)
    return Layout(labels, labels != ignore_index, sequence_ids, n_seq)


def objective_settings(objective, beta, alpha, gamma, label_smoothing, shift, sequence_ids, num_sequences):
    """The pair-loss arguments every rank of a process group must share (dispatch.plan)."""
    return [("objective", objective), ("beta", beta), ("alpha", alpha), ("gamma", gamma),
            ("label_smoothing", label_smoothing), ("shift", shift), ("sequence_ids", sequence_ids),
            ("num_sequences", num_sequences)]


def loss_from_token_stats(stats: TokenStats, layout: Layout, *, objective: str, beta: float,
                          alpha: float, gamma: float, label_smoothing: float):
    """(loss, metrics) from per-token statistics laid out as ``layout`` says."""
    acc = stats.logp.dtype
    ids, n = layout.sequence_ids, layout.num_sequences
    unit = layout.mask.to(acc)
    disc = discount_weights(layout.mask, gamma, ids, n, dtype=acc)
    logp = sequence_sums(stats.logp, unit, ids, n)
    delta = logp - sequence_sums(stats.ref_logp, unit, ids, n)
    seq_risk = sequence_sums(stats.risk, disc, ids, n)
    seq_kl = sequence_sums(stats.kl, disc, ids, n)
    u = pair_logits(delta, seq_risk, objective, beta, alpha)
    loss = pair_loss(u, label_smoothing).mean()
    return loss, pair_metrics(beta, delta, seq_risk, seq_kl, logp)


def preference_loss(logits, ref_logits, labels, *, objective: str = "rsa2", risk="cvar:0.9",
                    beta: float = 0.1, alpha: float = 0.5, gamma: float = 1.0,
                    label_smoothing: float = 0.0, ignore_index: int = -100, shift: bool = False,
                    backend: str = "auto", sequence_ids=None, num_sequences: int | None = None,
                    chunk_size: int | None = None, process_group=None, vocab_size: int | None = None):
    """Mean pair loss and metrics of SPEC section 3 from policy and reference logits.

    Padded input: logits (2B, T, V), labels (2B, T), chosen sequences first. Packed input:
    logits (N, V), labels (N,), ``sequence_ids`` (N,) in [0, 2B), each sequence's tokens in order.
    ``process_group``: the logits are this rank's vocabulary slice (SPEC section 7), and
    ``vocab_size`` where the global columns from it on are padding.
    """
    def validate(grouped: bool) -> Call:
        r = parse_risk(risk)
        check_objective_args(objective, beta, alpha, gamma, label_smoothing)
        check_logits(logits, ref_logits, labels, ignore_index=ignore_index, global_labels=grouped)
        seq = make_layout(labels, ignore_index=ignore_index, shift=shift, sequence_ids=sequence_ids,
                          num_sequences=num_sequences)
        settings = shared_settings("preference_loss", labels, r, ignore_index, logits.dtype, chunk_size,
                                   ("ref_logits (dtype)", str(ref_logits.dtype)), *objective_settings(
                                       objective, beta, alpha, gamma, label_smoothing, shift, sequence_ids,
                                       num_sequences))
        return Call(logits.shape[-1], seq.labels, ignore_index, settings, (r, seq))

    where = plan(process_group, backend, logits, validate, vocab_size)
    risk, layout = where.result
    v = logits.shape[-1]
    n = logits.shape[:-1].numel()  # not reshape(-1, v): a rank's slice may have v = 0
    rows = rows_token_stats(logits.reshape(n, v), ref_logits.reshape(n, v), layout.labels.reshape(-1),
                            risk, ignore_index, where.rows, chunk_size)
    stats = TokenStats(*(t.view(layout.labels.shape) for t in rows))
    return loss_from_token_stats(stats, layout, objective=objective, beta=beta, alpha=alpha,
                                 gamma=gamma, label_smoothing=label_smoothing)
