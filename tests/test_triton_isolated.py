"""Runs tests/test_triton_kernels.py in a process of its own, with the Triton that ``make test``
installs outside the virtual environment's site-packages (``.venv/triton``).

Why apart: with Triton importable, torch loads Triton's libraries into the test process
(``torch.compile`` probes for it), and one full run on 2026-12-01 died with a NULL dereference
in libtorch_cpu while Triton was installed there (1 run in 6; none without it). Kept out of the
main process, Triton's kernels are still checked under its interpreter on every CI run.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
TRITON_DIR = Path(sys.prefix) / "triton"


def test_triton_kernels_under_the_interpreter_in_their_own_process():
    if importlib.util.find_spec("triton") is not None:
        pytest.skip("Triton is importable here: tests/test_triton_kernels.py runs in this process")
    if not (TRITON_DIR / "triton").is_dir():
        pytest.skip(f"Triton is not installed ({TRITON_DIR} is missing; `make test` puts it there)")
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(TRITON_DIR), os.environ.get("PYTHONPATH")) if p))
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          str(HERE / "test_triton_kernels.py")], cwd=HERE.parent, env=env,
                         capture_output=True, text=True, timeout=600)
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else ""
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "passed" in summary and "skipped" not in summary, summary
