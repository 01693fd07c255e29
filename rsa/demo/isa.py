"""The demo's instruction-set cap: the same digits on every x86-64 CPU with AVX2.

PyTorch's CPU kernels (and MKL's and oneDNN's beneath them) pick their code by the CPU's
instruction set, and AVX-512 code rounds differently from AVX2 code (wider reductions, fused
operations in another order). The rounding moves the trained models, and with them the demo's
digits and, near a boundary, an outcome (issue 30: on an AMD Zen 4 the H->S catastrophic rate
at matched helpfulness came out "sacpo lower" where the AVX2 machines that made the README
found "inconclusive"). So the demo's seeds run in worker processes whose environment caps
every library at AVX2 before torch is imported there; `rsa demo --native-isa` opts out.

Each library reads its variable once, when it first dispatches, so the cap must be in the
environment a process starts with: the main process (which has imported torch already) only
aggregates, and with the cap on even a single worker is a spawned process.
"""
from __future__ import annotations

import contextlib
import os
import platform

# The one place to add a library's variable: every kernel the demo's training and evaluation
# run must be pinned here.
AVX2_ENVIRONMENT = {
    "ATEN_CPU_CAPABILITY": "avx2",        # PyTorch's own vectorized kernels
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",    # MKL (matrix products)
    "ONEDNN_MAX_CPU_ISA": "AVX2",         # oneDNN (linear layers, convolutions)
    # the rsa_kernels C++ kernels (rsa2's cpu backend) pick AVX-512 at run time where they can
    # (docs/cpu_backend.md); ATEN_CPU_CAPABILITY caps them too, pinned here all the same
    "RSA_CPU_ISA": "avx2",
}


def cap_environment() -> dict[str, str]:
    """The variables that cap every CPU library the demo uses at AVX2."""
    return dict(AVX2_ENVIRONMENT)


def can_cap() -> tuple[bool, str]:
    """(whether this CPU can run the AVX2 cap, why not when it cannot): an x86-64 CPU with AVX2.

    Forcing AVX2 on a CPU without it would crash (PyTorch does not check the variable against
    the hardware), so such a CPU runs its native kernels and says so."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False, f"a {platform.machine()} CPU, not x86-64"
    import torch

    if not torch.cpu._is_avx2_supported():
        return False, "an x86-64 CPU without AVX2"
    return True, ""


def cpu_level() -> str:
    """What this CPU offers, whatever the environment caps: AVX512, AVX2, or the machine's name."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return platform.machine()
    import torch

    return "AVX512" if torch.cpu._is_avx512_supported() else "AVX2" if torch.cpu._is_avx2_supported() else "x86-64"


@contextlib.contextmanager
def environment(env: dict[str, str] | None):
    """``env`` set in os.environ (inherited by processes started inside), restored afterwards."""
    saved = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
