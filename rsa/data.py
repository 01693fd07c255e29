"""Preference data: local JSONL / JSON / Parquet or a hub data set -> validated pairs -> token ids -> batches.

Two record schemas:
- pairs {prompt, chosen, rejected}: plain text, or chat messages ([{role, content}, ...]; the
  responses may be a string, taken as the assistant's reply) rendered by the chat template;
- PKU-SafeRLHF {prompt, response_0, response_1, better_response_id, safer_response_id,
  is_response_0_safe, is_response_1_safe}: `preference: helpful` makes the better response
  the chosen one, `preference: safe` the safer one.
Every record is checked before training; a bad one raises DataError naming the file, the line
(or Parquet row) and the field. A hub id (or a local clone of a hub data set repository) is read
with datasets.load_dataset (config ``name``, ``split``, ``revision``: rsa/hub.py).

A prompt template (rsa/templates.py) renders text prompts as Safe RLHF does: the sequence is
the tokenization of the one string template(prompt) + response + EOS, and the tokens of
template(prompt) are the prompt (masked out of the loss).
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from rsa.errors import UserError
from rsa.templates import apply_template

IGNORE_INDEX = -100


class DataError(UserError):
    """A malformed data file or record: the message names the file, the line and the field."""


@dataclass
class Pair:
    prompt: str | list
    chosen: str | list
    rejected: str | list
    where: str  # "FILE, line N" for error messages


# ---------------------------------------------------------------- reading files

def read_records(path) -> list[tuple[str, dict]]:
    """[(where, record)] from a .jsonl, .json (a list of objects) or .parquet file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        out = []
        with open(path, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}, line {n}: invalid JSON ({err.msg})") from None
                out.append((f"{path}, line {n}", rec))
        return out
    if suffix == ".json":
        return _read_json_array(path)
    if suffix == ".parquet":
        import pyarrow.parquet as pq
        rows = pq.read_table(path).to_pylist()
        return [(f"{path}, row {i + 1}", rec) for i, rec in enumerate(rows)]
    raise DataError(f"{path}: unsupported data file type {suffix!r}; use .jsonl, .json or .parquet")


def _read_json_array(path: Path) -> list[tuple[str, dict]]:
    """A JSON list of objects, each with the line where it starts (so errors can name it)."""
    text = path.read_text(encoding="utf-8")
    dec = json.JSONDecoder()

    def fail(pos, msg):
        raise DataError(f"{path}, line {text.count(chr(10), 0, pos) + 1}: {msg}")

    pos = _skip_ws(text, 0)
    if pos >= len(text) or text[pos] != "[":
        fail(pos, "a .json data file must hold a list of records ([{...}, ...])")
    pos = _skip_ws(text, pos + 1)
    out = []
    if pos < len(text) and text[pos] == "]":
        return out
    while True:
        try:
            rec, end = dec.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            fail(err.pos, f"invalid JSON ({err.msg})")
        out.append((f"{path}, line {text.count(chr(10), 0, pos) + 1}", rec))
        pos = _skip_ws(text, end)
        if pos < len(text) and text[pos] == ",":
            pos = _skip_ws(text, pos + 1)
            continue
        if pos < len(text) and text[pos] == "]":
            return out
        fail(pos, "invalid JSON (expected ',' or ']')")


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


# ---------------------------------------------------------------- records -> pairs

def load_pairs(path, preference: str | None = None, max_samples: int | None = None, name: str | None = None,
               split: str | None = None, revision: str | None = None, template: str | None = None) -> list[Pair]:
    """Read and validate every record of a file, a hub data set or a local data set folder (config
    ``name``, ``split``, ``revision``); DataError on the first bad one. With a prompt ``template``,
    a message-list prompt is refused (those keep the tokenizer's chat template)."""
    records = read_any(path, name, split, revision, "data")
    if not records:
        raise DataError(f"{path}: no records")
    if max_samples is not None:
        records = records[:max_samples]
    pairs = [record_to_pair(rec, where, preference) for where, rec in records]
    check_template_prompts(pairs, template)
    return pairs


def read_any(path, name: str | None, split: str | None, revision: str | None, what: str) -> list[tuple[str, dict]]:
    """Records of a local file (read_records), or of a hub id / local folder through datasets."""
    local = Path(str(path)).expanduser()
    if local.is_file():
        if name is not None or split is not None or revision is not None:
            raise DataError(f"{what}: {str(path)!r} is a local file; name, split and revision apply to a hub data "
                            "set or a data set folder")
        return read_records(local)
    from rsa.hub import is_hub_id, load_dataset_records
    if local.is_dir() or is_hub_id(path):
        return load_dataset_records(path, what, name, split, revision)
    return read_records(local)   # raises: no such data file


