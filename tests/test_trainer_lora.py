"""LoRA stages of `rsa train` (examples/tiny_lora.yaml on a tiny Llama): the `lora:` settings,
one copy of the base, the stacked chain (the safety stage's reference is exactly the helpfulness
stage's model), small stage folders, resume after SIGKILL, `rsa merge` against merging full
weights, `rsa eval` on LoRA folders, QLoRA (4-bit NF4 on CPU) and LoRA on lm_head refused."""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import PreTrainedModel, TrainerCallback

from rsa.cli import main as rsa_main
from rsa.config import load_config
from rsa.lora import is_lora_folder, load_lora_stage, trainable_adapters_off
from rsa.stepwise import run_stages
from test_trainer_common import (logged_steps, pku_records, plain_records, read_weights, save_tiny_model,
                                 sigkill_at_safe_step_3, write_jsonl)

peft = pytest.importorskip("peft")
ROOT = Path(__file__).resolve().parents[1]
PROBE_IDS = torch.tensor([[2, 5, 6, 7, 8, 9, 10, 11, 12], [2, 13, 14, 15, 16, 17, 18, 3, 0]])
PROBE_MASK = torch.tensor([[1] * 9, [1] * 8 + [0]])


def lora_config(tmp: Path, out: str, **changes) -> Path:
    """examples/tiny_lora.yaml, copied next to the tiny model and data, with ``changes`` to defaults.lora."""
    cfg = yaml.safe_load((ROOT / "examples" / "tiny_lora.yaml").read_text())
    cfg["output_dir"] = out
    cfg["defaults"]["lora"].update(changes)
    path = tmp / f"{out}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def logits(model) -> torch.Tensor:
    was = model.training
    model.eval()
    with torch.no_grad():
        out = model(input_ids=PROBE_IDS, attention_mask=PROBE_MASK).logits
    model.train(was)
    return out


