"""Pass 4 of the forward, for rows whose bracket still holds more than one key: copy it out.

One program per open row (their indices in rows_ptr): re-read z and zr, recompute D and q
with the same float32 operations as every other pass (so the same bits), and store the
bracket's items (D, q) into the row's slice of the scratch buffers, each at a slot taken
from the row's counter with an atomic add. Only bracket items (a few hundred of 10^5,
typically) touch the counter, so the pass costs about what pass 1 does; a prefix sum per
block would put barriers in the loop. The slots' order is arbitrary: the finish sorts by
(D, q), so the result does not depend on it. The caller sized the scratch to the largest
bracket, so every item fits; what is left of the search runs on those few items
(triton_quantile.finish_from_scratch) and never reads the row again.
"""
import triton
import triton.language as tl

from ._common import _block, _deviation
from .histogram import _in_bracket


@triton.jit
def collect_kernel(z_ptr, zr_ptr, rows_ptr, saved_ptr, ist_ptr, d_ptr, q_ptr, fill_ptr,
                   stride_z, stride_zr, V, cap,
                   RA: tl.constexpr, BLOCK: tl.constexpr):
    slot = tl.program_id(0).to(tl.int64)
    row = tl.load(rows_ptr + slot)
    zrow = z_ptr + row * stride_z
    rrow = zr_ptr + row * stride_zr
    a = tl.load(saved_ptr + row * 5 + 0)
    ar = tl.load(saved_ptr + row * 5 + 1)
    klo = tl.load(ist_ptr + row * 4 + 0)
    khi = tl.load(ist_ptr + row * 4 + 1)
    d_out = d_ptr + slot * cap
    q_out = q_ptr + slot * cap
    offs = tl.arange(0, BLOCK)
    fill = fill_ptr + slot + offs * 0
    for start in range(0, V, BLOCK):
        cols = start + offs
        z, zr, inside = _block(zrow, rrow, cols, V)
        q, d = _deviation(z, zr, a, ar)
        inb = _in_bracket(d, q, inside, klo, khi, RA)
        pos = tl.atomic_add(fill, 1, mask=inb, sem="relaxed")  # unique slots; no ordering needed
        tl.store(d_out + pos, d, mask=inb)
        tl.store(q_out + pos, q, mask=inb)
