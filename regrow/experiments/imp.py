"""Iterative magnitude pruning with rewinding (the lottery ticket; Frankle & Carbin 2019,
Frankle et al. 2020 for rewinding to an early epoch E instead of the initialisation).

``regrow train --method imp --rounds R --rewind-epoch E --sparsity s`` runs R + 1 ordinary,
resumable runs into ``OUT/round-0`` ... ``OUT/round-R``:

- round 0 trains the dense network (method ``dense``) and saves its weights at the end of
  epoch E (``round-0/rewind.pt``);
- round k >= 1 keeps the largest |w| of round k-1's final weights among its survivors, to the
  sparsity s_k = 1 - (1 - s)^(k/R) (the same fraction of the survivors pruned every round),
  over all layers together (``scope="global"``, default) or each layer on its own
  (``scope="layer"``: every layer at s_k); the survivors are reset to their epoch-E values
  (rewinding) and trained with method ``static`` and ``init_mask="existing"`` (the zeros are
  the mask) for the same epochs.

``OUT/summary.json`` is the last round's summary with ``method="imp"`` and the cost of all
rounds: ``train_flops`` is their sum and ``train_flops_ratio`` that sum over the FLOPs of ONE
dense run of the same epochs (so R rounds cost about 1 + sum_k (1 - s_k) of it, not < 1).
Running the same command again skips finished rounds and resumes an interrupted one.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from .checkpoint import checkpoint_path, load_run_checkpoint
from .config import METHOD_OPTIONS, TrainConfig, describe_differences, load_yaml, save_yaml
from .runfiles import CONFIG_NAME, read_summary, write_json, SUMMARY_NAME
from .train import REWIND_NAME, train

DEFAULT_ROUNDS = 3
START_NAME = "start.pt"


def round_sparsity(sparsity: float, k: int, rounds: int) -> float:
    """s_k = 1 - (1 - s)^(k / R): round k's target, pruning a constant fraction of the survivors."""
    return 1.0 - (1.0 - sparsity) ** (k / rounds)


def round_dir(out: str | Path, k: int) -> Path:
    return Path(out) / f"round-{k}"


def round_config(config: TrainConfig, k: int, start: Path | None) -> TrainConfig:
    """Round k's ordinary run: dense for k = 0 (saving the rewind weights), static from ``start``'s
    zeros otherwise."""
    cleared = {key: None for key in METHOD_OPTIONS}
    rounds = config.rounds or DEFAULT_ROUNDS
    if k == 0:
        return config.replace(method="dense", sparsity=0.0, rewind_epoch=config.rewind_epoch or 0, **cleared)
    return config.replace(method="static", sparsity=round_sparsity(config.sparsity, k, rounds), rewind_epoch=None,
                          init_weights=str(Path(start).resolve()), init_mask="existing", **cleared)


def magnitude_masks(weights: dict[str, torch.Tensor], survivors: dict[str, torch.Tensor], sparsity: float,
                    scope: str) -> dict[str, torch.Tensor]:
    """Keep the largest |w| among ``survivors`` so that a fraction ``sparsity`` of the weights is
    zero: over all layers together (``global``) or in every layer (``layer``). Pruned weights
    never return (a survivor count below the target is an error)."""
    numel = {name: weights[name].numel() for name in survivors}
    scores = {name: torch.where(survivors[name], weights[name].abs().float(), torch.tensor(-1.0))
              for name in survivors}
    if scope == "layer":
        keep = {name: round((1.0 - sparsity) * n) for name, n in numel.items()}
        return {name: _top(scores[name].flatten(), keep[name]).view_as(weights[name]) for name in survivors}
    flat = torch.cat([scores[name].flatten() for name in survivors])
    kept = _top(flat, round((1.0 - sparsity) * flat.numel()))
    out, start = {}, 0
    for name in survivors:
        out[name] = kept[start:start + numel[name]].view_as(weights[name])
        start += numel[name]
    return out


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    if k > int((scores >= 0).sum()):
        raise ValueError(f"cannot keep {k} weights: only {int((scores >= 0).sum())} survive the previous round")
    mask = torch.zeros(scores.numel(), dtype=torch.bool)
    mask[torch.topk(scores, k, sorted=False).indices] = True
    return mask


