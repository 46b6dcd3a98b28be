"""The ``regrow`` command line: train, compare, report, export, demo.

Training flags are generated from :class:`regrow.config.TrainConfig`, so every flag has a
YAML key of the same name (``--update-interval`` <-> ``update_interval``) and the same
default. Precedence: defaults < ``--config FILE`` < flags. Errors in the input (bad flag
values, missing data files, a run directory already in use) end with a one-line message on
stderr and exit status 1, never a traceback.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import warnings
from pathlib import Path

import yaml

from .._version import __version__
from .config import FIELDS, TrainConfig, from_dict, load_yaml

DEMO_METHODS = ("static", "set", "rigl", "gse", "dstee", "srigl")
DEFAULT_COMPARE_METHODS = "static,set,rigl,gse,dstee,srigl"
# the demo: a small MLP on the built-in digits (1437 training images of 8x8), 45 steps/epoch
DEMO_CONFIG = dict(dataset="digits", model="mlp", widths=[128, 128], epochs=20, batch_size=32,
                   lr=0.05, update_interval=15, drop_fraction=0.3, distribution="erk")
DEMO_SPARSITY = (0.9, 0.98)
DEMO_SEEDS = 3
# one thread: on a busy 2-core machine two threads on such small layers ran up to 20x slower
DEMO_THREADS = 1
_FLAG_NAMES = {"model_options": "--model-option"}


class CLIError(ValueError):
    """A user error reported as one line."""


# -- flags from the config dataclass -----------------------------------------------------------
def _flag(name: str) -> str:
    return _FLAG_NAMES.get(name, "--" + name.replace("_", "-"))


def _default_text(f: dataclasses.Field) -> str:
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    if default is None:
        return ""
    if isinstance(default, bool):
        return f" (default: {'on' if default else 'off'})"
    if isinstance(default, list):
        return "" if not default else f" (default: {','.join(map(str, default))})"
    if isinstance(default, dict):
        return ""
    return f" (default: {default})"


def _key_value(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got '{text}'")
    key, value = text.split("=", 1)
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError:
        return key.strip(), value


def add_config_flags(parser: argparse.ArgumentParser, exclude: tuple[str, ...] = ()) -> None:
    """One flag per TrainConfig field, grouped; unset flags stay absent from the namespace."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(TrainConfig):
        if f.name in exclude:
            continue
        meta = f.metadata
        group = groups.get(meta["group"]) or groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
        kwargs = dict(dest=f.name, default=argparse.SUPPRESS, help=meta["help"] + _default_text(f))
        kind = meta["kind"]
        if kind in ("bool", "obool"):
            group.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, **kwargs)
            continue
        if meta["metavar"]:
            kwargs["metavar"] = meta["metavar"]
        if kind == "int":
            kwargs.setdefault("metavar", "N")
            kwargs["type"] = int
        elif kind == "float":
            kwargs.setdefault("metavar", "X")
            kwargs["type"] = float
        elif kind == "dict":
            kwargs.update(action="append", type=_key_value)
        if meta["choices"]:
            kwargs["choices"] = meta["choices"]
        group.add_argument(_flag(f.name), **kwargs)


def resolve_config(args: argparse.Namespace, overrides: dict | None = None) -> TrainConfig:
    """Defaults, then ``--config`` file, then ``overrides``, then the flags given."""
    base = load_yaml(args.config) if getattr(args, "config", None) else TrainConfig()
    if overrides:
        base = from_dict(overrides, base)
    given = {name: getattr(args, name) for name in FIELDS if hasattr(args, name)}
    if "model_options" in given:
        given["model_options"] = {**base.model_options, **dict(given["model_options"])}
    try:
        return from_dict(given, base)
    except ValueError as err:
        raise CLIError(str(err).replace("config key '", "option '")) from None


def given_config_flags(args: argparse.Namespace) -> list[str]:
    return [_flag(name) for name in FIELDS if hasattr(args, name)]


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got '{text}'") from None


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


