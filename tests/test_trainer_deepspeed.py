"""The trainer under DeepSpeed ZeRO-2 and ZeRO-3: torchrun, 2 processes, gloo, CPU
(DeepSpeed's CPU accelerator; tests/deepspeed_worker.py).

One torchrun job runs every case:
- one RSATrainer step (torch SGD) per (ZeRO-3, ZeRO-2) x (rsa2/cvar:0.9, dpo), float32: the
  loss, every parameter's gathered gradient and every parameter after the step (the lm head's,
  which ZeRO-3 partitions and the fused loss must read gathered, among them) equal a
  single-process oracle with full logits on the same global batch (rtol 1e-6 / atol 1e-7
  loss, rtol 1e-5 / atol 1e-6 gradients and weights; errors seen 0, 4e-8 and 1.5e-8);
- `rsa train`'s stage runner with examples/deepspeed_zero3.json (ZeRO-3, DeepSpeed's AdamW
  with torch_adam): the saved model equals a single-process run.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rsa.config import RSAConfig
from rsa.trainer import RSATrainer
from test_trainer_common import build_model, build_tokenizer, plain_records, read_weights, save_tiny_model, write_jsonl
from test_trainer_fsdp import stage_config, torchrun_job


ROOT = Path(__file__).resolve().parents[1]
ONE_STEP = ["zero3-rsa2", "zero3-dpo", "zero2-rsa2", "zero2-dpo"]


@pytest.fixture(scope="module")
def deepspeed_job(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("deepspeed")
    save_tiny_model(tmp / "sft")
    write_jsonl(plain_records(8, seed=1), tmp / "helpful.jsonl")
    config = stage_config(tmp, "zero3", per_device_train_batch_size=1, ddp_backend="gloo",
                          deepspeed=str(ROOT / "examples" / "deepspeed_zero3.json"))
    # The worker keeps DeepSpeed from compiling its shared-memory op (deepspeed_worker.main).
    return tmp, torchrun_job("deepspeed_worker.py", tmp, [config], DS_ACCELERATOR="cpu")


@pytest.mark.parametrize("case", ONE_STEP)
def test_one_step_equals_one_process(deepspeed_job, case):
    _, results = deepspeed_job
    got = results[case]
    assert "error" not in got, got.get("error")
    stage = case.split("-")[0]
    assert got["policy"] == stage and not got["switched"]  # use_cpu alone: accelerate enabled DeepSpeed
    if stage == "zero3":
        # Policy and reference partitioned over the 2 processes, the lm head too: between steps
        # the head holds nothing, so the loss read a gathered copy.
        assert got["reference"] == "zero3"
        assert got["policy_share"] == got["reference_share"] == got["head_share"] == pytest.approx(0.5, abs=0.02)
        assert got["head_numel_between_steps"] == 0
    else:
        assert got["reference"] == "zero0"  # ZeRO-2 partitions no weights: a whole reference each
    # The worker compared with torch.testing.assert_close (tolerances in the module docstring).
    assert got["loss"]["abs"] <= 1e-6 * abs(got["loss"]["want"])
    assert got["grad_rel_of_max"] < 1e-5
    assert got["head_update"]["abs"] <= 1e-6 and got["head_step"] > 1e-3  # the head moved, as the oracle's


def test_rsa_train_with_zero3_on_cpu_equals_one_process(deepspeed_job):
    tmp, results = deepspeed_job
    got = {k: v for k, v in results["rsa-train-zero3"].items() if k != "seconds"}
    assert "error" not in got, got.get("error")
    assert got == {"deepspeed": True, "switched": True, "reference": "zero3",
                   "reference_share": pytest.approx(0.5, abs=0.02)}
    from rsa.cli import main as rsa_main
    assert rsa_main(["train", str(stage_config(tmp, "single")), "--no-progress"]) == 0
    want, out = read_weights(tmp / "single" / "helpful"), read_weights(tmp / "zero3" / "helpful")
    assert out.keys() == want.keys()
    assert not torch.equal(want["lm_head.weight"], read_weights(tmp / "sft")["lm_head.weight"])
    # float32 and Adam, as the FSDP and DDP runs (tests/test_trainer_fsdp.py).
    for name, value in want.items():
        torch.testing.assert_close(out[name], value, rtol=1e-4, atol=2e-5, msg=name)
    got_eval, want_eval = (json.loads((tmp / d / "helpful" / "stage.json").read_text())["final_metrics"]
                           for d in ("zero3", "single"))
    assert got_eval["eval_loss"] == pytest.approx(want_eval["eval_loss"], rel=1e-4)


def test_deepspeed_without_a_launcher_is_refused(tmp_path, monkeypatch):
    """One process, no torchrun: DeepSpeed would not apply, so the run stops instead of training unsharded."""
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "false")  # the Accelerator sets it: unset afterwards
    tok = build_tokenizer()
    args = RSAConfig(output_dir=str(tmp_path / "o"), use_cpu=True, report_to="none",
                     deepspeed={"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto"})
    with pytest.raises(ValueError, match="deepspeed is set but this process was started without a launcher"):
        RSATrainer(model=build_model(len(tok)), ref_model=build_model(len(tok)), args=args, processing_class=tok)
