"""RSATrainer: transformers.Trainer with the fused risk-aware preference loss (SPEC sections 1-3).

The loss is computed from the final hidden states of the policy and of the frozen reference
and from their lm-head weights by rsa_kernels.fused_linear_preference_loss, so no full logits
tensor is built for either model. Distribution (DDP, FSDP, DeepSpeed) is the Trainer's;
rsa/sharding.py makes sure it is the one the arguments ask for (docs/distributed.md).
"""
from __future__ import annotations

from collections import defaultdict

import torch
from transformers import Trainer

from .config import RSAConfig
from .data import PairCollator
from .lora import trainable_adapters_off
from .models import hidden_and_head, is_peft_model, output_head, prepare_reference
from .sharding import broadcast_module_states, enforce_requested_sharding, fsdp1_cpu_state_dict, fsdp_plugin_held_back


def _fused_loss():
    # Imported late so that the module loads while the kernels package is being extended.
    from rsa_kernels import fused_linear_preference_loss
    return fused_linear_preference_loss


class RSATrainer(Trainer):
    """Trainer for preference pairs (chosen rows first) with a frozen reference.

    ``ref_model``: the frozen reference (placed and sharded like the policy). Leave it None
    for a PEFT policy: the same model with its trainable adapters switched off (frozen ones
    stay on, rsa/lora.py) is then the reference.
    """

    def __init__(self, model=None, ref_model=None, args: RSAConfig | None = None, data_collator=None,
                 train_dataset=None, eval_dataset=None, processing_class=None, **kwargs):
        if not isinstance(args, RSAConfig):
            raise ValueError("args must be an RSAConfig")
        if ref_model is None and not is_peft_model(model):
            raise ValueError("ref_model is required unless the policy is a PEFT model")
        if data_collator is None:
            pad = getattr(processing_class, "pad_token_id", None)
            data_collator = PairCollator(pad if pad is not None else 0, padding_free=args.padding_free)
        super().__init__(model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, **kwargs)
        # compute_loss returns the mean over this batch's pairs; the Trainer divides it by the
        # accumulation steps, and DDP averages it over processes: the mean over the global batch.
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = False
        if ref_model is not None and self._broadcast_weights:
            broadcast_module_states(ref_model)
        self.ref_model = None if ref_model is None else prepare_reference(ref_model, self.accelerator)
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}

    def create_accelerator_and_postprocess(self):
        with fsdp_plugin_held_back(self.args):
            super().create_accelerator_and_postprocess()
        # FSDP on CPU processes, or an error: never a silent fall-back (rsa/sharding.py).
        self._broadcast_weights = enforce_requested_sharding(self)
        if self._broadcast_weights:
            broadcast_module_states(self.model)

    def save_model(self, output_dir=None, _internal_call=False):
        state_dict = fsdp1_cpu_state_dict(self)  # None unless FSDP1 on CPU, where accelerate's crashes
        if state_dict is None:
            return super().save_model(output_dir, _internal_call)
        self._save(output_dir if output_dir is not None else self.args.output_dir, state_dict=state_dict)
        if self.args.push_to_hub and not _internal_call:  # as Trainer.save_model does
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    # ------------------------------------------------------------------ loss

    def _head(self, model):
        return output_head(self.accelerator.unwrap_model(model))

    def _reference_forward(self, model, inputs):
        with torch.no_grad():
            if self.ref_model is not None:
                return hidden_and_head(self.ref_model, self._head(self.ref_model), inputs)
            # PEFT: the same weights with the trained adapters switched off are the reference.
            with trainable_adapters_off(self.accelerator.unwrap_model(model)):
                return hidden_and_head(model, self._head(model), inputs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        args = self.args
        if getattr(model, "find_unused_parameters", False):
            raise ValueError("ddp_find_unused_parameters must be False: the loss uses the lm head after the "
                             "forward, which DDP's unused-parameter search cannot see")
        ref_hidden, ref_weight, ref_bias = self._reference_forward(model, inputs)
        hidden, weight, bias = hidden_and_head(model, self._head(model), inputs)
        labels, extra = inputs["labels"], {}
        if "sequence_ids" in inputs:  # padding-free: (1, N, H) -> (N, H)
            hidden, ref_hidden = hidden.reshape(-1, hidden.shape[-1]), ref_hidden.reshape(-1, ref_hidden.shape[-1])
            ids = inputs["sequence_ids"]
            extra = {"sequence_ids": ids, "num_sequences": int(ids.max().item()) + 1}
        loss, metrics = _fused_loss()(
            hidden, weight, ref_hidden, ref_weight, labels, bias=bias, ref_bias=ref_bias,
            objective=args.objective, risk=args.risk, beta=args.beta, alpha=args.alpha, gamma=args.gamma,
            label_smoothing=args.label_smoothing, shift=True, backend=args.loss_backend,
            chunk_size=args.loss_chunk_size, **extra)
        mode = "train" if model.training else "eval"
        for k, v in metrics.items():
            self._metrics[mode][k].append(v.detach().float())
        return (loss, metrics) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    # ------------------------------------------------------------------ logging

    def log(self, logs: dict, start_time=None) -> None:
        """Add the means of the SPEC metrics since the last log (over all processes)."""
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        stored = self._metrics[mode]
        if stored:
            names = sorted(stored)
            local = torch.stack([torch.stack(stored[k]).mean() for k in names]).to(self.accelerator.device)
            mean = self.accelerator.reduce(local, reduction="mean") if self.accelerator.num_processes > 1 else local
            prefix = "eval_" if mode == "eval" else ""
            logs.update({prefix + k: float(v) for k, v in zip(names, mean.tolist())})
            stored.clear()
        super().log(logs, start_time)


__all__ = ["RSATrainer", "RSAConfig"]
