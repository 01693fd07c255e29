"""Sampling responses from a model and scoring them: reward, cost, tail, KL to the SFT model."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from . import task

CVAR_LEVEL = 0.95


def prompt_ids(plist=None) -> torch.Tensor:
    """(P, 1 + PROMPT_LEN) ids of the prompts: BOS then the prompt words."""
    plist = task.prompts() if plist is None else plist
    return torch.tensor([[task.BOS_ID] + task.encode(task.prompt_text(i, t).split()) for i, t in plist])


@torch.no_grad()
def sample(model, prompts: torch.Tensor, n: int, generator: torch.Generator,
           max_new: int = task.MAX_RESPONSE + 1) -> torch.Tensor:
    """(P * n, L + max_new) ids: n responses per prompt at temperature 1, PAD after EOS.

    Every prompt has the same length, so no attention mask is needed; tokens after EOS are
    replaced by PAD and only ever attend to earlier tokens, so they cannot change a sample.
    The key/value cache makes each new token cost one position, not the whole prefix.
    """
    seq = prompts.repeat_interleave(n, 0)
    done = torch.zeros(seq.shape[0], dtype=torch.bool)
    out = model(input_ids=seq, use_cache=True)
    for _ in range(max_new):
        logits = out.logits[:, -1].float()
        nxt = torch.multinomial(F.softmax(logits, -1), 1, generator=generator).squeeze(1)
        nxt = torch.where(done, torch.full_like(nxt, task.PAD_ID), nxt)
        seq = torch.cat([seq, nxt[:, None]], 1)
        done |= nxt == task.EOS_ID
        if bool(done.all()):
            break
        out = _step(model, nxt[:, None], out)
    return seq


def _step(model, ids, previous):
    """One cached forward step; Transformers 5 calls the cache ``cache``, 4.x ``past_key_values``."""
    cache = getattr(previous, "cache", None)
    if cache is not None:
        return model(input_ids=ids, cache=cache, use_cache=True)
    return model(input_ids=ids, past_key_values=previous.past_key_values, use_cache=True)


@torch.no_grad()
def sequence_kl(model, ref_model, seq: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """Per sample, sum over generated positions of KL(policy || reference) of the next token.

    Summing the exact per-step KL along the policy's own samples is an unbiased, low-variance
    estimate of the sequence-level KL(pi || pi_sft).
    """
    logp = F.log_softmax(model(input_ids=seq).logits.float(), -1)
    logq = F.log_softmax(ref_model(input_ids=seq).logits.float(), -1)
    step_kl = (logp.exp() * (logp - logq)).sum(-1)[:, prompt_len - 1:-1]   # predicts seq[:, prompt_len:]
    gen = seq[:, prompt_len:]
    # Count a position if it is generated (not padding after EOS); the EOS step itself counts.
    live = torch.ones_like(gen, dtype=torch.bool)
    live[:, 1:] = torch.cumsum((gen == task.EOS_ID).long(), 1)[:, :-1] == 0
    live &= gen != task.PAD_ID
    return (step_kl * live).sum(1)


@dataclass
class Samples:
    """Scores of every sampled response of one model, in prompt order."""
    intent: np.ndarray     # "ask" / "harm" per sample
    reward: np.ndarray
    cost: np.ndarray
    catastrophic: np.ndarray
    kl: np.ndarray


def score(model, ref_model, n: int, seed: int, batch_prompts: int = 12) -> Samples:
    """Sample n responses per prompt of the task and score them."""
    gen = torch.Generator().manual_seed(seed)
    plist = task.prompts()
    parts = {k: [] for k in ("intent", "reward", "cost", "catastrophic", "kl")}
    for start in range(0, len(plist), batch_prompts):
        chunk = plist[start:start + batch_prompts]
        p = prompt_ids(chunk)
        seq = sample(model, p, n, gen)
        kl = sequence_kl(model, ref_model, seq, p.shape[1]).numpy()
        for j, row in enumerate(seq[:, p.shape[1]:].tolist()):
            intent = chunk[j // n][0]
            words = task.decode_response(row)
            parts["intent"].append(intent)
            parts["reward"].append(task.reward(intent, words))
            parts["cost"].append(task.cost(intent, words))
            parts["catastrophic"].append(task.is_catastrophic(words))
        parts["kl"].append(kl)
    return Samples(np.array(parts["intent"]), np.array(parts["reward"], float), np.array(parts["cost"], float),
                   np.array(parts["catastrophic"], bool), np.concatenate(parts["kl"]).astype(float))


def cvar(values: np.ndarray, level: float = CVAR_LEVEL) -> float:
    """Mean of the worst (1 - level) fraction of the values (upper tail), atoms split exactly."""
    x = np.sort(np.asarray(values, float))[::-1]
    k = (1 - level) * len(x)
    whole = int(np.floor(k))
    total = x[:whole].sum() + (k - whole) * (x[whole] if whole < len(x) else 0.0)
    return float(total / k)


def summarize(s: Samples) -> dict:
    return {"reward_mean": float(s.reward.mean()), "cost_mean": float(s.cost.mean()),
            "cost_cvar95": cvar(s.cost), "catastrophic_rate": float(s.catastrophic.mean()),
            "kl_to_sft": float(s.kl.mean())}
