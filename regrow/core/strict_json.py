"""The one JSON writer every file regrow writes goes through: strict JSON, always parseable.

Python's ``json.dumps`` writes ``NaN`` and ``Infinity`` by default, which strict parsers (and
most tools besides Python) reject. Here a non-finite float becomes ``null`` and
``allow_nan=False`` makes any that slipped through an error instead of an invalid file.
"""
from __future__ import annotations

import json
import math
from typing import Any


def finite_or_none(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, +-inf), at any depth, replaced by None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def dumps(obj: Any, **kwargs) -> str:
    """``json.dumps`` of ``obj`` with non-finite floats written as null (strict JSON)."""
    return json.dumps(finite_or_none(obj), allow_nan=False, **kwargs)
