"""The multi-process half of tests/test_trainer_deepspeed.py: one torchrun job, 2 processes,
gloo, CPU (DeepSpeed's CPU accelerator).

    torchrun --nproc_per_node 2 tests/deepspeed_worker.py WORKDIR RESULTS.json [STAGE_CONFIG.yaml ...]

1. `rsa train`'s stage runner (rsa.stepwise.run_stages) with examples/deepspeed_zero3.json,
   first, while DeepSpeed's communication is not initialised yet (as in a fresh run), with
   ACCELERATE_USE_CPU set; the test compares the saved weights with a single-process run;
2. one optimizer step (torch SGD, no clipping) of RSATrainer with `deepspeed` = ZeRO-2 or
   ZeRO-3 and `use_cpu`, for rsa2/cvar:0.9 and dpo, float32: the processes' mean loss, every
   parameter's gradient before the step (deepspeed.utils.safe_get_full_grad) and every
   parameter after it (gathered), the lm head's above all, compared here with a
   single-process oracle on the global batch (the models' ordinary forward, full logits,
   rsa_kernels.preference_loss, the same SGD step).

Rank 0 writes RESULTS.json; the test asserts on it.
"""
from __future__ import annotations

import datetime
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rsa.config import RSAConfig  # noqa: E402
from fsdp_worker import PAIRS_PER_RANK, IndexLog, LossLog, loss_and_oracle, run_jobs, step_inputs, worst  # noqa: E402

LR = 0.5
# float32 (DeepSpeed's ZeRO optimizers take fp32/bf16/fp16): the chunked fused loss against
# full logits, and the reductions in another order.
LOSS_TOL = dict(rtol=1e-6, atol=1e-7)
GRAD_TOL = dict(rtol=1e-5, atol=1e-6)


def zero_config(stage: int) -> dict:
    zero = {"stage": stage}
    if stage == 3:  # no parameter of the tiny model is kept whole between uses: the head is released
        # after its forward, as a 7B model's would be
        zero.update(stage3_param_persistence_threshold=0, stage3_gather_16bit_weights_on_model_save=True)
    return {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto", "zero_optimization": zero}


def engine_kind(module) -> str | None:
    """'zero2'/'zero3' for a DeepSpeed engine, None for anything else."""
    from deepspeed import DeepSpeedEngine
    if not isinstance(module, DeepSpeedEngine):
        return None
    return f"zero{module.zero_optimization_stage()}"


def local_share(module) -> float:
    """Elements of the parameters this process holds / elements of the model (ZeRO-3: ~1/world)."""
    params = list(module.parameters())
    local = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params)
    return local / sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in params)


