"""``RSAGRPOConfig`` / ``RSAGRPOTrainer``: TRL's GRPOTrainer with an exact KL or risk penalty.

``kl_estimator="k3"`` (the default) is TRL's GRPOTrainer unchanged: its one-sample penalty
``exp(r - s) - (r - s) - 1`` at the sampled token. ``kl_estimator="exact"`` replaces that term,
at every completion token, with KL(reference || policy) over the whole vocabulary (or, with
``risk``, a risk measure of the deviation D = r - s under the reference, SPEC section 1),
both next-token distributions taken at the sampling temperature. It is computed by
``rsa_kernels.fused_linear_token_stats`` from the final hidden states and lm heads of the
policy and of the reference, so neither model's (tokens x vocabulary) logits are built. The
rest of the loss (loss types, clipping, importance sampling, masks, entropy bonus) is TRL's
own code; the penalty enters it as TRL's KL term does, never multiplied by an importance
ratio. See docs/grpo.md.

TRL internals this relies on (TRL 1.x; tested with 1.16.0): ``GRPOTrainer._compute_loss`` and
``_generate_and_score_completions`` read ``self.beta`` to decide whether to compute and add
the k3 term and the reference log-probs; the batch carries ``prompt_ids``, ``prompt_mask``,
``completion_ids``, ``completion_mask`` (and ``tool_mask``); the policy's forward in
``_compute_loss`` runs the backbone once (TRL's fused LM head), whose output we keep.
"""
from __future__ import annotations

import dataclasses

import torch

import rsa_kernels
from rsa_kernels.risk import parse_risk

from .trl_common import (SUPPORTED_TRL, _is_peft, _lm_head, _matching_dtypes, _reference_adapter,
                         add_hidden_states_forward, check_plain_lm_head, trl)

try:
    from trl import GRPOConfig, GRPOTrainer
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("rsa.integrations.trl needs TRL 1.x: pip install 'rsa-kernels[trl]'") from exc

IGNORE_INDEX = -100
KL_ESTIMATORS = ("k3", "exact")
_TRAINER = "RSAGRPOTrainer with kl_estimator='exact'"

_RSA_FIELDS = ("kl_estimator", "risk", "rsa_backend", "rsa_chunk_size")
_clash = sorted({f.name for f in dataclasses.fields(GRPOConfig)} & set(_RSA_FIELDS))
if _clash:  # a future TRL adding one of these would silently change its meaning
    raise ImportError(f"trl {trl.__version__}'s GRPOConfig already defines {_clash}, which RSAGRPOConfig adds "
                      f"with RSA meanings; this TRL version is not supported ({SUPPORTED_TRL})")
# TRL >= 1.x versions with GRPOConfig.use_bias_correction_kl (on by default in 1.16).
_BIAS_CORRECTION = "use_bias_correction_kl" in {f.name for f in dataclasses.fields(GRPOConfig)}


@dataclasses.dataclass
class RSAGRPOConfig(GRPOConfig):
    """TRL's GRPOConfig plus the choice of the penalty that ``beta`` weighs (docs/grpo.md)."""

    kl_estimator: str = dataclasses.field(
        default="k3", metadata={"help": "'k3': TRL's one-sample KL term; 'exact': KL(ref || policy) over the "
                                        "vocabulary at every completion token (or the `risk` of the deviation)."})
    risk: str = dataclasses.field(
        default="kl", metadata={"help": "Penalty with kl_estimator='exact': 'kl', 'erm:MU', 'cvar:ALPHA' or "
                                        "'ra_dpo_cvar:C' (SPEC section 1)."})
    rsa_backend: str = dataclasses.field(
        default="auto", metadata={"help": "rsa_kernels backend: 'auto', 'torch', 'cpu' or 'triton'."})
    rsa_chunk_size: int | None = dataclasses.field(
        default=None, metadata={"help": "Rows of logits the exact penalty builds at once (None: a memory budget)."})

    if _BIAS_CORRECTION:
        # TRL's default (True) multiplies its KL term by the importance ratio; the exact penalty
        # must not be, so None means "TRL's default with k3, off with exact".
        use_bias_correction_kl: bool | None = dataclasses.field(
            default=None, metadata={"help": "TRL's importance-ratio correction of the k3 term. None: True with "
                                            "kl_estimator='k3' (TRL's default), False with 'exact'."})

    def __post_init__(self):
        if _BIAS_CORRECTION and self.use_bias_correction_kl is None:
            self.use_bias_correction_kl = self.kl_estimator == "k3"
        super().__post_init__()
        check_grpo_compatible(self)


