"""Local Hugging Face folders: causal LMs to sample, sequence classifiers to score with.

Weights are read from safetensors only (never unpickled), and a classifier whose head is not
in its weights is refused: Transformers would initialise the head at random and say so only
in a log line, which is what happens with score models saved by other libraries under
another head name (e.g. ``score_head`` where Transformers expects ``score``).
"""
from __future__ import annotations

from pathlib import Path

from rsa.errors import UserError
from rsa.lora import is_lora_folder, load_lora_stage, lora_chain


def check_model_folder(path, what: str) -> Path:
    """The folder, if it holds a config and safetensors weights; UserError naming ``what`` otherwise."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{what}: no such model folder {str(path)!r}")
    if is_lora_folder(path):   # a LoRA stage of `rsa train` (or a PEFT adapter over a local base)
        try:
            base = lora_chain(path)["base"]
        except ValueError as err:
            raise UserError(f"{what}: {err}") from err
        check_model_folder(base, f"{what} (the base of {str(path)!r})")
        return path
    if not (path / "config.json").is_file():
        raise UserError(f"{what}: {str(path)!r} has no config.json; is it a Hugging Face model folder?")
    if not any(path.glob("*.safetensors")):
        pickled = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        found = f" (found only pickled weights: {', '.join(pickled)})" if pickled else ""
        raise UserError(f"{what}: {str(path)!r} has no .safetensors weights{found}; pickled weights are never "
                        "loaded, convert the checkpoint to safetensors first")
    return path


def load_causal_lm(path, what: str, device: str, dtype: str = "auto"):
    from transformers import AutoModelForCausalLM

    path = check_model_folder(path, what)
    if is_lora_folder(path):   # its base with its adapters, as it was trained ("auto": the stage's dtype)
        return load_lora_stage(path, dtype=None if dtype == "auto" else dtype, device=device)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, use_safetensors=True,
                                                 trust_remote_code=False)
    return model.to(device).eval().requires_grad_(False)


def load_tokenizer(path, what: str):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise UserError(f"{what}: cannot load a tokenizer from {str(path)!r} ({err})") from err
    if tok.pad_token_id is None:
        # Padding is masked out everywhere it is used, so any id will do.
        tok.pad_token = tok.eos_token
    return tok


def load_classifier(path, what: str, device: str, dtype: str = "auto"):
    """A sequence-classification model whose every weight, the head included, comes from the folder."""
    from transformers import AutoModelForSequenceClassification

    path = check_model_folder(path, what)
    model, info = AutoModelForSequenceClassification.from_pretrained(
        str(path), dtype=dtype, use_safetensors=True, trust_remote_code=False, output_loading_info=True)
    missing = sorted(info.get("missing_keys") or [])
    mismatched = sorted(str(k[0]) if isinstance(k, tuple) else str(k) for k in info.get("mismatched_keys") or [])
    if missing or mismatched:
        unused = sorted(info.get("unexpected_keys") or [])
        problem = (f"weights missing from its safetensors: {', '.join(missing)}" if missing
                   else f"weights of the wrong shape: {', '.join(mismatched)}")
        hint = f"; the folder has unused weights {', '.join(unused[:5])} (a head saved under another name?)" \
            if unused else ""
        raise UserError(f"{what}: cannot be used as {type(model).__name__}: {problem} (Transformers "
                        f"would initialise them at random){hint}")
    return model.to(device).eval().requires_grad_(False)
