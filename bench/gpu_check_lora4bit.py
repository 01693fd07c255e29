"""A tiny `rsa train` with 4-bit LoRA stages on CUDA (bench/gpu_check.sh).

    python bench/gpu_check_lora4bit.py                    # on CUDA
    python bench/gpu_check_lora4bit.py --device cpu --tiny    # the dry run (bitsandbytes' CPU 4-bit)

examples/tiny_lora.yaml (the committed tiny model and data) with `lora.quantization: 4bit`,
bf16 weights, 2 steps per stage, run by the `rsa train` command line in a subprocess, as a user
runs it. Checks each stage's stage.json (4bit, the steps done, finite losses) and that the
quantized layers were bitsandbytes' Linear4bit on the device asked for. Exit status 1 if not.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--tiny", action="store_true", help="accepted for the dry run (the run is tiny anyway)")
    p.add_argument("--no-4bit", action="store_true", help="LoRA on bf16 weights (where bitsandbytes is missing)")
    a = p.parse_args()
    quant = None if a.no_4bit else "4bit"
    import yaml

    cfg = yaml.safe_load((ROOT / "examples" / "tiny_lora.yaml").read_text())
    cfg["model"] = str(ROOT / "examples" / "sft")
    cfg["defaults"]["lora"]["quantization"] = quant
    cfg["defaults"].update(model_dtype="bfloat16", use_cpu=a.device == "cpu", save_steps=100)
    for stage in cfg["stages"]:
        stage["data"]["path"] = str(ROOT / "examples" / stage["data"]["path"])
        stage["max_steps"] = 2
    failed = []
    with tempfile.TemporaryDirectory() as tmp:
        cfg["output_dir"] = f"{tmp}/runs"
        (Path(tmp) / "q4.yaml").write_text(yaml.safe_dump(cfg))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        t0 = time.time()
        proc = subprocess.run([sys.executable, "-m", "rsa.cli", "train", f"{tmp}/q4.yaml"], env=env, cwd=tmp,
                              capture_output=True, text=True, timeout=600)
        print(proc.stdout[-3000:] + proc.stderr[-3000:])
        print(f"rsa train: exit {proc.returncode} in {time.time() - t0:.0f} s")
        if proc.returncode != 0:
            failed.append(f"rsa train exited with {proc.returncode}")
        for stage in cfg["stages"]:
            path = Path(tmp) / "runs" / stage["name"] / "stage.json"
            if not path.exists():
                failed.append(f"{stage['name']}: no stage.json")
                continue
            rec = json.loads(path.read_text())
            loss = rec["final_metrics"].get("loss", rec["final_metrics"].get("train_loss"))
            print(f"stage {stage['name']}: quantization {rec['lora']['quantization']}, steps {rec['steps']}, "
                  f"loss {loss}, trainable {rec.get('trainable_parameters')} of {rec.get('parameters')}")
            if rec["lora"]["quantization"] != quant or rec["steps"] != 2 or not math.isfinite(float(loss)):
                failed.append(f"{stage['name']}: {rec['lora']['quantization']}, {rec['steps']} steps, loss {loss}")
        if not failed:
            failed += _check_layers(Path(tmp) / "runs" / cfg["stages"][-1]["name"], a.device, quant)
    print(f"lora {quant or 'bf16'} rsa train: " + ("all passed" if not failed else "FAILED: " + "; ".join(failed)))
    return 1 if failed else 0


def _check_layers(stage_dir: Path, device: str, quant) -> list[str]:
    """The last stage loaded as `rsa eval` loads it: 4-bit layers, on the device asked for."""
    import bitsandbytes as bnb
    import torch

    from rsa.lora import load_lora_stage

    model = load_lora_stage(stage_dir, device=device)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    where = {p.device.type for p in model.parameters()}
    print(f"reloaded {stage_dir.name}: {len(layers)} Linear4bit layers, parameters on {sorted(where)}")
    out = [] if layers or quant is None else ["no Linear4bit layer after reloading the stage"]
    if device == "cuda" and where != {"cuda"}:
        out.append(f"parameters on {sorted(where)}, not cuda")
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


if __name__ == "__main__":
    sys.exit(main())
