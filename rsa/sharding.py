"""The sharding a config asks for, or an error: never a silent fall-back to plain DDP.

Accelerate turns a Trainer's `fsdp` setting into FSDP only on accelerators (its
AcceleratorState promotes MULTI_GPU and kin to FSDP, never MULTI_CPU), so `fsdp` with
`use_cpu: true` under torchrun would quietly train with DDP, and `fsdp` in a process started
without a launcher would train unsharded. On CPU processes with a process group we switch
FSDP on ourselves: torch's FSDP1 (device_id=cpu) and FSDP2 both run over gloo, and the rest
of accelerate's FSDP path (wrapping, clipping, FSDP2 saving) only needs the state to say
FSDP; FSDP1 needs its weights broadcast by us (sync_module_states) and a final save without
the copy "to CPU" that crashes it. Anything else that would drop the requested sharding is
refused with a ValueError naming the setting. Tested: tests/test_trainer_fsdp.py.
"""
from __future__ import annotations

import contextlib
import os

import torch


def on_cpu(args) -> bool:
    return bool(args.use_cpu) or os.environ.get("ACCELERATE_USE_CPU", "false").lower() in ("1", "true", "yes")


@contextlib.contextmanager
def fsdp_plugin_held_back(args):
    """While the Trainer builds its Accelerator on CPU, hide the FSDP settings: accelerate's
    FSDP1 plugin looks for a GPU when it is built (for sync_module_states) and would then be
    ignored anyway. enforce_requested_sharding builds the CPU plugin afterwards."""
    requested = args.fsdp_plugin_args
    if requested is not None and on_cpu(args):
        args.fsdp_plugin_args = None
    try:
        yield
    finally:
        args.fsdp_plugin_args = requested


def enforce_requested_sharding(trainer) -> bool:
    """Called right after the Trainer built its Accelerator: switches FSDP on for CPU processes
    or raises ValueError naming the setting that would be dropped.

    Returns True when the caller must broadcast rank 0's weights before wrapping (FSDP1's
    sync_module_states, which torch only does on GPUs; see broadcast_module_states).
    """
    args, state = trainer.args, trainer.accelerator.state
    if getattr(args, "deepspeed", None) and not trainer.is_deepspeed_enabled:
        raise ValueError("deepspeed is set but accelerate did not enable DeepSpeed here (it never does with "
                         "use_cpu); DeepSpeed needs GPUs and a distributed launch")
    if args.fsdp_plugin_args is None or trainer.is_fsdp_enabled:
        return False
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    if state.distributed_type != DistributedType.MULTI_CPU:
        raise ValueError(f"fsdp is set but accelerate runs this process as {state.distributed_type.value} "
                         f"({state.num_processes} process(es)), without FSDP: start it with torchrun or "
                         "accelerate launch (on CPU with use_cpu: true), or remove fsdp")
    if state.mixed_precision == "fp16":
        # Accelerate built a non-sharded gradient scaler already; bf16 or float32 need none.
        raise ValueError("fsdp with use_cpu does not support fp16; use bf16 or float32")
    settings = dict(args.fsdp_plugin_args)
    if settings.get("cpu_ram_efficient_loading"):
        raise ValueError("fsdp_config cpu_ram_efficient_loading is not supported with use_cpu")
    # torch's FSDP1 refuses sync_module_states for CPU modules; the trainer broadcasts instead.
    sync = bool(settings.pop("sync_module_states", False))
    plugin = FullyShardedDataParallelPlugin(**settings, sync_module_states=False)
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    if plugin.fsdp_version == 1 and getattr(args.save_strategy, "value", args.save_strategy) != "no":
        # torch's FSDP1 gathers a full state dict "to CPU" by copying and freeing the gathered
        # weights; on CPU the copy is the same memory, so it crashes (SIGSEGV). accelerate's
        # checkpoint writer always asks for that copy; the final save (fsdp1_cpu_state_dict)
        # does not.
        raise ValueError("fsdp_config version 1 (FSDP1) with use_cpu cannot write checkpoints (torch's FSDP1 "
                         "crashes gathering them on CPU): use FSDP2 (version 2, the default) or save_strategy: no")
    if plugin.activation_checkpointing and args.activation_checkpointing:
        raise ValueError("fsdp_config['activation_checkpointing'] and activation_checkpointing cannot both be "
                         "true; use FSDP's")
    from accelerate.state import PartialState
    state.fsdp_plugin = plugin
    # Both singletons: every later AcceleratorState() (accelerate makes one per optimizer it
    # wraps) copies PartialState's fields over its own. MULTI_CPU names the device cpu:0,
    # which FSDP1 refuses as device_id ("cpu" is where CPU modules compute): the same memory.
    for shared in (PartialState._shared_state, state.__dict__):
        shared.update(distributed_type=DistributedType.FSDP, device=torch.device("cpu"))
    trainer.is_fsdp_enabled = True
    trainer.fsdp_on_cpu = True
    return sync


def fsdp1_cpu_state_dict(trainer):
    """The full state dict (on rank 0) for Trainer.save_model under FSDP1 on CPU, where
    accelerate's own (offload_to_cpu=True) crashes; None in every other case."""
    state = trainer.accelerator.state
    if not getattr(trainer, "fsdp_on_cpu", False) or state.fsdp_plugin.fsdp_version != 1:
        return None
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP, StateDictType
    if state.fsdp_plugin.state_dict_type != StateDictType.FULL_STATE_DICT:
        return None
    from torch.distributed.fsdp import FullStateDictConfig
    config = FullStateDictConfig(offload_to_cpu=False, rank0_only=True)  # see enforce_requested_sharding
    with FSDP.state_dict_type(trainer.model, StateDictType.FULL_STATE_DICT, config):
        return trainer.model.state_dict()


def broadcast_module_states(module: torch.nn.Module) -> None:
    """Rank 0's parameters and buffers on every process (what sync_module_states does on GPUs)."""
    import torch.distributed as dist
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, src=0)
