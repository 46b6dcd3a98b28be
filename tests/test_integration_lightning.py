"""RegrowCallback in Lightning: masks through accumulation, exact resume from a Lightning
checkpoint, and DDP on the CPU (gloo, 2 processes)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

L = pytest.importorskip("lightning")

from regrow.integrations.lightning import RegrowCallback  # noqa: E402

SPARSITY = 0.8
SCRIPTS = Path(__file__).parent / "integration_scripts"


class Module(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))

    def training_step(self, batch, index):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class Watch(L.Callback):
    """After RegrowCallback: masked weights after every optimizer step (a post-step hook)."""

    def __init__(self, regrow_cb):
        self.regrow_cb, self.steps, self.nonzero_masked, self.itop_start = regrow_cb, 0, 0, None

    def on_train_start(self, trainer, pl_module):
        self.itop_start = self.regrow_cb.dst.stats()["itop_rate"]
        params = dict(pl_module.named_parameters())

        def check(optimizer, args, kwargs):
            for name, mask in self.regrow_cb.dst.masks.items():
                self.nonzero_masked += int((params[name].detach()[~mask] != 0).sum())
            self.steps += 1
        # registered after RegrowCallback's hook, so it runs after the masks went back on
        self._hook = trainer.optimizers[0].register_step_post_hook(check)

    def on_train_end(self, trainer, pl_module):
        self._hook.remove()


def loader():
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 8, generator=g), torch.randint(0, 4, (64,), generator=g))
    return torch.utils.data.DataLoader(data, batch_size=8)


def fit(root, *, ckpt=None, save=False, epochs=4):
    L.seed_everything(0, verbose=False)
    module = Module()
    cb = RegrowCallback(method="rigl", sparsity=SPARSITY, update_interval=2)
    watch = Watch(cb)
    callbacks = [cb, watch]
    if save:
        callbacks.append(L.pytorch.callbacks.ModelCheckpoint(dirpath=root, every_n_epochs=1, save_top_k=-1))
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, accumulate_grad_batches=2,
                        callbacks=callbacks, default_root_dir=str(root), logger=False,
                        enable_checkpointing=save, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, loader(), ckpt_path=ckpt)
    return module, cb, watch, trainer


def test_lightning_trains_sparse_with_accumulation_and_resumes_bit_for_bit(tmp_path):
    module, cb, watch, trainer = fit(tmp_path / "run", save=True)
    stats = cb.dst.stats()
    # 8 batches an epoch, 2 accumulated per optimizer step: 16 steps, each checked
    assert trainer.global_step == 16 and cb.dst.step_count == 16 and watch.steps == 16
    assert watch.nonzero_masked == 0
    assert abs(stats["nnz"] - (1 - SPARSITY) * stats["numel"]) <= len(stats["layers"])
    # updates at steps 2, 4, ..., 10: every 2 steps before stop_fraction 0.75 x 16 = 12
    assert stats["updates"] == 5 and stats["itop_rate"] > watch.itop_start
    logged = trainer.callback_metrics
    assert float(logged["regrow/density"]) == pytest.approx(stats["density"])
    assert float(logged["regrow/updates"]) == 5

    # an interrupted run: a fresh module resumed from the checkpoint after epoch 2 ends identical
    resumed, cb2, watch2, _ = fit(tmp_path / "resumed", ckpt=str(tmp_path / "run" / "epoch=1-step=8.ckpt"))
    assert watch2.steps == 8 and cb2.dst.step_count == 16 and watch2.nonzero_masked == 0
    final, again = module.state_dict(), resumed.state_dict()
    assert all(torch.equal(final[k], again[k]) for k in final)


@pytest.mark.slow
def test_lightning_ddp_on_cpu_two_ranks_agree(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    done = subprocess.run([sys.executable, str(SCRIPTS / "lightning_ddp.py"), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank in ranks:
        assert rank["world_size"] == 2 and rank["steps"] == 8 and rank["checks"] == 16
        assert rank["nonzero"] == 0
        assert rank["density"] == pytest.approx(1 - SPARSITY, abs=0.01)
        assert rank["updates"] == 2 and rank["itop_end"] > rank["itop_start"]
    assert ranks[0]["mask_sum"] == ranks[1]["mask_sum"]   # the same rewiring on both ranks
    assert ranks[0]["weights"] == ranks[1]["weights"]


def test_a_second_fit_with_the_same_callback_takes_over_the_module(tmp_path):
    module, cb = Module(), RegrowCallback(method="set", sparsity=SPARSITY, update_interval=2)
    engines = []
    for _ in range(2):
        trainer = L.Trainer(max_epochs=1, accelerator="cpu", callbacks=[cb], logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            default_root_dir=str(tmp_path))
        trainer.fit(module, loader())
        engines.append(cb.dst)
    assert engines[0] is not engines[1] and engines[1].step_count == 8
    params = dict(module.named_parameters())
    assert all(int((params[n].detach()[~m] != 0).sum()) == 0 for n, m in cb.dst.masks.items())
    with pytest.raises(ValueError, match="total_steps"):
        RegrowCallback(method="rigl", sparsity=0.5, total_steps=10)
