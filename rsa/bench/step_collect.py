"""Run the training-step comparison (rsa/bench/step_run.py) in a subprocess for `rsa bench --train`.

A subprocess of its own: it starts with glibc's MALLOC_ENV (large blocks returned at once,
so the resident set follows each step), and the heavy imports it forks its contenders from
(TRL, Liger, DeepSpeed) never enter the `rsa bench` process.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from .measure import MALLOC_ENV

REPO = Path(__file__).resolve().parents[2]


def run_train_step(out, mode: str, device: str, threads: int, command: str | None = None, log=print) -> dict:
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    path, log_path = out / "step.json", out / "step.log"
    path.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "rsa.bench.step_run", str(path), "--mode", mode, "--device", device,
           "--threads", str(threads)]
    if device.startswith("cuda"):
        cmd.append("--bf16")  # on a GPU, as one trains there: bf16 autocast, float32 weights
    env = {**os.environ, **MALLOC_ENV,
           "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    log(f"rsa bench: training step ({mode}) on {device}: $ {' '.join(cmd)}   (log: {log_path})")
    with open(log_path, "w") as f:
        rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if not path.exists():
        raise RuntimeError(f"the training-step comparison wrote no results (exit {rc}); see {log_path}")
    result = json.loads(path.read_text())
    result["command"] = command
    return result
