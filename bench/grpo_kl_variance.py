"""Variance of the KL penalty's gradient over resampled completions: TRL's k3 against exact.

For the same prompts, completions are sampled afresh R times from the policy (transformers'
generate, at the temperature). Each time, the gradient of the penalty term alone (reduced as
GRPO's default loss reduces it: mean over a completion's tokens, then over completions) is
taken with respect to every policy parameter, for:
- k3:            TRL's term exp(r - s) - (r - s) - 1 at the sampled token (use_bias_correction_kl=False);
- exact:         KL(ref || policy) over the vocabulary at every completion token (kl_estimator="exact");
- k3 x ratio:    TRL 1.16's default, the k3 term times the (differentiable) importance ratio.
k3 and exact have the same expected gradient on-policy (docs/grpo.md); k3 x ratio has another
(the reverse KL's), so its variance is listed, not compared. Reported: the total variance
sum_i Var(g_i) of each, the ratio k3 / exact, and how far the two means are apart in units of
the standard error of k3's mean (a check that they estimate the same thing).

The model is a randomly initialised Llama built from a config (no weights are downloaded
here), the policy being the reference with every weight moved by N(0, SIGMA^2).

    python bench/grpo_kl_variance.py [--vocab 4096] [--resamples 64] [--sigma 0.05]
"""
from __future__ import annotations

import argparse
import copy
import time

import torch
import transformers

from rsa.integrations.trl_grpo import exact_penalty


def models(vocab: int, hidden: int, layers: int, sigma: float):
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                   num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=256, tie_word_embeddings=False, eos_token_id=None,
                                   pad_token_id=0, bos_token_id=None)
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(cfg).eval()
    policy = copy.deepcopy(ref)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(sigma * torch.randn_like(p))
    return policy, ref.requires_grad_(False)


def grpo_mean(per_token):  # completions all have the same length here: no mask
    return per_token.mean(-1).mean()


def gradients(policy, ref, prompts, args, temperature):
    """One resample: the three estimators' gradients (flattened) and the exact KL's mean."""
    with torch.no_grad():
        seqs = policy.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True,
                               temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=args.length,
                               min_new_tokens=args.length, pad_token_id=0)
    width = seqs.size(1) - prompts.size(1)
    completion = seqs[:, -width:]
    hidden = policy.model(input_ids=seqs).last_hidden_state[:, -width - 1:-1]
    with torch.no_grad():
        ref_hidden = ref.model(input_ids=seqs).last_hidden_state[:, -width - 1:-1]
    params = [p for p in policy.parameters() if p.requires_grad]
    logits = policy.lm_head(hidden) / temperature
    s = torch.log_softmax(logits.float(), -1).gather(-1, completion.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        r = torch.log_softmax(ref.lm_head(ref_hidden).float() / temperature, -1)
        r = r.gather(-1, completion.unsqueeze(-1)).squeeze(-1)
    d = r - s
    k3 = torch.exp(d) - d - 1
    flat = lambda gs: torch.cat([g.reshape(-1) for g in gs])  # noqa: E731
    g_k3 = flat(torch.autograd.grad(grpo_mean(k3), params, retain_graph=True))
    g_ratio = flat(torch.autograd.grad(grpo_mean(k3 * torch.exp(s - s.detach())), params, retain_graph=True))
    stats = exact_penalty(hidden, policy.lm_head.weight, None, ref_hidden, ref.lm_head.weight, None, completion,
                          temperature=temperature)
    g_exact = flat(torch.autograd.grad(grpo_mean(stats.kl), params))
    return {"k3": g_k3, "exact": g_exact, "k3 x ratio": g_ratio}, stats.kl.mean().item(), k3.mean().item()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--sigma", type=float, default=0.05)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group", type=int, default=4, help="completions per prompt")
    ap.add_argument("--length", type=int, default=32, help="completion tokens")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--resamples", type=int, default=64)
    args = ap.parse_args(argv)
    policy, ref = models(args.vocab, args.hidden, args.layers, args.sigma)
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(1, args.vocab, (args.prompts, 8), generator=g).repeat_interleave(args.group, 0)
    torch.manual_seed(2)
    samples, kls, k3s, t0 = {}, [], [], time.perf_counter()
    for i in range(args.resamples):
        grads, kl, k3 = gradients(policy, ref, prompts, args, args.temperature)
        for name, v in grads.items():
            samples.setdefault(name, []).append(v.double())
        kls.append(kl)
        k3s.append(k3)
        print(f"\rresample {i + 1}/{args.resamples}", end="", flush=True)
    print(f"  ({time.perf_counter() - t0:.0f} s)")
    var, mean = {}, {}
    for name, vs in samples.items():
        x = torch.stack(vs)
        mean[name] = x.mean(0)
        var[name] = x.var(0, unbiased=True).sum().item()
    stderr = (var["k3"] / args.resamples) ** 0.5
    print(f"model: random-init Llama, vocab {args.vocab}, hidden {args.hidden}, {args.layers} layers; policy = "
          f"reference + N(0, {args.sigma}^2); {args.prompts} prompts x {args.group} completions of "
          f"{args.length} tokens, temperature {args.temperature}, {args.resamples} resamples")
    print(f"mean exact KL(ref||policy) per token {sum(kls) / len(kls):.4f}; mean k3 value {sum(k3s) / len(k3s):.4f}")
    for name in samples:
        print(f"  total gradient variance  {name:11s} {var[name]:.4e}")
    print(f"  ratio k3 / exact: {var['k3'] / var['exact']:.1f}")
    print(f"  |mean k3 - mean exact| = {(mean['k3'] - mean['exact']).norm().item():.3e} "
          f"(standard error of k3's mean: {stderr:.3e}; |mean exact| = {mean['exact'].norm().item():.3e})")


if __name__ == "__main__":
    main()