def check_template_prompts(items, template: str | None):
    """DataError at the first message-list prompt when a prompt template is set."""
    if template is None:
        return
    for item in items:
        value = item.prompt if isinstance(item, Pair) else item.value
        if isinstance(value, list):
            raise DataError(f"{item.where}: field 'prompt' is a message list, which is rendered with the tokenizer's "
                            "chat template; a prompt template applies to text prompts only (remove prompt_template, "
                            "or give text prompts)")


def record_to_pair(rec, where: str, preference: str | None) -> Pair:
    if not isinstance(rec, dict):
        raise DataError(f"{where}: a record must be a JSON object, got {type(rec).__name__}")
    if preference is None:
        prompt = _field(rec, where, "prompt", (str, list))
        chat = isinstance(prompt, list)
        if chat:
            _check_messages(prompt, where, "prompt")
        responses = []
        for name in ("chosen", "rejected"):
            value = _field(rec, where, name, (str, list) if chat else (str,))
            if isinstance(value, list):
                _check_messages(value, where, name)
            elif not value:
                raise DataError(f"{where}: field {name!r}: empty response")
            responses.append(value)
        if not chat and not prompt:
            raise DataError(f"{where}: field 'prompt': empty prompt")
        return Pair(prompt, responses[0], responses[1], where)
    if preference not in ("helpful", "safe"):
        raise ValueError(f"preference must be helpful, safe or None, got {preference!r}")
    prompt = _field(rec, where, "prompt", (str,))
    r0, r1 = (_field(rec, where, f"response_{i}", (str,)) for i in (0, 1))
    for name in ("is_response_0_safe", "is_response_1_safe"):
        if name in rec and rec[name] is not None and not isinstance(rec[name], bool):
            raise DataError(f"{where}: field {name!r} must be true or false, got {rec[name]!r}")
    key = "better_response_id" if preference == "helpful" else "safer_response_id"
    choice = _field(rec, where, key, (int,))
    if isinstance(choice, bool) or choice not in (0, 1):
        raise DataError(f"{where}: field {key!r} must be 0 or 1, got {choice!r}")
    for name, value in (("prompt", prompt), ("response_0", r0), ("response_1", r1)):
        if not value:
            raise DataError(f"{where}: field {name!r}: empty text")
    chosen, rejected = (r0, r1) if choice == 0 else (r1, r0)
    return Pair(prompt, chosen, rejected, where)


def _field(rec: dict, where: str, name: str, types: tuple):
    if name not in rec or rec[name] is None:
        raise DataError(f"{where}: missing field {name!r}")
    value = rec[name]
    if not isinstance(value, types):
        want = " or ".join("a string" if t is str else "a message list" if t is list else "an integer" for t in types)
        raise DataError(f"{where}: field {name!r} must be {want}, got {type(value).__name__}")
    return value


def _check_messages(messages: list, where: str, name: str):
    if not messages:
        raise DataError(f"{where}: field {name!r}: empty message list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: field {name!r}: message {i} must be {{'role': str, 'content': str}}")


