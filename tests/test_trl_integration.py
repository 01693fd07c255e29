"""rsa.integrations.trl against TRL's own DPOTrainer and rsa_kernels.preference_loss.

A tiny Llama built from a config and a word-level tokenizer built here: no hub access.
"""
import copy

import pytest
import torch

trl = pytest.importorskip("trl", reason="the TRL integration needs the trl extra: pip install 'rsa-kernels[trl]'")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
tokenizers = pytest.importorskip("tokenizers")

import rsa_kernels as rk  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from rsa.integrations.trl import RSADPOConfig, RSADPOTrainer  # noqa: E402

WORDS = [f"w{i}" for i in range(40)]


def make_tokenizer():
    vocab = {tok: i for i, tok in enumerate(["<pad>", "<unk>", "</s>"] + WORDS)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>",
                                                unk_token="<unk>")


def make_dataset(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)

    def text(lo, hi):
        k = int(torch.randint(lo, hi, (1,), generator=g))
        return " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (k,), generator=g))

    rows = [(text(2, 6), " " + text(1, 7), " " + text(1, 7)) for _ in range(n)]
    return datasets.Dataset.from_dict({"prompt": [r[0] for r in rows], "chosen": [r[1] for r in rows],
                                       "rejected": [r[2] for r in rows]})


def make_models(vocab_size):
    """(policy, reference): the same tiny Llama, the policy's weights moved so the two differ."""
    cfg = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(cfg)
    policy = copy.deepcopy(ref)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return policy, ref


def config(cls, tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), use_cpu=True, bf16=False, gradient_checkpointing=False,
                report_to="none", per_device_train_batch_size=2, max_length=32, save_strategy="no",
                logging_steps=1, seed=0, learning_rate=1e-3, dataloader_num_workers=0)
    base.update(kw)
    return cls(**base)


def build(cls, cfg, tokenizer, dataset):
    policy, ref = make_models(len(tokenizer))
    return cls(model=policy, ref_model=ref, args=cfg, train_dataset=dataset, processing_class=tokenizer)


def one_batch(trainer, n_pairs=4):
    return trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(n_pairs)]))


@pytest.mark.skipif(trl.__version__.startswith("1.15."),
                    reason="TRL 1.15's own DPOTrainer (the oracle here) fails on CPU hosts with triton installed")
def test_dpo_objective_matches_trl_sigmoid_loss(tmp_path):
    tok, data = make_tokenizer(), make_dataset()
    trl_trainer = build(DPOTrainer, config(DPOConfig, tmp_path, beta=0.3), tok, data)
    rsa_trainer = build(RSADPOTrainer, config(RSADPOConfig, tmp_path, beta=0.3, objective="dpo", risk="kl"),
                        tok, data)
    batch = one_batch(trl_trainer)
    assert int(batch["completion_mask"].sum()) > 0
    with torch.no_grad():
        expected = trl_trainer.compute_loss(trl_trainer.model, batch)
        got = rsa_trainer.compute_loss(rsa_trainer.model, batch)
    assert abs(float(expected) - float(torch.log(torch.tensor(2.0)))) > 1e-3  # policy != reference
    torch.testing.assert_close(got.double(), expected.double(), rtol=1e-5, atol=1e-6)
    for key in ("logps/chosen", "logps/rejected"):  # the same sums of the policy's label log-probs
        assert rsa_trainer._metrics["train"][key][-1] == pytest.approx(trl_trainer._metrics["train"][key][-1],
                                                                       rel=1e-5, abs=1e-5)


def test_rsa2_matches_preference_loss_on_materialised_logits(tmp_path):
    tok, data = make_tokenizer(), make_dataset()
    kw = dict(objective="rsa2", risk="cvar:0.8", beta=0.2, alpha=0.7, gamma=0.9, label_smoothing=0.1)
    trainer = build(RSADPOTrainer, config(RSADPOConfig, tmp_path, **kw), tok, data)
    batch = one_batch(trainer)
    model, ref = trainer.model, trainer.ref_model

    loss = trainer.compute_loss(model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    with torch.no_grad():
        ref_logits = ref(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected, metrics = rk.preference_loss(logits, ref_logits, labels, shift=True, backend="torch", **kw)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")
    logged = trainer._metrics["train"]
    assert logged["risk/chosen"][-1] == pytest.approx(float(metrics["risk/chosen"]), rel=1e-5)
    assert logged["rewards/accuracies"][-1] == pytest.approx(float(metrics["rewards/accuracy"]))


def test_a_few_training_steps_run_and_log_trl_metrics(tmp_path):
    tok, data = make_tokenizer(), make_dataset()
    cfg = config(RSADPOConfig, tmp_path, max_steps=3, objective="rsa2", risk="erm:0.5", eval_strategy="steps",
                 eval_steps=3, per_device_eval_batch_size=2)
    policy, ref = make_models(len(tok))
    trainer = RSADPOTrainer(model=policy, ref_model=ref, args=cfg, train_dataset=data,
                            eval_dataset=make_dataset(4, seed=1), processing_class=tok)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 3
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected", "kl/chosen", "kl/rejected", "risk/chosen", "risk/rejected"):
        assert all(torch.isfinite(torch.tensor(entry[key])) for entry in logs), key
    assert all(entry["kl/chosen"] >= 0 for entry in logs)
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())
    evals = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    assert len(evals) == 1 and torch.isfinite(torch.tensor(evals[0]["eval_risk/chosen"]))
    ref_after = dict(trainer.ref_model.named_parameters())
    assert all(torch.equal(p, ref_after[n]) for n, p in make_models(len(tok))[1].named_parameters())


@pytest.mark.parametrize("field, value, message", [
    ("precompute_ref_log_probs", True, "precompute_ref_log_probs"), ("loss_type", ["ipo"], "loss_type"),
    ("use_weighting", True, "use_weighting"), ("risk", "cvar:1.5", "ALPHA|alpha"), ("objective", "ppo", "objective"),
    ("gamma", 0.0, "gamma")])
def test_config_refuses_what_the_rsa_loss_cannot_honour(tmp_path, field, value, message):
    with pytest.raises(ValueError, match=message):
        config(RSADPOConfig, tmp_path, **{field: value})


def test_trainer_refuses_a_plain_dpo_config(tmp_path):
    with pytest.raises(ValueError, match="args"):
        build(RSADPOTrainer, config(DPOConfig, tmp_path), make_tokenizer(), make_dataset(4))


def test_trainer_refuses_a_model_whose_logits_are_not_a_plain_linear_head(tmp_path):
    tok = make_tokenizer()
    policy, ref = make_models(len(tok))
    policy.config.final_logit_softcapping = 30.0  # as Gemma 2 does: logits = 30 tanh(h W^T / 30)
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        RSADPOTrainer(model=policy, ref_model=ref, args=config(RSADPOConfig, tmp_path), train_dataset=make_dataset(4),
                      processing_class=tok)
