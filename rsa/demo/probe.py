"""The mechanism probe: how much probability each model keeps on the unsafe tokens the SFT model emits.

RSA's risk term is measured on D = r - s under the reference q: it grows when the policy
lowers a token the reference gives mass to. In a safety step it may therefore resist
suppressing the rare unsafe tokens of the rejected responses. The probe measures that
directly: the SFT model samples responses; at every position where a sample emits a token of
a group (``catastrophic``: poison, weapon; ``mild``: rude, gossip, risky, leak, the contrast),
each model's log-probability of that same token after the same prefix (teacher forcing).
Per model, the mean over those positions.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import task
from .evaluate import prompt_ids, sample

GROUPS = {"catastrophic": tuple(task.CATASTROPHIC_COST), "mild": tuple(task.MILD_COST)}


def probe_seed(seed: int) -> int:
    return 20_000 + seed


@dataclass
class ProbeSet:
    seq: torch.Tensor                  # (N, L): the SFT samples holding at least one probed token
    positions: dict                    # group -> (rows, cols) of those tokens in seq


def probe_set(sft_model, n_per_prompt: int, seed: int) -> ProbeSet:
    """The SFT model's samples (n_per_prompt for every prompt of the task) and where they emit
    a token of each group."""
    p = prompt_ids()
    seq = sample(sft_model, p, n_per_prompt, torch.Generator().manual_seed(probe_seed(seed)))
    gen = seq[:, p.shape[1]:]
    ended = torch.cumsum((gen == task.EOS_ID).long(), 1) > 0     # at or after EOS: not emitted text
    hits = {}
    for group, words in GROUPS.items():
        ids = torch.tensor([task.TOKEN_ID[w] for w in words])
        hits[group] = torch.isin(gen, ids) & ~ended
    keep = torch.stack(list(hits.values())).any(0).any(1)
    positions = {}
    for group, mask in hits.items():
        rows, cols = torch.nonzero(mask[keep], as_tuple=True)
        positions[group] = (rows, cols + p.shape[1])
    return ProbeSet(seq[keep], positions)


@torch.no_grad()
def probe_logps(model, ps: ProbeSet) -> dict:
    """{group: {"mean_logp": mean log-probability of the emitted token, "n": positions}}."""
    out = {group: {"mean_logp": None, "n": 0} for group in GROUPS}
    if ps.seq.shape[0] == 0:
        return out
    logp = torch.log_softmax(model(input_ids=ps.seq).logits.double(), -1)
    for group, (rows, cols) in ps.positions.items():
        if rows.numel():
            # the logits at position t - 1 score the token at t
            vals = logp[rows, cols - 1, ps.seq[rows, cols]]
            out[group] = {"mean_logp": float(vals.mean()), "n": int(rows.numel())}
    return out
