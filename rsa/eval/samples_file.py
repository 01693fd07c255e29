"""samples.jsonl: one line per response, appended batch by batch, resumable.

Lines are written in the order of the plan (model by model, then batch by batch), each
batch in one write followed by fsync. On a restart the file is checked against the plan
from the top: the batches whose lines are all present, in order, are kept; anything after
the last complete batch (a batch cut by a kill while it was being written) is cut off and
that batch is sampled again. Sampling does not depend on where a run starts
(rsa.eval.sampling), so the file ends exactly as an uninterrupted run writes it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

Key = tuple[str, int, int]    # (model, prompt_index, sample_index)


def line_key(line: bytes) -> Key | None:
    try:
        rec = json.loads(line)
        return rec["model"], rec["prompt_index"], rec["sample_index"]
    except (ValueError, KeyError, TypeError):
        return None


def resume(path: Path, batches: list[list[Key]]) -> int:
    """How many batches of the plan ``path`` already holds; truncates whatever follows them."""
    if not path.exists():
        path.write_bytes(b"")
        return 0
    data = path.read_bytes()
    lines = data.split(b"\n")[:-1]   # complete lines only: the last piece has no newline
    done, offset, i = 0, 0, 0
    for batch in batches:
        if i + len(batch) > len(lines) or any(line_key(lines[i + j]) != key for j, key in enumerate(batch)):
            break
        offset += sum(len(lines[i + j]) + 1 for j in range(len(batch)))
        i += len(batch)
        done += 1
    if offset < len(data):
        with open(path, "r+b") as fh:
            fh.truncate(offset)
    return done


def append(path: Path, records: list[dict]) -> None:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def read(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
