"""Issue 12, "nothing silent": a user's mistake or a failed run is said at once, no data is lost.

Each test here failed before its fix (items numbered as in the issue)."""
from __future__ import annotations

import copy
import gc
import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import regrow
from helpers import batches, mlp, train_steps


def _dst(model, **kw):
    kw.setdefault("method", "set")
    kw.setdefault("total_steps", 100)
    kw.setdefault("update_interval", 10)
    opt = kw.pop("optimizer", None) or torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return regrow.DynamicSparsity(model, opt, **kw)


def _weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("weight")}


# -- 1. init_mask: a trained model keeps what it learned ------------------------------------------
def test_default_random_init_still_zeroes_trained_weights_as_documented():
    model = mlp()
    before = _weights(model)
    dst = _dst(model, sparsity=0.8)
    for name, w in before.items():
        kept = dst.masks[name]
        assert torch.equal(dict(model.named_parameters())[name].detach()[~kept], torch.zeros(int((~kept).sum())))


@pytest.mark.parametrize("method", ["static", "set", "rigl", "gse", "dstee"])
def test_init_mask_magnitude_keeps_each_layers_largest_weights(method):
    model = mlp()
    before = _weights(model)
    dst = _dst(model, method=method, sparsity=0.8, init_mask="magnitude", sparse_init=None)
    # independent: the same ERK budgets, then the budget's largest |w| of each layer
    shapes = {n: tuple(w.shape) for n, w in before.items()}
    budgets = regrow.allocate_counts(shapes, 0.2, "erk")
    for name, w in before.items():
        order = w.abs().reshape(-1).sort(descending=True, stable=True).indices
        expected = torch.zeros(w.numel(), dtype=torch.bool)
        expected[order[:budgets[name]]] = True
        assert torch.equal(dst.masks[name].reshape(-1), expected), name
        now = dict(model.named_parameters())[name].detach()
        assert torch.equal(now[dst.masks[name]], w[dst.masks[name]])   # values untouched


def test_init_mask_magnitude_keeps_trained_values_even_with_sparse_init():
    model = mlp()
    before = _weights(model)
    dst = _dst(model, sparsity=0.5, init_mask="magnitude")   # sparse_init defaults to fan_in
    for name, w in before.items():
        now = dict(model.named_parameters())[name].detach()
        assert torch.equal(now[dst.masks[name]], w[dst.masks[name]])


def test_init_mask_magnitude_srigl_keeps_the_largest_per_row():
    model = mlp()
    before = _weights(model)
    dst = _dst(model, method="srigl", sparsity=0.75, init_mask="magnitude")
    for name, w in before.items():
        mask = dst.masks[name]
        fan_in = int(mask[0].sum())
        assert (mask.sum(1) == fan_in).all()
        top = w.abs().topk(fan_in, dim=1).indices
        assert torch.equal(mask, torch.zeros_like(mask).scatter_(1, top, True))


