"""The contenders of `rsa bench --train`: one training step, the same model, data and seed.

1. ``trl_dpo``: TRL's DPOTrainer, sigmoid loss (TRL 1.x scores the labels through its own
   chunked lm head, 32768 positions a chunk, every position on a CPU);
2. ``trl_liger``: the same DPOTrainer with its loss computed by Liger Kernel's
   LigerFusedLinearDPOLoss from both models' final hidden states (Liger's fused-linear DPO,
   as `rsa bench` runs it); ``trl_use_liger`` (CUDA only): DPOTrainer(use_liger_kernel=True),
   which in TRL 1.x patches the model's layers with Liger's Triton kernels;
3. ``rsa_dpo``: RSADPOTrainer, objective "dpo"; 4. ``rsa_rsa2``: RSADPOTrainer, "rsa2" with
   "cvar:0.9"; 5. ``rsa_train``: `rsa train`'s stage (rsa.stepwise.run_stages) with the
   settings of 4, from a model folder and a JSONL file holding the same model and pairs;
6. ``plain``: the Ra-DPO formulation on materialised logits (rsa/bench/baselines.py), rsa2
   with "cvar:0.9", inside TRL's trainer: what a user without this package would write.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from .step_workload import StepSizes, make_models, make_pairs, make_tokenizer, trl_rows

BETA = 0.1
RSA2 = {"objective": "rsa2", "risk": "cvar:0.9", "alpha": 0.5}
# (name, label in the tables)
CONTENDERS = (
    ("trl_dpo", "1. TRL DPOTrainer (sigmoid)"),
    ("trl_liger", "2. TRL DPO + Liger fused-linear DPO loss"),
    ("rsa_dpo", "3. RSADPOTrainer dpo"),
    ("rsa_rsa2", "4. RSADPOTrainer rsa2 cvar:0.9"),
    ("rsa_train", "5. rsa train rsa2 cvar:0.9"),
    ("plain", "6. plain Ra-DPO on logits, rsa2 cvar:0.9"),
)
CUDA_ONLY = (("trl_use_liger", "2b. TRL DPOTrainer use_liger_kernel=True"),)
LABELS = dict(CONTENDERS + CUDA_ONLY)
NON_MODEL_KEYS = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps"}


def contenders_for(device: str) -> list[str]:
    names = [n for n, _ in CONTENDERS]
    if device.startswith("cuda"):
        names.insert(2, "trl_use_liger")
    return names


def common_args(sizes: StepSizes, out: str, device: str, bf16: bool) -> dict:
    """TrainingArguments shared by every contender (TRL's DPOConfig defaults gradient
    checkpointing and bf16 on: both off here, so every contender trains the same float32 model)."""
    return dict(output_dir=out, per_device_train_batch_size=sizes.pairs, gradient_accumulation_steps=1,
                max_steps=sizes.warmup + sizes.steps, learning_rate=1e-6, seed=sizes.seed, report_to="none",
                save_strategy="no", logging_steps=10_000, disable_tqdm=True, dataloader_num_workers=0,
                gradient_checkpointing=False, bf16=bf16, use_cpu=not device.startswith("cuda"), beta=BETA)


def _split_batch(inputs):
    kwargs = {k: v for k, v in inputs.items() if k not in NON_MODEL_KEYS}
    labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
    return kwargs, labels


def _trainer_classes():
    from trl import DPOTrainer

    from rsa.integrations.trl import RSADPOTrainer, add_hidden_states_forward

    class LigerDPOTrainer(DPOTrainer):
        """DPOTrainer whose loss is Liger Kernel's LigerFusedLinearDPOLoss on both models' hidden states."""

        def __init__(self, *args, **kwargs):
            from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

            super().__init__(*args, **kwargs)
            add_hidden_states_forward(self.model)
            add_hidden_states_forward(self.ref_model)
            # compiled=False on a CPU: its torch.compile'd chunk takes minutes to build there
            self.liger_loss = LigerFusedLinearDPOLoss(beta=self.args.beta, use_ref_model=True,
                                                      compiled=self.args.device.type == "cuda")

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            kwargs, labels = _split_batch(inputs)
            hidden = model(**kwargs, rsa_hidden_states=True)
            with torch.no_grad():
                ref_hidden = self.ref_model(**kwargs, rsa_hidden_states=True)
            head, ref_head = model.get_output_embeddings(), self.ref_model.get_output_embeddings()
            out = self.liger_loss(head.weight, hidden[:, :-1], labels[:, 1:], head.bias, ref_hidden[:, :-1],
                                  ref_head.weight, ref_head.bias)
            loss = out[0] if isinstance(out, tuple) else out
            return (loss, None) if return_outputs else loss

    class PlainRSATrainer(RSADPOTrainer):
        """The Ra-DPO code's formulation: both models' full logits, then log_softmax, softmax and
        their products over (tokens, V), the risk by sorting (rsa/bench/baselines.py)."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            from rsa_kernels.loss import loss_from_token_stats, make_layout
            from rsa_kernels.token_stats import TokenStats

            from .baselines import plain_token_stats

            kwargs, labels = _split_batch(inputs)
            logits = model(**kwargs).logits[:, :-1]
            with torch.no_grad():
                ref_logits = self.ref_model(**kwargs).logits[:, :-1]
            labels = labels[:, 1:]
            stats = TokenStats(*plain_token_stats(logits, ref_logits, labels, risk=self.args.risk))
            loss, _ = loss_from_token_stats(stats, make_layout(labels, ignore_index=-100, shift=False), objective=self.args.objective,
                                            beta=self.args.beta, alpha=self.args.alpha, gamma=self.args.gamma,
                                            label_smoothing=self.args.label_smoothing)
            return (loss, None) if return_outputs else loss

    return LigerDPOTrainer, PlainRSATrainer


