"""regrow in Lightning: one callback.

    from regrow.integrations.lightning import RegrowCallback
    regrow_cb = RegrowCallback(method="rigl", sparsity=0.9)
    trainer = lightning.Trainer(max_epochs=3, callbacks=[regrow_cb])
    trainer.fit(module, loader)           # resume: trainer.fit(module, loader, ckpt_path=...)
    regrow_cb.dst                         # the DynamicSparsity engine
"""
from __future__ import annotations

from lightning.pytorch.callbacks import Callback

from ..engine import DynamicSparsity
from ._engine import build_engine, log_values


class RegrowCallback(Callback):
    """Dynamic sparse training inside ``lightning.Trainer``.

    At ``on_train_start`` it builds :class:`regrow.DynamicSparsity` over the LightningModule and
    its optimizer (one optimizer) with ``total_steps = trainer.estimated_stepping_batches``, so
    ``accumulate_grad_batches`` counts optimizer steps as Lightning does. The gradients are masked
    in ``on_before_optimizer_step`` and the weights by a hook right after ``optimizer.step()``,
    which also rewires when due; under DDP (any backend) the ranks rewire identically.
    ``regrow/density``, ``regrow/itop_rate`` and ``regrow/updates`` go to the module's logger
    every training batch. The engine's state is part of every Lightning checkpoint, so
    ``fit(..., ckpt_path=...)`` continues with the checkpoint's masks, bit for bit.

    Args:
        method, sparsity, **engine_options: as for :class:`regrow.DynamicSparsity` (everything
            but ``total_steps``, which comes from the Trainer).
    """

    def __init__(self, method: str, sparsity: float, **engine_options):
        if "total_steps" in engine_options:
            raise ValueError("RegrowCallback takes total_steps from the Trainer; do not pass it")
        self.options = dict(method=method, sparsity=sparsity, **engine_options)
        self.dst: DynamicSparsity | None = None
        self._saved: dict | None = None
        self._hook = None

    def on_train_start(self, trainer, pl_module) -> None:
        if len(trainer.optimizers) != 1:
            raise ValueError(f"RegrowCallback supports one optimizer; configure_optimizers returned "
                             f"{len(trainer.optimizers)}")
        optimizer = trainer.optimizers[0]
        if self.dst is not None:   # a second fit() call: the new engine takes over the module
            self.dst.close()
        self.dst = build_engine(pl_module, optimizer, trainer.estimated_stepping_batches,
                                self.options, self._saved)
        self._saved = None
        # Lightning runs the forward/backward closure inside optimizer.step(), so the masks go
        # back on through the optimizer's own post-step hook, not through a callback
        self._hook = optimizer.register_step_post_hook(lambda opt, args, kwargs: self.dst.after_optimizer_step())

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.dst.before_optimizer_step()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        pl_module.log_dict(log_values(self.dst), on_step=True, on_epoch=False)

    def on_train_end(self, trainer, pl_module) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def state_dict(self) -> dict:
        return {"engine": self.dst.state_dict()} if self.dst is not None else {}

    def load_state_dict(self, state_dict: dict) -> None:
        self._saved = state_dict.get("engine")
