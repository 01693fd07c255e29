"""The scripts a lent GPU runs (bench/gpu_check.sh), dry-run on the CPU under the interpreter.

A GPU is lent rarely and briefly: a script that fails on an import or an argument there
wastes the session. Each runs here at tiny sizes, as a subprocess, and must print its table.
"""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("triton")

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _dry_run(script, *args):
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--device", "cpu", "--tiny", *args],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return out.stdout


def test_gpu_bench_dry_run():
    text = _dry_run("gpu_bench.py", "--compiled-risks", "kl")  # one compilation, to keep it short
    rows = {line.split("|")[1].strip(): line.split("|") for line in text.splitlines() if line.startswith("| ")}
    for risk in ("kl", "erm:1", "cvar:0.9", "ra_dpo_cvar:0.95"):
        assert risk in rows, text
        assert rows[risk][8].strip() != "nan"                      # plain, timed on every risk
    assert rows["kl"][9].strip() != "nan" and rows["cvar:0.9"][9].strip() == "nan"  # compiled: kl only


def test_fused_kernel_check_dry_run():
    text = _dry_run("gpu_check_fused_kernel.py", "--rounds", "1", "--configs", "40x24x300:bf16")
    assert "agreement: all passed" in text
    for variant in ("chunks", "kernel", "hybrid", "logits"):
        assert f"| 40x24x300 | bf16 | {variant} |" in text


def test_quantile_sweep_dry_run():
    lines = [line for line in _dry_run("triton_quantile_sweep.py").splitlines() if " ms for N=" in line]
    assert [line.split()[0] for line in lines] == ["kl", "cvar:0.9", "cvar:0.9", "ra_dpo_cvar:0.95", "ra_dpo_cvar:0.95"]


def test_vocab_parallel_check_dry_run():
    text = _dry_run("gpu_check_vocab_parallel.py")   # two ranks over gloo, the triton slice kernels interpreted
    assert "vocabulary-parallel triton slice kernels: all passed" in text
    for rank in (0, 1):
        for dtype, risk in (("float32", "kl"), ("float32", "cvar:0.9"), ("bfloat16", "ra_dpo_cvar:0.95")):
            assert f"| {rank} | {dtype} | {risk} | 12 | 300 | True |" in text


def test_lora4bit_check_dry_run():
    pytest.importorskip("bitsandbytes")
    text = _dry_run("gpu_check_lora4bit.py")   # bitsandbytes' 4-bit layers on the CPU
    assert "lora 4bit rsa train: all passed" in text
    assert "stage helpful: quantization 4bit, steps 2" in text and "stage safe: quantization 4bit, steps 2" in text
    assert "Linear4bit layers, parameters on ['cpu']" in text


def test_gpu_check_script_is_valid_and_names_existing_scripts():
    script = ROOT / "bench" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    import re
    named = set(re.findall(r"(?<![\w/])bench/([a-z_0-9]+\.py)", script.read_text()))
    assert {"gpu_check_vocab_parallel.py", "gpu_check_lora4bit.py", "gpu_bench.py"} <= named
    assert all((ROOT / "bench" / n).exists() for n in named), named
    assert "rsa.bench.step_run" in script.read_text() and "--bf16" in script.read_text()
