"""rsa.eval.memory: the parameter count of real models, the measured peak of a real `rsa eval` run
(bench/eval_memory.py, CPU resident set) within 20% of the formula, and the 7B figures docs/eval.md
quotes."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from rsa.eval.memory import GIB, Shape, eval_peak

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.mark.parametrize("kv_heads, head_dim, tied", [(4, None, False), (2, 24, True)])
def test_shape_counts_the_parameters_of_real_models(kv_heads, head_dim, tied):
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=kv_heads, head_dim=head_dim, tie_word_embeddings=tied, num_labels=3)
    for cls, classifier in ((LlamaForCausalLM, False), (LlamaForSequenceClassification, True)):
        model = cls(cfg)
        assert Shape.of_config(model.config, classifier).params == sum(p.numel() for p in model.parameters())


def test_formula_predicts_the_measured_peak_of_a_run_within_20_percent():
    """One batch of a real run_eval (model, reference, model scorer; vocabulary 128256) in a fresh process."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pytest.skip("the peak resident set cannot be reset here (/proc/self/clear_refs)")
    sys.path.insert(0, str(BENCH))
    try:
        import eval_memory
    finally:
        sys.path.remove(str(BENCH))
    r = eval_memory.run_child("vocab")
    assert 0.8 <= r["ratio"] <= 1.2, r
    assert r["measured_mib"] > 150   # the weights and the vocabulary working set, not the interpreter's noise


def test_7b_fits_one_80gb_gpu_in_bfloat16_only():
    """docs/eval.md: 7B layers with vocabulary 128256, a reference and two 7B scorers, batch 16."""
    lm = Shape(vocab=128256, hidden=4096, layers=32, heads=32, kv_heads=32, intermediate=11008)
    scorer = Shape(vocab=128256, hidden=4096, layers=32, heads=32, kv_heads=32, intermediate=11008, labels=1)
    peak = {d: eval_peak(lm, lm, (scorer, scorer), batch=16, prompt_len=512, max_new_tokens=256, dtype=d)
            for d in ("bfloat16", "float32")}
    # An 80 GB GPU has 80 GiB; 5 GiB left for the CUDA context and the allocator's fragmentation.
    assert peak["bfloat16"]["peak"] < 75 * GIB and peak["float32"]["peak"] > 80 * GIB
    assert peak["bfloat16"]["kv_cache"] == 2 * (2 * 32 * 4096 * 2 * 16 * 768)
    assert peak["bfloat16"]["decode_step"] < 0.1 * GIB    # last-position logits only
    # The step's vocabulary working set is tensors of batch x V, never batch x length x V.
    long = eval_peak(lm, lm, (), batch=16, prompt_len=4096, max_new_tokens=2048, dtype="bfloat16")
    assert long["decode_step"] == peak["bfloat16"]["decode_step"]
