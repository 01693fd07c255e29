"""The trainer under FSDP2 and FSDP1: torchrun, 2 processes, gloo, CPU (tests/fsdp_worker.py).

One torchrun job runs every case (its start-up costs more than they do):
- one RSATrainer step per (FSDP2, FSDP1) x (rsa2/cvar:0.9, dpo): the loss and every
  parameter's gathered gradient equal a single-process oracle with full logits on the same
  global batch. FSDP2 in float64: rtol 1e-10 / atol 1e-12 (loss), rtol 1e-8 / atol 1e-10
  (gradients), errors seen ~1e-16. FSDP1 in float32 (torch's FSDP1 gradient norm cannot take
  float64): rtol 1e-6 / atol 1e-7 and rtol 1e-5 / atol 1e-6, errors seen 0 and 3e-8;
- `rsa train`'s stage runner with `fsdp: full_shard` and `use_cpu: true` (which the
  Transformers Trainer alone would silently run as DDP): the policy is FSDP-wrapped and
  sharded at every step, and the saved model equals a single-process run;
- FSDP2 with bf16 mixed precision: the reference computes in the policy's dtype;
- the reference is sharded as the policy (FSDP2 and FSDP1): the user's layer classes, a
  ParallelismConfig mesh, cpu_ram_efficient_loading, FSDP1's param_init_fn on a meta-device
  reference, and the shared plugin left as configured;
- what cannot run is refused with a ValueError: FSDP without a launcher, FSDP1 on CPU with
  checkpoints, an lm head that FSDP reshards before the loss reads it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from rsa.cli import main as rsa_main
from rsa.config import RSAConfig
from rsa.stepwise import run_stages
from rsa.trainer import RSATrainer
from test_trainer_common import build_model, build_tokenizer, plain_records, read_weights, save_tiny_model, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
ONE_STEP = ["fsdp2-rsa2", "fsdp2-dpo", "fsdp1-rsa2", "fsdp1-dpo"]
VERSIONS = (2, 1)


def stage_config(tmp: Path, name: str, **defaults) -> Path:
    """The first stage of examples/tiny.yaml (2 steps, a checkpoint at step 2) with changes,
    a quarter of its pairs held out for the evaluation at the end."""
    cfg = yaml.safe_load((ROOT / "examples" / "tiny.yaml").read_text())
    cfg["output_dir"], cfg["stages"] = name, cfg["stages"][:1]
    cfg["stages"][0]["data"]["split"] = 0.25
    cfg["defaults"].update(defaults)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def fsdp_job(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp")
    save_tiny_model(tmp / "sft")
    write_jsonl(plain_records(8, seed=1), tmp / "helpful.jsonl")
    # 2 processes x 1 pair against 1 process x 2 pairs below.
    configs = [stage_config(tmp, f"fsdp{v}", per_device_train_batch_size=1, ddp_backend="gloo",
                            fsdp="full_shard", fsdp_config={"version": v},
                            **({} if v == 2 else {"save_strategy": "no"})) for v in VERSIONS]
    return tmp, torchrun_job("fsdp_worker.py", tmp, configs)


def torchrun_job(worker: str, tmp: Path, configs, **env) -> dict:
    """tests/WORKER on 2 processes (torchrun, CPU); the results it wrote."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests" / worker), str(tmp), str(tmp / "results.json"), *map(str, configs)]
    proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=400,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **env})
    assert proc.returncode == 0 and (tmp / "results.json").is_file(), proc.stderr[-4000:]
    results = json.loads((tmp / "results.json").read_text())
    print(worker, "seconds per case:", {name: r.get("seconds") for name, r in results.items()})  # pytest -s
    return results


@pytest.mark.parametrize("case", ONE_STEP)
def test_one_step_equals_one_process(fsdp_job, case):
    _, results = fsdp_job
    got = results[case]
    assert "error" not in got, got.get("error")
    version = case.split("-")[0]
    # The Trainer wrapped the policy, prepare_reference the reference, with the requested FSDP,
    # and each process holds half of the policy's parameters.
    assert got["policy"] == version and got["reference"] == version
    assert got["policy_share"] == pytest.approx(0.5, abs=0.02)
    # The worker compared with torch.testing.assert_close (tolerances in the module docstring).
    loss_rtol, grad_rtol = (1e-10, 1e-8) if got["dtype"] == "torch.float64" else (1e-6, 1e-5)
    assert got["loss"]["abs"] <= loss_rtol * abs(got["loss"]["want"])
    assert got["grad_rel_of_max"] < grad_rtol


@pytest.mark.parametrize("version", VERSIONS)
def test_rsa_train_with_fsdp_on_cpu_is_sharded_and_equals_one_process(fsdp_job, version):
    tmp, results = fsdp_job
    got = results[f"rsa-train-fsdp{version}"]
    assert "error" not in got, got.get("error")
    assert got["steps"] == [f"fsdp{version}"] * 2, "a step ran without FSDP"
    assert got["policy_share"] == pytest.approx(0.5, abs=0.02)
    if not (tmp / "single" / "helpful" / "stage.json").is_file():
        assert rsa_main(["train", str(stage_config(tmp, "single")), "--no-progress"]) == 0
    want, sft = read_weights(tmp / "single" / "helpful"), read_weights(tmp / "sft")
    out = read_weights(tmp / f"fsdp{version}" / "helpful")
    assert not torch.equal(want["lm_head.weight"], sft["lm_head.weight"])
    assert out.keys() == want.keys()
    # float32 and Adam, as tests/test_trainer_stepwise.py's DDP run: the sharded reductions sum
    # in another order and Adam's first updates (~ lr * sign) amplify that on tiny gradients.
    for name, value in want.items():
        torch.testing.assert_close(out[name], value, rtol=1e-4, atol=2e-5, msg=name)
    assert not list((tmp / f"fsdp{version}" / "helpful").glob("checkpoint-*"))  # FSDP2: saved at step 2, removed
    # The evaluation at the end ran on the sharded model too (2 held-out pairs, 1 per process).
    got_eval, want_eval = (json.loads((tmp / d / "helpful" / "stage.json").read_text())["final_metrics"]
                           for d in (f"fsdp{version}", "single"))
    assert got_eval["eval_loss"] == pytest.approx(want_eval["eval_loss"], rel=1e-4)


