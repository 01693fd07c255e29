"""Prompts to sample: JSONL, JSON or Parquet records with a `prompt` field.

The field is text, or chat messages ([{role, content}, ...]) rendered with the model's chat
template exactly as the trainer renders a prompt (rsa.data): generation prompt added, no
special tokens added again when tokenizing; text prompts are tokenized as the trainer does,
with the tokenizer's special tokens (e.g. BOS). Other fields are ignored, so PKU-SafeRLHF
files work as they are. Every record is one prompt; its index is its position in the file.
"""
from __future__ import annotations

from dataclasses import dataclass

from rsa.data import DataError, _check_messages, read_records


@dataclass(frozen=True)
class Prompt:
    value: str | list      # text or chat messages
    where: str             # "FILE, line N" for error messages


def load_prompts(path) -> list[Prompt]:
    """Every record's prompt, checked; DataError naming the file and line of the first bad one."""
    records = read_records(path)
    if not records:
        raise DataError(f"{path}: no records")
    out = []
    for where, rec in records:
        if not isinstance(rec, dict):
            raise DataError(f"{where}: a record must be a JSON object, got {type(rec).__name__}")
        if rec.get("prompt") is None:
            raise DataError(f"{where}: missing field 'prompt'")
        value = rec["prompt"]
        if isinstance(value, list):
            _check_messages(value, where, "prompt")
        elif not isinstance(value, str):
            raise DataError(f"{where}: field 'prompt' must be a string or a message list, got {type(value).__name__}")
        elif not value:
            raise DataError(f"{where}: field 'prompt': empty prompt")
        out.append(Prompt(value, where))
    return out


def render(tokenizer, prompt: Prompt) -> tuple[str, list[int]]:
    """(the prompt's text as the model sees it, its token ids)."""
    if isinstance(prompt.value, str):
        return prompt.value, tokenizer(prompt.value, add_special_tokens=True)["input_ids"]
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{prompt.where}: field 'prompt' is a message list but the model's tokenizer has no "
                        "chat template")
    text = tokenizer.apply_chat_template(prompt.value, tokenize=False, add_generation_prompt=True)
    return text, tokenizer(text, add_special_tokens=False)["input_ids"]
