"""Run configuration: one dataclass that the CLI flags, YAML files and checkpoints share.

Every field carries its own help text and kind in its metadata, so the argparse flags
(``--update-interval``), the YAML keys (``update_interval``) and the validation all come
from one place. Precedence when resolving: dataclass defaults < ``--config`` file < flags.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..data import DATASETS
from ..core.density import DISTRIBUTIONS
from ..methods import METHODS, REGISTRY, option_names
from ..models import MODELS
from ..core.nm import nm_sparsity, parse_nm
from ..core.schedules import DROP_SCHEDULES

OPTIMIZERS = ("sgd", "adam", "adamw")
LR_SCHEDULES = ("cosine", "step", "constant")
BACKENDS = ("masked", "sparse")
GROW_INITS = ("zero", "random")
SAMPLINGS = ("uniform", "grabo", "graest")
#: the engine's methods and ``imp``, which the CLI runs as rounds of them (see :mod:`.imp`)
CLI_METHODS: tuple[str, ...] = METHODS + ("imp",)
#: the method options ``imp`` takes (its rounds and pruning scope)
IMP_OPTIONS = ("rounds", "scope")
INIT_MASKS = ("random", "magnitude", "existing")

# kinds: int, float, str, bool (flag with --no-), obool (True/False/None), ints, floats,
# strs (comma-separated on the command line), dict (KEY=VALUE, repeatable)


def _opt(default: Any, help: str, kind: str, *, choices: tuple | None = None,
         group: str = "training", metavar: str | None = None) -> Any:
    meta = {"help": help, "kind": kind, "choices": choices, "group": group, "metavar": metavar}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


# Method options: config field -> the keyword the method classes take.
METHOD_OPTIONS = {
    "grow_init": "grow_init", "gamma": "gamma", "sampling": "sampling", "c": "c", "eps": "eps",
    "gamma_sal": "gamma_sal", "ablation": "ablation", "begin_fraction": "begin_fraction",
    "scope": "scope", "rounds": "rounds", "momentum_beta": "momentum",
    "lam": "lam", "mutation_schedule": "mutation_schedule", "soft": "soft", "temperature": "temperature",
    "backward_extra": "backward_extra", "penalty": "penalty",
}


@dataclass
class TrainConfig:
    """Everything that defines one training run (the output directory aside)."""

    # -- model and data ---------------------------------------------------------------------
    model: str = _opt("mlp", "network to train", "str", choices=MODELS, group="model and data")
    widths: list = _opt([], "hidden widths of the mlp, comma-separated (empty: the model's default, "
                        "LeNet-300-100)", "ints", group="model and data", metavar="W1,W2,...")
    model_options: dict = _opt({}, "other model option KEY=VALUE (repeatable), e.g. width=0.5 for "
                               "resnets/vggs, dim=128 for vit", "dict", group="model and data",
                               metavar="KEY=VALUE")
    dataset: str = _opt("digits", "data set", "str", choices=DATASETS, group="model and data")
    data_dir: str | None = _opt(None, "folder holding the data set's files (mnist, fashion-mnist, "
                                "cifar10, cifar100)", "str", group="model and data", metavar="DIR")
    val_fraction: float = _opt(0.0, "fraction of the training set held out for validation", "float",
                               group="model and data")
    augment: bool | None = _opt(None, "random crop + flip on training images (default: on for CIFAR "
                                "only)", "obool", group="model and data")

    # -- optimisation -----------------------------------------------------------------------
    epochs: int = _opt(10, "training epochs", "int")
    batch_size: int = _opt(128, "training batch size", "int")
    eval_batch_size: int = _opt(1000, "batch size for evaluation", "int")
    optimizer: str = _opt("sgd", "optimizer", "str", choices=OPTIMIZERS)
    lr: float = _opt(0.1, "peak learning rate", "float")
    momentum: float = _opt(0.9, "SGD momentum", "float")
    nesterov: bool = _opt(True, "Nesterov momentum for SGD", "bool")
    weight_decay: float = _opt(5e-4, "weight decay (decoupled for adamw)", "float")
    lr_schedule: str = _opt("cosine", "learning-rate schedule, stepped every batch", "str",
                            choices=LR_SCHEDULES)
    warmup_epochs: float = _opt(0.0, "linear warm-up from 0 to --lr over this many epochs", "float")
    lr_steps: list = _opt([], "epochs at which the step schedule multiplies the LR by --lr-gamma "
                          "(default: 50%% and 75%% of training)", "floats", metavar="E1,E2,...")
    lr_gamma: float = _opt(0.1, "factor of each LR step", "float")
    label_smoothing: float = _opt(0.0, "label smoothing of the cross-entropy loss", "float")
    seed: int = _opt(0, "seed of model init, data order and every DST choice", "int")
    threads: int | None = _opt(None, "torch CPU threads (default: torch's own choice); small models on a "
                               "busy machine run much faster with 1", "int")
    checkpoint_every: int = _opt(0, "also checkpoint every N steps (0: only at the end of each epoch)",
                                 "int", metavar="N")

    # -- dynamic sparsity (regrow.DynamicSparsity) -----------------------------------------
    method: str = _opt("rigl", "sparse training method (imp: iterative magnitude pruning with rewinding, "
                       "rounds of dense then static runs)", "str", choices=CLI_METHODS, group="sparsity")
    sparsity: float = _opt(0.9, "fraction of the sparsified weights that are zero", "float",
                           group="sparsity")
    distribution: str = _opt("erk", "per-layer density allocation", "str", choices=DISTRIBUTIONS,
                             group="sparsity")
    update_interval: int = _opt(100, "steps between topology updates (dT)", "int", group="sparsity")
    drop_fraction: float = _opt(0.3, "fraction rewired at the first update (alpha)", "float",
                                group="sparsity")
    drop_schedule: str = _opt("cosine", "decay of the drop fraction", "str", choices=DROP_SCHEDULES,
                              group="sparsity")
    stop_fraction: float = _opt(0.75, "no topology updates after this fraction of training", "float",
                                group="sparsity")
    nm: str | None = _opt(None, "N:M structure, e.g. 2:4: exactly N active in every group of M inputs "
                          "(give --sparsity 1-N/M too)", "str", group="sparsity", metavar="N:M")
    sparse_init: str = _opt("fan_in", "rescale each neuron's initial weights to its active fan-in "
                            "(fan_in) or leave the model's init (none)", "str",
                            choices=("fan_in", "none"), group="sparsity")
    dense_layers: list = _opt([], "parameter or module names kept dense, comma-separated", "strs",
                              group="sparsity", metavar="NAME,...")
    rewind_epoch: int | None = _opt(None, "imp: rewind the survivors to their values at the end of this epoch "
                                    "of the dense round (0: the initial weights; default 0); other methods: "
                                    "write OUT/rewind.pt then", "int", group="sparsity", metavar="E")
    init_weights: str | None = _opt(None, "load these weights (a state_dict .pt) before the sparsity engine "
                                    "is built", "str", group="sparsity", metavar="FILE")
    init_mask: str = _opt("random", "initial masks (see DynamicSparsity): random, magnitude (largest |w|) or "
                          "existing (the loaded weights' zeros)", "str", choices=INIT_MASKS, group="sparsity")
    backend: str = _opt("masked", "masked (any model) or sparse (always-sparse SparseLinear / SparseConv2d "
                        "layers, any model of the zoo; methods that need dense weights are refused)", "str",
                        choices=BACKENDS, group="sparsity")

    # -- method options (None: the method's own default) -------------------------------------
    grow_init: str | None = _opt(None, "initial value of grown weights (set: random; others: zero)",
                                 "str", choices=GROW_INITS, group="method options")
    gamma: float | None = _opt(None, "gse: subset size as a multiple of the active count (1.0)",
                               "float", group="method options")
    sampling: str | None = _opt(None, "gse: subset distribution (uniform)", "str", choices=SAMPLINGS,
                                group="method options")
    c: float | None = _opt(None, "dstee: exploration coefficient (1e-3)", "float", group="method options")
    eps: float | None = _opt(None, "dstee: count smoothing (1.0)", "float", group="method options")
    gamma_sal: float | None = _opt(None, "srigl: saliency threshold for neuron ablation (0.3)", "float",
                                   group="method options")
    ablation: bool | None = _opt(None, "srigl: ablate neurons with too few salient weights (on)",
                                 "obool", group="method options")
    begin_fraction: float | None = _opt(None, "gmp: start pruning at this fraction of training (0.0)",
                                        "float", group="method options")
    scope: str | None = _opt(None, "snip, grasp, synflow, imp: rank all layers together or each layer on its "
                             "own (global)", "str", choices=("global", "layer"), group="method options")
    rounds: int | None = _opt(None, "synflow: pruning rounds (100); imp: prune-rewind-retrain "
                          "rounds after the dense one (3)", "int", group="method options")
    momentum_beta: float | None = _opt(None, "snfs: smoothing of its running dense-gradient mean (0.9)",
                                       "float", group="method options")
    lam: float | None = _opt(None, "mest: gradient weight in the drop score |w| + lam |g| (1e-2)", "float",
                             group="method options")
    mutation_schedule: str | None = _opt(None, "mest: drop-fraction decay, the engine's or the authors' "
                                         "step schedule (engine)", "str", choices=("engine", "mest"),
                                         group="method options")
    soft: bool | None = _opt(None, "cht: CHTs soft sampling of kept and grown links (off)", "obool",
                             group="method options")
    temperature: float | None = _opt(None, "cht: soft sampling exponent T (1.0)", "float", group="method options")
    backward_extra: float | None = _opt(None, "topkast: backward set = forward + this fraction of the weights "
                                        "(default: the forward density)", "float", group="method options")
    penalty: float | None = _opt(None, "topkast: L2 coefficient, 1/D times larger outside the forward set "
                                 "(1e-4)", "float", group="method options")

    # -- derived -------------------------------------------------------------------------------
    def method_options(self, *, strict: bool = True) -> dict:
        """The method options that were set, as keywords for ``DynamicSparsity``.

        ``strict``: an option the method does not take is an error (``train``); otherwise it
        is dropped (``compare`` shares one set of options among several methods).
        """
        accepted = set(IMP_OPTIONS) if self.method == "imp" else set(option_names(REGISTRY[self.method]))
        out = {}
        for key, kw in METHOD_OPTIONS.items():
            value = getattr(self, key)
            if value is None:
                continue
            if kw not in accepted:
                if strict:
                    flag = "--no-ablation" if key == "ablation" and not value else "--" + key.replace("_", "-")
                    raise ValueError(f"{flag} does not apply to method '{self.method}' "
                                     f"(its options: {', '.join(sorted(accepted)) or 'none'})")
                continue
            out[kw] = value
        return out

    def model_kwargs(self) -> dict:
        opts = dict(self.model_options)
        if self.widths:
            if self.model != "mlp":
                raise ValueError(f"--widths applies to the mlp only, not '{self.model}'")
            opts["widths"] = tuple(self.widths)
        return opts

    def validate(self) -> "TrainConfig":
        """Checks that need more than one field or fall outside the engine's own checks."""
        for name in ("epochs", "batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be >= 0, got {self.checkpoint_every}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.warmup_epochs < 0 or self.warmup_epochs > self.epochs:
            raise ValueError(f"warmup_epochs must be in [0, epochs], got {self.warmup_epochs}")
        if self.method == "dense" and self.sparsity != 0.0:
            raise ValueError("method 'dense' trains every weight: use --sparsity 0")
        if self.rewind_epoch is not None and not 0 <= self.rewind_epoch <= self.epochs:
            raise ValueError(f"rewind_epoch must be in [0, epochs], got {self.rewind_epoch}")
        if self.method == "imp":
            if self.backend != "masked" or self.nm is not None or self.init_weights is not None \
                    or self.init_mask != "random":
                raise ValueError("imp prunes dense weights by magnitude on the masked backend: it takes no "
                                 "--backend sparse, --nm, --init-weights or --init-mask")
            if not 0.0 < self.sparsity < 1.0:
                raise ValueError(f"imp needs a sparsity in (0, 1), got {self.sparsity}")
            if self.rounds is not None and self.rounds < 1:
                raise ValueError(f"imp needs --rounds >= 1, got {self.rounds}")
        if self.backend == "sparse":
            if not REGISTRY[self.method].sparse_backend:
                able = ", ".join(m for m in METHODS if REGISTRY[m].sparse_backend)
                raise ValueError(f"--backend sparse supports methods {able}, not '{self.method}' "
                                 f"(it {REGISTRY[self.method].sparse_backend_refusal})")
        if self.nm is not None:
            nm_sparsity(parse_nm(self.nm), self.sparsity)
        self.method_options(strict=True)
        self.model_kwargs()
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def coerce(name: str, value: Any) -> Any:
    """Check and convert one config value (from YAML or a flag) to the field's kind."""
    if name not in FIELDS:
        close = [k for k in FIELDS if k.startswith(name[:3])]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(f"unknown config key '{name}'{hint}")
    meta = FIELDS[name].metadata
    kind, choices = meta["kind"], meta["choices"]
    if value is None:
        if FIELDS[name].default is None or kind in ("obool",):
            return None
        raise ValueError(f"config key '{name}' cannot be empty")
    try:
        out = _convert(kind, value)
    except (TypeError, ValueError):
        raise ValueError(f"config key '{name}': cannot read {value!r} as {_KIND_WORDS[kind]}") from None
    if choices and out not in choices:
        raise ValueError(f"config key '{name}': '{out}' is not one of {', '.join(choices)}")
    return out


_KIND_WORDS = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true/false",
               "obool": "true/false", "ints": "a list of integers", "floats": "a list of numbers",
               "strs": "a list of names", "dict": "a mapping KEY: VALUE"}