def test_bf16_reference_computes_like_the_policy(fsdp_job):
    """Policy == reference under FSDP2 with bf16 mixed precision: nothing differs at step 1
    (when the reference was wrapped without the policy's MixedPrecisionPolicy it computed in
    float32: KL up to 3e-7 and rewards up to 3e-4 here)."""
    _, results = fsdp_job
    got = {k: v for k, v in results["fsdp2-bf16"].items() if k != "seconds"}
    assert "error" not in got, got.get("error")
    assert got == {"kl/chosen": 0.0, "kl/rejected": 0.0, "rewards/chosen": 0.0, "rewards/rejected": 0.0}


LAYOUTS = ["fsdp2-classes", "fsdp2-efficient", "fsdp2-mesh", "fsdp1-classes", "fsdp1-param-init"]


@pytest.mark.parametrize("case", LAYOUTS)
def test_reference_is_sharded_as_the_policy(fsdp_job, case):
    """prepare_reference wraps the reference from the policy's plugin and mesh, without changing
    the plugin: the same units (the user's transformer_layer_cls_to_wrap, not _no_split_modules),
    the same placements on the same mesh (a ParallelismConfig's named one), the reference's
    weights intact (cpu_ram_efficient_loading: rank 0's; FSDP1 on the meta device: materialised
    by the plugin's param_init_fn, where torch would call reset_parameters, which RMSNorm lacks)."""
    _, results = fsdp_job
    got = results[f"layout-{case}"]
    assert "error" not in got, got.get("error")
    assert got["reference"] == got["policy"]
    assert got["plugin_untouched_by_reference"]
    assert got["reference_weights_err"] == 0.0
    units = {unit[2] for unit in got["policy"] if unit[0] == "unit"}
    if case.endswith("classes"):
        assert any("LlamaMLP" in u for u in units) and not any("DecoderLayer" in u for u in units)
    if case == "fsdp2-mesh":
        assert {tuple(p[4]) for p in got["policy"] if p[0] != "unit"} == {("dp_shard_cp",)}


def test_fsdp1_checkpoints_on_cpu_are_refused(fsdp_job):
    _, results = fsdp_job
    assert "FSDP1" in (results["fsdp1-checkpoints"]["refused"] or ""), results["fsdp1-checkpoints"]


def test_lm_head_resharded_before_the_loss_is_refused(fsdp_job):
    _, results = fsdp_job
    assert "resharded" in (results["head-own-unit"]["refused"] or ""), results["head-own-unit"]


def test_fsdp_without_a_launcher_is_refused(tmp_path, monkeypatch):
    """One process, no torchrun: FSDP would not apply, so the run stops instead of training unsharded."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")  # the Accelerator sets it: unset afterwards
    tok = build_tokenizer()
    args = RSAConfig(output_dir=str(tmp_path / "o"), use_cpu=True, report_to="none", fsdp="full_shard")
    with pytest.raises(ValueError, match="fsdp is set"):
        RSATrainer(model=build_model(len(tok)), ref_model=build_model(len(tok)), args=args, processing_class=tok)
    save_tiny_model(tmp_path / "sft")
    write_jsonl(plain_records(2), tmp_path / "helpful.jsonl")
    with pytest.raises(ValueError, match="fsdp is set"):
        run_stages(stage_config(tmp_path, "refused", fsdp="full_shard"), progress=False)


def test_accelerate_state_of_another_layout_is_refused(monkeypatch):
    """rsa/sharding.py writes accelerate's private PartialState._shared_state to switch FSDP on
    for CPU processes; an accelerate that keeps that state otherwise stops the run with a
    RuntimeError naming the tested version instead of leaving a half-switched state."""
    from types import SimpleNamespace
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType
    from rsa.sharding import TESTED_ACCELERATE, enforce_requested_sharding
    PartialState(cpu=True)
    storage = PartialState._shared_state
    monkeypatch.setitem(storage, "distributed_type", DistributedType.MULTI_CPU)
    state = SimpleNamespace(distributed_type=DistributedType.MULTI_CPU, mixed_precision="no", num_processes=2)
    args = SimpleNamespace(deepspeed=None, fsdp_plugin_args={"fsdp_version": 2}, save_strategy="no",
                           activation_checkpointing=False)
    trainer = SimpleNamespace(args=args, accelerator=SimpleNamespace(state=state), is_deepspeed_enabled=False,
                              is_fsdp_enabled=False)
    monkeypatch.delitem(storage, "distributed_type")  # say, a future accelerate keeps it elsewhere
    with pytest.raises(RuntimeError, match=f"tested with accelerate {TESTED_ACCELERATE}"):
        enforce_requested_sharding(trainer)