def check_grpo_compatible(args) -> None:
    """ValueError naming the field whose setting the chosen penalty cannot honour."""
    if args.kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be 'k3' or 'exact', got {args.kl_estimator!r}")
    risk = parse_risk(args.risk)
    if args.kl_estimator == "k3":
        if risk.kind != "kl":
            raise ValueError(f"risk={args.risk!r} needs kl_estimator='exact': the one-sample k3 term estimates a "
                             "KL only; set kl_estimator='exact' (or risk='kl')")
        return
    if args.beta == 0.0:
        raise ValueError("beta=0.0 switches the KL penalty off, so kl_estimator='exact' would compute nothing; "
                         "set beta > 0 (the penalty's weight) or kl_estimator='k3'")
    if getattr(args, "use_bias_correction_kl", False):
        raise ValueError("use_bias_correction_kl=True multiplies the KL term by the importance ratio, which "
                         "corrects a sampled estimate; the exact penalty sums over the vocabulary at each visited "
                         "prefix and must not be reweighted. Leave use_bias_correction_kl unset (None) or False")


def exact_penalty(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, *, risk="kl",
                  temperature: float = 1.0, backend: str = "auto", chunk_size: int | None = None):
    """Per-token statistics of the policy's and the reference's next-token distributions at
    ``temperature``: softmax((hidden @ weight.T + bias) / T), likewise for the reference.

    Returns rsa_kernels.TokenStats (logp, ref_logp, kl = KL(ref || policy), risk), 0 where
    labels == -100; gradients reach hidden, weight and bias only. Dividing the hidden states
    and the bias by T divides the logits by T without building them.
    """
    if temperature != 1.0:
        hidden, ref_hidden = hidden / temperature, ref_hidden / temperature
        bias = None if bias is None else bias / temperature
        ref_bias = None if ref_bias is None else ref_bias / temperature
    return rsa_kernels.fused_linear_token_stats(hidden, weight, ref_hidden, ref_weight, labels, bias=bias,
                                                ref_bias=ref_bias, risk=risk, ignore_index=IGNORE_INDEX,
                                                backend=backend, chunk_size=chunk_size)


def _backbone(model):
    """The module whose output TRL's fused LM head reads (looked up per call, as TRL does)."""
    target = model.get_base_model() if _is_peft(model) else model
    return target.base_model


