"""The training loop end to end on tiny data: the demo recipe learns, NaN steps are skipped then stop the
run, resume refuses a different model shape, and the CLI rejects bad settings in one line."""

from __future__ import annotations

import json
import shutil
import sysconfig
from pathlib import Path

import pytest

from gptforge.cli import main
from gptforge.config import RunConfig, apply_overrides
from gptforge.errors import UserError
from gptforge.training import checkpoint as ckpt
from gptforge.training.demo import demo_config, run_demo
from gptforge.training.metrics import read_metrics
from gptforge.training.trainer import Trainer, train


@pytest.fixture(scope="module")
def code_data(tmp_path_factory) -> Path:
    """A char-level corpus of real Python: a few standard-library modules (what the demo trains on)."""
    from gptforge.data.prepare import prepare
    root = tmp_path_factory.mktemp("code")
    src = root / "src"
    src.mkdir()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("json/decoder.py", "json/encoder.py", "textwrap.py", "string.py", "bisect.py", "heapq.py",
                 "fnmatch.py", "glob.py", "shlex.py", "copy.py", "colorsys.py", "keyword.py"):
        if (stdlib / name).is_file():
            shutil.copy(stdlib / name, src / name.replace("/", "_"))
    prepare([str(src)], "char", root / "data", workers=1, val_fraction=0.2)
    return root / "data"


