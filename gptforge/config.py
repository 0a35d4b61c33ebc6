"""Typed configuration: the model's shape, named presets, and the generic TOML / `--set` machinery.

Configs are plain dataclasses so that a resolved config can be written to `config.json`, compared field by
field (to refuse resuming into a different shape), and overridden from the command line with types
checked. The run config's sections (ModelConfig, TrainConfig, DataConfig, RunConfig) are all here, so that
commands that only describe a run (`gptforge info`) read them without importing the trainer;
`gptforge.resolve` turns presets, TOML files and `--set` into a RunConfig for every command.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .errors import UserError
from .numeric import MAX_STEPS, NON_NEGATIVE, NON_NEGATIVE_INT, POSITIVE, POSITIVE_INT, SEED, Range

VOCAB_PAD_MULTIPLE = 64
GPT2_VOCAB_SIZE = 50257


@dataclass
class ModelConfig:
    """The shape of a GPT-2/GPT-3 model.

    `attention="alternating"` is GPT-3's pattern (Brown et al. 2020, §2.1): even layers (0, 2, ...) are
    dense causal, odd layers are locally banded — a query at position t sees keys t-window+1 .. t, i.e. at
    most `window` tokens including itself (the convention GPT-Neo's local attention uses, so exports match).
    """

    vocab_size: int = GPT2_VOCAB_SIZE
    block_size: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    d_ff: int | None = None  # None: 4 * n_embd
    dropout: float = 0.0
    bias: bool = True
    qkv_bias: bool = True  # with bias: GPT-Neo (the HF layout for banded models) has none, so turn off to export
    norm: Literal["pre", "post"] = "pre"
    attention: Literal["dense", "alternating"] = "dense"
    window: int = 256
    layer_norm_eps: float = 1e-5
    init_std: float = 0.02

    def __post_init__(self) -> None:
        self.validate()

    @property
    def ffn_dim(self) -> int:
        return self.d_ff if self.d_ff is not None else 4 * self.n_embd

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        """Embedding rows actually allocated: a multiple of 64 so the output matmul runs on fast shapes."""
        return math.ceil(self.vocab_size / VOCAB_PAD_MULTIPLE) * VOCAB_PAD_MULTIPLE

    def is_band_layer(self, layer: int) -> bool:
        return self.attention == "alternating" and layer % 2 == 1

    def validate(self) -> None:
        def bad(option: str, why: str) -> UserError:
            return UserError(f"model.{option}: {why}")

        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise UserError(f"model.{f.name}={value}: must be a finite number")

        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            POSITIVE_INT.check(getattr(self, name), f"model.{name}")
        if self.n_embd % self.n_head:
            raise bad("n_embd", f"{self.n_embd} is not divisible by n_head={self.n_head}; "
                                "choose n_embd as a multiple of n_head")
        if self.d_ff is not None:
            POSITIVE_INT.check(self.d_ff, "model.d_ff")
        Range(float, 0, 1, high_open=True).check(self.dropout, "model.dropout")
        POSITIVE.check(self.layer_norm_eps, "model.layer_norm_eps")  # <= 0: a division by ~0 in every norm
        POSITIVE.check(self.init_std, "model.init_std")
        if self.norm not in ("pre", "post"):
            raise bad("norm", f"must be 'pre' or 'post', got {self.norm!r}")
        if self.attention not in ("dense", "alternating"):
            raise bad("attention", f"must be 'dense' or 'alternating', got {self.attention!r}")
        POSITIVE_INT.check(self.window, "model.window")
        if self.attention == "alternating" and self.window >= self.block_size:
            raise bad("window", f"{self.window} must be smaller than block_size={self.block_size} "
                                "for banded attention to differ from dense")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        return from_dict(cls, data, section="model")


def _gpt2(n_layer: int, n_head: int, n_embd: int) -> ModelConfig:
    return ModelConfig(block_size=1024, n_layer=n_layer, n_head=n_head, n_embd=n_embd)


def _gpt3(n_layer: int, n_embd: int, n_head: int) -> ModelConfig:
    # GPT-3 Table 2.1: context 2048, d_ff = 4 * d_model, alternating dense / locally banded layers. No q/k/v
    # biases: the paper does not say, and GPT-Neo (the Hugging Face layout for banded models) has none, so a
    # model trained from these presets exports exactly to transformers and GGUF.
    return ModelConfig(block_size=2048, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                       attention="alternating", window=256, qkv_bias=False)


PRESETS: dict[str, ModelConfig] = {
    "gpt2": _gpt2(12, 12, 768),
    "gpt2-medium": _gpt2(24, 16, 1024),
    "gpt2-large": _gpt2(36, 20, 1280),
    "gpt2-xl": _gpt2(48, 25, 1600),
    "gpt3-small": _gpt3(12, 768, 12),
    "gpt3-medium": _gpt3(24, 1024, 16),
    "gpt3-large": _gpt3(24, 1536, 16),
    # Table 2.1 prints 24 heads x d_head 128 for XL, which is 3072, not d_model 2048; its 1.3B total only adds
    # up with attention width 2048, so we keep d_head 128 and the size: 16 heads.
    "gpt3-xl": _gpt3(24, 2048, 16),
    "gpt3-2.7b": _gpt3(32, 2560, 32),
    "gpt3-6.7b": _gpt3(32, 4096, 32),
    "gpt3-13b": _gpt3(40, 5120, 40),  # the paper prints 5140; 40 heads x 128 = 5120
    "gpt3-175b": _gpt3(96, 12288, 96),
    "dev-17m": ModelConfig(block_size=1024, n_layer=6, n_head=4, n_embd=256, d_ff=1024),
    # nanoGPT's Shakespeare-char CPU shape (its "baby GPT"); vocab_size follows the data's tokenizer
    "char-small": ModelConfig(block_size=64, n_layer=4, n_head=4, n_embd=128),
}

# GPT-3 Table 2.1 peak learning rates, for the trainer's defaults.
GPT3_PEAK_LR: dict[str, float] = {
    "gpt3-small": 6.0e-4, "gpt3-medium": 3.0e-4, "gpt3-large": 2.5e-4, "gpt3-xl": 2.0e-4,
    "gpt3-2.7b": 1.6e-4, "gpt3-6.7b": 1.2e-4, "gpt3-13b": 1.0e-4, "gpt3-175b": 0.6e-4,
}


# Training settings a preset brings with it (over the TrainConfig defaults; TOML and --set still win).
# char-small: the recipe benchmarks/time_to_loss.py measures. On tinyshakespeare AdamW at 5x nanoGPT's LR reached
# the final held-out loss of nanoGPT's 2,000-iteration CPU recipe (LR 1e-3, batch 12) after ~1,100 of 1,400 steps
# (final 1.818); Muon for the blocks' matrices (train.optimizer=muon) reaches it after ~510 of 800 steps at batch
# 12 (final 1.758) and after ~390 of 600 at batch 16 (final 1.775), which is faster in wall time: a Muon step's
# Newton-Schulz iterations cost the same whatever the batch (~19 ms of a ~64 ms step at batch 12 on one core), so
# fewer, larger steps pay them less often. Sweep: benchmarks/time_to_loss.py's docstring.
PRESET_TRAIN: dict[str, dict[str, Any]] = {
    "char-small": dict(micro_batch_size=16, max_steps=600, lr=5e-3, warmup_steps=40, beta2=0.99,
                       min_lr_ratio=0.1, weight_decay=0.1, optimizer="muon", muon_lr=0.02, muon_momentum=0.9),
}


def get_preset(name: str) -> ModelConfig:
    """A fresh copy of a named preset, or a UserError listing the close names."""
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UserError(f"unknown preset {name!r}{hint}; known presets: {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name])


# ---------------------------------------------------------------------------------------------------
# Generic dataclass <-> dict / TOML / --set, with type checking and close-match suggestions.


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert `value` (from TOML, JSON or a `--set` string) to the field type `tp`, or raise UserError."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and (value is None or (isinstance(value, str) and value.lower() in ("none", "null"))):
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, where)
            except UserError:
                pass
        raise UserError(f"{where}: {value!r} is not a valid {' or '.join(_type_name(a) for a in args)}")
    if origin is Literal:
        for allowed in args:
            if value == allowed or (isinstance(value, str) and str(allowed) == value):
                return allowed
        raise UserError(f"{where}: {value!r} is not one of {', '.join(repr(a) for a in args)}")
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v for v in (p.strip() for p in value.split(",")) if v]
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else str
        items = [coerce(v, inner, where) for v in value]
        return tuple(items) if origin is tuple else items
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise UserError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise UserError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
            try:  # "1e6" and "2.0" are fine as long as they are whole numbers
                as_float = float(value)
                if as_float.is_integer():
                    return int(as_float)
            except ValueError:
                pass
        raise UserError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise UserError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(number):  # TOML and --set both spell nan and inf; no setting means either
            raise UserError(f"{where}={number}: must be a finite number")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise UserError(f"{where}: expected a string, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a table of settings, got {value!r}")
        return from_dict(tp, value, section=where)
    return value


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def unknown_key_error(key: str, known: typing.Iterable[str], section: str) -> UserError:
    known = sorted(known)
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.5)  # closest first
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return UserError(f"unknown setting {key!r} in {section}{hint} (valid: {', '.join(known)})")


def from_dict(cls: type, data: dict[str, Any], section: str = "") -> Any:
    """Build dataclass `cls` from a dict, rejecting unknown keys and wrong types with a clear message.

    `section` is the dotted prefix of these keys in the whole config ("" at the top), used in messages.
    """
    types_ = _field_types(cls)
    prefix = f"{section}." if section else ""
    kwargs = {}
    for key, value in data.items():
        if key not in types_:
            raise unknown_key_error(prefix + key, (prefix + k for k in types_), section or "the config")
        kwargs[key] = coerce(value, types_[key], prefix + key)
    return cls(**kwargs)


def flatten_keys(cls: type, prefix: str = "") -> list[str]:
    """Every settable dotted key of a (nested) dataclass, for `--set` help and error messages."""
    keys = []
    for name, tp in _field_types(cls).items():
        if dataclasses.is_dataclass(tp):
            keys.extend(flatten_keys(tp, f"{prefix}{name}."))
        else:
            keys.append(f"{prefix}{name}")
    return keys


def apply_overrides(config: Any, overrides: list[str] | dict[str, Any]) -> Any:
    """Return a copy of `config` with `key=value` overrides (dotted keys into nested dataclasses) applied.

    Values are strings from the command line or already-typed values from TOML; each is checked against
    the field's type. The result is re-validated by each dataclass's __post_init__.
    """
    if isinstance(overrides, list):
        pairs: dict[str, Any] = {}
        for item in overrides:
            if "=" not in item:
                raise UserError(f"--set {item!r}: expected key=value, e.g. --set model.n_layer=4")
            key, value = item.split("=", 1)
            pairs[key.strip()] = value.strip()
        overrides = pairs
    as_dict = _to_nested_dict(config)
    all_keys = flatten_keys(type(config))
    for key, value in overrides.items():
        if key not in all_keys:
            raise unknown_key_error(key, all_keys, "the config")
        node = as_dict
        parts = key.split(".")
        for part in parts[:-1]:
            node = node[part]
        node[parts[-1]] = value
    return from_dict(type(config), as_dict)


def _to_nested_dict(config: Any) -> dict[str, Any]:
    return {f.name: (_to_nested_dict(getattr(config, f.name)) if dataclasses.is_dataclass(getattr(config, f.name))
                     else getattr(config, f.name)) for f in dataclasses.fields(config)}


def load_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist; pass an existing .toml file to --config")
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"config file {path}: invalid TOML ({e}); fix the syntax at that line") from None


# ---------------------------------------------------------------------------------------------------
# Training runs: what `gptforge train` reads from TOML / --set and writes to a run's config.json.


@dataclass
class DataConfig:
    """Where the prepared token shards are (a `gptforge prepare` output directory).

    No default directory: a relative default would make a preset's shape (its vocabulary follows the data's
    tokenizer) depend on whatever the working directory holds. "" means none named; training asks for one."""

    path: str = ""
    seed: int = 0  # order of sequences within each epoch (the loader's seed)


STEPS = Range(int, 0, MAX_STEPS, note="0 = no limit")


@dataclass
class TrainConfig:
    """The training loop. Defaults follow GPT-3 Appendix B (AdamW 0.9/0.95, eps 1e-8, weight decay 0.1,
    clip 1.0, warmup then cosine to 10% of peak); sizes default to something a laptop can run."""

    out_dir: str = "runs/default"
    init_from: str | None = None  # start a new run from these weights (anything --model accepts); None: random
    seed: int = 1337
    device: str = "auto"  # auto: cuda when available, else cpu
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast where the hardware has it
    compile: bool = False
    deterministic: bool = False
    # several processes (torchrun): "auto" = ddp when WORLD_SIZE > 1; "fsdp" shards weights, grads and AdamW
    # state over the ranks (FSDP2). See gptforge/training/distributed.py.
    parallel: Literal["auto", "none", "ddp", "fsdp"] = "auto"
    activation_checkpointing: bool = False  # recompute each block in backward: less memory, ~1/3 more compute
    # batch: tokens_per_step 0 means one micro-batch per step; otherwise gradient accumulation reaches it
    micro_batch_size: int = 8
    seq_len: int | None = None  # None: the model's block_size
    tokens_per_step: int = 0
    batch_ramp_tokens: int = 0  # GPT-3's batch-size ramp: grow linearly over this many tokens (0: off)
    batch_ramp_start: int = 32768  # tokens per step at the start of the ramp
    # when to stop (0 = no limit; at least one must be set)
    max_steps: int = 1000
    max_tokens: int = 0
    max_time: float = 0.0  # seconds
    # optimizer and schedule; "muon": torch's Muon for the blocks' matrices, AdamW (lr, betas...) for the rest
    optimizer: Literal["adamw", "muon"] = "adamw"
    lr: float = 6e-4
    min_lr_ratio: float = 0.1
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = 100
    decay_fraction: float = 0.2  # wsd: the last fraction of steps decays to the floor
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # 0: off
    muon_lr: float = 0.02  # Muon's peak (the schedule scales it as it scales lr)
    muon_momentum: float = 0.9  # beat 0.95 on char-small at 600 and 800 steps (time_to_loss.py)
    muon_weight_decay: float = 0.0
    muon_nesterov: bool = True
    muon_ns_steps: int = 5  # Newton-Schulz iterations
    # evaluation, samples, logging, checkpoints
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 20
    eval_tasks: list[str] = field(default_factory=list)  # benchmarks scored at each eval: val, hellaswag, ...
    eval_data: list[str] = field(default_factory=list)  # TASK=PATH (or hf:NAME) for eval_tasks
    eval_limit: int | None = None  # items per benchmark at each eval (None: all)
    sample_every: int = 500
    sample_prompts: list[str] = field(default_factory=lambda: ["\n"])
    sample_tokens: int = 128
    sample_temperature: float = 0.8
    sample_top_k: int = 40
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    max_bad_steps: int = 5  # stop after this many consecutive non-finite losses/gradients
    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str = "gptforge"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def bad(option: str, why: str) -> UserError:
            return UserError(f"train.{option}: {why}")

        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise UserError(f"train.{f.name}={value}: must be a finite number")

        for name in ("micro_batch_size", "log_every", "eval_every", "sample_every", "checkpoint_every",
                     "keep_checkpoints", "max_bad_steps", "eval_batches", "batch_ramp_start"):
            POSITIVE_INT.check(getattr(self, name), f"train.{name}")
        for name in ("max_tokens", "tokens_per_step", "warmup_steps", "batch_ramp_tokens", "sample_tokens",
                     "sample_top_k"):
            NON_NEGATIVE_INT.check(getattr(self, name), f"train.{name}")
        STEPS.check(self.max_steps, "train.max_steps")
        SEED.check(self.seed, "train.seed")
        if self.seq_len is not None:
            POSITIVE_INT.check(self.seq_len, "train.seq_len")
        if self.eval_limit is not None:
            POSITIVE_INT.check(self.eval_limit, "train.eval_limit")
        Range(float, 0, note="0 = no limit").check(self.max_time, "train.max_time")
        Range(float, 0, note="0 = greedy").check(self.sample_temperature, "train.sample_temperature")
        if self.max_steps == 0 and self.max_tokens == 0 and self.max_time <= 0:
            raise bad("max_steps", "no stopping rule: set train.max_steps, train.max_tokens or train.max_time")
        POSITIVE.check(self.lr, "train.lr")
        Range(float, 0, 1).check(self.min_lr_ratio, "train.min_lr_ratio")
        Range(float, 0, 1, low_open=True).check(self.decay_fraction, "train.decay_fraction")
        for name in ("beta1", "beta2"):
            Range(float, 0, 1, high_open=True).check(getattr(self, name), f"train.{name}")
        POSITIVE.check(self.eps, "train.eps")
        NON_NEGATIVE.check(self.weight_decay, "train.weight_decay")
        Range(float, 0, note="0 = off").check(self.grad_clip, "train.grad_clip")
        POSITIVE.check(self.muon_lr, "train.muon_lr")
        Range(float, 0, 1, high_open=True).check(self.muon_momentum, "train.muon_momentum")
        NON_NEGATIVE.check(self.muon_weight_decay, "train.muon_weight_decay")
        Range(int, 1, 99).check(self.muon_ns_steps, "train.muon_ns_steps")


@dataclass
class RunConfig:
    """Everything that defines a training run; written resolved to the run directory's config.json."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def __post_init__(self) -> None:
        SEED.check(self.data.seed, "data.seed")  # the loaders seed NumPy with it: a negative one fails mid-run

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunConfig":
        return from_dict(cls, data)

    @property
    def seq_len(self) -> int:
        return self.train.seq_len or self.model.block_size
