"""Inference export: masks baked in, ablated neurons removed, saved without pickle.

- :func:`export` (``condense.py``): a plain inference copy in ``"condensed"``, ``"csr"`` or
  ``"dense"`` format, with a per-layer report (:func:`format_report`).
- :func:`save_exported` / :func:`load_exported` (``serialize.py``): safetensors + a JSON spec.

``regrow.export_run`` (exporting a ``regrow train`` run folder) lives with the experiments, in
:mod:`regrow.experiments.export_run`.
"""
from .condense import FORMATS, export, format_report
from .serialize import load_exported, save_exported

__all__ = ["FORMATS", "export", "format_report", "save_exported", "load_exported"]
