"""What both TRL drop-ins share: the supported TRL versions, and the model's parts they use.

The final hidden states are taken through the model's own forward (so DDP's and PEFT's
wrappers stay in the path), the lm head is read from the unwrapped model, and the PEFT
reference is TRL's: its frozen "ref" adapter if it made one, else the adapter switched off.
"""
from __future__ import annotations

import contextlib
import functools
import types

import torch
from packaging.version import Version

try:
    import trl
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("rsa.integrations.trl needs TRL 1.x: pip install 'rsa-kernels[trl]'") from exc

SUPPORTED_TRL = ">=1.0,<2"
if not Version("1.0.0") <= Version(trl.__version__) < Version("2.0.0"):
    raise ImportError(f"rsa.integrations.trl supports TRL {SUPPORTED_TRL}, found trl {trl.__version__}: "
                      "it relies on the batch layouts and metric buffers of TRL 1.x's DPOTrainer and GRPOTrainer. "
                      "Install a supported version: pip install 'rsa-kernels[trl]'")


def _is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def add_hidden_states_forward(model) -> None:
    """Let ``model(..., rsa_hidden_states=True)`` return the backbone's final hidden states.

    Going through ``model(...)`` rather than calling the backbone directly keeps DDP's and
    PEFT's wrappers in the path (gradient sync, adapters). This is how TRL's own fused LM head
    works; without the flag the forward is the previous one, so generation is unchanged.
    """
    target = model.get_base_model() if _is_peft(model) else model
    if getattr(target, "_rsa_hidden_states_forward", False):
        return
    if target.base_model is target:
        raise ValueError(f"model: {type(target).__name__} exposes no backbone (base_model_prefix), so its final "
                         "hidden states cannot be taken before the lm-head")
    previous = target.forward

    @functools.wraps(type(target).forward)  # keep the signature: Trainer and generate inspect it
    def forward(self, *args, rsa_hidden_states=False, **kwargs):
        if not rsa_hidden_states:
            return previous(*args, **kwargs)
        # PEFT's wrapper passes the causal-LM arguments along; the backbone takes none of these.
        for key in ("labels", "shift_labels", "num_items_in_batch", "logits_to_keep", "fused_lm_head"):
            kwargs.pop(key, None)
        kwargs["use_cache"] = False
        return self.base_model(*args, **kwargs).last_hidden_state

    target.forward = types.MethodType(forward, target)
    target._rsa_hidden_states_forward = True


@contextlib.contextmanager
def _reference_adapter(peft_model):
    """TRL's PEFT reference: its frozen copy of the adapter ("ref") if it made one, else no adapter."""
    if "ref" in peft_model.peft_config:
        previous = peft_model.active_adapter
        peft_model.set_adapter("ref")
        try:
            yield
        finally:
            peft_model.set_adapter(previous)
    else:
        with peft_model.disable_adapter():
            yield


# Config fields by which some families transform the lm-head output (softcapping, scaling);
# the fused loss takes the logits as hidden @ weight.T + bias exactly, so they are refused.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                     "logits_scaling")


def check_plain_lm_head(model, trainer: str = "RSADPOTrainer") -> None:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for name in _LOGIT_TRANSFORMS:
        value = getattr(config, name, None)
        if value is not None and value != 1:
            raise ValueError(f"model: its config sets {name}={value!r}, so its logits are not hidden @ weight.T + "
                             f"bias; {trainer} does not support such models")


def _lm_head(model):
    head = model.get_output_embeddings()
    return head.weight, getattr(head, "bias", None)


def _matching_dtypes(hidden, weight, bias):
    """The fused loss multiplies in one dtype: autocast's if on (as the lm-head would), else the weight's."""
    dev = hidden.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else weight.dtype
    cast = (lambda t: t if t is None or t.dtype == dtype else t.to(dtype))
    return cast(hidden), cast(weight), cast(bias)
