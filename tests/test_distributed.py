"""DDP with rank-identical masks: two gloo processes on CPU.

Every test forks two ranks that share a file-store process group (forking costs ~0.1 s where
spawning would re-import torch in each child for several seconds). Each rank trains the same
tiny network wrapped in DistributedDataParallel on its own shard of every global batch; full
masks are gathered to rank 0 and compared there, and the same run is repeated in this process
with the whole batch to check that two ranks with batch b equal one process with batch 2b.
"""
from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import traceback
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from regrow import DynamicSparsity
from regrow.experiments.checkpoint import load_checkpoint
from regrow.experiments.config import TrainConfig
from regrow.experiments.ddp import (Group, current_group, epoch_batches, process_group_from_env, steps_per_epoch,
                              sum_over_ranks, wrap)
from regrow.core.distributed import (all_reduce_sum, check_masks_agree, global_rows,
                                mask_checksum, mask_checksums, unwrap)

WORLD = 2
BATCH = 12            # per rank; the single-process reference uses WORLD * BATCH
STEPS = 24            # updates at steps 4, 8, 12, 16 (stop_fraction 0.75 -> no update from 18 on)
INTERVAL = 4
N_UPDATES = 4

# name -> (method, options, model)
SCENARIOS = {
    "set": ("set", {}, "mlp"),
    "rigl": ("rigl", {}, "mlp"),
    "gse": ("gse", {}, "mlp"),
    "gse-grabo": ("gse", {"sampling": "grabo", "gamma": 0.5}, "mlp"),
    "gse-graest": ("gse", {"sampling": "graest", "gamma": 0.5}, "mlp"),
    "dstee": ("dstee", {"c": 1e-2}, "mlp"),
    "srigl": ("srigl", {}, "mlp"),
    "rigl-cnn": ("rigl", {}, "cnn"),
    "srigl-cnn": ("srigl", {}, "cnn"),
}
STATIC = {"static": ("static", {}, "mlp")}   # never updates: only checked at construction
# always-sparse layers (regrow.nn.SparseLinear): GSE's subset gradients come from per-rank h, delta
SPARSE_SCENARIOS = {
    "gse-sparse": ("gse", {}, "sparse"),
    "gse-grabo-sparse": ("gse", {"sampling": "grabo"}, "sparse"),
    "set-sparse": ("set", {}, "sparse"),
    # SparseConv2d: tap gradients per kernel offset, RigL's blocks and GraBo's |grad| sums averaged
    "rigl-sparse-cnn": ("rigl", {}, "sparse_cnn"),
    "gse-grabo-sparse-cnn": ("gse", {"sampling": "grabo"}, "sparse_cnn"),
}
ALL_SCENARIOS = {**SCENARIOS, **SPARSE_SCENARIOS, **STATIC}


# -- the launcher ------------------------------------------------------------------------------
def _entry(rank: int, world: int, store: str | None, out: str, fn, args) -> None:
    torch.set_num_threads(1)   # two ranks on a shared 2-core machine; also fork-safe for OpenMP
    if store is not None:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        result = {"ok": True, "value": fn(rank, world, *args)}
    except Exception as e:  # reported to the test, which asserts on it
        result = {"ok": False, "type": type(e).__name__, "message": str(e), "trace": traceback.format_exc()}
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))


def launch(tmp_path, fn, *args, world: int = WORLD, group: bool = True) -> list[dict]:
    """Run ``fn(rank, world, *args)`` in ``world`` forked ranks sharing a gloo process group
    (none with ``group=False``: ``fn`` joins one itself); each rank's result or error."""
    import torch._dynamo  # noqa: F401  DDP imports it on first use: seconds per rank unless inherited
    store = str(tmp_path / "store") if group else None
    mp.start_processes(_entry, args=(world, store, str(tmp_path), fn, args), nprocs=world,
                       start_method="fork")
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


def _value(result: dict):
    assert result["ok"], f"rank failed: {result.get('trace')}"
    return result["value"]


