"""The multi-process half of tests/test_trainer_fsdp.py: one torchrun job, 2 processes, gloo, CPU.

    torchrun --nproc_per_node 2 tests/fsdp_worker.py WORKDIR RESULTS.json [STAGE_CONFIG.yaml ...]

torchrun's start-up costs more than the cases, so every case runs in this one job:

1. one optimizer step of RSATrainer under FSDP2 (float64) and FSDP1 (float32: its gradient
   norm cannot take float64) with `fsdp: full_shard` and `use_cpu`, wrapped by the Trainer
   itself (the reference by rsa.models.prepare_reference), for rsa2/cvar:0.9 and dpo: the
   processes' mean loss and the gathered gradient of every parameter, compared here with a
   single-process oracle on the global batch (the models' ordinary forward, full logits,
   rsa_kernels.preference_loss);
2. FSDP2 with bf16 mixed precision and a reference equal to the policy: KL and rewards are
   exactly 0 at the first step (the reference computes in the policy's dtype);
3. refused with a ValueError: FSDP1 on CPU with checkpoints (torch's FSDP1 crashes gathering
   them on CPU), and an lm head in an FSDP unit of its own (resharded before the loss reads it);
4. the reference's sharded layout against the policy's (rsa.models.prepare_reference against
   the Trainer): transformer_layer_cls_to_wrap set (FSDP2, FSDP1), cpu_ram_efficient_loading
   (FSDP2, each rank building other weights), a ParallelismConfig device mesh (FSDP2), and an
   FSDP1 reference on the meta device materialised by the plugin's param_init_fn;
5. `rsa train`'s stage runner (rsa.stepwise.run_stages) on the first stage of
   examples/tiny.yaml with FSDP2 (checkpoint at step 2) and with FSDP1 (no checkpoints);
   the test compares the saved weights with a single-process run.

Rank 0 writes RESULTS.json: per case the largest errors seen and any failure message; the
test asserts on it.
"""
from __future__ import annotations

import copy
import datetime
import json
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parent))
import rsa_kernels as rk  # noqa: E402
from rsa.config import RSAConfig  # noqa: E402
from rsa.data import Pair, PairCollator, PairDataset  # noqa: E402
from rsa.trainer import RSATrainer  # noqa: E402
from test_trainer_common import build_model, build_tokenizer, plain_records  # noqa: E402

PAIRS_PER_RANK = 2
# float64: only the order of the sums differs. float32 (FSDP1, whose gradient-norm code
# cannot take float64): chunked fused loss against full logits, and reductions in another order.
LOSS_TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=1e-6, atol=1e-7)}
GRAD_TOL = {torch.float64: dict(rtol=1e-8, atol=1e-10), torch.float32: dict(rtol=1e-5, atol=1e-6)}


class IndexLog(torch.utils.data.Dataset):
    """The dataset, recording which items this process's dataloader fetched."""

    def __init__(self, data):
        self.data, self.seen = data, []

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        self.seen.append(int(i))
        return self.data[i]


