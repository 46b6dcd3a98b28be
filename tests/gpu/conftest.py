"""The GPU suite: every test here is marked ``gpu`` and skipped unless its device is usable.

Run it with ``make test-gpu`` on a machine with CUDA. ``REGROW_TEST_DEVICE`` picks the device
(default ``cuda``); ``REGROW_TEST_DEVICE=cpu`` runs the same tests on the CPU, which checks the
suite's own logic on a machine without a GPU (the CPU-vs-device comparisons are then trivial
and the host-sync test is skipped).
"""
from __future__ import annotations

import os
from pathlib import Path

# cuBLAS needs this before its first call to give bitwise-reproducible matmuls (the
# reproducibility and resume tests turn on torch's deterministic algorithms)
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import pytest  # noqa: E402
import torch  # noqa: E402

from gpu_helpers import DEVICE_NAME  # noqa: E402

_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.gpu)


@pytest.fixture
def device() -> torch.device:
    return torch.device(DEVICE_NAME)


@pytest.fixture
def cuda_only(device):
    if device.type != "cuda":
        pytest.skip("needs a CUDA device (not meaningful on the CPU)")
    return device


@pytest.fixture
def deterministic():
    """torch's deterministic algorithms (warn-only: ops without one say so), cuDNN's, and the
    math attention kernel (the memory-efficient one's backward stays non-deterministic in
    warn-only mode; the ViT's attention runs through scaled_dot_product_attention)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    saved = (torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    with sdpa_kernel(SDPBackend.MATH):
        yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2], saved[3]
