"""KL of the sampled responses to a reference model: what `rsa eval` reports as kl_to_reference.

The responses are drawn from the *sampler* S: at each step the model's next-token
distribution tempered by --temperature and cut to the nucleus --top-p
(rsa.eval.nexttoken.sampler_logits). The number reported is KL(S || R), R the reference
model's own (untempered, uncut) distribution over responses, both cut at --max-new-tokens:
per response the exact next-token KL(S_t || R_t) over the whole vocabulary, summed over its
steps (the end-of-sequence step included). By the chain rule its mean over S's samples is an
unbiased estimate of KL(S || R). At temperature 1 and top-p 1, S is the model and this is
KL(model || reference).

rsa.eval.sampling.sample accumulates it while drawing, on the very tensor each token was
drawn from; ``sequence_kl`` recomputes it for responses already drawn, with the same steps.
"""
from __future__ import annotations

import torch

from .nexttoken import sampler_logits
from .sampling import Decoder, live_kl

DEFINITION = ("KL(S || R) of the response distributions: S samples the model at the run's temperature and top-p "
              "(the responses scored here), R is the reference model at temperature 1 without top-p; per response "
              "the exact next-token KL(S_t || R_t) summed over its steps (EOS included), averaged over S's samples "
              "(an unbiased estimate); KL(model || reference) when temperature and top-p are 1")


@torch.no_grad()
def sequence_kl(model, reference, seq: torch.Tensor, prompt_len: int, generated: torch.Tensor,
                attention_mask: torch.Tensor | None = None, temperature: float = 1.0,
                top_p: float = 1.0) -> torch.Tensor:
    """(B,) float32: per row, the KL of module docstring summed over the positions marked in ``generated``.

    ``seq`` is (B, prompt_len + new) with the prompts left-padded to prompt_len (so the first
    response token of every row is at column prompt_len); ``generated`` is (B, new);
    ``attention_mask`` covers at least the prompt columns.
    """
    mask = None if attention_mask is None else attention_mask[:, :prompt_len]
    policy, ref = Decoder(model, seq[:, :prompt_len], mask), Decoder(reference, seq[:, :prompt_len], mask)
    total = torch.zeros(seq.shape[0], device=seq.device)
    steps = int(generated.any(0).nonzero().max()) + 1 if bool(generated.any()) else 0
    for step in range(steps):
        total += live_kl(sampler_logits(policy.logits, temperature, top_p), ref, generated[:, step], step)
        if step + 1 < steps:
            policy.feed(seq[:, prompt_len + step])
            ref.feed(seq[:, prompt_len + step])
    return total