def _start_weights(config: TrainConfig, out: Path, k: int) -> Path:
    """Write round k's starting weights: round 0's rewind weights times the new mask."""
    prev = load_run_checkpoint(round_dir(out, k - 1))
    masks = {name: m.bool() for name, m in prev["masks"].items()}
    if not masks:
        raise ValueError(f"{round_dir(out, k - 1)} holds no masks to prune from")
    new = magnitude_masks(prev["model"], masks, round_sparsity(config.sparsity, k, config.rounds or DEFAULT_ROUNDS),
                          config.scope or "global")
    rewind = torch.load(round_dir(out, 0) / REWIND_NAME, map_location="cpu", weights_only=True)
    start = {name: (value * new[name].to(value.dtype) if name in new else value) for name, value in rewind.items()}
    path = round_dir(out, k) / START_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{START_NAME}.tmp")
    torch.save(start, tmp)
    tmp.replace(path)
    return path


def run_imp(config: TrainConfig | None, out: str | Path, *, progress: bool = False,
            log: Callable[[str], None] | None = None, progress_position: int = 0,
            stop_in_round: tuple[int, int] | None = None, tensorboard: bool = False) -> dict | None:
    """Run (or continue) every round of an imp run into ``out`` and return its summary.

    ``config`` None continues the run in ``out`` with its own ``config.yaml``; a given one must
    match it. ``stop_in_round=(k, steps)`` stops round k after that many steps as if killed
    there (to test resuming); returns None then. ``tensorboard``: each round writes its scalars
    (see :func:`~regrow.experiments.train.train`).
    """
    out = Path(out)
    saved = out / CONFIG_NAME
    if config is None:
        if not saved.is_file():
            raise FileNotFoundError(f"{out} holds no imp run ({CONFIG_NAME} missing)")
        config = load_yaml(saved)
    if config.method != "imp":
        raise ValueError(f"run_imp runs method 'imp', not '{config.method}'")
    config.validate()
    if saved.is_file():
        diff = describe_differences(load_yaml(saved), config)
        if diff:
            raise ValueError(f"{out} holds an imp run with another configuration ({'; '.join(diff[:3])}); "
                             "use another --out")
    done = read_summary(out)
    if done is not None:
        return done
    out.mkdir(parents=True, exist_ok=True)
    save_yaml(config, saved)
    rounds = config.rounds or DEFAULT_ROUNDS
    summaries = []
    for k in range(rounds + 1):
        folder = round_dir(out, k)
        summary = read_summary(folder)
        if summary is None:
            resume = checkpoint_path(folder).is_file()
            start = folder / START_NAME if k else None
            if k and not resume:
                start = _start_weights(config, out, k)
            cfg = round_config(config, k, start)
            if log:
                log(f"imp round {k}/{rounds}: sparsity {cfg.sparsity:.4f}" + (" (resumed)" if resume else ""))
            stop = stop_in_round[1] if stop_in_round is not None and stop_in_round[0] == k else None
            summary = train(None if resume else cfg, folder, resume=resume, progress=progress, log=log,
                            progress_position=progress_position, stop_after_steps=stop, tensorboard=tensorboard)
            if summary is None:
                return None
        summaries.append(summary)
    result = imp_summary(config, summaries)
    write_json(out / SUMMARY_NAME, result)
    return result


def imp_summary(config: TrainConfig, rounds: list[dict]) -> dict:
    """The last round's summary as imp's, with the cost of every round added up."""
    last, dense = rounds[-1], rounds[0]
    total = sum(r["train_flops"] for r in rounds)
    one_dense = dense["train_flops"] / dense["train_flops_ratio"]   # round 0 is dense: its ratio is 1
    return {**last, "method": "imp", "sparsity": config.sparsity, "config": config.to_dict(),
            "steps": sum(r["steps"] for r in rounds), "wall_seconds": sum(r["wall_seconds"] for r in rounds),
            "train_flops": total, "train_flops_ratio": total / one_dense,
            "train_flops_note": "summed over all rounds, relative to one dense run of the same epochs",
            "rounds": [{"round": k, "sparsity": r["sparsity"], "final_density": r["final_density"],
                        "test_accuracy": r["test_accuracy"], "train_flops": r["train_flops"]}
                       for k, r in enumerate(rounds)]}
