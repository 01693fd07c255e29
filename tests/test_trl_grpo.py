"""rsa.integrations.trl's GRPO drop-in against TRL's own GRPOTrainer and rsa_kernels.reference.

Tiny Llamas built from a config, a word-level tokenizer built here: no hub access. The
reference model is saved to a temporary folder, which the policy's config names, because
TRL's GRPOTrainer loads its reference from there. Batches are real GRPO batches: TRL's
generation (transformers' generate) and reward scoring.
"""
import contextlib
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

trl = pytest.importorskip("trl", reason="the TRL integration needs the trl extra: pip install 'rsa-kernels[trl]'")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
tokenizers = pytest.importorskip("tokenizers")

from rsa_kernels import reference  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from rsa.integrations.trl import RSAGRPOConfig, RSAGRPOTrainer  # noqa: E402
from rsa.integrations.trl_grpo import exact_penalty  # noqa: E402
from test_trl_integration import make_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GROUP = 4  # completions per prompt
PROMPTS = ["w1 w2 w3", "w4 w5", "w6 w7 w8 w9", "w3", "w10 w11", "w12 w13 w14"]


def make_policy(folder: Path, vocab_size=43, bias=False):
    """The policy: the reference saved in ``folder`` (TRL loads its reference from there), moved."""
    cfg = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=64, tie_word_embeddings=False, eos_token_id=2,
                                   pad_token_id=0, bos_token_id=None)
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(cfg)
    if not (folder / "config.json").is_file():
        ref.save_pretrained(folder)
    policy = copy.deepcopy(ref)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.1 * torch.randn_like(p))
    policy.config._name_or_path = str(folder)
    return policy


def reward(completions, **kwargs):
    return [float(c.count("w1")) - 0.1 * len(c.split()) for c in completions]


def config(cls, tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", per_device_train_batch_size=8,
                num_generations=GROUP, max_completion_length=8, save_strategy="no", logging_steps=1, seed=0,
                learning_rate=1e-2, beta=0.2, temperature=0.7, max_steps=2, disable_tqdm=True,
                bf16=False)  # float32 throughout, for the comparisons (GRPOConfig's default is bf16 autocast)
    base.update(kw)
    return cls(**base)


def build(cls, cfg, tmp_path, **kw):
    data = datasets.Dataset.from_dict({"prompt": PROMPTS})
    trainer = cls(model=kw.pop("model", None) or make_policy(tmp_path / "ref"), reward_funcs=reward, args=cfg,
                  train_dataset=data, processing_class=make_tokenizer(), **kw)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop, read by the loss
    return trainer


def grpo_batch(trainer, prompts=(0, 1)):
    """One GRPO batch: GROUP sampled completions per prompt, scored, with advantages."""
    torch.manual_seed(1)
    rows = [{"prompt": PROMPTS[i]} for i in prompts for _ in range(GROUP)]
    return trainer._generate_and_score_completions(rows)


