"""Run configuration: a small dataclass per component, filled from a TOML recipe, then dotted overrides.

    cfg = load_config("configs/demo-cpu.toml", ["optim.lr=2e-4", "train.max_steps=50"])

Unknown sections or keys and values of the wrong type are errors that name the key. `to_toml(cfg)`
writes the resolved configuration (it goes into the run directory next to the DeepSpeed JSON).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from .model import ModelConfig


class ConfigError(ValueError):
    pass


@dataclass
class DataConfig:
    shards: list[str] = field(default_factory=list)  # folders made by `dupmae prepare`
    weights: list[float] | None = None  # mixing weights, one per folder (default: by size)
    seed: int = 1234  # data order and every mask are functions of (seed, position / epoch and sample id)
    micro_batch: int = 8  # per rank and micro step
    grad_accum: int = 1
    eval_samples: int = 0  # the LAST eval_samples sample ids are held out for evaluation
    num_workers: int = 1  # DataLoader worker processes per rank
    pad_to_multiple_of: int = 8
    encoder_mask_prob: float = 0.3


@dataclass
class TrainConfig:
    run_dir: str = "runs/dupmae"
    max_steps: int = 1000
    stop_at_step: int = 0  # stop early (after a checkpoint) at this step; the schedule still follows max_steps
    precision: str = "fp32"  # fp32 | bf16 | fp16
    seed: int = 1234  # model initialization and dropout
    eval_every: int = 0  # steps; 0: no periodic evaluation
    eval_batches: int = 4  # micro batches per rank per evaluation
    max_bad_steps: int = 10  # non-finite losses skipped before the run stops
    dist_timeout_s: int = 300  # a collective (DeepSpeed's too) waiting longer ends the job: dead or hung rank
    deepspeed_config: str | None = None  # a user's DeepSpeed JSON, merged under the generated one
    activation_checkpointing: bool = False  # recompute the encoder's layers in backward (less memory, ~1/3 more compute)
    grad_cache_chunk: int = 0  # fine-tuning: gradient caching, texts encoded with a graph this many at a time (0: off)


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.01  # not on biases and LayerNorm weights
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    warmup: float = 0.1  # share of max_steps (< 1) or a number of steps (>= 1)
    schedule: str = "linear"  # linear | cosine | constant, after the warmup
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0  # 0 disables


@dataclass
class ZeroConfig:
    stage: int = 2
    offload_optimizer: bool = False  # optimizer states and step on the CPU (DeepSpeedCPUAdam)
    reduce_bucket_size: int = 50_000_000
    overlap_comm: bool = False


@dataclass
class CheckpointConfig:
    every: int = 500  # steps; a final checkpoint is always written
    keep_last: int = 3
    keep_every: int = 0  # also keep every N-th step's checkpoint (0: none)
    resume: bool = True  # continue from the newest complete checkpoint in run_dir


@dataclass
class LoggingConfig:
    every: int = 10  # console progress line and TensorBoard scalars every N steps
    tensorboard: bool = True


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def validate(self) -> None:
        try:
            self.model.validate()
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if not self.data.shards:
            raise ConfigError("data.shards: give at least one folder made by `dupmae prepare`")
        if self.data.weights is not None and len(self.data.weights) != len(self.data.shards):
            raise ConfigError(f"data.weights: {len(self.data.weights)} weights for {len(self.data.shards)} shards")
        if self.train.grad_cache_chunk:
            raise ConfigError("train.grad_cache_chunk is a fine-tuning option (pre-training has no cross-text loss)")
        validate_common(self)

    def digest(self) -> str:
        """Hash of what must not change across a resume: the model and the data stream. The split of the
        global batch into ranks x micro batch x accumulation may change (the sampler checks the global
        batch itself), and so may the number of DataLoader workers."""
        keep = {"model": dataclasses.asdict(self.model), "data": dataclasses.asdict(self.data)}
        for key in ("num_workers", "micro_batch", "grad_accum"):
            keep["data"].pop(key)
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def validate_common(cfg) -> None:
    """The checks every recipe shares (the batch split, [train], [optim], [zero], [checkpoint])."""
    for key in ("micro_batch", "grad_accum"):
        if getattr(cfg.data, key) < 1:
            raise ConfigError(f"data.{key} must be >= 1")
    if cfg.train.precision not in ("fp32", "bf16", "fp16"):
        raise ConfigError(f"train.precision must be fp32, bf16 or fp16, got {cfg.train.precision!r}")
    if cfg.train.max_steps < 1:
        raise ConfigError("train.max_steps must be >= 1")
    if cfg.optim.schedule not in ("linear", "cosine", "constant"):
        raise ConfigError(f"optim.schedule must be linear, cosine or constant, got {cfg.optim.schedule!r}")
    if cfg.zero.stage not in (0, 1, 2, 3):
        raise ConfigError(f"zero.stage must be 0, 1, 2 or 3, got {cfg.zero.stage}")
    if cfg.zero.offload_optimizer and cfg.zero.stage == 0:
        raise ConfigError("zero.offload_optimizer needs zero.stage 1, 2 or 3")
    if cfg.checkpoint.keep_last < 1:
        raise ConfigError("checkpoint.keep_last must be >= 1")
    if cfg.train.grad_cache_chunk < 0:
        raise ConfigError("train.grad_cache_chunk must be >= 0")


def sections(cls=RunConfig) -> dict:
    return {f.name: f.type for f in dataclasses.fields(cls)}


SECTIONS = sections(RunConfig)


def _coerce(value, annotation, key: str):
    """Check (and lightly convert: int -> float) `value` against a field annotation."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)] if args else value
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table, got {type(value).__name__} {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
        return value
    return value


def _apply(section_obj, section: str, values: dict) -> None:
    hints = typing.get_type_hints(type(section_obj))
    for key, value in values.items():
        if key not in hints:
            known = ", ".join(hints)
            raise ConfigError(f"unknown key {section}.{key} (known keys of [{section}]: {known})")
        setattr(section_obj, key, _coerce(value, hints[key], f"{section}.{key}"))


def parse_override(text: str) -> tuple[str, str, object]:
    """'optim.lr=2e-4' -> ('optim', 'lr', 2e-4). Values are TOML; bare words are strings."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected section.key=value")
    dotted, raw = text.split("=", 1)
    parts = dotted.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"override {text!r}: the key must be section.key, e.g. optim.lr")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return parts[0], parts[1], value


def load_config(path: str | Path | None, overrides: list[str] = (), cls=RunConfig):
    """`cls` is the recipe type: RunConfig (pre-training) or the fine-tuning recipe (engine/finetune)."""
    cfg = cls()
    known = sections(cls)
    data: dict = {}
    if path is not None:
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: invalid TOML: {e}") from None
    for section, values in data.items():
        if section not in known:
            raise ConfigError(f"unknown section [{section}] (known: {', '.join(known)})")
        if not isinstance(values, dict):
            raise ConfigError(f"[{section}] must be a table")
        _apply(getattr(cfg, section), section, values)
    for text in overrides:
        section, key, value = parse_override(text)
        if section not in known:
            raise ConfigError(f"override {text!r}: unknown section {section!r} (known: {', '.join(known)})")
        _apply(getattr(cfg, section), section, {key: value})
    cfg.validate()
    return cfg


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (str, Path)):
        return json.dumps(str(v))
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def to_toml(cfg: RunConfig) -> str:
    """The resolved configuration as TOML (keys whose value is unset are written as comments)."""
    lines = []
    for section in sections(type(cfg)):
        lines.append(f"[{section}]")
        for key, value in dataclasses.asdict(getattr(cfg, section)).items():
            lines.append(f"# {key} = (unset)" if value is None else f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)
