"""compare / report: the matrix, skipping finished runs, tables and plots."""
import json
import statistics

import pytest

from regrow.experiments.cli import main
from regrow.experiments.compare import RunSpec, plan
from regrow.experiments.report import aggregate, collect_runs, render_markdown, write_report

FAST = ["--dataset", "digits", "--widths", "12", "--epochs", "2", "--batch-size", "256",
        "--update-interval", "2", "--threads", "1", "--quiet"]
PLOTS = {"accuracy_vs_sparsity.png", "accuracy_curves.png", "itop_rate.png", "layer_density.png", "masks.png"}


def test_compare_then_skip_then_report(tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", "--methods", "static,rigl", "--sparsity", "0.5,0.8", "--seeds", "2", "--seed", "1", *FAST,
            "--gamma", "2", "--out", str(out)]   # --gamma: ignored by methods that lack it
    assert main(argv) == 0
    runs = sorted(p.name for p in out.iterdir() if p.is_dir() and p.name != "plots")
    assert runs == sorted(RunSpec(m, s, seed).name for seed in (1, 2)
                          for m, s in [("dense", 0.0), ("static", 0.5), ("static", 0.8), ("rigl", 0.5), ("rigl", 0.8)])
    results = json.loads((out / "results.json").read_text())
    assert results["methods"] == ["static", "rigl"] and results["sparsities"] == [0.5, 0.8]
    assert results["dense"]["n"] == 2 and all(c["n"] == 2 for c in results["cells"])
    assert results["seeds"] == [1, 2]
    assert {p.name for p in (out / "plots").iterdir()} == PLOTS
    assert all((out / "plots" / p).stat().st_size > 1000 for p in PLOTS)
    table = (out / "results.md").read_text()
    assert "| Method | 50% | 80% |" in table and "| RigL |" in table and "| Dense |" in table

    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/summary.json")}
    capsys.readouterr()
    (out / "rigl-sp0.8-seed1" / "summary.json").unlink()          # as if killed before writing it
    assert main([a for a in argv if a != "--quiet"] + ["--no-plots"]) == 0
    log = capsys.readouterr().out.splitlines()
    assert sum("finished earlier" in line for line in log) == 9
    assert any(line.startswith("rigl-sp0.8-seed1: test accuracy") for line in log)
    for path, stamp in stamps.items():
        if path.parent.name != "rigl-sp0.8-seed1":
            assert path.stat().st_mtime_ns == stamp                 # untouched
    assert (out / "rigl-sp0.8-seed1" / "summary.json").is_file()

    # report re-renders exactly what compare wrote (the re-run changed one run's wall time, so
    # compare against the second compare's table, not the first)
    rerun_table = (out / "results.md").read_text()
    (out / "results.md").unlink()
    (out / "plots" / "masks.png").unlink()
    assert main(["report", str(out)]) == 0
    assert (out / "results.md").read_text().split("\n", 3)[3] == rerun_table.split("\n", 3)[3]
    assert (out / "plots" / "masks.png").is_file()


def test_compare_refuses_a_changed_config(tmp_path, capsys):
    out = tmp_path / "cmp"
    base = ["compare", "--methods", "static", "--sparsity", "0.5", "--no-dense", "--no-plots", *FAST, "--out", str(out)]
    assert main(base) == 0
    record = (out / "compare.yaml").read_text()
    code = main([a if a != "256" else "128" for a in base])
    assert code == 1 and "another configuration (batch_size" in capsys.readouterr().err
    assert (out / "compare.yaml").read_text() == record      # a refused command leaves the record alone


