"""Supervised fine-tuning: a base run plus chat data in, a chat model out, through the ordinary trainer.

SFT is not a second training loop. `sft()` checks its inputs, builds a `RunConfig` (the base model's shape
with the chat markers' rows, fine-tuning defaults, the user's `--set` on top) and runs `Trainer` with:
  - the chat data's batch source (`gptforge.data.chat_loader.ChatLoader`, chosen by the manifest's kind):
    packed conversations whose targets are -100 except on the assistant's tokens, so the model's usual loss
    is the masked loss, in training and in validation alike;
  - initial weights from the base model (`init_model`, used only by a fresh start: a resumed SFT run
    continues from its own checkpoints, never from the base again), the new marker rows set as
    `gptforge.chat.vocab` explains;
  - samples that are the model's replies to held-out questions (`chat_sampler`).
Everything else (checkpoints, exact resume, metrics.jsonl, loss.png, torchrun DDP/FSDP2) is the trainer's.

Fine-tuning defaults, all overridable with `--set train.KEY=VALUE`: a fifth of the base run's peak LR (a
full pretraining LR would wash out what the base model knows within a few hundred steps), warmup over 3% of
the steps, cosine decay, no weight decay (it pulls every weight towards zero, i.e. away from the base
model, which is the opposite of what a short fine-tune wants), and a length counted in epochs over the
conversations rather than in tokens.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterable

from ..config import RunConfig, TrainConfig, apply_overrides
from ..errors import UserError
from ..layout import (CHAT_DATA_KIND, RUN_CONFIG_FILE, TOKENIZER_DIR, is_data_dir, latest_valid_checkpoint,
                      list_checkpoints)
from ..numeric import MAX_STEPS, POSITIVE
from ..outputs import CHAT_RUN, check_output
from ..resolve import parse_set

DEFAULT_EPOCHS = 3
LR_FRACTION = 0.2  # of the base run's peak LR
FALLBACK_LR = 6e-5  # a base without a run config (an HF import): a common GPT-2 fine-tuning LR
WARMUP_FRACTION = 0.03
SAMPLE_TOKENS = 64


# ---- inputs ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Base:
    """The model SFT starts from: weights, tokenizer, and the run config it was trained with (if a run)."""

    spec: str
    model: Any  # GPT
    tokenizer: Any  # Tokenizer
    run_config: RunConfig | None


def load_base(spec: str) -> Base:
    """Load `--model` (a run directory, checkpoint or HF directory) with its tokenizer, or a UserError saying
    why it cannot be fine-tuned into a chat model."""
    from ..loading import load_model
    from ..resolve import read_run_config

    path = Path(spec)
    if not path.exists():
        raise UserError(f"--model {spec}: no such run; train a base model first (gptforge train --out {spec}) or "
                        "pass an existing run, checkpoint or Hugging Face directory")
    model, tokenizer = load_model(spec)
    if tokenizer is None:
        raise UserError(f"--model {spec} has no {TOKENIZER_DIR}/ beside its weights, so the chat markers have no "
                        "vocabulary to join; fine-tune a run trained on prepared data (it keeps its tokenizer)")
    if tokenizer.vocab_size > model.config.vocab_size:
        raise UserError(f"--model {spec}: its tokenizer has {tokenizer.vocab_size} ids but the model only "
                        f"{model.config.vocab_size} rows; the tokenizer is not the model's own")
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else path
    run_config = read_run_config(run_dir / RUN_CONFIG_FILE) if (run_dir / RUN_CONFIG_FILE).is_file() else None
    return Base(spec, model, tokenizer, run_config)


def check_chat_data(data: str, base: Base, option: str = "--data ") -> dict[str, Any]:
    """The chat data's manifest, after checking it was prepared with --chat and with the base's tokenizer
    (`option`: how the user named it, "--data " or "--set data.path=")."""
    import copy

    from ..chat.tokens import add_chat_tokens
    from ..data.chat_prepare import tokenizer_fingerprint
    from ..data.prepare import read_manifest
    from ..tokenizer import load_tokenizer

    if not is_data_dir(data):
        raise UserError(f"{option}{data}: not prepared data (no manifest.json); prepare conversations with "
                        f"`gptforge prepare FILE.jsonl --chat --tokenizer {base.spec} --out {data}`")
    manifest = read_manifest(data)
    if manifest.get("kind") != CHAT_DATA_KIND:
        raise UserError(f"{option}{data} was prepared without --chat (plain text, no loss mask); prepare the "
                        f"conversations with `gptforge prepare SOURCE --chat --tokenizer {base.spec} --out DIR`")
    expected = add_chat_tokens(copy.deepcopy(base.tokenizer))
    prepared = load_tokenizer(Path(data) / TOKENIZER_DIR)
    if tokenizer_fingerprint(prepared) != tokenizer_fingerprint(expected):
        raise UserError(f"{option}{data} was prepared with another tokenizer ({prepared.kind}, {prepared.vocab_size} "
                        f"ids) than --model {base.spec}'s ({expected.kind}, {expected.vocab_size} ids with the chat "
                        f"markers); prepare it again with --tokenizer {base.spec}")
    return manifest


# ---- the run config -------------------------------------------------------------------------------------


def steps_per_epoch(data: str, seq_len: int, train: TrainConfig, world_size: int) -> int:
    """Optimizer steps in one epoch of packed rows with these batch settings."""
    from ..data.chat_loader import ChatLoader
    from .schedule import accumulation_steps

    loader = ChatLoader(data, "train", seq_len, train.micro_batch_size, world_size=world_size)
    micro = train.micro_batch_size * world_size
    accumulation = accumulation_steps(train.tokens_per_step, micro, seq_len)
    return max(1, loader.sequences_per_epoch // (micro * accumulation))


def sft_config(base: Base, data: str, out: str, epochs: float | None = None, overrides: Iterable[str] = (),
               world_size: int = 1) -> RunConfig:
    """The resolved run config of a new SFT run (see the module docstring for the defaults)."""
    pairs = parse_set(list(overrides))
    shape = [k for k in pairs if k.startswith("model.") and k != "model.dropout"]
    if shape:
        raise UserError(f"--set {shape[0]}: fine-tuning keeps the base model's shape; only model.dropout may change")
    from ..tokenizer import load_tokenizer
    vocab = load_tokenizer(Path(data) / TOKENIZER_DIR).vocab_size
    model = dataclasses.replace(base.model.config, vocab_size=max(vocab, base.model.config.vocab_size))
    base_train = base.run_config.train if base.run_config else TrainConfig()
    seq_len = base.run_config.seq_len if base.run_config else model.block_size
    lr = base_train.lr * LR_FRACTION if base.run_config else FALLBACK_LR
    train = dataclasses.replace(
        TrainConfig(), out_dir=out, seed=base_train.seed, micro_batch_size=base_train.micro_batch_size,
        seq_len=min(seq_len, model.block_size), lr=lr, weight_decay=0.0, schedule="cosine", min_lr_ratio=0.1,
        sample_prompts=[], sample_tokens=SAMPLE_TOKENS, sample_temperature=0.0, keep_checkpoints=2, max_time=0.0)
    config = RunConfig(model=model, train=train, data=dataclasses.replace(RunConfig().data, path=str(data)))
    config = apply_overrides(config, pairs)  # batch settings first: the epoch length depends on them
    if config.data.path != str(data):  # the run trains on the resolved path: check it, before any directory
        check_chat_data(config.data.path, base, option="--set data.path=")
        data = config.data.path
    per_epoch = steps_per_epoch(data, config.seq_len, config.train, world_size)
    if "train.max_steps" in pairs and epochs is not None:
        raise UserError("--epochs and --set train.max_steps both set the run's length; pass one of them")
    steps = config.train.max_steps if "train.max_steps" in pairs else planned_steps(per_epoch, epochs)
    every = max(1, min(per_epoch, steps) // 2)
    defaults = {"train.max_steps": steps, "train.warmup_steps": max(1, math.ceil(steps * WARMUP_FRACTION)),
                "train.eval_every": every, "train.checkpoint_every": max(1, min(per_epoch, steps)),
                "train.sample_every": max(1, min(per_epoch, steps)), "train.log_every": max(1, steps // 30),
                "train.eval_batches": _val_batches(data, config, world_size)}
    defaults = {k: v for k, v in defaults.items() if k not in pairs}
    return apply_overrides(config, defaults)


def planned_steps(per_epoch: int, epochs: float | None) -> int:
    """The steps `epochs` passes take (None: the default), or a UserError where the plan is not a run: an
    epoch count that is not a positive finite number, or more steps than any run plans (numeric.MAX_STEPS:
    refused rather than capped, so the length a user asked for is never silently another)."""
    epochs = DEFAULT_EPOCHS if epochs is None else POSITIVE.check(epochs, "--epochs")
    steps = max(1, round(per_epoch * epochs))
    if steps > MAX_STEPS:
        raise UserError(f"--epochs {epochs:g}: that is {steps:,} steps ({per_epoch:,} per epoch), more than the "
                        f"{MAX_STEPS:,} a run may plan; pass fewer epochs")
    return steps


def _val_batches(data: str, config: RunConfig, world_size: int) -> int:
    """Enough eval batches to cover the whole held-out split (at most 50)."""
    from ..data.chat_loader import ChatLoader

    try:
        val = ChatLoader(data, "val", config.seq_len, config.train.micro_batch_size, world_size=world_size)
    except UserError:
        return config.train.eval_batches
    return max(1, min(50, math.ceil(val.sequences_per_epoch / config.train.micro_batch_size)))


# ---- the trainer's SFT parts ----------------------------------------------------------------------------


def base_initializer(base: Base, data_dir: str) -> Callable[[Any], None]:
    """`init_model` for the trainer: the base weights, the chat markers' new rows initialised."""
    from ..chat.tokens import CHAT_TOKENS
    from ..chat.vocab import added_tokens, copy_base_weights, init_added_rows
    from ..tokenizer import load_tokenizer

    chat_specials = load_tokenizer(Path(data_dir) / TOKENIZER_DIR).special_tokens
    added = added_tokens(base.tokenizer.special_tokens, chat_specials, CHAT_TOKENS)

    def init(model: Any) -> None:
        copy_base_weights(base.model, model)
        init_added_rows(model, base.tokenizer.vocab_size, added, base.tokenizer.eot_id)
    return init


