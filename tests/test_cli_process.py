"""The `rsa` program as its own process (rsa.optional): a mistake is exactly one line on stderr
(no warning from a library before it), no code is fetched from the hub, and PEFT, bitsandbytes
and DeepSpeed are imported only by a config that uses them."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rsa.commands.train import unused_packages

ROOT = Path(__file__).resolve().parents[1]
OPTIONAL = ("peft", "bitsandbytes", "deepspeed", "kernels")
# Runs `rsa ARGS...` as the program does (rsa.cli.main() reading sys.argv), then reports which of
# OPTIONAL were imported (a module object in sys.modules, the package or any submodule).
PROBE = f"""
import json, sys
sys.argv = ["rsa", *sys.argv[1:]]
from rsa.cli import main
try:
    rc = main()
except SystemExit as stop:
    rc = stop.code
loaded = sorted({{m.split(".")[0] for m, v in sys.modules.items() if v is not None}} & set({OPTIONAL!r}))
print(json.dumps({{"rc": rc, "loaded": loaded}}))
"""


def rsa(args, cwd, probe=False):
    cmd = [sys.executable, "-c", PROBE, *args] if probe else [sys.executable, "-m", "rsa.cli", *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("USE_HUB_KERNELS", None)
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600, env=env)


def test_a_missing_config_is_one_line_and_status_2(tmp_path):
    proc = rsa(["train", "missing.yaml"], tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == ["rsa train: error: config: no such file 'missing.yaml'"], proc.stderr


@pytest.mark.parametrize("args, message", [
    (["merge", "a", "b", "--weight", "0.5", "--out", "o"], "rsa merge: error: a: no such model folder 'a'"),
    (["eval", "--model", "m", "--prompts", "p.jsonl", "--cost", "c"], "rsa eval: error: --prompts: no such file 'p.jsonl'"),
    (["demo", "--seeds", "0"], "rsa demo: error: --seeds must be at least 1, got 0"),
    (["bench", "--threads", "x"], "rsa bench: error: --threads must be 'auto' or a positive integer, got 'x'"),
    (["bench", "--device", "tpu"], "rsa bench: error: --device must be 'auto', 'cpu' or 'cuda[:K]', got 'tpu'"),
], ids=["merge", "eval", "demo", "bench-threads", "bench-device"])
def test_other_mistakes_are_one_line(tmp_path, args, message):
    proc = rsa(args, tmp_path)
    assert proc.returncode == 2 and proc.stderr.splitlines() == [message], proc.stderr


def test_malformed_yaml_is_one_line(tmp_path):
    (tmp_path / "c.yaml").write_text("model: [unclosed\n")
    proc = rsa(["train", "c.yaml"], tmp_path)
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("rsa train: error: config: 'c.yaml' is not valid YAML")


def test_a_4bit_config_error_is_one_line(tmp_path):
    """The config check imports PEFT, and PEFT bitsandbytes: on a CPU with AVX512-BF16 that import
    tried to fetch a kernel from the hub and printed a warning line first."""
    cfg = {"model": "sft", "output_dir": "runs",
           "defaults": {"lora": {"r": 4, "quantization": "4bit", "dropout": 0.1}},
           "stages": [{"name": "s", "data": "d.jsonl"}]}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    proc = rsa(["train", "c.yaml"], tmp_path, probe=True)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("rsa train: error: c.yaml: defaults.lora: unknown key 'dropout'")
    report = json.loads(proc.stdout.splitlines()[-1])
    assert report["rc"] == 2 and "kernels" not in report["loaded"] and "peft" in report["loaded"]


@pytest.mark.parametrize("name, lora, want", [
    ("tiny.yaml", None, []),                              # full weights: none of them
    ("tiny_lora.yaml", {}, ["peft"]),                      # LoRA: PEFT, not bitsandbytes
    ("tiny_lora.yaml", {"quantization": "4bit"}, ["bitsandbytes", "peft"]),
], ids=["full", "lora", "qlora"])
def test_optional_packages_only_where_the_config_uses_them(tmp_path, name, lora, want):
    for item in ("sft", "helpful.jsonl", "pku.jsonl"):
        copy = shutil.copytree if (ROOT / "examples" / item).is_dir() else shutil.copy
        copy(ROOT / "examples" / item, tmp_path / item)
    cfg = yaml.safe_load((ROOT / "examples" / name).read_text())
    for stage in cfg["stages"]:
        stage["max_steps"] = 1
    if lora:
        cfg["defaults"]["lora"].update(lora)
        cfg["defaults"]["model_dtype"] = "bfloat16"
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    proc = rsa(["train", "c.yaml", "--no-progress"], tmp_path, probe=True)
    report = json.loads(proc.stdout.splitlines()[-1])
    assert report["rc"] == 0, proc.stderr[-3000:]
    assert report["loaded"] == want   # and never `kernels`, the hub's kernel downloader
    assert "gemm_4bit_forward" not in proc.stderr and "kernels-community" not in proc.stderr
    assert sorted(p.name for p in (tmp_path / cfg["output_dir"]).iterdir()) == ["helpful", "safe"]


def test_which_packages_a_config_leaves_out(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    stages = [{"name": "a"}, {"name": "b"}]
    assert unused_packages({"stages": stages}) == ["peft", "bitsandbytes", "deepspeed"]
    assert unused_packages({"defaults": {"lora": {"r": 4}}, "stages": stages}) == ["bitsandbytes", "deepspeed"]
    assert unused_packages({"stages": [{"name": "a", "lora": {"quantization": "4bit"}}]}) == ["deepspeed"]
    assert unused_packages({"defaults": {"deepspeed": "ds.json"}, "stages": stages}) == ["peft", "bitsandbytes"]
    assert unused_packages({"stages": [{"name": "a", "lora": "r4"}]}) == ["deepspeed"]   # load_config refuses it
    for malformed in (None, [], {"stages": "x"}, {"defaults": 3, "stages": stages}):
        assert unused_packages(malformed) == []
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert unused_packages({"stages": stages}) == ["peft", "bitsandbytes"]
