"""One dataclass config whose defaults are the ssd.pytorch/lufficc SSD300 VOC0712 recipe.

The DA paper (section III) states no training recipe: only PyTorch, a Tesla K80, "the SSD
algorithm on the VOC data set" and 300x300 inputs. The defaults below are therefore the widely
used SSD300 VOC0712 recipe of the amdegroot/ssd.pytorch and lufficc/SSD code bases, chosen
because the paper is silent; training on VOC07+12 trainval is our assumption too.

YAML files in ``configs/`` hold only the changes; ``key=value`` overrides on the command line
come last; explicit command-line options (``--lr``) override all of them. Only the ``build_*``
functions and the tools read this object: the modules themselves take explicit arguments
(docs/design.md). This module also holds what every tool that takes a training recipe shares:
the command-line options derived from the fields (:func:`add_config_arguments`), their
resolution into a Config (:func:`resolve_config`); the checks run before any work are
:func:`ssd_da.config_checks.validate_config`.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

# Config.attention_init's default: resolved by resolve_attention_init from Config.pretrained.
AUTO_INIT = "auto"
# "voc": a VOCdevkit folder and voc07_trainval-style splits; "coco":
# annotations/instances_<split>.json and <split>/ image folders (ssd_da.data.coco).
DATA_FORMATS: tuple[str, ...] = ("voc", "coco")


@dataclass
class Config:
    """Training and evaluation settings. Defaults: SSD300 on VOC07+12 trainval, tested on VOC07
    test, with the ssd.pytorch / lufficc SSD300 VOC0712 recipe. The DA paper states no recipe of
    its own (section III names only SSD, VOC and 300x300), so none of these values is the paper's
    (module docstring, docs/method.md)."""

    # model
    backbone: str = "da_resnet50"
    # ImageNet weights: a local file, a torchvision weights name ("IMAGENET1K_V1", "DEFAULT") or
    # "none". If the named weights cannot be reached (offline) training starts from scratch with
    # a warning, so the default never blocks a run.
    pretrained: str = "IMAGENET1K_V1"
    # How the attention modules start: "default", each module's own initialisation (random
    # gates); "identity", each wrapped as x + g * (attn(x) - x) with g = 0, so the detector
    # starts exactly as the plain ResNet's (one extra parameter per module); "auto": "identity"
    # when `pretrained` names trunk weights (a file or a torchvision name), "default" when it is
    # "none". Our choice, not the papers' (neither says how its attention modules started):
    # ImageNet weights exist only for the plain ResNets, and a random module on them perturbs,
    # or for SA and MHSA scrambles, the pretrained trunk at step 0 (docs/experiments.md, "Fair
    # starts"). Training records the resolved value, never "auto" (resolve_attention_init).
    attention_init: str = AUTO_INIT
    sync_bn: bool = False

    # data
    # "voc": data_root is a VOCdevkit folder, splits are voc07_trainval, voc07_test, ...;
    # "coco": data_root holds annotations/instances_<split>.json and <split>/ image folders,
    # splits are those names (train2017, val2017, ...).
    data_format: str = "voc"
    data_root: str = "data/VOCdevkit"
    train_split: str = "voc07_trainval+voc12_trainval"
    test_split: str = "voc07_test"
    classes: list[str] | None = None  # None: the 20 VOC classes (COCO format: its categories)
    demo: bool = False  # generate the synthetic demo dataset under data_root on first use
    keep_difficult: bool = False  # difficult objects in training targets (never in evaluation)
    skip_bad: bool = False  # skip samples with a malformed XML or a missing/undecodable image
    # Objects whose class is not in the class list are an error (a typo, "Dog" for "dog"), unless
    # this is true: then they are left out and counted (e.g. --classes dog,cat on full VOC).
    ignore_other_classes: bool = False
    # Data-loading processes per training process; -1: one per CPU core this process may
    # use, less one for the training loop, split between the processes of a torchrun job.
    workers: int = -1

    # optimisation: SGD, lr 1e-3, momentum 0.9, weight decay 5e-4, batch 32, 120k iterations with
    # lr x0.1 at 80k and 100k: the VOC0712 config of ssd.pytorch and lufficc/SSD (the SSD paper's
    # own VOC schedule, sec. 3.1, is 1e-3 for 40k, then 1e-4 and 1e-5 for 10k each). The 500-step
    # linear warmup from lr/3 is lufficc's; ssd.pytorch has none (warmup_iters=0 gives its recipe).
    batch_size: int = 32  # per process: under torchrun the global batch is N x batch_size
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 5e-4
    iters: int = 120_000
    lr_steps: list[int] = field(default_factory=lambda: [80_000, 100_000])
    lr_gamma: float = 0.1
    warmup_iters: int = 500
    warmup_factor: float = 1.0 / 3.0
    grad_clip: float = 0.0  # 0 disables; max global norm otherwise

    # bookkeeping
    output_dir: str = "runs/{backbone}"
    eval_every: int = 5000  # 0: only at the end
    ckpt_every: int = 1000
    log_every: int = 20
    # Also write log.jsonl's scalars (loss terms, lr, images/s, data-wait share, mAP) as
    # TensorBoard events under <output_dir>/tensorboard/ (ssd_da.engine.tensorboard).
    tensorboard: bool = False
    seed: int = 0
    amp: bool = False  # bf16 autocast, GPU only
    # Off by default until measured on a GPU (docs/benchmarks.md, tools/benchmark.py gpu-suite).
    channels_last: bool = False  # NHWC memory format for the network, training and evaluation
    compile: bool = False  # torch.compile the network (backbone, extras, head)
    device: str = "auto"
    metric: str = "voc07"  # "voc07" (11-point) or "area"
    eval_batch_size: int = 32

    def trunk_weights(self) -> str | None:
        """The trunk weights ``pretrained`` names (a file or a torchvision name), or None for
        a start from scratch ("none", "scratch" or empty, in any case)."""
        return None if self.pretrained.lower() in ("", "none", "scratch") else self.pretrained

    def resolved_output_dir(self) -> Path:
        return Path(self.output_dir.format(backbone=self.backbone))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _field_types() -> dict[str, Any]:
    return {f.name: f for f in dataclasses.fields(Config)}


def _default(name: str) -> Any:
    f = _field_types()[name]
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _coerce(name: str, value: Any) -> Any:
    """Check a value against the field's default type; ints are accepted where floats are."""
    default = _default(name)
    if name == "classes":
        if isinstance(value, str) and not value.strip():
            # An unset shell variable (--classes "$CLASSES") must not mean the 20 VOC classes.
            raise ValueError("config field 'classes' is empty (an unset shell variable?); give "
                             "the class names as a,b,c, or 'voc' for the 20 VOC classes, or "
                             "leave it out")
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "voc")):
            return None
        if isinstance(value, str):
            value = [c.strip() for c in value.split(",") if c.strip()]
        if not isinstance(value, list) or not value or not all(isinstance(c, str) for c in value):
            raise ValueError(f"config field 'classes' must be a list of names or 'a,b,c', got {value!r}")
        return value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        raise ValueError(f"config field {name!r} must be true or false, got {value!r}")
    if isinstance(default, float) and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:  # YAML 1.1 reads "1e-3" (no dot) as a string
            return float(value)
        except ValueError:
            raise ValueError(f"config field {name!r} must be float, got {value!r}") from None
    if isinstance(default, list):  # lr_steps, the one list of iterations
        if isinstance(value, int) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list) or not all(
                isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
            raise ValueError(f"config field {name!r} must be a list of positive iterations, "
                             f"got {value!r}")
        return value
    if isinstance(default, int) and isinstance(value, bool):  # True is an int in Python
        raise ValueError(f"config field {name!r} must be an integer, got {value!r}")
    if default is not None and not isinstance(value, type(default)):
        raise ValueError(f"config field {name!r} must be {type(default).__name__}, got {value!r}")
    return value


# Fields that configs saved by earlier versions may hold, with the one value they could take:
# accepted silently with that value (so old runs resume), an error with any other.
RETIRED_FIELDS: dict[str, Any] = {"image_size": 300}  # SSD300's input side, now a constant


def apply_overrides(cfg: Config, overrides: dict[str, Any], source: str) -> Config:
    """Return a copy of ``cfg`` with ``overrides`` applied; unknown keys name the valid ones."""
    known = _field_types()
    changes = {}
    for key, value in overrides.items():
        key = key.replace("-", "_")
        if key in RETIRED_FIELDS and key not in known:
            if value != RETIRED_FIELDS[key]:
                raise ValueError(f"{source}: {key} is fixed at {RETIRED_FIELDS[key]} (SSD300) and "
                                 f"no longer a config key; got {value!r}")
            continue
        if key not in known:
            valid = ", ".join(sorted(known))
            raise ValueError(f"{source}: unknown config key {key!r}; valid keys: {valid}")
        changes[key] = _coerce(key, value)
    return dataclasses.replace(cfg, **changes)


def parse_key_values(items: Sequence[str]) -> dict[str, Any]:
    """Parse ``["lr=0.01", "lr_steps=[10,20]"]``; values are read as YAML scalars/lists."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ValueError(f"override {item!r}: value is not valid YAML ({exc})") from None
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a key given twice in one mapping is an error: PyYAML lets
    the last one win silently, so ``lr: 0.01`` ten lines above ``lr: 0.001`` would be lost."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice (lines {seen[key]} and {line}); "
                    f"keep one", key_node.start_mark)
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Defaults, then the YAML file at ``path`` (if any), then ``key=value`` overrides."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ValueError(f"config file {path} is a folder; give a YAML file, e.g. "
                             f"configs/demo.yaml")
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        try:
            with open(path) as fh:
                data = yaml.load(fh, Loader=_UniqueKeyLoader) or {}  # noqa: S506 (a SafeLoader)
        except yaml.YAMLError as exc:
            raise ValueError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
        cfg = apply_overrides(cfg, data, str(path))
    return apply_overrides(cfg, parse_key_values(overrides), "command line")


def resolve_attention_init(cfg: Config) -> Config:
    """``cfg`` with ``attention_init`` "auto" replaced by what it stands for: "identity" when
    ``pretrained`` names trunk weights, "default" from scratch. An explicit value is kept. The
    value follows the setting, not the download: a run whose named weights turn out unreachable
    falls back to scratch (trainer.build_model) and keeps the resolved value."""
    if cfg.attention_init != AUTO_INIT:
        return cfg
    init = "identity" if cfg.trunk_weights() is not None else "default"
    return dataclasses.replace(cfg, attention_init=init)


def save_config(cfg: Config, path: str | Path) -> None:
    with open(path, "w") as fh:
        yaml.safe_dump(cfg.to_dict(), fh, sort_keys=False)


# Config fields that also have their own option (--data-root DIR); every field can be given as a
# trailing key=value. Booleans become flags (--amp); types come from the fields' defaults.
CLI_FIELDS: tuple[str, ...] = (
    "backbone", "data_format", "data_root", "train_split", "test_split", "classes", "iters",
    "batch_size", "lr", "workers", "eval_every", "output_dir", "pretrained", "device", "seed",
    "metric", "attention_init", "amp", "sync_bn", "skip_bad", "ignore_other_classes",
    "channels_last", "compile", "tensorboard",
)
# What the flags do (the other options' help is the field name and its default).
_FLAG_HELP = {
    "tensorboard": "also write the log's scalars as TensorBoard events in <output_dir>/tensorboard/",
    "amp": "bf16 autocast on GPU",
    "channels_last": "channels_last (NHWC) memory format for the network",
    "compile": "torch.compile the network (minutes of compilation first)",
    "sync_bn": "SyncBatchNorm across processes under torchrun",
    "skip_bad": "skip samples with a malformed XML or a missing, unreadable or undecodable image "
                "(each named in a warning, and counted)",
    "ignore_other_classes": "leave out objects of classes not in the class list (counted per "
                            "class); without it they stop the run",
}


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config YAML``, one option per :data:`CLI_FIELDS` (default None: not given) and the
    trailing ``key=value`` overrides, as :func:`resolve_config` reads them."""
    parser.add_argument("--config", help="YAML file of Config overrides, e.g. configs/demo.yaml")
    for name in CLI_FIELDS:
        default, flag = _default(name), "--" + name.replace("_", "-")
        if isinstance(default, bool):
            parser.add_argument(flag, dest=name, action="store_true", default=None,
                                help=_FLAG_HELP.get(name, f"set Config.{name}"))
        else:  # classes (a list or None) is given as "a,b,c"
            kind = type(default) if isinstance(default, (int, float, str)) else str
            parser.add_argument(flag, dest=name, type=kind, default=None,
                                help=f"Config.{name} (default: {default!r})")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="any Config field, e.g. lr_steps=[80000,100000] warmup_iters=1000")