def chat_sampler(prompts: list[dict[str, Any]]) -> Callable[..., list[str]]:
    """Samples for samples.txt: the model's reply to each held-out prompt (`{"messages": [...]}`; the last
    message is the user's), with the reference reply the data holds."""

    from ..chat.replies import chat_replies, format_exchange

    def sample(model: Any, tokenizer: Any, max_new_tokens: int, temperature: float, top_k: int,
               seed: int) -> list[str]:
        return [format_exchange(p["messages"], reply, p.get("reference"))
                for p, reply in zip(prompts, chat_replies(model, tokenizer, [p["messages"] for p in prompts],
                                                          max_new_tokens, temperature, top_k, seed))]
    return sample


# ---- the API --------------------------------------------------------------------------------------------


def sft(model: str | None = None, data: str | None = None, out: str | None = None, *, epochs: float | None = None,
        overrides: Iterable[str] = (), resume: str | None = None, fresh: bool = False,
        log: Callable[[str], None] | None = None):
    """Fine-tune `model` (a base run) on the chat data `data` into the run directory `out`; a TrainResult.

    `resume="auto"` continues `out` from its newest checkpoint with the config it was started with (the base
    model is not read again). See the module docstring for what SFT adds to `gptforge train`.
    """
    from .trainer import Trainer

    log = log or (lambda msg: print(msg, flush=True))
    if not out:
        raise UserError("--out RUN: where the fine-tuned model goes (e.g. runs/chat)")
    if resume and fresh:
        raise UserError("--resume and --fresh contradict each other; pass one of them")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    run_dir = Path(out)
    check_output(run_dir, CHAT_RUN, inputs={"--model": model, "--data": data})  # before the base is read
    continuing = resume is not None and latest_valid_checkpoint(run_dir) is not None
    if continuing:
        from ..resolve import read_run_config
        config = read_run_config(run_dir / RUN_CONFIG_FILE)
        # the run is the directory the user named: its config's out_dir is where it was, not where it goes
        pairs = {"train.out_dir": str(run_dir), **parse_set(list(overrides))}
        config = apply_overrides(config, pairs)
        base = None
    else:
        if not model or not data:
            raise missing_inputs(out, resume)
        base = load_base(model)
        check_chat_data(data, base)
        config = sft_config(base, data, out, epochs, overrides, world_size)
        if list_checkpoints(run_dir) and not fresh and resume is None:
            raise UserError(f"{run_dir} already has checkpoints; pass --resume to continue that run, --fresh to "
                            "start over, or another --out")
    init = base_initializer(base, config.data.path) if base is not None else None
    prompts = _sample_prompts(config)
    trainer = Trainer(config, resume=resume if continuing else None, fresh=fresh, log=log, init_model=init,
                      sampler=chat_sampler(prompts) if prompts else None, run_kind=CHAT_RUN,
                      inputs={"--model": model})
    if base is not None:
        log(f"fine-tuning {model} on {data}: {trainer.batches.describe()}")
    try:
        result = trainer.fit()
    finally:
        if trainer._owns_group:
            from . import distributed as D
            D.teardown()
    result.last_samples = trainer.samples.last  # type: ignore[attr-defined]
    return result


def missing_inputs(out: str, resume: str | None) -> UserError:
    """Why a run without --model or --data cannot start: with --resume, `out` holds nothing to continue."""
    if resume is not None:
        return UserError(f"--resume: {out} has no fine-tuning run to resume (no valid checkpoint there); start one "
                         f"with --model BASE_RUN --data CHAT_DATA --out {out}")
    return UserError("--model BASE_RUN and --data CHAT_DATA are needed to start a fine-tuning run "
                     "(or --resume to continue one in --out)")


def _sample_prompts(config: RunConfig) -> list[dict[str, Any]]:
    """Questions for samples.txt: `train.sample_prompts` as user messages, else the data's held-out ones."""
    if config.train.sample_prompts:
        return [{"messages": [{"role": "user", "content": p}]} for p in config.train.sample_prompts]
    from ..data.prepare import read_manifest
    return list(read_manifest(config.data.path).get("chat", {}).get("sample_prompts", []))
