"""Peak RSS and trainable parameters of one `rsa train` stage, full weights against LoRA.

    python bench/lora_memory.py                          # the committed tiny model (examples/sft)
    python bench/lora_memory.py --hidden 1024 --layers 8 # a random Llama of that size, same tokenizer

Each run is a fresh process that trains one stage (examples/helpful.jsonl, the same steps,
batch and settings as examples/tiny.yaml apart from `lora:`), so its peak resident set size
is that stage's alone. Printed: the process's peak RSS after its imports, at the end, the
difference (what training added), and the stage's trainable and total parameters (its
stage.json). CPU, float32, Linux (/proc/self/status); the figures in docs/trainer.md were
made with this script.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
EXAMPLES = HERE.parent / "examples"
LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                    "down_proj"]}

# VmHWM: this process's own peak RSS (ru_maxrss would also count the parent's, kept across exec).
CHILD = """
import json, re, sys
def peak_kib():
    return int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))
import torch, transformers, peft          # the imports every stage pays for, before the baseline
from rsa.stepwise import run_stages
before = peak_kib()
torch.set_num_threads(1)
run_stages(sys.argv[1], progress=False)
print(json.dumps({"imports_kib": before, "peak_kib": peak_kib()}))
"""


def make_model(folder: Path, hidden: int, layers: int) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    tok = AutoTokenizer.from_pretrained(str(EXAMPLES / "sft"))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=int(2.75 * hidden),
                      num_hidden_layers=layers, num_attention_heads=max(2, hidden // 64),
                      num_key_value_heads=max(2, hidden // 64), max_position_embeddings=128,
                      tie_word_embeddings=False, bos_token_id=2, eos_token_id=3, pad_token_id=0)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def run(work: Path, model: Path, mode: str, steps: int, batch: int) -> dict:
    defaults = yaml.safe_load((EXAMPLES / "tiny.yaml").read_text())["defaults"]
    defaults.update(per_device_train_batch_size=batch, save_strategy="no", max_steps=steps)
    if mode == "lora":
        defaults["lora"] = LORA
    cfg = {"model": str(model), "output_dir": str(work / mode), "defaults": defaults,
           "stages": [{"name": "helpful", "data": str(EXAMPLES / "helpful.jsonl")}]}
    path = work / f"{mode}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(HERE.parent), "OMP_NUM_THREADS": "1"})
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    rss = json.loads(proc.stdout.strip().splitlines()[-1])
    stage = json.loads((work / mode / "helpful" / "stage.json").read_text())
    return {**rss, "trainable": stage["trainable_parameters"], "parameters": stage["parameters"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, help="hidden size of a random Llama (default: examples/sft)")
    parser.add_argument("--layers", type=int, default=8, help="its decoder layers (with --hidden)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2, help="pairs per step")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = make_model(work / "sft", args.hidden, args.layers) if args.hidden else EXAMPLES / "sft"
        rows = {mode: run(work, model, mode, args.steps, args.batch) for mode in ("full", "lora")}
    name = f"Llama hidden {args.hidden}, {args.layers} layers" if args.hidden else "tiny (examples/sft)"
    print(f"{name}, {args.steps} steps of {args.batch} pairs, float32, CPU; LoRA r=4 on all 7 linear layers")
    print("| stage | trainable / all parameters | peak RSS after imports | peak RSS | added by training |")
    print("|---|---|---|---|---|")
    for mode, r in rows.items():
        mib = lambda kib: f"{kib / 1024:.0f} MiB"  # noqa: E731
        print(f"| {mode} | {r['trainable']:,} / {r['parameters']:,} | {mib(r['imports_kib'])} | "
              f"{mib(r['peak_kib'])} | {mib(r['peak_kib'] - r['imports_kib'])} |")


if __name__ == "__main__":
    main()