# -- the training run shared by the ranks and the single-process reference ----------------------
def make_data(n: int = 2 * WORLD * BATCH * STEPS) -> tuple[torch.Tensor, torch.Tensor]:
    """A learnable 10-class problem on 1x8x8 inputs (a random linear teacher)."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(n, 1, 8, 8, generator=g)
    teacher = torch.randn(64, 10, generator=g)
    return x, (x.flatten(1) @ teacher).argmax(1)


def make_model(kind: str) -> nn.Module:
    torch.manual_seed(123)   # the same initial weights everywhere (DDP would broadcast them anyway)
    if kind == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32), nn.ReLU(),
                             nn.Linear(32, 10))
    if kind == "sparse":
        from regrow.nn.sparse_linear import SparseLinear
        return nn.Sequential(nn.Flatten(), SparseLinear(64, 48, 0.3, seed=1), nn.ReLU(),
                             SparseLinear(48, 32, 0.3, seed=2), nn.ReLU(), SparseLinear(32, 10, 0.5, seed=3))
    if kind == "sparse_cnn":
        from regrow.nn import SparseConv2d, SparseLinear
        return nn.Sequential(SparseConv2d(1, 8, 3, density=0.3, seed=1), nn.ReLU(),
                             SparseConv2d(8, 8, 3, density=0.3, seed=2), nn.ReLU(), nn.Flatten(),
                             SparseLinear(8 * 4 * 4, 10, 0.5, seed=3))
    return nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 4 * 4, 10))


def train(scenario: str, data, *, rank: int = 0, world: int = 1, batch: int = WORLD * BATCH,
          ddp: bool = False, seed: int = 0, check_masks: bool = True, perturb: tuple | None = None,
          uneven: int = 0, nan_at: tuple | None = None) -> dict:
    """Train one scenario; this rank sees rows ``[rank * batch, (rank + 1) * batch)`` of each
    global batch of ``world * batch`` rows. ``perturb=(step, rank, layer)`` rewires one
    connection of ``layer`` on that rank after that step (a test-only divergence). ``uneven``
    extra rows go to the last rank (local batch sizes then differ). ``nan_at=(step, rank)``
    feeds that rank a NaN input at that step."""
    method, options, kind = ALL_SCENARIOS[scenario]
    x, y = data
    model = make_model(kind)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    dst = DynamicSparsity(model, opt, method=method, sparsity=0.8, total_steps=STEPS,
                          update_interval=INTERVAL, seed=seed, check_masks=check_masks, **options)
    net = wrap(model, current_group()) if ddp else model
    stride = world * batch + uneven
    for step in range(1, STEPS + 1):
        lo = (step - 1) * stride + rank * batch
        hi = lo + batch + (uneven if rank == world - 1 else 0)
        xb = x[lo:hi].clone()
        if nan_at == (step, rank):
            xb[0] = float("nan")
        opt.zero_grad()
        F.cross_entropy(net(xb), y[lo:hi]).backward()   # mean loss: DDP averages gradients
        dst.step()
        if perturb is not None and perturb[0] == step and perturb[1] == rank:
            target = next(t for t in dst.targets if t.name == perturb[2])
            drop = target.active_indices()[:1]
            grow = target.inactive_indices()[:1]
            target.rewire(drop, grow, torch.zeros(1))
    return {"masks": {n: m.clone() for n, m in dst.masks.items()},
            "weights": {n: p.detach().clone() for n, p in model.named_parameters()},
            "updates": dst.stats()["updates"], "checksum": mask_checksum(dst.targets)}


def gather_masks(masks: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]] | None:
    """Every rank's full masks, on rank 0 (None elsewhere)."""
    out: list[dict[str, torch.Tensor]] = [{} for _ in range(dist.get_world_size())]
    for name, m in masks.items():
        parts = [torch.empty_like(m, dtype=torch.uint8) for _ in out]
        dist.all_gather(parts, m.to(torch.uint8))
        for r, part in enumerate(parts):
            out[r][name] = part.bool()
    return out if dist.get_rank() == 0 else None


def _run_scenarios(rank: int, world: int, data, names: list[str], kwargs: dict) -> dict:
    results = {}
    for name in names:
        run = train(name, data, rank=rank, world=world, batch=BATCH, ddp=True, **kwargs)
        results[name] = {"all_masks": gather_masks(run["masks"]), **run}
    return results


# -- rank agreement and equivalence with one process -------------------------------------------
@pytest.fixture(scope="module")
def data():
    return make_data()


