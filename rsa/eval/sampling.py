"""Sampling responses token by token with a key/value cache, and how each token is drawn.

The loop is shared by `rsa eval` and the demo; only the draw differs:
- ``per_row_draw``: every response has its own generator, seeded by (seed, prompt index,
  sample index), and each token is drawn by inverting the CDF with one uniform from it. A
  response therefore depends on its seed and the model, not on which other responses share
  its batch or on where a resumed run starts.
- ``multinomial_draw``: one running generator for the whole batch (the demo's figures were
  produced that way and are kept).

With a reference model the loop also accumulates, per response, the KL of the distribution
each token was drawn from to the reference's next-token distribution (rsa.eval.kl). Every
forward keeps only the last position's logits, so no (rows, length, V) tensor is ever made.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .nexttoken import next_token_probs, sampler_logits, step_kl

__all__ = ["Decoder", "Sampled", "SamplingError", "generate", "multinomial_draw", "next_token_probs", "per_row_draw",
           "row_seed", "sample"]

Draw = Callable[[torch.Tensor], torch.Tensor]   # (rows, V) probabilities -> (rows,) token ids
# Bytes per logit per_row_draw holds besides its input: the float64 probabilities and their cumulative sum.
DRAW_BYTES_PER_LOGIT = 16


class SamplingError(ValueError):
    """Non-finite next-token probabilities of ``source`` ("model" or "reference") for ``rows`` at ``step``."""

    def __init__(self, source: str, rows: list[int], step: int):
        self.source, self.rows, self.step = source, rows, step
        super().__init__(f"the {source}'s next-token distribution is not finite (NaN or inf logits) at response "
                         f"step {step} for row(s) {rows}")


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


def last_position_only(model) -> dict:
    """Forward keywords that make a causal LM compute logits for the last position only."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model   # PEFT wraps the model
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(base.forward).parameters else {}


class Decoder:
    """A causal LM's cached forward over left-padded prompts, then one token per row per ``feed``;
    ``logits`` is the (rows, V) last position. Without ``attention_mask`` no prompt is padded."""

    def __init__(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        self.model, self.kwargs = model, last_position_only(model)
        if attention_mask is not None:
            # Left padding: positions count real tokens only, as Transformers' generate() counts them.
            self.kwargs["attention_mask"] = attention_mask
            self.kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        self.out = model(input_ids=input_ids, use_cache=True, **self.kwargs)

    @property
    def logits(self) -> torch.Tensor:
        return self.out.logits[:, -1]

    def feed(self, ids: torch.Tensor) -> None:
        if "attention_mask" in self.kwargs:
            self.kwargs["attention_mask"] = torch.cat([self.kwargs["attention_mask"], torch.ones_like(ids[:, None])], 1)
            self.kwargs["position_ids"] = self.kwargs["position_ids"][:, -1:] + 1
        # Transformers 5 calls the cache ``cache``, 4.x ``past_key_values``.
        cache = getattr(self.out, "cache", None)
        cache = {"cache": cache} if cache is not None else {"past_key_values": self.out.past_key_values}
        self.out = None   # the previous logits are freed before the next ones are made
        self.out = self.model(input_ids=ids[:, None], use_cache=True, **cache, **self.kwargs)


def check_rows(bad: torch.Tensor, live: torch.Tensor, source: str, step: int) -> None:
    """SamplingError naming the live rows marked ``bad``."""
    bad = bad & live
    if bool(bad.any()):
        raise SamplingError(source, bad.nonzero().flatten().tolist(), step)


def live_kl(z: torch.Tensor, reference: Decoder, live: torch.Tensor, step: int) -> torch.Tensor:
    """(rows,) step_kl of the sampler's logits ``z`` to the reference's, 0 on rows not ``live``.
    +inf is a true value (the reference cannot draw a token the sampler can); NaN is an error."""
    kl = step_kl(z, reference.logits)
    check_rows(torch.isnan(kl), live, "reference", step)
    return torch.where(live, kl, torch.zeros_like(kl))


@dataclass
class Sampled:
    seq: torch.Tensor               # (B, L + new): prompts then responses, pad_id after each response's end
    generated: torch.Tensor         # (B, new) bool: the response tokens, the first EOS included
    kl: torch.Tensor | None         # (B,) float32 KL to the reference (rsa.eval.kl), None without one


@torch.no_grad()
def sample(model, input_ids: torch.Tensor, draw: Draw, *, max_new_tokens: int, eos_ids, pad_id: int,
           attention_mask: torch.Tensor | None = None, temperature: float = 1.0, top_p: float = 1.0,
           reference=None) -> Sampled:
    """Responses to left-padded prompts ``input_ids``, and with ``reference`` their KL to it.

    Positions after a response's end hold ``pad_id`` and only ever attend to earlier ones, so
    they cannot change a response. A non-finite next-token distribution on a live row raises
    SamplingError (the draw would otherwise return an arbitrary token).
    """
    eos = torch.tensor(sorted(set(eos_ids)), device=input_ids.device)
    policy = Decoder(model, input_ids, attention_mask)
    ref = Decoder(reference, input_ids, attention_mask) if reference is not None else None
    seq = input_ids
    done = torch.zeros(seq.shape[0], dtype=torch.bool, device=seq.device)
    kl = torch.zeros(seq.shape[0], device=seq.device) if ref is not None else None
    generated = []
    for step in range(max_new_tokens):
        z = sampler_logits(policy.logits, temperature, top_p)
        probs = F.softmax(z, -1)
        check_rows(~torch.isfinite(probs).all(-1), ~done, "model", step)
        if ref is not None:
            kl += live_kl(z, ref, ~done, step)
        nxt = draw(probs)
        del z, probs
        generated.append(~done)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        seq = torch.cat([seq, nxt[:, None]], 1)
        done |= torch.isin(nxt, eos)
        if bool(done.all()):
            break
        for decoder in (policy, ref) if ref is not None else (policy,):
            decoder.feed(nxt)
    gen_mask = torch.stack(generated, 1) if generated else torch.zeros(seq.shape[0], 0, dtype=torch.bool)
    return Sampled(seq, gen_mask, kl)


def generate(model, input_ids: torch.Tensor, draw: Draw, *, max_new_tokens: int, eos_ids, pad_id: int,
             attention_mask: torch.Tensor | None = None, temperature: float = 1.0, top_p: float = 1.0):
    """(sequences (B, L + new), generated (B, new) bool): ``sample`` without a reference."""
    out = sample(model, input_ids, draw, max_new_tokens=max_new_tokens, eos_ids=eos_ids, pad_id=pad_id,
                 attention_mask=attention_mask, temperature=temperature, top_p=top_p)
    return out.seq, out.generated
