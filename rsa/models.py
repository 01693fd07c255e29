"""Loading models safely, the frozen reference, and the final hidden states without logits.

The policy and the reference are always run through their own top-level forward (so DDP,
FSDP and DeepSpeed wrappers do their gathering and gradient bookkeeping) with the lm head's
forward replaced, for that call only, by a pass-through that records the head's weight and
bias. The model thus returns its final hidden states where the logits would be, and no
(tokens x vocabulary) tensor is built; the loss then takes the hidden states and the head.
"""
from __future__ import annotations

import contextlib
import copy
import re
from pathlib import Path

import torch
from torch import nn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model(path, dtype: str = "auto", **from_pretrained):
    """A causal LM from a local folder, weights from safetensors only (never unpickled).
    ``from_pretrained``: more keywords for from_pretrained (a quantization_config, a device_map)."""
    from transformers import AutoModelForCausalLM
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"model: no such model folder {str(path)!r}")
    if not any(path.glob("*.safetensors")):
        raise ValueError(f"model: {str(path)!r} has no .safetensors weights; convert the checkpoint to "
                         "safetensors first (pickled .bin weights are never loaded)")
    torch_dtype = "auto" if dtype == "auto" else DTYPES[dtype]
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype, use_safetensors=True,
                                                trust_remote_code=False, **from_pretrained)


def load_tokenizer(path):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    if tok.pad_token_id is None:
        # Padded positions are masked out of the loss and the attention, so any id will do.
        tok.pad_token = tok.eos_token
    return tok


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model


