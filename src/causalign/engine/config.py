"""Training configuration: a validated dataclass, YAML files and `--set key=value` overrides.

Defaults are the paper's optimiser settings (Adam, lr 1e-3) scaled to the built-in benchmark
(12 epochs, batch 64 where the paper trains 100 epochs at batch 128), so `causalign train
DATA --method M --out RUN` with no other flags reproduces the demo. The cosine learning-rate
schedule and the best-epoch selection on validation AUC are this project's protocol; the
paper states neither.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from numbers import Integral, Real
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ..errors import MAX_SETTING, ConfigError, did_you_mean, not_one_of

_INT32_MAX = 2**31 - 1  # torch.set_num_threads takes a C int
_INT64_MAX = 2**63 - 1  # tensor sizes, loop bounds
_SEED_MAX = 2**64 - 1  # torch.manual_seed's range (uint64)


def mps_note(name: str) -> str:
    """Why Apple's MPS is refused, for the error naming it: 'mps' read as a typo."""
    if not name.startswith("mps"):
        return ""
    return ("; Apple MPS is not supported (untested, and it has no float64, which parts of "
            "causalign compute in): on a Mac use cpu, which auto picks")


@dataclass
class TrainConfig:
    method: str = "erm"
    model: str = "cnn7"
    width: int = 16
    epochs: int = 12
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    scheduler: str = "cosine"  # learning-rate schedule over epochs: cosine | none
    seed: int = 0
    device: str = "auto"
    # Best-on-val selection. AUC is threshold-free, so an epoch whose BatchNorm running
    # statistics still lag (a shifted decision threshold) is not mistaken for a bad model.
    select_metric: str = "auc"
    eval_saliency: str = "gradcam"
    deletion_fractions: list[float] = field(default_factory=lambda: [0.002, 0.01, 0.02, 0.1,
                                                                     0.2])
    # the value deleted pixels take in the deletion metric: 0 is black for [0, 1] images, but
    # water for CT in HU (air is -1000) and the mean for z-scored images; set it to the data's
    # "nothing here" value, e.g. deletion_fill=-1000 for HU
    deletion_fill: float = 0.0
    # Class weights of the classification cross-entropy, for imbalanced data: none (plain
    # mean), balanced (n / (classes * count_c) from the training split's labels, sklearn's
    # rule) or an explicit list, one weight > 0 per class. The numbers used are recorded in
    # config.yaml (class_weight_values); see `resolve_class_weight`.
    class_weight: str | list[float] = "none"
    # Which training samples an epoch draws, for imbalanced data: none (a shuffled pass of
    # the split, as before the setting existed) or balanced (len(split) draws with
    # replacement, each sample with probability proportional to 1 / count of its class, so
    # every class is drawn equally often in expectation); see `epoch_order`.
    sampler: str = "none"
    # Re-estimate BatchNorm running statistics on the training split (train-mode forward,
    # cumulative average) before each validation. With few steps per epoch the default
    # momentum-0.1 averages lag the weights and the eval-mode model can collapse to one class
    # (measured: oracle val accuracy 0.48 -> 0.85 after recalibration).
    bn_recalibrate: bool = True
    # history.csv's train_accuracy each epoch: measured on this many training samples (a
    # fixed random subset, seeded by `seed`; 0 = the whole split). An eval pass over the
    # whole split added ~40 % to an ERM epoch on 2000 images; only the column depends on it.
    train_eval_samples: int = 0
    # Training-time augmentation: none | dihedral (random flips of H and W and, for square
    # images, transposition, the same for image and masks). Lesion attributes are invariant
    # to these, a corner shortcut symbol moves: use it for the oracle ceiling, not to compare
    # methods on the shortcut benchmark.
    augment: str = "none"
    # Initial weights: a run folder (its best.pt, else checkpoint.pt) or a checkpoint file of
    # the same architecture, e.g. to fine-tune a pretrained model; "" = random initialisation
    init: str = ""
    deterministic: bool = False
    threads: int = 0  # 0 = PyTorch's default
    # Speed (engine/distributed.py, README "Scale and reliability"): bf16 autocast of the
    # classifier forward (plain-forward methods; the others keep float32: no method opens a
    # Method.classifier_autocast region), torch.compile of the model (plain-forward methods),
    # SyncBatchNorm across ranks under torchrun (CUDA only).
    amp: bool = False
    compile: bool = False
    sync_bn: bool = False
    method_args: dict[str, Any] = field(default_factory=dict)
    # Architecture options of `model` (models.MODEL_OPTIONS; `--set model.<option>=v`), e.g.
    # multiview's train_slices (seed 002 App. E.3 trains on 10 of 100 slices). {} = defaults.
    model_args: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        """Check every setting, raising ConfigError naming the first bad one.

        Values of the right kind but another Python type are normalised in place (NumPy
        scalars to int/float/bool, an int lr to float, a path-like `init` to str, a tuple of
        deletion fractions to a list), so config.yaml can be written and compared."""
        self._normalise_types()
        if self.epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if not 0 < self.lr < math.inf:
            raise ConfigError(f"lr must be a finite number > 0, got {self.lr}")
        if not 0 <= self.weight_decay < math.inf:
            raise ConfigError(f"weight_decay must be a finite number >= 0, got "
                              f"{self.weight_decay}")
        # 1e38 passed and the optimiser's first step failed with an overflow traceback
        for name in ("lr", "weight_decay"):
            if getattr(self, name) > MAX_SETTING:
                raise ConfigError(f"{name} must be at most {MAX_SETTING:g} (float32 "
                                  f"arithmetic overflows beyond), got {getattr(self, name)}")
        if self.width < 1:
            raise ConfigError(f"width must be >= 1, got {self.width}")
        if self.threads < 0:
            raise ConfigError(f"threads must be >= 0 (0 = PyTorch's default), got "
                              f"{self.threads}")
        if self.seed < 0:
            raise ConfigError(f"seed must be >= 0, got {self.seed}")
        if self.train_eval_samples < 0:
            raise ConfigError(f"train_eval_samples must be >= 0 (0 = the whole training "
                              f"split), got {self.train_eval_samples}")
        # Python ints are unbounded, torch's are not: a value past its C type would surface
        # as "Overflow when unpacking long" deep inside torch (a traceback, not a message).
        for name, top in (("seed", _SEED_MAX), ("threads", _INT32_MAX), ("width", _INT64_MAX),
                          ("epochs", _INT64_MAX), ("batch_size", _INT64_MAX),
                          ("train_eval_samples", _INT64_MAX)):
            if getattr(self, name) > top:
                raise ConfigError(f"{name} must be <= {top}, got {getattr(self, name)}")
        from ..models import MODEL_NAMES, check_model_args

        if self.model not in MODEL_NAMES:
            raise ConfigError(f"unknown model '{self.model}'; valid: {', '.join(MODEL_NAMES)}"
                              + did_you_mean(self.model, MODEL_NAMES))
        # per model: cnn7 has no `tau`, and a bad value is named here, not deep in the build
        self.model_args = check_model_args(self.model, self.model_args)
        from ..explain import explainer_names

        if self.eval_saliency not in explainer_names():
            raise ConfigError(f"unknown eval_saliency '{self.eval_saliency}'; valid: "
                              f"{', '.join(explainer_names())}"
                              + did_you_mean(self.eval_saliency, explainer_names()))
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"device must be auto, cpu or cuda[:k], got '{self.device}'"
                              + mps_note(self.device))
        if self.augment not in ("none", "dihedral"):
            raise ConfigError(not_one_of("augment", self.augment, ("none", "dihedral")))
        if self.scheduler not in ("cosine", "none"):
            raise ConfigError(not_one_of("scheduler", self.scheduler, ("cosine", "none")))
        metrics = ("balanced_accuracy", "accuracy", "auc", "loss")
        if self.select_metric not in metrics:  # it named neither the value nor a close one
            raise ConfigError(not_one_of("select_metric", self.select_metric, metrics))
        if not math.isfinite(self.deletion_fill):  # refused here, not after training
            raise ConfigError(f"deletion_fill must be a finite number, got "
                              f"{self.deletion_fill!r}")
        self.class_weight = check_class_weight(self.class_weight)
        if self.sampler not in SAMPLERS:
            raise ConfigError(not_one_of("sampler", self.sampler, SAMPLERS))

    def _normalise_types(self) -> None:
        # A TrainConfig built in Python is not type-checked by the dataclass: a string
        # "false" would switch a flag on (truthy), "3" epochs failed as a TypeError deep in
        # the loop, and NumPy scalars or a pathlib.Path made config.yaml's writer raise a
        # RepresenterError after the data was loaded.
        for f in dataclasses.fields(self):
            if f.name in ("deletion_fractions", "method_args", "model_args", "class_weight"):
                continue  # checked on their own (class_weight: `check_class_weight`)
            default = f.default
            value = getattr(self, f.name)
            if isinstance(default, bool):
                if not isinstance(value, bool | np.bool_):
                    raise ConfigError(f"{f.name} must be true or false, got {value!r} "
                                      f"({type(value).__name__})")
                value = bool(value)
            elif isinstance(default, int):
                if isinstance(value, bool | np.bool_) or not isinstance(value, Integral):
                    raise ConfigError(f"{f.name} must be an integer, got {value!r} "
                                      f"({type(value).__name__})")
                value = int(value)
            elif isinstance(default, float):
                if isinstance(value, bool | np.bool_) or not isinstance(value, Real):
                    raise ConfigError(f"{f.name} must be a number, got {value!r} "
                                      f"({type(value).__name__})")
                value = float(value)
            elif isinstance(default, str):
                if f.name == "init" and isinstance(value, os.PathLike):
                    value = os.fspath(value)
                if f.name == "device" and not isinstance(value, str):
                    import torch

                    if isinstance(value, torch.device):  # torch.device("cuda", 1) -> "cuda:1"
                        value = str(value)
                if not isinstance(value, str):
                    raise ConfigError(f"{f.name} must be a string, got {value!r} "
                                      f"({type(value).__name__})")
            setattr(self, f.name, value)
        fractions = self.deletion_fractions
        if not isinstance(fractions, list | tuple) or any(
                isinstance(v, bool | np.bool_) or not isinstance(v, Real) or not 0 < v < 1
                for v in fractions):
            raise ConfigError(f"deletion_fractions must be a list of numbers in (0, 1), got "
                              f"{fractions!r}")
        self.deletion_fractions = [float(v) for v in fractions]
        if not isinstance(self.method_args, Mapping):
            raise ConfigError(f"method_args must be a mapping of method parameter names to "
                              f"values, got {self.method_args!r} "
                              f"({type(self.method_args).__name__})")
        self.method_args = {k: _plain(v) for k, v in self.method_args.items()}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


