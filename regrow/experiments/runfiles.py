"""The files of a run folder besides the checkpoint: names, atomic writes, and reading them back.

- ``config.yaml``: the resolved :class:`~regrow.experiments.config.TrainConfig`;
- ``metrics.jsonl``: one line per finished epoch;
- ``summary.json``: written only once the run has finished (tools skip finished runs by it);
- ``.lock``: locked (``flock``) while a process writes the run, see :func:`run_lock`.

Every JSON file is strict JSON (:mod:`regrow.core.strict_json`): a non-finite number is null.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from ..core import strict_json

SUMMARY_NAME = "summary.json"
METRICS_NAME = "metrics.jsonl"
CONFIG_NAME = "config.yaml"


def write_json(path: Path, data: dict) -> None:
    """Write ``data`` as indented strict JSON (non-finite numbers as null), atomically (a reader
    never sees half a file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(strict_json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def write_metrics(path: Path, history: list[dict]) -> None:
    """Write the epoch rows as JSON lines, atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(strict_json.dumps(row) + "\n" for row in history))
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


LOCK_NAME = ".lock"


@contextlib.contextmanager
def run_lock(run_dir: Path):
    """Hold an exclusive OS lock on ``run_dir`` (``flock`` on ``run_dir/.lock``) while a run writes.

    The operating system releases the lock when the process ends, however it ends (a crash or
    a kill included), so a stale lock file never blocks a later resume; a second process that
    tries to write the same run folder meanwhile is refused with a one-line error. Where
    ``fcntl`` does not exist (Windows) the folder is not locked.
    """
    try:
        import fcntl
    except ImportError:   # no flock: unlocked, as before
        yield
        return
    path = Path(run_dir) / LOCK_NAME
    fh = open(path, "a+")
    try:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            raise ValueError(f"run folder {run_dir} is in use by {holder}; wait for it to finish "
                             "(two processes writing one run would corrupt it)") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"regrow process {os.getpid()}\n")
        fh.flush()
        yield
    finally:
        fh.close()   # closing the file releases the lock
