"""The SFT model: a tiny Llama-style model and a word-level tokenizer, trained on the demonstrator.

Nothing is downloaded: the model comes from a LlamaConfig and the tokenizer from the task's
vocabulary; both are saved in one Hugging Face directory, which is what the trainer loads.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import task

MAX_LEN = 1 + task.PROMPT_LEN + task.MAX_RESPONSE + 1   # BOS, prompt, response, EOS


def build_tokenizer():
    """A PreTrainedTokenizerFast over the task's vocabulary; text is space-separated words."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab=dict(task.TOKEN_ID), unk_token=task.UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # BOS first, as Llama tokenizers do; responses are tokenized without special tokens.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{task.BOS} $A", pair=f"{task.BOS} $A $B", special_tokens=[(task.BOS, task.BOS_ID)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=task.BOS, eos_token=task.EOS,
                                   pad_token=task.PAD, unk_token=task.UNK, model_max_length=MAX_LEN)


def build_model(seed: int, hidden: int = 64, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(task.VOCAB), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=32, bos_token_id=task.BOS_ID, eos_token_id=task.EOS_ID,
                         pad_token_id=task.PAD_ID, tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def demonstrations(rng: np.random.Generator, n: int):
    """(ids, labels) tensors of n demonstrator sequences; loss only on response and EOS."""
    ids = torch.full((n, MAX_LEN), task.PAD_ID, dtype=torch.long)
    labels = torch.full((n, MAX_LEN), -100, dtype=torch.long)
    plist = task.prompts()
    for i in range(n):
        intent, topic = plist[rng.integers(len(plist))]
        prompt = [task.BOS_ID] + task.encode(task.prompt_text(intent, topic).split())
        resp = task.encode(task.demonstration(rng, intent, topic)) + [task.EOS_ID]
        seq = prompt + resp
        ids[i, :len(seq)] = torch.tensor(seq)
        labels[i, len(prompt):len(seq)] = torch.tensor(resp)
    return ids, labels


def train_sft(seed: int, steps: int = 200, batch_size: int = 64, lr: float = 5e-3,
              n_data: int = 8000, progress: bool = True, on_step=None):
    """Train the SFT model on fresh demonstrator data; returns (model, final loss).

    ``on_step``: called after every step (the demo's progress across the whole run)."""
    rng = np.random.default_rng(seed)
    model = build_model(seed)
    ids, labels = demonstrations(rng, n_data)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    bar = tqdm(range(steps), desc=f"sft seed {seed}", disable=not progress, leave=False)
    loss_value = float("nan")
    for _ in bar:
        idx = torch.randint(0, n_data, (batch_size,), generator=gen)
        x, y = ids[idx], labels[idx]
        # HF shifts labels internally; padding after EOS is never attended by scored tokens.
        loss = model(input_ids=x, attention_mask=(x != task.PAD_ID).long(), labels=y).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        loss_value = loss.item()
        bar.set_postfix(loss=f"{loss_value:.3f}")
        if on_step is not None:
            on_step()
    model.eval()
    return model, loss_value


def save_sft(model, path: Path) -> Path:
    path = Path(path)
    model.save_pretrained(path, safe_serialization=True)
    build_tokenizer().save_pretrained(path)
    return path


def load_model(path: Path):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(path, use_safetensors=True)
    model.eval()
    return model
