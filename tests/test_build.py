"""The C++ sources build beyond this machine: the portable level compiles for aarch64 with
Debian's cross compiler (g++-aarch64-linux-gnu; skipped where it is absent), with the flags
rsa_kernels.extension gives that level and torch's headers (architecture-neutral; this
Python's headers stand in for an aarch64 Python's, which differ only in pyconfig.h sizes that
are the same on both 64-bit targets)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch
from torch.utils.cpp_extension import include_paths

from rsa_kernels import extension

ROOT = Path(__file__).resolve().parent.parent
CROSS = "aarch64-linux-gnu-g++"


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which(CROSS), reason=f"no {CROSS} (apt-get install g++-aarch64-linux-gnu)")
@pytest.mark.parametrize("source", extension.SOURCES)
def test_portable_level_compiles_for_aarch64(source, tmp_path):
    includes = [f"-isystem{p}" for p in include_paths()] + [f"-isystem{sysconfig.get_paths()['include']}"]
    obj = tmp_path / (source + ".o")
    cmd = [CROSS, "-c", str(ROOT / "csrc" / source), "-o", str(obj), "-fPIC", "-std=c++20",
           "-DTORCH_EXTENSION_NAME=_C_portable", "-DTORCH_API_INCLUDE_EXTENSION_H", *includes,
           *extension.compile_args("portable", torch.__version__)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "error" not in proc.stderr
    header = obj.read_bytes()[:20]
    assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == 183  # EM_AARCH64
    assert os.path.getsize(obj) > 10_000


def test_level_choice(monkeypatch):
    """RSA_CPU_ISA forces a level and refuses an unknown one or one the CPU cannot run; by
    default the highest level both the CPU and torch's kernels use (ATEN_CPU_CAPABILITY caps)."""
    monkeypatch.setattr(extension, "X86", True)
    monkeypatch.setattr(extension, "runnable_levels", lambda: ["portable", "avx2"])
    monkeypatch.setenv(extension.ENV, "avx512")
    with pytest.raises(ValueError, match="RSA_CPU_ISA=avx512: this CPU cannot run"):
        extension.chosen_level()
    monkeypatch.setenv(extension.ENV, "sse9")
    with pytest.raises(ValueError, match="RSA_CPU_ISA: unknown level 'sse9'"):
        extension.chosen_level()
    monkeypatch.setenv(extension.ENV, "Portable")
    assert extension.chosen_level() == "portable"
    monkeypatch.delenv(extension.ENV)
    for cap, want in (("AVX512", "avx2"), ("AVX2", "avx2"), ("DEFAULT", "portable")):
        monkeypatch.setattr(extension, "_torch_capability", lambda cap=cap: cap)
        assert extension.chosen_level() == want
    monkeypatch.setattr(extension, "runnable_levels", lambda: list(extension.LEVELS))
    monkeypatch.setattr(extension, "_torch_capability", lambda: "AVX512")
    assert extension.chosen_level() == "avx512"


def test_runnable_levels_from_cpu_flags(monkeypatch):
    monkeypatch.setattr(extension, "X86", True)
    v3 = {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"}
    v4 = {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}
    for flags, want in ((set(), ["portable"]), (v3 - {"fma"}, ["portable"]), (v3, ["portable", "avx2"]),
                        (v4, ["portable"]), (v3 | v4, ["portable", "avx2", "avx512"])):
        monkeypatch.setattr(extension, "cpu_flags", lambda flags=flags: set(flags))
        assert extension.runnable_levels() == want
