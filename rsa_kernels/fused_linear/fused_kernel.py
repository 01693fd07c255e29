"""schedule="kernel": Triton kernels that fuse the lm-head product with the vocabulary reduction.

As Cut Cross-Entropy does for cross-entropy: the forward multiplies tiles of logits of
both models out on chip (tl.dot over the hidden units, float32 accumulator) and folds
them straight into the per-row statistics of SPEC section 1 (kernel/forward.py); the
backward recomputes each tile, turns it into the logits' gradient and multiplies that out
into grad_hidden, grad_weight and grad_bias with float32 atomics (kernel/backward.py).
No (rows x V) tensor is ever written to memory, at any chunk size.

Risks: kl and erm:MU, whose statistics are online sums over the vocabulary. cvar and
ra_dpo_cvar need quantile passes over D and are refused (use the token or pair schedule).
Dtypes: float32, bfloat16, float16 (math in float32); CUDA tensors, or CPU tensors under
TRITON_INTERPRET=1 (the tests).

Public: fused_kernel_token_stats (fused_linear_token_stats' arguments), and the
``schedule="kernel"`` keyword of rsa_kernels.fused_linear's two functions, which call
kernel_rows_token_stats below.
"""
from __future__ import annotations

import os
import types

import torch

from ..risk import SAVED_WIDTH, Risk, parse_risk
from ..token_stats import TokenStats
from ..triton_modes import interpreting, kernel_module
from .checks import check_chunking, check_linear

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
PARTIALS = 10             # per-row running values each forward split writes (kernel/forward.py)
# Tiles: (BLOCK_N rows, BLOCK_V items, BLOCK_H hidden units per tl.dot step). Not tuned on a
# GPU yet (bench/gpu_check_fused_kernel.py measures these); float32 takes half the BLOCK_H
# so that one pipelined stage of operands stays near 24 KiB of shared memory.
BLOCKS = {torch.float32: (64, 128, 32), torch.bfloat16: (64, 128, 64), torch.float16: (64, 128, 64)}
INTERPRET_BLOCKS = (16, 32, 16)   # the interpreter pays per operation: tl.dot's minimum
NUM_WARPS = 8
GROUP = 8                 # backward: row blocks per group of programs (L2 reuse)
PROGRAMS_PER_SM = 4       # forward: split the vocabulary until the grid has this many programs
INTERPRET_SPLITS = 3      # forward splits under the interpreter (so that the tests merge splits)
FLOAT32_PRECISION = "ieee"  # tl.dot on float32: true float32 products, as torch's default matmul
_KERNELS = os.path.join(os.path.dirname(__file__), "kernel")


def _kernels():
    """The kernels for the current mode (see rsa_kernels.triton_modes)."""
    return types.SimpleNamespace(
        forward=kernel_module(_KERNELS, __package__, "forward").forward_kernel,
        backward=kernel_module(_KERNELS, __package__, "backward").backward_kernel,
    )


def check_kernel_args(risk: Risk, backend: str, hidden: torch.Tensor, ref_hidden: torch.Tensor) -> None:
    """What only the fused kernel refuses (check_linear has checked shapes, dtypes, devices)."""
    if risk.kind not in ("kl", "erm"):
        raise ValueError(f"risk: the fused kernel (schedule='kernel') computes 'kl' and 'erm:MU' only, got "
                         f"{str(risk)!r}; {risk.kind} needs quantile passes over the vocabulary: use "
                         "schedule='tokens' or 'pairs'")
    if backend not in ("auto", "triton"):
        raise ValueError(f"backend: the fused kernel (schedule='kernel') is a Triton kernel of its own; "
                         f"pass backend='auto' or 'triton', got {backend!r}")
    for name, t in (("hidden", hidden), ("ref_hidden", ref_hidden)):
        if t.dtype not in _DTYPES:
            raise ValueError(f"{name}: the fused kernel takes float32, bfloat16 or float16, not {t.dtype} "
                             "(float64: use schedule='tokens')")
    if not (hidden.is_cuda or (hidden.device.type == "cpu" and interpreting())):
        raise RuntimeError(f"the fused kernel needs CUDA tensors (got {hidden.device}); "
                           "CPU tensors only under TRITON_INTERPRET=1")
    try:
        import triton  # noqa: F401
    except ImportError as err:
        raise RuntimeError(f"the fused kernel needs triton: {err}") from None


def _config(dtype):
    return INTERPRET_BLOCKS if interpreting() else BLOCKS[dtype]


