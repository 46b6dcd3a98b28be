"""``regrow compare --vary KEY=V1,V2,...``: a grid of training settings on top of the
method x sparsity x seed matrix.

Any :class:`~regrow.experiments.config.TrainConfig` field can be varied (a method option such as
``gamma``, ``c`` or ``gamma_sal``, or a training flag such as ``update_interval``, ``epochs`` or
``widths``); several ``--vary`` form a grid. A setting applies only to the runs it changes:
a method option to the methods that take it, a sparsity setting to sparse runs, so a method
that does not take ``gamma`` runs once and is drawn as a flat reference line. A run folder is
named by the settings that differ from the base configuration, so a grid run whose settings
equal the base is the very folder a plain ``compare`` would write, and is reused.
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

from ..methods import REGISTRY, option_names
from .config import FIELDS, IMP_OPTIONS, METHOD_OPTIONS, TrainConfig, coerce

# set by their own flags
_OWN_FLAGS = {"method": "--methods", "sparsity": "--sparsity", "seed": "--seed and --seeds"}
# change nothing a comparison measures, or are not one value per run
_NOT_VARIABLE = ("threads", "data_dir", "checkpoint_every", "eval_batch_size", "model_options")
# fields a dense run does not read
SPARSE_ONLY = ("distribution", "update_interval", "drop_fraction", "drop_schedule", "stop_fraction",
               "dense_layers", "backend")
_LIST_KINDS = ("ints", "floats", "strs")


def parse_vary(texts: Sequence[str]) -> dict[str, list]:
    """``["gamma=0.5,1,2", "widths=300x100,600x200"]`` -> ``{"gamma": [0.5, 1.0, 2.0], ...}``.

    List-valued fields separate their items with ``x`` or ``/``. ``none`` stands for a method
    option's own default.

    Raises:
        ValueError: unknown or unvariable key, a key given twice, no or repeated values.
    """
    grid: dict[str, list] = {}
    for text in texts:
        if "=" not in text:
            raise ValueError(f"--vary expects KEY=V1,V2,..., got '{text}'")
        key, values = text.split("=", 1)
        name = key.strip().replace("-", "_")
        if name in _OWN_FLAGS:
            raise ValueError(f"--vary {key.strip()}: use {_OWN_FLAGS[name]} for it")
        if name in _NOT_VARIABLE:
            raise ValueError(f"--vary {key.strip()}: '{name}' cannot be varied (it is not one setting per run)")
        if name in grid:
            raise ValueError(f"--vary {key.strip()} is given twice; give all its values in one --vary")
        raw = [v.strip() for v in values.split(",") if v.strip()]
        if not raw:
            raise ValueError(f"--vary {key.strip()} has no values")
        kind = FIELDS[name].metadata["kind"] if name in FIELDS else None
        parsed = []
        for value in raw:
            if value.lower() in ("none", "null", "default") and name in FIELDS and FIELDS[name].default is None:
                parsed.append(None)
            elif kind in _LIST_KINDS:
                parsed.append(coerce(name, [v for v in re.split(r"[x/]", value) if v]))
            else:
                parsed.append(coerce(name, value))   # also rejects unknown keys, naming close ones
        if len({repr(v) for v in parsed}) != len(parsed):
            raise ValueError(f"--vary {key.strip()} repeats a value")
        grid[name] = parsed
    return grid


def applies(method: str, key: str) -> bool:
    """Whether setting ``key`` changes a run of ``method``."""
    if key in METHOD_OPTIONS:
        if method == "imp":   # run by the CLI as rounds, not an engine method
            return key in IMP_OPTIONS
        return METHOD_OPTIONS[key] in option_names(REGISTRY[method])
    if method == "dense":
        return key not in SPARSE_ONLY
    return True


def value_label(value: Any) -> str:
    """A setting's value as it appears in folder names and table headers."""
    if isinstance(value, (list, tuple)):
        return "x".join(value_label(v) for v in value) or "default"
    if isinstance(value, float):
        return f"{value:g}"
    if value is None:
        return "default"
    return re.sub(r"[^A-Za-z0-9._+-]", "_", str(value))


def changed_settings(base: TrainConfig, method: str, combo: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    """The part of a grid point that applies to ``method`` and differs from ``base`` (list values
    as tuples, so that a run's settings can be hashed)."""
    return tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in combo.items()
                 if applies(method, k) and getattr(base, k) != v)


def find_cell(cells: list[dict], method: str, sparsity: float | None, point: Mapping) -> dict | None:
    """The cell of ``method`` at ``sparsity`` (None: any, for dense) and grid ``point``: the
    point's keys that do not apply to the method are ignored (it ran once for all of them)."""
    for c in cells:
        if c["method"] != method or (sparsity is not None and c["sparsity"] != sparsity):
            continue
        settings = c.get("settings", {})
        if all(settings.get(k) == v for k, v in point.items() if applies(method, k)):
            return c
    return None