# -- the parser ------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="regrow", formatter_class=fmt,
        description="Dynamic sparse training: train one run, compare methods across sparsities, "
                    "re-render reports, export sparse weights.",
        epilog="Run 'regrow COMMAND --help' for a command's options. 'python -m regrow' is the same.")
    parser.add_argument("--version", action="version", version=f"regrow {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser(
        "train", formatter_class=fmt, help="train one run into a folder",
        description="Train one model with a sparse training method. Writes OUT/config.yaml (the resolved "
                    "configuration), OUT/metrics.jsonl (one line per epoch), OUT/updates.jsonl (one line per topology update), OUT/checkpoint.pt (every epoch "
                    "and every --checkpoint-every steps) and, when finished, OUT/summary.json.",
        epilog="example:\n  regrow train --method gse --sparsity 0.98 --model mlp --dataset fashion-mnist \\\n"
               "      --data-dir ../shared/data/fashion-mnist --epochs 10 --seed 0 --out runs/gse98\n"
               "  regrow train --resume runs/gse98        # continue an interrupted run")
    p.add_argument("--config", metavar="FILE", help="YAML file of options (keys as the flags, with _ for -); "
                   "flags given here override it")
    p.add_argument("--out", metavar="DIR", help="run folder (default: runs/METHOD-spSPARSITY-seedSEED)")
    p.add_argument("--resume", metavar="DIR", help="continue the interrupted run in DIR from its checkpoint, "
                   "with its own configuration (only --threads may be given besides)")
    p.add_argument("--quiet", action="store_true", help="no progress bars and no per-epoch lines (the final "
                   "result line, with the run folder, is still printed)")
    p.add_argument("--tensorboard", action="store_true", help="also write TensorBoard scalars (loss, accuracy, "
                   "density, ITOP, learning rate) to OUT/tensorboard; needs the tensorboard package")
    add_config_flags(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "compare", formatter_class=fmt, help="run the method x sparsity x seed matrix and report",
        description="Train every method at every sparsity for every seed (plus a dense baseline per seed; "
                    "with --backend sparse the baseline uses the masked backend, since always-sparse layers "
                    "cannot be dense), one folder each under OUT, skipping finished runs and resuming interrupted ones, then "
                    "write OUT/results.json, OUT/results.md and OUT/plots/*.png. Runs go one after another.",
        epilog="example:\n  regrow compare --methods static,set,rigl,gse,dstee,srigl --sparsity 0.9,0.95,0.98 "
               "--seeds 3 \\\n      --dataset fashion-mnist --data-dir ../shared/data/fashion-mnist --epochs 3 "
               "--out runs/cmp")
    p.add_argument("--methods", type=_names, default=_names(DEFAULT_COMPARE_METHODS), metavar="M1,M2,...",
                   help=f"methods to compare (default: {DEFAULT_COMPARE_METHODS})")
    p.add_argument("--sparsity", dest="sparsities", type=_floats, default=[0.9, 0.95, 0.98], metavar="S1,S2,...",
                   help="sparsities (default: 0.9,0.95,0.98)")
    p.add_argument("--seeds", type=int, default=1, metavar="N",
                   help="number of seeds, starting at --seed (default: 1)")
    p.add_argument("--no-dense", dest="dense", action="store_false",
                   help="leave out the dense baseline (with --backend sparse it trains on the masked backend)")
    p.add_argument("--config", metavar="FILE", help="YAML file of training options shared by every run")
    p.add_argument("--out", metavar="DIR", default="runs/compare", help="folder of the comparison (default: runs/compare)")
    p.add_argument("--vary", action="append", metavar="KEY=V1,V2,...",
                   help="also vary a method option or training flag over these values (repeatable: a grid), "
                        "e.g. --vary gamma=0.25,0.5,1,2,4 or --vary widths=300x100,1200x400; 'none' is a "
                        "method option's own default")
    p.add_argument("--no-plots", dest="plots", action="store_false", help="write the tables only")
    p.add_argument("--quiet", action="store_true", help="no progress bars, per-run lines or table (the "
                   "written files are still listed)")
    add_config_flags(p, exclude=("method", "sparsity"))
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser(
        "report", formatter_class=fmt, help="re-render tables and plots from finished runs",
        description="Collect every finished run (summary.json) under DIR and write DIR/results.json, "
                    "DIR/results.md and DIR/plots/*.png; prints the table.")
    p.add_argument("dir", metavar="DIR", help="a comparison folder (or a single run folder)")
    p.add_argument("--no-plots", dest="plots", action="store_false", help="write the tables only")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "export", formatter_class=fmt, help="export a run's sparse weights",
        description="Export the trained weights of a run folder for inference: condensed (constant fan-in "
                    "rows), csr, or dense with zeros.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run folder with checkpoint.pt")
    p.add_argument("--format", choices=("condensed", "csr", "dense"), default="condensed",
                   help="storage format (default: condensed)")
    p.add_argument("--out", metavar="PATH", help="output path without suffix; PATH.safetensors and PATH.json are "
                   "written (default: RUN_DIR/exported-FORMAT)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "demo", formatter_class=fmt, help="a two-minute comparison on the built-in digits data",
        description="A short comparison on scikit-learn's digits (no files, no network): an MLP 64-128-128-10, "
                    f"methods {','.join(DEMO_METHODS)} and a dense baseline at "
                    f"{' and '.join(f'{100 * x:g}%' for x in DEMO_SPARSITY)} sparsity, {DEMO_SEEDS} seeds, "
                    f"{DEMO_CONFIG['epochs']} epochs. Prints the table and writes the plots to OUT/plots.")
    p.add_argument("--out", metavar="DIR", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument("--epochs", type=int, default=DEMO_CONFIG["epochs"],
                   help=f"epochs per run (default: {DEMO_CONFIG['epochs']})")
    p.add_argument("--seeds", type=int, default=DEMO_SEEDS, help=f"number of seeds (default: {DEMO_SEEDS})")
    p.add_argument("--threads", type=int, default=DEMO_THREADS,
                   help=f"torch CPU threads (default: {DEMO_THREADS}; small layers gain nothing from more)")
    p.add_argument("--quiet", action="store_true", help="no progress bars, per-run lines or table (the "
                   "written files are still listed)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "claims", formatter_class=fmt, help="measure the papers' claims and write a report with verdicts",
        description="Run the experiments behind eight claims of the GSE, DST-EE, SRigL and ITOP papers "
                    "(LeNet-300-100 on Fashion-MNIST, 3 seeds, and a GCN on the built-in community graph), "
                    "then write OUT/claims.md and OUT/figures: each claim's sentence, setup, table, figure "
                    "and verdict. Finished runs are reused: run the same command again to continue.",
        epilog="example:\n  regrow claims --data-dir ../shared/data/fashion-mnist --out runs/claims --doc-dir docs\n"
               "  regrow claims --quick --out /tmp/claims        # the pipeline on tiny settings")
    p.add_argument("--out", metavar="DIR", default="runs/claims", help="folder of the runs (default: runs/claims)")
    p.add_argument("--data-dir", metavar="DIR", help="Fashion-MNIST's folder (not needed with --quick)")
    p.add_argument("--only", type=lambda t: [int(v) for v in _names(t)], metavar="N1,N2,...",
                   help="measure only these claims (1-8)")
    p.add_argument("--seeds", type=int, metavar="N", help="seeds per setting (default: 3; 1 with --quick)")
    p.add_argument("--quick", action="store_true", help="tiny settings (digits, one epoch): tests the pipeline, "
                   "the verdicts mean nothing")
    p.add_argument("--doc-dir", metavar="DIR", help="also write DIR/claims.md and DIR/figures/claims/")
    p.add_argument("--quiet", action="store_true", help="no progress bars and no per-claim lines")
    p.set_defaults(func=cmd_claims)
    return parser


# -- commands --------------------------------------------------------------------------------
def _show_progress(args) -> bool:
    return not args.quiet and sys.stderr.isatty()


def _log(args):
    return None if args.quiet else (lambda line: print(line, flush=True))


def cmd_train(args) -> int:
    from .ddp import process_group_from_env
    # under torchrun every rank runs this command: join the others; rank 0 alone reports
    with process_group_from_env() as group:
        return _train_command(args, quiet=not group.is_main)   # --quiet keeps the final line


def _train_command(args, *, quiet: bool) -> int:
    from .train import train
    if args.resume:
        extra = [f for f in given_config_flags(args) if f != "--threads"]
        if extra or args.config or args.out:
            given = extra + (["--config"] if args.config else []) + (["--out"] if args.out else [])
            raise CLIError(f"--resume continues a run with its own configuration; drop {', '.join(given)}")
    if args.resume and (Path(args.resume) / "round-0").is_dir():   # an imp run: continue its rounds
        args.run_dir = Path(args.resume)
        if (args.run_dir / "summary.json").exists():
            raise CLIError(f"imp run in {args.run_dir} already finished (summary.json exists); nothing to resume")
        if hasattr(args, "threads"):
            raise CLIError("an imp run resumes with its own --threads; drop --threads")
        from .imp import run_imp
        summary = run_imp(None, args.resume, progress=_show_progress(args), log=_log(args),
                          tensorboard=args.tensorboard)
        out = Path(args.resume)
    elif args.resume:
        config = None
        args.run_dir = Path(args.resume)   # for the Ctrl-C hint in main()
        if hasattr(args, "threads"):
            from .checkpoint import load_run_checkpoint
            config = from_dict(load_run_checkpoint(args.resume)["config"]).replace(threads=args.threads)
        out = Path(args.resume)
        summary = train(config, out, resume=True, progress=_show_progress(args), log=_log(args),
                        tensorboard=args.tensorboard)
    else:
        config = resolve_config(args)
        out = Path(args.out or f"runs/{config.method}-sp{config.sparsity:g}-seed{config.seed}")
        args.run_dir = out   # for the Ctrl-C hint in main()
        if config.method == "imp":   # rounds of ordinary runs; the same command again continues them
            from .imp import run_imp
            summary = run_imp(config, out, progress=_show_progress(args), log=_log(args),
                              tensorboard=args.tensorboard)
        else:
            summary = train(config, out, progress=_show_progress(args), log=_log(args),
                            tensorboard=args.tensorboard)
    if not quiet:
        print(f"{summary['method']} at sparsity {summary['sparsity']:g}: test accuracy "
              f"{100 * summary['test_accuracy']:.2f}% (best {100 * summary['best_test_accuracy']:.2f}%), "
              f"density {summary['final_density']:.4f}, ITOP {summary['itop_rate']:.3f}, "
              f"train FLOPs {summary['train_flops_ratio']:.3f}x, inference FLOPs "
              f"{summary['inference_flops_ratio']:.3f}x of dense, {summary['wall_seconds']:.1f}s -> {out}")
    return 0


def _compare(base: TrainConfig, methods, sparsities, seeds, out, *, dense: bool, plots: bool, args,
             vary: dict | None = None) -> dict:
    from .compare import run_compare
    from .report import write_report
    run_compare(base, methods, sparsities, seeds, out, dense=dense, progress=_show_progress(args), log=_log(args),
                vary=vary)
    return write_report(out, plots=plots)


def _print_report(report: dict, quiet: bool = False) -> None:
    """The results table and the written files; ``quiet`` prints the files only."""
    if not quiet:
        print()
        print(report["markdown"], end="")
        print()
    print("written: " + ", ".join(report["files"]))


def cmd_compare(args) -> int:
    if args.seeds < 1:
        raise CLIError(f"--seeds must be >= 1, got {args.seeds}")
    base = resolve_config(args)
    seeds = list(range(base.seed, base.seed + args.seeds))
    from .grid import parse_vary
    try:
        vary = parse_vary(args.vary or [])
    except ValueError as err:
        raise CLIError(str(err).replace("config key '", "key '")) from None
    report = _compare(base, args.methods, args.sparsities, seeds, args.out, dense=args.dense, plots=args.plots,
                      args=args, vary=vary)
    _print_report(report, args.quiet)
    return 0


def cmd_report(args) -> int:
    from .report import write_report
    _print_report(write_report(args.dir, plots=args.plots))
    return 0


def cmd_demo(args) -> int:
    config = from_dict({**DEMO_CONFIG, "epochs": args.epochs, "threads": args.threads})
    if args.seeds < 1:
        raise CLIError(f"--seeds must be >= 1, got {args.seeds}")
    report = _compare(config, list(DEMO_METHODS), list(DEMO_SPARSITY), list(range(args.seeds)), args.out,
                      dense=True, plots=True, args=args)
    _print_report(report, args.quiet)
    return 0


def cmd_claims(args) -> int:
    from .claims import run_claims
    command = " ".join(["regrow claims"] + (["--data-dir", str(args.data_dir)] if args.data_dir else [])
                       + ["--out", str(args.out)] + (["--doc-dir", str(args.doc_dir)] if args.doc_dir else [])
                       + (["--quick"] if args.quick else []) + (["--only", ",".join(map(str, args.only))] if args.only else []))
    results = run_claims(args.out, quick=args.quick, only=args.only, data_dir=args.data_dir, seeds=args.seeds,
                         doc_dir=args.doc_dir, command=command, progress=_show_progress(args),
                         log=None if args.quiet else _log(args))
    for r in results:
        print(f"claim {r.number} ({r.title}): {r.verdict}")
    print(f"written: {Path(args.out) / 'claims.md'}" + (f", {Path(args.doc_dir) / 'claims.md'}" if args.doc_dir else ""))
    return 0


def cmd_export(args) -> int:
    run_dir = Path(args.run_dir)
    if not (run_dir / "checkpoint.pt").is_file():
        raise CLIError(f"{run_dir} has no checkpoint.pt: not a run folder")
    from .export_run import export_run
    result = export_run(run_dir, args.format, args.out)
    for layer in result.get("report", []):
        notes = f" ({layer['notes']})" if layer.get("notes") else ""
        print(f"  {layer['name']}: {layer['format']} {'x'.join(map(str, layer['shape']))}, "
              f"{layer['params']} params{notes}")
    print(f"exported {run_dir} as {args.format}: {result['params']} parameters (dense {result['dense_params']}), "
          f"{result['bytes']} bytes -> {result['weights']} + {result['spec']}")
    return 0


def ask_for_huge_pages() -> None:
    """Make torch back its CPU tensors with transparent huge pages (``THP_MEM_ALLOC_ENABLE=1``)
    unless the user set the variable. torch reads it once, at its first CPU allocation, so this
    runs before the command makes any tensor (importing regrow allocates none; a test checks).
    Wide always-sparse layers need it for time linear in width (docs/performance.md)."""
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    text = str(message)
    return (text if text.startswith("regrow") else f"regrow: {category.__name__}: {text}") + "\n"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``regrow`` console script and ``python -m regrow``."""
    ask_for_huge_pages()
    parser = build_parser()
    args = parser.parse_args(argv)
    # a warning is news for the user, not for a developer: one line, without the source line
    formatwarning, warnings.formatwarning = warnings.formatwarning, _one_line_warning
    try:
        return args.func(args)
    except KeyboardInterrupt:
        hint = ""
        run_dir = getattr(args, "run_dir", None)   # unset: interrupted before a run folder was chosen
        if args.command == "train" and run_dir is not None:
            hint = f"; continue with: regrow train --resume {run_dir}"
        elif args.command in ("compare", "demo", "claims"):
            hint = "; run the same command again to continue"
        print(f"regrow: interrupted{hint}", file=sys.stderr)
        return 130
    except (ValueError, OSError) as err:
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"regrow {args.command}: error: {message}", file=sys.stderr)
        return 1
    finally:
        warnings.formatwarning = formatwarning


if __name__ == "__main__":
    sys.exit(main())
