"""LoRA stages of `rsa train` (docs/trainer.md, "LoRA and QLoRA stages").

One copy of the base weights: a stage trains one adapter on the base model, and its
reference is the same model with that adapter switched off. A stage that starts from a
LoRA stage stacks the earlier adapters, frozen, under its new one (never merged into the
base: merging would round, and a 4-bit base cannot take a merge without quantizing again),
so its reference computes exactly what the earlier stage's result computed.

Adapters run in the order newest first: with adapters a_0 (oldest) .. a_k, the policy
computes base + a_k + a_{k-1} + ... + a_0, summed left to right, and its reference
base + a_{k-1} + ... + a_0, which is the earlier stage's own sum, operation for operation.
The trainable adapter is PEFT's "default" (saved at a folder's root, and the first active
adapter, which is the one the Trainer reloads when a stage resumes).
"""
from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

TRAINABLE = "default"
FROZEN = "frozen_{}"
QUANTIZATIONS = (None, "4bit")
STAGE_FILE = "stage.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"

# PEFT LoraConfig fields a stage may set, under PEFT's own names.
ALLOWED = ("r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "fan_in_fan_out",
           "use_rslora", "init_lora_weights", "layers_to_transform", "layers_pattern", "rank_pattern",
           "alpha_pattern", "bias")
SET_BY_RSA = ("task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
              "inference_mode")
OUTSIDE_ADAPTER = ("modules_to_save", "trainable_token_indices", "ensure_weight_tying", "layer_replication")


# ------------------------------------------------------------------ the `lora:` settings

def check_lora(value, where: str) -> dict | None:
    """The checked `lora:` mapping (PEFT LoraConfig fields plus ``quantization``), or None.

    ValueError naming the key for an unknown key or a bad value; nothing is loaded.
    """
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError(f"{where} must be a mapping of LoRA settings (PEFT LoraConfig fields), or null for "
                         f"full weights, got {value!r}")
    try:
        import dataclasses
        from peft import LoraConfig
    except ImportError as err:
        raise ValueError(f"{where}: LoRA stages need peft (pip install peft)") from err
    fields = {f.name for f in dataclasses.fields(LoraConfig)}
    for key in value:
        if key == "quantization" or key in ALLOWED:
            continue
        if key in SET_BY_RSA:
            raise ValueError(f"{where}.{key} is set by rsa train, not in the config")
        if key in OUTSIDE_ADAPTER:
            raise ValueError(f"{where}.{key} is not supported: it trains or changes weights outside the adapter, "
                             "so the policy with its adapter off would no longer be the stage's reference")
        if key in fields:
            raise ValueError(f"{where}.{key} is not supported: rsa train takes plain LoRA adapters (full weights "
                             f"= base + scaling * B A), settable with {', '.join(ALLOWED)} and quantization")
        raise ValueError(f"{where}: unknown key {key!r}; expected PEFT LoraConfig fields ({', '.join(ALLOWED)}) "
                         "or quantization")
    for key, v in value.items():
        _check_value(key, v, f"{where}.{key}")
    settings = {k: v for k, v in value.items() if k != "quantization"}
    try:
        LoraConfig(task_type="CAUSAL_LM", **settings)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: {err}") from err
    quantization = value.get("quantization")
    if quantization == "4bit":
        check_4bit_available(f"{where}.quantization")
    return {**settings, "quantization": quantization}


def _names(v) -> bool:
    return isinstance(v, str) and bool(v) or (isinstance(v, list) and bool(v)
                                               and all(isinstance(s, str) and s for s in v))


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _check_value(key, v, at):
    ok, want = True, ""
    if key == "quantization":
        ok, want = v in QUANTIZATIONS, "4bit (bitsandbytes NF4, bf16 compute) or null"
    elif key == "r":
        ok, want = _count(v), "a positive integer"
    elif key == "lora_alpha":
        ok, want = _number(v) and v > 0, "a number > 0"
    elif key == "lora_dropout":
        ok, want = _number(v) and 0 <= v < 1, "a number in [0, 1)"
    elif key in ("target_modules", "exclude_modules", "layers_pattern"):
        ok, want = _names(v), "a module name pattern or a non-empty list of names"
        head = [v] if isinstance(v, str) else v if isinstance(v, list) else []
        if key == "target_modules" and any(s == "lm_head" or str(s).endswith(".lm_head") for s in head):
            raise ValueError(f"{at}: LoRA on lm_head is not supported: the fused loss reads the head's weight "
                             "directly, so the head must stay a plain linear layer shared with the reference")
    elif key in ("fan_in_fan_out", "use_rslora"):
        ok, want = isinstance(v, bool), "true or false"
    elif key == "init_lora_weights":
        ok, want = v is True or v == "gaussian", ("true or gaussian (B = 0 at the start: the policy starts from "
                                                  "its reference; other initialisations change it)")
    elif key == "layers_to_transform":
        index = lambda i: isinstance(i, int) and not isinstance(i, bool) and i >= 0  # noqa: E731
        ok, want = index(v) or (isinstance(v, list) and bool(v) and all(map(index, v))), \
            "a layer index or a list of them"
    elif key in ("rank_pattern", "alpha_pattern"):
        good = _count if key == "rank_pattern" else (lambda x: _number(x) and x > 0)
        ok = isinstance(v, dict) and all(isinstance(k, str) and k and good(x) for k, x in v.items())
        want = "a mapping of module name patterns to " + ("ranks" if key == "rank_pattern" else "numbers > 0")
    elif key == "bias":
        ok, want = v == "none", ("none (bias 'all' or 'lora_only' trains the base's biases, which the reference "
                                 "shares)")
    if not ok:
        raise ValueError(f"{at} must be {want}, got {v!r}")


