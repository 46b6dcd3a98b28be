"""Save and load exported models without pickle.

``save_exported(module, path)`` writes ``path.safetensors`` (tensors) and ``path.json`` (an
architecture spec); ``load_exported(path)`` rebuilds the module from the spec (a registry of
known layer types, never unpickled code) and loads the tensors. The spec describes the
architecture in one of two ways:

- ``tree``: the module is an ``nn.Sequential`` (possibly nested) of known layers; the spec lists
  every layer with its constructor arguments.
- ``regrow.models``: the module was built by ``regrow.models.build(name, num_classes, in_shape,
  **options)`` (recorded in ``module.regrow_arch`` or passed as ``arch=``); the spec records
  those arguments plus every layer that differs from a freshly built model (replaced by a
  Condensed/CSR layer, or resized by neuron removal), and loading rebuilds the model and swaps
  those layers in. This covers models whose forward is code (ResNets) without storing code.

The safetensors metadata holds SHA-256 digests of the spec and of the tensor data, so a
corrupted file, or a spec from another export, is a ``ValueError`` naming the file.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ..core import strict_json
from ..nn.condensed import CondensedLinear, CSRLinear
from ._kinds import BATCHNORMS, CONSTANT_PRESERVING_POOLS, CONVS, ELEMENTWISE_MODULES

SPEC_FORMAT = "regrow-exported"
SPEC_VERSION = 1



# ---------------------------------------------------------------------------------------------
# save / load
# ---------------------------------------------------------------------------------------------
def _registry() -> dict[str, type[nn.Module]]:
    """Layer types a spec may name: containers, torch layers, regrow's inference layers."""
    types: list[type[nn.Module]] = [
        nn.Sequential, nn.Linear, *CONVS, *BATCHNORMS, nn.LayerNorm, nn.GroupNorm, nn.Flatten, nn.Unflatten,
        nn.Softmax, nn.LogSoftmax, *ELEMENTWISE_MODULES, *CONSTANT_PRESERVING_POOLS,
        nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, CondensedLinear, CSRLinear,
    ]
    return {t.__name__: t for t in types}


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot describe {value!r} in JSON")


def _from_json(value: Any) -> Any:
    return tuple(_from_json(v) for v in value) if isinstance(value, list) else value


