"""QLoRA on CPUs where bitsandbytes repacks 4-bit weights for inference (AVX512-BF16).

bitsandbytes 0.50 repacks a Linear4bit's weight the first time the layer runs in eval mode on
an input that needs no gradient (our reference pass) if the layer's capability flag
``support_avx512bf16_for_cpu`` is set. Old rsa: on an output size that is not a multiple of
32 the repack asserts; on one that is, the next training forward runs gemv_4bit (no backward:
nothing reaches the layer's input) and the reference rounds differently from the policy.

The flag is forced on in every test here (the capability check patched to say yes before the
layers are built), so on an AVX2-only machine these tests still check the pure-Python part:
that rsa keeps the repack from happening and that the reference pass stops with a clear error
if it happens anyway. Only on an AVX512-BF16 CPU do they also run bitsandbytes' packed kernel
(the one whose numbers and missing backward the old code hit).
"""
from __future__ import annotations

import pytest
import torch

from rsa.errors import UserError
from rsa.lora import build_policy, repacked_4bit_layers, trainable_adapters_off
from test_trainer_common import save_tiny_model

pytest.importorskip("peft")
bnb = pytest.importorskip("bitsandbytes")

IDS = torch.tensor([[2, 5, 6, 7, 8, 9, 10, 11], [2, 13, 14, 15, 16, 17, 3, 0]])
MASK = torch.tensor([[1] * 8, [1] * 7 + [0]])
# Adapters on the first layer's attention only: the gradient that reaches them has passed back
# through every 4-bit layer above (layer 0's MLP, all of layer 1).
LORA = {"r": 2, "lora_alpha": 4, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"],
        "layers_to_transform": [0], "quantization": "4bit"}


@pytest.fixture(params=[64, 16], ids=["sizes-multiple-of-32", "sizes-not-multiple-of-32"])
def sft(request, tmp_path_factory):
    # hidden 64: every projection's output (64, 32, 128) is a multiple of 32; hidden 16: q, k, v,
    # o and down (16, 8) are not.
    return save_tiny_model(tmp_path_factory.mktemp(f"sft{request.param}") / "sft", seed=1, hidden=request.param)


def policy(folder, monkeypatch):
    monkeypatch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: True)   # Linear4bit.__init__ reads it
    torch.manual_seed(0)   # the adapter's random A
    model = build_policy(folder, [], dict(LORA), "bfloat16")
    assert model.get_base_model().model.layers[1].mlp.down_proj.__class__ is bnb.nn.Linear4bit
    return model


def reference_logits(model):
    with torch.no_grad(), trainable_adapters_off(model):
        return model(input_ids=IDS, attention_mask=MASK).logits


def training_step(model):
    """Logits and gradients (the adapters', and the input embeddings': below every 4-bit layer)
    of one training forward and backward."""
    model.train()
    embeds = model.get_input_embeddings()(IDS).detach().requires_grad_()
    logits = model(inputs_embeds=embeds, attention_mask=MASK).logits
    logits.float().logsumexp(-1).sum().backward()
    grads = {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return logits.detach(), embeds.grad, grads


def test_the_reference_pass_leaves_the_policy_exact(sft, monkeypatch):
    model = policy(sft, monkeypatch)
    assert model.training
    ref = reference_logits(model)
    assert repacked_4bit_layers(model) == []
    logits, input_grad, grads = training_step(model)
    # B = 0 at the start: the policy with its adapter on computes its reference, to the bit.
    assert torch.equal(logits, ref)
    fresh_logits, fresh_input_grad, fresh_grads = training_step(policy(sft, monkeypatch))   # no reference pass
    assert torch.equal(fresh_logits, logits)
    assert torch.equal(fresh_input_grad, input_grad) and input_grad.abs().sum() > 0
    assert grads.keys() == fresh_grads.keys() and any(".lora_B." in n for n in grads)
    # (old rsa, after a repack on an AVX512-BF16 CPU: no gradient at all reached layer 0's adapters)
    assert [n for n, g in grads.items() if g is None] == []
    for name, g in grads.items():
        assert torch.equal(g, fresh_grads[name]), name
    assert all(g.abs().sum() > 0 for n, g in grads.items() if ".lora_B." in n)
    # An evaluation-style pass (eval mode, no grad) keeps the layout too.
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS, attention_mask=MASK).logits, ref)
    assert repacked_4bit_layers(model) == []


def test_a_repack_that_happens_anyway_stops_the_reference_pass(tmp_path, monkeypatch):
    """As a bitsandbytes that ignored the flag would: the layer's forward repacks its weight (done
    here by bitsandbytes' own function, as Linear4bit.forward calls it, so that no machine needs
    the packed kernel to run this test)."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu
    model = policy(save_tiny_model(tmp_path / "sft", seed=1, hidden=64), monkeypatch)
    layer = model.get_base_model().model.layers[1].mlp.down_proj
    with pytest.raises(UserError, match=r"bitsandbytes repacked the weights of 1 4-bit layers \(.*layers\.1\.mlp"
                                        r"\.down_proj, \.\.\.\) .* no gradient"):
        with trainable_adapters_off(model):
            layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu(
                layer.weight.data, layer.weight.quant_state)
