"""The compiled kernels' shared build machinery: environment variables, cache folder, fallbacks."""
import warnings

import pytest
import torch
import torch.nn.functional as F

from regrow.nn import CondensedLinear, _cbuild, _kernels, _sparse_kernels
from regrow.nn.sparse_linear import SparseLinear

LOADERS = [pytest.param(_kernels, id="condensed"), pytest.param(_sparse_kernels, id="sparse_linear")]


@pytest.fixture
def fresh_loaders():
    """Each test loads from scratch; later tests get the real kernels (from their cache) again."""
    for module in (_kernels, _sparse_kernels):
        module.load.cache_clear()
    yield
    for module in (_kernels, _sparse_kernels):
        module.load.cache_clear()


def _layers_still_work(*modules):
    """The layers of ``modules`` (kernel loaders) give their results on the fallback paths."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 10, generator=g)
    mask = torch.zeros(6, 10, dtype=torch.bool)
    mask[:, :3] = True
    x = torch.randn(4, 10, generator=g)
    with torch.no_grad():
        if _kernels in modules:
            torch.testing.assert_close(CondensedLinear.from_dense(w, mask)(x), F.linear(x, w * mask))
        if _sparse_kernels in modules:
            layer = SparseLinear(10, 6, density=0.3, seed=0)
            torch.testing.assert_close(layer(x), F.linear(x, layer.to_dense(), layer.bias), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("module", LOADERS)
def test_unusable_cache_dir_falls_back_with_one_warning(module, monkeypatch, tmp_path, fresh_loaders):
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    monkeypatch.setenv("REGROW_CACHE_DIR", str(afile))
    with pytest.warns(RuntimeWarning, match="unavailable") as record:
        assert module.load() is None
    assert len(record) == 1
    assert "afile" in module.unavailable_reason()
    with warnings.catch_warnings():
        warnings.simplefilter("error")      # once only: later calls are silent
        assert module.load() is None
        _layers_still_work(module)


@pytest.mark.parametrize("module", LOADERS)
def test_no_home_directory_falls_back(module, monkeypatch, fresh_loaders):
    monkeypatch.delenv("REGROW_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)

    def no_home():
        raise RuntimeError("Could not determine home directory.")
    monkeypatch.setattr(_cbuild.Path, "home", staticmethod(no_home))
    with pytest.warns(RuntimeWarning, match="home directory"):
        assert module.load() is None
    assert "RuntimeError" in module.unavailable_reason()


@pytest.mark.parametrize("value,off", [("1", True), ("true", True), ("yes", True), ("", False), ("0", False),
                                       ("false", False), ("OFF", False)])
def test_disable_variable_means_the_same_for_both(value, off, monkeypatch, fresh_loaders):
    monkeypatch.setenv("REGROW_DISABLE_KERNEL", value)
    assert (_cbuild.disabled_reason() is not None) == off
    if off:
        with warnings.catch_warnings():
            warnings.simplefilter("error")   # asked for: no warning
            assert _kernels.load() is None and _sparse_kernels.load() is None
        for module in (_kernels, _sparse_kernels):
            assert "REGROW_DISABLE_KERNEL" in module.unavailable_reason()
        _layers_still_work(_kernels, _sparse_kernels)


def test_both_kernels_build_under_cache_dir_kernels(monkeypatch, tmp_path, fresh_loaders):
    if _cbuild.compiler() is None:
        pytest.skip("no C compiler")
    monkeypatch.setenv("REGROW_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("REGROW_DISABLE_KERNEL", raising=False)
    condensed, sparse = _kernels.load(), _sparse_kernels.load()
    assert condensed is not None and sparse is not None
    assert condensed.path.parent == sparse.path.parent == tmp_path / "kernels"
    assert _kernels.cache_dir() == _sparse_kernels.cache_dir() == tmp_path / "kernels"
    assert sorted(p.name.split("_")[0] for p in (tmp_path / "kernels").iterdir()) == ["condensed", "sparse"]


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("REGROW_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert _cbuild.cache_dir() == tmp_path / "regrow" / "kernels"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setattr(_cbuild.Path, "home", staticmethod(lambda: tmp_path))
    assert _cbuild.cache_dir() == tmp_path / ".cache" / "regrow" / "kernels"


def test_compile_timeout_is_reported(monkeypatch, tmp_path):
    def hang(*args, **kwargs):
        raise _cbuild.subprocess.TimeoutExpired(args[0], kwargs["timeout"])
    monkeypatch.setattr(_cbuild.subprocess, "run", hang)
    err = _cbuild.build("gcc", ["-O3"], "int f(void) { return 1; }", tmp_path / "x.so")
    assert err is not None and "timed out" in err and not (tmp_path / "x.so").exists()
