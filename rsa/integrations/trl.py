"""RSA losses inside TRL: ``RSADPOConfig`` / ``RSADPOTrainer`` replace ``DPOConfig`` / ``DPOTrainer``.

The trainer keeps everything of TRL's DPOTrainer (datasets and their preprocessing, the
collator, the reference model, PEFT, logging) and swaps only the loss: the final hidden
states of the policy and of the reference go, with their lm-heads, into
``rsa_kernels.fused_linear_preference_loss``, so the (tokens x vocabulary) logits are never
built whole. See docs/trl.md.

Supported TRL: 1.x (tested: see docs/trl.md). Besides the public ``DPOTrainer`` API this
leans on internals that TRL 1.x keeps stable, which is why other versions are refused:
- batches from TRL's ``DataCollatorForPreference``: ``input_ids``, ``attention_mask`` and
  ``completion_mask``, chosen sequences in the first half, rejected in the second;
- ``DPOTrainer.ref_model`` (None only with PEFT) and ``DPOTrainer._metrics[mode]``, the
  buffer that ``DPOTrainer.log`` averages and logs.
"""
from __future__ import annotations

import dataclasses

import torch

import rsa_kernels
from rsa_kernels.risk import parse_risk
from rsa_kernels.validation import check_objective_args

from .trl_common import (SUPPORTED_TRL, _is_peft, _lm_head, _matching_dtypes, _reference_adapter,
                         add_hidden_states_forward, check_plain_lm_head, trl)

try:
    from trl import DPOConfig, DPOTrainer
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("rsa.integrations.trl needs TRL 1.x: pip install 'rsa-kernels[trl]'") from exc

IGNORE_INDEX = -100
# Collator keys that are not model inputs (the ref_*_logps ones only appear with precomputed
# reference log-probs, which RSADPOConfig refuses).
_NON_MODEL_KEYS = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps"}
# rsa_kernels metric names -> TRL's DPOTrainer names, where they differ.
_TRL_METRIC_NAMES = {"rewards/accuracy": "rewards/accuracies", "rewards/margin": "rewards/margins"}

_RSA_FIELDS = ("objective", "risk", "alpha", "gamma", "rsa_backend", "rsa_chunk_size")
_clash = sorted({f.name for f in dataclasses.fields(DPOConfig)} & set(_RSA_FIELDS))
if _clash:  # a future TRL adding one of these would silently change its meaning
    raise ImportError(f"trl {trl.__version__}'s DPOConfig already defines {_clash}, which RSADPOConfig adds "
                      f"with RSA meanings; this TRL version is not supported ({SUPPORTED_TRL})")


@dataclasses.dataclass
class RSADPOConfig(DPOConfig):
    """TRL's DPOConfig plus the RSA loss fields (SPEC section 3).

    ``beta`` and ``label_smoothing`` are DPOConfig's own fields and keep their names: beta is
    BETA of every objective, label_smoothing is EPS of loss = -(1-EPS) log s(u) - EPS log s(-u)
    (the conservative-DPO smoothing of TRL's old ``sigmoid`` loss). DPOConfig fields that
    choose another DPO loss (loss_type, loss_weights, ld_alpha, use_weighting,
    f_divergence_type) must stay at their defaults, and precompute_ref_log_probs must be False.
    """

    objective: str = dataclasses.field(
        default="rsa2", metadata={"help": "Pair objective: 'dpo', 'rsa1' or 'rsa2' (TDPO1/TDPO2 with risk 'kl')."})
    risk: str = dataclasses.field(
        default="cvar:0.9",
        metadata={"help": "Token risk measure: 'kl', 'erm:MU', 'cvar:ALPHA' or 'ra_dpo_cvar:C'."})
    alpha: float = dataclasses.field(
        default=0.5, metadata={"help": "ALPHA2, the weight of the risk difference in the 'rsa2' objective."})
    gamma: float = dataclasses.field(
        default=1.0, metadata={"help": "Discount GAMMA in (0, 1] of the nested risk-to-go recursion."})
    rsa_backend: str = dataclasses.field(
        default="auto", metadata={"help": "rsa_kernels backend: 'auto', 'torch', 'cpu' or 'triton'."})
    rsa_chunk_size: int | None = dataclasses.field(
        default=None, metadata={"help": "Rows of logits the fused loss builds at once (None: a memory budget)."})

    def __post_init__(self):
        super().__post_init__()
        parse_risk(self.risk)
        check_objective_args(self.objective, self.beta, self.alpha, self.gamma, self.label_smoothing)
        check_compatible(self)