class RSAGRPOTrainer(GRPOTrainer):
    """TRL's GRPOTrainer; with an RSAGRPOConfig whose kl_estimator is 'exact', the exact penalty."""

    def __init__(self, model, reward_funcs=None, args: RSAGRPOConfig | None = None, *pargs, **kwargs):
        if not isinstance(args, RSAGRPOConfig):
            raise ValueError(f"args must be an RSAGRPOConfig (TRL's GRPOConfig plus kl_estimator and risk), "
                             f"got {type(args).__name__}")
        check_grpo_compatible(args)  # again: fields may have been changed after __post_init__
        super().__init__(model, reward_funcs, args, *pargs, **kwargs)
        if args.kl_estimator == "exact":
            self._check_exact_supported()

    def _check_exact_supported(self):
        if self._is_vlm:
            raise ValueError(f"processing_class: {_TRAINER} supports text-only models; the reference's hidden "
                             "states are computed from input_ids and attention_mask only")
        if self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3:
            raise ValueError(f"deepspeed: ZeRO-3 is not supported by {_TRAINER}: the penalty reads the lm heads "
                             "after the forward, where ZeRO-3 has partitioned them; use ZeRO-2 or kl_estimator='k3'")
        if self.is_fsdp_enabled:
            raise ValueError(f"fsdp: FSDP is not supported by {_TRAINER} (the penalty reads the lm heads after "
                             "the forward; not built or tested); use DDP, DeepSpeed ZeRO-2 or kl_estimator='k3'")
        policy = self.accelerator.unwrap_model(self.model)
        check_plain_lm_head(policy, _TRAINER)
        add_hidden_states_forward(policy)  # the PEFT reference: the same network, adapter off
        if self.ref_model is not None:
            ref = self.accelerator.unwrap_model(self.ref_model)
            check_plain_lm_head(ref, _TRAINER)
            add_hidden_states_forward(ref)

    def _generate_and_score_completions(self, inputs):
        if self.args.kl_estimator == "k3":
            return super()._generate_and_score_completions(inputs)
        # TRL computes the reference's log-probs here when beta != 0; the exact penalty does not use them.
        beta, self.beta = self.beta, 0.0
        try:
            return super()._generate_and_score_completions(inputs)
        finally:
            self.beta = beta

    def _reference_hidden_states(self, model, model_kwargs):
        """The reference's final hidden states and lm head, as TRL picks the reference."""
        with torch.no_grad(), self.accelerator.autocast():
            if self.ref_model is not None:
                hidden = self.ref_model(**model_kwargs, rsa_hidden_states=True)
                return hidden, _lm_head(self.accelerator.unwrap_model(self.ref_model))
            peft_model = self.accelerator.unwrap_model(self.model)
            with _reference_adapter(peft_model):
                hidden = model(**model_kwargs, rsa_hidden_states=True)
            return hidden, _lm_head(peft_model)  # TRL refuses adapters on lm_head: the head is shared

    def _compute_loss(self, model, inputs):
        if self.args.kl_estimator == "k3":
            return super()._compute_loss(model, inputs)
        # TRL's loss with its k3 term off, keeping the policy backbone's output of that same forward.
        captured = []
        hook = _backbone(self.accelerator.unwrap_model(self.model)).register_forward_hook(
            lambda module, args, out: captured.append(out[0] if isinstance(out, tuple) else out.last_hidden_state))
        beta, self.beta = self.beta, 0.0
        try:
            loss = super()._compute_loss(model, inputs)
        finally:
            self.beta = beta
            hook.remove()
        if len(captured) != 1:
            raise RuntimeError(f"{_TRAINER}: expected one policy forward in GRPOTrainer._compute_loss, saw "
                               f"{len(captured)}; this TRL version ({trl.__version__}) is not supported")

        mode = "train" if self.model.training else "eval"
        completion_ids = inputs["completion_ids"]
        mask = inputs["completion_mask"] if "tool_mask" not in inputs else inputs["completion_mask"] * inputs["tool_mask"]
        width = completion_ids.size(1)  # the hidden state before each completion token scores it
        hidden = captured[0][:, -width - 1:-1]  # (prompt-learning PEFT prepends virtual tokens)
        model_kwargs = {"input_ids": torch.cat([inputs["prompt_ids"], completion_ids], dim=1),
                        "attention_mask": torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)}
        ref_hidden, (ref_weight, ref_bias) = self._reference_hidden_states(model, model_kwargs)
        ref_hidden = ref_hidden[:, -width - 1:-1]
        weight, bias = _lm_head(self.accelerator.unwrap_model(self.model))
        if self.args.cast_lm_head_to_fp32:  # as TRL's fused head: the head's product in float32
            hidden, ref_hidden = hidden.float(), ref_hidden.float()
        hidden, weight, bias = _matching_dtypes(hidden, weight, bias)
        ref_hidden, ref_weight, ref_bias = _matching_dtypes(
            ref_hidden, ref_weight.detach(), None if ref_bias is None else ref_bias.detach())
        labels = completion_ids.masked_fill(mask == 0, IGNORE_INDEX).to(hidden.device)
        stats = exact_penalty(hidden, weight, bias, ref_hidden.detach(), ref_weight, ref_bias, labels,
                              risk=self.args.risk, temperature=self.temperature, backend=self.args.rsa_backend,
                              chunk_size=self.args.rsa_chunk_size)
        term, policy_term = self._reduce_like_loss(stats.risk, mask, inputs, mode)
        loss = loss + self.beta * term.to(loss.dtype)

        # Logged under TRL's name `kl` (here the exact KL(ref || policy), see docs/grpo.md), plus `risk`.
        self._metrics[mode]["kl"].append(self._global_masked_mean(stats.kl.detach(), mask))
        if parse_risk(self.args.risk).kind != "kl":
            self._metrics[mode]["risk"].append(self._global_masked_mean(stats.risk.detach(), mask))
        if self._entropy_bonus_enabled:  # TRL's policy_loss includes its KL term
            extra = self.accelerator.gather(self.beta * policy_term.detach().reshape(1)).nanmean().item()
            self._metrics[mode]["policy_loss"][-1] += extra
        return loss

    def _reduce_like_loss(self, per_token, mask, inputs, mode):
        """The reduction GRPOTrainer._compute_loss applies to per_token_loss for this loss_type.

        Returns (the term as it enters the loss, as it enters TRL's logged policy_loss). It is
        linear, so adding beta * this to TRL's loss without its KL term equals TRL adding
        beta * per_token to per_token_loss (tested against TRL with the k3 term).
        """
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        masked = per_token * mask
        if self.loss_type in ("grpo", "sapo"):
            value = (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
        elif self.loss_type == "bnpo":
            value = masked.sum() / mask.sum().clamp(min=1.0)
        elif self.loss_type == "dr_grpo":
            value = masked.sum() / (per_token.size(0) * self.max_completion_length)
        elif self.loss_type == "luspo":
            value = masked.sum(-1).mean()
        elif self.loss_type in ("cispo", "dapo", "vespo"):
            normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                normalizer = normalizer * self.current_gradient_accumulation_steps / self.args.steps_per_generation
            value = masked.sum() / normalizer
            return value, value
        else:
            raise ValueError(f"loss_type={self.loss_type!r} is not one {_TRAINER} knows how to reduce")
        return value / accumulation, value

    def _global_masked_mean(self, values, mask):
        """The mean over all processes' unmasked tokens, as TRL's `kl` metric."""
        local = torch.stack([(values * mask).sum().float(), mask.sum().float()])
        totals = self.accelerator.reduce(local, reduction="sum")
        return (totals[0] / totals[1].clamp(min=1.0)).item()


__all__ = ["RSAGRPOConfig", "RSAGRPOTrainer", "KL_ESTIMATORS", "check_grpo_compatible", "exact_penalty"]
