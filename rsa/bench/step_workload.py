"""The workload of `rsa bench --train`: one training step of a Llama-shaped model on preference pairs.

Every contender (rsa/bench/step_contenders.py) gets the same model (random weights from a
config and a seed; the policy starts as a copy of the reference, as in DPO), the same
tokenizer and the same pairs, so their steps differ only in how the trainer computes the loss.

The tokenizer is word-level over the whole vocabulary ("<pad>", "<unk>", "</s>", then one
word per id), built here: the pairs are random words, so every id is a real token and the
lm head weighs as it does with a real tokenizer of that size. Every prompt and response has
the same length, so every step processes the same number of tokens.
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass, replace

SPECIALS = ("<pad>", "<unk>", "</s>")


@dataclass(frozen=True)
class StepSizes:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocabs: tuple            # one measurement per vocabulary size
    prompt: int              # prompt tokens
    response: int            # tokens of each response, its end-of-sequence token included
    pairs: int = 2           # pairs per step
    warmup: int = 1          # untimed steps first (the first creates the optimizer state)
    steps: int = 5           # timed steps per process
    rounds: int = 1          # processes per contender and vocabulary, interleaved with the others'
    seed: int = 0

    def as_dict(self) -> dict:
        return asdict(self)

    def tokens_per_step(self) -> int:
        return 2 * self.pairs * (self.prompt + self.response)


# Llama proportions (intermediate ~ 8/3 H, head size 64 at H >= 256) with a small body, so that
# a step fits a small machine while the lm head is that of Llama-2 (V=32000) or Llama-3 (128256)
MODES = {
    "tiny": StepSizes(1, 32, 4, 2, 64, (256, 1000), prompt=4, response=12, warmup=1, steps=2),
    "quick": StepSizes(2, 256, 4, 4, 688, (32000,), prompt=32, response=64, warmup=1, steps=5),
    "full": StepSizes(4, 512, 8, 8, 1376, (32000, 128256), prompt=64, response=192, warmup=1, steps=3, rounds=2),
}


def sizes_for(mode: str, **overrides) -> StepSizes:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {sorted(MODES)}, got {mode!r}")
    return replace(MODES[mode], **{k: v for k, v in overrides.items() if v is not None})


def make_tokenizer(vocab: int):
    import tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {tok: i for i, tok in enumerate(SPECIALS)}
    words.update({f"t{i}": i for i in range(len(SPECIALS), vocab)})
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


def make_pairs(sizes: StepSizes, vocab: int, count: int) -> list[dict]:
    """``count`` pairs of random words {prompt, chosen, rejected}; each response is
    ``sizes.response - 1`` words: the trainers append the end-of-sequence token."""
    rng = random.Random(sizes.seed)

    def words(k):
        return " ".join(f"t{rng.randrange(len(SPECIALS), vocab)}" for _ in range(k))
    return [{"prompt": words(sizes.prompt), "chosen": words(sizes.response - 1),
             "rejected": words(sizes.response - 1)} for _ in range(count)]


def trl_rows(pairs: list[dict]) -> dict:
    """The pairs as TRL's text columns: responses start with a space and end with "</s>", so
    TRL neither adds its end-of-sequence token nor joins a response's first word to the prompt."""
    return {"prompt": [p["prompt"] for p in pairs], "chosen": [f" {p['chosen']} </s>" for p in pairs],
            "rejected": [f" {p['rejected']} </s>" for p in pairs]}


def make_models(sizes: StepSizes, vocab: int, dtype=None):
    """(policy, reference): one Llama-shaped model from a config and the seed, and its copy."""
    import copy

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=sizes.hidden, intermediate_size=sizes.intermediate,
                      num_hidden_layers=sizes.layers, num_attention_heads=sizes.heads,
                      num_key_value_heads=sizes.kv_heads, max_position_embeddings=sizes.prompt + sizes.response + 8,
                      tie_word_embeddings=False, pad_token_id=0, bos_token_id=None, eos_token_id=2)
    torch.manual_seed(sizes.seed)
    ref = LlamaForCausalLM(cfg)
    if dtype is not None:
        ref = ref.to(dtype)
    return copy.deepcopy(ref), ref
