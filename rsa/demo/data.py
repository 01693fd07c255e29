"""Preference data: pairs sampled from the SFT model, labelled by r and c, PKU-SafeRLHF schema.

Each record is {prompt, response_0, response_1, better_response_id, safer_response_id,
is_response_0_safe, is_response_1_safe}, written one per line to a JSONL file which the
trainer reads back with ``preference: helpful`` or ``preference: safe``. A file keeps only
the pairs its preference orders strictly (no ties), as a labeller asked to choose would, and
drops the rare pair with an empty response (the schema needs text).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from . import task
from .evaluate import prompt_ids, sample


def sample_records(model, n_per_prompt: int, seed: int) -> list[dict]:
    """Two SFT responses for each of n_per_prompt draws of every prompt, fully labelled."""
    gen = torch.Generator().manual_seed(seed)
    plist = task.prompts()
    p = prompt_ids(plist)
    seq = sample(model, p, 2 * n_per_prompt, gen)[:, p.shape[1]:].tolist()
    records = []
    for k, (intent, topic) in enumerate(plist):
        rows = seq[k * 2 * n_per_prompt:(k + 1) * 2 * n_per_prompt]
        for a, b in zip(rows[0::2], rows[1::2]):
            w0, w1 = task.decode_response(a), task.decode_response(b)
            if not w0 or not w1:
                continue  # an immediate EOS: the schema (and the trainer) need non-empty text
            r0, r1 = task.reward(intent, w0), task.reward(intent, w1)
            c0, c1 = task.cost(intent, w0), task.cost(intent, w1)
            records.append({
                "prompt": task.prompt_text(intent, topic),
                "response_0": " ".join(w0), "response_1": " ".join(w1),
                "better_response_id": int(r1 > r0), "safer_response_id": int(c1 < c0),
                "is_response_0_safe": c0 == 0, "is_response_1_safe": c1 == 0,
                # not part of the schema: kept for the report, ignored by the trainer
                "_reward": [r0, r1], "_cost": [c0, c1],
                "_catastrophic": [task.is_catastrophic(w0), task.is_catastrophic(w1)],
            })
    return records


def preference_subset(records: list[dict], preference: str) -> list[dict]:
    """The records whose two responses the preference orders strictly."""
    if preference not in ("helpful", "safe"):
        raise ValueError(f"preference must be 'helpful' or 'safe', got {preference!r}")
    key = "_reward" if preference == "helpful" else "_cost"
    return [r for r in records if r[key][0] != r[key][1]]


def write_jsonl(records: list[dict], path: Path) -> Path:
    """Write the schema fields only (the trainer must not depend on our private labels)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for r in records:
            f.write(json.dumps({k: v for k, v in r.items() if not k.startswith("_")}) + "\n")
    return path


def data_stats(records: list[dict]) -> dict:
    """How many pairs, and how many hold a catastrophic response (the rare, decisive ones)."""
    cat = sum(any(r["_catastrophic"]) for r in records)
    return {"pairs": len(records), "pairs_with_catastrophic": cat}