class LossLog(RSATrainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if model.training:
            self.losses.append((out[0] if return_outputs else out).detach().clone())
        return out


def is_fsdp(model) -> str | None:
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    if isinstance(model, FullyShardedDataParallel):
        return "fsdp1"
    if isinstance(model, FSDPModule):
        return "fsdp2"
    return None


def local_share(model) -> float:
    """Elements this process holds / elements of the model (about 1/world when sharded)."""
    from torch.distributed.tensor import DTensor
    local = total = 0
    for p in model.parameters():
        local += p.to_local().numel() if isinstance(p, DTensor) else p.numel()
    for p in model.parameters():
        total += p.numel()
    if is_fsdp(model) == "fsdp1":  # its parameters are views of the local flat shard
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        with FSDP.summon_full_params(model, writeback=False):
            total = sum(p.numel() for p in model.parameters())
    return local / total


def full_gradients(model) -> dict:
    """{parameter name: its whole gradient}, gathered from the shards (collective)."""
    kind = is_fsdp(model)
    if kind == "fsdp2":
        return {n: p.grad.full_tensor().clone() for n, p in model.named_parameters()}
    if kind == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        with FSDP.summon_full_params(model, with_grads=True, writeback=False):
            return {n.replace("_fsdp_wrapped_module.", ""): p.grad.clone() for n, p in model.named_parameters()}
    raise AssertionError(f"the policy is not FSDP-wrapped: {type(model).__name__}")


class GradientsBeforeStep(TrainerCallback):
    def __init__(self):
        self.grads, self.model = None, None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.model, self.grads = model, full_gradients(model)


def worst(got: torch.Tensor, want: torch.Tensor) -> dict:
    err = (got - want).abs()
    return {"abs": err.max().item(), "rel": (err / want.abs().clamp_min(1e-300)).max().item()}


def step_inputs(world: int, objective: str, risk: str, dtype: torch.dtype = torch.float32):
    """One step's tokenizer, policy, reference, their untouched copies (the oracle's), data of
    PAIRS_PER_RANK pairs per rank and loss arguments: the same on every rank."""
    tok = build_tokenizer()
    policy, ref = build_model(len(tok), seed=1).to(dtype), build_model(len(tok), seed=2).to(dtype)
    oracle, oracle_ref = copy.deepcopy(policy), copy.deepcopy(ref)
    pairs = [Pair(r["prompt"], r["chosen"], r["rejected"], "test") for r in
             plain_records(PAIRS_PER_RANK * world, seed=5)]
    data = PairDataset(pairs, tok, max_length=14, max_prompt_length=6)
    loss_args = dict(objective=objective, risk=risk, beta=0.5, alpha=0.5, gamma=0.9, label_smoothing=0.1)
    return tok, policy, ref, oracle, oracle_ref, data, loss_args


def one_step(workdir: Path, version: int, objective: str, risk: str, dtype: torch.dtype) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    tok, policy, ref, oracle, oracle_ref, data, loss_args = step_inputs(world, objective, risk, dtype)
    args = RSAConfig(output_dir=str(workdir / f"fsdp{version}-{objective}"), use_cpu=True, ddp_backend="gloo",
                     fsdp="full_shard", fsdp_config={"version": version},
                     per_device_train_batch_size=PAIRS_PER_RANK, max_steps=1, max_grad_norm=0.0,
                     learning_rate=1e-3, save_strategy="no", report_to="none", disable_tqdm=True,
                     dataloader_num_workers=0, seed=0, loss_backend="torch", loss_chunk_size=4,
                     max_length=14, max_prompt_length=6, **loss_args)
    seen, grads = IndexLog(data), GradientsBeforeStep()
    trainer = LossLog(model=policy, ref_model=ref, args=args, train_dataset=seen, processing_class=tok,
                      callbacks=[grads])
    trainer.losses = []
    assert trainer.is_fsdp_enabled, "the Trainer did not enable FSDP"
    ref_kind = is_fsdp(trainer.ref_model)
    trainer.train()
    record = {"dtype": str(dtype), "policy": is_fsdp(grads.model), "reference": ref_kind,
              "policy_share": local_share(grads.model), "reference_share": local_share(trainer.ref_model)}

    loss, want = loss_and_oracle(trainer, seen, data, tok.pad_token_id, oracle, oracle_ref, loss_args)
    record["loss"] = {"got": loss.item(), "want": want.item(), **worst(loss, want.detach())}
    torch.testing.assert_close(loss, want.detach(), **LOSS_TOL[dtype])
    want_grads = {n: p.grad for n, p in oracle.named_parameters()}
    assert sorted(grads.grads) == sorted(want_grads), (sorted(grads.grads), sorted(want_grads))
    errs = {n: worst(grads.grads[n], g) for n, g in want_grads.items()}
    record["grad_abs"] = max(e["abs"] for e in errs.values())
    record["grad_rel_of_max"] = max(errs[n]["abs"] / g.abs().max().item() for n, g in want_grads.items())
    for name, g in want_grads.items():
        torch.testing.assert_close(grads.grads[name], g, **GRAD_TOL[dtype], msg=lambda m, n=name: f"{n}: {m}")
    if rank == 0:
        print(f"fsdp{version} {objective}: loss {loss.item():.12f} err {record['loss']['abs']:.1e}, "
              f"max grad err {record['grad_abs']:.1e}", flush=True)
    return record


def loss_and_oracle(trainer, seen: IndexLog, data, pad_id: int, oracle, oracle_ref, loss_args: dict):
    """(the processes' mean loss, the oracle's loss on the global batch, after its backward).

    The oracle is a single process running the models' ordinary forward (full logits) and
    rsa_kernels.preference_loss on every process's items, each exactly once."""
    world = dist.get_world_size()
    indices = [None] * world
    dist.all_gather_object(indices, seen.seen)
    everything = sorted(i for part in indices for i in part)
    assert everything == list(range(len(data))), f"the processes' batches were {indices}"
    loss = torch.stack(trainer.losses).sum()
    dist.all_reduce(loss)  # each process's loss is its pairs' mean; equal shares
    loss = loss / world

    batch = PairCollator(pad_id)([data[i] for i in everything])
    fwd = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    logits = oracle(**fwd).logits
    with torch.no_grad():
        ref_logits = oracle_ref(**fwd).logits
    want, _ = rk.preference_loss(logits, ref_logits, batch["labels"], shift=True, backend="torch", **loss_args)
    want.backward()
    return loss, want


class SeeWrapping(TrainerCallback):
    def __init__(self):
        self.kinds = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.kinds.append((is_fsdp(model), local_share(model)))


def rsa_train(config: Path) -> dict:
    from rsa.stepwise import run_stages
    see = SeeWrapping()
    run_stages(str(config), progress=False, callbacks=[see])
    return {"steps": [k for k, _ in see.kinds], "policy_share": max(s for _, s in see.kinds)}


def mixed_precision_reference(workdir: Path) -> dict:
    """FSDP2 with bf16 mixed precision and the reference equal to the policy: the reference
    must compute in the policy's dtype, or KL and rewards are not 0 at the first step."""
    tok = build_tokenizer()
    pairs = [Pair(r["prompt"], r["chosen"], r["rejected"], "test") for r in plain_records(4, seed=5)]
    data = PairDataset(pairs, tok, max_length=14, max_prompt_length=6)
    args = RSAConfig(output_dir=str(workdir / "bf16"), use_cpu=True, ddp_backend="gloo", fsdp="full_shard",
                     fsdp_config={"version": 2}, bf16=True, per_device_train_batch_size=2, max_steps=1,
                     save_strategy="no", report_to="none", disable_tqdm=True, dataloader_num_workers=0,
                     max_length=14, max_prompt_length=6)
    trainer = RSATrainer(model=build_model(len(tok), seed=1), ref_model=build_model(len(tok), seed=1), args=args,
                         train_dataset=data, processing_class=tok)
    trainer.train()
    first = next(h for h in trainer.state.log_history if "loss" in h)
    return {k: first[k] for k in ("kl/chosen", "kl/rejected", "rewards/chosen", "rewards/rejected")}


def fsdp1_checkpoints_refused(workdir: Path) -> dict:
    """FSDP1 on CPU with checkpoints: refused before anything is wrapped (see rsa/sharding.py)."""
    tok = build_tokenizer()
    args = RSAConfig(output_dir=str(workdir / "refused"), use_cpu=True, ddp_backend="gloo", fsdp="full_shard",
                     fsdp_config={"version": 1}, save_strategy="steps", report_to="none")
    try:
        RSATrainer(model=build_model(len(tok)), ref_model=build_model(len(tok)), args=args, processing_class=tok)
    except ValueError as err:
        return {"refused": str(err)}
    return {"refused": None}


def head_in_its_own_unit_refused() -> dict:
    """An lm head in an FSDP2 unit of its own is resharded when the forward returns: the loss
    would read freed memory, so hidden_and_head refuses it."""
    from torch.distributed.fsdp import fully_shard
    from rsa.models import hidden_and_head
    tok = build_tokenizer()
    model = build_model(len(tok))
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model.lm_head, reshard_after_forward=True)
    fully_shard(model)
    batch = {"input_ids": torch.randint(4, len(tok), (2, 6)), "attention_mask": torch.ones(2, 6, dtype=torch.long)}
    try:
        hidden_and_head(model, model.lm_head, batch)
    except ValueError as err:
        return {"refused": str(err)}
    return {"refused": None}