@pytest.fixture(scope="module")
def ddp_runs(data, tmp_path_factory):
    ranks = launch(tmp_path_factory.mktemp("ddp"), _run_scenarios, data, list(SCENARIOS), {})
    return [_value(r) for r in ranks]


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_masks_identical_on_every_rank(ddp_runs, scenario):
    run = ddp_runs[0][scenario]
    assert run["updates"] == N_UPDATES
    first, second = run["all_masks"]
    assert first.keys() == second.keys() and len(first) >= 3
    for name in first:
        assert torch.equal(first[name], second[name]), f"{scenario}: '{name}' differs between ranks"
    # the gathered masks are the ones each rank holds, and the ranks' checksums agree
    for name, mask in run["masks"].items():
        assert torch.equal(first[name], mask)
    assert run["checksum"] == ddp_runs[1][scenario]["checksum"]


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_two_ranks_equal_one_process_with_double_batch(ddp_runs, data, scenario):
    single = train(scenario, data, batch=WORLD * BATCH, seed=0)
    distributed = ddp_runs[0][scenario]
    initial = initial_masks(scenario)
    moved = 0
    for name, mask in single["masks"].items():
        assert torch.equal(distributed["masks"][name], mask), f"{scenario}: mask '{name}' differs"
        moved += int((mask != initial[name]).sum())
    assert moved > 0, "the topology never changed, so the comparison proves nothing"
    for name, w in single["weights"].items():
        torch.testing.assert_close(distributed["weights"][name], w, rtol=1e-4, atol=1e-5)


def initial_masks(scenario: str) -> dict[str, torch.Tensor]:
    method, options, kind = ALL_SCENARIOS[scenario]
    model = make_model(kind)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    dst = DynamicSparsity(model, opt, method=method, sparsity=0.8, total_steps=STEPS,
                          update_interval=INTERVAL, seed=0, **options)
    return {n: m.clone() for n, m in dst.masks.items()}


@pytest.fixture(scope="module")
def sparse_ddp_runs(data, tmp_path_factory):
    ranks = launch(tmp_path_factory.mktemp("ddp_sparse"), _run_scenarios, data, list(SPARSE_SCENARIOS), {})
    return [_value(r) for r in ranks]


@pytest.mark.parametrize("scenario", list(SPARSE_SCENARIOS))
def test_always_sparse_layers_under_ddp(sparse_ddp_runs, data, scenario):
    # values is an nn.Parameter (DDP all-reduces its gradient); the subset gradients GSE scores
    # are computed from each rank's captured h, delta and must be averaged over ranks as well
    run = sparse_ddp_runs[0][scenario]
    assert run["updates"] == N_UPDATES
    first, second = run["all_masks"]
    for name in first:
        assert torch.equal(first[name], second[name]), f"{scenario}: '{name}' differs between ranks"
    single = train(scenario, data, batch=WORLD * BATCH, seed=0)
    initial = initial_masks(scenario)
    moved = 0
    for name, mask in single["masks"].items():
        assert torch.equal(run["masks"][name], mask), f"{scenario}: mask '{name}' differs from one process"
        moved += int((mask != initial[name]).sum())
    assert moved > 0
    for name, w in single["weights"].items():
        torch.testing.assert_close(run["weights"][name], w, rtol=1e-4, atol=1e-5)


def _run_uneven(rank, world, data):
    run = train("gse-graest", data, rank=rank, world=world, batch=BATCH, ddp=True, uneven=5)
    return {"all_masks": gather_masks(run["masks"]), "updates": run["updates"]}


def test_graest_agrees_with_unequal_local_batches(tmp_path, data):
    # GraEst draws one sign per sample of the *global* batch; with local batches of 12 and 17
    # rows every rank must still consume the shared generator identically
    run = _value(launch(tmp_path, _run_uneven, data)[0])
    assert run["updates"] == N_UPDATES
    first, second = run["all_masks"]
    for name in first:
        assert torch.equal(first[name], second[name]), name


# -- divergence is caught ------------------------------------------------------------------------
def _run_diverging(rank, world, data, kwargs):
    run = train("rigl", data, rank=rank, world=world, batch=BATCH, **kwargs)
    return {"all_masks": gather_masks(run["masks"])}


