"""`gptforge sft`: the masked loss against hand-computed cross-entropy, the fine-tuned model's val loss,
exact resume after SIGKILL, and each bad input as one line with exit 2 and nothing written."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from gptforge.config import ModelConfig, RunConfig, TrainConfig, DataConfig
from gptforge.data.chat_loader import ChatLoader
from gptforge.data.chat_prepare import prepare_chat
from gptforge.data.prepare import prepare

REPO = Path(__file__).resolve().parents[1]
BASE_SHAPE = dict(n_layer=2, n_head=2, n_embd=32, block_size=64)


def _qa(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(0, 30), rng.randint(0, 30)
        out.append({"messages": [{"role": "user", "content": f"what is {a} plus {b}?"},
                                 {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]})
    return out


def _train_base(root: Path, optimizer: str = "adamw") -> Path:
    """A tiny base model trained for a few steps on text that has every character the chats use."""
    from gptforge.training.trainer import train

    text = "".join(f"what is {i % 31} plus {i % 17}? {i % 31} plus {i % 17} is {i % 31 + i % 17}.\n"
                   for i in range(2000)) + "systemuserassistant\n"
    (root / "corpus.txt").write_text(text)
    prepare([str(root / "corpus.txt")], "char", root / "data", workers=1)
    config = RunConfig(model=ModelConfig(vocab_size=64, **BASE_SHAPE),
                       train=TrainConfig(out_dir=str(root / "base"), max_steps=40, micro_batch_size=8, lr=3e-3,
                                         warmup_steps=5, eval_every=40, sample_every=1000, log_every=20,
                                         checkpoint_every=40, device="cpu", optimizer=optimizer),
                       data=DataConfig(path=str(root / "data")))
    from gptforge.resolve import fit_vocab_to_data
    train(fit_vocab_to_data(config, explicit_vocab=False), log=lambda m: None)
    return root / "base"


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    return _train_base(tmp_path_factory.mktemp("sft_base"))


@pytest.fixture(scope="module")
def chat_data(base_run, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sft_chat")
    (root / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _qa(300, 0)))
    prepare_chat([str(root / "qa.jsonl")], str(base_run), root / "data", val_fraction=0.1, workers=1)
    return root / "data"


def test_sft_loss_is_the_hand_masked_cross_entropy(chat_data):
    from gptforge.model import GPT
    from gptforge.training.step import forward_backward

    torch.manual_seed(0)
    loader = ChatLoader(chat_data, "train", seq_len=63, batch_size=4, seed=0)
    rows = [loader.row(items) for items in loader._packing(0)[0][:4]]
    x, y = loader._batch(loader._packing(0)[0][:4])
    model = GPT(ModelConfig(vocab_size=int(json.loads((chat_data / "manifest.json").read_text())["tokenizer"]
                                           ["vocab_size"]), **BASE_SHAPE))
    logits, _ = model(x)
    # by hand: cross-entropy at every position whose *target* token is an assistant token (mask of the target)
    losses = []
    for b, (tokens, mask) in enumerate(rows):
        for t in range(63):
            if mask[t + 1]:
                assert y[b, t] == tokens[t + 1]
                losses.append(-F.log_softmax(logits[b, t].double(), -1)[int(tokens[t + 1])])
            else:
                assert y[b, t] == -100
    hand = torch.stack(losses).mean()
    trained = forward_backward(model, [(x, y)], 1, torch.device("cpu"), "fp32")  # the trainer's own step
    assert len(losses) == int(sum(m[1:].sum() for _, m in rows)) > 0
    assert trained.item() == pytest.approx(hand.item(), rel=1e-5)


def test_fine_tuning_lowers_the_masked_val_loss(base_run, chat_data, tmp_path):
    from gptforge.training.sft import sft

    out = tmp_path / "chat"
    sft(str(base_run), str(chat_data), str(out), epochs=2,
        overrides=["train.device=cpu", "train.micro_batch_size=8", "train.lr=2e-3"], log=lambda m: None)
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert rows[0]["step"] == 0 and val[-1] < 0.8 * val[0], val  # masked loss on held-out conversations
    assert all(r["padding"] < 0.5 for r in rows if "padding" in r)
    config = json.loads((out / "config.json").read_text())
    assert {k: config["model"][k] for k in BASE_SHAPE} == BASE_SHAPE  # the base model's shape
    assert (out / "tokenizer" / "chat_template.jinja").is_file() and (out / "loss.png").is_file()
    assert "assistant:" in (out / "samples.txt").read_text()
    # new marker rows: <|im_start|> = mean of the base rows, <|im_end|> = <|endoftext|>'s row (at step 0)
    from gptforge.chat.vocab import copy_base_weights, init_added_rows
    from gptforge.loading import load_model
    base, tok = load_model(str(base_run))
    from gptforge.model import GPT
    fresh = GPT(ModelConfig(**{**base.config.to_dict(), "vocab_size": base.config.vocab_size + 2}))
    copy_base_weights(base, fresh)
    init_added_rows(fresh, tok.vocab_size, {"<|im_start|>": tok.vocab_size, "<|im_end|>": tok.vocab_size + 1},
                    tok.eot_id)
    w = fresh.transformer.wte.weight
    assert torch.allclose(w[tok.vocab_size], base.transformer.wte.weight[:tok.vocab_size].mean(0))
    assert torch.equal(w[tok.vocab_size + 1], base.transformer.wte.weight[tok.eot_id])
    # SFT of an SFT model: the markers are kept, nothing grows
    again = sft(str(out), str(chat_data), str(tmp_path / "chat2"), overrides=["train.max_steps=2",
                "train.device=cpu"], log=lambda m: None)
    assert again.step == 2


@pytest.mark.parametrize("sft_optimizer", ["adamw", "muon"])
def test_a_muon_trained_base_fine_tunes_with_either_optimizer(chat_data, tmp_path, sft_optimizer):
    """SFT reads only the base's weights: a base trained with Muon fine-tunes like any other, with SFT's own
    AdamW default or with train.optimizer=muon."""
    from gptforge.training.sft import sft

    base = _train_base(tmp_path, optimizer="muon")
    out = tmp_path / "chat"
    result = sft(str(base), str(chat_data), str(out), epochs=1,
                 overrides=["train.device=cpu", "train.micro_batch_size=8", "train.lr=2e-3",
                            f"train.optimizer={sft_optimizer}", "train.muon_lr=0.005"], log=lambda m: None)
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert result.step > 0 and val[-1] < 0.9 * val[0], val
    assert json.loads((out / "config.json").read_text())["train"]["optimizer"] == sft_optimizer
    assert json.loads((base / "config.json").read_text())["train"]["optimizer"] == "muon"


# ---- exact resume --------------------------------------------------------------------------------------

MAX_STEPS = 18
SETTINGS = ["model.dropout=0.1", "train.micro_batch_size=4", f"train.max_steps={MAX_STEPS}", "train.checkpoint_every=3",
            "train.log_every=1", "train.eval_every=9", "train.deterministic=true", "train.device=cpu",
            "train.sample_every=1000"]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _sft_cmd(base: Path, data: Path, out: Path, resume: bool = False) -> list[str]:
    cmd = [sys.executable, "-m", "gptforge", "sft", "--model", str(base), "--data", str(data), "--out", str(out)]
    for s in SETTINGS:
        cmd += ["--set", s]
    return cmd + (["--resume"] if resume else [])


def _logged_step(run: Path) -> int:
    path = run / "metrics.jsonl"
    if not path.exists():
        return 0
    return max((json.loads(l).get("step", 0) for l in path.read_text().splitlines() if l.endswith("}")), default=0)


def test_sigkill_then_resume_is_bitwise_identical(base_run, chat_data, tmp_path):
    reference = tmp_path / "reference"
    subprocess.run(_sft_cmd(base_run, chat_data, reference), env=_env(), check=True, capture_output=True,
                   timeout=300)
    kill_at = int(os.environ.get("GPTFORGE_TEST_KILL_STEP") or random.Random().randint(4, MAX_STEPS - 3))
    out = tmp_path / "killed"
    proc = subprocess.Popen(_sft_cmd(base_run, chat_data, out), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 200
    while _logged_step(out) < kill_at:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "timed out waiting for the fine-tuning subprocess"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    context = f"(killed after step {kill_at} was logged; replay with GPTFORGE_TEST_KILL_STEP={kill_at})"
    assert _logged_step(out) < MAX_STEPS, context
    # the resumed run needs neither the base model nor the data's arguments: they are in its config
    moved = base_run.with_name("base-moved")
    shutil.move(base_run, moved)
    try:
        resumed = subprocess.run([sys.executable, "-m", "gptforge", "sft", "--out", str(out), "--resume"],
                                 env=_env(), capture_output=True, text=True, timeout=300)
    finally:
        shutil.move(moved, base_run)
    assert resumed.returncode == 0, f"{context}\n{resumed.stderr}"
    wa = load_file(str(reference / "checkpoints" / f"step_{MAX_STEPS}" / "model.safetensors"))
    wb = load_file(str(out / "checkpoints" / f"step_{MAX_STEPS}" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), context
    strip = lambda p: [{k: v for k, v in json.loads(l).items() if k not in ("tokens_per_s", "elapsed", "mfu")}
                       for l in (p / "metrics.jsonl").read_text().splitlines()]
    assert strip(reference) == strip(out), context


# ---- bad input -----------------------------------------------------------------------------------------


def test_bad_inputs_are_one_line_exit_2_and_write_nothing(base_run, chat_data, tmp_path, capsys):
    from gptforge.cli import main

    plain = base_run.parent / "data"  # the base's own text data, prepared without --chat
    no_tok = tmp_path / "no-tokenizer"
    shutil.copytree(base_run, no_tok)
    shutil.rmtree(no_tok / "tokenizer")
    other_tok = tmp_path / "other-chat"
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _qa(20, 1)))
    from gptforge.tokenizer import CharTokenizer
    CharTokenizer.train(["what is plus?0123456789. systemuserassistant\nXYZ"]).save(tmp_path / "tok")
    prepare_chat([str(tmp_path / "qa.jsonl")], str(tmp_path / "tok"), other_tok, workers=1)
    cases = [
        (["--model", tmp_path / "missing", "--data", chat_data], "no such run"),
        (["--model", no_tok, "--data", chat_data], "has no tokenizer/"),
        (["--model", base_run, "--data", plain], "prepared without --chat"),
        (["--model", base_run, "--data", other_tok], "another tokenizer"),
        (["--model", base_run, "--data", chat_data, "--set", "model.n_layer=3"], "keeps the base model's shape"),
        # the data the run trains on is the one after --set (issue 22 #7: an AttributeError and a run left behind)
        (["--model", base_run, "--data", chat_data, "--set", f"data.path={plain}"],
         f"--set data.path={plain} was prepared without --chat"),
        (["--model", base_run, "--data", chat_data, "--set", f"data.path={tmp_path / 'none'}"],
         f"--set data.path={tmp_path / 'none'}: not prepared data"),
        # --epochs: a positive finite number, a plan of at most 1e9 steps (issue 22 #6: 0 trained 3 epochs)
        (["--model", base_run, "--data", chat_data, "--epochs", "0"], "argument --epochs: must be a positive number"),
        (["--model", base_run, "--data", chat_data, "--epochs", "1e12"],
         "that is 33,000,000,000,000 steps (33 per epoch), more than the 1,000,000,000 a run may plan"),
        # --resume with nothing to resume says so (issue 22 #14: it asked for --model and --data "or --resume")
        (["--resume"], "--resume: {out} has no fine-tuning run to resume"),
    ]
    for args, message in cases:
        out = tmp_path / "out"
        capsys.readouterr()
        try:
            code = main(["sft", *map(str, args), "--out", str(out)])
        except SystemExit as e:  # argparse's own errors (a bad --epochs)
            code = e.code
        err = capsys.readouterr().err
        assert code == 2, (args, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and message.format(out=out) in lines[0], (args, lines)
        assert not out.exists(), args


def test_the_demo_fine_tunes_every_planned_epoch_on_a_slow_machine_and_shows_answers(base_run, chat_data,
                                                                                      tmp_path, monkeypatch):
    """A bare `gptforge sft` on a machine its calibration finds very slow still runs the recipe's epochs (cut
    short, the replies were empty), then prints the held-out exchanges and the val loss before and after."""
    from gptforge.training import demo, sft_demo

    monkeypatch.setattr(sft_demo, "ensure_chat_data", lambda base, data_dir, log: None)  # chat_data is ready
    monkeypatch.setattr(demo, "STEP_OVERHEAD", 1e4)  # timed steps look 10^4 times slower than they are
    monkeypatch.setattr(demo, "MIN_DEMO_STEPS", 1)  # and no floor would hide a plan cut to the time budget
    lines: list[str] = []
    out = tmp_path / "chat"
    result = sft_demo.run_sft_demo(str(base_run), str(chat_data), str(out), log=lines.append, epochs=1)
    manifest = json.loads((chat_data / "manifest.json").read_text())
    planned = json.loads((out / "config.json").read_text())["train"]["max_steps"]
    from gptforge.training.sft import load_base, sft_config
    one_epoch = sft_config(load_base(str(base_run)), str(chat_data), str(tmp_path / "plan"), 1).train.max_steps
    assert planned == one_epoch > 2 and result.step == planned and result.stopped != "max_time"
    text = "\n".join(lines)
    assert "==== the chat model answers" in text and text.count("----") == min(3, len(manifest["chat"]["sample_prompts"]))
    before, after = (float(v) for v in text.split("masked val loss")[1].split(":")[1].split("after")[0]
                     .replace("before fine-tuning", "").split("->"))
    assert after < before
    assert f"talk to it: gptforge chat --model {out}" in text


def test_a_stopped_fine_tune_says_to_continue_with_sft_and_that_command_continues_it(base_run, chat_data, tmp_path,
                                                                                    monkeypatch, capsys):
    """A stop request (Ctrl-C, SIGTERM) ends with the command that continues the run: `gptforge sft`, not `train`
    (issue 22 #14); following it finishes the run."""
    from gptforge.cli import main
    from gptforge.training.stopping import StopRules

    real = StopRules.local_reason
    monkeypatch.setattr(StopRules, "local_reason",
                        lambda self, step, tokens, elapsed: "interrupted" if step >= 2 else real(self, step, tokens,
                                                                                                elapsed))
    out = tmp_path / "chat"
    settings = [a for s in SETTINGS for a in ("--set", s)]
    assert main(["sft", "--model", str(base_run), "--data", str(chat_data), "--out", str(out), *settings]) == 130
    said = capsys.readouterr().out
    assert f"continue with: gptforge sft --out {out} --resume auto" in said, said[-500:]
    monkeypatch.setattr(StopRules, "local_reason", real)
    assert main(["sft", "--out", str(out), "--resume", "auto"]) == 0
    assert f"step {MAX_STEPS}/{MAX_STEPS}" in capsys.readouterr().out
