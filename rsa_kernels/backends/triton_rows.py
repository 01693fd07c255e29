"""The `triton` backend: SPEC section 1 as fused Triton kernels (row-kernel contract).

Forward: pass 1 (triton/stats.py) reads each row of z and zr once for A, Ar, logp,
ref_logp, kl and the erm normaliser; cvar and ra_dpo_cvar add the exact quantile search of
triton/histogram.py and triton/collect.py (at most 3 more reads of the row, see
triton_quantile.py and docs/triton_kernels.md). Backward: one
pass (triton/backward.py). Math in float32 for float32/bfloat16/float16 inputs; float64 is
not supported (use the torch or cpu backend). Saved scalars mean what rsa_kernels.risk
says, so forward/backward are drop-in for torch_rows', with one documented difference: the
erm normaliser sums over zr > -inf rather than over q > 0 (they differ only for items whose
q underflows float32, where this is closer to the float64 definition).

Kernels run compiled on CUDA tensors, or interpreted on CPU tensors when the environment
has TRITON_INTERPRET=1 (the tests). Because @triton.jit picks the mode when it decorates,
the kernel folder is loaded once per mode, as a separate package (rsa_kernels.triton_modes).
"""
from __future__ import annotations

import types

import torch
import triton  # noqa: F401  (ImportError here marks the backend unavailable)

from ..risk import SAVED_WIDTH, Risk
from ..triton_modes import interpreting, row_kernel_module
from .triton_quantile import quantile_forward

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_V = 262144
BLOCK = 1024           # pass 1 and backward: elements per step
GROUP = 4              # pass 1: items per lane and step (one logsumexp rescale per group)


def _kernels():
    """The kernels for the current mode (see rsa_kernels.triton_modes)."""
    return types.SimpleNamespace(
        stats=row_kernel_module("stats").stats_kernel,
        histogram=row_kernel_module("histogram").histogram_kernel,
        collect=row_kernel_module("collect").collect_kernel,
        backward=row_kernel_module("backward").backward_kernel,
    )


def unsupported(tensor) -> str | None:
    if tensor.dtype not in _DTYPES:
        return f"the triton backend takes float32, bfloat16 or float16 logits, not {tensor.dtype}"
    if tensor.shape[-1] > MAX_V:
        return f"the triton backend takes vocabularies up to {MAX_V}, got {tensor.shape[-1]}"
    if tensor.is_cuda:
        return None
    if tensor.device.type == "cpu" and interpreting():
        return None
    return (f"the triton backend needs a CUDA tensor (got {tensor.device}); "
            "CPU tensors only under TRITON_INTERPRET=1")


def _check(z, zr, labels):
    reason = unsupported(z)
    if reason:
        raise RuntimeError(reason)
    if zr.dtype not in _DTYPES:
        raise ValueError(f"ref_logits: dtype {zr.dtype} is not supported by the triton backend")
    if z.stride(-1) != 1 or zr.stride(-1) != 1:
        raise ValueError("logits: rows must be unit-stride in the vocabulary")


def _launch_opts(fusion: bool) -> dict:
    """Compile options: the quantile search turns FMA contraction off, so that a + frac (b - a)
    rounds as torch rounds it (its sums use explicit tl.fma); the other kernels keep it on, as
    measured (Triton 3.10 changes the default, hence explicit)."""
    return {} if interpreting() else {"enable_fp_fusion": fusion}


def forward(z, zr, labels, risk: Risk, ignore_index: int, chunk_size: int | None = None):
    """(N, 4) float32 stats and (N, 5) float32 saved scalars; chunk_size is ignored."""
    _check(z, zr, labels)
    n, v = z.shape
    k = _kernels()
    labels = labels.contiguous()
    stats = torch.empty(n, 4, dtype=torch.float32, device=z.device)
    saved = torch.empty(n, SAVED_WIDTH, dtype=torch.float32, device=z.device)
    if n == 0:
        return stats, saved
    quant = risk.kind in ("cvar", "ra_dpo_cvar")
    aux = torch.empty(n if quant else 1, 2, dtype=torch.float32, device=z.device)
    mu = risk.param if risk.kind == "erm" else 0.0
    k.stats[(n,)](z, zr, labels, stats, saved, aux, z.stride(0), zr.stride(0), v, ignore_index, mu,
                  RISK=risk.code, RANGE=quant, BLOCK=BLOCK, GROUP=GROUP, num_warps=8, **_launch_opts(True))
    if quant:
        quantile_forward(k, z, zr, labels, stats, saved, aux, risk, ignore_index, interpreting(), _launch_opts(False))
    return stats, saved


def backward(z, zr, labels, saved, grads, risk: Risk, ignore_index: int,
             inplace: bool = False, chunk_size: int | None = None):
    """grad (N, V) in z's dtype, written over z when inplace; chunk_size is ignored."""
    _check(z, zr, labels)
    n, v = z.shape
    k = _kernels()
    out = z if inplace else torch.empty_like(z)
    if n == 0:
        return out
    mu = risk.param if risk.kind == "erm" else 0.0
    k.backward[(n,)](z, zr, labels.contiguous(), saved.float().contiguous(), grads.float().contiguous(),
                     out, z.stride(0), zr.stride(0), out.stride(0), v, ignore_index, mu,
                     RISK=risk.code, BLOCK=BLOCK, num_warps=8, **_launch_opts(True))
    return out

