"""Iterative magnitude pruning with rewinding (``--method imp``): per-round counts, rewinding,
magnitude choice, resume, compare and FLOPs, each against a computation made here."""
from __future__ import annotations

import json

import pytest
import torch

from regrow.experiments import ddp
from regrow.experiments.checkpoint import load_run_checkpoint
from regrow.experiments.cli import main
from regrow.experiments.compare import run_compare
from regrow.experiments.config import TrainConfig, load_yaml
from regrow.experiments.imp import run_imp
from regrow.experiments.report import write_report
from regrow.experiments.setup import build_run
from regrow.experiments.train import train

BASE = TrainConfig(dataset="digits", model="mlp", widths=[24, 16], epochs=2, batch_size=64, lr=0.05,
                   threads=1, method="imp", sparsity=0.9, rounds=2, rewind_epoch=1)
ROUNDS = 2


def s_k(k: int, s: float = 0.9, rounds: int = ROUNDS) -> float:
    return 1.0 - (1.0 - s) ** (k / rounds)


@pytest.fixture(scope="module", params=["global", "layer"])
def imp_run(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"imp-{request.param}")
    config = BASE.replace(scope=request.param)
    summary = run_imp(config, out)
    return request.param, out, summary


def _final(out, k):
    state = load_run_checkpoint(out / f"round-{k}")
    return state["model"], {n: m.bool() for n, m in state["masks"].items()}


def test_each_round_keeps_exactly_its_target_count(imp_run):
    scope, out, _ = imp_run
    for k in range(1, ROUNDS + 1):
        _, masks = _final(out, k)
        assert masks, "no sparsified layers"
        if scope == "global":
            total = sum(m.numel() for m in masks.values())
            assert sum(int(m.sum()) for m in masks.values()) == round((1 - s_k(k)) * total)
        else:
            for name, m in masks.items():
                assert int(m.sum()) == round((1 - s_k(k)) * m.numel()), name


def test_pruned_weights_are_the_smallest_magnitudes_of_the_previous_round(imp_run):
    scope, out, _ = imp_run
    for k in range(1, ROUNDS + 1):
        prev_w, prev_m = _final(out, k - 1)
        _, masks = _final(out, k)
        groups = [list(masks)] if scope == "global" else [[n] for n in masks]
        for names in groups:
            assert all(not (masks[n] & ~prev_m[n]).any() for n in names), "a pruned weight came back"
            kept = torch.cat([prev_w[n].abs()[masks[n]] for n in names])
            dropped = torch.cat([prev_w[n].abs()[prev_m[n] & ~masks[n]] for n in names])
            assert dropped.numel() > 0
            assert dropped.max() <= kept.min()


def test_survivors_start_each_round_at_their_rewind_values(imp_run, tmp_path):
    _, out, _ = imp_run
    # the epoch-1 weights, independently: a dense run of the same config stopped one step into epoch 2
    round0 = load_yaml(out / "round-0" / "config.yaml")
    steps = json.loads((out / "round-0" / "metrics.jsonl").read_text().splitlines()[0])["step"]
    train(round0.replace(rewind_epoch=None), tmp_path / "dense", stop_after_steps=steps + 1)
    rewind = load_run_checkpoint(tmp_path / "dense")["model"]
    for k in range(1, ROUNDS + 1):
        run = build_run(load_yaml(out / f"round-{k}" / "config.yaml"), ddp.current_group())
        _, masks = _final(out, k)
        start = run.model.state_dict()
        for name, value in rewind.items():
            expected = value * masks[name] if name in masks else value
            assert torch.equal(start[name], expected), (k, name)
        run.dst.close()


def test_summary_sums_flops_over_rounds_against_one_dense_run(imp_run):
    _, out, summary = imp_run
    rounds = [json.loads((out / f"round-{k}" / "summary.json").read_text()) for k in range(ROUNDS + 1)]
    assert summary["method"] == "imp" and summary["sparsity"] == 0.9
    assert summary["test_accuracy"] == rounds[-1]["test_accuracy"]
    assert summary["final_density"] == pytest.approx(0.1, abs=1e-3)
    assert summary["train_flops"] == pytest.approx(sum(r["train_flops"] for r in rounds))
    # round 0 is one dense run; the sparse rounds add about their densities each
    assert rounds[0]["method"] == "dense" and rounds[0]["train_flops_ratio"] == pytest.approx(1.0)
    expected = 1.0 + sum(r["train_flops"] for r in rounds[1:]) / rounds[0]["train_flops"]
    assert summary["train_flops_ratio"] == pytest.approx(expected)
    assert 1.0 + 0.9 * (1 - s_k(1)) < summary["train_flops_ratio"] < 1.0 + 1.1 * (1 - s_k(1) + 0.1)


def test_interrupted_round_resumes_bit_identical(tmp_path, imp_run):
    scope, out, summary = imp_run
    if scope != "global":
        pytest.skip("once is enough")
    interrupted = tmp_path / "imp"
    assert run_imp(BASE.replace(scope="global"), interrupted, stop_in_round=(1, 7)) is None
    assert not (interrupted / "summary.json").exists()
    # the same command again continues round 1 from its checkpoint, then round 2
    assert main(["train", "--method", "imp", "--rounds", "2", "--rewind-epoch", "1", "--sparsity", "0.9",
                 "--scope", "global", "--dataset", "digits", "--model", "mlp", "--widths", "24,16",
                 "--epochs", "2", "--batch-size", "64", "--lr", "0.05", "--threads", "1", "--quiet",
                 "--out", str(interrupted)]) == 0
    again = json.loads((interrupted / "summary.json").read_text())
    assert again["test_accuracy"] == summary["test_accuracy"]
    a, b = load_run_checkpoint(out / "round-2")["model"], load_run_checkpoint(interrupted / "round-2")["model"]
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_imp_refuses_a_different_config_in_the_same_folder(imp_run):
    _, out, _ = imp_run
    with pytest.raises(ValueError, match="another configuration"):
        run_imp(BASE.replace(scope="global", rounds=3), out)


def test_compare_runs_imp_as_one_row(tmp_path):
    base = BASE.replace(method="rigl", rounds=None, rewind_epoch=None, epochs=1, widths=[16])
    run_compare(base.replace(rounds=2), ["imp"], [0.9], [0], tmp_path, dense=True)
    results = write_report(tmp_path, plots=False)
    assert "IMP" in results["markdown"]
    methods = [json.loads(p.read_text())["method"] for p in tmp_path.rglob("summary.json")]
    assert sorted(methods) == ["dense", "dense", "imp", "static", "static"]   # rounds stay inside the imp run
    assert results["markdown"].count("| IMP") == 2 and "| Static" not in results["markdown"]


def test_rewind_epoch_zero_saves_the_initial_weights(tmp_path):
    config = BASE.replace(method="dense", sparsity=0.0, rounds=None, rewind_epoch=0, epochs=1)
    train(config, tmp_path / "run")
    saved = torch.load(tmp_path / "run" / "rewind.pt", weights_only=True)
    run = build_run(config, ddp.current_group())   # the seeded model before any step
    assert all(torch.equal(saved[n], v) for n, v in run.model.state_dict().items())
    run.dst.close()
    trained = load_run_checkpoint(tmp_path / "run")["model"]
    assert not all(torch.equal(saved[n], trained[n]) for n in saved)


def test_cli_resume_of_a_finished_imp_run_is_refused(imp_run, capsys):
    _, out, _ = imp_run
    assert main(["train", "--resume", str(out)]) == 1
    assert "already finished" in capsys.readouterr().err
