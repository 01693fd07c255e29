"""Prompts to sample: JSONL, JSON or Parquet records with a `prompt` field, or a data set
(a hub id or a local data set folder: config, split and column chosen, rsa/hub.py).

The field is text, or chat messages ([{role, content}, ...]) rendered with the model's chat
template exactly as the trainer renders a prompt (rsa.data): generation prompt added, no
special tokens added again when tokenizing; text prompts are tokenized as the trainer does,
with the tokenizer's special tokens (e.g. BOS). Other fields are ignored, so PKU-SafeRLHF
files work as they are. Every record is one prompt; its index is its position in the file.
A prompt template (rsa/templates.py) renders text prompts exactly as the trainer does.
"""
from __future__ import annotations

from dataclasses import dataclass

from rsa.data import DataError, _check_messages, check_template_prompts, read_any
from rsa.templates import apply_template


@dataclass(frozen=True)
class Prompt:
    value: str | list      # text or chat messages
    where: str             # "FILE, line N" for error messages


def load_prompts(path, name: str | None = None, split: str | None = None, column: str = "prompt",
                 template: str | None = None) -> list[Prompt]:
    """Every record's prompt, checked; DataError naming the file and line of the first bad one.
    ``name``/``split``: a data set's config and split (hub id or folder); ``column``: the field read."""
    records = read_any(path, name, split, None, "--prompts")
    if not records:
        raise DataError(f"{path}: no records")
    out = []
    for where, rec in records:
        if not isinstance(rec, dict):
            raise DataError(f"{where}: a record must be a JSON object, got {type(rec).__name__}")
        if rec.get(column) is None:
            raise DataError(f"{where}: missing field {column!r}")
        value = rec[column]
        if isinstance(value, list):
            _check_messages(value, where, column)
        elif not isinstance(value, str):
            raise DataError(f"{where}: field {column!r} must be a string or a message list, got {type(value).__name__}")
        elif not value:
            raise DataError(f"{where}: field {column!r}: empty prompt")
        out.append(Prompt(value, where))
    check_template_prompts(out, template)
    return out


def render(tokenizer, prompt: Prompt, template: str | None = None) -> tuple[str, list[int]]:
    """(the prompt's text as the model sees it, its token ids); a text prompt through ``template``."""
    if isinstance(prompt.value, str):
        text = apply_template(template, prompt.value)
        return text, tokenizer(text, add_special_tokens=True)["input_ids"]
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{prompt.where}: field 'prompt' is a message list but the model's tokenizer has no "
                        "chat template")
    text = tokenizer.apply_chat_template(prompt.value, tokenize=False, add_generation_prompt=True)
    return text, tokenizer(text, add_special_tokens=False)["input_ids"]
