"""Device helpers shared by the fused kernels: reductions, the matrix product, a logits tile."""
import triton
import triton.language as tl

from rsa_kernels.triton_modes import interpreting, row_kernel_module

INTERPRET = interpreting()
# the row kernels' helper decorator and reductions, imported in this same mode
_row = row_kernel_module("_common")
helper, _sum, _max = _row.helper, _row._sum, _row._max


if INTERPRET:
    def _dot(a, b, acc, PRECISION):
        # the interpreter multiplies bfloat16 blocks as their raw 16-bit integers (numpy has
        # no bfloat16): widen to float32 first, exact, and what the tensor cores compute
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
else:
    @triton.jit
    def _dot(a, b, acc, PRECISION: tl.constexpr):
        # PRECISION "ieee" for float32 inputs: true float32 products, as torch's default
        # matmul (no TF32); ignored for bfloat16/float16 (tensor cores, float32 accumulator)
        return tl.dot(a, b, acc, input_precision=PRECISION)


@helper
def _logits(x_ptr, stride_x, stride_xk, rows, row_ok, w_ptr, stride_w, stride_wk, cols, col_ok, K,
            PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """x[rows] @ w[cols]^T as a float32 (BLOCK_N, BLOCK_V) tile, BLOCK_H of K at a time.

    Rows, columns and hidden units outside the masks load as 0, so they add nothing.
    """
    offs_k = tl.arange(0, BLOCK_H)
    acc = tl.full([BLOCK_N, BLOCK_V], 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_H):
        kk = k0 + offs_k
        k_ok = kk < K
        x = tl.load(x_ptr + rows[:, None] * stride_x + kk[None, :] * stride_xk,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + cols[None, :] * stride_w + kk[:, None] * stride_wk,
                    mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        acc = _dot(x, w, acc, PRECISION)
    return acc


@helper
def _tile(x_ptr, stride_x, stride_xk, rows, row_ok, w_ptr, stride_w, stride_wk, b_ptr, cols, col_ok, K,
          HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
          BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """The logits tile x[rows] @ w[cols]^T + b[cols] in float32; -inf outside the vocabulary."""
    z = _logits(x_ptr, stride_x, stride_xk, rows, row_ok, w_ptr, stride_w, stride_wk, cols, col_ok, K,
                PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)
    if HAS_BIAS:
        z += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return tl.where(col_ok[None, :], z, float("-inf"))