CLASS_WEIGHT_RULES = ("none", "balanced")
SAMPLERS = ("none", "balanced")


def check_class_weight(value: Any) -> str | list[float]:
    """`class_weight` normalised (a rule name, or a list of floats), or a ConfigError line
    naming what is wrong. The count of weights is checked against the data's classes in
    `resolve_class_weight`, where the classes are known."""
    if isinstance(value, str):
        if value not in CLASS_WEIGHT_RULES:
            raise ConfigError(f"class_weight must be none, balanced or a list of per-class "
                              f"weights (e.g. [1, 3]), got '{value}'"
                              + did_you_mean(value, CLASS_WEIGHT_RULES))
        return value
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, list | tuple) or not value:
        raise ConfigError(f"class_weight must be none, balanced or a list of per-class weights "
                          f"(e.g. [1, 3]), got {value!r}")
    out = []
    for v in value:
        if isinstance(v, str):  # YAML 1.1 reads `1e-3` (no dot) as a string
            try:
                v = float(v)
            except ValueError:
                pass
        # a weight of 0 drops a class from the loss, a negative one trains against it, and
        # NaN/inf makes every step's loss NaN: refused before training
        if isinstance(v, bool | np.bool_) or not isinstance(v, Real) \
                or not 0 < v <= MAX_SETTING:
            raise ConfigError(f"class_weight: every weight must be a finite number > 0 (and "
                              f"<= {MAX_SETTING:g}), got {v!r} in {list(value)!r}")
        out.append(float(v))
    return out


