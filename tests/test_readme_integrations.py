"""README's Integrations examples run as written (the blocks after ``<!-- readme-test -->``),
and ``import regrow`` imports none of the frameworks."""
from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import import_timm

README = Path(__file__).resolve().parent.parent / "README.md"
FRAMEWORKS = ("transformers", "lightning", "timm", "tensorboard", "accelerate")


def examples() -> list[str]:
    blocks = re.findall(r"<!-- readme-test -->\n```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 4, "README lost its tested integration examples"
    return blocks


def _needed(code: str) -> list[str]:
    return [m for m in FRAMEWORKS if re.search(rf"^(import|from) {m}\b", code, flags=re.M)]


@pytest.mark.parametrize("index", range(4))
def test_readme_integration_example_runs(index, tmp_path, monkeypatch, capsys):
    code = examples()[index]
    for module in _needed(code):
        if module == "timm":
            import_timm()   # over the torchvision stand-in where no real one loads
            continue
        try:
            importlib.import_module(module)
        except ImportError as err:
            pytest.skip(f"{module} not importable here: {err}")
    if "torch.compile(model)" in code:
        import torch
        torch._dynamo.reset()
        # same tracing as the default, without inductor's code generation (minutes on 2 cores)
        code = code.replace("torch.compile(model)", 'torch.compile(model, backend="aot_eager")')
    monkeypatch.chdir(tmp_path)   # the examples write runs/... here
    namespace: dict = {"__name__": "__readme__"}
    exec(compile(code, f"README example {index}", "exec"), namespace)
    dst = namespace["regrow_cb"].dst if "regrow_cb" in namespace else namespace["dst"]
    assert dst.stats()["density"] == pytest.approx(0.1, abs=0.01)   # sparsity=0.9 in every example
    if dst.step_count:   # the training examples rewired: ITOP grew past the density
        assert dst.stats()["updates"] > 0 and dst.stats()["itop_rate"] > 0.1 + 0.01
    assert capsys.readouterr().out.strip()   # each example prints its result


def test_import_regrow_imports_no_framework():
    probe = ("import sys, regrow, regrow.integrations; import regrow.experiments.cli; "
             f"print([m for m in sys.modules if m.split('.')[0] in {FRAMEWORKS!r}])")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
