"""Peak memory of `rsa eval` on its device, per component, from the shapes of the models.

The formula docs/eval.md shows for a 7B model, and bench/eval_memory.py checks against the
peak resident set of a real run on the CPU. Every model of a run (the model sampled, the
reference, the scorer folders) is on the device at once; the models are Llama-shaped
(hidden, layers, attention heads, key/value heads, MLP width, vocabulary).

    peak = weights + max(kv_cache * prompt / (prompt + new) + prompt_forward,
                         kv_cache + decode_step, scoring)

- weights: every parameter, at --dtype's bytes.
- kv_cache: the model's and the reference's key/value caches, 2 x layers x kv_dim values per
  token, for batch x (prompt + max_new_tokens) tokens; during the prompt forward they hold
  the prompt tokens only.
- prompt_forward: the largest transient of one decoder layer over the prompts (no gradient,
  one layer at a time): 3 intermediate + 4 hidden values per token. Counted: the MLP's gate
  activation, up projection and their product, the layer's input (held by its caller), the
  residual and the normed input; the fourth hidden-width tensor is what bench/eval_memory.py
  measures beyond the count.
  Attention is taken to be a fused kernel (SDPA, the Llama default, on CUDA and CPU); eager
  attention would add 2 x batch x heads x tokens^2 values. Logits: the last position only
  (rsa.eval.sampling.Decoder).
- decode_step: per step the two models' last-position logits (batch x V at --dtype) and the
  largest float32/float64 working set over the vocabulary that the sampler, the KL and the
  draw hold (rsa.eval.nexttoken, rsa.eval.sampling), the KL in row chunks under its budget.
- scoring: a scorer's forward over batch x (prompt + response) tokens, as prompt_forward
  (without a key/value cache: rsa.eval.scorers passes use_cache=False).
"""
from __future__ import annotations

from dataclasses import dataclass

from .nexttoken import KL_BUDGET_BYTES, KL_BYTES_PER_LOGIT, SAMPLER_BYTES_PER_LOGIT, kl_chunk_rows
from .sampling import DRAW_BYTES_PER_LOGIT

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
GIB = 2**30


@dataclass(frozen=True)
class Shape:
    """A Llama-shaped model: a causal LM (``labels`` 0) or a sequence classifier with ``labels`` outputs."""
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    head_dim: int = 0          # 0: hidden // heads
    tied: bool = False         # lm head shares the embedding
    labels: int = 0

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * (self.head_dim or self.hidden // self.heads)

    @property
    def params(self) -> int:
        h, q_dim = self.hidden, self.heads * (self.head_dim or self.hidden // self.heads)
        layer = h * q_dim * 2 + h * self.kv_dim * 2 + 3 * h * self.intermediate + 2 * h
        head = h * self.labels if self.labels else (0 if self.tied else self.vocab * h)
        return self.vocab * h + self.layers * layer + h + head

    @classmethod
    def of_config(cls, config, classifier: bool = False) -> "Shape":
        return cls(vocab=config.vocab_size, hidden=config.hidden_size, layers=config.num_hidden_layers,
                   heads=config.num_attention_heads,
                   kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
                   intermediate=config.intermediate_size, head_dim=getattr(config, "head_dim", None) or 0,
                   tied=bool(getattr(config, "tie_word_embeddings", False)),
                   labels=config.num_labels if classifier else 0)


def layer_transient(shape: Shape, rows: int, tokens: int, dtype_bytes: int) -> int:
    """Bytes one decoder layer holds at its peak over rows x tokens (no gradient, fused attention)."""
    return rows * tokens * (3 * shape.intermediate + 4 * shape.hidden) * dtype_bytes


def eval_peak(policy: Shape, reference: Shape | None = None, scorers: tuple = (), *, batch: int = 16,
              prompt_len: int, max_new_tokens: int = 256, dtype: str = "bfloat16",
              kl_budget: int = KL_BUDGET_BYTES) -> dict[str, int]:
    """Bytes per component of one `rsa eval` batch, and ``peak``, by the formula of the module docstring."""
    b = DTYPE_BYTES[dtype]
    lms = [policy] + ([reference] if reference is not None else [])
    out = {"weights: model": policy.params * b}
    if reference is not None:
        out["weights: reference"] = reference.params * b
    for i, s in enumerate(scorers):
        out[f"weights: scorer {i + 1}"] = s.params * b
    length = prompt_len + max_new_tokens
    out["kv_cache"] = sum(2 * m.layers * m.kv_dim * b * batch * length for m in lms)
    out["prompt_forward"] = max(layer_transient(m, batch, prompt_len, b) for m in lms)
    v = policy.vocab
    kl_rows = min(batch, kl_chunk_rows(v, kl_budget)) if reference is not None else 0
    probs = 8 * batch * v        # the sampler's float32 logits and probabilities, held through the step
    working = max(SAMPLER_BYTES_PER_LOGIT * batch * v, probs + KL_BYTES_PER_LOGIT * kl_rows * v,
                  probs + DRAW_BYTES_PER_LOGIT * batch * v)
    out["decode_step"] = len(lms) * batch * v * b + working
    out["scoring"] = max((layer_transient(s, batch, length, b) for s in scorers), default=0)
    weights = sum(x for k, x in out.items() if k.startswith("weights"))
    at_prompt = out["kv_cache"] * prompt_len // length
    out["peak"] = weights + max(at_prompt + out["prompt_forward"], out["kv_cache"] + out["decode_step"], out["scoring"])
    return out
