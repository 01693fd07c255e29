"""The KL that `rsa eval` reports is KL(S || R): S the sampler (the model at the run's temperature and
top-p), R the reference model; checked against a brute-force enumeration of every response of a
tiny model. Also: the sampling loop and ``sequence_kl`` agree, no forward makes logits for more
than the last position, the KL's row chunks do not change it, and a NaN stops sampling."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from rsa.eval import kl as eval_kl
from rsa.eval.nexttoken import KL_BYTES_PER_LOGIT, kl_chunk_rows, sampler_logits, step_kl
from rsa.eval.sampling import SamplingError, per_row_draw, row_seed, sample

VOCAB, EOS, PAD = 6, 5, 0
PROMPT = [1, 2, 3]
MAX_NEW = 3
TEMPERATURE, TOP_P = 0.7, 0.8


def tiny_lm(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=EOS, pad_token_id=PAD)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():   # spread the next-token distributions: nuclei of 1 to 5 tokens
        model.lm_head.weight.mul_(40.0)
    return model


@pytest.fixture(scope="module")
def models():
    return tiny_lm(0), tiny_lm(1)


def nucleus(p: np.ndarray, top_p: float) -> np.ndarray:
    """The most likely tokens until their mass reaches top_p, renormalised (float64, by a loop)."""
    keep, mass = np.zeros_like(p, bool), 0.0
    for i in np.argsort(-p, kind="stable"):
        keep[i] = True
        mass += p[i]
        if mass >= top_p:
            break
    return np.where(keep, p, 0.0) / p[keep].sum()


def next_token(model, prefix: list[int]) -> np.ndarray:
    """float64 logits after ``prefix``, by a full forward without cache."""
    with torch.no_grad():
        return model(torch.tensor([prefix])).logits[0, -1].double().numpy()


def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def responses():
    """Every response of at most MAX_NEW tokens: ending at EOS, or cut at MAX_NEW."""
    for k in range(1, MAX_NEW + 1):
        for ys in itertools.product(range(VOCAB), repeat=k):
            if EOS not in ys[:-1] and (ys[-1] == EOS or k == MAX_NEW):
                yield list(ys)


@pytest.fixture(scope="module")
def enumerated(models):
    """(responses, S(y), R(y), raw per-step KL sum along y) for every y the sampler can produce."""
    policy, ref = models
    out, margins, logits = [], [], {}
    for ys in responses():
        log_s = log_r = raw = 0.0
        for t in range(len(ys)):
            key = tuple(ys[:t])
            if key not in logits:
                logits[key] = next_token(policy, PROMPT + ys[:t]), next_token(ref, PROMPT + ys[:t])
            z, zr = logits[key]
            p_t = softmax(z / TEMPERATURE)
            before = np.cumsum(np.sort(p_t)[::-1]) - np.sort(p_t)[::-1]
            margins.append(np.abs(before - TOP_P).min())
            s_t, r_t, m_t = nucleus(p_t, TOP_P), softmax(zr), softmax(z)
            if s_t[ys[t]] == 0:
                break
            log_s, log_r = log_s + np.log(s_t[ys[t]]), log_r + np.log(r_t[ys[t]])
            raw += float((m_t * (np.log(m_t) - np.log(r_t))).sum())   # the raw model's KL, today's number
        else:
            out.append((ys, np.exp(log_s), np.exp(log_r), raw))
    assert min(margins) > 1e-4   # no nucleus boundary within rounding of top_p: float32 cuts the same tokens
    return out


def padded(rows: list[list[int]]):
    seq = torch.tensor([PROMPT + ys + [PAD] * (MAX_NEW - len(ys)) for ys in rows])
    generated = torch.tensor([[t < len(ys) for t in range(MAX_NEW)] for ys in rows])
    return seq, generated


def test_reported_kl_is_the_samplers_kl_by_enumeration(models, enumerated):
    """E_S[per-response KL] = KL(S || R) = sum_y S(y) log(S(y) / R(y)), over every response."""
    policy, ref = models
    ys, s, r, raw = map(list, zip(*enumerated))
    s, r = np.array(s), np.array(r)
    assert s.sum() == pytest.approx(1.0, abs=1e-9) and 3 < len(ys) < 150   # S is a distribution; top-p cut some
    want = float((s * np.log(s / r)).sum())
    seq, generated = padded(ys)
    got = eval_kl.sequence_kl(policy, ref, seq, len(PROMPT), generated, temperature=TEMPERATURE, top_p=TOP_P)
    assert float((s * got.double().numpy()).sum()) == pytest.approx(want, rel=1e-4)
    # The raw model's per-step KL along the same samples (what was reported before) is another number.
    print(f"KL(S || R) {want:.4f}, the raw model's KL along S's samples {float((s * np.array(raw)).sum()):.4f}")
    assert abs(float((s * np.array(raw)).sum()) - want) > 0.1 * want
    # At temperature 1 and top-p 1 the sampler is the model: the same function gives KL(model || ref).
    seq1, gen1 = padded(list(map(list, itertools.product(range(VOCAB), repeat=1))))
    one_step = eval_kl.sequence_kl(policy, ref, seq1, len(PROMPT), gen1)
    m, q = softmax(next_token(policy, PROMPT)), softmax(next_token(ref, PROMPT))
    assert one_step[0].item() == pytest.approx(float((m * np.log(m / q)).sum()), rel=1e-5)


def test_the_sampling_loop_reports_the_same_kl(models):
    """The KL accumulated while drawing (rsa eval's path) equals sequence_kl on the drawn responses,
    with left-padded prompts of different lengths."""
    policy, ref = models
    prompts = [[1, 2, 3, 4], [1, 3], [1, 4, 4, 2, 3, 2]]
    width = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = sample(policy, ids, per_row_draw([row_seed(3, i, 0) for i in range(3)]), max_new_tokens=6, eos_ids=[EOS],
                 pad_id=PAD, attention_mask=mask, temperature=TEMPERATURE, top_p=TOP_P, reference=ref)
    again = eval_kl.sequence_kl(policy, ref, out.seq, width, out.generated, mask, TEMPERATURE, TOP_P)
    torch.testing.assert_close(out.kl, again, rtol=1e-5, atol=1e-6)
    for i, p in enumerate(prompts):   # each row alone, unpadded
        row = torch.cat([torch.tensor(p), out.seq[i, width:][out.generated[i]]])[None]
        alone = eval_kl.sequence_kl(policy, ref, row, len(p), out.generated[i][out.generated[i]][None],
                                    temperature=TEMPERATURE, top_p=TOP_P)
        assert alone.item() == pytest.approx(out.kl[i].item(), rel=1e-4, abs=1e-6)


def test_every_forward_makes_last_position_logits_only(models):
    """The prompt forward and the KL keep one position per row: no (rows, length, V) logits."""
    policy, ref = models
    shapes = []
    hooks = [m.get_output_embeddings().register_forward_hook(lambda mod, args, out: shapes.append(tuple(out.shape)))
             for m in (policy, ref)]
    try:
        ids = torch.tensor([[1, 2, 3, 4, 2, 3, 4, 2]] * 2)
        out = sample(policy, ids, per_row_draw([1, 2]), max_new_tokens=5, eos_ids=[EOS], pad_id=PAD, reference=ref)
        eval_kl.sequence_kl(policy, ref, out.seq, ids.shape[1], out.generated)
    finally:
        for h in hooks:
            h.remove()
    assert shapes and all(s == (2, 1, VOCAB) for s in shapes), shapes


def test_kl_row_chunks_respect_the_budget_and_change_nothing():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(7, 1000, generator=gen) * 4
    z[0, :500] = float("-inf")                       # a nucleus: tokens never drawn add nothing
    zr = (torch.randn(7, 1000, generator=gen) * 4).to(torch.bfloat16)
    whole = step_kl(z, zr, budget_bytes=2**40)
    budget = 2 * 1000 * KL_BYTES_PER_LOGIT + 10
    assert kl_chunk_rows(1000, budget) == 2 and kl_chunk_rows(1000, 1) == 1
    torch.testing.assert_close(step_kl(z, zr, budget_bytes=budget), whole, rtol=0, atol=0)
    log_s, log_r = torch.log_softmax(z.double(), -1), torch.log_softmax(zr.double(), -1)
    want = torch.where(log_s.isinf(), 0.0, log_s.exp() * (log_s - log_r)).sum(-1)
    torch.testing.assert_close(whole.double(), want, rtol=1e-5, atol=1e-6)
    zr[1, 3] = float("-inf")                          # the reference cannot draw a token the sampler can
    assert step_kl(z, zr)[1].item() == float("inf")


def test_sampler_logits_leave_their_input_alone():
    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(1))
    before = logits.clone()
    z = sampler_logits(logits, 1.0, 0.5)
    assert torch.equal(logits, before) and torch.isinf(z).any()


def test_nan_in_the_next_token_distribution_raises(models):
    """A NaN logit used to make the inverse-CDF draw return the last token id, silently."""
    policy, ref = models
    broken = tiny_lm(0)
    with torch.no_grad():
        broken.lm_head.weight[2, 0] = float("nan")
    ids = torch.tensor([PROMPT, PROMPT])
    with pytest.raises(SamplingError, match=r"the model's next-token distribution is not finite .* row\(s\) \[0, 1\]"):
        sample(broken, ids, per_row_draw([1, 2]), max_new_tokens=3, eos_ids=[EOS], pad_id=PAD)
    with pytest.raises(SamplingError, match=r"the reference's next-token distribution is not finite"):
        sample(policy, ids, per_row_draw([1, 2]), max_new_tokens=3, eos_ids=[EOS], pad_id=PAD, reference=broken)
    # A -inf logit (a token the model can never produce) is no error.
    masked = tiny_lm(0)
    with torch.no_grad():
        masked.lm_head.bias = torch.nn.Parameter(torch.tensor([0.0, 0, 0, float("-inf"), 0, 0]))
    out = sample(masked, ids, per_row_draw([1, 2]), max_new_tokens=3, eos_ids=[EOS], pad_id=PAD, reference=ref)
    assert not (out.seq[:, len(PROMPT):] == 3).any() and torch.isfinite(out.kl).all()
