"""Loading models safely, the frozen reference, and the final hidden states without logits.

The policy and the reference are always run through their own top-level forward (so DDP,
FSDP and DeepSpeed wrappers do their gathering and gradient bookkeeping) with the lm head's
forward replaced, for that call only, by a pass-through that records the head's weight and
bias. The model thus returns its final hidden states where the logits would be, and no
(tokens x vocabulary) tensor is built; the loss then takes the hidden states and the head.
"""
from __future__ import annotations

import contextlib
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
        seen.update(weight=head.weight, bias=head.bias, out=hidden)
        return hidden

    head.forward = forward  # an instance attribute shadows nn.Linear.forward for this call only
    try:
        yield seen
    finally:
        del head.forward


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
    FSDP -> wrapped with the same plugin settings; DeepSpeed ZeRO-3 -> partitioned the same way."""
    from accelerate.utils import DistributedType
    freeze(ref)
    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP:
        if getattr(accelerator, "is_fsdp2", False):
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
            plugin = accelerator.state.fsdp_plugin
            # The policy's compute dtype and offloading, so that both models give the loss
            # hidden states and head weights of one dtype.
            kwargs = {"mp_policy": plugin.mixed_precision_policy or MixedPrecisionPolicy()}
            if plugin.cpu_offload is not None:
                kwargs["offload_policy"] = plugin.cpu_offload
            layer_types = set(getattr(ref, "_no_split_modules", None) or ())
            for module in ref.modules():
                if type(module).__name__ in layer_types:
                    fully_shard(module, **kwargs)
            fully_shard(ref, **kwargs)
            return freeze(ref)
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        plugin = accelerator.state.fsdp_plugin
        plugin.set_auto_wrap_policy(ref)
        ref = FSDP(ref, sharding_strategy=plugin.sharding_strategy, cpu_offload=plugin.cpu_offload,
                   auto_wrap_policy=plugin.auto_wrap_policy, mixed_precision=plugin.mixed_precision_policy,
                   sync_module_states=plugin.sync_module_states, use_orig_params=plugin.use_orig_params,
                   limit_all_gathers=plugin.limit_all_gathers, device_id=accelerator.device)
        return freeze(ref)
    if kind == DistributedType.DEEPSPEED:
        import copy
        import deepspeed
        cfg = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
        cfg.pop("optimizer", None)
        cfg.pop("scheduler", None)
        stage = cfg.get("zero_optimization", {}).get("stage", 0)
        cfg["zero_optimization"] = {"stage": 3 if stage == 3 else 0}
        engine, *_ = deepspeed.initialize(model=ref, config=cfg)
        return freeze(engine)
    return freeze(ref.to(accelerator.device))
