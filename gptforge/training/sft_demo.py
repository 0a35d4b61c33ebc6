"""The offline chat demo behind a bare `gptforge sft`: the demo base model, fine-tuned on question/answer
pairs cut from Python's own standard library, answering questions it has not seen.

Steps, each skipped when its result is already there: train the demo base model (`runs/demo`, as a bare
`gptforge train` does); prepare `builtin:pystdlib-qa` with its tokenizer (`data/pystdlib-qa`); fine-tune
into `runs/demo-chat` (an unfinished run is resumed, a finished one replaced) at the base run's peak LR for
`DEMO_EPOCHS` epochs on every machine: unlike the base demo's, this recipe is not cut to fit a time budget,
because with fewer steps the replies were often empty (the model had not yet learned to say more than its
end-of-turn token). A few timed steps pick the thread count and give the estimate the log prints; the plan is
fixed in config.json, so the run resumes bit for bit. Then print the validation loss before and after, the
model's answers to three held-out questions, where the chat model is and how to talk to it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from ..errors import UserError
from ..layout import MANIFEST_FILE, METRICS_FILE, RUN_CONFIG_FILE, latest_valid_checkpoint, list_checkpoints
from .demo import DEMO_RUN

DEMO_CHAT_DATA = "data/pystdlib-qa"
DEMO_CHAT_RUN = "runs/demo-chat"
DEMO_QA_SOURCE = "builtin:pystdlib-qa"
DEMO_EPOCHS = 4
SFT_TIME_CAP = 3.0  # max_time = this x the estimate: a runaway cap only (4 epochs: ~1.5 min on an idle 2-core CPU)
# The demo fine-tunes at the base run's full peak LR, not sft's general default of a fifth of it: a ~2.6M
# model trained for minutes has little to wash out. Measured on one 600-step demo base, 4 epochs: masked val
# loss 5.75 -> 4.29 after 175 steps at a fifth, -> 3.90 at the full LR (3.74 after all 284 steps, every reply
# non-empty); twice the peak (4e-3) was behind the full LR at every evaluation up to step 105.
DEMO_LR_FRACTION = 1.0
DEMO_QUESTIONS = 3


def ensure_chat_data(base, data_dir: str, log: Callable[[str], None]) -> None:
    """Prepare the question/answer set with the base model's tokenizer unless it is already there."""
    from ..data.chat_prepare import chat_summary, prepare_chat
    from .sft import check_chat_data

    path = Path(data_dir)
    replace = False
    if (path / MANIFEST_FILE).is_file():
        try:
            check_chat_data(data_dir, base)
            log(f"using the prepared questions in {data_dir}")
            return
        except UserError:
            try:
                sources = json.loads((path / MANIFEST_FILE).read_text()).get("sources")
            except (OSError, ValueError):
                sources = None
            if sources != [DEMO_QA_SOURCE]:
                raise UserError(f"{data_dir} holds other prepared data; move it away so the demo can prepare "
                                f"{DEMO_QA_SOURCE} there") from None
            replace = True  # the demo's own questions, for an earlier base model's tokenizer
    elif path.exists() and any(path.iterdir()):
        raise UserError(f"{data_dir} exists and is not prepared data; move it away so the demo can use it")
    log(f"preparing {DEMO_QA_SOURCE} (question/answer pairs from Python's standard library) -> {data_dir}")
    manifest = prepare_chat([DEMO_QA_SOURCE], base.spec, data_dir, force=replace)
    log(chat_summary(manifest, data_dir))


def _finished(run_dir: Path) -> bool:
    """Whether `run_dir` holds an SFT run that reached its last step or its time cap (a partial one is resumed
    instead; one the cap stopped would stop again at once)."""
    from . import checkpoint as ckpt

    latest = latest_valid_checkpoint(run_dir)
    if latest is None:
        return False
    try:
        train = json.loads((run_dir / RUN_CONFIG_FILE).read_text())["train"]
        state = ckpt.read_state(latest)
    except (OSError, ValueError, KeyError, TypeError, UserError):
        return True
    out_of_time = bool(train.get("max_time")) and state.get("elapsed", 0.0) >= train["max_time"]
    return out_of_time or state["step"] >= train["max_steps"]