def is_peft_model(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def output_head(model: nn.Module) -> nn.Linear:
    """The lm head of an unwrapped (possibly PEFT) causal LM; only a plain linear head is supported."""
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise ValueError(f"model: the output head is {type(head).__name__}, not a linear layer; the fused loss "
                         "needs a plain nn.Linear lm head (do not put adapters on lm_head)")
    return head


@contextlib.contextmanager
def _pass_through(head: nn.Linear):
    """Within the block, head(x) returns x and records the weight and bias it would have used.

    The weight is read at call time, inside the wrapped model's forward, which is when FSDP
    has it unsharded.
    """
    seen = {}

    def forward(hidden):
        seen.update(weight=_held(head.weight), bias=_held(head.bias), out=hidden)
        return hidden

    head.forward = forward  # an instance attribute shadows nn.Linear.forward for this call only
    try:
        yield seen
    finally:
        del head.forward


def _held(param):
    """The parameter as the loss must read it after the forward.

    DeepSpeed ZeRO-3 gathers a module's parameters for its forward and then points
    `param.data` back at an empty tensor. A view taken while the head's weight is gathered
    keeps that gathered storage alive for the loss's forward and backward, and its gradient
    (of the full shape, as for any gathered use) flows through the view into the parameter,
    where ZeRO-3's gradient hook reduce-scatters it into the partitions.
    """
    if param is None or not hasattr(param, "ds_status"):  # not a ZeRO-3 parameter
        return param
    return param.view_as(param)


def hidden_and_head(model: nn.Module, head: nn.Linear, batch: dict):
    """(final hidden states, head weight, head bias) from the model's own forward, without logits."""
    kwargs = {"input_ids": batch["input_ids"], "use_cache": False}
    if "position_ids" in batch:  # padding-free: no attention mask, positions restart per sequence
        kwargs["position_ids"] = batch["position_ids"]
    else:
        kwargs["attention_mask"] = batch["attention_mask"]
    with _pass_through(head) as seen:
        out = model(**kwargs)
    if "out" not in seen:
        raise ValueError("model: its forward never called the lm head; the fused loss cannot find the hidden states")
    for name in ("weight", "bias"):
        t = seen[name]
        if t is not None and t.untyped_storage().nbytes() < (t.storage_offset() + t.numel()) * t.element_size():
            # FSDP freed the gathered head after the forward: it sits in a unit of its own that
            # reshards after forward. The loss reads the head in its forward and backward.
            raise ValueError(f"model: the lm head's {name} was resharded when the forward returned; keep "
                             "lm_head in the root FSDP unit or in one with reshard_after_forward=False (as "
                             "accelerate's FSDP2 and TRANSFORMER_BASED_WRAP do), not in a unit of its own")
    hidden = out.logits if hasattr(out, "logits") else out[0]
    if hidden is not seen["out"] and not getattr(head, "_rsa_output_checked", False):
        # Wrappers may return a new tensor (DDP's autograd sink, an fp32 upcast under mixed
        # precision); a model that changes the values after the head (logit soft-capping or
        # scaling) would make the fused loss wrong. Checked once per head.
        if hidden.shape != seen["out"].shape or not torch.equal(hidden.detach(), seen["out"].detach().to(hidden.dtype)):
            raise ValueError(f"model: {type(model).__name__} transforms the lm head output (e.g. logit "
                             "soft-capping or scaling), which the fused linear loss does not support")
        head._rsa_output_checked = True
    return hidden, seen["weight"], seen["bias"]


def prepare_reference(ref: nn.Module, accelerator) -> nn.Module:
    """Place (and shard) the frozen reference as the policy is: DDP/single -> device;
    FSDP -> wrapped as accelerate wraps the policy, from the same plugin and mesh;
    DeepSpeed -> an engine of the policy's config (ZeRO-3: partitioned the same way)."""
    from accelerate.utils import DistributedType
    freeze(ref)
    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP:
        return freeze(_fsdp_reference(ref, accelerator))
    if kind == DistributedType.DEEPSPEED:
        import deepspeed
        engine, *_ = deepspeed.initialize(model=ref, config=reference_deepspeed_config(
            accelerator.state.deepspeed_plugin.deepspeed_config, ref))
        return freeze(engine)
    return freeze(ref.to(accelerator.device))


class _Overlay:
    """`base` with some attributes replaced (accelerate reads accelerator.state.fsdp_plugin)."""

    def __init__(self, base, **replaced):
        self.__dict__.update(_base=base, **replaced)

    def __getattr__(self, name):
        return getattr(self._base, name)


def _fsdp_reference(ref: nn.Module, accelerator) -> nn.Module:
    """The reference wrapped by the code and the settings that wrap the policy.

    accelerate adapts its plugin to each model it wraps (the auto-wrap policy bound to the
    model's layer classes, FSDP1's param_init_fn re-tying weights): the reference gets a copy,
    so the policy, wrapped later by the Trainer, sees the plugin as the user configured it.
    FSDP2 runs accelerate's own fsdp2_prepare_model (its mesh, layer classes, tail unit,
    mixed precision, offloading and cpu_ram_efficient_loading); FSDP1 the arguments of
    Accelerator.prepare_model. Activation checkpointing is left out: the reference has no backward.
    """
    plugin = copy.copy(accelerator.state.fsdp_plugin)
    if getattr(accelerator, "is_fsdp2", False):
        from accelerate.utils import fsdp2_prepare_model
        view = _Overlay(accelerator, state=_Overlay(accelerator.state, fsdp_plugin=plugin))
        return fsdp2_prepare_model(view, ref)
    from accelerate.utils import ensure_weights_retied
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    plugin.set_auto_wrap_policy(ref)
    ignored = plugin.ignored_modules
    if isinstance(ignored, str):  # a regular expression over module names, as accelerate reads it
        pattern = re.compile(ignored)
        ignored = [m.to(accelerator.device) for n, m in ref.named_modules() if pattern.fullmatch(n)]
    return FSDP(ref, sharding_strategy=plugin.sharding_strategy or plugin.reshard_after_forward,
                cpu_offload=plugin.cpu_offload, auto_wrap_policy=plugin.auto_wrap_policy,
                mixed_precision=plugin.mixed_precision_policy, sync_module_states=plugin.sync_module_states,
                backward_prefetch=plugin.backward_prefetch, forward_prefetch=plugin.forward_prefetch,
                use_orig_params=plugin.use_orig_params,
                param_init_fn=ensure_weights_retied(plugin.param_init_fn, ref, accelerator.device),
                ignored_modules=ignored, limit_all_gathers=plugin.limit_all_gathers, device_id=accelerator.device)


def reference_deepspeed_config(policy_config: dict, ref: nn.Module) -> dict:
    """The policy's DeepSpeed config for the frozen reference: no optimizer or scheduler;
    ZeRO-3 keeps the policy's partitioning settings (offloading included), with the
    model-size "auto" values filled as accelerate fills the policy's; ZeRO-0/1/2 partition
    nothing the forward uses, so the reference is a whole copy on each process (stage 0),
    cast to the policy's dtype by the engine."""
    cfg = copy.deepcopy(policy_config)
    cfg.pop("optimizer", None)
    cfg.pop("scheduler", None)
    zero = cfg.get("zero_optimization", {})
    if zero.get("stage") != 3:
        cfg["zero_optimization"] = {"stage": 0}
        return cfg
    hidden = getattr(getattr(ref, "config", None), "hidden_size", None)
    sizes = {"reduce_bucket_size": hidden * hidden, "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
             "stage3_param_persistence_threshold": 10 * hidden} if hidden else {}
    for key, value in sizes.items():
        if zero.get(key) == "auto":
            zero[key] = value
    return cfg
