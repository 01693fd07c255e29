"""tests/test_trl_grpo.py's two-process case: torchrun, 2 CPU processes, gloo.

Each process builds the same RSAGRPOTrainer (kl_estimator="exact", cvar:0.9), loads the
policy weights and the GRPO batch that the test saved, takes its half of the sequences,
and runs the loss and the backward through the DDP-wrapped policy that accelerate makes.
Rank 0 writes the loss averaged over processes and the (all-reduced) gradients; every
rank's logged `kl` goes to kl.json.
"""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from rsa.integrations.trl import RSAGRPOConfig, RSAGRPOTrainer
from test_trl_grpo import build, config


def main(tmp: Path):
    cfg = config(RSAGRPOConfig, tmp, kl_estimator="exact", risk="cvar:0.9", per_device_train_batch_size=4,
                 ddp_backend="gloo")
    trainer = build(RSAGRPOTrainer, cfg, tmp)
    trainer.model.load_state_dict(torch.load(tmp / "policy.pt"))
    rank, world = dist.get_rank(), dist.get_world_size()
    batch = torch.load(tmp / "batch.pt")
    half = batch["completion_ids"].size(0) // world
    mine = {k: (v if v.ndim == 0 else v[rank * half:(rank + 1) * half]) for k, v in batch.items()}
    wrapped = trainer.accelerator.prepare_model(trainer.model)
    assert isinstance(wrapped, torch.nn.parallel.DistributedDataParallel)
    trainer.model_wrapped = wrapped
    loss = trainer._compute_loss(wrapped, mine)
    loss.backward()
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    kls = [None] * world
    dist.all_gather_object(kls, trainer._metrics["train"]["kl"][-1])
    if rank == 0:
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
        torch.save({"loss": mean_loss / world, "grads": grads}, tmp / "ddp.pt")
        (tmp / "kl.json").write_text(json.dumps(kls))
    dist.barrier()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
