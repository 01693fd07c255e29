"""P-SACPO merge: write (1 - W) A + W B of two saved models with the same tensors.

Both models are read from safetensors only; each output file mirrors A's (sharding and the
index included); A's config and tokenizer files are copied alongside.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch

# Written by training runs or pickled: never copied into a merged model.
SKIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".pkl", ".ckpt")
SKIP_NAMES = {"stage.json", "metrics.jsonl", "merge.json", "training_args.bin"}


def _weight_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{folder}: no .safetensors weights (pickled weights are not read)")
    return files


def merge_models(a, b, weight: float, out) -> Path:
    """Save (1 - weight) * A + weight * B to ``out``; returns ``out``.

    Floating tensors are combined in float64 and cast back to A's dtype (so merging A with
    itself gives A exactly); other tensors must be equal in A and B.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    a, b, out = Path(a), Path(b), Path(out)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) \
            or not 0 <= weight <= 1:
        raise ValueError(f"weight must be a number in [0, 1], got {weight!r}")
    for name, p in (("a", a), ("b", b)):
        if not p.is_dir():
            raise ValueError(f"{name}: no such model folder {str(p)!r}")
    if out.resolve() in (a.resolve(), b.resolve()):
        raise ValueError("out must differ from both inputs")
    b_index = {}
    for f in _weight_files(b):
        with safe_open(str(f), framework="pt") as fh:
            b_index.update({k: f for k in fh.keys()})
    out.mkdir(parents=True, exist_ok=True)
    seen = set()
    for f in _weight_files(a):
        with safe_open(str(f), framework="pt") as fh:
            metadata = fh.metadata() or {"format": "pt"}
        tensors = load_file(str(f))
        merged = {}
        for key, ta in tensors.items():
            if key not in b_index:
                raise ValueError(f"b: has no tensor {key!r} (the models differ in architecture)")
            with safe_open(str(b_index[key]), framework="pt") as fh:
                tb = fh.get_tensor(key)
            if tb.shape != ta.shape:
                raise ValueError(f"b: tensor {key!r} has shape {tuple(tb.shape)}, a has {tuple(ta.shape)}")
            if ta.is_floating_point():
                merged[key] = ((1 - weight) * ta.double() + weight * tb.double()).to(ta.dtype)
            elif torch.equal(ta, tb):
                merged[key] = ta
            else:
                raise ValueError(f"b: non-floating tensor {key!r} differs from a's and cannot be averaged")
            seen.add(key)
        save_file(merged, str(out / f.name), metadata=metadata)
    missing = sorted(set(b_index) - seen)
    if missing:
        raise ValueError(f"a: has no tensor {missing[0]!r} (the models differ in architecture)")
    for f in a.iterdir():
        if f.is_file() and f.name not in SKIP_NAMES and not f.name.endswith(SKIP_SUFFIXES):
            shutil.copy2(f, out / f.name)
    (out / "merge.json").write_text(json.dumps({"a": str(a), "b": str(b), "weight": weight}, indent=2) + "\n")
    return out