def _pruned(model, keep=0.3, seed=1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    masks = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight"):
                masks[name] = torch.rand(p.shape, generator=g) < keep
                p.mul_(masks[name])
    return masks


def test_init_mask_existing_adopts_the_models_zeros_and_counts():
    model = mlp()
    masks = _pruned(model)
    before = _weights(model)
    dst = _dst(model, init_mask="existing")   # no sparsity: read from the model
    zeros = sum(int((~m).sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    assert dst.sparsity == pytest.approx(zeros / total)
    for name, m in masks.items():
        assert torch.equal(dst.masks[name], m)
        assert torch.equal(dict(model.named_parameters())[name].detach(), before[name])
    for x, y in batches(12):   # training keeps each layer's count
        dst.optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        dst.step()
    assert dst.stats()["updates"] == 1
    assert {t.name: t.nnz for t in dst.targets} == {n: int(m.sum()) for n, m in masks.items()}


def test_init_mask_existing_checks_a_given_sparsity():
    model = mlp()
    _pruned(model, keep=0.3)
    with pytest.raises(ValueError, match="omit sparsity or pass the model's"):
        _dst(model, sparsity=0.5, init_mask="existing")
    model = mlp()
    masks = _pruned(model, keep=0.3)
    actual = sum(int((~m).sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
    assert _dst(model, sparsity=round(actual, 3), init_mask="existing").sparsity == round(actual, 3)


def test_init_mask_refusals():
    with pytest.raises(ValueError, match="sparsity is required"):
        _dst(mlp())
    with pytest.raises(ValueError, match="unknown init_mask 'largest'"):
        _dst(mlp(), sparsity=0.5, init_mask="largest")
    with pytest.raises(ValueError, match="starts from a dense network"):
        _dst(mlp(), method="gmp", sparsity=0.5, init_mask="magnitude")
    model = mlp()
    _pruned(model)   # random zeros: no constant fan-in
    with pytest.raises(ValueError, match="constant fan-in"):
        _dst(model, method="srigl", init_mask="existing")


def test_resume_order_build_engine_then_load_states():
    """README's order: build the engine, then load model, optimizer and engine states."""
    data = batches(30)

    model = mlp()
    dst = _dst(model, sparsity=0.8, optimizer=torch.optim.Adam(model.parameters(), lr=1e-2))
    train_steps(model, dst, data[:15])
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    opt_state, dst_state = copy.deepcopy(dst.optimizer.state_dict()), copy.deepcopy(dst.state_dict())
    train_steps(model, dst, data[15:])
    straight = _weights(model)

    model2 = mlp(seed=5)
    opt2 = torch.optim.Adam(model2.parameters(), lr=1e-2)
    dst2 = _dst(model2, sparsity=0.8, optimizer=opt2)
    model2.load_state_dict(saved)
    opt2.load_state_dict(opt_state)
    dst2.load_state_dict(dst_state)
    train_steps(model2, dst2, data[15:])
    for name, w in straight.items():
        assert torch.equal(dict(model2.named_parameters())[name].detach(), w)


# -- 11. names that match nothing; a second engine on the same model -----------------------------
def test_unknown_dense_layer_names_the_closest_valid_ones():
    with pytest.raises(ValueError, match=r"did you mean \['0.weight'"):
        _dst(mlp(), sparsity=0.5, dense_layers=["0.wieght"])
    with pytest.raises(ValueError, match=r"valid names: \['0', '0.bias', '0.weight'"):
        _dst(mlp(), sparsity=0.5, dense_layers=["encoder"])


def test_a_second_engine_on_the_same_model_is_refused_naming_the_first():
    model = mlp()
    first = _dst(model, method="rigl", sparsity=0.8)
    masks = {k: v.clone() for k, v in first.masks.items()}
    with pytest.raises(ValueError, match=r"already managed by DynamicSparsity\(method=rigl, sparsity=0.8"):
        _dst(model, sparsity=0.5)
    assert all(torch.equal(first.masks[k], m) for k, m in masks.items())   # nothing touched
    first.close()
    second = _dst(model, sparsity=0.5)
    del second
    gc.collect()
    _dst(model, sparsity=0.5)   # a deleted engine frees its model too


# -- 5. activation capture under torch.compile ---------------------------------------------------
def _gse_compiled(sampling: str, *, compiled_call_first: bool, steps: int = 6):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 5))
    net = torch.compile(model, backend="eager")   # dynamo's tracing (where hooks matter), no codegen
    if compiled_call_first:
        net(torch.randn(16, 12))   # the batch shape training uses: no recompile later
    dst = _dst(net, method="gse", sparsity=0.8, update_interval=5, sampling=sampling)
    seen = []
    for x, y in batches(steps):
        dst.optimizer.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        if dst.schedule.is_update(dst.step_count + 1):
            seen.append({t.name: t.activations() for t in dst.targets})
        dst.step()
    return model, dst, seen


def test_capture_works_in_a_model_compiled_after_the_engine_is_built():
    torch._dynamo.reset()
    model, dst, seen = _gse_compiled("grabo", compiled_call_first=False)
    assert len(seen) == 1 and all(pair is not None for pair in seen[0].values())
    # the captured pair is the eager one: h is the layer input, delta the output gradient
    x, y = batches(6)[4]
    h, delta = seen[0]["0.weight"]
    assert torch.allclose(h, x)
    _, dst2, _ = _gse_compiled("graest", compiled_call_first=False)
    assert any(not torch.equal(dst.masks[k], dst2.masks[k]) for k in dst.masks)   # no shared fallback


def test_capture_that_caught_nothing_is_an_error_naming_the_fix():
    torch._dynamo.reset()
    with pytest.raises(RuntimeError, match=r"torch.compile.*before the compiled model's first call"):
        _gse_compiled("grabo", compiled_call_first=True)
    torch._dynamo.reset()


# -- 2. a non-finite loss stops the run; every JSON file regrow writes is strict -------------------
def _strict_loads(text: str):
    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")
    return json.loads(text, parse_constant=refuse)


FAST = ["--dataset", "digits", "--widths", "16", "--batch-size", "64", "--update-interval", "3",
        "--threads", "1", "--method", "set", "--sparsity", "0.8"]


def test_a_non_finite_loss_stops_the_run_naming_step_and_checkpoint(tmp_path, capsys):
    from regrow.experiments.checkpoint import load_checkpoint
    from regrow.experiments.cli import main
    out = tmp_path / "run"
    code = main(["train", *FAST, "--epochs", "2", "--lr", "1e4", "--checkpoint-every", "3", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 1
    step = int(err.split(" at step ")[1].split()[0])
    kept = (step - 1) // 3 * 3
    assert err.startswith("regrow train: error: the training loss is ")
    assert f"{out / 'checkpoint.pt'} (step {kept}), is kept" in err
    assert load_checkpoint(out / "checkpoint.pt")["step"] == kept
    assert not (out / "summary.json").exists()
    for line in (out / "metrics.jsonl").read_text().splitlines():
        _strict_loads(line)


def test_every_json_writer_writes_strict_json(tmp_path):
    from regrow.core import strict_json
    from regrow.experiments.runfiles import write_json, write_metrics
    nasty = {"a": float("nan"), "b": [1.0, float("inf"), {"c": -float("inf")}], "d": 2.5, "e": "NaN"}
    expected = {"a": None, "b": [1.0, None, {"c": None}], "d": 2.5, "e": "NaN"}
    write_json(tmp_path / "s.json", nasty)
    assert _strict_loads((tmp_path / "s.json").read_text()) == expected
    write_metrics(tmp_path / "m.jsonl", [nasty, nasty])
    assert [_strict_loads(x) for x in (tmp_path / "m.jsonl").read_text().splitlines()] == [expected] * 2
    assert _strict_loads(strict_json.dumps(nasty)) == expected
    # and no module of the package writes JSON any other way
    import ast
    from pathlib import Path
    package = Path(regrow.__file__).parent
    for path in package.rglob("*.py"):
        if path.name == "strict_json.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "dump" \
                    and getattr(node.func.value, "id", "") == "json":
                pytest.fail(f"{path}: json.dump writes a file past strict_json")


def test_export_spec_and_report_are_strict(tmp_path):
    from regrow.experiments.report import write_report
    run = tmp_path / "cmp" / "run"
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({
        "method": "set", "sparsity": 0.9, "seed": 0, "test_accuracy": float("nan"), "best_test_accuracy": 0.5,
        "final_density": 0.1, "itop_rate": 0.2, "train_flops_ratio": 0.1, "inference_flops_ratio": 0.1,
        "wall_seconds": 1.0, "epochs": 1, "dataset": "digits", "model": "mlp", "config": {}}))
    (run / "metrics.jsonl").write_text("")
    report = write_report(tmp_path / "cmp", plots=False)
    for f in report["files"]:
        if str(f).endswith(".json"):
            _strict_loads(Path(f).read_text())


# -- 3. the previous checkpoint is kept; a damaged one is refused without torch's unsafe advice ----
def test_save_keeps_the_previous_checkpoint_and_resume_falls_back_to_it(tmp_path):
    from regrow.experiments.checkpoint import load_checkpoint, load_run_checkpoint, save_checkpoint
    save_checkpoint({"step": 1, "w": torch.ones(3)}, tmp_path / "checkpoint.pt")
    save_checkpoint({"step": 2, "w": torch.zeros(3)}, tmp_path / "checkpoint.pt")
    assert load_checkpoint(tmp_path / "checkpoint.prev.pt")["step"] == 1
    assert load_run_checkpoint(tmp_path)["step"] == 2
    (tmp_path / "checkpoint.pt").write_bytes(b"\x00garbage" * 50)
    with pytest.warns(RuntimeWarning, match=r"using the previous checkpoint .*checkpoint.prev.pt \(step 1\)"):
        assert load_run_checkpoint(tmp_path)["step"] == 1


class _Foreign:
    pass


@pytest.mark.parametrize("content", ["garbage", "truncated", "foreign_object"])
def test_a_damaged_checkpoint_is_one_line_without_unsafe_advice(tmp_path, content):
    from regrow.experiments.checkpoint import load_checkpoint
    path = tmp_path / "checkpoint.pt"
    if content == "garbage":
        path.write_bytes(b"not a checkpoint" * 20)
    else:
        torch.save({"format_version": 1, "x": torch.zeros(100) if content == "truncated" else _Foreign()}, path)
        if content == "truncated":
            path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(ValueError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "weights_only" not in message and "\n" not in message and str(path) in message
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_resume_from_the_previous_checkpoint_when_the_newest_is_damaged(tmp_path):
    from regrow.experiments.config import TrainConfig
    from regrow.experiments.train import train
    cfg = TrainConfig(dataset="digits", widths=[16], epochs=1, batch_size=128, update_interval=3,
                      sparsity=0.8, threads=1, checkpoint_every=4)
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    train(cfg, whole)
    assert train(cfg, broken, stop_after_steps=9) is None   # checkpoints at steps 4 and 8
    (broken / "checkpoint.pt").write_bytes(b"half a file")
    with pytest.warns(RuntimeWarning, match=r"previous checkpoint .* \(step 4\)"):
        train(None, broken, resume=True)
    a, b = (json.loads((d / "summary.json").read_text()) for d in (whole, broken))
    assert a["test_accuracy"] == b["test_accuracy"] and a["final_loss"] == b["final_loss"]


# -- 4. one writer per run folder --------------------------------------------------------------
def test_a_second_writer_of_a_run_folder_is_refused(tmp_path):
    from regrow.experiments.config import TrainConfig
    from regrow.experiments.runfiles import run_lock
    from regrow.experiments.train import train
    cfg = TrainConfig(dataset="digits", widths=[8], epochs=1, batch_size=256, sparsity=0.8, threads=1, method="static")
    run = tmp_path / "run"
    run.mkdir()
    with run_lock(run):
        with pytest.raises(ValueError, match=rf"run folder {run} is in use by regrow process {os.getpid()}"):
            train(cfg, run)
        assert not (run / "config.yaml").exists()
    assert train(cfg, run) is not None   # released when the holder is done


def test_the_run_lock_is_released_when_its_process_dies(tmp_path):
    from regrow.experiments.runfiles import run_lock
    code = ("import sys, time; from pathlib import Path; from regrow.experiments.runfiles import run_lock\n"
            f"with run_lock(Path({str(tmp_path)!r})):\n    print('locked', flush=True); time.sleep(60)\n")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(ValueError, match=f"in use by regrow process {child.pid}"):
            with run_lock(tmp_path):
                pass
        child.kill()   # SIGKILL: no cleanup code runs, the OS drops the lock
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    with run_lock(tmp_path):
        pass


# -- 12. --quiet still says what came out and where --------------------------------------------
def test_quiet_train_prints_the_result_line_and_folder(tmp_path, capsys):
    from regrow.experiments.cli import main
    out = tmp_path / "run"
    assert main(["train", *FAST, "--epochs", "1", "--quiet", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and "test accuracy" in lines[0] and lines[0].endswith(f"-> {out}")


def test_quiet_compare_lists_the_written_files(capsys):
    from regrow.experiments.cli import _print_report
    _print_report({"markdown": "| table |\n", "files": ["a/results.json", "a/results.md"]}, quiet=True)
    assert capsys.readouterr().out == "written: a/results.json, a/results.md\n"


# -- 10. allocate_counts takes a sequence of shapes too ------------------------------------------
def test_allocate_counts_accepts_a_sequence_of_shapes_in_order():
    shapes = [(300, 784), (100, 300), (10, 100)]
    as_list = regrow.allocate_counts(shapes, 0.1, "erk")
    as_dict = regrow.allocate_counts({str(i): s for i, s in enumerate(shapes)}, 0.1, "erk")
    assert as_list == [as_dict[str(i)] for i in range(3)]
    assert regrow.allocate_counts((torch.Size([8, 4]), [4, 8]), 0.5, "uniform") == [16, 16]
    assert sum(as_list) == round(0.1 * sum(math.prod(s) for s in shapes))


@pytest.mark.parametrize("shapes, message", [
    ((300, 784), "pass a list of shapes, not one shape"),
    ([(10, 0)], "positive integers"),
    (12, "a mapping name -> shape or a sequence of shapes"),
])
def test_allocate_counts_bad_shapes_are_one_line_errors(shapes, message):
    with pytest.raises(ValueError, match=message):
        regrow.allocate_counts(shapes, 0.5)


# -- 8. params in summary.json, counted against the model ----------------------------------------
@pytest.mark.parametrize("backend", ["masked", "sparse"])
def test_summary_params_match_the_model(tmp_path, backend):
    from regrow.experiments.config import TrainConfig
    from regrow.experiments.train import train, load_trained
    cfg = TrainConfig(dataset="digits", widths=[32, 16], epochs=1, batch_size=256, update_interval=2,
                      method="set", sparsity=0.9, backend=backend, threads=1)
    params = train(cfg, tmp_path)["params"]
    model, masks, _ = load_trained(tmp_path)
    named = [(n, m) for n, m in model.named_modules() if hasattr(m, "in_features")]
    dense_weights = sum(m.in_features * m.out_features for _, m in named)
    biases = sum(m.bias.numel() for _, m in named)
    active_weights = sum(int(masks[f"{n}.weight"].sum()) if isinstance(m, nn.Linear) else m.values.numel()
                         for n, m in named)
    assert params["total"] == dense_weights + biases
    assert params["sparsified"] == dense_weights
    assert params["active"] == active_weights + biases > 0
    assert params["active_sparsified"] == active_weights


# -- 13. a sparsity that the always-sparse layers ignore is said ---------------------------------
def _sparse_mlp(dense_layers=()):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 5))
    return regrow.nn.sparsify(model, sparsity=0.9, dense_layers=list(dense_layers))


def _sparse_dst(model, sparsity):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return regrow.DynamicSparsity(model, opt, method="set", sparsity=sparsity, total_steps=100, update_interval=10)


def test_sparsity_ignored_by_always_sparse_layers_is_a_warning():
    with pytest.warns(UserWarning, match=r"sparsity=0.5 has no effect on any layer.*'0.values', '2.values'.*0.9000"):
        _sparse_dst(_sparse_mlp(), 0.5)
    with pytest.warns(UserWarning, match=r"sparsity=0.5 does not apply to the always-sparse layers \['0.values'\]"):
        _sparse_dst(_sparse_mlp(dense_layers=["2"]), 0.5)   # layer 2 stays nn.Linear: masked, 0.5 applies
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _sparse_dst(_sparse_mlp(), 0.9)   # the layers' own sparsity: nothing to say


# -- 7. the published data sets are recognised by their SHA-256 ----------------------------------
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _tiny_mnist(folder: Path, seed: int) -> dict[str, bytes]:
    """Four small valid IDX files (gzip), as the loader finds them; returns their contents."""
    import gzip
    import struct
    g = torch.Generator().manual_seed(seed)
    contents = {}
    for split, n in (("train", 6), ("t10k", 3)):
        images = torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8)
        labels = torch.randint(0, 10, (n,), generator=g, dtype=torch.uint8)
        contents[f"{split}-images-idx3-ubyte"] = b"\0\0\x08\x03" + struct.pack(">3I", n, 28, 28) + images.numpy().tobytes()
        contents[f"{split}-labels-idx1-ubyte"] = b"\0\0\x08\x01" + struct.pack(">I", n) + labels.numpy().tobytes()
    folder.mkdir(parents=True, exist_ok=True)
    for stem, raw in contents.items():
        (folder / f"{stem}.gz").write_bytes(gzip.compress(raw))
    return contents


def _publish(monkeypatch, contents: dict[str, bytes], name: str) -> None:
    import hashlib
    from regrow.data import idx
    table = dict(idx.PUBLISHED)
    table.update({hashlib.sha256(raw).hexdigest(): (name, stem) for stem, raw in contents.items()})
    monkeypatch.setattr(idx, "PUBLISHED", table)


def test_the_other_data_sets_files_are_refused_naming_both(tmp_path, monkeypatch):
    _publish(monkeypatch, _tiny_mnist(tmp_path / "fashion", 0), "fashion-mnist")
    with pytest.raises(ValueError, match=r"these files are Fashion-MNIST, not MNIST"):
        regrow.data.load("mnist", tmp_path / "fashion")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(regrow.data.load("fashion-mnist", tmp_path / "fashion").train) == 6


def test_swapped_splits_and_unknown_files(tmp_path, monkeypatch):
    contents = _tiny_mnist(tmp_path / "m", 1)
    _publish(monkeypatch, contents, "mnist")
    (tmp_path / "m" / "t10k-labels-idx1-ubyte.gz").write_bytes((tmp_path / "m" / "train-labels-idx1-ubyte.gz").read_bytes())
    with pytest.raises(ValueError, match="is the published MNIST train-labels-idx1-ubyte, not t10k-labels-idx1-ubyte"):
        regrow.data.load("mnist", tmp_path / "m")
    _tiny_mnist(tmp_path / "other", 2)   # published nowhere
    with pytest.warns(UserWarning, match="is not the published MNIST train-images-idx3-ubyte"):
        regrow.data.load("mnist", tmp_path / "other")


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="the shared data folder is absent")
def test_the_digest_table_is_the_published_files():
    import gzip
    import hashlib
    from regrow.data.idx import PUBLISHED
    found = {}
    for name in ("mnist", "fashion-mnist"):
        sums = dict(line.split()[::-1] for line in (SHARED_DATA / name / "SHA256SUMS").read_text().splitlines())
        for file, digest in sums.items():
            packed = (SHARED_DATA / name / file).read_bytes()
            assert hashlib.sha256(packed).hexdigest() == digest   # the published .gz itself
            found[hashlib.sha256(gzip.decompress(packed)).hexdigest()] = (name, file.removesuffix(".gz"))
    assert found == PUBLISHED


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="the shared data folder is absent")
def test_mnist_from_the_fashion_folder_is_refused():
    with pytest.raises(ValueError, match=r"these files are Fashion-MNIST, not MNIST"):
        regrow.data.load("mnist", SHARED_DATA / "fashion-mnist")
    with pytest.raises(ValueError, match=r"these files are MNIST, not Fashion-MNIST"):
        regrow.data.load("fashion-mnist", SHARED_DATA / "mnist")


# -- 6. export of nn.TransformerEncoderLayer ---------------------------------------------------
class _Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)   # fast path in eval
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.enc(x).mean(1))