def loss_and_grads(trainer, batch):
    trainer.model.zero_grad(set_to_none=True)
    loss = trainer._compute_loss(trainer.model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def full_logits_penalty(trainer, batch, risk, ref_off=None):
    """Per-token risk from the materialised logits of both models, float64 (rsa_kernels.reference)."""
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    attn = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    width = batch["completion_ids"].size(1)
    logits = trainer.model(input_ids=ids, attention_mask=attn).logits[:, -width - 1:-1]
    with torch.no_grad(), (ref_off() if ref_off else contextlib.nullcontext()):
        ref_model = trainer.model if ref_off else trainer.ref_model
        ref_logits = ref_model(input_ids=ids, attention_mask=attn).logits[:, -width - 1:-1]
    labels = batch["completion_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    t = trainer.temperature
    return reference.token_stats(logits.double() / t, ref_logits.double() / t, labels, risk=risk)


# --------------------------------------------------------------- the penalty alone, float64

@pytest.mark.parametrize("risk", ["kl", "erm:0.7", "cvar:0.9", "ra_dpo_cvar:0.3"])
def test_exact_penalty_equals_full_vocabulary_reference_float64(risk):
    torch.manual_seed(3)
    b, t, h, v, temp = 3, 5, 16, 67, 0.7
    hidden = torch.randn(b, t, h, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(v, dtype=torch.float64, requires_grad=True)
    ref_hidden, ref_weight, ref_bias = hidden.detach() + 0.3 * torch.randn(b, t, h, dtype=torch.float64), \
        weight.detach() + 0.3 * torch.randn(v, h, dtype=torch.float64), torch.randn(v, dtype=torch.float64)
    labels = torch.randint(0, v, (b, t))
    labels[0, 3:] = -100  # padding
    labels[2, 0] = -100
    got = exact_penalty(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, risk=risk, temperature=temp)
    want = reference.token_stats((hidden @ weight.T + bias) / temp, (ref_hidden @ ref_weight.T + ref_bias) / temp,
                                 labels, risk=risk)
    upstream = torch.randn(b, t, dtype=torch.float64)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    grads = torch.autograd.grad((got.risk * upstream).sum() + got.kl.sum(), (hidden, weight, bias))
    wants = torch.autograd.grad((want[3] * upstream).sum() + want[2].sum(), (hidden, weight, bias))
    for g, w in zip(grads, wants):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-11)
    assert (got.kl[labels == -100] == 0).all() and (got.kl[labels != -100] > 0).all()


# --------------------------------------------------------------- "k3": TRL exactly

def test_k3_equals_trl_grpo_trainer_loss_and_gradients(tmp_path):
    assert RSAGRPOConfig(output_dir=str(tmp_path), use_cpu=True).use_bias_correction_kl == \
        GRPOConfig(output_dir=str(tmp_path), use_cpu=True).use_bias_correction_kl  # TRL's default kept
    ours = build(RSAGRPOTrainer, config(RSAGRPOConfig, tmp_path, kl_estimator="k3"), tmp_path)
    trls = build(GRPOTrainer, config(GRPOConfig, tmp_path), tmp_path)
    batch = grpo_batch(trls)
    want_loss, want_grads = loss_and_grads(trls, batch)
    got_loss, got_grads = loss_and_grads(ours, batch)
    assert torch.equal(got_loss, want_loss) and want_loss != 0
    assert got_grads.keys() == want_grads.keys() and "lm_head.weight" in got_grads
    for name in want_grads:
        assert torch.equal(got_grads[name], want_grads[name]), name
    assert ours._metrics["train"]["kl"] == trls._metrics["train"]["kl"]


LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "luspo", "sapo", "vespo"]


def test_penalty_is_reduced_as_trl_reduces_its_kl_term(tmp_path):
    """For every loss type: TRL's loss with beta minus without = beta * (our reduction of TRL's own k3)."""
    trls = build(GRPOTrainer, config(GRPOConfig, tmp_path, use_bias_correction_kl=False), tmp_path)
    batch = grpo_batch(trls)
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    attn = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    beta = trls.beta
    with torch.no_grad():
        logps, _, _ = trls._get_per_token_logps_and_entropies(trls.model, ids, attn, batch["completion_ids"].size(1))
    d = batch["ref_per_token_logps"] - logps
    k3 = torch.exp(d) - d - 1
    assert set(LOSS_TYPES) >= {"grpo", trls.args.loss_type}
    for loss_type in LOSS_TYPES:
        trls.loss_type = loss_type
        with torch.no_grad():
            trls.beta = beta
            with_kl = trls._compute_loss(trls.model, batch)
            trls.beta = 0.0
            without = trls._compute_loss(trls.model, batch)
        term, _ = RSAGRPOTrainer._reduce_like_loss(trls, k3, batch["completion_mask"], batch, "train")
        torch.testing.assert_close(with_kl - without, beta * term, rtol=1e-5, atol=1e-7, msg=loss_type)
        assert term > 0, loss_type


# --------------------------------------------------------------- "exact" in the trainer

def exact_oracle(trainer, batch, risk, ref_off=None):
    """TRL's loss without its KL term plus beta * (the float64 full-logits penalty, reduced as TRL does)."""
    beta, trainer.beta = trainer.beta, 0.0
    try:
        loss = GRPOTrainer._compute_loss(trainer, trainer.model, batch)
    finally:
        trainer.beta = beta
    stats = full_logits_penalty(trainer, batch, risk, ref_off)
    term, _ = trainer._reduce_like_loss(stats[3], batch["completion_mask"], batch, "train")
    return loss + beta * term.float(), stats


@pytest.mark.parametrize("risk,loss_type,entropy_coef", [("kl", "grpo", 0.0), ("cvar:0.9", "dapo", 0.0),
                                                      ("erm:0.5", "bnpo", 0.0), ("kl", "grpo", 0.05)])
def test_exact_loss_and_gradients_equal_full_logits_oracle(tmp_path, risk, loss_type, entropy_coef):
    trainer = build(RSAGRPOTrainer, config(RSAGRPOConfig, tmp_path, kl_estimator="exact", risk=risk,
                                           loss_type=loss_type, entropy_coef=entropy_coef), tmp_path)
    batch = grpo_batch(trainer)
    assert "ref_per_token_logps" not in batch  # TRL's reference log-probs are not computed for nothing
    got_loss, got_grads = loss_and_grads(trainer, batch)
    trainer.model.zero_grad(set_to_none=True)
    want_loss, stats = exact_oracle(trainer, batch, risk)
    want_loss.backward()
    torch.testing.assert_close(got_loss, want_loss.detach(), rtol=1e-5, atol=1e-6)
    for name, p in trainer.model.named_parameters():
        torch.testing.assert_close(got_grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)
    mask = batch["completion_mask"].bool()
    assert trainer._metrics["train"]["kl"][-1] == pytest.approx(stats[2][mask].mean().item(), rel=1e-5)
    if entropy_coef:  # TRL's policy_loss (logged with an entropy bonus) includes its KL term; ours the penalty
        ours, oracle_without_penalty = trainer._metrics["train"]["policy_loss"][-2:]
        _, value = trainer._reduce_like_loss(stats[3], batch["completion_mask"], batch, "train")
        assert ours == pytest.approx(oracle_without_penalty + trainer.beta * value.item(), rel=1e-5)
    if risk != "kl":
        assert trainer._metrics["train"]["risk"][-1] == pytest.approx(stats[3][mask].mean().item(), rel=1e-5)
        assert trainer._metrics["train"]["risk"][-1] > trainer._metrics["train"]["kl"][-1]


@pytest.mark.parametrize("risk", ["kl", "cvar:0.9"])
def test_tiny_grpo_run_with_exact_penalty(tmp_path, risk):
    # bf16=True: TRL's default, so the forwards run under bf16 autocast (on the CPU too)
    trainer = build(RSAGRPOTrainer, config(RSAGRPOConfig, tmp_path, kl_estimator="exact", risk=risk,
                                           max_steps=2, bf16=True), tmp_path)
    before = trainer.model.lm_head.weight.detach().clone()
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in logs)
    assert all(h["kl"] > 0 for h in logs) and ("risk" in logs[0]) == (risk != "kl")
    assert not torch.equal(before, trainer.model.lm_head.weight)


