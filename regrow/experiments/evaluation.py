"""Test-set evaluation of a run's model."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def evaluate(model: nn.Module, dataset, batch_size: int) -> tuple[float, float]:
    """(accuracy in 0..1, mean cross-entropy) of ``model`` on ``dataset``."""
    model.eval()
    device = next(model.parameters()).device
    correct, loss_sum, n = 0, 0.0, len(dataset)
    for start in range(0, n, batch_size):
        x, y = dataset.get_batch(torch.arange(start, min(start + batch_size, n)))
        x, y = x.to(device), y.to(device)
        logits = model(x)
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
    model.train()
    return correct / max(n, 1), loss_sum / max(n, 1)
