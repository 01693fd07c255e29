"""KL of a model to a reference along the model's own samples.

Per response: the sum over its generated positions of the exact next-token
KL(policy || reference), i.e. summed over the whole vocabulary at each step. Summing the
exact per-step KL along the policy's own samples is an unbiased, low-variance estimate of
the sequence-level KL(pi || pi_ref).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Float32 logits of one model held at once; rows are processed in chunks that fit.
LOGITS_BUDGET_BYTES = 256 * 2**20


@torch.no_grad()
def sequence_kl(model, reference, seq: torch.Tensor, prompt_len: int, generated: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) float32: per row, the summed per-step KL over the positions marked in ``generated``.

    ``seq`` is (B, prompt_len + new) with the prompts left-padded to prompt_len (so the first
    response token of every row is at column prompt_len); ``generated`` is (B, new).
    """
    vocab = model.get_output_embeddings().weight.shape[0]
    rows = max(1, LOGITS_BUDGET_BYTES // (seq.shape[1] * vocab * 4))
    out = []
    for start in range(0, seq.shape[0], rows):
        part = slice(start, start + rows)
        kwargs = {}
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask[part]
            kwargs["position_ids"] = (attention_mask[part].long().cumsum(-1) - 1).clamp(min=0)
        logp = F.log_softmax(model(input_ids=seq[part], **kwargs).logits.float(), -1)
        logq = F.log_softmax(reference(input_ids=seq[part], **kwargs).logits.float(), -1)
        if logq.shape[-1] != logp.shape[-1]:
            raise ValueError(f"reference: its vocabulary ({logq.shape[-1]}) differs from the model's ({logp.shape[-1]})")
        step_kl = (logp.exp() * (logp - logq)).sum(-1)[:, prompt_len - 1:-1]   # predicts seq[:, prompt_len:]
        out.append((step_kl * generated[part]).sum(1))
    return torch.cat(out)