def resolve_class_weight(setting: str | list[float], labels: Any, num_classes: int,
                         class_names: list[str] | None = None) -> list[float] | None:
    """The per-class weights `setting` gives on a training split with these ``labels``: None
    for none (the unweighted loss, bit-identical to before the setting existed), sklearn's
    balanced rule n / (num_classes * count_c) with 0 for a class without a training sample
    (its missing-class warning is the trainer's), or the explicit list, which must hold one
    weight per class."""
    setting = check_class_weight(setting)
    if setting == "none":
        return None
    if setting == "balanced":
        counts = np.bincount(np.asarray(labels, dtype=np.int64).reshape(-1),
                             minlength=num_classes)[:num_classes]
        n = int(counts.sum())
        return [n / (num_classes * int(c)) if c > 0 else 0.0 for c in counts]
    if len(setting) != num_classes:
        named = f" ({', '.join(map(str, class_names))})" if class_names else ""
        raise ConfigError(f"class_weight lists {len(setting)} weight(s), but the dataset has "
                          f"{num_classes} classes{named}: give one weight per class, in "
                          f"dataset.yaml's order")
    return list(setting)


def _plain(value: Any) -> Any:
    """NumPy scalars (and those inside lists/dicts) as Python values, a path as str: what
    YAML's safe writer can store in config.yaml."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def valid_keys() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig) if f.name != "method_args"]


def _coerce(key: str, value: Any, current: Any) -> Any:
    """Coerce a parsed value to the type of the field's current value."""
    if current is None:
        return value
    if key == "class_weight":  # a rule name or a list: checked by `check_class_weight`
        if isinstance(value, bool) or not isinstance(value, str | list | tuple):
            raise ConfigError(f"class_weight must be none, balanced or a list of per-class "
                              f"weights (e.g. [1, 3]), got {value!r}")
        return value
    if value is None:
        raise ConfigError(f"{key}: expected {type(current).__name__}, got nothing (null)")
    try:
        if isinstance(current, bool):
            if isinstance(value, bool):
                return value
            raise ValueError
        if isinstance(current, int) and not isinstance(value, bool):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if isinstance(current, float) and not isinstance(value, bool):
            return float(value)
        if isinstance(current, str):
            # YAML 1.1 reads an unquoted no/off/yes/on as a boolean: `augment: no` was
            # refused as "got 'False'", `init: off` looked for a checkpoint named False
            if isinstance(value, bool):
                raise ConfigError(f"{key}: expected a string, got the boolean {value} (YAML "
                                  f"reads an unquoted yes/no/on/off/true/false as one; quote "
                                  f"it if a string is meant)")
            if isinstance(value, list | dict):  # `init: [a, b]` became the path "['a', 'b']"
                raise ValueError
            return str(value)
        if isinstance(current, list) and isinstance(value, list):
            return value
        if isinstance(current, dict) and isinstance(value, dict):
            return value
    except (TypeError, ValueError):
        pass
    raise ConfigError(f"{key}: expected {type(current).__name__}, got {value!r}")


