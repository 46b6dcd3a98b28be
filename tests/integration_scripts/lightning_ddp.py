"""Lightning DDP on the CPU (gloo, 2 processes) with RegrowCallback; run as a script because
Lightning's ``ddp`` strategy starts the second rank by re-running the command.

Each rank writes ``rank<r>.json`` to the folder given as argv[1]: a mask checksum, the weights'
checksum, whether masked weights were exactly zero after every optimizer step, density, ITOP.
"""
import json
import sys
from pathlib import Path

import lightning as L
import torch
from torch import nn

from regrow.integrations.lightning import RegrowCallback


class Module(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))

    def training_step(self, batch, index):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


class ZeroCheck(L.Callback):
    """After every optimizer step (Lightning's batch end at accumulation 1): masked weights are 0."""

    def __init__(self, regrow_cb):
        self.regrow_cb, self.nonzero, self.checks = regrow_cb, 0, 0

    def on_train_batch_end(self, trainer, pl_module, *args):
        params = dict(pl_module.named_parameters())
        for name, mask in self.regrow_cb.dst.masks.items():
            self.nonzero += int((params[name].detach()[~mask] != 0).sum())
            self.checks += 1


def main(out: Path) -> None:
    L.seed_everything(0, verbose=False)
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 8, generator=g), torch.randint(0, 4, (64,), generator=g))
    regrow_cb = RegrowCallback(method="rigl", sparsity=0.8, update_interval=2)
    check = ZeroCheck(regrow_cb)
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", devices=2, strategy="ddp", callbacks=[regrow_cb, check],
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(out))
    module = Module()
    start_itop = None

    class Start(L.Callback):
        def on_train_start(self, trainer, pl_module):
            nonlocal start_itop
            start_itop = regrow_cb.dst.stats()["itop_rate"]

    trainer.callbacks.append(Start())
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=8))
    stats = regrow_cb.dst.stats()
    masks = regrow_cb.dst.masks
    result = {
        "world_size": trainer.world_size,
        "mask_sum": {n: int((m.view(-1).nonzero().squeeze(1) * 7919 % 1000003).sum()) for n, m in masks.items()},
        "weights": [float(p.detach().double().sum()) for p in module.parameters()],
        "nonzero": check.nonzero, "checks": check.checks, "density": stats["density"],
        "itop_start": start_itop, "itop_end": stats["itop_rate"], "updates": stats["updates"],
        "steps": regrow_cb.dst.step_count,
    }
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
