"""The files of a run folder besides the checkpoint: names, atomic writes, and reading them back.

- ``config.yaml``: the resolved :class:`~regrow.experiments.config.TrainConfig`;
- ``metrics.jsonl``: one line per finished epoch;
- ``summary.json``: written only once the run has finished (tools skip finished runs by it).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

SUMMARY_NAME = "summary.json"
METRICS_NAME = "metrics.jsonl"
CONFIG_NAME = "config.yaml"


def write_json(path: Path, data: dict) -> None:
    """Write ``data`` as indented JSON, atomically (a reader never sees half a file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def write_metrics(path: Path, history: list[dict]) -> None:
    """Write the epoch rows as JSON lines, atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in history))
    os.replace(tmp, path)


def read_summary(run_dir: str | Path) -> dict | None:
    """The run's ``summary.json``, or None while the run has not finished."""
    path = Path(run_dir) / SUMMARY_NAME
    return json.loads(path.read_text()) if path.is_file() else None


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The run's epoch rows (empty before the first epoch ends)."""
    path = Path(run_dir) / METRICS_NAME
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
