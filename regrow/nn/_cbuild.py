"""Compile-once, load-with-ctypes machinery shared by regrow's C kernels.

``regrow.nn._kernels`` (condensed layers), ``regrow.nn._sparse_kernels`` (SparseLinear) and
``regrow.nn._conv_kernels`` (SparseConv2d) each hold a small C source. On first use it is
compiled with the system compiler into a per-user cache, keyed by a hash of (source, compiler,
flags, CPU), and loaded through ``ctypes``. Any failure becomes :class:`KernelUnavailable` with
a one-line reason; the callers then use their pure-PyTorch paths. One meaning per environment
variable, for all of them:

* ``REGROW_DISABLE_KERNEL``: any value but empty, ``0``, ``false``, ``no`` or ``off`` disables
  the compiled kernels (callers fall back without a warning: it was asked for).
* ``REGROW_CACHE_DIR``: regrow's cache folder; compiled kernels go to its ``kernels/``
  subfolder. Default ``$XDG_CACHE_HOME/regrow``, else ``~/.cache/regrow``.
* ``CC``: the compiler (default ``gcc``, else ``cc`` on PATH).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

# a compile takes about a second here; a compiler that hangs (a stuck license check, a full
# disk over NFS) must not hang the training run that wanted the kernel
COMPILE_TIMEOUT_S = 300
_OFF = ("", "0", "false", "no", "off")

T = TypeVar("T")

#: OpenMP kernels try these in order: the native build, then a portable one for compilers that
#: reject -march=native.
OPENMP_FLAG_SETS = (("-O3", "-march=native", "-fopenmp"), ("-O3", "-fopenmp"))


class KernelUnavailable(Exception):
    """Why a compiled kernel cannot be used. ``quiet``: the user disabled it (no warning)."""

    def __init__(self, reason: str, quiet: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.quiet = quiet


def disabled_reason() -> str | None:
    """``"disabled by REGROW_DISABLE_KERNEL=..."`` when the variable asks for no kernels, else None."""
    value = os.environ.get("REGROW_DISABLE_KERNEL", "")
    if value.strip().lower() in _OFF:
        return None
    return f"disabled by REGROW_DISABLE_KERNEL={value}"


def cache_dir() -> Path:
    """Where compiled kernels live: ``$REGROW_CACHE_DIR/kernels``, else ``$XDG_CACHE_HOME/regrow/kernels``,
    else ``~/.cache/regrow/kernels``. (``Path.home()`` may raise RuntimeError without a home.)"""
    root = os.environ.get("REGROW_CACHE_DIR")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = str((Path(xdg) if xdg else Path.home() / ".cache") / "regrow")
    return Path(root) / "kernels"


def cpu_id() -> str:
    """Model name and feature flags of this CPU: ``-march=native`` builds must not be shared
    between different CPUs (virtual machines often report a generic model name, hence the flags)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        ident = [next((ln for ln in lines if ln.startswith(key)), "") for key in ("model name", "flags")]
        if any(ident):
            return "\n".join(ident)
    except OSError:
        pass
    return platform.processor() or platform.machine()


def compiler() -> str | None:
    """``$CC``, else ``gcc``, else ``cc`` on PATH, else None."""
    return os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")


def build(cc: str, flags: Sequence[str], source: str, target: Path) -> str | None:
    """Compile ``source`` into the shared library ``target`` atomically (concurrent processes may
    build at once); None on success, else the compiler's complaint. OSError: the folder is unusable."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src = Path(tmp) / (target.stem + ".c")
        src.write_text(source)
        tmp_so = Path(tmp) / target.name
        cmd = [cc, *flags, "-fPIC", "-shared", "-std=gnu11", str(src), "-o", str(tmp_so)]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"{' '.join(cmd)}: {exc}"
        if res.returncode != 0:
            return f"{cc} {' '.join(flags)} failed: {res.stderr.strip()[:300]}"
        os.replace(tmp_so, target)  # atomic: other processes never see a partial file
    return None


def compile_and_load(stem: str, source: str, flag_sets: Sequence[Sequence[str]],
                     wrap: Callable[[ctypes.CDLL, Path, list[str]], T]) -> T:
    """The first flag set that compiles and loads, as ``wrap(library, path, flags)``.

    ``wrap`` may raise OSError or AttributeError (a missing symbol, a wrong ABI version) to
    reject a library; the next flag set is tried then.

    Raises:
        KernelUnavailable: disabled, no compiler, or every flag set failed (reasons joined).
    """
    off = disabled_reason()
    if off is not None:
        raise KernelUnavailable(off, quiet=True)
    cc = compiler()
    if cc is None:
        raise KernelUnavailable("no C compiler (gcc/cc) on PATH")
    errors = []
    for flags in flag_sets:
        flags = list(flags)
        key = hashlib.sha256("\0".join([source, cc, *flags, cpu_id(), platform.machine()]).encode()).hexdigest()[:16]
        try:
            target = cache_dir() / f"{stem}_{key}.so"
            if not target.exists():
                err = build(cc, flags, source, target)
                if err is not None:
                    errors.append(err)
                    continue
            return wrap(ctypes.CDLL(str(target)), target, flags)
        except (OSError, AttributeError, RuntimeError) as exc:
            # an unusable cache folder (a file, read-only, no home directory) or a library
            # that does not load: report it and let the caller fall back
            errors.append(f"{type(exc).__name__}: {exc}")
    raise KernelUnavailable("; ".join(dict.fromkeys(errors)) or "unknown failure")


def warn_unavailable(what: str, reason: str, fallback: str, stacklevel: int = 3) -> None:
    """The one warning a kernel module gives when its kernel cannot be used."""
    warnings.warn(f"regrow: {what} unavailable ({reason}); {fallback}", RuntimeWarning, stacklevel=stacklevel)


def load_or_none(stem: str, source: str, flag_sets: Sequence[Sequence[str]],
                 wrap: Callable[[ctypes.CDLL, Path, list[str]], T], what: str, fallback: str
                 ) -> tuple[T | None, str | None]:
    """What a kernel module's ``load()`` does: ``(compile_and_load(...), None)``, or ``(None,
    reason)`` after one warning (none when the user disabled the kernels). Never raises."""
    try:
        return compile_and_load(stem, source, flag_sets, wrap), None
    except KernelUnavailable as exc:
        if not exc.quiet:   # stacklevel: the warning names the caller of the module's load()
            warn_unavailable(what, exc.reason, fallback, stacklevel=4)
        return None, exc.reason