def check_4bit_available(at: str):
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise ValueError(f"{at}: 4bit needs bitsandbytes, which is not installed here "
                         "(pip install 'bitsandbytes>=0.50', or the project's qlora extra)") from err


def check_lora_chain(stages: list[dict], defaults: dict, where: str):
    """A stage that starts from a LoRA stage of the same config must be one too, on the same base
    (quantization and model_dtype): its reference is that stage's model as it was trained."""
    by_name = {}
    for i, st in enumerate(stages):
        values = {**defaults, **st["overrides"]}
        ref = st["reference"]
        start = {"previous": stages[i - 1]["name"] if i else None, "model": None}.get(ref, ref)
        parent = by_name.get(start)
        at = f"{where}: stages[{i}] ({st['name']})"
        if st["lora"] is not None and st["lora"]["quantization"] and (values.get("fsdp") or values.get("deepspeed")):
            raise ValueError(f"{at}: lora.quantization 4bit is not supported with fsdp or deepspeed here; "
                             "use DDP (one quantized copy per process)")
        if parent is not None and parent["lora"] is not None:
            if st["lora"] is None:
                raise ValueError(f"{at} trains full weights from the LoRA stage {start!r}: give it lora too (its "
                                 f"adapter then stacks on {start!r}'s), or write {start!r}'s full weights with "
                                 f"`rsa merge DIR DIR --weight 0 --out FULL` and start from that folder")
            for key, mine, theirs in (
                    ("lora.quantization", st["lora"]["quantization"], parent["lora"]["quantization"]),
                    ("model_dtype", values.get("model_dtype", "auto"), parent["dtype"])):
                if mine != theirs:
                    raise ValueError(f"{at}: {key} is {mine!r} but the LoRA stage it starts from ({start!r}) has "
                                     f"{theirs!r}; they share one base model, which must be loaded the same way")
        by_name[st["name"]] = {"lora": st["lora"], "dtype": values.get("model_dtype", "auto")}


# ------------------------------------------------------------------ stage folders

def is_lora_folder(path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def lora_chain(folder) -> dict:
    """How a LoRA folder's model is built: {base, adapters (oldest first, the folder last),
    quantization, model_dtype}. Read from its stage.json, or for a PEFT adapter folder written
    elsewhere, from adapter_config.json's base_model_name_or_path (a local folder)."""
    folder = Path(folder)
    stage = folder / STAGE_FILE
    record = json.loads(stage.read_text()).get("lora") if stage.is_file() else None
    if record is None:
        config = json.loads((folder / ADAPTER_CONFIG).read_text())
        record = {"base": config.get("base_model_name_or_path"), "stack": [], "quantization": None,
                  "model_dtype": "auto"}
    base = record.get("base")
    if not base or not (Path(base) / "config.json").is_file():
        raise ValueError(f"{folder}: the base model of this LoRA adapter ({base!r}) is not a local model folder")
    if not (folder / ADAPTER_WEIGHTS).is_file():
        raise ValueError(f"{folder}: no {ADAPTER_WEIGHTS} (pickled adapter weights are not read)")
    return {"base": base, "adapters": [*record["stack"], str(folder.resolve())],
            "quantization": record.get("quantization"), "model_dtype": record.get("model_dtype", "auto")}


def stage_record(base, stack, settings: dict, dtype: str) -> dict:
    """The ``lora`` entry of a LoRA stage's stage.json (what lora_chain reads back)."""
    return {"base": str(base), "stack": [str(s) for s in stack], "quantization": settings["quantization"],
            "model_dtype": dtype, "settings": {k: v for k, v in settings.items() if k != "quantization"}}


# ------------------------------------------------------------------ models

def _load_base(base, dtype: str, quantization, device):
    from .models import load_model
    if quantization != "4bit":
        return load_model(base, dtype)
    import torch
    from transformers import BitsAndBytesConfig
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.bfloat16)
    # A quantized model is placed when it is loaded (the Trainer does not move it).
    model = load_model(base, dtype, quantization_config=config, device_map={"": str(device)})
    keep_4bit_layout(model)
    return model