def test_perturbed_rank_is_caught_naming_the_layer(tmp_path, data):
    # rank 1 rewires one connection of the middle layer after step 2; the update at step 4 checks
    kwargs = {"ddp": True, "perturb": (2, 1, "3.weight")}
    for result in launch(tmp_path, _run_diverging, data, kwargs):
        assert not result["ok"] and result["type"] == "MaskDivergenceError"
        assert "step 4" in result["message"] and "layer '3.weight'" in result["message"]


def test_check_can_be_switched_off(tmp_path, data):
    kwargs = {"ddp": True, "perturb": (2, 1, "3.weight"), "check_masks": False}
    first, second = _value(launch(tmp_path, _run_diverging, data, kwargs)[0])["all_masks"]
    # the divergence was real: it was only not checked
    assert torch.equal(first["1.weight"], second["1.weight"])
    assert not torch.equal(first["3.weight"], second["3.weight"])


def _run_nan(rank, world, data):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = train("rigl", data, rank=rank, world=world, batch=BATCH, ddp=True, nan_at=(16, 1))
    skipped = [str(w.message) for w in caught if "non-finite gradient" in str(w.message)]
    return {"all_masks": gather_masks(run["masks"]), "updates": run["updates"], "skipped": skipped}


def test_non_finite_gradient_on_one_rank_skips_the_update_on_all(tmp_path, data):
    # a NaN in rank 1's batch reaches every rank through DDP's all-reduce: all skip update 16
    results = [_value(r) for r in launch(tmp_path, _run_nan, data)]
    for res in results:
        assert res["updates"] == N_UPDATES - 1 and len(res["skipped"]) == 1 and "step 16" in res["skipped"][0]
    first, second = results[0]["all_masks"]
    assert all(torch.equal(first[n], second[n]) for n in first)


def _seeded_by_rank(rank, world, data, method):
    return train(method, data, rank=rank, world=world, batch=BATCH, ddp=True, seed=rank)


@pytest.mark.parametrize("method", ["set", "static"])
def test_rank_dependent_seed_is_caught_before_training(tmp_path, data, method):
    # static never updates, so only the check at construction can see it
    for result in launch(tmp_path, _seeded_by_rank, data, method):
        assert result["type"] == "MaskDivergenceError"
        assert "at step 0" in result["message"] and "layer '1.weight'" in result["message"]


def test_unsynchronised_gradients_are_caught(tmp_path, data):
    # forgetting the DDP wrapper: each rank grows by its own shard's gradient
    for result in launch(tmp_path, _run_diverging, data, {"ddp": False}):
        assert result["type"] == "MaskDivergenceError"
        assert "step 4" in result["message"]


# -- the helpers -------------------------------------------------------------------------------
def _helpers(rank, world):
    local = 3 if rank == 0 else 5
    a = torch.full((4,), float(rank + 1))
    b = torch.arange(6, dtype=torch.bfloat16).view(2, 3) * (rank + 1)
    sa, sb = all_reduce_sum(a, b)
    return {"rows": global_rows(local), "a": sa, "b": sb}


def test_helpers_across_ranks(tmp_path):
    first, second = (_value(r) for r in launch(tmp_path, _helpers))
    assert first["rows"] == (0, 8) and second["rows"] == (3, 8)
    for res in (first, second):
        assert torch.equal(res["a"], torch.full((4,), 3.0))
        assert res["b"].dtype == torch.bfloat16 and res["b"].shape == (2, 3)
        assert torch.equal(res["b"], torch.arange(6, dtype=torch.bfloat16).view(2, 3) * 3)


def test_helpers_are_identities_in_one_process():
    t = torch.randn(5)
    (same,) = all_reduce_sum(t)
    assert same is t
    assert global_rows(7) == (0, 7)
    model = nn.Linear(2, 2)
    assert unwrap(model) is model and unwrap(nn.DataParallel(model)) is model
    check_masks_agree([], step=1)   # no process group: nothing to compare, no error


def test_checksum_sees_every_change(data):
    run = train("set", data)
    model = make_model("mlp")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    dst = DynamicSparsity(model, opt, method="set", sparsity=0.8, total_steps=STEPS, seed=0)
    before, digest = mask_checksums(dst.targets), mask_checksum(dst.targets)
    t = dst.targets[1]
    t.rewire(t.active_indices()[:1], t.inactive_indices()[:1], torch.zeros(1))
    after = mask_checksums(dst.targets)
    assert before[1] != after[1] and torch.equal(before[[0, 2]], after[[0, 2]])
    assert mask_checksum(dst.targets) != digest
    assert isinstance(run["checksum"], str) and len(run["checksum"]) == 16


