"""Export the model of a finished (or interrupted) ``regrow train`` run directory."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..export import export, save_exported
from ..export.condense import _is_sparse_layer
from .checkpoint import load_run_checkpoint
from .config import from_dict
from .setup import build_model


# ---------------------------------------------------------------------------------------------
def export_run(run_dir: str | Path, format: str = "condensed", out_path: str | Path | None = None) -> dict[str, Any]:
    """Export the final model of a ``regrow train`` run directory and save it.

    Reads the run's checkpoint (model config, weights, masks), exports with ``format``, and
    writes ``out_path`` (default ``RUN_DIR/exported-<format>``) ``.safetensors`` + ``.json``.

    Returns:
        ``{"report", "weights", "spec", "bytes", "params", "dense_params"}``: the export report,
        the written paths, their total size, and the parameter counts of the exported and the
        original (dense) model.
    """
    run_dir = Path(run_dir)
    state = load_run_checkpoint(run_dir)
    config = from_dict(state["config"])
    in_shape, num_classes = tuple(int(s) for s in state["in_shape"]), int(state["num_classes"])
    model = build_model(config, in_shape, num_classes)
    model.load_state_dict(state["model"])
    masks = dict(state.get("masks", {}))
    exported = export(model, masks, format)
    arch = {"name": config.model, "num_classes": num_classes, "in_shape": list(in_shape),
            "options": config.model_kwargs()}
    out = Path(out_path) if out_path is not None else run_dir / f"exported-{format}"
    saved = save_exported(exported, out, arch=arch)
    dense_params = sum(p.numel() for p in model.parameters()) + sum(  # always-sparse layers at full size
        m.rows * m.cols - getattr(m, m.regrow_sparse_parameter).numel()
        for m in model.modules() if _is_sparse_layer(m))
    return {"report": exported.regrow_export_report, **saved,
            "params": sum(p.numel() for p in exported.parameters()), "dense_params": dense_params}
