"""RSATrainer's loss: equal to materialised logits fed to preference_loss (value and gradients),
without ever building a (tokens x vocabulary) tensor for the batch."""
from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import rsa_kernels as rk
from rsa.config import RSAConfig
from rsa.data import PairCollator, PairDataset, load_pairs
from rsa.trainer import RSATrainer
from test_trainer_common import build_model, build_tokenizer, plain_records, write_jsonl

LOSS = dict(objective="rsa2", risk="cvar:0.7", beta=0.5, alpha=0.5, gamma=0.9, label_smoothing=0.1)


class WidestVocabTensor(TorchDispatchMode):
    """Records the most rows of any tensor whose last dimension is the vocabulary size."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.rows = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.dim() and t.shape[-1] == self.vocab:
                self.rows = max(self.rows, t.numel() // self.vocab)
        return out


def setup(tmp_path, padding_free: bool):
    tok = build_tokenizer()
    policy, ref = build_model(len(tok), seed=1).double(), build_model(len(tok), seed=2).double()
    # Policy and reference differ (two seeds), so that every KL and risk term is non-zero.
    pairs = load_pairs(write_jsonl(plain_records(3, seed=5), tmp_path / "d.jsonl"))
    data = PairDataset(pairs, tok, max_length=14, max_prompt_length=6)
    batch = PairCollator(tok.pad_token_id, padding_free=padding_free)([data[i] for i in range(3)])
    args = RSAConfig(output_dir=str(tmp_path / "o"), use_cpu=True, report_to="none", padding_free=padding_free,
                     loss_backend="torch", loss_chunk_size=4, **LOSS)
    return tok, policy, ref, batch, args


@pytest.mark.parametrize("padding_free", [False, True])
def test_loss_and_gradients_equal_materialised_logits(tmp_path, padding_free):
    tok, policy, ref, batch, args = setup(tmp_path, padding_free)
    oracle, oracle_ref = copy.deepcopy(policy), copy.deepcopy(ref)
    trainer = RSATrainer(model=policy, ref_model=ref, args=args, processing_class=tok)

    head_outputs = []
    policy.lm_head.register_forward_hook(lambda m, i, o: head_outputs.append(o.shape))
    watch = WidestVocabTensor(len(tok))
    policy.train()
    with watch:
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()

    # The oracle: the models' ordinary forward (full logits) and the unfused loss.
    # use_cache=False as in training: with a cache, transformers would not separate packed sequences.
    fwd = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch} | {"use_cache": False}
    logits = oracle(**fwd).logits
    with torch.no_grad():
        ref_logits = oracle_ref(**fwd).logits
    extra = {}
    labels = batch["labels"]
    if padding_free:
        logits, ref_logits = logits[0], ref_logits[0]
        extra = {"sequence_ids": batch["sequence_ids"], "num_sequences": 6}
    want, _ = rk.preference_loss(logits, ref_logits, labels, shift=True, backend="torch", **LOSS, **extra)
    want.backward()

    torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-12)
    grads = {n: p.grad for n, p in oracle.named_parameters()}
    for name, p in policy.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], rtol=1e-8, atol=1e-10, msg=name)
    assert all(p.grad is None for p in ref.parameters())
    # The head's own forward never ran: its hook saw hidden states (width H), never logits.
    assert head_outputs and all(s[-1] == policy.config.hidden_size for s in head_outputs)
    tokens = batch["input_ids"].numel()
    assert 0 < watch.rows < tokens, f"a {watch.rows} x vocabulary tensor for {tokens} tokens"


def test_packed_equals_padded(tmp_path):
    losses = []
    for padding_free in (False, True):
        tok, policy, ref, batch, args = setup(tmp_path, padding_free)
        trainer = RSATrainer(model=policy, ref_model=ref, args=args, processing_class=tok)
        losses.append(trainer.compute_loss(trainer.model, batch))
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-10, atol=1e-12)


def test_metrics_are_logged_with_spec_names(tmp_path):
    tok, policy, ref, batch, args = setup(tmp_path, False)
    trainer = RSATrainer(model=policy, ref_model=ref, args=args, processing_class=tok)
    trainer.compute_loss(trainer.model, batch)
    logs = {"loss": 1.0}
    trainer.log(logs)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin", "kl/chosen",
                 "kl/rejected", "risk/chosen", "risk/rejected", "logps/chosen", "logps/rejected"):
        assert name in logs and isinstance(logs[name], float)


def test_reference_required_and_config_checked(tmp_path):
    tok = build_tokenizer()
    args = RSAConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    with pytest.raises(ValueError, match="ref_model"):
        RSATrainer(model=build_model(len(tok)), args=args, processing_class=tok)
    with pytest.raises(ValueError, match="risk"):
        RSAConfig(output_dir=str(tmp_path), risk="cvar:1.5")
    with pytest.raises(ValueError, match="max_prompt_length"):
        RSAConfig(output_dir=str(tmp_path), max_length=8, max_prompt_length=8)
