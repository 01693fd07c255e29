"""A LoRA policy: the reference is the same model with its adapters disabled (no second copy)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

import rsa_kernels as rk
from rsa.config import RSAConfig
from rsa.data import PairCollator, PairDataset, load_pairs
from rsa.lora import load_lora_stage, trainable_adapters_off
from rsa.stepwise import run_stages
from rsa.trainer import RSATrainer
from test_trainer_common import build_model, build_tokenizer, plain_records, save_tiny_model, write_jsonl

peft = pytest.importorskip("peft")
LOSS = dict(objective="rsa1", risk="erm:1.0", beta=0.5, alpha=0.5, gamma=1.0, label_smoothing=0.0)


def test_lora_policy_against_its_base_as_reference(tmp_path):
    tok = build_tokenizer()
    base = build_model(len(tok), seed=4).double()
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B = 0 at init would make policy == reference
            p.data.normal_(0, 0.5)
    pairs = load_pairs(write_jsonl(plain_records(2, seed=7), tmp_path / "d.jsonl"))
    data = PairDataset(pairs, tok, max_length=14, max_prompt_length=6)
    batch = PairCollator(tok.pad_token_id)([data[0], data[1]])
    args = RSAConfig(output_dir=str(tmp_path / "o"), use_cpu=True, report_to="none", loss_backend="torch", **LOSS)
    trainer = RSATrainer(model=model, ref_model=None, args=args, processing_class=tok)
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()

    fwd = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    logits = model(**fwd).logits
    with torch.no_grad(), model.disable_adapter():
        ref_logits = model(**fwd).logits
    want, _ = rk.preference_loss(logits, ref_logits, batch["labels"], shift=True, backend="torch", **LOSS)
    want.backward()
    torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-12)
    assert got and all("lora" in n for n in got)
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(got[n], p.grad, rtol=1e-8, atol=1e-10, msg=n)
    assert not torch.allclose(ref_logits, logits.detach())  # the adapters were really off for the reference


class ReferenceAtStart(TrainerCallback):
    """Each stage's reference logits (the policy with its trainable adapter off) when it starts."""

    def __init__(self):
        self.seen = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        with torch.no_grad(), trainable_adapters_off(model):
            self.seen[Path(args.output_dir).name] = model(input_ids=IDS).logits


IDS = torch.tensor([[2, 5, 6, 7, 8, 9, 10, 11], [2, 13, 14, 15, 16, 17, 3, 4]])


def test_lora_on_the_embedding(tmp_path):
    """PEFT keeps an embedding's adapter as bare Parameters (lora_embedding_A/B), not modules."""
    tok = build_tokenizer()
    model = peft.get_peft_model(build_model(len(tok), seed=4),
                                peft.LoraConfig(r=2, lora_alpha=4, target_modules=["embed_tokens", "q_proj"]))
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_embedding_B" in name or "lora_B" in name:   # B = 0 at init would hide the adapter
            p.data.normal_(0, 0.5)
    with torch.no_grad():
        with trainable_adapters_off(model):
            reference = model(input_ids=IDS).logits
        with model.disable_adapter():
            base = model(input_ids=IDS).logits
        on = model(input_ids=IDS).logits
    assert torch.equal(reference, base) and not torch.equal(on, base)

    # Two stages: each trains its embedding adapter; the second's reference is the first's model.
    save_tiny_model(tmp_path / "sft")
    write_jsonl(plain_records(4, seed=3), tmp_path / "d.jsonl")
    cfg = {"model": str(tmp_path / "sft"), "output_dir": str(tmp_path / "runs"),
           "defaults": {"lora": {"r": 2, "lora_alpha": 4, "target_modules": ["embed_tokens", "q_proj"]},
                        "per_device_train_batch_size": 2, "max_steps": 2, "learning_rate": 0.05, "use_cpu": True,
                        "report_to": "none", "max_length": 16, "max_prompt_length": 8, "seed": 3},
           "stages": [{"name": "h", "data": str(tmp_path / "d.jsonl")}, {"name": "s", "data": str(tmp_path / "d.jsonl")}]}
    probe = ReferenceAtStart()
    run_stages(cfg, progress=False, callbacks=[probe])
    for stage in ("h", "s"):
        adapter = load_file(str(tmp_path / "runs" / stage / "adapter_model.safetensors"))
        assert any("lora_embedding_B" in k and v.abs().max() > 0 for k, v in adapter.items()), stage
    with torch.no_grad():
        first = load_lora_stage(tmp_path / "runs" / "h")(input_ids=IDS).logits
    assert torch.equal(probe.seen["s"], first)
