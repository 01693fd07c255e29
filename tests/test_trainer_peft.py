"""A LoRA policy: the reference is the same model with its adapters disabled (no second copy)."""
from __future__ import annotations

import pytest
import torch

import rsa_kernels as rk
from rsa.config import RSAConfig
from rsa.data import PairCollator, PairDataset, load_pairs
from rsa.trainer import RSATrainer
from test_trainer_common import build_model, build_tokenizer, plain_records, write_jsonl

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