class _Indices:
    """The two things a checksum reads from a target."""

    def __init__(self, flat):
        self.flat = torch.tensor(sorted(flat), dtype=torch.long)
        self.nnz = len(flat)

    def active_indices(self):
        return self.flat


@given(st.sets(st.integers(1, 10**6), min_size=2, max_size=40), st.data())
def test_checksum_separates_structured_moves(active, data):
    # moving one connection up by d and another down by d cancels in any linear hash
    a, c = sorted(active)[0], sorted(active)[-1]
    d = data.draw(st.integers(1, 1000))
    moved = (active - {a, c}) | {a + d, c - d}
    if moved == active or len(moved) != len(active):
        return
    assert mask_checksums([_Indices(active)]) != mask_checksums([_Indices(moved)])


def test_checksum_depends_on_layer_order_and_count():
    one, two = _Indices([1, 2, 3]), _Indices([4, 5, 6])
    assert mask_checksum([one, two]) != mask_checksum([two, one])
    assert mask_checksums([_Indices([0])]) != mask_checksums([_Indices([])])


# -- the torchrun training helpers (regrow.ddp_train) ---------------------------------------------
@given(n=st.integers(1, 500), per_rank=st.integers(1, 40), world=st.integers(1, 4), epoch=st.integers(0, 3))
def test_rank_batches_tile_the_single_process_batches(n, per_rank, world, epoch):
    batch = per_rank * world
    groups = [Group(rank=r, world_size=world) for r in range(world)]
    shards = [epoch_batches(n, batch, 5, epoch, g) for g in groups]
    single = epoch_batches(n, batch, 5, epoch, Group())
    steps = steps_per_epoch(n, batch, groups[0])
    assert steps == math.ceil(n / batch) == len(single)
    assert all(len(s) == steps for s in shards)   # every rank steps the same number of times
    for j in range(steps):
        together = torch.cat([s[j] for s in shards])
        assert len({len(s[j]) for s in shards}) == 1
        if j < steps - 1:
            assert sorted(together.tolist()) == sorted(single[j].tolist())
        else:   # the sampler pads by wrapping round: up to world - 1 extra samples of this epoch
            assert set(single[j].tolist()) <= set(together.tolist())
            assert len(together) - len(single[j]) == math.ceil(n / world) * world - n


def test_batch_size_must_split_evenly():
    with pytest.raises(ValueError, match="divisible by the number of processes"):
        epoch_batches(100, 30, 0, 0, Group(rank=0, world_size=4))


def _from_env(rank, world, port):
    # what torchrun puts in each worker's environment
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    with process_group_from_env() as group:
        sums = sum_over_ranks(rank + 1.5, 10)
        joined = (group.rank, group.world_size, group.backend, group.device.type, group.is_main)
        model = wrap(nn.Linear(2, 2), group)
    created_and_destroyed = not dist.is_initialized()
    return {"sums": sums, "joined": joined, "ddp": isinstance(model, DDP), "closed": created_and_destroyed}