def _precision(hidden, ref_hidden) -> str:
    return FLOAT32_PRECISION if torch.float32 in (hidden.dtype, ref_hidden.dtype) else "ieee"


def _splits(n_blocks: int, n_tiles: int, device) -> int:
    """Forward programs per row block: enough to fill the GPU, each over a run of tiles."""
    if interpreting():
        want = INTERPRET_SPLITS
    else:
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        want = -(-PROGRAMS_PER_SM * sms // n_blocks)
    return max(1, min(n_tiles, want))


def _lse(m, s):
    """logsumexp from per-split running (max, sum): backends/triton/stats.py's _finish, over splits."""
    big = m.amax(0)
    big_safe = torch.where(big == float("-inf"), 0.0, big)
    return big_safe, (s * torch.exp(m - big_safe)).sum(0)


def _merge(part: torch.Tensor, risk: Risk):
    """(M, 4) stats and (M, 5) saved scalars from the splits' (S, M, 10) running values."""
    m_z, s_z, m_r, s_r, t_r, m_e, s_e, inf_zr, z_y, zr_y = part.unbind(2)
    big, tot = _lse(m_z, s_z)
    a = big + torch.log(tot)
    big_r, tot_r = _lse(m_r, s_r)
    ar = big_r + torch.log(tot_r)
    kl = (t_r * torch.exp(m_r - big_r)).sum(0) / tot_r + (a - ar)
    # an item with p = 0 < q makes kl (and erm) +inf, the true value; NaN stays NaN
    inf_item = (torch.exp(inf_zr.amax(0) - ar) > 0) & (kl == kl)
    kl = torch.where(inf_item, float("inf"), kl)
    zero = torch.zeros_like(a)
    norm, value = zero, kl
    if risk.kind == "erm":
        big_e, tot_e = _lse(m_e, s_e)
        norm = big_e + torch.log(tot_e) - (1.0 + risk.param) * ar + risk.param * a
        norm = torch.where(inf_item, float("inf"), norm)
        value = norm / risk.param
    stats = torch.stack([z_y.sum(0) - a, zr_y.sum(0) - ar, kl, value], 1)
    saved = torch.stack([a, ar, norm, zero, zero], 1)
    return stats, saved


def _strides(*tensors):
    return [s for t in tensors for s in (t.stride(0), t.stride(1))]


def _forward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, rows, risk: Risk):
    k = _kernels()
    m, v = rows.numel(), weight.shape[0]
    bn, bv, bh = _config(hidden.dtype)
    n_blocks, n_tiles = -(-m // bn), -(-v // bv)
    splits = _splits(n_blocks, n_tiles, hidden.device)
    tiles = -(-n_tiles // splits)
    splits = -(-n_tiles // tiles)  # no split without a tile
    part = torch.empty(splits, m, PARTIALS, dtype=torch.float32, device=hidden.device)
    mu = risk.param if risk.kind == "erm" else 0.0
    k.forward[(n_blocks, splits)](
        hidden, weight, weight if bias is None else bias, ref_hidden, ref_weight,
        ref_weight if ref_bias is None else ref_bias, rows, labels, part,
        m, v, hidden.shape[1], ref_hidden.shape[1], tiles,
        *_strides(hidden, weight, ref_hidden, ref_weight), mu,
        RISK=risk.code, HAS_BIAS=bias is not None, HAS_REF_BIAS=ref_bias is not None,
        PRECISION=_precision(hidden, ref_hidden), BLOCK_N=bn, BLOCK_V=bv, BLOCK_H=bh, num_warps=NUM_WARPS,
        **_fusion())
    return _merge(part, risk)


def _fusion() -> dict:
    """FMA contraction on, explicitly (Triton 3.10 turns its default off); not an interpreter option."""
    return {} if interpreting() else {"enable_fp_fusion": True}


def _backward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, rows, saved, grads, risk: Risk,
              needs):
    """float32 (grad_hidden (N, H), grad_weight (V, H), grad_bias (V,)), None where not needed."""
    n, hdim = hidden.shape
    v = weight.shape[0]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    gh = torch.zeros(n, hdim, **f32) if needs[0] else None
    gw = torch.zeros(v, hdim, **f32) if needs[1] else None
    gb = torch.zeros(v, **f32) if needs[2] and bias is not None else None
    m = rows.numel()
    if m == 0 or (gh is None and gw is None and gb is None):
        return gh, gw, gb
    k = _kernels()
    bn, bv, bh = _config(hidden.dtype)
    programs = -(-m // bn) * -(-v // bv)
    dummy = saved  # any float32 tensor stands in for a buffer the kernel does not touch
    mu = risk.param if risk.kind == "erm" else 0.0
    k.backward[(programs,)](
        hidden, weight, weight if bias is None else bias, ref_hidden, ref_weight,
        ref_weight if ref_bias is None else ref_bias, rows, labels, saved, grads,
        dummy if gh is None else gh, dummy if gw is None else gw, dummy if gb is None else gb,
        m, v, hdim, ref_hidden.shape[1],
        *_strides(hidden, weight, ref_hidden, ref_weight), hdim, hdim, mu,
        RISK=risk.code, HAS_BIAS=bias is not None, HAS_REF_BIAS=ref_bias is not None,
        NEED_H=gh is not None, NEED_W=gw is not None, NEED_B=gb is not None,
        PRECISION=_precision(hidden, ref_hidden), GROUP=GROUP, BLOCK_N=bn, BLOCK_V=bv, BLOCK_H=bh,
        num_warps=NUM_WARPS, **_fusion())
    return gh, gw, gb


class FusedKernelFunction(torch.autograd.Function):
    """(hidden, weight, bias; reference) -> (logp, ref_logp, kl, risk) per row, each (N,)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, rows, risk):
        n = hidden.shape[0]
        stats = torch.zeros(n, 4, dtype=torch.float32, device=hidden.device)
        saved = torch.zeros(0, SAVED_WIDTH, dtype=torch.float32, device=hidden.device)
        if rows.numel():
            st, saved = _forward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, rows, risk)
            stats.index_copy_(0, rows, st)
        ctx.save_for_backward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, rows, saved)
        ctx.risk = risk
        logp, ref_logp, kl, value = (c.clone() for c in stats.unbind(1))
        ctx.mark_non_differentiable(ref_logp)
        return logp, ref_logp, kl, value

    @staticmethod
    def backward(ctx, g_logp, _g_ref, g_kl, g_risk):
        hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, rows, saved = ctx.saved_tensors
        zero = torch.zeros(rows.numel(), dtype=torch.float32, device=hidden.device)
        grads = torch.stack([zero if g is None else g.index_select(0, rows).float() for g in (g_logp, g_kl, g_risk)],
                            1).contiguous()
        out = _backward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, rows, saved, grads,
                        ctx.risk, ctx.needs_input_grad[:3])
        out = [g if g is None else g.to(like.dtype) for g, like in zip(out, (hidden, weight, bias))]
        return (*out, None, None, None, None, None, None)


def kernel_rows_token_stats(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, *, risk: Risk,
                            ignore_index: int, backend: str = "auto"):
    """Token statistics of checked 2-D hidden rows (N, H) and labels (N,); gradient to the policy only."""
    check_kernel_args(risk, backend, hidden, ref_hidden)
    rows = (labels != ignore_index).nonzero().squeeze(1)  # only labelled rows are multiplied out
    ref = [t.detach() if t is not None else None for t in (ref_hidden, ref_weight, ref_bias)]
    return FusedKernelFunction.apply(hidden, weight, bias, *ref, labels.contiguous(), rows, risk)


def fused_kernel_token_stats(hidden, weight, ref_hidden, ref_weight, labels, *, bias=None, ref_bias=None,
                             risk="kl", ignore_index: int = -100, backend: str = "auto",
                             chunk_size: int | None = None, memory_budget: int | None = None) -> TokenStats:
    """fused_linear_token_stats with the fused kernel: the same arguments and results.

    ``chunk_size`` and ``memory_budget`` are checked and then have nothing to bound: the
    kernel holds no logits. ``backend`` must be "auto" or "triton".
    """
    risk = parse_risk(risk)
    check_linear(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, ignore_index=ignore_index)
    check_chunking(chunk_size, "tokens", memory_budget)
    h = hidden.reshape(-1, hidden.shape[-1])
    rh = ref_hidden.reshape(-1, ref_hidden.shape[-1])
    out = kernel_rows_token_stats(h, weight, bias, rh, ref_weight, ref_bias, labels.reshape(-1), risk=risk,
                                  ignore_index=ignore_index, backend=backend)
    return TokenStats(*(t.view(labels.shape) for t in out))


__all__ = ["fused_kernel_token_stats", "kernel_rows_token_stats", "FusedKernelFunction"]
