"""How methods are named and ordered in tables and figures (shared by report and plots)."""
from __future__ import annotations

from ..methods import METHODS

DISPLAY = {"dense": "Dense", "static": "Static", "set": "SET", "rigl": "RigL", "gse": "GSE",
           "dstee": "DST-EE", "srigl": "SRigL", "gmp": "GMP",
           "snip": "SNIP", "grasp": "GraSP", "synflow": "SynFlow", "snfs": "SNFS", "mest": "MEST", "cht": "CHT", "topkast": "Top-KAST"}


def display_name(method: str) -> str:
    """The name a paper would print for ``method`` (its registry key when it has none)."""
    return DISPLAY.get(method, method)


def method_order(method: str) -> tuple[int, str]:
    """Sort key: the order of ``regrow.METHODS``, unknown names last, alphabetically."""
    return (METHODS.index(method) if method in METHODS else len(METHODS), method)