def test_process_group_from_torchrun_environment(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = [_value(r) for r in launch(tmp_path, _from_env, port, group=False)]
    for rank, res in enumerate(results):
        assert res["sums"] == (4.0, 20.0)
        assert res["joined"] == (rank, 2, "gloo", "cpu", rank == 0)
        assert res["ddp"] and res["closed"]


def test_one_process_is_a_group_of_one(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with process_group_from_env() as group:
        assert (group.rank, group.world_size, group.is_main, group.distributed) == (0, 1, True, False)
        model = nn.Linear(2, 2)
        assert wrap(model, group) is model
        assert sum_over_ranks(1.0, 2.0) == (1.0, 2.0)
    assert not dist.is_initialized()


# -- regrow.train under a process group (what `torchrun -m regrow train` runs on each rank) ------
# synthetic: 2000 samples, global batch 100 -> 20 steps per epoch, no sampler padding
RUN = TrainConfig(dataset="synthetic", widths=[32], epochs=2, batch_size=100, update_interval=4,
                  sparsity=0.8, method="rigl", threads=1)


def _train_ranks(rank, world, root, runs):
    from regrow.experiments.train import train as train_run
    out = {}
    for name, kwargs in runs:
        run_dir = os.path.join(root, name if kwargs.pop("shared", True) else f"{name}-rank{rank}")
        out[name] = train_run(kwargs.pop("config", None), run_dir, **kwargs)
    return out


@pytest.fixture(scope="module")
def ddp_training(tmp_path_factory):
    """(run folder, every rank's return values, the single-process summary)."""
    from regrow.experiments.train import train as train_run
    root = tmp_path_factory.mktemp("ddp_train")
    # first, so the forked ranks inherit its imports (data, tqdm, yaml: seconds otherwise)
    single = train_run(RUN, root / "single")
    runs = [("whole", {"config": RUN, "shared": False}),
            ("broken", {"config": RUN.replace(checkpoint_every=6), "stop_after_steps": 27}),
            ("broken", {"resume": True})]
    ranks = [_value(r) for r in launch(root, _train_ranks, str(root), runs)]
    return root, ranks, single


def test_ddp_training_writes_from_rank_zero_only(ddp_training):
    root, ranks, _ = ddp_training
    assert not (root / "whole-rank1").exists()
    summary = json.loads((root / "whole-rank0" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 40 and summary["updates"] == 7
    assert summary["batch_size"] == 100   # the global batch
    assert ranks[1]["whole"]["mask_checksum"] == summary["mask_checksum"]   # every rank ends alike
    assert len((root / "whole-rank0" / "metrics.jsonl").read_text().splitlines()) == 2


def test_ddp_training_equals_one_process(ddp_training):
    root, _, single = ddp_training
    two = json.loads((root / "whole-rank0" / "summary.json").read_text())
    assert single["world_size"] == 1
    assert two["mask_checksum"] == single["mask_checksum"]
    assert two["test_accuracy"] == pytest.approx(single["test_accuracy"], abs=2 / 500)  # <= 1 sample flips
    assert two["final_loss"] == pytest.approx(single["final_loss"], rel=1e-4)
    assert two["train_flops_ratio"] == pytest.approx(single["train_flops_ratio"])


def test_ddp_resume_is_bitwise(ddp_training):
    root, _, _ = ddp_training
    whole, broken = (load_checkpoint(root / d / "checkpoint.pt") for d in ("whole-rank0", "broken"))
    for key, value in whole["model"].items():
        assert torch.equal(value, broken["model"][key]), key
    for name, mask in whole["masks"].items():
        assert torch.equal(mask, broken["masks"][name]), name
    drop = lambda rows: [{k: v for k, v in r.items() if k != "epoch_seconds"} for r in rows]  # noqa: E731
    assert drop(whole["history"]) == drop(broken["history"])
    sw, sb = (json.loads((root / d / "summary.json").read_text()) for d in ("whole-rank0", "broken"))
    assert sw["mask_checksum"] == sb["mask_checksum"] and sb["world_size"] == 2


def test_torchrun_without_a_process_group_is_refused(monkeypatch, tmp_path):
    # e.g. `torchrun -m regrow compare`: each rank would train alone into the same folders
    from regrow.experiments.train import train as train_run
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(ValueError, match="no process group was joined"):
        train_run(RUN, tmp_path / "run")
    assert not (tmp_path / "run").exists()


# -- end to end: torchrun, two processes, the built-in digits -------------------------------------
@pytest.mark.slow
def test_torchrun_train_end_to_end(tmp_path):
    from regrow.experiments.cli import main
    flags = ["--dataset", "digits", "--epochs", "1", "--widths", "32", "--update-interval", "4",
             "--method", "rigl", "--threads", "1", "--quiet"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "regrow", "train", *flags, "--out", str(tmp_path / "ddp")]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=180,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 12 and summary["updates"] == 2
    assert {"checkpoint.pt", "config.yaml", "metrics.jsonl"} <= {p.name for p in (tmp_path / "ddp").iterdir()}
    # the same command in one process takes the same global batches and ends with the same masks
    assert main(["train", *flags, "--out", str(tmp_path / "one")]) == 0
    single = json.loads((tmp_path / "one" / "summary.json").read_text())
    assert single["world_size"] == 1 and summary["mask_checksum"] == single["mask_checksum"]