class Probe(TrainerCallback):
    """Records, per stage, what is alive and how the policy is built at the start, the reference's
    logits at the start and the policy's logits at the end (in memory, before anything is saved).
    It keeps no model: an earlier stage's model would otherwise stay alive."""

    def __init__(self):
        self.seen = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        stage = Path(args.output_dir).name
        gc.collect()
        models = [o for o in gc.get_objects() if isinstance(o, PreTrainedModel)]
        inner = {id(m) for o in models for m in o.modules() if m is not o}   # e.g. LlamaModel in LlamaForCausalLM
        top = [o for o in models if id(o) not in inner]
        self.seen[f"{stage}/models"] = [type(m).__name__ for m in top]
        self.seen[f"{stage}/the policy's base"] = len(top) == 1 and top[0] is model.get_base_model()
        self.seen[f"{stage}/adapters"] = sorted(model.peft_config)
        self.seen[f"{stage}/trainable"] = {n for n, p in model.named_parameters() if p.requires_grad}
        self.seen[f"{stage}/q_proj"] = type(model.get_base_model().model.layers[0].self_attn.q_proj.base_layer)
        with trainable_adapters_off(model):
            self.seen[f"{stage}/reference"] = logits(model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.seen[f"{Path(args.output_dir).name}/result"] = logits(model)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora")
    save_tiny_model(tmp / "sft")
    write_jsonl(plain_records(8, seed=1), tmp / "helpful.jsonl")
    write_jsonl(pku_records(8, seed=2), tmp / "pku.jsonl")
    return tmp


@pytest.fixture(scope="module")
def straight(workdir):
    probe = Probe()
    run_stages(lora_config(workdir, "straight"), progress=False, callbacks=[probe])
    return workdir / "straight", probe.seen


# ------------------------------------------------------------------ the `lora:` settings

def base_config(**lora):
    return {"model": "sft", "output_dir": "runs", "defaults": {"lora": {"r": 4, **lora}},
            "stages": [{"name": "h", "data": "d.jsonl"}, {"name": "s", "data": "d.jsonl"}]}


@pytest.mark.parametrize("lora, message", [
    ({"rank": 4}, "unknown key 'rank'"),
    ({"r": 0}, "defaults.lora.r must be a positive integer, got 0"),
    ({"lora_alpha": "x"}, "lora.lora_alpha must be a number > 0"),
    ({"lora_dropout": 1.5}, "lora.lora_dropout must be a number in [0, 1)"),
    ({"target_modules": ["q_proj", "lm_head"]}, "LoRA on lm_head is not supported"),
    ({"target_modules": 7}, "lora.target_modules must be a module name pattern"),
    ({"modules_to_save": ["lm_head"]}, "lora.modules_to_save is not supported: it trains or changes weights"),
    ({"use_dora": True}, "lora.use_dora is not supported: rsa train takes plain LoRA adapters"),
    ({"task_type": "SEQ_CLS"}, "lora.task_type is set by rsa train"),
    ({"bias": "all"}, "lora.bias must be none"),
    ({"init_lora_weights": False}, "lora.init_lora_weights must be true or gaussian"),
    ({"quantization": "8bit"}, "lora.quantization must be 4bit"),
])
def test_bad_lora_settings_are_refused(lora, message):
    with pytest.raises(ValueError, match="lora") as err:
        load_config(base_config(**lora))
    assert message in str(err.value)


def test_lora_per_stage_and_chain_rules():
    cfg = base_config(lora_alpha=8)
    cfg["stages"][0]["lora"] = {"r": 2}          # updates the defaults' mapping key by key
    cfg["stages"][1]["reference"] = "model"      # a full stage may start from the SFT model
    cfg["stages"][1]["lora"] = None
    got = load_config(cfg)
    assert got["stages"][0]["lora"] == {"r": 2, "lora_alpha": 8, "quantization": None}
    assert got["stages"][1]["lora"] is None and "lora" not in got["defaults"]
    assert load_config(got) == got                 # validating a validated config changes nothing
    cfg["stages"][1]["reference"] = "previous"
    with pytest.raises(ValueError, match=r"stages\[1\] \(s\) trains full weights from the LoRA stage 'h'"):
        load_config(cfg)
    cfg["stages"][1]["lora"] = {"quantization": "4bit"}
    with pytest.raises(ValueError, match="lora.quantization is '4bit' but the LoRA stage it starts from"):
        load_config(cfg)
    cfg["stages"][1]["lora"] = {"r": 8}
    cfg["stages"][1]["model_dtype"] = "bfloat16"
    with pytest.raises(ValueError, match="model_dtype is 'bfloat16' but the LoRA stage it starts from"):
        load_config(cfg)


def test_4bit_without_bitsandbytes_stops_at_the_config(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)   # import bitsandbytes -> ImportError
    with pytest.raises(ValueError, match="defaults.lora.quantization: 4bit needs bitsandbytes, which is not installed"):
        load_config(base_config(quantization="4bit"))
    cfg = base_config(quantization="4bit")
    cfg["defaults"]["fsdp"] = "full_shard"
    monkeypatch.delitem(sys.modules, "bitsandbytes")
    with pytest.raises(ValueError, match="quantization 4bit is not supported with fsdp or deepspeed"):
        load_config(cfg)


def test_cli_stops_on_a_bad_lora_key_before_loading_anything(tmp_path, capsys):
    cfg = base_config(dropout=0.1)
    cfg["model"] = str(tmp_path / "no-such-model")   # never reached: the config is checked first
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    capsys.readouterr()
    assert rsa_main(["train", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rsa train: error: ") and "\n" not in err and "unknown key 'dropout'" in err, err


# ------------------------------------------------------------------ a two-stage LoRA run

def test_stage_folders_hold_small_adapters(straight, workdir):
    out, _ = straight
    sft_bytes = (workdir / "sft" / "model.safetensors").stat().st_size
    for name in ("helpful", "safe"):
        d = out / name
        assert is_lora_folder(d) and (d / "adapter_model.safetensors").is_file() and (d / "stage.json").is_file()
        assert not list(d.glob("*.safetensors"))[1:] and not (d / "model.safetensors").exists()
        assert not list(d.glob("checkpoint-*")) and not list(d.glob("*.bin"))
        assert not [p for p in d.iterdir() if p.is_dir()]   # no frozen adapters saved again
        assert (d / "adapter_model.safetensors").stat().st_size < sft_bytes   # (r=4 of 16 dims: not much)
    first, second = (json.loads((out / s / "stage.json").read_text()) for s in ("helpful", "safe"))
    assert first["lora"]["stack"] == [] and Path(first["lora"]["base"]) == (workdir / "sft").resolve()
    assert second["lora"]["stack"] == [str((out / "helpful").resolve())]
    assert Path(second["reference"]) == (out / "helpful").resolve() and second["beta"] == pytest.approx(0.25)
    assert 0 < second["trainable_parameters"] < first["parameters"] / 2
    adapter = read_weights_named(out / "safe")
    assert adapter and all("lora_" in k for k in adapter)
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in adapter.items())   # it trained


def read_weights_named(folder):
    from safetensors.torch import load_file
    return load_file(str(Path(folder) / "adapter_model.safetensors"))


def test_one_copy_of_the_base(straight):
    _, seen = straight
    for stage in ("helpful", "safe"):
        # The only transformers model alive while the stage trains is the policy's base: no reference copy.
        assert seen[f"{stage}/models"] == ["LlamaForCausalLM"] and seen[f"{stage}/the policy's base"]
    assert seen["helpful/adapters"] == ["default"] and seen["safe/adapters"] == ["default", "frozen_0"]
    trainable = seen["safe/trainable"]
    assert trainable and all(".default." in n for n in trainable)


def test_safety_reference_is_exactly_the_helpfulness_result(straight):
    out, seen = straight
    assert torch.equal(seen["safe/reference"], seen["helpful/result"])
    # and as `rsa eval` (or a later stage) loads the helpful folder
    assert torch.equal(logits(load_lora_stage(out / "helpful")), seen["helpful/result"])
    assert torch.equal(logits(load_lora_stage(out / "safe")), seen["safe/result"])
    assert not torch.equal(seen["safe/result"], seen["safe/reference"])
    assert not torch.equal(seen["helpful/reference"], seen["helpful/result"])


def test_sigkill_mid_lora_stage_then_resume_equals_straight_run(straight, workdir):
    cfg = lora_config(workdir, "killed")
    sigkill_at_safe_step_3(cfg, workdir)
    safe = workdir / "killed" / "safe"
    assert (safe / "checkpoint-2" / "adapter_model.safetensors").is_file() and not (safe / "stage.json").exists()
    assert not [p for p in (safe / "checkpoint-2").iterdir() if p.is_dir()]
    assert rsa_main(["train", str(cfg), "--no-progress"]) == 0
    got, want = read_weights_named(safe), read_weights_named(straight[0] / "safe")
    assert got.keys() == want.keys()
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert logged_steps(safe) == list(range(1, 7))


def test_torchrun_two_processes_equal_one(straight, workdir):
    """The paper's layout in small: DDP over 2 processes (gloo, CPU) x 1 pair equals 1 process x 2 pairs."""
    cfg = yaml.safe_load((workdir / "straight.yaml").read_text())
    cfg["output_dir"], cfg["stages"] = "ddp", cfg["stages"][:1]
    cfg["defaults"].update(per_device_train_batch_size=1, ddp_backend="gloo")
    (workdir / "ddp.yaml").write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "rsa.cli", "train", str(workdir / "ddp.yaml"), "--no-progress"]
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    got, want = read_weights_named(workdir / "ddp" / "helpful"), read_weights_named(straight[0] / "helpful")
    assert got.keys() == want.keys()
    # as tests/test_trainer_stepwise.py: the all-reduce sums in another order, Adam's first steps amplify it
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=1e-4, atol=2e-5, msg=name)


