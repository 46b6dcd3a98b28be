"""The regrow command line: parsing, help, config files, errors, and a short end-to-end run."""
import dataclasses
import json
import subprocess
import sys

import pytest
import yaml

from regrow.experiments.cli import build_parser, main, resolve_config
from regrow.experiments.config import FIELDS, TrainConfig, from_dict, load_yaml, save_yaml

COMMANDS = ("train", "compare", "report", "export", "demo")
FAST = ["--dataset", "digits", "--widths", "16", "--epochs", "1", "--batch-size", "128",
        "--update-interval", "3", "--threads", "1", "--quiet"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_of_every_command(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert f"regrow {command}" in text and "%%" not in text
    if command in ("train", "compare"):
        for name, f in FIELDS.items():
            if command == "compare" and name in ("method", "sparsity"):
                continue
            flag = "--model-option" if name == "model_options" else "--" + name.replace("_", "-")
            assert flag in text, flag
        assert "(default: 100)" in text                   # update interval's default is shown


def test_top_level_help_and_python_m():
    out = subprocess.run([sys.executable, "-m", "regrow", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    for command in COMMANDS:
        assert command in out.stdout


def test_flags_parse_into_config():
    args = build_parser().parse_args([
        "train", "--method", "gse", "--sparsity", "0.98", "--gamma", "2", "--sampling", "grabo",
        "--widths", "300,100", "--no-nesterov", "--dense-layers", "net.fc1,net.fc3", "--lr-steps", "3,6",
        "--model-option", "foo=1", "--checkpoint-every", "50"])
    cfg = resolve_config(args)
    assert (cfg.method, cfg.sparsity, cfg.gamma, cfg.sampling) == ("gse", 0.98, 2.0, "grabo")
    assert cfg.widths == [300, 100] and cfg.nesterov is False
    assert cfg.dense_layers == ["net.fc1", "net.fc3"] and cfg.lr_steps == [3.0, 6.0]
    assert cfg.model_options == {"foo": 1} and cfg.checkpoint_every == 50
    assert cfg.method_options() == {"gamma": 2.0, "sampling": "grabo"}
    untouched = {f: getattr(cfg, f) for f in ("lr", "epochs", "distribution", "ablation")}
    assert untouched == {"lr": 0.1, "epochs": 10, "distribution": "erk", "ablation": None}


def test_config_file_then_flags(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("method: srigl\nsparsity: 0.95\nno-such-thing-here: 1\n")
    with pytest.raises(ValueError, match="unknown config key"):
        load_yaml(path)
    path.write_text("method: srigl\nsparsity: 0.95\ngamma-sal: 0.5\nablation: false\nepochs: 7\nlr: 0.2\n")
    args = build_parser().parse_args(["train", "--config", str(path), "--lr", "0.01"])
    cfg = resolve_config(args)
    assert (cfg.method, cfg.sparsity, cfg.gamma_sal, cfg.ablation, cfg.epochs) == ("srigl", 0.95, 0.5, False, 7)
    assert cfg.lr == 0.01                                # the flag wins over the file
    save_yaml(cfg, tmp_path / "resolved.yaml")
    assert load_yaml(tmp_path / "resolved.yaml") == cfg  # round trip


def test_every_config_field_round_trips(tmp_path):
    cfg = TrainConfig(widths=[8, 4], model_options={"a": [1, 2]}, dense_layers=["x"], lr_steps=[1.5],
                      augment=True, grow_init="random", gamma=3.0, c=0.1, eps=2.0, begin_fraction=0.1)
    save_yaml(cfg, tmp_path / "c.yaml")
    back = load_yaml(tmp_path / "c.yaml")
    assert dataclasses.asdict(back) == dataclasses.asdict(cfg)
    assert set(yaml.safe_load((tmp_path / "c.yaml").read_text())) == set(FIELDS)


@pytest.mark.parametrize("values,message", [
    ({"epochs": "ten"}, "cannot read 'ten' as an integer"),
    ({"method": "magic"}, "'magic' is not one of"),
    ({"widths": "3,x"}, "cannot read"),
    ({"epochs": 2.5}, "as an integer"),
])
def test_bad_config_values(values, message):
    with pytest.raises(ValueError, match=message):
        from_dict(values)


def _run_cli(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("argv,message", [
    (["--dataset", "fashion-mnist", "--data-dir", "/no/such/dir"], "data_dir /no/such/dir is not a directory"),
    (["--dataset", "fashion-mnist", "--data-dir", "EMPTY"], "train-images-idx3-ubyte"),
    (["--dataset", "mnist"], "pass data_dir"),
    (["--method", "rigl", "--gamma", "2"], "--gamma does not apply to method 'rigl'"),
    (["--method", "dense"], "use --sparsity 0"),
    (["--backend", "sparse", "--method", "snip"], "supports methods static, set"),
    (["--model", "lenet5", "--widths", "3"], "--widths applies to the mlp only"),
    (["--model-option", "nope=1"], "has no option"),
    (["--model-option", "widths=5"], "mlp widths must be positive integers, in a list"),
    (["--config", "WIDTHS_YAML"], "mlp widths must be positive integers, in a list (e.g. widths=[300, 100]), got 300"),
    (["--model", "resnet20", "--model-option", "shortcut=3"], "model 'resnet20': bad option value in shortcut=3"),
    (["--config", "/no/such.yaml"], "config file /no/such.yaml does not exist"),
])
def test_user_errors_are_one_line(tmp_path, capsys, argv, message):
    (tmp_path / "widths.yaml").write_text("model_options: {widths: 300}\n")
    argv = [str(tmp_path) if a == "EMPTY" else str(tmp_path / "widths.yaml") if a == "WIDTHS_YAML" else a
            for a in argv]
    code, out, err = _run_cli(["train", "--out", str(tmp_path / "run"), "--quiet", *argv], capsys)
    assert code == 1
    assert "Traceback" not in err and err.count("\n") == 1
    assert err.startswith("regrow train: error:") and message in err


def test_train_end_to_end_and_export(tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = _run_cli(["train", *FAST, "--method", "set", "--sparsity", "0.8", "--out", str(out)], capsys)
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "set" and summary["epochs"] == 1 and summary["sparsity"] == 0.8
    assert yaml.safe_load((out / "config.yaml").read_text())["widths"] == [16]
    code, _, err = _run_cli(["train", *FAST, "--out", str(out)], capsys)
    assert code == 1 and "already holds a run" in err
    code, stdout, err = _run_cli(["train", *FAST[:-1], "--method", "static", "--out", str(tmp_path / "loud")], capsys)
    assert code == 0 and "epoch 1/1" in stdout and "test accuracy" in stdout

    code, stdout, err = _run_cli(["export", str(out), "--format", "csr", "--out", str(tmp_path / "w")], capsys)
    assert code == 0, err
    assert (tmp_path / "w.safetensors").is_file() and "exported" in stdout
    code, _, err = _run_cli(["export", str(tmp_path)], capsys)
    assert code == 1 and "no checkpoint.pt" in err


def test_ctrl_c_hint_names_the_real_run_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr("regrow.experiments.train.train", interrupted)
    code, _, err = _run_cli(["train", *FAST, "--method", "set", "--sparsity", "0.8", "--seed", "4"], capsys)
    assert code == 130
    assert err == "regrow: interrupted; continue with: regrow train --resume runs/set-sp0.8-seed4\n"
    code, _, err = _run_cli(["train", *FAST, "--out", "mine"], capsys)
    assert code == 130 and err.endswith("--resume mine\n")
    code, _, err = _run_cli(["train", "--resume", "old/run", "--quiet"], capsys)
    assert code == 130 and err.endswith("--resume old/run\n")


def test_sparse_backend(tmp_path, capsys):
    code, _, err = _run_cli(["train", *FAST, "--backend", "sparse", "--method", "gse", "--sparsity", "0.8",
                             "--out", str(tmp_path)], capsys)
    assert code == 0, err
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["backend"] == "sparse"
    assert summary["final_density"] == pytest.approx(0.2, abs=0.02)
    assert summary["inference_flops_ratio"] == pytest.approx(summary["final_density"], abs=0.02)


def test_demo_shortened(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--epochs", "1", "--seeds", "1", "--out", str(out), "--quiet"]) == 0
    table = (out / "results.md").read_text()
    assert "| Method | 90% | 98% |" in table
    for name in ("Dense", "Static", "SET", "RigL", "GSE", "DST-EE", "SRigL"):
        assert f"| {name} |" in table
    assert (out / "plots" / "accuracy_vs_sparsity.png").is_file()


def test_cli_warnings_are_one_line_and_the_format_is_restored(tmp_path):
    import subprocess
    import sys
    import warnings

    from regrow.experiments.cli import _one_line_warning, main
    # 12 steps on digits at the default interval: the never-updates warning (a fresh process:
    # pytest records warnings instead of printing them)
    done = subprocess.run([sys.executable, "-m", "regrow", "train", "--method", "rigl", "--dataset", "digits",
                           "--epochs", "1", "--quiet", "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if "never update" in line]
    assert len(lines) == 1 and lines[0].startswith("regrow: ")
    assert "return DynamicSparsity(" not in done.stderr   # no source line
    before = warnings.formatwarning
    assert main(["train", "--method", "rigl", "--dataset", "digits", "--epochs", "1", "--quiet",
                 "--out", str(tmp_path / "again")]) == 0
    assert warnings.formatwarning is before and before is not _one_line_warning
