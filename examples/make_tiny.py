"""Write the tiny example files that examples/tiny.yaml and the README's `rsa eval` example use.

    python examples/make_tiny.py        # rewrites examples/sft, examples/cost and the .jsonl files

The committed files were made by this script. Nothing is downloaded: a 2-layer Llama-style
model (hidden size 16) with random weights and a word-level tokenizer over 40 words, a
sequence classifier of the same shape as a cost model, and small data files in the formats
`rsa train` and `rsa eval` read. They exercise the code paths in seconds on a CPU; the
numbers they give mean nothing.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
WORDS = ("the cat dog sat ran on a mat rug red blue big small is was and not help me how do i "
         "make safe harm please tell you can yes no sure sorry").split()
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
                 "{% if add_generation_prompt %}assistant : {% endif %}")


def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS + ["user", "assistant", ":"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece()   # joins words with spaces
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", chat_template=CHAT_TEMPLATE)


def llama_config(vocab_size: int, **extra):
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                       tie_word_embeddings=False, bos_token_id=2, eos_token_id=3, pad_token_id=0, **extra)


def sentence(rng, lo, hi):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def write_jsonl(records, path: Path):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def main():
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification
    tok = tokenizer()
    torch.manual_seed(0)
    LlamaForCausalLM(llama_config(len(tok))).save_pretrained(HERE / "sft")
    tok.save_pretrained(HERE / "sft")
    torch.manual_seed(1)
    LlamaForSequenceClassification(llama_config(len(tok), num_labels=1)).save_pretrained(HERE / "cost")
    tok.save_pretrained(HERE / "cost")
    rng = random.Random(0)
    write_jsonl([{"prompt": sentence(rng, 2, 6), "chosen": sentence(rng, 1, 5), "rejected": sentence(rng, 1, 5)}
                 for _ in range(8)], HERE / "helpful.jsonl")
    pku = []
    for _ in range(8):
        safe0, safe1 = rng.random() < 0.5, rng.random() < 0.5
        pku.append({"prompt": sentence(rng, 2, 6), "response_0": sentence(rng, 1, 5),
                    "response_1": sentence(rng, 1, 5), "better_response_id": rng.randint(0, 1),
                    "safer_response_id": 0 if safe0 and not safe1 else rng.randint(0, 1),
                    "is_response_0_safe": safe0, "is_response_1_safe": safe1})
    write_jsonl(pku, HERE / "pku.jsonl")
    prompts = [{"prompt": sentence(rng, 2, 6)} for _ in range(6)]
    prompts.append({"prompt": [{"role": "user", "content": "can you help me make a safe mat"}]})
    write_jsonl(prompts, HERE / "prompts.jsonl")
    print(f"wrote {HERE}/sft, cost, helpful.jsonl, pku.jsonl, prompts.jsonl")


if __name__ == "__main__":
    main()