def build_trainer(name: str, sizes: StepSizes, vocab: int, out: str, device: str = "cpu", bf16: bool = False,
                  callbacks=None, dataset_size: int | None = None):
    """The TRL-based contender ``name`` (every one but rsa_train), ready to train."""
    import datasets
    from trl import DPOConfig, DPOTrainer

    from rsa.integrations.trl import RSADPOConfig, RSADPOTrainer

    liger_cls, plain_cls = _trainer_classes()
    count = dataset_size or sizes.pairs * (sizes.warmup + sizes.steps)
    data = datasets.Dataset.from_dict(trl_rows(make_pairs(sizes, vocab, count)))
    tokenizer = make_tokenizer(vocab)
    policy, ref = make_models(sizes, vocab)
    base = common_args(sizes, out, device, bf16)
    if name in ("trl_dpo", "trl_liger", "trl_use_liger"):
        cls = {"trl_dpo": DPOTrainer, "trl_liger": liger_cls, "trl_use_liger": DPOTrainer}[name]
        args = DPOConfig(**base, use_liger_kernel=name == "trl_use_liger")
    elif name in ("rsa_dpo", "rsa_rsa2", "plain"):
        cls = {"rsa_dpo": RSADPOTrainer, "rsa_rsa2": RSADPOTrainer, "plain": plain_cls}[name]
        loss = {"objective": "dpo", "risk": "kl"} if name == "rsa_dpo" else RSA2
        args = RSADPOConfig(**base, **loss)
    else:
        raise ValueError(f"contender: unknown name {name!r} (rsa_train runs through run_rsa_train)")
    return cls(model=policy, ref_model=ref, args=args, train_dataset=data, processing_class=tokenizer,
               callbacks=list(callbacks or []))


def rsa_train_config(sizes: StepSizes, vocab: int, folder: Path, device: str, bf16: bool) -> dict:
    """`rsa train`'s run config for contender 5: the model folder and the pairs written under ``folder``."""
    policy, _ = make_models(sizes, vocab)
    model_dir = folder / "model"
    policy.save_pretrained(str(model_dir), safe_serialization=True)
    make_tokenizer(vocab).save_pretrained(str(model_dir))
    del policy
    count = sizes.pairs * (sizes.warmup + sizes.steps)
    with open(folder / "pairs.jsonl", "w", encoding="utf-8") as fh:
        for p in make_pairs(sizes, vocab, count):   # `rsa train` appends the end-of-sequence token itself
            fh.write(json.dumps(p) + "\n")
    defaults = {k: v for k, v in common_args(sizes, "unused", device, bf16).items() if k != "output_dir"}
    defaults.update(RSA2, model_dtype="float32", max_length=sizes.prompt + sizes.response,
                    max_prompt_length=sizes.prompt)
    return {"model": str(model_dir), "output_dir": str(folder / "out"), "defaults": defaults,
            "stages": [{"name": "step", "data": {"path": str(folder / "pairs.jsonl")}}]}


def run_rsa_train(sizes: StepSizes, vocab: int, device: str, meter, bf16: bool = False, work: str | None = None):
    """Contender 5: `rsa train` itself (rsa.stepwise.run_stages) on one stage, measured by ``meter``."""
    from rsa import stepwise, trainer
    from .step_meter import instrument

    instrument(trainer.RSATrainer, meter)
    folder = Path(tempfile.mkdtemp(prefix="rsa-step-", dir=work))
    try:
        config = rsa_train_config(sizes, vocab, folder, device, bf16)
        stepwise.run_stages(config, progress=False, callbacks=[meter])
    finally:
        shutil.rmtree(folder, ignore_errors=True)