def sharded_layout(model) -> list:
    """What FSDP made of a model: each wrapped unit (path, class) and each parameter's sharding
    (FSDP2: shape, local shape, placements, mesh names and ranks; FSDP1: the flat parameter's
    local size), so that a reference wrapped like the policy gives the same list."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel as FSDP
    out = []
    for path, m in model.named_modules():
        if isinstance(m, FSDPModule):
            out.append(["unit", path, type(m).__name__])
        elif isinstance(m, FSDP):
            out.append(["unit", path.replace("_fsdp_wrapped_module.", ""), type(m.module).__name__,
                        [p.numel() for p in m.params]])
    for name, p in model.named_parameters():
        if hasattr(p, "placements"):
            mesh = p.device_mesh
            out.append([name, list(p.shape), list(p.to_local().shape), [str(x) for x in p.placements],
                        list(mesh.mesh_dim_names or ()), mesh.mesh.tolist()])
    return out


class SeeLayout(TrainerCallback):
    def __init__(self):
        self.layout = None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.layout = sharded_layout(model)


def full_weights(model) -> dict:
    """{name: the whole tensor} of an FSDP1 or FSDP2 model (collective)."""
    if is_fsdp(model) == "fsdp2":
        from torch.distributed.fsdp import FSDPModule
        for m in model.modules():  # a reference's root unit stays gathered after its forward
            if isinstance(m, FSDPModule):
                m.reshard()
        return {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    with FSDP.summon_full_params(model, writeback=False):
        return {n.replace("_fsdp_wrapped_module.", ""): p.detach().clone() for n, p in model.named_parameters()}


def loads_on_meta(values: dict):
    """An FSDP1 param_init_fn for a reference built on the meta device (as ranks other than 0
    hold it under cpu_ram_efficient_loading): materialises each module's own tensors on CPU
    and fills them with `values` ({module: {tensor name: value}})."""
    def init(module):
        module.to_empty(device=torch.device("cpu"), recurse=False)
        with torch.no_grad():
            for name, value in values.get(module, {}).items():
                getattr(module, name).copy_(value)
        return module
    return init


def plugin_settings(plugin) -> tuple:
    return plugin.auto_wrap_policy, plugin.transformer_cls_names_to_wrap, plugin.param_init_fn


class LayoutTrainer(RSATrainer):
    """Records the FSDP plugin as configured, before prepare_reference runs. Optionally gives
    the FSDP1 plugin a param_init_fn (accelerate sets one under sync_module_states on GPUs),
    or a ParallelismConfig's device mesh as the Accelerator sets it up on GPUs (on CPU
    accelerate refuses one before rsa/sharding.py has switched FSDP on)."""
    param_init_fn = None
    parallelism = None

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        state = self.accelerator.state
        if self.param_init_fn is not None:
            state.fsdp_plugin.param_init_fn = self.param_init_fn
        if self.parallelism is not None:
            from accelerate.parallelism_config import ParallelismConfig
            state.parallelism_config = ParallelismConfig(**self.parallelism)
            state.device_mesh = state.parallelism_config.get_device_mesh("cpu")
            state.parallelism_config._validate_accelerator(self.accelerator)
        self.plugin_as_configured = plugin_settings(state.fsdp_plugin)


def reference_layout(workdir: Path, name: str, fsdp_config: dict, efficient: bool = False,
                     meta_reference: bool = False, parallelism: dict | None = None) -> dict:
    """One training step; the policy's sharded layout (wrapped by the Trainer) against the
    reference's (prepare_reference), and the reference's weights against the model it was built as.

    efficient: cpu_ram_efficient_loading, with each rank building its own weights (rank 0's must
    win, as only rank 0 loads them). meta_reference: the reference on the meta device on every
    rank, materialised by the FSDP1 plugin's param_init_fn."""
    rank = dist.get_rank()
    tok = build_tokenizer()
    pairs = [Pair(r["prompt"], r["chosen"], r["rejected"], "test") for r in plain_records(4, seed=5)]
    data = PairDataset(pairs, tok, max_length=14, max_prompt_length=6)
    want_ref = build_model(len(tok), seed=2)
    shift = rank if efficient else 0
    policy, ref = build_model(len(tok), seed=1 + 10 * shift), build_model(len(tok), seed=2 + 10 * shift)
    trainer_cls = LayoutTrainer
    if meta_reference:
        with torch.device("meta"):
            ref = build_model(len(tok), seed=2)
        real = dict(want_ref.named_modules())
        values = {m: {n: t for n, t in [*real[path].named_parameters(recurse=False),
                                         *real[path].named_buffers(recurse=False)]}
                  for path, m in ref.named_modules()}
        trainer_cls = type("MetaReference", (LayoutTrainer,), {"param_init_fn": staticmethod(loads_on_meta(values))})
    if parallelism:
        trainer_cls = type("WithMesh", (trainer_cls,), {"parallelism": parallelism})
    args = RSAConfig(output_dir=str(workdir / name), use_cpu=True, ddp_backend="gloo", fsdp="full_shard",
                     fsdp_config={**fsdp_config, "cpu_ram_efficient_loading": efficient},
                     per_device_train_batch_size=2, max_steps=1, save_strategy="no", report_to="none",
                     disable_tqdm=True, dataloader_num_workers=0, max_length=14, max_prompt_length=6)
    see = SeeLayout()
    trainer = trainer_cls(model=policy, ref_model=ref, args=args, train_dataset=data, processing_class=tok,
                          callbacks=[see])
    untouched = plugin_settings(trainer.accelerator.state.fsdp_plugin) == trainer.plugin_as_configured
    ref_layout = sharded_layout(trainer.ref_model)
    trainer.train()
    got = full_weights(trainer.ref_model)
    want = dict(want_ref.named_parameters())
    return {"policy": see.layout, "reference": ref_layout, "plugin_untouched_by_reference": untouched,
            "reference_weights_err": max((got[n] - w).abs().max().item() for n, w in want.items())}


