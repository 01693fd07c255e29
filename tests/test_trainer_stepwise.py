"""`rsa train` end to end on a tiny Llama: two stages, resume after SIGKILL, two processes
with torchrun (gloo, CPU) against one, and `rsa merge`."""
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
from test_trainer_common import (logged_steps, pku_records, plain_records, read_weights, save_tiny_model,
                                 sigkill_at_safe_step_3, write_jsonl)

ROOT = Path(__file__).resolve().parents[1]
SPEC_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin", "kl/chosen",
                "kl/rejected", "risk/chosen", "risk/rejected", "logps/chosen", "logps/rejected")


def two_stage_config(tmp: Path, out: str) -> Path:
    """examples/tiny.yaml (the documented tiny run), copied next to the tiny model and data."""
    cfg = yaml.safe_load((ROOT / "examples" / "tiny.yaml").read_text())
    cfg["output_dir"] = out
    path = tmp / f"{out}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stepwise")
    save_tiny_model(tmp / "sft")
    write_jsonl(plain_records(8, seed=1), tmp / "helpful.jsonl")
    write_jsonl(pku_records(8, seed=2), tmp / "pku.jsonl")  # 4 steps an epoch: 6 steps cross epochs
    return tmp


@pytest.fixture(scope="module")
def straight_run(workdir):
    """The uninterrupted two-stage run, through the command line."""
    assert rsa_main(["train", str(two_stage_config(workdir, "straight")), "--no-progress"]) == 0
    return workdir / "straight"


def test_two_stage_run_writes_both_stages(straight_run, workdir):
    helpful, safe = straight_run / "helpful", straight_run / "safe"
    for d in (helpful, safe):
        assert (d / "model.safetensors").is_file() and (d / "tokenizer.json").is_file()
        assert not list(d.glob("checkpoint-*")) and not list(d.glob("*.bin"))
    first, second = (json.loads((d / "stage.json").read_text()) for d in (helpful, safe))
    assert Path(first["reference"]) == (workdir / "sft").resolve()
    assert Path(second["reference"]) == helpful.resolve()
    assert second["beta"] == pytest.approx(0.25) and second["risk"] == "erm:0.5" and second["steps"] == 6
    lines = [json.loads(ln) for ln in (safe / "metrics.jsonl").read_text().splitlines()]
    steps = [ln for ln in lines if "loss" in ln]
    assert [ln["step"] for ln in steps] == list(range(1, 7))
    assert all(name in ln for ln in steps for name in SPEC_METRICS)
    # The stages trained: each result differs from its reference.
    sft, w1, w2 = (read_weights(p) for p in (workdir / "sft", helpful, safe))
    assert not torch.equal(sft["lm_head.weight"], w1["lm_head.weight"])
    assert not torch.equal(w1["lm_head.weight"], w2["lm_head.weight"])


def test_rerun_skips_finished_stages(straight_run, workdir):
    stamps = [(straight_run / s / "stage.json").stat().st_mtime_ns for s in ("helpful", "safe")]
    assert rsa_main(["train", str(workdir / "straight.yaml"), "--no-progress"]) == 0
    assert stamps == [(straight_run / s / "stage.json").stat().st_mtime_ns for s in ("helpful", "safe")]


def test_sigkill_mid_stage_then_resume_equals_straight_run(straight_run, workdir):
    cfg = two_stage_config(workdir, "killed")
    sigkill_at_safe_step_3(cfg, workdir)
    safe = workdir / "killed" / "safe"
    assert (safe / "checkpoint-2").is_dir() and not (safe / "stage.json").exists()
    assert rsa_main(["train", str(cfg), "--no-progress"]) == 0
    got, want = read_weights(safe), read_weights(straight_run / "safe")
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert logged_steps(safe) == list(range(1, 7))  # the log lines of the lost step 3 were dropped on resume


def test_torchrun_two_processes_equal_one(straight_run, workdir):
    """Global batch 2 as 2 processes x 1 pair (DDP, gloo) equals 1 process x 2 pairs."""
    cfg = yaml.safe_load((workdir / "straight.yaml").read_text())
    cfg["output_dir"], cfg["stages"] = "ddp", cfg["stages"][:1]
    cfg["defaults"].update(per_device_train_batch_size=1, ddp_backend="gloo")
    path = workdir / "ddp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "rsa.cli", "train", str(path), "--no-progress"]
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    got, want = read_weights(workdir / "ddp" / "helpful"), read_weights(straight_run / "helpful")
    sft = read_weights(workdir / "sft")
    assert not torch.equal(want["lm_head.weight"], sft["lm_head.weight"])
    # Float tolerance: the all-reduced gradient sums in another order, and Adam's first steps
    # (update ~ lr * sign) amplify that on near-zero gradients; the updates themselves are ~0.1.
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=1e-4, atol=2e-5, msg=name)


def test_merge_of_a_model_with_itself_is_itself(straight_run, tmp_path, capsys):
    a, b = straight_run / "helpful", straight_run / "safe"
    assert rsa_main(["merge", str(a), str(a), "--weight", "0.3", "--out", str(tmp_path / "aa")]) == 0
    wa, waa = read_weights(a), read_weights(tmp_path / "aa")
    assert wa.keys() == waa.keys() and all(torch.equal(wa[k], waa[k]) for k in wa)
    assert (tmp_path / "aa" / "tokenizer.json").is_file() and not (tmp_path / "aa" / "stage.json").exists()
    assert rsa_main(["merge", str(a), str(b), "--weight", "0.25", "--out", str(tmp_path / "ab")]) == 0
    wb, wab = read_weights(b), read_weights(tmp_path / "ab")
    for k in wa:
        torch.testing.assert_close(wab[k], 0.75 * wa[k] + 0.25 * wb[k])
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(str(tmp_path / "ab"))  # a loadable model folder
    capsys.readouterr()   # a user error: one line on stderr, status 2
    assert rsa_main(["merge", str(a), str(b), "--weight", "1.5", "--out", str(tmp_path / "bad")]) == 2
    assert capsys.readouterr().err.strip().startswith("rsa merge: error: weight must be a number in [0, 1]")