_NESTED = ("method_args", "model_args")


def _same_setting(a: Any, b: Any) -> bool:
    """Two spellings of one setting value: equal, or the same number (PyYAML reads `1e-3` as
    a string and `0.001` as a float, so `--set lr=1e-3 --set lr=0.001` was a conflict)."""
    if isinstance(a, bool) or isinstance(b, bool):  # True == 1 in Python: not here
        return type(a) is type(b) and a == b
    if a == b:
        return True
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return False


def _fold(values: Mapping[Any, Any]) -> dict[Any, Any]:
    """``values`` with `method.<p>` / `model.<o>` keys folded into method_args / model_args.

    One parameter given both ways with different values is refused: which won depended on
    the order of the keys (`method_args: {lam: 2}` then `method.lam: 3` trained with 3,
    the other way round with 2)."""
    out: dict[Any, Any] = {}
    nested: dict[str, dict[Any, Any]] = {}
    how: dict[tuple[str, Any], str] = {}

    def put(field: str, name: Any, value: Any, given: str) -> None:
        args = nested.setdefault(field, {})
        if name in args and not _same_setting(args[name], value):
            prefix = field.removesuffix("_args")
            raise ConfigError(f"{prefix}.{name} given twice, {args[name]!r} ({how[field, name]})"
                              f" and {value!r} ({given}); give one")
        args[name] = value
        how[field, name] = given

    for key, value in values.items():
        prefix = key.split(".", 1)[0] if isinstance(key, str) else None
        if prefix in ("method", "model") and "." in key:  # method.<parameter>, model.<option>
            put(f"{prefix}_args", key.split(".", 1)[1], value, f"as {key}")
        elif key in _NESTED:
            if not isinstance(value, Mapping):
                raise ConfigError(f"{key} must be a mapping")
            nested.setdefault(key, {})
            for name, v in value.items():
                put(key, name, v, f"in {key}")
        else:
            out[key] = value
    out.update(nested)
    return out