def _tiny(data: Path, out: Path, steps: int = 40, **train) -> RunConfig:
    """The demo's recipe (same LR and schedule family) shrunk to a model that trains in seconds."""
    from gptforge.resolve import fit_vocab_to_data
    config = apply_overrides(demo_config(str(data), str(out)), {
        "model.block_size": 64, "model.n_layer": 2, "model.n_embd": 64, "model.n_head": 2,
        "train.max_steps": steps, "train.max_time": 0.0, "train.micro_batch_size": 8, "train.warmup_steps": 5,
        "train.eval_every": max(1, steps // 2), "train.sample_every": steps, "train.checkpoint_every": steps,
        "train.sample_tokens": 16, "train.log_every": 10, **{f"train.{k}": v for k, v in train.items()}})
    return fit_vocab_to_data(config, explicit_vocab=False)


def test_demo_recipe_val_loss_falls(code_data, tmp_path):
    logs = []
    config = _tiny(code_data, tmp_path / "demo", steps=60)
    result = run_demo(config=config, log=logs.append, calibrate=False)
    rows = read_metrics(tmp_path / "demo" / "metrics.jsonl")
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(val) >= 3 and val[-1] < val[0] - 0.7, val  # from ~ln(vocab) clearly down
    assert result.stopped == "max_steps" and result.step == 60
    assert (tmp_path / "demo" / "loss.png").stat().st_size > 1000
    assert "=== step 60" in (tmp_path / "demo" / "samples.txt").read_text()
    assert (tmp_path / "demo" / "tokenizer").is_dir()
    assert any("samples from the trained model" in line for line in logs)
    # the second run of a finished demo starts fresh and says so
    logs.clear()
    run_demo(config=_tiny(code_data, tmp_path / "demo", steps=2), log=logs.append, calibrate=False)
    assert any("starting a fresh one" in line for line in logs)


def test_demo_stopped_by_its_time_cap_starts_fresh_instead_of_stalling(code_data, tmp_path):
    config = _tiny(code_data, tmp_path / "demo", steps=100_000, max_time=0.3, eval_every=100_000,
                   checkpoint_every=100_000)
    first = run_demo(config=config, log=lambda m: None, calibrate=False)
    assert first.stopped == "max_time" and 0 < first.step < 100_000
    logs = []
    again = run_demo(config=config, log=logs.append, calibrate=False)
    assert any("starting a fresh one" in line for line in logs), logs
    assert again.step > 0  # it trained again rather than stopping at once on the restored clock


def test_demo_replaces_data_prepared_differently(code_data, tmp_path, monkeypatch):
    import gptforge.data.prepare as prepare_module
    from gptforge.training.demo import DEMO_SOURCE, DEMO_TOKENIZER, ensure_demo_data
    calls = []
    monkeypatch.setattr(prepare_module, "prepare", lambda *args, **kw: calls.append((args, kw)))
    data = tmp_path / "data"
    shutil.copytree(code_data, data)  # a char-level corpus of other files: not the demo's
    logs = []
    ensure_demo_data(data, log=logs.append)
    assert calls, logs
    assert calls[0][0][:2] == ([DEMO_SOURCE], DEMO_TOKENIZER) and calls[0][1]["force"] is True
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["tokenizer"]["spec"], manifest["sources"] = DEMO_TOKENIZER, [DEMO_SOURCE]
    (data / "manifest.json").write_text(json.dumps(manifest))
    calls.clear()
    ensure_demo_data(data, log=lambda m: None)
    assert calls == []  # the demo's own preparation is reused


def test_eval_callback_results_go_to_metrics(code_data, tmp_path):
    calls = []

    def hook(model, step):
        calls.append((model.training, step))
        return {"my_task_acc": 0.25}

    train(_tiny(code_data, tmp_path / "r", steps=4, eval_every=2), eval_callbacks=[hook], log=lambda m: None)
    assert calls == [(False, 0), (False, 2), (False, 4)]
    rows = [r for r in read_metrics(tmp_path / "r" / "metrics.jsonl") if "my_task_acc" in r]
    assert [r["step"] for r in rows] == [0, 2, 4]


def test_eval_tasks_are_scored_into_metrics_and_plot(code_data, tmp_path):
    import json
    import struct
    hellaswag = tmp_path / "hellaswag.jsonl"
    item = {"ctx": "def add(a, b):", "ctx_a": "def add(a, b):", "ctx_b": "", "activity_label": "Code",
            "endings": ["    return a + b", "    return a * b", " pass", "\n\n"], "label": 0}
    hellaswag.write_text("\n".join(json.dumps(item) for _ in range(3)) + "\n")
    text = tmp_path / "held_out.py"
    text.write_text("import os\n\ndef main():\n    print(os.getcwd())\n" * 20)
    config = _tiny(code_data, tmp_path / "r", steps=4, eval_every=2, eval_tasks=["hellaswag", "val"],
                   eval_data=[f"hellaswag={hellaswag}", f"val={text}"], eval_limit=2)
    train(config, log=lambda m: None)
    rows = [r for r in read_metrics(tmp_path / "r" / "metrics.jsonl") if "hellaswag/acc" in r]
    assert [r["step"] for r in rows] == [0, 2, 4]
    assert all(0.0 <= r["hellaswag/acc_norm"] <= 1.0 and r["val/bpb"] > 0 for r in rows)
    assert rows[-1]["val/bpb"] < rows[0]["val/bpb"]  # it learns Python, so held-out Python gets cheaper
    width, height = struct.unpack(">II", (tmp_path / "r" / "loss.png").read_bytes()[16:24])
    assert (width, height) == (700, 680)  # 7x6.8 in at 100 dpi: the loss panel plus a benchmark panel (one: 420)


def test_eval_task_data_is_checked_before_training(code_data, tmp_path):
    config = _tiny(code_data, tmp_path / "r", steps=4, eval_tasks=["hellaswag"],
                   eval_data=[str(tmp_path / "missing.jsonl")])
    with pytest.raises(UserError, match="missing.jsonl"):
        train(config, log=lambda m: None)
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_nan_steps_are_skipped_then_stop_with_checkpoint_untouched(code_data, tmp_path, monkeypatch):
    out = tmp_path / "nan"
    train(_tiny(code_data, out, steps=2, checkpoint_every=2), log=lambda m: None)
    good = ckpt.checkpoint_dir(out, 2)
    before = (good / "model.safetensors").read_bytes()
    config = _tiny(code_data, out, steps=20, checkpoint_every=2, max_bad_steps=3)
    trainer = Trainer(config, resume="auto", log=lambda m: None)
    real_forward = trainer.raw_model.forward
    monkeypatch.setattr(trainer.raw_model, "forward",
                        lambda idx, targets=None, **kw: (None, real_forward(idx, targets)[1] * float("nan")))
    with pytest.raises(UserError, match="3 steps in a row with non-finite loss") as err:
        trainer.fit()
    assert "step_2" in str(err.value)
    assert trainer.counters.skipped_steps == 3 and trainer.counters.step == 5
    assert (good / "model.safetensors").read_bytes() == before
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [2]


def test_resume_with_different_model_shape_names_fields(code_data, tmp_path):
    out = tmp_path / "r"
    train(_tiny(code_data, out, steps=2), log=lambda m: None)
    bigger = apply_overrides(_tiny(code_data, out, steps=4), {"model.n_layer": 3, "model.n_embd": 96})
    with pytest.raises(UserError, match=r"n_embd: 64 .* vs 96 now, n_layer: 2 .* vs 3 now"):
        Trainer(bigger, resume="auto", log=lambda m: None)


def test_existing_run_needs_resume_or_fresh(code_data, tmp_path):
    out = tmp_path / "r"
    train(_tiny(code_data, out, steps=2), log=lambda m: None)
    with pytest.raises(UserError, match="--resume"):
        Trainer(_tiny(code_data, out, steps=4), log=lambda m: None)
    fresh = Trainer(_tiny(code_data, out, steps=4), fresh=True, log=lambda m: None)
    assert fresh.counters.step == 0 and not ckpt.list_checkpoints(out)


def test_gradient_accumulation_and_ramp_in_the_loop(code_data, tmp_path):
    config = _tiny(code_data, tmp_path / "r", steps=5, tokens_per_step=2048, batch_ramp_tokens=2048,
                   batch_ramp_start=512)
    train(config, log=lambda m: None)
    rows = [r for r in read_metrics(tmp_path / "r" / "metrics.jsonl") if "batch_tokens" in r]
    # 8 x 64 tokens per micro-batch; ramp 512 -> 2048 over the first 2048 tokens, then full
    assert [r["batch_tokens"] for r in rows] == [512, 2048]  # logged at step 1 and at the last step
    assert [r["tokens"] for r in rows] == [512, 512 + 1024 + 1536 + 2048 + 2048]


@pytest.mark.parametrize("argv, message", [
    (["--set", "train.lrr=1"], "unknown setting 'train.lrr'"),
    (["--set", "train.max_steps=many"], "train.max_steps: expected an integer"),
    (["--set", "model.n_layer"], "expected key=value"),
    (["--set", "train.schedule=linear"], "is not one of"),
    (["--preset", "gpt9"], "unknown preset"),
])
def test_cli_bad_settings_are_one_line_errors(code_data, tmp_path, capsys, argv, message):
    code = main(["train", "--data", str(code_data), "--out", str(tmp_path / "r"), *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_cli_print_config_resolves_preset_toml_and_set(code_data, tmp_path, capsys):
    toml = tmp_path / "run.toml"
    toml.write_text('preset = "gpt3-small"\n[train]\nmax_steps = 123\nlr = 1e-3\n[model]\nblock_size = 512\n')
    code = main(["train", "--config", str(toml), "--data", str(code_data), "--out", str(tmp_path / "r"),
                 "--set", "train.lr=2e-4", "--print-config"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    config = json.loads(captured.out)
    assert config["model"]["n_embd"] == 768 and config["model"]["block_size"] == 512
    assert config["model"]["vocab_size"] == json.loads((code_data / "manifest.json").read_text())["tokenizer"]["vocab_size"]
    assert config["train"]["max_steps"] == 123 and config["train"]["lr"] == 2e-4
    assert config["train"]["out_dir"] == str(tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_cli_trains_and_resumes(code_data, tmp_path, capsys):
    args = ["train", "--data", str(code_data), "--out", str(tmp_path / "r"), "--set", "model.n_layer=1",
            "--set", "model.n_embd=32", "--set", "model.n_head=2", "--set", "model.block_size=32",
            "--set", "train.micro_batch_size=4", "--set", "train.eval_batches=1", "--set", "train.sample_tokens=4"]
    assert main([*args, "--set", "train.max_steps=3"]) == 0
    assert main([*args, "--set", "train.max_steps=5", "--resume"]) == 0
    out = capsys.readouterr().out
    assert "resuming" in out and "step 5/5" in out
    saved = json.loads((tmp_path / "r" / "config.json").read_text())
    assert saved["train"]["max_steps"] == 5 and saved["model"]["n_layer"] == 1


def test_damaged_run_config_is_a_one_line_error(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text('{"model": {"n_layer": 2,')  # cut off mid-write by a disk error
    assert main(["train", "--out", str(run), "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "config.json is damaged" in err and "--fresh" in err


def test_a_new_run_takes_its_datas_tokenizer_not_one_left_in_the_directory(code_data, tmp_path):
    from gptforge.tokenizer import load_tokenizer
    out = tmp_path / "r"
    train(_tiny(code_data, out, steps=2), log=lambda m: None)
    stale = load_tokenizer(out / "tokenizer")
    other_data = tmp_path / "other"
    (tmp_path / "src.txt").write_text("zzzz yyyy xxxx\n" * 400 + "import os\n\nclass def for i in range(\n" * 50)
    from gptforge.data.prepare import prepare
    prepare([str(tmp_path / "src.txt")], "char", other_data, workers=1, val_fraction=0.2)
    config = apply_overrides(_tiny(other_data, out, steps=2), {"data.path": str(other_data)})
    Trainer(config, fresh=True, log=lambda m: None).fit()
    fresh = load_tokenizer(out / "tokenizer")
    assert fresh.vocab_size == load_tokenizer(other_data / "tokenizer").vocab_size != stale.vocab_size
    assert fresh.encode("zzzz") == load_tokenizer(other_data / "tokenizer").encode("zzzz")


def test_ctrl_c_during_the_first_validation_saves_step_0_and_resumes(code_data, tmp_path):
    import os
    import signal

    def interrupt_once(model, step):
        if step == 0 and not calls:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the first validation pass runs
        calls.append(step)
        return {}

    calls = []
    out = tmp_path / "r"
    logs = []
    first = train(_tiny(code_data, out, steps=4, eval_every=2), eval_callbacks=[interrupt_once], log=logs.append)
    assert first.stopped == "interrupted" and first.step == 0
    assert first.checkpoint == ckpt.checkpoint_dir(out, 0) and ckpt.verify_checkpoint(first.checkpoint) is None
    assert any("checkpoint " + str(first.checkpoint) in line for line in logs)
    again = train(_tiny(code_data, out, steps=4, eval_every=2), resume="auto", eval_callbacks=[interrupt_once],
                  log=lambda m: None)
    assert again.stopped == "max_steps" and again.resumed_from == 0
    assert calls == [0, 2, 4]  # the resumed run does not validate step 0 a second time
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if "val_loss" in r] == [0, 2, 4]


def test_demo_says_when_its_time_cap_ended_it_and_that_few_steps_mean_little(code_data, tmp_path):
    logs = []
    config = _tiny(code_data, tmp_path / "demo", steps=100_000, max_time=0.3, eval_every=100_000,
                   checkpoint_every=100_000)
    run_demo(config=config, log=logs.append, calibrate=False)
    assert any("time cap" in line and "ended the run" in line for line in logs), logs
    assert any(line.startswith("warning: only") for line in logs), logs


def _fake_clock(monkeypatch, durations):
    """time.perf_counter returning start/stop pairs 10 s apart whose differences are `durations`."""
    clock = iter([t for i, d in enumerate(durations) for t in (10.0 * i, 10.0 * i + d)])
    monkeypatch.setattr("time.perf_counter", lambda: next(clock))


def test_demo_calibration_takes_the_median_of_several_steps(monkeypatch):
    from gptforge.training import demo
    monkeypatch.setattr(demo, "thread_counts", lambda: [1])
    _fake_clock(monkeypatch, [1.0, 0.1, 0.1, 9.0, 0.1, 0.2])  # a warm-up step, then five timed ones, one very slow
    plan = demo.calibrate_steps(demo.demo_config(), seconds=60.0, target=10_000, timed_steps=5)
    assert plan.per_step == pytest.approx(0.1 * demo.STEP_OVERHEAD)  # the median: one slow step does not set it
    assert plan.steps == int(60.0 / plan.per_step)  # fewer than the target: as many as fit
    assert "expect weaker results" in plan.describe(10_000)


def test_demo_calibration_plans_the_target_and_picks_the_faster_thread_count(monkeypatch):
    import torch
    from gptforge.training import demo
    monkeypatch.setattr(demo, "thread_counts", lambda: [2, 1])
    # alternating 2-thread and 1-thread steps (after one warm-up each): 2 threads are slower, as on a busy CPU
    _fake_clock(monkeypatch, [1.0, 1.0] + [0.3, 0.2] * 5)
    before = torch.get_num_threads()
    try:
        plan = demo.calibrate_steps(demo.demo_config(), seconds=600.0, target=500, timed_steps=5)
        assert plan.threads == 1 and torch.get_num_threads() == 1  # kept for the run
    finally:
        torch.set_num_threads(before)
    assert plan.tried == {2: pytest.approx(0.3), 1: pytest.approx(0.2)}
    assert plan.steps == 500  # the recipe's length fits: exactly the target, whatever the speed
    assert "1 thread (2 threads: 0.30 s)" in plan.describe(500)