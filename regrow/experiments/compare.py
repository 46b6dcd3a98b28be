"""``regrow compare``: the (method x sparsity x seed) matrix, one run folder each, then a report.

Runs go sequentially in this process (the machines this targets have few cores). A run
whose ``summary.json`` exists is skipped, one with only a checkpoint is resumed, so an
interrupted comparison is continued by running the same command again. ``--vary`` adds a grid
of settings (see :mod:`.grid`).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from .checkpoint import checkpoint_path
from .config import METHOD_OPTIONS, TrainConfig, describe_differences, from_dict
from .grid import changed_settings
from .runfiles import CONFIG_NAME, read_summary
from .train import train


@dataclass(frozen=True)
class RunSpec:
    """One cell of the matrix."""

    method: str
    sparsity: float
    seed: int
    #: grid settings that differ from the base configuration, as (key, value) pairs
    settings: tuple[tuple[str, Any], ...] = ()

    @property
    def name(self) -> str:
        from .grid import value_label
        grid = "".join(f"-{key}{value_label(value)}" for key, value in self.settings)
        if self.method == "dense":
            return f"dense{grid}-seed{self.seed}"
        return f"{self.method}-sp{self.sparsity:g}{grid}-seed{self.seed}"


def plan(methods: list[str], sparsities: list[float], seeds: list[int], dense: bool = True,
         vary: dict[str, list] | None = None, base: TrainConfig | None = None) -> list[RunSpec]:
    """The runs of a comparison: per seed a dense baseline (optional) then every method x sparsity,
    for every point of the ``vary`` grid (each run only once: a setting that does not apply to a
    method, or equals ``base``, does not multiply its runs)."""
    if not methods:
        raise ValueError("--methods is empty")
    if "dense" in methods:
        raise ValueError("'dense' is the baseline that compare adds by itself (--no-dense leaves it out); "
                         "remove it from --methods")
    if not sparsities:
        raise ValueError("--sparsity is empty")
    if len(set(methods)) != len(methods) or len(set(sparsities)) != len(sparsities):
        raise ValueError("--methods and --sparsity must not repeat values")
    vary = vary or {}
    base = base or TrainConfig()
    combos = [dict(zip(vary, values)) for values in itertools.product(*vary.values())]
    specs: list[RunSpec] = []
    for seed in seeds:
        for combo in combos:
            if dense:
                specs.append(RunSpec("dense", 0.0, seed, changed_settings(base, "dense", combo)))
            specs += [RunSpec(m, s, seed, changed_settings(base, m, combo)) for m in methods for s in sparsities]
    return list(dict.fromkeys(specs))   # drop repeats, keep the order


def run_config(base: TrainConfig, spec: RunSpec) -> TrainConfig:
    """The base configuration specialised to one run (options other methods take are dropped).

    The dense baseline trains every weight, which the always-sparse backend cannot do: under
    ``backend="sparse"`` it runs on the masked backend (the same dense layers, no mask).
    """
    settings = {k: list(v) if isinstance(v, tuple) else v for k, v in spec.settings}
    cfg = base.replace(method=spec.method, sparsity=spec.sparsity, seed=spec.seed, **settings)
    if spec.method == "dense" and cfg.backend == "sparse":
        cfg = cfg.replace(backend="masked")
    keep = cfg.method_options(strict=False)
    cleared = {key: None for key in METHOD_OPTIONS}
    cleared.update(keep)
    return cfg.replace(**cleared)


def _merged_grid(path: Path, vary: dict[str, list]) -> dict[str, list]:
    """The grid recorded so far in ``path`` with ``vary``'s keys and values added: a folder keeps
    describing every run in it when commands with other (or no) ``--vary`` add to it."""
    recorded = dict((yaml.safe_load(path.read_text()) or {}).get("vary") or {}) if path.is_file() else {}
    for key, values in vary.items():
        known = recorded.setdefault(key, [])
        known += [v for v in values if v not in known]
    return recorded


def run_compare(base: TrainConfig, methods: list[str], sparsities: list[float], seeds: list[int], out: str | Path,
                *, dense: bool = True, progress: bool = False, vary: dict[str, list] | None = None,
                log: Callable[[str], None] | None = None) -> list[dict]:
    """Run (or skip, or resume) every run of the matrix (and ``vary`` grid) into ``out``;
    returns their summaries."""
    out = Path(out)
    specs = plan(methods, sparsities, seeds, dense, vary, base)
    configs = [(spec, run_config(base, spec).validate()) for spec in specs]
    # refuse to mix runs made with another configuration before spending any time (and before
    # touching compare.yaml, which describes the runs already there)
    for spec, cfg in configs:
        saved = out / spec.name / CONFIG_NAME
        if saved.is_file():
            diff = describe_differences(from_dict(yaml.safe_load(saved.read_text()) or {}), cfg)
            if diff:
                raise ValueError(f"{saved.parent} was made with another configuration ({'; '.join(diff[:3])}); "
                                 "use another --out or remove that run")
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.yaml").write_text(yaml.safe_dump(
        {"methods": methods, "sparsity": sparsities, "seeds": seeds, "dense": dense,
         "vary": _merged_grid(out / "compare.yaml", vary or {}), "base": base.to_dict()},
        sort_keys=False))

    from tqdm.auto import tqdm
    summaries = []
    bar = tqdm(configs, desc="compare", unit="run", disable=not progress, dynamic_ncols=True, position=0)
    for spec, cfg in bar:
        run_dir = out / spec.name
        bar.set_postfix_str(spec.name)
        done = read_summary(run_dir)
        if done is not None:
            summaries.append(done)
            if log:
                log(f"{spec.name}: finished earlier, test accuracy {100 * done['test_accuracy']:.2f}%")
            continue
        resume = checkpoint_path(run_dir).is_file()
        if cfg.method == "imp":   # rounds of ordinary runs inside run_dir, each resumable
            from .imp import run_imp
            resume = (run_dir / CONFIG_NAME).is_file()
            summary = run_imp(cfg, run_dir, progress=progress, progress_position=1)
        else:
            summary = train(cfg, run_dir, resume=resume, progress=progress, progress_position=1)
        summaries.append(summary)
        if log:
            log(f"{spec.name}: test accuracy {100 * summary['test_accuracy']:.2f}%, "
                f"itop {summary['itop_rate']:.3f}, {summary['wall_seconds']:.1f}s"
                + (" (resumed)" if resume else ""))
    bar.close()
    return summaries
