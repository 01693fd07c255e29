"""P-SACPO merge: write (1 - W) A + W B of two saved models with the same tensors.

Both models are read from safetensors only; each output file mirrors A's (sharding and the
index included); A's config and tokenizer files are copied alongside. A LoRA stage stands
for its full weights, base + the scaled products B A of its adapters (rsa/lora.py), and the
output is then a full model with the layout of A's base.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

from .hub import commit_of, is_hub_id, model_folder
from .lora import AdapterDeltas, is_lora_folder

# Written by training runs or pickled: never copied into a merged model.
SKIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".pkl", ".ckpt")
SKIP_NAMES = {"stage.json", "metrics.jsonl", "merge.json", "training_args.bin"}
ADAPTER_NAMES = {"adapter_config.json", "README.md"}   # PEFT's, in a LoRA stage folder


def _weight_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{folder}: no .safetensors weights (pickled weights are not read)")
    return files


def merge_models(a, b, weight: float, out) -> Path:
    """Save (1 - weight) * A + weight * B to ``out``; returns ``out``. A and B: folders or hub ids
    ORG/NAME[@REVISION] (rsa/hub.py).

    Floating tensors are combined in float64 and cast back to A's dtype (so merging A with
    itself gives A exactly); other tensors must be equal in A and B. A or B may be a LoRA stage
    folder: its full weights (base + adapter updates, in float64) are used, so `rsa merge A A
    --weight 0` writes a LoRA stage's full weights.
    """
    given = {name: str(v) if is_hub_id(v) else str(Path(v)) for name, v in (("a", a), ("b", b))}
    a, b, out = model_folder(a, "a"), model_folder(b, "b"), Path(out)   # a hub id: its cache snapshot
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) \
            or not 0 <= weight <= 1:
        raise ValueError(f"weight must be a number in [0, 1], got {weight!r}")
    for name, p in (("a", a), ("b", b)):
        if not p.is_dir():
            raise ValueError(f"{name}: no such model folder {str(p)!r}")
    if out.resolve() in (a.resolve(), b.resolve()):
        raise ValueError("out must differ from both inputs")
    # Imported after the checks above (torch takes seconds): a mistake is reported at once.
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    deltas = {name: AdapterDeltas(p) if is_lora_folder(p) else None for name, p in (("a", a), ("b", b))}
    a_files, b_files = (d.base if d is not None else p for d, p in ((deltas["a"], a), (deltas["b"], b)))
    indexes = {}
    for name, folder in (("a", a_files), ("b", b_files)):
        indexes[name] = {}
        for f in _weight_files(folder):
            with safe_open(str(f), framework="pt") as fh:
                indexes[name].update({k: f for k in fh.keys()})
    b_index = indexes["b"]
    for name, d in deltas.items():
        missing = sorted(set(d.terms) - set(indexes[name])) if d is not None else []
        if missing:
            raise ValueError(f"{name}: its adapters change {missing[0]!r}, which its base model does not have")

    def full(name, key, tensor):
        return deltas[name].full(key, tensor) if deltas[name] is not None else tensor.double()

    out.mkdir(parents=True, exist_ok=True)
    seen = set()
    for f in _weight_files(a_files):
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
                merged[key] = ((1 - weight) * full("a", key, ta) + weight * full("b", key, tb)).to(ta.dtype)
            elif ta.equal(tb):
                merged[key] = ta
            else:
                raise ValueError(f"b: non-floating tensor {key!r} differs from a's and cannot be averaged")
            seen.add(key)
        save_file(merged, str(out / f.name), metadata=metadata)
    missing = sorted(set(b_index) - seen)
    if missing:
        raise ValueError(f"a: has no tensor {missing[0]!r} (the models differ in architecture)")
    # A's config (from its base for a LoRA stage) and tokenizer files; never PEFT's adapter files.
    for folder in dict.fromkeys((a_files, a)):
        skip = SKIP_NAMES | (ADAPTER_NAMES if is_lora_folder(folder) else set())
        for f in folder.iterdir():
            if f.is_file() and f.name not in skip and not f.name.endswith(SKIP_SUFFIXES):
                shutil.copy2(f, out / f.name)
    record = {"a": given["a"], "b": given["b"], "weight": weight}
    record.update({f"{name}_commit": commit_of(p) for name, p in (("a", a), ("b", b)) if commit_of(p)})
    record.update({f"{name}_base": str(d.base) for name, d in deltas.items() if d is not None})
    (out / "merge.json").write_text(json.dumps(record, indent=2) + "\n")
    return out