# ------------------------------------------------------------------ rsa merge and rsa eval

def full_weights(stage: Path, out: Path) -> Path:
    """A LoRA stage's full weights as PEFT merges them (float32), saved as a model folder."""
    load_lora_stage(stage).merge_and_unload().save_pretrained(out)
    return out


def test_merge_of_lora_stages_equals_merge_of_their_full_weights(straight, tmp_path):
    out, _ = straight
    h, s = out / "helpful", out / "safe"
    fh, fs = full_weights(h, tmp_path / "fh"), full_weights(s, tmp_path / "fs")
    assert rsa_main(["merge", str(fh), str(fs), "--weight", "0.3", "--out", str(tmp_path / "want")]) == 0
    assert rsa_main(["merge", str(h), str(s), "--weight", "0.3", "--out", str(tmp_path / "got")]) == 0
    want, got = read_weights(tmp_path / "want"), read_weights(tmp_path / "got")
    assert want.keys() == got.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype == torch.float32
        torch.testing.assert_close(got[k], want[k], msg=k)   # float32 rounding
    sft = read_weights(out.parent / "sft")
    assert not torch.equal(got["model.layers.0.self_attn.q_proj.weight"], sft["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(got["lm_head.weight"], sft["lm_head.weight"])   # no adapter there
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "got"))   # a complete model folder
    assert (tmp_path / "got" / "tokenizer.json").is_file() and not (tmp_path / "got" / "adapter_config.json").exists()
    del model
    # --weight 0 of a stage with itself: its full weights
    assert rsa_main(["merge", str(s), str(s), "--weight", "0", "--out", str(tmp_path / "s0")]) == 0
    for k, v in read_weights(fs).items():
        torch.testing.assert_close(read_weights(tmp_path / "s0")[k], v, msg=k)


