"""Checkpoints: written atomically, read back with ``torch.load(weights_only=True)``.

A checkpoint holds only tensors and plain containers (dict, list, str, int, float, bool,
None), so loading it never unpickles arbitrary objects. Writing goes to a temporary file in
the same folder, is flushed to disk, then renamed over the old checkpoint, so an interrupted
write leaves the previous checkpoint intact.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT_VERSION = 1


def checkpoint_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINT_NAME


def save_checkpoint(state: dict, path: str | Path) -> Path:
    """Write ``state`` to ``path`` atomically (temporary file + ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            torch.save({"format_version": FORMAT_VERSION, **state}, fh)
            fh.flush()
            os.fsync(fh.fileno())
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
    except Exception as err:  # torch raises several types for truncated or foreign files
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"checkpoint {path} cannot be read ({first})") from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"checkpoint {path} is not a regrow checkpoint (format {FORMAT_VERSION})")
    return state


def rng_states() -> dict[str, torch.Tensor | list[torch.Tensor]]:
    """The global RNGs that dropout and friends draw from: the CPU one, and every visible GPU's."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return {"rng": torch.get_rng_state(), "cuda_rng": [s.cpu() for s in cuda]}


def set_rng_states(state: dict) -> None:
    """Restore :func:`rng_states`; checkpoints without GPU states (CPU runs, older files) load as
    they are, and only the GPUs present now are restored (a run resumed on fewer devices)."""
    torch.set_rng_state(state["rng"])
    cuda = state.get("cuda_rng") or []
    if cuda and torch.cuda.is_available():
        for index, rng in enumerate(cuda[:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(rng, index)