def main(workdir: str, results: str, configs: list[str]):
    workdir = Path(workdir)
    # A process that fails mid-collective must not leave the other waiting for half an hour.
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    f64, f32 = torch.float64, torch.float32
    cases = [(2, "rsa2", "cvar:0.9", f64), (2, "dpo", "kl", f64), (1, "rsa2", "cvar:0.9", f32), (1, "dpo", "kl", f32)]
    jobs = [(f"fsdp{v}-{o}", lambda v=v, o=o, r=r, d=d: one_step(workdir, v, o, r, d)) for v, o, r, d in cases]
    jobs += [("fsdp2-bf16", lambda: mixed_precision_reference(workdir)),
             ("fsdp1-checkpoints", lambda: fsdp1_checkpoints_refused(workdir)),
             ("head-own-unit", head_in_its_own_unit_refused)]
    mlp = {"transformer_layer_cls_to_wrap": ["LlamaMLP"]}  # not the _no_split_modules' decoder layer
    jobs += [("layout-fsdp2-classes", lambda: reference_layout(workdir, "l2c", {"version": 2, **mlp})),
             ("layout-fsdp2-efficient", lambda: reference_layout(workdir, "l2e", {"version": 2}, efficient=True)),
             ("layout-fsdp2-mesh", lambda: reference_layout(workdir, "l2m", {"version": 2},
                                                            parallelism={"dp_shard_size": 2})),
             ("layout-fsdp1-classes", lambda: reference_layout(workdir, "l1c", {"version": 1, **mlp})),
             ("layout-fsdp1-param-init", lambda: reference_layout(
                 workdir, "l1p", {"version": 1, "sync_module_states": False}, meta_reference=True))]
    jobs += [(f"rsa-train-{Path(c).stem}", lambda c=c: rsa_train(Path(c))) for c in configs]
    run_jobs(jobs, results)


def run_jobs(jobs, results: str):
    """Runs every (name, job) in order; rank 0 writes {name: result or error, seconds} to RESULTS."""
    out = {}
    for name, job in jobs:
        start = time.perf_counter()
        try:
            out[name] = job()
        except Exception:  # one broken case must not hide the others; the test fails on it
            out[name] = {"error": traceback.format_exc()}
        out[name]["seconds"] = round(time.perf_counter() - start, 2)
    if dist.get_rank() == 0:
        Path(results).write_text(json.dumps(out, indent=2))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