def test_eval_accepts_lora_stage_folders(straight, tmp_path):
    out, _ = straight
    write_jsonl([{"prompt": "how do i make a red mat"}, {"prompt": "tell me"}], tmp_path / "prompts.jsonl")
    assert rsa_main(["eval", "--model", f"h={out / 'helpful'}", "--model", f"s={out / 'safe'}",
                     "--reference", str(out / "helpful"), "--prompts", str(tmp_path / "prompts.jsonl"),
                     "--cost", str(ROOT / "examples" / "cost"), "--samples", "2", "--max-new-tokens", "5",
                     "--device", "cpu", "--out", str(tmp_path / "eval"), "--no-progress"]) == 0
    lines = [json.loads(ln) for ln in (tmp_path / "eval" / "samples.jsonl").read_text().splitlines()]
    kl = {m: [r["kl"] for r in lines if r["model"] == m] for m in ("h", "s")}
    assert kl["h"] == [0.0] * 4            # the helpful stage against itself, loaded twice
    assert all(v > 0 for v in kl["s"])     # the safe stage's adapters are really on


# ------------------------------------------------------------------ QLoRA and the lm head

def test_qlora_two_stages_on_cpu(workdir):
    """4-bit NF4 base (bitsandbytes on CPU), bf16 compute: both stages train, the base stays
    4-bit and the safety stage's reference is exactly the helpfulness stage's model."""
    import bitsandbytes as bnb
    cfg = yaml.safe_load(lora_config(workdir, "q4", quantization="4bit").read_text())
    cfg["defaults"].update(model_dtype="bfloat16", activation_checkpointing=True)   # as the 7B example
    for stage in cfg["stages"]:
        stage["max_steps"] = 2
    (workdir / "q4.yaml").write_text(yaml.safe_dump(cfg))
    probe = Probe()
    run_stages(workdir / "q4.yaml", progress=False, callbacks=[probe])
    seen = probe.seen
    assert seen["safe/q_proj"] is bnb.nn.Linear4bit
    assert torch.equal(seen["safe/reference"], seen["helpful/result"])
    assert not torch.equal(seen["helpful/result"], seen["helpful/reference"])
    assert torch.isfinite(seen["safe/result"]).all()
    record = json.loads((workdir / "q4" / "safe" / "stage.json").read_text())
    assert record["lora"]["quantization"] == "4bit" and record["steps"] == 2
    assert torch.equal(logits(load_lora_stage(workdir / "q4" / "safe")), seen["safe/result"])


def test_lora_on_the_lm_head_is_refused(tmp_path):
    from rsa.config import RSAConfig
    from rsa.data import PairCollator, PairDataset, load_pairs
    from rsa.trainer import RSATrainer
    from test_trainer_common import build_model, build_tokenizer
    tok = build_tokenizer()
    model = peft.get_peft_model(build_model(len(tok)), peft.LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    data = PairDataset(load_pairs(write_jsonl(plain_records(2), tmp_path / "d.jsonl")), tok, 14, 6)
    batch = PairCollator(tok.pad_token_id)([data[0], data[1]])
    args = RSAConfig(output_dir=str(tmp_path / "o"), use_cpu=True, report_to="none")
    trainer = RSATrainer(model=model, ref_model=None, args=args, processing_class=tok)
    with pytest.raises(ValueError, match="do not put adapters on lm_head"):
        trainer.compute_loss(trainer.model, batch)
