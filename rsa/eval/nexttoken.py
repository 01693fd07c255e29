"""The next-token distribution the sampler draws from, and its KL to the reference's.

At each step the sampler draws from softmax(sampler_logits(z)): the model's logits divided by
the temperature, the tokens outside the nucleus (top-p) set to -inf. `rsa eval` reports the
KL of exactly that distribution to the reference model's (untempered, uncut) next-token
distribution, so both come from here and the KL is computed on the tensor the draw used.

Memory: the functions work on one position per row, (rows, V). The live bytes per logit at
a step's peak are counted below next to the code that allocates them; rsa.eval.memory uses
the same constants.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Bytes per logit live at the peak of sampler_logits with top-p (besides its input): the
# float32 tempered logits (4), their sorted copy (4) and order (int64, 8), the sorted
# probabilities (4) and their cumulative sum (4).
SAMPLER_BYTES_PER_LOGIT = 24
# Bytes per logit live at the peak of step_kl besides its inputs: two float32
# log-distributions (8) and the float32 copy of reference logits held in another dtype (4).
KL_BYTES_PER_LOGIT = 12
# step_kl works through the rows in chunks whose working set stays under this.
KL_BUDGET_BYTES = 256 * 2**20


def sampler_logits(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0) -> torch.Tensor:
    """(rows, V) float32: tempered logits, -inf outside the nucleus; softmax gives the sampler's distribution."""
    z = logits.float()
    z = z / temperature if temperature != 1.0 else (z.clone() if top_p < 1.0 and z is logits else z)
    if top_p < 1.0:
        # Nucleus: keep the smallest set of most likely tokens whose probability reaches top_p.
        sorted_z, order = torch.sort(z, -1, descending=True)
        probs = F.softmax(sorted_z, -1)
        before = torch.cumsum(probs, -1).sub_(probs)     # mass of the more likely tokens
        del probs
        sorted_z.masked_fill_(before >= top_p, float("-inf"))
        del before
        z.scatter_(-1, order, sorted_z)                  # order is a permutation: every entry rewritten
    return z


def next_token_probs(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0) -> torch.Tensor:
    """(rows, V) sampling probabilities from last-position logits."""
    return F.softmax(sampler_logits(logits, temperature, top_p), -1)


def kl_chunk_rows(vocab: int, budget_bytes: int = KL_BUDGET_BYTES) -> int:
    """Rows step_kl handles at once so that its working set stays under ``budget_bytes``."""
    return max(1, budget_bytes // (vocab * KL_BYTES_PER_LOGIT))


def step_kl(sampler_z: torch.Tensor, ref_logits: torch.Tensor, budget_bytes: int = KL_BUDGET_BYTES) -> torch.Tensor:
    """(rows,) float32: KL(softmax(sampler_z) || softmax(ref_logits)) per row, exactly over the vocabulary.

    Tokens the sampler cannot draw (probability 0) contribute 0; a token it can draw that the
    reference cannot makes the KL +inf, the true value. NaN in either input gives NaN.
    """
    if ref_logits.shape[-1] != sampler_z.shape[-1]:
        raise ValueError(f"reference: its vocabulary ({ref_logits.shape[-1]}) differs from the model's "
                         f"({sampler_z.shape[-1]})")
    rows = kl_chunk_rows(sampler_z.shape[-1], budget_bytes)
    out = torch.empty(sampler_z.shape[0], dtype=torch.float32, device=sampler_z.device)
    for start in range(0, sampler_z.shape[0], rows):
        part = slice(start, start + rows)
        log_s = F.log_softmax(sampler_z[part], -1)
        terms = F.log_softmax(ref_logits[part].float(), -1).neg_().add_(log_s)   # log s - log r
        p = log_s.exp_()
        terms.mul_(p).masked_fill_(p == 0, 0.0)    # 0 * (-inf) is NaN: a token never drawn adds nothing
        out[part] = terms.sum(-1)
    return out
