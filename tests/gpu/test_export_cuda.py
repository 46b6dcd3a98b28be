"""Export of a model trained on the device: every format computes what the masked model
computes, on the device, and survives a save/load round trip (safetensors, no pickle)."""
from __future__ import annotations

import pytest
import torch

import regrow
from gpu_helpers import IN_SHAPE, Run, batches, skip_module_without_device

skip_module_without_device()

TOL = dict(rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fmt", ["condensed", "csr", "dense"])
@pytest.mark.parametrize("model", ["mlp", "resnet20", "vit"])
def test_export_on_device_matches_the_trained_model(device, tmp_path, model, fmt):
    run = Run(device, "srigl", model, "sgd", "fp32", total_steps=6, update_interval=2)
    for x, y in batches(6, device):
        run.train_step(x, y)
    run.model.eval()
    out = regrow.export(run.model, run.dst, format=fmt)
    assert all(p.device.type == device.type for p in out.parameters())
    x = torch.randn(5, *IN_SHAPE).to(device)
    with torch.no_grad():
        want = run.model(x)
        torch.testing.assert_close(out(x), want, **TOL)
        regrow.save_exported(out, tmp_path / "m")
        loaded = regrow.load_exported(tmp_path / "m").to(device)
        torch.testing.assert_close(loaded(x), want, **TOL)
    assert regrow.format_report(out.regrow_export_report)
