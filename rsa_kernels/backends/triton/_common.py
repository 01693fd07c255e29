"""Device helpers shared by the kernels: the deviation D and a sortable integer key of it."""
import os

import triton
import triton.language as tl

# Helpers called from kernels: @triton.jit when compiled (inlined). Under the interpreter,
# plain Python, because each call of an interpreted jit function re-patches triton.language
# (about a millisecond); this folder is loaded once per mode (triton_rows._kernels).
helper = (lambda fn: fn) if os.environ.get("TRITON_INTERPRET") == "1" else triton.jit

# Sortable keys of float32 values (see _key): key(-inf) and key(+inf). NaNs fall outside.
KEY_NINF = tl.constexpr(0x007FFFFF)
KEY_PINF = tl.constexpr(0xFF800000)


@helper
def _block(zrow, rrow, cols, V):
    """One block of a row's z and zr in float32 (0 past the vocabulary), and where it lies."""
    inside = cols < V
    z = tl.load(zrow + cols, mask=inside, other=0.0).to(tl.float32)
    zr = tl.load(rrow + cols, mask=inside, other=0.0).to(tl.float32)
    return z, zr, inside


@helper
def _deviation(z, zr, a, ar):
    """q = exp(zr - Ar) and D = (zr - z) + (A - Ar) (-inf where q == 0): SPEC section 1's one
    form of D, as torch_rows._deviation and every other backend and slice kernel compute it.

    Every pass recomputes D with exactly these operations, so a value seen in one pass has
    the same bits in the next (no multiply, hence no FMA contraction to change rounding).
    """
    q = tl.exp(zr - ar)
    # the support is q != 0, not q > 0: a NaN q (NaN in zr) stays in, so NaN is never dropped;
    # + 0.0 turns -0.0 into +0.0, so that equal values get equal keys
    d = tl.where(q != 0, (zr - z) + (a - ar), float("-inf")) + 0.0
    return q, d


@helper
def _key(d):
    """float32 -> int64 in [0, 2^32), monotone: a < b  <=>  key(a) < key(b) (NaN aside)."""
    b = d.to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF
    return tl.where(b >= 0x80000000, 0xFFFFFFFF - b, b + 0x80000000)


@helper
def _val(k):
    """Inverse of _key."""
    b = tl.where(k >= 0x80000000, k - 0x80000000, 0xFFFFFFFF - k)
    return b.to(tl.int32).to(tl.float32, bitcast=True)


# Reductions through tl.reduce with the standard library's own combine functions, rather
# than tl.sum/tl.max/...: those are @triton.jit functions themselves, fixed in compiled
# mode when triton was imported without TRITON_INTERPRET, and then the interpreter cannot
# call them. Passed as combine functions they are recognised (and run as numpy) instead.
@helper
def _sum(x, axis: tl.constexpr):
    return tl.reduce(x, axis, tl.standard._sum_combine)


@helper
def _max(x, axis: tl.constexpr):
    return tl.reduce(x, axis, tl.standard._elementwise_max)


@helper
def _min(x, axis: tl.constexpr):
    return tl.reduce(x, axis, tl.standard._elementwise_min)
