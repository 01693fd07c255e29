"""Sampling responses token by token with a key/value cache, and how each token is drawn.

The loop is shared by `rsa eval` and the demo; only the draw differs:
- ``per_row_draw``: every response has its own generator, seeded by (seed, prompt index,
  sample index), and each token is drawn by inverting the CDF with one uniform from it. A
  response therefore depends on its seed and the model, not on which other responses share
  its batch or on where a resumed run starts.
- ``multinomial_draw``: one running generator for the whole batch (the demo's figures were
  produced that way and are kept).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

Draw = Callable[[torch.Tensor], torch.Tensor]   # (rows, V) probabilities -> (rows,) token ids


def multinomial_draw(generator: torch.Generator) -> Draw:
    def draw(probs):
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)
    return draw


def row_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """A 63-bit seed for one response, from numpy's SeedSequence (well mixed, platform-independent)."""
    return int(np.random.SeedSequence([seed, prompt_index, sample_index]).generate_state(1, np.uint64)[0] >> 1)


def per_row_draw(seeds: list[int]) -> Draw:
    """Inverse-CDF draws, one uniform per row per step from that row's own generator."""
    generators = [torch.Generator().manual_seed(s) for s in seeds]

    def draw(probs):
        u = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in generators]).to(probs.device)
        cdf = torch.cumsum(probs.double(), -1)
        # The first token whose cumulative probability exceeds u * total (total ~ 1 after rounding).
        idx = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(1)
        return idx.clamp_(max=probs.shape[-1] - 1)
    return draw


def next_token_probs(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0) -> torch.Tensor:
    """(rows, V) sampling probabilities from last-position logits."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    if top_p < 1.0:
        # Nucleus: keep the smallest set of most likely tokens whose probability reaches top_p.
        sorted_logits, order = torch.sort(logits, -1, descending=True)
        sorted_probs = F.softmax(sorted_logits, -1)
        drop = torch.cumsum(sorted_probs, -1) - sorted_probs >= top_p   # mass before this token already >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return F.softmax(logits, -1)


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, draw: Draw, *, max_new_tokens: int, eos_ids, pad_id: int,
             attention_mask: torch.Tensor | None = None, temperature: float = 1.0, top_p: float = 1.0):
    """(sequences (B, L + new), generated (B, new) bool) for left-padded prompts ``input_ids``.

    ``generated`` marks the response tokens: those drawn up to and including the first EOS;
    later positions hold ``pad_id`` and only ever attend to earlier ones, so they cannot change
    a response. Without ``attention_mask`` every prompt is taken to be unpadded.
    """
    eos = torch.tensor(sorted(set(eos_ids)), device=input_ids.device)
    seq = input_ids
    done = torch.zeros(seq.shape[0], dtype=torch.bool, device=seq.device)
    generated = []
    kwargs = {}
    if attention_mask is not None:
        # Left padding: positions count real tokens only, as in generate().
        kwargs["attention_mask"] = attention_mask
        kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=seq, use_cache=True, **kwargs)
    for _ in range(max_new_tokens):
        probs = next_token_probs(out.logits[:, -1], temperature, top_p)
        nxt = draw(probs)
        generated.append(~done)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        seq = torch.cat([seq, nxt[:, None]], 1)
        done |= torch.isin(nxt, eos)
        if bool(done.all()):
            break
        if attention_mask is not None:
            kwargs["attention_mask"] = torch.cat([kwargs["attention_mask"], torch.ones_like(nxt[:, None])], 1)
            kwargs["position_ids"] = kwargs["position_ids"][:, -1:] + 1
        out = _step(model, nxt[:, None], out, kwargs)
    gen_mask = torch.stack(generated, 1) if generated else torch.zeros(seq.shape[0], 0, dtype=torch.bool)
    return seq, gen_mask


def _step(model, ids, previous, kwargs):
    """One cached forward step; Transformers 5 calls the cache ``cache``, 4.x ``past_key_values``."""
    cache = getattr(previous, "cache", None)
    if cache is not None:
        return model(input_ids=ids, cache=cache, use_cache=True, **kwargs)
    return model(input_ids=ids, past_key_values=previous.past_key_values, use_cache=True, **kwargs)