def keep_4bit_layout(model):
    """Keep every bitsandbytes 4-bit layer of ``model`` in the layout training uses.

    On a CPU with AVX512-BF16, bitsandbytes (0.50) repacks a Linear4bit's weight into a CPU
    inference layout the first time the layer runs in eval mode on an input that needs no
    gradient: our reference pass, an evaluation. The repack asserts that the output size is a
    multiple of 32; where it is, the layer then runs gemv_4bit, which has no backward (no
    gradient reaches the layer's input: adapters below stop learning) and rounds differently
    from the training path, so the reference would not be the policy with its adapter off.
    The repack is gated by the layer's own capability flag, read at each forward; clearing it
    keeps every forward on the one dequantize-and-matmul path (slower CPU inference, exact).
    trainable_adapters_off checks after each reference pass that no layer was repacked.
    """
    from bitsandbytes.nn import Linear4bit
    for module in model.modules():
        if isinstance(module, Linear4bit):
            if not hasattr(module, "support_avx512bf16_for_cpu"):
                continue   # a bitsandbytes without the repack (or a new gate: the check below catches it)
            module.support_avx512bf16_for_cpu = False


def repacked_4bit_layers(model) -> list[str]:
    """Names of the 4-bit layers whose weight bitsandbytes has repacked for CPU inference."""
    return [name for name, module in model.named_modules()
            if getattr(getattr(getattr(module, "weight", None), "quant_state", None), "packing_format_for_cpu", False)]


def _stack(model, adapters):
    """A PeftModel with the adapters loaded frozen as frozen_0 (oldest) .. frozen_k; None if none."""
    from peft import PeftModel
    peft_model = None
    for i, folder in enumerate(adapters):
        if peft_model is None:
            peft_model = PeftModel.from_pretrained(model, str(folder), adapter_name=FROZEN.format(i))
        else:
            peft_model.load_adapter(str(folder), adapter_name=FROZEN.format(i))
    return peft_model


def build_policy(base, stack, settings: dict, dtype: str = "auto", device="cpu"):
    """The PeftModel a LoRA stage trains: the base (4-bit with ``quantization: 4bit``), the
    adapters of ``stack`` (oldest first) frozen, and a new trainable adapter on top."""
    from peft import LoraConfig, get_peft_model
    from torch import nn
    model = _load_base(base, dtype, settings["quantization"], device)
    config = LoraConfig(task_type="CAUSAL_LM", **{k: v for k, v in settings.items() if k != "quantization"})
    peft_model = _stack(model, stack)
    if peft_model is None:
        peft_model = get_peft_model(model, config, adapter_name=TRAINABLE)
    else:
        peft_model.add_adapter(TRAINABLE, config)
    frozen = [FROZEN.format(i) for i in range(len(stack))]
    peft_model.base_model.set_adapter([TRAINABLE, *reversed(frozen)])   # newest first (module docstring)
    peft_model.active_adapter = TRAINABLE
    if frozen:
        peft_model.base_model.set_requires_grad(frozen, requires_grad=False)
        # A frozen adapter is part of the reference: no dropout on it in the policy's forward either.
        for module in peft_model.modules():
            dropout = getattr(module, "lora_dropout", None)
            if isinstance(dropout, nn.ModuleDict):
                for name in frozen:
                    if name in dropout:
                        dropout[name] = nn.Identity()
    _save_trainable_only(peft_model)
    return peft_model


def _save_trainable_only(peft_model):
    """save_pretrained writes the trainable adapter only (at the folder's root): the frozen ones
    live in their own stage folders, and a checkpoint holding them in subfolders would make the
    Trainer's resume switch them off (it then activates one adapter)."""
    save = peft_model.save_pretrained

    def save_pretrained(save_directory, **kwargs):
        kwargs.setdefault("selected_adapters", [TRAINABLE])
        return save(save_directory, **kwargs)
    peft_model.save_pretrained = save_pretrained


