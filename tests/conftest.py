import os

import pytest
import torch
from hypothesis import settings

# Without a GPU, Triton (when installed) can only run under its interpreter, which it reads from
# the environment when first imported: turn it on before any test module imports Triton, so
# tests/test_triton_kernels.py checks SparseLinear's CUDA kernels on the CPU
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run far faster on one thread, and two cores may be shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

# Property tests run a few small training loops per example: keep the count modest and
# never fail on timing (the CI machine has two shared cores).
settings.register_profile("regrow", max_examples=int(os.environ.get("REGROW_HYPOTHESIS_EXAMPLES", 40)),
                          deadline=None, print_blob=True)
settings.load_profile("regrow")


@pytest.fixture(params=["kernel", "torch.sparse"])
def route(request, monkeypatch):
    """Run a SparseLinear test on the compiled kernels and on the torch.sparse fallback."""
    from regrow.nn import _sparse_kernels
    if request.param == "kernel":
        if _sparse_kernels.load() is None:
            pytest.skip(f"compiled kernels unavailable: {_sparse_kernels.unavailable_reason()}")
    else:
        monkeypatch.setattr(_sparse_kernels, "load", lambda: None)
    return request.param