def config_steps(run_dir: Path) -> int | None:
    """The run's planned train.max_steps (config.json), or None."""
    try:
        return int(json.loads((run_dir / RUN_CONFIG_FILE).read_text())["train"]["max_steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _val_losses(run_dir: Path) -> tuple[float | None, float | None]:
    """(first, last) validation loss logged in metrics.jsonl."""
    losses = []
    path = run_dir / METRICS_FILE
    if path.is_file():
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if "val_loss" in row:
                losses.append(row["val_loss"])
    return (losses[0], losses[-1]) if losses else (None, None)


def run_sft_demo(base_dir: str = DEMO_RUN, data_dir: str = DEMO_CHAT_DATA, out_dir: str = DEMO_CHAT_RUN,
                 log: Callable[[str], None] | None = None, epochs: float = DEMO_EPOCHS, overrides: tuple = ()):
    """Train the base demo if missing, prepare the questions, fine-tune, show answers; returns a TrainResult."""
    from ..loading import load_model
    from ..tokenizer import load_tokenizer
    from .demo import calibrate_steps
    from ..chat.replies import chat_replies, format_exchange
    from .sft import load_base, sft, sft_config

    log = log or (lambda msg: print(msg, flush=True))
    if latest_valid_checkpoint(base_dir) is None:
        from .demo import run_demo
        log(f"no demo base model in {base_dir}: training it first (as `gptforge train` does, a few minutes)")
        run_demo(out_dir=base_dir, log=log)
    base = load_base(base_dir)
    ensure_chat_data(base, data_dir, log)
    run = Path(out_dir)
    resume = "auto" if list_checkpoints(run) and not _finished(run) else None
    fresh = bool(list_checkpoints(run)) and resume is None
    if resume:
        log(f"{out_dir} holds an unfinished fine-tuning run: resuming it (delete {out_dir} to start over)")
    elif fresh:
        log(f"{out_dir} holds a finished demo chat model: fine-tuning a fresh one in its place")
    if resume is None:
        overrides = (f"train.lr={base.run_config.train.lr * DEMO_LR_FRACTION:g}" if base.run_config else "",
                     *overrides)
        overrides = tuple(o for o in overrides if o)
        if not any(o.startswith("train.max_steps=") for o in overrides):
            config = sft_config(base, data_dir, out_dir, epochs, overrides)
            plan = calibrate_steps(config, float("inf"), target=config.train.max_steps)  # every step, any machine
            log(plan.describe(config.train.max_steps) + f" ({epochs:g} epochs)")
            overrides = (*overrides, f"train.max_steps={plan.steps}",
                         f"train.max_time={round(SFT_TIME_CAP * plan.steps * plan.per_step)}")
    result = sft(base_dir, data_dir, out_dir, overrides=overrides, resume=resume, fresh=fresh, log=log)
    before, after = _val_losses(run)
    model, tokenizer = load_model(out_dir)
    from ..data.prepare import read_manifest
    prompts = read_manifest(data_dir)["chat"]["sample_prompts"][:DEMO_QUESTIONS]
    replies = chat_replies(model, load_tokenizer(run / "tokenizer") if tokenizer is None else tokenizer,
                           [p["messages"] for p in prompts], max_new_tokens=64)
    log("\n==== the chat model answers questions it was not trained on ====")
    for prompt, reply in zip(prompts, replies):
        log(format_exchange(prompt["messages"], reply, prompt["reference"]) + "\n----")
    if before is not None and after is not None:
        log(f"masked val loss (assistant tokens of held-out conversations): {before:.3f} before fine-tuning -> "
            f"{after:.3f} after")
    if result.stopped == "max_time":
        log(f"the demo's time cap ended fine-tuning at step {result.step} of {config_steps(run)}: this machine ran "
            "slower than its calibration (busy?)")
    log(f"{'stopped' if result.stopped == 'interrupted' else 'done'}: {base_dir} fine-tuned for {result.step} steps "
        f"on {data_dir} into the chat model {out_dir}; talk to it: gptforge chat --model {out_dir}")
    return result