def merge_settings(*layers: Mapping[Any, Any]) -> dict[Any, Any]:
    """Layers of settings (defaults, --config, flags, --set; a suite's defaults, setting,
    method `set:`, --set) as one mapping, later layers winning. method_args and model_args
    merge per parameter: a later layer's `method_args: {alpha: …}` replaced the whole
    mapping, and the method settings of the layers below were dropped silently."""
    out: dict[Any, Any] = {}
    for layer in layers:
        for key, value in _fold(layer).items():
            out[key] = {**out.get(key, {}), **value} if key in _NESTED else value
    return out


def apply_overrides(cfg: TrainConfig, values: Mapping[Any, Any]) -> TrainConfig:
    """Set fields from a mapping; `method.<p>` keys (or a `method_args` dict) go to the method,
    `model.<option>` keys (or a `model_args` dict) to the model's architecture, merged into
    ``cfg``'s. Combine several sources with `merge_settings` first.

    Unknown keys raise ConfigError listing the valid ones.
    """
    data = cfg.to_dict()
    for key, value in _fold(values).items():
        if key in _NESTED:
            data[key].update(value)
        elif key in data:
            data[key] = _coerce(key, value, data[key])
        else:
            raise ConfigError(f"unknown config key {key!r}; valid: {', '.join(valid_keys())}, "
                              f"method.<parameter>, model.<option>"
                              + _unknown_key_hint(key, values.get("method", data["method"]),
                                                  values.get("model", data["model"])))
    new = TrainConfig(**data)
    new.validate()
    return new


def _unknown_key_hint(key: str, method: Any, model: Any) -> str:
    """The hint after an unknown config key: an exact setting of a method or the model given
    without its prefix (`_prefix_hint`), else the closest of the training settings and the
    configured method's and model's (prefixed). Only training settings were compared:
    `--set Lam=1` for causal-align suggested 'amp', and `lamm`, `alpah`, `STEPS` nothing."""
    import dataclasses

    from ..methods.base import method_class, method_names
    from ..models import MODEL_OPTIONS

    hint = _prefix_hint(key, method, model)
    if hint:
        return hint
    names = {k: k for k in valid_keys()}  # a training setting wins a shared name
    if isinstance(method, str) and method in method_names():
        for f in dataclasses.fields(method_class(method).Params):
            names.setdefault(f.name, f"method.{f.name}")
    if isinstance(model, str):
        for option in MODEL_OPTIONS.get(model, {}):
            names.setdefault(option, f"model.{option}")
    return did_you_mean(key, names, shown=names)


