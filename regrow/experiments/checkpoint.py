"""Checkpoints: written atomically, read back with ``torch.load(weights_only=True)``.

A checkpoint holds only tensors and plain containers (dict, list, str, int, float, bool,
None), so loading it never unpickles arbitrary objects (and a file that needs more is refused,
never loaded "unsafely"). Writing goes to a temporary file in the same folder, is flushed to
disk and read back; only then does the current checkpoint become ``checkpoint.prev.pt`` and
the new one ``checkpoint.pt``. A run folder therefore always holds the previous good
checkpoint too, and :func:`load_run_checkpoint` falls back to it, with a warning, when the
newest one is missing or damaged.
"""
from __future__ import annotations

import os
import pickle
import shutil
import warnings
from pathlib import Path

import torch

CHECKPOINT_NAME = "checkpoint.pt"
PREVIOUS_NAME = "checkpoint.prev.pt"
FORMAT_VERSION = 1


def checkpoint_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINT_NAME


def save_checkpoint(state: dict, path: str | Path) -> Path:
    """Write ``state`` to ``path``: temporary file, fsync, read back, then the old checkpoint
    becomes :data:`PREVIOUS_NAME` and the new one takes its place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            torch.save({"format_version": FORMAT_VERSION, **state}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        load_checkpoint(tmp)   # verified before anything older is given up
        if path.exists():
            # a second name for the current file first, so that checkpoint.pt never goes missing
            staged = path.with_name(f".{PREVIOUS_NAME}.{os.getpid()}.tmp")
            try:
                os.link(path, staged)
            except OSError:   # a file system without hard links
                shutil.copy2(path, staged)
            os.replace(staged, path.with_name(PREVIOUS_NAME))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint on the CPU; a missing or damaged file is a one-line error."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # torch's message advises weights_only=False: never for a file of unknown origin
        raise ValueError(f"checkpoint {path} cannot be read: damaged, or not a regrow checkpoint (it needs "
                         "more than tensors and plain containers, which is all regrow writes)") from None
    except Exception:  # torch raises several types for truncated or foreign files
        raise ValueError(f"checkpoint {path} cannot be read (truncated or not a torch file)") from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"checkpoint {path} is not a regrow checkpoint (format {FORMAT_VERSION})")
    return state


def load_run_checkpoint(run_dir: str | Path) -> dict:
    """The newest readable checkpoint of a run folder: ``checkpoint.pt``, or, when that one is
    missing or damaged, ``checkpoint.prev.pt`` with a warning saying which and why."""
    newest = checkpoint_path(run_dir)
    previous = newest.with_name(PREVIOUS_NAME)
    try:
        return load_checkpoint(newest)
    except (ValueError, FileNotFoundError) as err:
        if not previous.is_file():
            raise
        state = load_checkpoint(previous)
        warnings.warn(f"regrow: {err}; using the previous checkpoint {previous} (step {state.get('step')})",
                      RuntimeWarning, stacklevel=2)
        return state


def rng_states() -> dict[str, torch.Tensor | list[torch.Tensor]]:
    """The global RNGs that dropout and friends draw from: the CPU one, and every visible GPU's."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return {"rng": torch.get_rng_state(), "cuda_rng": [s.cpu() for s in cuda]}


def set_rng_states(state: dict) -> None:
    """Restore :func:`rng_states`; checkpoints without GPU states (CPU runs, older files) load as
    they are, and only the GPUs present now are restored (a run resumed on fewer devices)."""
    torch.set_rng_state(state["rng"].cpu())   # both setters take CPU byte tensors, whatever map_location did
    cuda = state.get("cuda_rng") or []
    if cuda and torch.cuda.is_available():
        for index, rng in enumerate(cuda[:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(rng.cpu(), index)
