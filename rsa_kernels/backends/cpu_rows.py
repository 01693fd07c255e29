"""The `cpu` backend: fused C++ row kernels (csrc/, built as rsa_kernels._C).

Same contract and saved scalars as torch_rows, so the two are interchangeable row by row.
Each token row is one task on torch's intra-op threads (torch.set_num_threads applies); a
row reads its logits from memory once and keeps them in cache for the remaining sweeps
(docs/cpu_backend.md). Masked rows are skipped: their stats and saved scalars stay 0.
``chunk_size`` is accepted for the contract and ignored: the kernels never hold more than a
few rows of V per thread.
"""
from __future__ import annotations

import os
import platform

import torch

from ..reference import accumulation_dtype
from ..risk import Risk

_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _cpu_lacks_avx2() -> bool:
    """The extension is built for x86-64-v3 (AVX2, FMA); importing it elsewhere would crash."""
    if platform.machine() not in ("x86_64", "AMD64") or not os.path.exists("/proc/cpuinfo"):
        return False
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return not {"avx2", "fma"} <= flags
    return False


if _cpu_lacks_avx2():
    raise ImportError("rsa_kernels._C is built for AVX2/FMA, which this CPU lacks")

from .. import _C  # noqa: E402  (ImportError when the extension is not built: the registry says why)


def _labels(labels: torch.Tensor) -> torch.Tensor:
    return labels.to(torch.int64).contiguous()


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.shape[-1] == 1 or t.stride(-1) == 1 else t.contiguous()


# RSA_CPU_HUGE_PAGES=0: fresh gradients on ordinary 4 KiB pages (torch.empty), not 2 MiB ones
HUGE_PAGES = os.environ.get("RSA_CPU_HUGE_PAGES", "1") != "0"


def fresh_like(z: torch.Tensor) -> torch.Tensor:
    """A new gradient of z's shape and dtype. Faulting in its pages costs more than writing it
    (docs/cpu_backend.md), so it is mapped on 2 MiB pages where Linux allows (csrc/fresh.h)."""
    return _C.fresh_like(z.detach()) if HUGE_PAGES else torch.empty(z.shape, dtype=z.dtype)


def forward(z, zr, labels, risk: Risk, ignore_index: int, chunk_size: int | None = None):
    """Per-row (logp, ref_logp, kl, risk) as an (N, 4) tensor, and the (N, 5) saved scalars."""
    stats, saved = _C.forward(_rows(z), _rows(zr.detach()), _labels(labels), risk.code, float(risk.param),
                              int(ignore_index))
    return stats, saved


def backward(z, zr, labels, saved, grads, risk: Risk, ignore_index: int,
             inplace: bool = False, chunk_size: int | None = None):
    """d(sum of g * stats)/dz for grads = (N, 3) upstream gradients of (logp, kl, risk)."""
    acc = accumulation_dtype(z.dtype)
    z = _rows(z)
    out = z if inplace else fresh_like(z)
    with torch.no_grad():
        return _C.backward(z.detach(), _rows(zr.detach()), _labels(labels), saved.to(acc).contiguous(),
                           grads.to(acc).contiguous(), risk.code, float(risk.param), int(ignore_index),
                           out.detach() if inplace else out)


def unsupported(tensor) -> str | None:
    if tensor.device.type != "cpu":
        return f"the cpu backend runs on CPU tensors, got a tensor on {tensor.device}"
    if tensor.dtype not in _DTYPES:
        return f"the cpu backend supports float32, float64, bfloat16 and float16, got {tensor.dtype}"
    return None