def _prefix_hint(key: str, method: Any, model: Any) -> str:
    """"; did you mean 'method.lam'?" when an unknown key is a setting of the configured
    method (or an option of the model) given without its prefix (`--set lam=1`)."""
    import dataclasses

    from ..methods.base import method_class, method_names
    from ..models import MODEL_OPTIONS

    if isinstance(method, str) and method in method_names():
        if key in {f.name for f in dataclasses.fields(method_class(method).Params)}:
            return f"; did you mean 'method.{key}'?"
    if isinstance(model, str) and key in MODEL_OPTIONS.get(model, {}):
        return f"; did you mean 'model.{key}'?"
    owners = [m for m in method_names()  # another method's: --method was left out
              if key in {f.name for f in dataclasses.fields(method_class(m).Params)}]
    if owners:
        return f"; did you mean 'method.{key}' (a setting of {', '.join(owners)})?"
    return ""


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping: PyYAML keeps the
    last silently, so `epochs: 1` added at the end of a config.yaml that already says
    `epochs: 12` (or two `lam:` under method_args) trained with whichever came last."""

    def compose_mapping_node(self, anchor: Any) -> yaml.MappingNode:
        node = super().compose_mapping_node(anchor)
        # the keys as written: a merge (`<<`) that pulls this node in flattens it in place
        # (its merged keys and its own, one after the other) before an alias to it is
        # constructed, and the check then refused a key that was overridden, as meant
        node.written_keys = [k for k, _ in node.value]  # type: ignore[attr-defined]
        return node


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode,
                              deep: bool = False) -> dict:
    seen: dict[Any, int] = {}  # key -> line of its first occurrence
    for key_node in getattr(node, "written_keys", [k for k, _ in node.value]):
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` then overrides: meant
            continue
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        try:
            if key in seen:
                where = (f"line {line}" if seen[key] == line
                         else f"lines {seen[key]} and {line}")
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} given twice ({where}); keep one",
                    key_node.start_mark)
            seen[key] = line
        except TypeError:  # an unhashable key: the base constructor names it
            continue
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
                                 _construct_unique_mapping)


def load_yaml(text: str) -> Any:
    """yaml.safe_load, but a key given twice in one mapping is a yaml.YAMLError naming it."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)


def parse_set(items: list[str]) -> dict[str, Any]:
    """Parse ["key=value", ...]; values are YAML scalars/lists (1e-3, true, [0.1, 0.2]).

    A key given twice with different values is refused: the last one won silently
    (`--set epochs=2 ... --set epochs=5`), where `--epochs 2 --set epochs=5` is refused."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got '{item}'")
        key, raw = item.split("=", 1)
        key = key.strip()
        try:
            value = load_yaml(raw) if raw.strip() else ""
        except yaml.constructor.ConstructorError as exc:  # {lam: 1, lam: 2}
            raise ConfigError(f"--set {key}: {exc.problem}") from None
        except yaml.YAMLError:
            value = raw
        if key in out and not _same_setting(out[key], value):
            raise ConfigError(f"--set {key} given twice ({out[key]!r} and {value!r}); "
                              f"give one")
        out[key] = value
    return out


def load_config_file(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{p}: config file not found")
    try:
        data = load_yaml(p.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:  # a binary file passed by mistake
        raise ConfigError(f"{p}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of config keys")
    for key in ("method_args", "model_args"):  # named here: later it is one of many sources
        if key in data and data[key] is None:  # `method_args:` with nothing under it
            data[key] = {}
        if key in data and not isinstance(data[key], dict):
            raise ConfigError(f"{p}: {key} must be a mapping of names to values, got "
                              f"{data[key]!r}")
    try:  # a method setting given twice (method.lam and under method_args): name the file
        _fold(data)
    except ConfigError as exc:
        raise ConfigError(f"{p}: {exc}") from None
    return data