def test_compare_with_the_sparse_backend_keeps_a_dense_baseline(tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", "--methods", "set", "--sparsity", "0.8", "--backend", "sparse", "--no-plots", *FAST,
            "--out", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    dense = json.loads((out / "dense-seed0" / "summary.json").read_text())
    sparse = json.loads((out / "set-sp0.8-seed0" / "summary.json").read_text())
    assert (dense["backend"], sparse["backend"]) == ("masked", "sparse")
    results = json.loads((out / "results.json").read_text())
    assert results["dense"]["n"] == 1 and results["setup"]["backend"] == "sparse"
    assert main(argv) == 0                                     # the same command again: both skipped


def test_plan():
    specs = plan(["set", "gse"], [0.9, 0.95], [0, 1])
    assert len(specs) == 2 * (1 + 4) and specs[0] == RunSpec("dense", 0.0, 0)
    assert len(plan(["set"], [0.9], [0], dense=False)) == 1
    with pytest.raises(ValueError, match="baseline"):
        plan(["dense"], [0.9], [0])
    with pytest.raises(ValueError, match="repeat"):
        plan(["set", "set"], [0.9], [0])


def _fake_run(root, method, sparsity, seed, acc, itop=0.5, **config):
    d = root / f"{method}-{sparsity}-{seed}"
    d.mkdir(parents=True)
    summary = {"method": method, "sparsity": sparsity, "seed": seed, "test_accuracy": acc,
               "best_test_accuracy": acc, "final_density": 1 - sparsity, "itop_rate": itop,
               "train_flops_ratio": 1 - sparsity, "inference_flops_ratio": 1 - sparsity, "wall_seconds": 1.0,
               "config": {"model": "mlp", "widths": [300, 100], "dataset": "fashion-mnist", "epochs": 3,
                          "batch_size": 128, "optimizer": "sgd", "lr": 0.05, "lr_schedule": "cosine",
                          "weight_decay": 0.0, "distribution": "erk", "update_interval": 50,
                          "drop_fraction": 0.3, "drop_schedule": "cosine", **config}}
    (d / "summary.json").write_text(json.dumps(summary))
    (d / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "test_accuracy": acc, "itop_rate": itop}) + "\n")


def test_aggregate_by_hand(tmp_path):
    for seed, acc in enumerate([0.80, 0.82, 0.87]):
        _fake_run(tmp_path, "set", 0.9, seed, acc)
    _fake_run(tmp_path, "gse", 0.9, 0, 0.9)
    _fake_run(tmp_path, "dense", 0.0, 0, 0.95, itop=1.0)
    (tmp_path / "unfinished").mkdir()                        # no summary.json: not a run
    results = aggregate(collect_runs(tmp_path))
    cell = next(c for c in results["cells"] if c["method"] == "set")
    assert cell["test_accuracy"]["mean"] == pytest.approx(statistics.fmean([0.80, 0.82, 0.87]))
    assert cell["test_accuracy"]["std"] == pytest.approx(statistics.stdev([0.80, 0.82, 0.87]))
    assert results["methods"] == ["set", "gse"] and results["seeds"] == [0, 1, 2]
    text = render_markdown(results)
    assert "| SET | 83.00 ± 3.61 |" in text
    assert "| GSE | **90.00** |" in text                      # one seed: no ± ; best in bold
    assert "| Dense | 95.00 |" in text
    assert text.startswith("# mlp 300-100 on fashion-mnist")
    written = write_report(tmp_path, plots=True)
    assert {f.rsplit("/", 1)[-1] for f in written["files"]} >= {"results.json", "results.md",
                                                                 "accuracy_vs_sparsity.png"}


def test_runs_of_different_setups_are_refused_not_averaged(tmp_path, capsys):
    _fake_run(tmp_path / "a", "set", 0.9, 0, 0.80)
    _fake_run(tmp_path / "b", "set", 0.9, 1, 0.90, epochs=30, lr=0.1)
    with pytest.raises(ValueError, match=r"differ in epochs \(3, 30\); lr \(0.05, 0.1\): averaging them"):
        aggregate(collect_runs(tmp_path))
    assert main(["report", str(tmp_path), "--no-plots"]) == 1
    assert "differ in epochs" in capsys.readouterr().err and not (tmp_path / "results.md").exists()
    assert aggregate(collect_runs(tmp_path / "b"))["setup"]["epochs"] == 30   # one setup at a time
    # the dense baseline may use another backend (compare --backend sparse runs it masked)
    _fake_run(tmp_path / "c", "set", 0.9, 0, 0.8, backend="sparse")
    _fake_run(tmp_path / "c", "dense", 0.0, 0, 0.9, backend="masked")
    assert aggregate(collect_runs(tmp_path / "c"))["setup"]["backend"] == "sparse"
    _fake_run(tmp_path / "c", "static", 0.9, 0, 0.8, backend="masked")
    with pytest.raises(ValueError, match="differ in backend"):
        aggregate(collect_runs(tmp_path / "c"))


def test_report_without_runs(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 1
    assert "no finished runs" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "missing")]) == 1


def test_report_of_dense_runs_only(tmp_path):
    _fake_run(tmp_path, "dense", 0.0, 0, 0.9, itop=1.0)
    text = write_report(tmp_path, plots=False)["markdown"]
    assert "| Method | Test accuracy |" in text and "| Dense | 90.00 |" in text
