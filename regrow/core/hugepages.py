"""Large CPU buffers backed by transparent huge pages, asked for by the buffer itself.

Wide always-sparse layers gather rows of activations at random; with 4 KiB pages every gather
that leaves a page is a TLB miss, and the per-weight cost steps up with width
(docs/performance.md: a scaling slope of 1.25 instead of <= 1.1). torch backs all its CPU
tensors with huge pages when ``THP_MEM_ALLOC_ENABLE=1`` is set before it starts (the ``regrow``
command does that); a library user's script usually does not. So the buffers regrow's kernels
allocate themselves (the layers' outputs and gradients, gathered-panel orders, index arrays)
come from :func:`empty`, which calls ``madvise(MADV_HUGEPAGE)`` on the buffer before anything
is written to it: the kernel then faults it in as 2 MiB pages.

Only where it can work and matters: Linux, a CPU tensor of at least :data:`MIN_BYTES`, the
kernel's THP mode ``always`` or ``madvise`` (with ``never`` the call is skipped). Nothing else
changes: the tensor is an ordinary ``torch.empty``.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from functools import lru_cache

import torch

#: buffers smaller than this are left alone (a huge page is 2 MiB; the gain is for big arrays)
MIN_BYTES = 4 << 20
HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14
_THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


@lru_cache(maxsize=1)
def _madvise():
    """libc's madvise, or None where huge pages cannot be asked for."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        mode = open(_THP_MODE).read()
    except OSError:
        return None
    if "[never]" in mode:
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    fn = libc.madvise
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def enabled() -> bool:
    """Whether :func:`advise` can ask for huge pages on this machine (``REGROW_HUGE_PAGES=0``
    turns it off)."""
    return os.environ.get("REGROW_HUGE_PAGES", "1") != "0" and _madvise() is not None


def advise(tensor: torch.Tensor) -> bool:
    """Ask for huge pages on the 2 MiB-aligned part of ``tensor``'s memory; True if asked.

    Call it before the memory is first written: pages already touched stay small until the
    kernel's background collapse gets to them."""
    nbytes = tensor.numel() * tensor.element_size()
    if tensor.device.type != "cpu" or nbytes < MIN_BYTES or not enabled():
        return False
    start = tensor.data_ptr()
    lo = (start + HUGE_PAGE - 1) // HUGE_PAGE * HUGE_PAGE
    hi = (start + nbytes) // HUGE_PAGE * HUGE_PAGE
    if hi <= lo:
        return False
    return _madvise()(lo, hi - lo, _MADV_HUGEPAGE) == 0


def empty(*size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``torch.empty(size, dtype=dtype)`` on the CPU, advised to use huge pages when large."""
    out = torch.empty(*size, dtype=dtype)
    advise(out)
    return out


def empty_like(tensor: torch.Tensor) -> torch.Tensor:
    """``torch.empty_like(tensor)`` (contiguous), advised to use huge pages when large."""
    out = torch.empty(tensor.shape, dtype=tensor.dtype, device=tensor.device)
    advise(out)
    return out
