"""One file per method; each says only how it scores and chooses (see base.py)."""
from . import cht, dense, dstee, gmp, grasp, gse, mest, rigl, set, snfs, snip, srigl, static, synflow, topkast  # noqa: F401  (registers them)
from .base import REGISTRY, Method, UpdateContext, make_method, option_names, register

METHODS: tuple[str, ...] = ("dense", "static", "set", "rigl", "gse", "dstee", "srigl", "gmp",
                           "snip", "grasp", "synflow", "snfs", "mest", "cht",
                           "topkast")
assert sorted(METHODS) == sorted(REGISTRY), "every registered method must be listed in METHODS"

__all__ = ["METHODS", "REGISTRY", "Method", "UpdateContext", "make_method", "option_names", "register"]