def _module_config(module: nn.Module) -> dict[str, Any]:
    """Constructor arguments of a registry layer, read back from its attributes."""
    cfg: dict[str, Any] = {}
    for p in list(inspect.signature(type(module).__init__).parameters.values())[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name in ("device", "dtype"):
            continue
        if p.name == "bias" and isinstance(getattr(module, "bias", None), (torch.Tensor, type(None))):
            cfg["bias"] = module.bias is not None
        elif p.name == "index_dtype":
            cfg["index_dtype"] = _jsonable(module.index_dtype)
        elif hasattr(module, p.name):
            try:
                cfg[p.name] = _jsonable(getattr(module, p.name))
            except TypeError:
                raise ValueError(f"cannot save {type(module).__name__}: option {p.name} is not JSON") from None
        elif p.default is inspect.Parameter.empty:
            raise ValueError(f"cannot save {type(module).__name__}: no attribute for argument {p.name}")
    return cfg


def _describe(module: nn.Module, path: str) -> dict[str, Any]:
    kind = type(module).__name__
    if _registry().get(kind) is not type(module):
        hint = "" if path else ("; pass arch= (regrow.models.build arguments) or set module.regrow_arch, "
                                "or use an nn.Sequential of known layers")
        raise ValueError(f"cannot save module '{path or '(root)'}' of type {kind}: not a known layer type{hint}")
    if isinstance(module, nn.Sequential):
        return {"type": "Sequential", "children": [[n, _describe(c, f"{path}.{n}" if path else n)]
                                                   for n, c in module.named_children()]}
    if any(True for _ in module.children()):
        raise ValueError(f"cannot save module '{path}' of type {kind}: it has submodules")
    return {"type": kind, "config": _module_config(module)}


def _construct(desc: Mapping[str, Any], where: str) -> nn.Module:
    reg = _registry()
    kind = desc.get("type") if isinstance(desc, Mapping) else None
    if kind not in reg:
        raise ValueError(f"{where}: unknown layer type {kind!r} in the spec")
    if kind == "Sequential":
        seq = nn.Sequential()
        for name, child in desc.get("children", []):
            seq.add_module(str(name), _construct(child, where))
        return seq
    raw = dict(desc.get("config", {}))
    config = {k: _from_json(v) for k, v in raw.items()}
    try:
        module = reg[kind](**config)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: cannot build {kind} from {config}: {exc}") from None
    if _module_config(module) != raw:
        raise ValueError(f"{where}: {kind} built from the spec does not match it ({config})")
    return module


def _paths(path: str | Path) -> tuple[Path, Path]:
    p = Path(path)
    if p.suffix in (".safetensors", ".json"):
        p = p.with_suffix("")
    return p.with_name(p.name + ".safetensors"), p.with_name(p.name + ".json")


def _data_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _arch_of(module: nn.Module, arch: Mapping[str, Any] | None) -> dict[str, Any]:
    arch = arch if arch is not None else getattr(module, "regrow_arch", None)
    if arch is None:
        return {"kind": "tree", "tree": _describe(module, "")}
    missing = {"name", "num_classes", "in_shape"} - set(arch)
    if missing:
        raise ValueError(f"arch needs name, num_classes and in_shape (regrow.models.build args); missing {sorted(missing)}")
    return {"kind": "regrow.models", "name": str(arch["name"]), "num_classes": int(arch["num_classes"]),
            "in_shape": [int(s) for s in arch["in_shape"]], "options": _jsonable_options(arch.get("options", {}))}


def _jsonable_options(options: Mapping[str, Any]) -> dict[str, Any]:
    try:
        return {str(k): _jsonable(v) for k, v in dict(options).items()}
    except TypeError as exc:
        raise ValueError(f"model options must be JSON values: {exc}") from None


def _build_arch(arch: Mapping[str, Any]) -> nn.Module:
    from .. import models  # the model zoo is needed only for exports of its models

    options = {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in arch.get("options", {}).items()}
    return models.build(arch["name"], arch["num_classes"], tuple(arch["in_shape"]), **options)


def _leaves(module: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in module.named_modules() if n and not any(True for _ in m.children())}


def save_exported(module: nn.Module, path: str | Path, *, arch: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write ``module`` as ``<path>.safetensors`` + ``<path>.json`` (no pickle).

    Args:
        module: an exported module (any module built from known layer types also works).
        path: file stem; a ``.safetensors`` or ``.json`` suffix is replaced.
        arch: ``regrow.models.build`` arguments ``{"name", "num_classes", "in_shape", "options"}``;
            defaults to ``module.regrow_arch``. Without either the module must be a (nested)
            ``nn.Sequential`` of known layers.

    Returns:
        ``{"weights": Path, "spec": Path, "bytes": int}`` (bytes of both files).

    Raises:
        ValueError: a layer the spec cannot describe.
    """
    from safetensors.torch import save_file

    weights_path, spec_path = _paths(path)
    spec_arch = _arch_of(module, arch)
    replaced: dict[str, Any] = {}
    if spec_arch["kind"] == "regrow.models":
        skeleton = _build_arch(spec_arch)
        skeleton_modules = dict(skeleton.named_modules())
        for name, leaf in _leaves(module).items():
            base = skeleton_modules.get(name)
            if base is None:
                raise ValueError(f"module '{name}' does not exist in {spec_arch['name']}; cannot save it as a "
                                 "modification of that architecture")
            if type(base) is type(leaf) and _registry().get(type(leaf).__name__) is not type(leaf):
                continue  # a model-specific layer export never changes (its tensors are checked on load)
            desc = _describe(leaf, name)
            if type(base) is not type(leaf) or _describe_or_none(base) != desc:
                replaced[name] = desc
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}
    spec = {
        "format": SPEC_FORMAT, "version": SPEC_VERSION, "arch": spec_arch, "replaced": replaced,
        "tensors": {k: {"dtype": str(v.dtype).replace("torch.", ""), "shape": list(v.shape)} for k, v in tensors.items()},
        "report": getattr(module, "regrow_export_report", None),
    }
    spec_text = strict_json.dumps(spec, indent=1, sort_keys=True)
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    spec_path.write_text(spec_text)
    save_file(tensors, str(weights_path), metadata={
        "format": f"{SPEC_FORMAT}/{SPEC_VERSION}",
        "spec_sha256": hashlib.sha256(spec_text.encode()).hexdigest(),
        "data_sha256": _data_digest(tensors),
    })
    return {"weights": weights_path, "spec": spec_path,
            "bytes": weights_path.stat().st_size + spec_path.stat().st_size}


def _describe_or_none(module: nn.Module) -> dict[str, Any] | None:
    try:
        return _describe(module, "")
    except ValueError:
        return None


def load_exported(path: str | Path) -> nn.Module:
    """Rebuild a module written by ``save_exported`` (``path``: the stem or either file).

    Returns:
        The module in eval mode, with ``regrow_export_report`` (and ``regrow_arch``) restored.

    Raises:
        FileNotFoundError: a file is missing.
        ValueError: a corrupted file, or a spec and tensors that do not belong together;
            the message names the file and what did not match.
    """
    from safetensors import SafetensorError
    from safetensors import safe_open
    from safetensors.torch import load_file

    weights_path, spec_path = _paths(path)
    for p in (weights_path, spec_path):
        if not p.is_file():
            raise FileNotFoundError(f"no exported model file at {p}")
    spec_bytes = spec_path.read_bytes()
    try:
        spec = json.loads(spec_bytes)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{spec_path}: not a regrow export spec (invalid JSON: {exc})") from None
    if not isinstance(spec, dict) or spec.get("format") != SPEC_FORMAT:
        raise ValueError(f"{spec_path}: not a regrow export spec (format is not {SPEC_FORMAT!r})")
    if spec.get("version") != SPEC_VERSION:
        raise ValueError(f"{spec_path}: spec version {spec.get('version')!r}, this regrow reads {SPEC_VERSION}")
    try:
        with safe_open(str(weights_path), framework="pt") as fh:
            meta = fh.metadata() or {}
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise ValueError(f"{weights_path}: corrupted safetensors file ({exc})") from None
    if meta.get("spec_sha256") != hashlib.sha256(spec_bytes).hexdigest():
        raise ValueError(f"{weights_path} does not belong to spec {spec_path} (spec digest mismatch: the spec "
                         "was edited or comes from another export)")
    if meta.get("data_sha256") != _data_digest(tensors):
        raise ValueError(f"{weights_path}: tensor data is corrupted (SHA-256 mismatch)")
    expected = spec.get("tensors", {})
    for name, info in expected.items():
        t = tensors.get(name)
        if t is None:
            raise ValueError(f"{weights_path}: tensor '{name}' listed in {spec_path.name} is missing")
        if list(t.shape) != info["shape"] or str(t.dtype).replace("torch.", "") != info["dtype"]:
            raise ValueError(f"{weights_path}: tensor '{name}' is {t.dtype} {list(t.shape)}, spec says "
                             f"{info['dtype']} {info['shape']}")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise ValueError(f"{weights_path}: tensors {extra[:5]} are not in {spec_path.name}")

    arch = spec.get("arch", {})
    where = str(spec_path)
    if arch.get("kind") == "tree":
        module = _construct(arch.get("tree", {}), where)
    elif arch.get("kind") == "regrow.models":
        try:
            module = _build_arch(arch)
        except ValueError as exc:
            raise ValueError(f"{where}: cannot build architecture {arch.get('name')!r}: {exc}") from None
        for name, desc in sorted(spec.get("replaced", {}).items()):
            try:
                module.get_submodule(name)
            except AttributeError:
                raise ValueError(f"{where}: replaced module '{name}' does not exist in {arch['name']}") from None
            module.set_submodule(name, _construct(desc, where))
        module.regrow_arch = {k: arch[k] for k in ("name", "num_classes", "in_shape", "options")}
    else:
        raise ValueError(f"{where}: unknown architecture kind {arch.get('kind')!r}")
    try:
        module.load_state_dict(tensors, strict=True)
    except (RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()
        raise ValueError(f"{weights_path} does not fit the architecture in {spec_path.name}: "
                         f"{' '.join(line.strip() for line in first[:3])}") from None
    module.eval()
    if spec.get("report") is not None:
        module.regrow_export_report = spec["report"]
    return module

