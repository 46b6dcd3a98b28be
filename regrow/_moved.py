"""Old import paths keep working: ``regrow.density`` is ``regrow.core.density``, and so on.

The modules moved when the package was grouped into core / experiments / export (see
docs/architecture.md). A meta-path finder maps each old name to its new module on first import,
so ``import regrow.train`` or ``from regrow.density import allocate_counts`` still work, without
a stub file per old name and without importing anything before it is asked for.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

MOVED: dict[str, str] = {
    **{f"regrow.{name}": f"regrow.core.{name}" for name in (
        "capture", "density", "distributed", "flat", "layers", "metrics", "optim_state", "sampling",
        "schedules", "selection", "sorted_keys")},
    **{f"regrow.{name}": f"regrow.experiments.{name}" for name in (
        "checkpoint", "cli", "compare", "config", "flops", "plots", "report", "train")},
    "regrow.ddp_train": "regrow.experiments.ddp",
    "regrow.backends.base": "regrow.core.target",
}


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        return None   # a throwaway module: exec_module puts the real one in its place

    def exec_module(self, module):
        # the import system returns whatever sys.modules holds under the name after exec_module
        sys.modules[module.__name__] = importlib.import_module(MOVED[module.__name__])


def install() -> None:
    if not any(isinstance(f, _MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.append(_MovedModuleFinder())
