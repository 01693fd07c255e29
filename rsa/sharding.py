"""The sharding a config asks for, or an error: never a silent fall-back to plain DDP.

Accelerate turns a Trainer's `fsdp` setting into FSDP only on accelerators (its
AcceleratorState promotes MULTI_GPU and kin to FSDP, never MULTI_CPU), so `fsdp` with
`use_cpu: true` under torchrun would quietly train with DDP, and `fsdp` in a process started
without a launcher would train unsharded. On CPU processes with a process group we switch
FSDP on ourselves: torch's FSDP1 (device_id=cpu) and FSDP2 both run over gloo, and the rest
of accelerate's FSDP path (wrapping, clipping, FSDP2 saving) only needs the state to say
FSDP; FSDP1 needs its weights broadcast by us (sync_module_states) and a final save without
the copy "to CPU" that crashes it. DeepSpeed (its CPU accelerator runs over gloo) accelerate
enables with `use_cpu` itself, but not when told it runs on CPU (ACCELERATE_USE_CPU): we
switch it on then, and initialise DeepSpeed's communication before models load. Anything
else that would drop the requested sharding is refused with a ValueError naming the setting.
Tested: tests/test_trainer_fsdp.py, tests/test_trainer_deepspeed.py.
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
    """Called right after the Trainer built its Accelerator: switches FSDP or DeepSpeed on for
    CPU processes or raises ValueError naming the setting that would be dropped.

    Returns True when the caller must broadcast rank 0's weights before wrapping (FSDP1's
    sync_module_states, which torch only does on GPUs; see broadcast_module_states).
    """
    args, state = trainer.args, trainer.accelerator.state
    if getattr(args, "deepspeed", None) and not trainer.is_deepspeed_enabled:
        deepspeed_on_cpu(trainer)
    if trainer.is_deepspeed_enabled:
        check_deepspeed(trainer)
        return False
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
    if settings.get("cpu_ram_efficient_loading") and settings.get("fsdp_version", 1) == 1:
        # accelerate's FSDP1 plugin then forces sync_module_states, which it refuses on CPU.
        raise ValueError("fsdp_config cpu_ram_efficient_loading with use_cpu needs FSDP2 (version 2): FSDP1 "
                         "loads it through sync_module_states, which accelerate does not support on CPU")
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
    state.fsdp_plugin = plugin
    switch_distributed_type(state, DistributedType.FSDP)
    trainer.is_fsdp_enabled = True
    trainer.fsdp_on_cpu = True
    return sync


def deepspeed_on_cpu(trainer) -> None:
    """DeepSpeed on CPU processes when accelerate was told it runs on CPU (ACCELERATE_USE_CPU,
    as `accelerate launch --cpu` sets it): what AcceleratorState does for DeepSpeed otherwise
    (the plugin selected, the state saying DEEPSPEED), on the gloo group that PartialState
    already made; DeepSpeed's own CPU accelerator runs the engine over it. (With `use_cpu` in
    the Trainer's arguments alone accelerate enables DeepSpeed itself: the Trainer does not pass
    `cpu` on to the Accelerator.)"""
    args, state = trainer.args, trainer.accelerator.state
    from accelerate.utils import DistributedType
    if state.distributed_type != DistributedType.MULTI_CPU:
        raise ValueError(f"deepspeed is set but accelerate runs this process as {state.distributed_type.value} "
                         f"({state.num_processes} process(es)), without DeepSpeed: start it with torchrun or "
                         "accelerate launch (on CPU with use_cpu: true)")
    plugin = args.deepspeed_plugin
    plugin.select(_from_accelerator_state=True)
    state.deepspeed_plugins = plugin
    switch_distributed_type(state, DistributedType.DEEPSPEED)
    trainer.is_deepspeed_enabled = True
    trainer.deepspeed_on_cpu = True


def deepspeed_comm_on_cpu(args) -> None:
    """DeepSpeed's communication on the CPU process group, once the arguments have made it.

    With `use_cpu` Transformers initialises torch.distributed itself (gloo), where on GPUs
    accelerate initialises it through DeepSpeed. Models loaded next under ZeRO-3
    (from_pretrained's deepspeed.zero.Init) read DeepSpeed's world size, which is 1 until
    deepspeed.comm is initialised: "train_batch_size is not equal to micro_batch_per_gpu *
    gradient_acc_step * world_size 2 != 1 * 1 * 1". This initialises it, as accelerate does.
    """
    if not getattr(args, "deepspeed", None) or not on_cpu(args) or not torch.distributed.is_initialized():
        return
    import deepspeed.comm
    if not deepspeed.comm.is_initialized():
        deepspeed.comm.init_distributed(dist_backend=torch.distributed.get_backend(), auto_mpi_discovery=False)


def check_deepspeed(trainer) -> None:
    """ValueError for a DeepSpeed run that would fail later or save something else than a model."""
    args, plugin = trainer.args, trainer.accelerator.state.deepspeed_plugin
    if not torch.distributed.is_initialized():
        # DeepSpeed would look for MPI to find its processes, inside deepspeed.initialize.
        raise ValueError("deepspeed is set but this process was started without a launcher: start it with "
                         "torchrun, accelerate launch or deepspeed (on CPU with use_cpu: true), or remove deepspeed")
    if on_cpu(args):
        if args.bf16 or args.fp16:
            raise ValueError("deepspeed with use_cpu runs in float32 only (DeepSpeed's bf16/fp16 engines are not "
                             "tested on CPU); remove bf16/fp16")
        from deepspeed.accelerator import get_accelerator
        if get_accelerator().device_name() != "cpu":
            raise ValueError(f"deepspeed with use_cpu needs DeepSpeed's CPU accelerator, but it chose "
                             f"{get_accelerator().device_name()!r}: set DS_ACCELERATOR=cpu")
    zero = plugin.deepspeed_config.get("zero_optimization", {})
    if plugin.zero_stage == 3 and not zero.get("stage3_gather_16bit_weights_on_model_save"):
        # Every stage is saved as a whole model; under ZeRO-3 only DeepSpeed can gather it.
        raise ValueError("deepspeed ZeRO-3 needs zero_optimization.stage3_gather_16bit_weights_on_model_save: "
                         "true, or the trained model is saved as partitions only (rsa saves each stage as a "
                         "whole model)")


TESTED_ACCELERATE = "1.16"  # the series whose PartialState layout switch_distributed_type writes (pyproject)


def switch_distributed_type(state, kind) -> None:
    """Make accelerate's state say `kind` (FSDP, DEEPSPEED) on CPU processes.

    Both singletons: every later AcceleratorState() (accelerate makes one per optimizer it
    wraps) copies PartialState's fields over its own, so PartialState's private
    `_shared_state` is written too. Its layout is accelerate's own business: it is checked
    before (a dict holding this process's distributed_type and device) and after (fresh
    PartialState() and AcceleratorState() read the new type), and anything else stops the run.
    MULTI_CPU names the device cpu:0, which FSDP1 refuses as device_id ("cpu" is where CPU
    modules compute): the same memory.
    """
    import accelerate
    from accelerate.state import AcceleratorState, PartialState

    def unknown(what):
        return RuntimeError(f"rsa switches accelerate's state to {kind.value} on CPU processes by writing "
                            f"PartialState._shared_state, but {what} in accelerate {accelerate.__version__}; rsa "
                            f"was tested with accelerate {TESTED_ACCELERATE}: "
                            f"pip install 'accelerate=={TESTED_ACCELERATE}.*'")

    shared = getattr(PartialState, "_shared_state", None)
    if not isinstance(shared, dict) or not {"distributed_type", "device", "num_processes"} <= shared.keys():
        raise unknown("it is not a dict holding distributed_type, device and num_processes")
    if shared["distributed_type"] != state.distributed_type:
        raise unknown(f"it says {shared['distributed_type']} where the Accelerator says {state.distributed_type}")
    for target in (shared, state.__dict__):
        target.update(distributed_type=kind, device=torch.device("cpu"))
    if PartialState().distributed_type != kind or AcceleratorState().distributed_type != kind:
        raise unknown("a new PartialState or AcceleratorState does not read it back")


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