def _convert(kind: str, value: Any) -> Any:
    if kind == "int":
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError
        return int(value)
    if kind == "float":
        if isinstance(value, bool):
            raise ValueError
        return float(value)
    if kind == "str":
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ValueError
        return str(value)
    if kind in ("bool", "obool"):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise ValueError
    if kind in ("ints", "floats", "strs"):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ValueError
        item = {"ints": "int", "floats": "float", "strs": "str"}[kind]
        return [_convert(item, v) for v in value]
    if kind == "dict":
        if not isinstance(value, dict):
            raise ValueError
        return {str(k): v for k, v in value.items()}
    raise AssertionError(kind)


def from_dict(values: dict, base: TrainConfig | None = None) -> TrainConfig:
    """``base`` (default: the defaults) with ``values`` applied; keys may use - or _."""
    changes = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        changes[name] = coerce(name, value)
    return dataclasses.replace(base or TrainConfig(), **changes)


def read_yaml(path: str | Path) -> dict:
    """A config file's mapping (an empty file is an empty mapping)."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise FileNotFoundError(f"config file {path} does not exist") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ValueError(f"config file {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of option: value, not {type(data).__name__}")
    return data


def load_yaml(path: str | Path, base: TrainConfig | None = None) -> TrainConfig:
    try:
        return from_dict(read_yaml(path), base)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def save_yaml(config: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))


def describe_differences(a: TrainConfig, b: TrainConfig, ignore: tuple[str, ...] = ("threads",)) -> list[str]:
    """``key: a -> b`` for every field that differs (used to refuse mixing runs)."""
    da, db = a.to_dict(), b.to_dict()
    return [f"{k}: {da[k]!r} -> {db[k]!r}" for k in da if k not in ignore and da[k] != db[k]]