def gathered(module) -> dict:
    """{name: the whole parameter} (a collective under ZeRO-3)."""
    import deepspeed
    params = dict(module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        return {n: p.detach().clone() for n, p in params.items()}


class GradientsBeforeStep(TrainerCallback):
    """Wraps the engine's step (accelerate calls it inside backward) to gather every gradient first."""

    def __init__(self, trainer_ref):
        self.trainer_ref, self.grads, self.engine = trainer_ref, None, None

    def on_train_begin(self, args, state, control, **kwargs):
        from deepspeed.utils import safe_get_full_grad
        engine = self.engine = self.trainer_ref[0].model_wrapped
        step = engine.step

        def step_after_gathering(*a, **kw):
            self.grads = {n: safe_get_full_grad(p).detach().clone() for n, p in engine.module.named_parameters()}
            return step(*a, **kw)

        engine.step = step_after_gathering


def one_step(workdir: Path, stage: int, objective: str, risk: str) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    tok, policy, ref, oracle, oracle_ref, data, loss_args = step_inputs(world, objective, risk)
    args = RSAConfig(output_dir=str(workdir / f"zero{stage}-{objective}"), use_cpu=True, ddp_backend="gloo",
                     deepspeed=zero_config(stage), optim="sgd", learning_rate=LR, lr_scheduler_type="constant",
                     per_device_train_batch_size=PAIRS_PER_RANK, max_steps=1, max_grad_norm=0.0,
                     save_strategy="no", report_to="none", disable_tqdm=True, dataloader_num_workers=0, seed=0,
                     loss_backend="torch", loss_chunk_size=4, max_length=14, max_prompt_length=6, **loss_args)
    seen, trainer_ref = IndexLog(data), []
    grads = GradientsBeforeStep(trainer_ref)
    trainer = LossLog(model=policy, ref_model=ref, args=args, train_dataset=seen, processing_class=tok,
                      callbacks=[grads])
    trainer_ref.append(trainer)
    trainer.losses = []
    assert trainer.is_deepspeed_enabled, "the Trainer did not enable DeepSpeed"
    trainer.train()
    engine = grads.engine
    record = {"policy": engine_kind(engine), "switched": getattr(trainer, "deepspeed_on_cpu", False),
              "reference": engine_kind(trainer.ref_model), "policy_share": local_share(engine.module),
              "reference_share": local_share(trainer.ref_model.module),
              "head_share": local_share(engine.module.lm_head),
              # ZeRO-3 released the head after the step's forward and backward: the loss read a gathered copy.
              "head_numel_between_steps": engine.module.lm_head.weight.numel()}
    after = gathered(engine.module)

    loss, want = loss_and_oracle(trainer, seen, data, tok.pad_token_id, oracle, oracle_ref, loss_args)
    want_grads = {n: p.grad.clone() for n, p in oracle.named_parameters()}
    head_before = oracle.lm_head.weight.detach().clone()
    torch.optim.SGD(oracle.parameters(), lr=LR).step()
    want_after = {n: p.detach() for n, p in oracle.named_parameters()}

    record["loss"] = {"got": loss.item(), "want": want.item(), **worst(loss, want.detach())}
    torch.testing.assert_close(loss, want.detach(), **LOSS_TOL)
    assert sorted(grads.grads) == sorted(want_grads), (sorted(grads.grads), sorted(want_grads))
    errs = {n: worst(grads.grads[n], g) for n, g in want_grads.items()}
    record["grad_abs"] = max(e["abs"] for e in errs.values())
    record["grad_rel_of_max"] = max(errs[n]["abs"] / g.abs().max().item() for n, g in want_grads.items())
    for name, g in want_grads.items():
        torch.testing.assert_close(grads.grads[name], g, **GRAD_TOL, msg=lambda m, n=name: f"{n}: {m}")
    # The step itself: the head's update (and every other) is -LR times the oracle's gradient.
    record["head_update"] = worst(after["lm_head.weight"], want_after["lm_head.weight"])
    record["head_step"] = (want_after["lm_head.weight"] - head_before).abs().max().item()
    for name, w in want_after.items():
        torch.testing.assert_close(after[name], w, rtol=1e-5, atol=LR * 1e-6, msg=lambda m, n=name: f"{n}: {m}")
    if rank == 0:
        print(f"zero{stage} {objective}: loss {loss.item():.9f} err {record['loss']['abs']:.1e}, "
              f"max grad err {record['grad_abs']:.1e}, head after step err {record['head_update']['abs']:.1e}",
              flush=True)
    return record


def rsa_train(config: Path) -> dict:
    """The stage with ACCELERATE_USE_CPU set, as an accelerate config with use_cpu sets it:
    accelerate then leaves DeepSpeed off and rsa/sharding.py switches it on (the one-step cases
    take the other path, `use_cpu` alone, where accelerate enables DeepSpeed itself)."""
    from rsa.stepwise import run_stages
    from rsa.trainer import RSATrainer
    seen = {}
    init = RSATrainer.__init__

    def spy(self, *a, **kw):  # the stage's trainer: DeepSpeed enabled, ZeRO-3 partitions
        init(self, *a, **kw)
        seen.update(deepspeed=self.is_deepspeed_enabled, switched=getattr(self, "deepspeed_on_cpu", False),
                    reference=engine_kind(self.ref_model), reference_share=local_share(self.ref_model.module))

    RSATrainer.__init__ = spy
    os.environ["ACCELERATE_USE_CPU"] = "true"
    try:
        run_stages(str(config), progress=False)
    finally:
        RSATrainer.__init__ = init
        del os.environ["ACCELERATE_USE_CPU"]
    return seen


def main(workdir: str, results: str, configs: list[str]):
    workdir = Path(workdir)
    # DeepSpeed's CPU backend reduces through gloo, and through its own shared-memory op where
    # that op is compatible: probing the ops and compiling that one take about a minute on a
    # fresh machine, more than all the cases together. Marked unavailable, the reductions go
    # through gloo, as on a machine without a compiler; the results are the same sums.
    import deepspeed.ops
    deepspeed.ops.__compatible_ops__ = {"deepspeed_shm_comm": False}
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    cases = [(3, "rsa2", "cvar:0.9"), (3, "dpo", "kl"), (2, "rsa2", "cvar:0.9"), (2, "dpo", "kl")]
    # `rsa train` first, while DeepSpeed's communication is not yet initialised, as in a fresh run.
    jobs = [(f"rsa-train-{Path(c).stem}", lambda c=c: rsa_train(Path(c))) for c in configs]
    jobs += [(f"zero{s}-{o}", lambda s=s, o=o, r=r: one_step(workdir, s, o, r)) for s, o, r in cases]
    run_jobs(jobs, results)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