def resolve_config(args: argparse.Namespace, saved: dict[str, Any] | None = None) -> Config:
    """Defaults < ``--config`` YAML < ``key=value`` < explicit options.

    ``saved``: the config stored in the checkpoint a run resumes from. Without ``--config`` it
    replaces the defaults, so ``--resume last.pth`` alone continues with the run's own recipe.
    With or without ``--config``, an ``attention_init`` given nowhere on this command line is
    the run's recorded one (its modules were built that way)."""
    if saved is not None and not args.config:
        source = f"config saved in {getattr(args, 'resume', None) or 'the checkpoint'}"
        cfg = apply_overrides(Config(), saved, source)
        cfg = apply_overrides(cfg, parse_key_values(args.overrides), "command line")
    else:
        cfg = load_config(args.config, args.overrides)
    explicit = {k: getattr(args, k) for k in CLI_FIELDS if getattr(args, k, None) is not None}
    cfg = apply_overrides(cfg, explicit, "command-line options")
    if saved is not None and cfg.attention_init == AUTO_INIT:
        cfg = dataclasses.replace(cfg, attention_init=saved_value(saved, "attention_init"))
    return cfg


# Fields whose default has changed: a config saved without the key (before the field existed)
# ran with the value here, not with today's default. attention_init's default became "auto"
# after configs were saved without the key, whose runs started each module its own way.
SAVED_WITHOUT_KEY: dict[str, Any] = {"attention_init": "default"}


def saved_value(saved: dict[str, Any], name: str) -> Any:
    """The value field ``name`` had in the run whose config ``saved`` is (a config.yaml or a
    checkpoint's "config"): the saved one, else :data:`SAVED_WITHOUT_KEY`'s, else the
    default."""
    if name in saved:
        return saved[name]
    return SAVED_WITHOUT_KEY[name] if name in SAVED_WITHOUT_KEY else _default(name)
