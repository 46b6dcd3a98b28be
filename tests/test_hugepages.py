"""regrow's own large buffers ask for transparent huge pages (madvise) where the OS allows."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from regrow.core import hugepages


def _thp_mode() -> str:
    try:
        return open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return ""


def test_small_and_non_cpu_buffers_are_left_alone():
    assert not hugepages.advise(torch.empty(1000))
    assert hugepages.empty(10).shape == (10,)


def test_the_switch_turns_it_off(monkeypatch):
    monkeypatch.setenv("REGROW_HUGE_PAGES", "0")
    assert not hugepages.enabled()
    assert not hugepages.advise(torch.empty(8 << 20, dtype=torch.uint8))


def test_empty_like_copies_shape_and_dtype():
    x = torch.randn(5, 7).t()
    y = hugepages.empty_like(x)
    assert y.shape == x.shape and y.dtype == x.dtype and y.is_contiguous()


# in a fresh process without THP_MEM_ALLOC_ENABLE, so torch itself asks for nothing: a kernel
# buffer written after regrow's madvise is backed by huge pages (AnonHugePages in smaps)
_SCRIPT = textwrap.dedent("""
    import os
    os.environ.pop("THP_MEM_ALLOC_ENABLE", None)
    import torch
    from regrow.core import hugepages
    def huge_kib(t):
        lo, hi = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
        total, inside = 0, False
        for line in open("/proc/self/smaps"):
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                a, b = (int(v, 16) for v in head.split("-"))
                inside = a < hi and b > lo
            elif inside and head == "AnonHugePages:":
                total += int(line.split()[1])
        return total
    plain = torch.empty(64 << 20, dtype=torch.uint8); plain.fill_(1)
    advised = hugepages.empty(64 << 20, dtype=torch.uint8); advised.fill_(1)
    print(hugepages.enabled(), huge_kib(plain), huge_kib(advised))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux") or "[madvise]" not in _thp_mode(),
                    reason="needs Linux with transparent huge pages in madvise mode")
def test_an_advised_buffer_is_backed_by_huge_pages_where_a_plain_one_is_not():
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    out = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    enabled, plain, advised = out.stdout.split()
    assert enabled == "True"
    assert int(plain) == 0          # madvise mode: nothing without asking
    assert int(advised) >= 32 << 10  # at least half of the 64 MiB on 2 MiB pages


def test_sparse_linear_outputs_are_unchanged_by_the_advice():
    from regrow.nn import SparseLinear
    torch.manual_seed(0)
    layer = SparseLinear(64, 48, fan_in=8)
    x = torch.randn(32, 64, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    dense = layer.to_dense()
    assert torch.allclose(y, x @ dense.t() + layer.bias, atol=1e-5)
    assert torch.allclose(x.grad, torch.ones(32, 48) @ dense, atol=1e-5)
