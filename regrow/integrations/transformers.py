"""regrow in the Hugging Face ``Trainer``: one callback.

    from regrow.integrations.transformers import RegrowCallback
    regrow_cb = RegrowCallback(method="rigl", sparsity=0.9)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[regrow_cb])
    trainer.train()                       # or trainer.train(resume_from_checkpoint=True)
    regrow_cb.dst                         # the DynamicSparsity engine
"""
from __future__ import annotations

import os

from torch import nn
from transformers import TrainerCallback
from transformers.pytorch_utils import Conv1D

from ..core.layers import find_sparsifiable
from ..engine import DynamicSparsity
from ..experiments.checkpoint import load_checkpoint, save_checkpoint
from ._engine import build_engine, log_values

STATE_NAME = "regrow_state.pt"


class RegrowCallback(TrainerCallback):
    """Dynamic sparse training inside ``transformers.Trainer``.

    When training starts it builds :class:`regrow.DynamicSparsity` over the Trainer's model and
    optimizer with ``total_steps`` = the Trainer's optimizer steps (``max_steps``: gradient
    accumulation counted as the Trainer counts it). Before every optimizer step it masks the
    gradients, after it the weights, and rewires when due. Density, ITOP rate and update count
    join every training log record as ``regrow/density``, ``regrow/itop_rate``,
    ``regrow/updates`` (``trainer.state.log_history``, and the loggers listed after this
    callback: pass ``report_to="none"`` and put e.g. ``TensorBoardCallback()`` after it to chart
    them). Besides regrow's default layers, transformers' ``Conv1D`` projections (GPT-2) are
    sparsified; embeddings (and the LM head tied to them) and layer norms stay dense. Each
    Trainer checkpoint gets ``regrow_state.pt`` (written atomically; tensors and plain containers
    only); ``resume_from_checkpoint`` continues with the checkpoint's masks, bit for bit.

    Args:
        method, sparsity, **engine_options: as for :class:`regrow.DynamicSparsity` (everything
            but ``total_steps``, which comes from the Trainer).
        resume_from: the checkpoint folder to read ``regrow_state.pt`` from when resuming, if it
            is not ``<output_dir>/checkpoint-<step>`` (where the Trainer writes checkpoints).
    """

    def __init__(self, method: str, sparsity: float, *, resume_from: str | os.PathLike | None = None,
                 **engine_options):
        if "total_steps" in engine_options:
            raise ValueError("RegrowCallback takes total_steps from the Trainer; do not pass it")
        self.options = dict(method=method, sparsity=sparsity, **engine_options)
        self.resume_from = resume_from
        self.dst: DynamicSparsity | None = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        optimizer = getattr(optimizer, "optimizer", optimizer)   # accelerate's AcceleratedOptimizer
        if self.dst is not None:   # a second train() call: the new engine takes over the model
            self.dst.close()
        saved = load_checkpoint(self._resume_file(args, state))["engine"] if state.global_step > 0 else None
        options = dict(self.options)
        if options.get("targets") is None:
            options["targets"] = default_targets(model, options["method"])
        self.dst = build_engine(model, optimizer, state.max_steps, options, saved)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.dst.before_optimizer_step()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.dst.after_optimizer_step()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.dst is None or logs is None or "loss" not in logs:
            return   # evaluation and end-of-training records carry no training step
        values = log_values(self.dst)
        logs.update(values)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(values)

    def on_save(self, args, state, control, **kwargs):
        if self.dst is not None and args.should_save:
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            save_checkpoint({"engine": self.dst.state_dict()}, os.path.join(folder, STATE_NAME))

    def _resume_file(self, args, state) -> str:
        folders = [self.resume_from] if self.resume_from is not None else [
            os.path.join(args.output_dir, f"checkpoint-{state.global_step}")]
        for folder in folders:
            path = os.path.join(folder, STATE_NAME)
            if os.path.isfile(path):
                return path
        raise FileNotFoundError(
            f"the Trainer resumes at step {state.global_step} but there is no {STATE_NAME} in {folders[0]}; "
            "pass RegrowCallback(..., resume_from=<checkpoint folder>) (a checkpoint saved without "
            "RegrowCallback cannot restore the masks)")


def default_targets(model: nn.Module, method: str) -> list | None:
    """regrow's default weights plus those of transformers' ``Conv1D`` (GPT-2's attention and MLP
    projections: a Linear whose weight is stored ``[in, out]``); None when there is no Conv1D."""
    conv1d = [m.weight for m in model.modules() if isinstance(m, Conv1D)]
    if not conv1d:
        return None
    if method == "srigl":
        raise ValueError("srigl ablates output neurons (weight rows), but transformers' Conv1D stores its "
                         "weight [in, out]; pass targets=[...] without Conv1D modules or choose another method")
    found = {id(s.param) for s in find_sparsifiable(model)}
    return [p for p in model.parameters() if id(p) in found or any(p is w for w in conv1d)]
