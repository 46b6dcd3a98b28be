"""``regrow compare --vary``: the grid's parsing, which runs it makes, reuse, tables and plots."""
from __future__ import annotations

import json

import pytest

from regrow.experiments.compare import RunSpec, plan, run_compare, run_config
from regrow.experiments.config import TrainConfig
from regrow.experiments.grid import parse_vary
from regrow.experiments.report import aggregate, collect_runs, write_report

TINY = TrainConfig(dataset="digits", model="mlp", widths=[16], epochs=1, batch_size=128, update_interval=4,
                   threads=1)


def test_parse_vary_converts_values_by_the_fields_kind():
    grid = parse_vary(["gamma=0.25,1,4", "widths=300x100,600/200", "sampling=uniform,grabo", "c=none,0.1",
                       "update-interval=50,100"])
    assert grid == {"gamma": [0.25, 1.0, 4.0], "widths": [[300, 100], [600, 200]],
                    "sampling": ["uniform", "grabo"], "c": [None, 0.1], "update_interval": [50, 100]}


@pytest.mark.parametrize("texts, words", [
    (["gamma"], "KEY=V1,V2"), (["gamma="], "no values"), (["gama=1,2"], "unknown config key 'gama'"),
    (["sparsity=0.9,0.95"], "--sparsity"), (["method=rigl"], "--methods"), (["seed=1,2"], "--seeds"),
    (["threads=1,2"], "cannot be varied"), (["gamma=1,1.0"], "repeats"), (["gamma=1", "gamma=2"], "twice"),
    (["sampling=uniform,nope"], "not one of"), (["epochs=1.5"], "an integer"),
])
def test_parse_vary_refuses_bad_grids(texts, words):
    with pytest.raises(ValueError, match=words):
        parse_vary(texts)


def test_plan_runs_a_setting_only_where_it_applies():
    specs = plan(["rigl", "gse"], [0.9], [0], dense=True, vary={"gamma": [0.5, 2.0]}, base=TINY)
    names = [s.name for s in specs]
    # rigl and dense do not take gamma: one run each, not one per value
    assert names == ["dense-seed0", "rigl-sp0.9-seed0", "gse-sp0.9-gamma0.5-seed0", "gse-sp0.9-gamma2-seed0"]
    assert run_config(TINY, specs[2]).gamma == 0.5 and run_config(TINY, specs[1]).gamma is None


def test_plan_names_only_settings_that_differ_from_the_base():
    base = TINY.replace(update_interval=4)
    specs = plan(["set"], [0.9], [0], dense=True, vary={"update_interval": [4, 8], "epochs": [1, 2]}, base=base)
    names = [s.name for s in specs]
    # dense ignores update_interval (a sparsity setting) but not epochs; the base point has the plain name
    assert names == ["dense-seed0", "set-sp0.9-seed0", "dense-epochs2-seed0", "set-sp0.9-epochs2-seed0",
                     "set-sp0.9-update_interval8-seed0", "set-sp0.9-update_interval8-epochs2-seed0"]
    assert len(set(names)) == len(names)
    assert RunSpec("set", 0.9, 0).name == "set-sp0.9-seed0"   # what a plain compare writes


def test_compare_grid_end_to_end_table_plot_and_reuse(tmp_path):
    out = tmp_path / "cmp"
    vary = {"gamma": [0.5, 2.0]}
    summaries = run_compare(TINY, ["rigl", "gse"], [0.9], [0], out, vary=vary)
    assert len(summaries) == 4
    report = write_report(out)
    md = report["markdown"]
    assert "| Method | gamma = 0.5 | gamma = 2 |" in md
    gse_row = next(line for line in md.splitlines() if line.startswith("| GSE |"))
    rigl_row = next(line for line in md.splitlines() if line.startswith("| RigL |"))
    assert gse_row.count("|") == 4 and "-" not in gse_row.split("|")[2]
    assert rigl_row.split("|")[2] == rigl_row.split("|")[3]   # one rigl run fills both columns
    assert (out / "plots" / "accuracy_vs_gamma.png").stat().st_size > 1000
    cells = {(c["method"], json.dumps(c.get("settings"))): c for c in report["results"]["cells"]}
    assert set(cells) == {("rigl", "{}"), ("gse", '{"gamma": 0.5}'), ("gse", '{"gamma": 2.0}')}
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/summary.json")}

    # a plain compare into the same folder reuses the rigl and dense runs and keeps the grid
    again = run_compare(TINY, ["rigl"], [0.9], [0], out)
    assert len(again) == 2
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/summary.json")} == stamps
    assert "| Method | gamma = 0.5 | gamma = 2 |" in write_report(out, plots=False)["markdown"]


def test_report_refuses_to_average_runs_that_differ_in_a_method_option(tmp_path):
    run_compare(TINY, ["gse"], [0.9], [0], tmp_path / "a", dense=False, vary={"gamma": [0.5, 2.0]})
    runs = collect_runs(tmp_path / "a")
    with pytest.raises(ValueError, match="differ in gamma"):
        aggregate(runs)   # without the grid the two gammas would land in one cell
    assert len(aggregate(runs, {"gamma": [0.5, 2.0]})["cells"]) == 2


def test_cli_vary_errors_are_one_line(capsys):
    from regrow.experiments.cli import main
    assert main(["compare", "--methods", "gse", "--vary", "gama=1,2", "--out", "/nonexistent/x"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "gama" in err
