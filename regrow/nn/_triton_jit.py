"""The Triton kernels of :mod:`regrow.nn._triton_kernels` (imported only when they are used:
this module imports Triton, which regrow never needs). Kernels are module-level functions, as
Triton's interpreter requires."""
import triton
import triton.language as tl


@triton.jit
def spmm_rows_kernel(ptr, idx, values, perm, src, bias, out, batch,
                     HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr,
                     BLOCK_J: tl.constexpr, BLOCK_B: tl.constexpr):
    r = tl.program_id(0)
    b = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    in_batch = b < batch
    start = tl.load(ptr + r)
    end = tl.load(ptr + r + 1)
    acc = tl.zeros((BLOCK_B,), dtype=tl.float32)
    for j0 in range(start, end, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        live = j < end
        src_row = tl.load(idx + j, mask=live, other=0).to(tl.int64)
        if HAS_PERM:
            at = tl.load(perm + j, mask=live, other=0).to(tl.int64)
        else:
            at = j
        v = tl.load(values + at, mask=live, other=0.0)
        tile = tl.load(src + src_row[:, None] * batch + b[None, :],
                       mask=live[:, None] & in_batch[None, :], other=0.0)
        acc += tl.sum(v[:, None] * tile, axis=0)
    if HAS_BIAS:
        acc += tl.load(bias + r)
    tl.store(out + r.to(tl.int64) * batch + b, acc, mask=in_batch)


@triton.jit
def sddmm_kernel(row, col, a, b_src, out, n, batch, BLOCK_J: tl.constexpr, BLOCK_B: tl.constexpr):
    j = tl.program_id(0) * BLOCK_J + tl.arange(0, BLOCK_J)
    live = j < n
    ra = tl.load(row + j, mask=live, other=0).to(tl.int64) * batch
    cb = tl.load(col + j, mask=live, other=0).to(tl.int64) * batch
    acc = tl.zeros((BLOCK_J,), dtype=tl.float32)
    for b0 in range(0, batch, BLOCK_B):
        bb = b0 + tl.arange(0, BLOCK_B)
        m = live[:, None] & (bb < batch)[None, :]
        x = tl.load(a + ra[:, None] + bb[None, :], mask=m, other=0.0)
        y = tl.load(b_src + cb[:, None] + bb[None, :], mask=m, other=0.0)
        acc += tl.sum(x * y, axis=1)
    tl.store(out + j, acc, mask=live)


def kernels() -> dict:
    """The kernels and the launch helpers :mod:`regrow.nn._triton_kernels` needs."""
    return {"spmm_rows": spmm_rows_kernel, "sddmm": sddmm_kernel, "cdiv": triton.cdiv,
            "next_power_of_2": triton.next_power_of_2}