# --------------------------------------------------------------- PEFT: reference = adapter off

def test_peft_reference_is_the_adapter_switched_off(tmp_path):
    peft = pytest.importorskip("peft")
    base = make_policy(tmp_path / "ref")
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0,
                           task_type="CAUSAL_LM")
    trainer = build(RSAGRPOTrainer, config(RSAGRPOConfig, tmp_path, kl_estimator="exact", risk="cvar:0.9"),
                    tmp_path, model=base, peft_config=lora)
    assert trainer.ref_model is None
    batch = grpo_batch(trainer)
    with torch.no_grad():  # a fresh adapter is the identity: the penalty starts at 0
        assert trainer._compute_loss(trainer.model, batch) is not None
    assert trainer._metrics["train"]["kl"][-1] == pytest.approx(0.0, abs=1e-7)
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    got_loss, got_grads = loss_and_grads(trainer, batch)
    trainer.model.zero_grad(set_to_none=True)
    want_loss, _ = exact_oracle(trainer, batch, "cvar:0.9", ref_off=trainer.model.disable_adapter)
    want_loss.backward()
    torch.testing.assert_close(got_loss, want_loss.detach(), rtol=1e-5, atol=1e-6)
    assert any("lora_B" in n for n in got_grads)
    for name, p in trainer.model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(got_grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert trainer._metrics["train"]["kl"][-1] > 1e-4


# --------------------------------------------------------------- refusals

@pytest.mark.parametrize("fields,named", [
    (dict(kl_estimator="k2"), "kl_estimator"),
    (dict(risk="cvar:0.9"), "risk"),  # with k3
    (dict(kl_estimator="exact", risk="cvar:1.5"), "risk"),
    (dict(kl_estimator="exact", beta=0.0), "beta"),
    (dict(kl_estimator="exact", use_bias_correction_kl=True), "use_bias_correction_kl"),
])
def test_refused_combinations_name_the_field(tmp_path, fields, named):
    with pytest.raises(ValueError, match=named):
        config(RSAGRPOConfig, tmp_path, **fields)


def test_trainer_refuses_other_configs_and_late_changes(tmp_path):
    with pytest.raises(ValueError, match="RSAGRPOConfig"):
        build(RSAGRPOTrainer, config(GRPOConfig, tmp_path), tmp_path)
    cfg = config(RSAGRPOConfig, tmp_path, kl_estimator="exact")
    cfg.use_bias_correction_kl = True
    with pytest.raises(ValueError, match="use_bias_correction_kl"):
        build(RSAGRPOTrainer, cfg, tmp_path)


# --------------------------------------------------------------- two processes = one

@pytest.mark.slow  # about 20 s idle (torchrun starting two Pythons with torch, transformers, TRL)
def test_two_processes_equal_one_on_the_same_global_batch(tmp_path):
    trainer = build(RSAGRPOTrainer, config(RSAGRPOConfig, tmp_path, kl_estimator="exact", risk="cvar:0.9"),
                    tmp_path)
    batch = grpo_batch(trainer)
    torch.save({k: v for k, v in batch.items() if torch.is_tensor(v)}, tmp_path / "batch.pt")
    torch.save(trainer.model.state_dict(), tmp_path / "policy.pt")
    want_loss, want_grads = loss_and_grads(trainer, batch)
    want_kl = trainer._metrics["train"]["kl"][-1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests" / "grpo_ddp_worker.py"), str(tmp_path)]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = torch.load(tmp_path / "ddp.pt")
    # each process's loss is the mean over its half of the sequences; DDP averages the gradients
    torch.testing.assert_close(got["loss"], want_loss, rtol=1e-5, atol=1e-6)
    assert got["grads"].keys() == want_grads.keys()
    for name, g in want_grads.items():
        torch.testing.assert_close(got["grads"][name], g, rtol=1e-4, atol=1e-6, msg=name)
    assert json.loads((tmp_path / "kl.json").read_text()) == pytest.approx([want_kl] * 2, rel=1e-5)
