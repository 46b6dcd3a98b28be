"""How methods are named and ordered in tables and figures (shared by report and plots)."""
from __future__ import annotations

from ..methods import METHODS

DISPLAY = {"dense": "Dense", "static": "Static", "set": "SET", "rigl": "RigL", "gse": "GSE",
           "dstee": "DST-EE", "srigl": "SRigL", "gmp": "GMP",
           "snip": "SNIP", "grasp": "GraSP", "synflow": "SynFlow", "snfs": "SNFS", "mest": "MEST", "cht": "CHT", "topkast": "Top-KAST",
           "imp": "IMP (lottery ticket)"}
#: the engine's methods, then those the CLI runs as several of them
ORDER = METHODS + ("imp",)


def display_name(method: str) -> str:
    """The name a paper would print for ``method`` (its registry key when it has none)."""
    return DISPLAY.get(method, method)


def method_order(method: str) -> tuple[int, str]:
    """Sort key: the order of ``regrow.METHODS`` then imp, unknown names last, alphabetically."""
    return (ORDER.index(method) if method in ORDER else len(ORDER), method)