def load_lora_stage(folder, dtype: str | None = None, device="cpu"):
    """A LoRA folder's model as it was trained (base, its adapters stacked, newest first), frozen
    and in eval mode. ``dtype``: the stage's own model_dtype when None."""
    chain = lora_chain(folder)
    model = _load_base(chain["base"], dtype or chain["model_dtype"], chain["quantization"], device)
    peft_model = _stack(model, chain["adapters"])
    names = [FROZEN.format(i) for i in range(len(chain["adapters"]))]
    peft_model.base_model.set_adapter(list(reversed(names)), inference_mode=True)
    peft_model.active_adapter = names[-1]
    if chain["quantization"] is None:
        peft_model = peft_model.to(device)
    return peft_model.eval().requires_grad_(False)


@contextlib.contextmanager
def trainable_adapters_off(model):
    """Within the block the PEFT model computes its reference: the adapters being trained are
    switched off (frozen adapters stay on) and the model is in eval mode, as a full-weight
    reference is. requires_grad is left alone (PEFT's disable_adapter() resets it on exit)."""
    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    if not layers:   # prompt learning and other non-layer methods
        with model.disable_adapter():
            yield
        return
    # lora_A/B hold modules, lora_embedding_A/B (LoRA on an embedding) bare Parameters.
    trainable = {name for m in layers for layer in m.adapter_layer_names for name, sub in getattr(m, layer).items()
                 if any(p.requires_grad for p in ([sub] if isinstance(sub, torch.nn.Parameter) else sub.parameters()))}
    saved = [(m, m._active_adapter) for m in layers]
    was_training = model.training
    for m in layers:
        m._active_adapter = [a for a in m.active_adapters if a not in trainable]
    model.eval()
    try:
        yield
    finally:
        for m, active in saved:
            m._active_adapter = active
        model.train(was_training)
    repacked = repacked_4bit_layers(model)
    if repacked:   # keep_4bit_layout did not hold (another bitsandbytes): stop before a step trains
        from .errors import UserError
        raise UserError(f"lora.quantization 4bit: bitsandbytes repacked the weights of {len(repacked)} 4-bit layers "
                        f"({repacked[0]}, ...) for CPU inference during the reference pass, although rsa turns that "
                        "off (Linear4bit.support_avx512bf16_for_cpu); their training forward would pass no gradient "
                        "to the layers below. This bitsandbytes version cannot train 4-bit on this CPU: use the "
                        "tested 0.50.2, or train without quantization here")


# ------------------------------------------------------------------ full weights (rsa merge)

class AdapterDeltas:
    """The full weights of a LoRA folder as base tensor + sum of scaling * B A over its adapters,
    for base tensor names, in float64. Scalings come from PEFT (rank/alpha patterns, rslora) on a
    weightless copy of the base; the A and B matrices from the adapters' safetensors."""

    def __init__(self, folder):
        from accelerate import init_empty_weights
        from peft import LoraConfig, get_peft_model
        from peft.tuners.lora import Linear as LoraLinear
        from peft.tuners.lora import LoraLayer
        from safetensors.torch import load_file
        from transformers import AutoConfig, AutoModelForCausalLM

        chain = lora_chain(folder)
        self.base = Path(chain["base"])
        with init_empty_weights():
            skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(self.base)))
        peft_model = None   # the adapters' layers and scalings, without their weights
        for i, adapter in enumerate(chain["adapters"]):
            config = LoraConfig.from_pretrained(str(adapter))
            if peft_model is None:
                peft_model = get_peft_model(skeleton, config, adapter_name=FROZEN.format(i))
            else:
                peft_model.add_adapter(FROZEN.format(i), config)
        self.terms: dict[str, list] = {}
        for i, adapter in enumerate(chain["adapters"]):
            name = FROZEN.format(i)
            tensors = load_file(str(Path(adapter) / ADAPTER_WEIGHTS))
            for path, module in peft_model.named_modules():
                if not isinstance(module, LoraLayer) or name not in module.lora_A:
                    continue
                if not isinstance(module, LoraLinear) or name in module.lora_variant:
                    raise ValueError(f"{adapter}: {path} is not a plain LoRA linear layer; only those can be merged")
                a, b = (tensors[f"{path}.lora_{x}.weight"] for x in "AB")
                key = path.removeprefix("base_model.model.") + ".weight"
                self.terms.setdefault(key, []).append((a, b, module.scaling[name], module.fan_in_fan_out))

    def full(self, key: str, base_tensor):
        """base_tensor + the adapters' updates of ``key``, in float64."""
        out = base_tensor.double()
        for a, b, scaling, fan_in_fan_out in self.terms.get(key, ()):
            delta = (b.double() @ a.double()) * scaling
            out = out + (delta.T if fan_in_fan_out else delta)
        return out
