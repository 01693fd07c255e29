"""Every command the README shows runs as written, or is listed here with why it cannot run.

The README's shell commands are its indented lines (continuations joined). The ones whose
inputs are committed (the tiny model, data, prompts and cost model in examples/) run here in
order, in a copy of examples/, as a user would type them after `make install`; the others
need a GPU, the network or a 7B model and must be named in NOT_RUN with the reason, so a new
command in the README cannot go untested unnoticed.
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

# Commands (their first words) that need what this machine has not: the reason is the value.
NOT_RUN = {
    "make install": "the test runs inside the environment `make install` made",
    "make test": "this is the test suite itself",
    "make demo": "10 seeds of training, about 15 minutes (tests/test_demo.py runs --quick)",
    "make bench": "the full benchmark grid (tests/test_bench_command.py runs the pieces)",
    "rsa eval --model sft=PKU-Alignment/alpaca-7b-reproduced": "7B models from the hub on a GPU",
}


def readme_commands(text: str) -> list[str]:
    """The indented (4-space) shell lines of the README, continuation lines joined."""
    commands, current, in_fence = [], "", False
    for line in text.splitlines():
        if line.startswith("```"):
            in_fence = not in_fence
            continue
        if in_fence or not line.startswith("    ") or not line.strip():
            if current:
                commands.append(current)
                current = ""
            continue
        body = line.strip().split("  #")[0].rstrip()
        current = f"{current} {body}".strip() if current else body
        if current.endswith("\\"):
            current = current[:-1].rstrip()
        else:
            commands.append(current)
            current = ""
    if current:
        commands.append(current)
    return commands


def not_run_reason(command: str) -> str | None:
    return next((why for start, why in NOT_RUN.items() if command.startswith(start)), None)


def test_every_readme_command_is_run_or_excused():
    commands = readme_commands(README.read_text())
    assert any(c.startswith("rsa train") for c in commands)
    unknown = [c for c in commands if not c.startswith("rsa ") and not not_run_reason(c)]
    assert not unknown, f"README commands neither run by this test nor excused in NOT_RUN: {unknown}"


def test_readme_rsa_commands_run_as_written(tmp_path):
    """train, merge and eval on the committed tiny files, in the README's order, in a copy."""
    shutil.copytree(ROOT / "examples", tmp_path / "examples",
                    ignore=shutil.ignore_patterns("runs", "runs_lora"))
    rsa = Path(sys.executable).with_name("rsa")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    ran = []
    for command in readme_commands(README.read_text()):
        if not command.startswith("rsa ") or not_run_reason(command):
            continue
        argv = shlex.split(command)
        proc = subprocess.run([str(rsa), *argv[1:], "--no-progress"] if argv[1] in ("train", "eval")
                              else [str(rsa), *argv[1:]], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{command}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
        ran.append(argv[1])
    assert {"train", "merge", "eval"} <= set(ran), ran
    assert (tmp_path / "out" / "psacpo" / "config.json").exists()


@pytest.mark.parametrize("name", ["fused_linear_preference_loss", "preference_loss", "token_stats"])
def test_readme_python_names_exist(name):
    import rsa_kernels as rk
    assert name in README.read_text() and callable(getattr(rk, name))