@pytest.mark.parametrize("fmt", ["condensed", "csr"])
def test_transformer_encoder_layers_export_with_equal_outputs(fmt):
    torch.manual_seed(0)
    model = _Encoder()
    dst = _dst(model, method="srigl", sparsity=0.8)   # constant fan-in: condensed would replace linear1/2
    model.eval()
    x = torch.randn(3, 5, 16)
    with torch.no_grad():
        expected = model(x)
        exported = regrow.export(model, dst, fmt)
        torch.testing.assert_close(exported(x), expected, atol=1e-5, rtol=0)
    rows = {r["name"]: r for r in exported.regrow_export_report}
    for i in range(2):
        for lin in ("linear1", "linear2"):
            row = rows[f"enc.layers.{i}.{lin}"]
            assert row["format"] == "dense" and "TransformerEncoderLayer reads its .weight directly" in row["notes"]
            mask = dst.masks[f"enc.layers.{i}.{lin}.weight"]
            weight = dict(exported.named_parameters())[f"enc.layers.{i}.{lin}.weight"]
            assert torch.equal(weight != 0, mask & (weight != 0)) and not weight[~mask].any()
    assert rows["head"]["format"] == fmt   # other layers are still converted


# -- 9. regrow.models / regrow.data as README writes them, in a fresh interpreter ----------------
def test_models_and_data_are_reachable_right_after_import_regrow():
    code = ("import sys, regrow\n"
            "assert 'regrow.models' not in sys.modules and 'regrow.data' not in sys.modules\n"
            "m = regrow.models.build('mlp', 10, (1, 8, 8), widths=[8])\n"
            "d = regrow.data.load('synthetic')\n"
            "print(type(m).__name__, len(d.train))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["Sequential", "2000"] or out.stdout.split()[1] == "2000"


def test_closing_or_dropping_an_engine_takes_its_hooks_off_the_model():
    model = mlp()
    dst = _dst(model, sparsity=0.5)
    assert all(len(m._forward_hooks) == 1 for m in model if isinstance(m, nn.Linear))
    dst.close()
    assert all(len(m._forward_hooks) == 0 for m in model if isinstance(m, nn.Linear))
    _dst(model, sparsity=0.5)   # built and dropped at once
    gc.collect()
    assert all(len(m._forward_hooks) == 0 for m in model if isinstance(m, nn.Linear))


def test_an_existing_mask_run_resumes_in_the_documented_order():
    data = batches(24)

    model = mlp()
    _pruned(model)
    dst = _dst(model, method="rigl", init_mask="existing")
    train_steps(model, dst, data[:12])
    saved = copy.deepcopy({"model": model.state_dict(), "optimizer": dst.optimizer.state_dict(),
                           "dst": dst.state_dict()})
    train_steps(model, dst, data[12:])

    fresh = mlp(seed=3)   # no zeros at all until the checkpoint is loaded
    opt = torch.optim.SGD(fresh.parameters(), lr=0.1)
    dst2 = _dst(fresh, method="rigl", init_mask="existing", optimizer=opt)
    fresh.load_state_dict(saved["model"])
    opt.load_state_dict(saved["optimizer"])
    dst2.load_state_dict(saved["dst"])
    train_steps(fresh, dst2, data[12:])
    assert dst2.sparsity == dst.sparsity
    for name, w in _weights(model).items():
        assert torch.equal(dict(fresh.named_parameters())[name].detach(), w)
        assert torch.equal(dst2.masks[name], dst.masks[name])
