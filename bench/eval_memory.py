"""Peak memory of a real `rsa eval` run against the formula of rsa.eval.memory.

    python bench/eval_memory.py              # both tiny cases, a fresh process each, then the 7B table
    python bench/eval_memory.py --table      # the 7B table of docs/eval.md only
    python bench/eval_memory.py --case vocab --child   # one measurement; prints one JSON object

A case builds tiny Llama models (the model, a reference, a classifier as the cost scorer) in a
temporary folder (bfloat16), then runs rsa.eval.run_eval on one batch on the CPU (--dtype float32, one thread)
and reads the process's peak resident set (VmHWM, reset through /proc/self/clear_refs) above
its resident set just before: the models' loading, sampling with the KL, scoring and the
report. ``predicted`` is rsa.eval.memory.eval_peak for the same shapes; glibc returns every
large block to the system on free (rsa.bench.measure.MALLOC_ENV), so the resident set follows
what is allocated. The cases: ``vocab`` (vocabulary 128256, tiny layers: the weights and
the per-step vocabulary working set dominate) and ``sequence`` (vocabulary 512, wider layers,
256-token prompts: the key/value caches and the layer transients dominate).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CASES = {   # Llama shapes, batch, prompt tokens (BOS included), max new tokens
    "vocab": dict(vocab=128256, hidden=64, intermediate=128, layers=2, heads=2, kv_heads=1, batch=16, prompt=32,
                  new=16),
    "sequence": dict(vocab=512, hidden=512, intermediate=1376, layers=4, heads=8, kv_heads=8, batch=16, prompt=256,
                     new=64),
}
MIB = 2**20


def save_models(folder: Path, c: dict) -> None:
    """Model, reference and cost classifier folders with a word-level tokenizer (at most 1024 words)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, PreTrainedTokenizerFast

    words = ["<pad>", "<unk>", "<s>", "</s>"] + [f"t{i}" for i in range(4, min(c["vocab"], 1024))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>", model_max_length=4096)
    cfg = dict(vocab_size=c["vocab"], hidden_size=c["hidden"], intermediate_size=c["intermediate"],
               num_hidden_layers=c["layers"], num_attention_heads=c["heads"], num_key_value_heads=c["kv_heads"],
               max_position_embeddings=1024, tie_word_embeddings=False, bos_token_id=2, eos_token_id=3, pad_token_id=0)
    for name, seed, cls, extra in (("model", 0, LlamaForCausalLM, {}), ("ref", 1, LlamaForCausalLM, {}),
                                   ("cost", 2, LlamaForSequenceClassification, {"num_labels": 1})):
        torch.manual_seed(seed)
        # Saved in bfloat16 and loaded as float32 (--dtype): every weight is converted into
        # memory, as a GPU run copies it to the device, rather than mapped from the file and
        # resident only where a page was read.
        model = cls(LlamaConfig(**cfg, **extra)).to(torch.bfloat16)
        model.save_pretrained(folder / name)
        tok.save_pretrained(folder / name)
        del model
    prompt = " ".join(f"t{4 + i % 50}" for i in range(c["prompt"] - 1))   # + BOS: c["prompt"] tokens
    (folder / "prompts.jsonl").write_text(json.dumps({"prompt": prompt}) + "\n")


def status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(case: str, temperature: float = 0.7, top_p: float = 0.9) -> dict:
    """One case in this process (start it fresh, with MALLOC_ENV): measured and predicted peaks."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    from transformers import AutoConfig

    from rsa.eval import EvalSettings, run_eval
    from rsa.eval.memory import Shape, eval_peak

    torch.set_num_threads(1)
    c = CASES[case]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        save_models(tmp, c)
        plt.close(plt.figure())           # matplotlib's first figure, outside the measurement
        gc.collect()
        settings = EvalSettings(models={"model": str(tmp / "model")}, prompts=str(tmp / "prompts.jsonl"),
                                cost=str(tmp / "cost"), reference=str(tmp / "ref"), samples=c["batch"],
                                max_new_tokens=c["new"], temperature=temperature, top_p=top_p,
                                batch_size=c["batch"], seed=0, device="cpu", dtype="float32")
        base = status_bytes("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")                  # VmHWM := VmRSS
        run_eval(settings, tmp / "out", progress=False)
        measured = status_bytes("VmHWM") - base
        lm = Shape.of_config(AutoConfig.from_pretrained(tmp / "model"))
        scorer = Shape.of_config(AutoConfig.from_pretrained(tmp / "cost"), classifier=True)
    parts = eval_peak(lm, lm, (scorer,), batch=c["batch"], prompt_len=c["prompt"], max_new_tokens=c["new"],
                      dtype="float32")
    return {"case": case, **c, "temperature": temperature, "top_p": top_p, "measured_mib": measured / MIB,
            "predicted_mib": parts["peak"] / MIB, "ratio": parts["peak"] / measured,
            "components_mib": {k: v / MIB for k, v in parts.items()}}


def run_child(case: str) -> dict:
    from rsa.bench.measure import MALLOC_ENV
    env = {**os.environ, **MALLOC_ENV, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, __file__, "--case", case, "--child"], env=env, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def table_7b() -> str:
    """docs/eval.md's table: 7B Llama-2 layers with vocabulary 128256, a reference and two 7B scorers."""
    from rsa.eval.memory import GIB, Shape, eval_peak

    lm = Shape(vocab=128256, hidden=4096, layers=32, heads=32, kv_heads=32, intermediate=11008)
    scorer = Shape(vocab=128256, hidden=4096, layers=32, heads=32, kv_heads=32, intermediate=11008, labels=1)
    rows = []
    for dtype in ("bfloat16", "float32"):
        parts = eval_peak(lm, lm, (scorer, scorer), batch=16, prompt_len=512, max_new_tokens=256, dtype=dtype)
        rows.append((dtype, parts))
    names = list(rows[0][1])
    lines = ["| component | " + " | ".join(f"{d} (GiB)" for d, _ in rows) + " |", "|---|" + "---:|" * len(rows)]
    lines += [f"| {n} | " + " | ".join(f"{p[n] / GIB:.2f}" for _, p in rows) + " |" for n in names]
    return (f"model {lm.params / 1e9:.2f}B parameters, scorer {scorer.params / 1e9:.2f}B; batch 16, prompts of 512 "
            "tokens, 256 new tokens\n" + "\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", choices=sorted(CASES))
    parser.add_argument("--child", action="store_true", help="measure in this process and print JSON")
    parser.add_argument("--table", action="store_true", help="print only the 7B table")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.case)))
        return
    if not args.table:
        for case in [args.case] if args.case else list(CASES):
            r = run_child(case)
            print(f"{case}: measured {r['measured_mib']:.1f} MiB, predicted {r['predicted_mib']:.1f} MiB "
                  f"(predicted / measured {r['ratio']:.3f}); components (MiB): "
                  + ", ".join(f"{k} {v:.1f}" for k, v in r["components_mib"].items()))
    print(table_7b())


if __name__ == "__main__":
    main()