def split_pairs(pairs: list[Pair], fraction: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    """(train, held-out) with round(fraction * n) >= 1 pairs held out, chosen by the seed."""
    idx = list(range(len(pairs)))
    random.Random(seed).shuffle(idx)
    k = max(1, round(fraction * len(pairs)))
    if k >= len(pairs):
        raise DataError(f"split={fraction} leaves no training pairs out of {len(pairs)}")
    held = set(idx[:k])
    return [p for i, p in enumerate(pairs) if i not in held], [p for i, p in enumerate(pairs) if i in held]


# ---------------------------------------------------------------- pairs -> token ids

def encode_pair(tokenizer, pair: Pair, max_length: int, max_prompt_length: int, template: str | None = None) -> dict:
    """Token ids and labels (prompt masked) of the chosen and rejected sequences.

    Truncation keeps the END of the prompt (at most max_prompt_length tokens) and the START of
    each response, so that prompt + response <= max_length. With a ``template``, each sequence
    is the tokenization of template(prompt) + response + EOS as one string (Safe RLHF's).
    """
    if template is not None:
        if not isinstance(pair.prompt, str):
            check_template_prompts([pair], template)
        parts = [_encode_templated(tokenizer, apply_template(template, pair.prompt), r)
                 for r in (pair.chosen, pair.rejected)]
    elif isinstance(pair.prompt, str):
        prompt_ids = tokenizer(pair.prompt, add_special_tokens=True)["input_ids"]
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        parts = [(prompt_ids, tokenizer(r, add_special_tokens=False)["input_ids"] + eos)
                 for r in (pair.chosen, pair.rejected)]
    else:
        prompt_ids, responses = _encode_chat(tokenizer, pair)
        parts = [(prompt_ids, r) for r in responses]
    out = {}
    for name, (prompt_ids, resp) in zip(("chosen", "rejected"), parts):
        prompt_ids = prompt_ids[-max_prompt_length:]
        resp = resp[:max_length - len(prompt_ids)]
        out[f"{name}_input_ids"] = prompt_ids + resp
        out[f"{name}_labels"] = [IGNORE_INDEX] * len(prompt_ids) + resp
    return out


def _encode_templated(tokenizer, prompt_text: str, response: str) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) splitting the tokens of prompt_text + response + EOS.

    The split is where the prompt's own tokens end when they are a prefix of the whole (the
    usual case); a token that spans the boundary (a tokenizer merging across it) is counted
    with the prompt, found from the character offsets.
    """
    eos = tokenizer.eos_token or ""
    full = tokenizer(prompt_text + response + eos, add_special_tokens=True)
    ids = full["input_ids"]
    prompt_ids = tokenizer(prompt_text, add_special_tokens=True)["input_ids"]
    if ids[:len(prompt_ids)] == prompt_ids:
        return prompt_ids, ids[len(prompt_ids):]
    offsets = tokenizer(prompt_text + response + eos, add_special_tokens=True,
                        return_offsets_mapping=True)["offset_mapping"]
    # The first token that starts after the prompt (special tokens the tokenizer adds have empty spans).
    cut = next((i for i, (start, end) in enumerate(offsets) if start >= len(prompt_text) and end > start), len(ids))
    return ids[:cut], ids[cut:]


def _encode_chat(tokenizer, pair: Pair):
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{pair.where}: field 'prompt' is a message list but the tokenizer has no chat template")
    prompt_text = tokenizer.apply_chat_template(pair.prompt, tokenize=False, add_generation_prompt=True)
    responses = []
    for name, resp in (("chosen", pair.chosen), ("rejected", pair.rejected)):
        msgs = [{"role": "assistant", "content": resp}] if isinstance(resp, str) else resp
        full = tokenizer.apply_chat_template(pair.prompt + msgs, tokenize=False)
        if not full.startswith(prompt_text):
            raise DataError(f"{pair.where}: field {name!r}: the chat template does not render the conversation "
                            "as the prompt followed by the response")
        responses.append(tokenizer(full[len(prompt_text):], add_special_tokens=False)["input_ids"])
    return tokenizer(prompt_text, add_special_tokens=False)["input_ids"], responses


class PairDataset(torch.utils.data.Dataset):
    """Encoded pairs, tokenized once before training."""

    def __init__(self, pairs: list[Pair], tokenizer, max_length: int, max_prompt_length: int, progress=False,
                 template: str | None = None):
        from tqdm.auto import tqdm
        self.items = [encode_pair(tokenizer, p, max_length, max_prompt_length, template)
                      for p in tqdm(pairs, desc="tokenizing", disable=not progress, leave=False)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


class PairCollator:
    """Batches of pairs: chosen sequences first, then rejected (SPEC section 3).

    Padded: input_ids/attention_mask/labels (2B, T), right padding. Padding-free: one row
    (1, N) with position_ids restarting at each sequence (the models' attention then keeps
    sequences apart), labels (N,) and sequence_ids (N,) in [0, 2B).
    """

    def __init__(self, pad_token_id: int, padding_free: bool = False):
        self.pad_token_id = int(pad_token_id)
        self.padding_free = padding_free

    def __call__(self, features: list[dict]) -> dict:
        seqs = [f["chosen_input_ids"] for f in features] + [f["rejected_input_ids"] for f in features]
        labels = [f["chosen_labels"] for f in features] + [f["rejected_labels"] for f in features]
        if self.padding_free:
            ids = torch.tensor([t for s in seqs for t in s], dtype=torch.long)
            return {"input_ids": ids[None],
                    "position_ids": torch.cat([torch.arange(len(s)) for s in seqs])[None],
                    "labels": torch.tensor([t for s in labels for t in s], dtype=torch.long),
                    "sequence_ids": torch.cat([torch.full((len(s),), i) for i, s in enumerate(seqs)])}
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_token_id, dtype=torch.long)
        lab = torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, (s, l) in enumerate(zip(seqs, labels)):
            ids[i, :len(s)] = torch.tensor(s)
            lab[i, :len(l)] = torch.tensor(l)
            mask[i, :len(s)] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": lab}