def check_compatible(args) -> None:
    """ValueError naming the DPOConfig field that the RSA loss cannot honour."""
    if args.precompute_ref_log_probs:
        raise ValueError(
            "precompute_ref_log_probs=True is incompatible with RSADPOTrainer: the RSA loss needs the reference's "
            "whole next-token distribution at every completion token (its KL and risk sum over the vocabulary), "
            "which per-sequence log-probs cannot give; the reference hidden states are computed on the fly. "
            "Set precompute_ref_log_probs=False.")
    loss_type = [args.loss_type] if isinstance(args.loss_type, str) else list(args.loss_type)
    if loss_type != ["sigmoid"]:
        raise ValueError(f"loss_type={args.loss_type!r}: RSADPOTrainer's loss is chosen by `objective` "
                         "('dpo' is TRL's sigmoid loss); leave loss_type at its default ['sigmoid']")
    for name, default in (("loss_weights", None), ("ld_alpha", None), ("use_weighting", False),
                          ("f_divergence_type", "reverse_kl")):
        if getattr(args, name, default) != default:
            raise ValueError(f"{name}={getattr(args, name)!r} is a DPOTrainer loss variant that the RSA loss "
                             f"does not implement; leave it at {default!r}")


class RSADPOTrainer(DPOTrainer):
    """TRL's DPOTrainer with the RSA loss family; takes an RSADPOConfig and TRL's datasets unchanged."""

    def __init__(self, model, ref_model=None, args: RSADPOConfig | None = None, *pargs, **kwargs):
        if args is None:
            args = RSADPOConfig()
        if not isinstance(args, RSADPOConfig):
            raise ValueError(f"args must be an RSADPOConfig (TRL's DPOConfig plus the RSA fields), "
                             f"got {type(args).__name__}")
        check_compatible(args)  # again: fields may have been changed after __post_init__
        super().__init__(model, ref_model, args, *pargs, **kwargs)
        if getattr(self, "aux_loss_enabled", False):
            raise ValueError("router_aux_loss_coef: the MoE load-balancing loss is not added by RSADPOTrainer; "
                             "set router_aux_loss_coef=0.0")
        add_hidden_states_forward(self.model)
        check_plain_lm_head(self.accelerator.unwrap_model(self.model))
        if self.ref_model is not None:
            add_hidden_states_forward(self.accelerator.unwrap_model(self.ref_model))
            check_plain_lm_head(self.accelerator.unwrap_model(self.ref_model))
        elif not _is_peft(self.model):
            raise ValueError("ref_model: RSADPOTrainer needs a reference model (or a PEFT policy whose adapter can "
                             "be switched off) to compute the reference's hidden states on the fly")

    def _reference_hidden_states(self, model_kwargs):
        if self.ref_model is not None:
            hidden = self.ref_model(**model_kwargs, rsa_hidden_states=True)
            return hidden, _lm_head(self.accelerator.unwrap_model(self.ref_model))
        peft_model = self.accelerator.unwrap_model(self.model)
        with _reference_adapter(peft_model):
            hidden = self.model(**model_kwargs, rsa_hidden_states=True)
        return hidden, _lm_head(peft_model)  # TRL refuses adapters on lm_head: the head is shared

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        model_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, IGNORE_INDEX)
        seq_len = labels.shape[1]
        # Prompt-learning PEFT prepends virtual tokens; the last seq_len positions are the real ones.
        hidden = model(**model_kwargs, rsa_hidden_states=True)[:, -seq_len:]
        with torch.no_grad():
            ref_hidden, (ref_weight, ref_bias) = self._reference_hidden_states(model_kwargs)
        ref_hidden = ref_hidden[:, -seq_len:]
        weight, bias = _lm_head(self.accelerator.unwrap_model(self.model))
        hidden, weight, bias = _matching_dtypes(hidden, weight, bias)
        ref_hidden, ref_weight, ref_bias = _matching_dtypes(ref_hidden, ref_weight.detach(),
                                                            None if ref_bias is None else ref_bias.detach())
        args = self.args
        loss, metrics = rsa_kernels.fused_linear_preference_loss(
            hidden, weight, ref_hidden.detach(), ref_weight, labels.to(hidden.device), bias=bias, ref_bias=ref_bias,
            objective=args.objective, risk=args.risk, beta=args.beta, alpha=args.alpha, gamma=args.gamma,
            label_smoothing=args.label_smoothing, ignore_index=IGNORE_INDEX, shift=True,
            backend=args.rsa_backend, chunk_size=args.rsa_chunk_size)
        for name, value in metrics.items():
            # each process holds a mean over its pairs; their mean weighs processes equally, as TRL's do
            value = self.accelerator.gather(value.detach().float().reshape(1)).mean().item()
            self._metrics[mode][_TRL_METRIC_NAMES.get(name, name)].append(value)
        return (loss, None) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        # Evaluation reports the loss and the metrics only: returning logits would build them whole.
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None


# The GRPO drop-in (docs/grpo.md) lives in its own module; both are imported from here.
from .trl_grpo import RSAGRPOConfig, RSAGRPOTrainer  # noqa: E402

__all__ = ["RSADPOConfig", "RSADPOTrainer", "RSAGRPOConfig", "RSAGRPOTrainer", "SUPPORTED_TRL",
           "add_hidden_states_forward", "check_compatible"]
