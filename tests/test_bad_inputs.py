"""The bad-input sweep: every command, given something wrong, answers with exactly one stderr line that names
the file or option at fault, exits 2, prints no traceback and leaves nothing behind (no new or changed file
or directory, no temporary directory).

Each case runs the CLI in-process (`gptforge.cli.main`) in a fresh working directory holding copies of a
prepared char dataset (`data/`) and a short trained run (`run/`, checkpoints at steps 2 and 4), so the
whole sweep costs one tiny training run.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from gptforge.cli import main
from gptforge.layout import LOCK_FILE

from test_data_readers import damaged_parquet

TRAIN_SMALL = ["--set", "model.n_layer=1", "--set", "model.n_embd=16", "--set", "model.n_head=2",
               "--set", "model.block_size=16", "--set", "train.tokens_per_step=64",
               "--set", "train.micro_batch_size=4", "--set", "train.warmup_steps=1", "--set", "train.eval_every=2",
               "--set", "train.eval_batches=1", "--set", "train.checkpoint_every=2", "--set", "train.log_every=1",
               "--set", "train.sample_every=1000", "--set", "train.device=cpu", "--set", "train.precision=fp32"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """data/ (char tokenizer) and run/ (4 steps) made once by the CLI; each case works on copies."""
    from conftest import fixture_text

    root = tmp_path_factory.mktemp("sweep")
    docs = [p for p in fixture_text().split("\n\n") if p.strip()]
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    assert main(["prepare", str(root / "docs.jsonl"), "--tokenizer", "char", "--out", str(root / "data"),
                 "--quiet", "--workers", "1", "--val-fraction", "0.2"]) == 0
    assert main(["train", "--data", str(root / "data"), "--out", str(root / "run"), *TRAIN_SMALL,
                 "--set", "train.max_steps=4"]) == 0
    (root / "docs.jsonl").unlink()
    return root


@dataclass
class Case:
    id: str
    argv: Callable[[Path], list[str]] | list[str]  # given the working directory (after setup)
    needles: tuple[str, ...]  # what the one line must name
    setup: Callable[[Path], None] = lambda work: None
    marks: list = field(default_factory=list)


def _write(path: str, text: str | bytes) -> Callable[[Path], None]:
    def setup(work: Path) -> None:
        target = work / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return setup


def _edit_json(path: str, change: Callable[[dict], None], recompute_checksum: bool = False) -> Callable[[Path], None]:
    def setup(work: Path) -> None:
        file = work / path
        data = json.loads(file.read_text())
        change(data)
        file.write_text(json.dumps(data))
        if recompute_checksum:  # a deliberate edit, not corruption: the checksums agree with it
            sums_file = file.parent / "checksums.json"
            sums = json.loads(sums_file.read_text())
            sums[file.name] = hashlib.sha256(file.read_bytes()).hexdigest()
            sums_file.write_text(json.dumps(sums))
    return setup


def _ids_beyond_vocabulary(offset: int) -> Callable[[Path], None]:
    """Overwrite data/'s train shard with ids from vocab_size + offset (inside the padding for offset 0..)."""
    def setup(work: Path) -> None:
        from gptforge.data.shards import open_shard, write_shard
        vocab = json.loads((work / "data" / "manifest.json").read_text())["tokenizer"]["vocab_size"]
        shard = next((work / "data").glob("train_*.bin"))
        tokens = np.array(open_shard(shard))
        tokens[::7] = vocab + offset
        write_shard(shard, tokens, tokens.dtype)
    return setup


def _drop_state_key(data: dict) -> None:
    for key in ("rng", "loader", "data"):
        if key in data:
            del data[key]
            return
    data.pop(sorted(k for k in data if k not in ("step", "tokens"))[0])


def _sharded_like(work: Path) -> None:
    (work / "notckpt").mkdir()
    (work / "notckpt" / "readme.txt").write_text("not a checkpoint")


CASES = [
    # ---- prepare ----
    Case("prepare-missing-source", ["prepare", "nope.txt", "--out", "out"], ("nope.txt",)),
    Case("prepare-val-fraction-1", ["prepare", "t.txt", "--out", "out", "--val-fraction", "1"], ("--val-fraction",),
         setup=_write("t.txt", "hello")),
    Case("prepare-unknown-tokenizer", ["prepare", "t.txt", "--out", "out", "--tokenizer", "wordpiece"],
         ("--tokenizer",), setup=_write("t.txt", "hello world")),
    Case("prepare-bpe-size-not-a-number", ["prepare", "t.txt", "--out", "out", "--tokenizer", "bpe:lots"],
         ("bpe:lots",), setup=_write("t.txt", "hello world")),
    Case("prepare-out-not-empty", ["prepare", "t.txt", "--out", "data", "--tokenizer", "char"], ("data", "--force"),
         setup=_write("t.txt", "hello world")),
    Case("prepare-jsonl-without-the-field", ["prepare", "d.jsonl", "--out", "out", "--tokenizer", "char"],
         ("d.jsonl",), setup=_write("d.jsonl", '{"body": "a"}\n{"body": "b"}\n')),
    Case("prepare-workers-0", ["prepare", "t.txt", "--out", "out", "--workers", "0"], ("--workers",),
         setup=_write("t.txt", "hello world")),
    Case("prepare-empty-file", ["prepare", "t.txt", "--out", "out", "--tokenizer", "char"], ("t.txt",),
         setup=_write("t.txt", "")),
    Case("prepare-bad-int", ["prepare", "t.txt", "--out", "out", "--seed", "x"], ("--seed",)),
    Case("prepare-damaged-parquet", ["prepare", "d.parquet", "--out", "out", "--tokenizer", "char"],
         ("d.parquet", "damaged"), setup=lambda work: damaged_parquet(work / "d.parquet")),
    # ---- train ----
    Case("train-unknown-key", ["train", "--data", "data", "--out", "r2", "--set", "train.lrr=1e-3"],
         ("train.lrr",)),
    Case("train-set-without-equals", ["train", "--data", "data", "--out", "r2", "--set", "train.lr"], ("--set",)),
    Case("train-missing-data", ["train", "--data", "nodata", "--out", "r2"], ("nodata",)),
    Case("train-missing-config", ["train", "--config", "none.toml"], ("none.toml",)),
    Case("train-invalid-toml", ["train", "--config", "bad.toml"], ("bad.toml",),
         setup=_write("bad.toml", "[model\nn_layer = ")),
    Case("train-unknown-preset", ["train", "--preset", "gpt5", "--data", "data", "--out", "r2"], ("gpt5",)),
    Case("train-heads-do-not-divide", ["train", "--data", "data", "--out", "r2", "--set", "model.n_embd=16",
                                       "--set", "model.n_head=3"], ("n_head",)),
    Case("train-resume-and-fresh", ["train", "--out", "run", "--resume", "--fresh"], ("--resume", "--fresh")),
    Case("train-resume-missing-checkpoint", ["train", "--out", "run", "--resume", "run/checkpoints/step_99"],
         ("step_99",)),
    Case("train-resume-older-than-newest", ["train", "--out", "run", "--resume", "run/checkpoints/step_2"],
         ("step_4", "run/checkpoints", "--out")),
    Case("train-negative-steps", ["train", "--data", "data", "--out", "r2", "--set", "train.max_steps=-5"],
         ("max_steps",)),
    Case("train-lr-nan", ["train", "--data", "data", "--out", "r2", *TRAIN_SMALL, "--set", "train.max_steps=2",
                          "--set", "train.lr=nan"], ("train.lr",)),
    Case("train-lr-inf", ["train", "--data", "data", "--out", "r2", *TRAIN_SMALL, "--set", "train.max_steps=2",
                          "--set", "train.lr=inf"], ("train.lr",)),
    Case("train-block-size-huge", ["train", "--data", "data", "--out", "r2", *TRAIN_SMALL,
                                   "--set", "train.max_steps=2", "--set", "model.block_size=1000000000"],
         ("block_size",)),
    Case("train-fresh-with-missing-data", ["train", "--out", "run", "--fresh", "--set", "data.path=gone"],
         ("gone",)),
    Case("train-state-edited-with-checksum", ["train", "--out", "run", "--resume"], ("state.json",),
         setup=_edit_json("run/checkpoints/step_4/state.json", _drop_state_key, recompute_checksum=True)),
    Case("train-ids-beyond-padded-vocab", ["train", "--data", "data", "--out", "r2", *TRAIN_SMALL,
                                           "--set", "train.max_steps=2"], ("train_000000.bin",),
         setup=_ids_beyond_vocabulary(200)),
    Case("train-ids-in-vocab-padding", ["train", "--data", "data", "--out", "r2", *TRAIN_SMALL,
                                        "--set", "train.max_steps=2"], ("train_000000.bin",),
         setup=_ids_beyond_vocabulary(0)),
    # ---- sample ----
    Case("sample-missing-model", ["sample", "--model", "nothere", "hi"], ("nothere",)),
    Case("sample-top-p-2", ["sample", "--model", "run", "hi", "--top-p", "2"], ("--top-p",)),
    Case("sample-missing-prompt-file", ["sample", "--model", "run", "--prompt-file", "p.txt"], ("p.txt",)),
    Case("sample-prompt-twice", ["sample", "--model", "run", "hi", "--prompt-file", "p.txt"], ("--prompt-file",),
         setup=_write("p.txt", "hello")),
    Case("sample-prompt-file-not-utf8", ["sample", "--model", "run", "--prompt-file", "p.txt"], ("p.txt",),
         setup=_write("p.txt", b"\xff\xfe\x00bad")),
    Case("sample-bad-stop-escape", ["sample", "--model", "run", "hi", "--stop", r"\q"], ("--stop",)),
    Case("sample-num-samples-0", ["sample", "--model", "run", "hi", "--num-samples", "0"], ("--num-samples",)),
    Case("sample-unknown-device", ["sample", "--model", "run", "hi", "--device", "tpu"], ("--device",)),
    Case("sample-fp16-on-cpu", ["sample", "--model", "run", "hi", "--device", "cpu", "--dtype", "fp16"],
         ("--dtype",)),
    Case("sample-bad-int", ["sample", "--model", "run", "hi", "--max-new-tokens", "many"], ("--max-new-tokens",)),
    Case("sample-weights-without-tokenizer", ["sample", "--model", "w.safetensors", "hi"], ("w.safetensors",),
         setup=lambda work: shutil.copy(work / "run/checkpoints/step_4/model.safetensors", work / "w.safetensors")),
    Case("sample-truncated-weights", ["sample", "--model", "ckpt", "hi"], ("model.safetensors",),
         setup=lambda work: (shutil.copytree(work / "run/checkpoints/step_4", work / "ckpt"),
                             (work / "ckpt/model.safetensors").write_bytes(b"\x10\x00\x00\x00garbage"))),
    # ---- eval ----
    Case("eval-unknown-task", ["eval", "--model", "run", "--task", "winogrande"], ("winogrande",)),
    Case("eval-missing-data", ["eval", "--model", "run", "--task", "val", "--data", "none.txt"], ("none.txt",)),
    Case("eval-batch-size-0", ["eval", "--model", "run", "--task", "val", "--data", "data", "--batch-size", "0"],
         ("--batch-size",)),
    Case("eval-two-tasks-one-data", ["eval", "--model", "run", "--task", "val", "--task", "lambada",
                                     "--data", "data"], ("--data",)),
    Case("eval-empty-hellaswag", ["eval", "--model", "run", "--task", "hellaswag", "--data", "hs.jsonl"],
         ("hs.jsonl",), setup=_write("hs.jsonl", "")),
    Case("eval-json-under-a-file", ["eval", "--model", "run", "--task", "val", "--data", "data", "--limit", "1",
                                    "--json", "afile/r.json", "--no-progress"],
         ("--json afile/r.json", "afile is a file"),
         setup=_write("afile", "x")),
    # ---- export ----
    Case("export-unknown-format", ["export", "--model", "run", "--format", "onnx", "--out", "o"], ("--format",)),
    Case("export-out-exists", ["export", "--model", "run", "--format", "gguf", "--out", "m.gguf"],
         ("m.gguf", "--force"), setup=_write("m.gguf", "mine")),
    Case("export-bad-dtype", ["export", "--model", "run", "--format", "gguf", "--dtype", "q4_0", "--out", "m.gguf"],
         ("--dtype",)),
    Case("export-char-tokenizer-to-gguf", ["export", "--model", "run", "--format", "gguf", "--out", "m.gguf"],
         ("char",)),
    Case("export-run-without-checkpoint", ["export", "--model", "run", "--format", "hf", "--out", "o"], ("run",),
         setup=lambda work: [shutil.rmtree(p) for p in (work / "run/checkpoints").iterdir()]),
    # ---- import-hf ----
    Case("import-hf-no-config", ["import-hf", "hfdir", "--out", "o"], ("hfdir",),
         setup=_write("hfdir/model.safetensors", b"")),
    Case("import-hf-unsupported-activation", ["import-hf", "hfdir", "--out", "o"], ("relu",),
         setup=_write("hfdir/config.json", json.dumps({"model_type": "gpt2", "activation_function": "relu"}))),
    Case("import-hf-out-exists", ["import-hf", "hfdir", "--out", "data"], ("data",),
         setup=_write("hfdir/config.json", json.dumps({"model_type": "gpt2"}))),
    # ---- info ----
    Case("info-seq-len-beyond-context", ["info", "--preset", "gpt2", "--seq-len", "4096"], ("--seq-len",)),
    Case("info-unknown-preset", ["info", "--preset", "gpt5"], ("gpt5",)),
    Case("info-missing-config", ["info", "--config", "none.toml"], ("none.toml",)),
    Case("info-missing-model", ["info", "--model", "nothere"], ("nothere",)),
    Case("info-model-with-set", ["info", "--model", "run", "--set", "n_layer=2"], ("--set",)),
    Case("info-batch-size-0", ["info", "--preset", "gpt2", "--batch-size", "0"], ("--batch-size",)),
    Case("info-damaged-run-config", ["info", "--model", "run"], ("config.json",),
         setup=_write("run/config.json", "{not json")),
    # ---- tokenizer ----
    Case("tokenizer-train-missing-source", ["tokenizer", "train", "none/", "--out", "tok"], ("none",)),
    Case("tokenizer-train-vocab-too-small", ["tokenizer", "train", "t.txt", "--out", "tok", "--vocab-size", "10"],
         ("--vocab-size",), setup=_write("t.txt", "hello world " * 50)),
    Case("tokenizer-encode-missing-dir", ["tokenizer", "encode", "hi", "--tokenizer", "nodir"], ("nodir",)),
    Case("tokenizer-info-not-a-tokenizer", ["tokenizer", "info", "data/train_000000.bin"], ("train_000000.bin",)),
    # ---- consolidate ----
    Case("consolidate-missing", ["consolidate", "nothere"], ("nothere",)),
    Case("consolidate-not-a-checkpoint", ["consolidate", "notckpt"], ("notckpt",), setup=_sharded_like),
    Case("consolidate-not-sharded", ["consolidate", "run/checkpoints/step_4"], ("step_4",)),
    # ---- chat ----
    Case("chat-base-model", ["chat", "--model", "run", "-p", "hi"], ("sft",)),
    # ---- serve ----
    Case("serve-missing-model", ["serve", "--model", "nothere"], ("nothere",)),
    Case("serve-bad-port", ["serve", "--model", "run", "--port", "70000"], ("--port",)),
    Case("serve-no-rows", ["serve", "--model", "run", "--max-batch", "0"], ("--max-batch",)),
]

# ---- every numeric option of every command, through the one validator (gptforge.numeric; issue 22 #6, #11) ----
# A count or size: 0, -1, inf, nan and absurd sizes refused; where 0 means "off" (the help says so), -1 and up;
# fractions outside their interval; seeds outside 0 .. 2**32-1 (numpy's traceback before); not-a-number text.

_POSITIVE_INT = ("0", "-1", "inf", "nan", "1.5", "1e30", "x")
_OFF_OR_MORE = ("-1", "inf", "nan", "1.5", "1e30")
_SEEDS = ("-5", "-1", "4294967296", "nan", "1.5")
_NUMERIC_OPTIONS: list[tuple[list[str], str, tuple[str, ...]]] = [
    *[(["sample", "--model", "run", "hi"], option, values) for option, values in [
        ("--max-new-tokens", _POSITIVE_INT), ("--temperature", ("-1", "inf", "nan", "x")),
        ("--top-k", _OFF_OR_MORE), ("--top-p", ("0", "-0.1", "1.5", "inf", "nan")),
        ("--min-p", ("-0.1", "1.5", "inf", "nan")), ("--repetition-penalty", ("0", "-1", "inf", "nan")),
        ("--no-repeat-ngram", _OFF_OR_MORE), ("--num-samples", (*_POSITIVE_INT, "5000")), ("--seed", _SEEDS)]],
    *[(["chat", "--model", "run", "-p", "hi"], option, values) for option, values in [
        ("--seed", _SEEDS), ("--max-new-tokens", _POSITIVE_INT), ("--top-p", ("0", "nan"))]],
    *[(["eval", "--model", "run", "--task", "val", "--data", "data"], option, values) for option, values in [
        ("--limit", _POSITIVE_INT), ("--batch-size", _POSITIVE_INT), ("--shots", _OFF_OR_MORE),
        ("--stride", _POSITIVE_INT)]],
    *[(["info", "--preset", "gpt2"], option, _POSITIVE_INT) for option in [
        "--batch-size", "--seq-len", "--inference-batch", "--world-size"]],
    *[(["prepare", "t.txt", "--out", "out"], option, values) for option, values in [
        ("--val-fraction", ("-0.1", "1", "inf", "nan")), ("--workers", _POSITIVE_INT), ("--seed", _SEEDS),
        ("--shard-tokens", _POSITIVE_INT), ("--context", ("1", "0", "-1", "inf", "nan"))]],
    *[(["serve", "--model", "run"], option, values) for option, values in [
        ("--port", ("-1", "65536", "inf", "nan")), ("--max-batch", _POSITIVE_INT), ("--max-queued", _POSITIVE_INT),
        ("--seed", _SEEDS)]],
    (["sft", "--model", "run", "--data", "data", "--out", "o"], "--epochs", ("0", "-1", "inf", "nan", "x")),
    *[(["tokenizer", "train", "t.txt", "--out", "tok"], option, values) for option, values in [
        ("--vocab-size", (*_POSITIVE_INT, "1000000000")), ("--min-frequency", _POSITIVE_INT)]],
]
# every numeric setting of a run (TOML / --set): the same rule, named by its dotted key
_SETTINGS = [
    *[(f"train.{name}", ("-1", "nan", "inf")) for name in (
        "seed", "micro_batch_size", "seq_len", "tokens_per_step", "batch_ramp_tokens", "batch_ramp_start",
        "max_steps", "max_tokens", "max_time", "lr", "min_lr_ratio", "warmup_steps", "decay_fraction", "beta1",
        "beta2", "eps", "weight_decay", "grad_clip", "log_every", "eval_every", "eval_batches", "eval_limit",
        "sample_every", "sample_tokens", "sample_temperature", "sample_top_k", "checkpoint_every",
        "keep_checkpoints", "max_bad_steps", "muon_lr", "muon_momentum", "muon_weight_decay", "muon_ns_steps")],
    ("train.seed", ("4294967296",)), ("train.max_steps", ("1e12",)),
    ("data.seed", ("-5", "nan", "4294967296")),
    *[(f"model.{name}", ("-1", "nan", "inf")) for name in (
        "vocab_size", "block_size", "n_layer", "n_head", "n_embd", "d_ff", "dropout", "window", "layer_norm_eps",
        "init_std")],
]
CASES += [Case(f"{argv[0]}-{option.lstrip('-')}={value}", [*argv, option, value], (option,),
               setup=_write("t.txt", "hello world " * 20))
          for argv, option, values in _NUMERIC_OPTIONS for value in values]
CASES += [Case("prepare-bpe-vocab-1e9", ["prepare", "t.txt", "--out", "out", "--tokenizer", "bpe:1000000000"],
               ("--tokenizer bpe:1000000000", "16777216"), setup=_write("t.txt", "hello world " * 20))]
CASES += [Case(f"train-set-{key}={value}", ["train", "--data", "data", "--out", "r2", *TRAIN_SMALL,
                                            "--set", f"{key}={value}"], (key,))
          for key, values in _SETTINGS for value in values]

# case id -> why it is expected to fail (an owner's fix not yet on main): marked xfail(strict=True), so the
# mark must go when the fix lands. Empty: every case holds on main.
PENDING: dict[str, str] = {}


def _tree(root: Path) -> dict[str, str]:
    """Every file and directory under root with a content hash (files) or a marker (directories)."""
    out = {}
    for path in sorted(root.rglob("*")):
        if path.name == LOCK_FILE:  # a run's lock file stays by design (gptforge.runlock): not the user's work
            continue
        rel = str(path.relative_to(root))
        out[rel] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def _params() -> list:
    return [pytest.param(case, id=case.id, marks=[*case.marks, *([pytest.mark.xfail(strict=True, reason=PENDING[
        case.id])] if case.id in PENDING else [])]) for case in CASES]


def test_the_sweep_is_broad():
    commands = {(c.argv if isinstance(c.argv, list) else [""])[0] for c in CASES}
    assert len(CASES) >= 40 and len({c.id for c in CASES}) == len(CASES)
    assert {"prepare", "train", "sample", "eval", "export", "import-hf", "info", "tokenizer",
            "consolidate"} <= commands


@pytest.mark.parametrize("case", _params())
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(case, prepared, tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    shutil.copytree(prepared, work)
    systmp = tmp_path / "systmp"
    systmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(systmp))
    monkeypatch.setattr(tempfile, "tempdir", str(systmp))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.chdir(work)
    case.setup(work)
    argv = case.argv(work) if callable(case.argv) else case.argv
    before = _tree(work)
    capsys.readouterr()

    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    out, err = capsys.readouterr()

    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert code == 2, (code, err)
    assert len(lines) == 1, lines
    command = argv[0]
    assert lines[0].startswith((f"gptforge {command}", "gptforge:")) and "error" in lines[0], lines[0]
    for needle in case.needles:
        assert needle in lines[0], (needle, lines[0])
    assert _tree(work) == before, "files were created, changed or removed"
    assert list(systmp.iterdir()) == [], "a temporary directory was left behind"


# ---- issue 22: inputs (items 9, 12, 13, 14) ----

def _demo_data_in_the_working_directory(work: Path) -> None:
    """What the README's main job leaves in the directory it runs in: data/pystdlib."""
    shutil.copytree(work / "data", work / "pystdlib")
    shutil.move(work / "pystdlib", work / "data" / "pystdlib")


def _markers_without_template(work: Path) -> None:
    from gptforge.chat.tokens import CHAT_TOKENS
    from gptforge.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(work / "run" / "tokenizer")
    tokenizer.add_special_tokens(CHAT_TOKENS)  # as `gptforge tokenizer train --special-token ...` gives them
    shutil.rmtree(work / "run" / "tokenizer")
    tokenizer.save(work / "run" / "tokenizer")


def _small_tokenizer(work: Path) -> None:
    from gptforge.tokenizer import CharTokenizer
    CharTokenizer.train(["abc"]).save(work / "tok")


INPUT_CASES = [
    Case("train-without-data-named", ["train", "--preset", "dev-17m", "--out", "r2"], ("--data",),
         setup=_demo_data_in_the_working_directory),
    Case("chat-empty-message", ["chat", "--model", "run", "-p", ""], ("-p", "empty")),
    Case("chat-markers-without-template", ["chat", "--model", "run", "-p", "hi"], ("a base model", "gptforge sft"),
         setup=_markers_without_template),
    Case("export-tokenizer-does-not-fit", ["export", "--model", "run", "--format", "hf", "--out", "o",
                                           "--tokenizer", "tok"], ("--tokenizer tok", "ids"),
         setup=_small_tokenizer),
]
CASES += INPUT_CASES  # counted by test_the_sweep_is_broad; run here, since the sweep's parameters are fixed above


@pytest.mark.parametrize("case", [pytest.param(case, id=case.id) for case in INPUT_CASES])
def test_bad_input_about_inputs_is_one_line_exit_2_and_leaves_nothing(case, prepared, tmp_path, monkeypatch, capsys):
    test_bad_input_is_one_line_exit_2_and_leaves_nothing(case, prepared, tmp_path, monkeypatch, capsys)


# ---- a full disk (issue 22 #5): one line naming the path, exit 2, the previous checkpoint still the newest ----

FULL_DISK_CASES = {
    "train-checkpoint": (["train", "--out", "run", "--resume", "--set", "train.max_steps=8"],
                         "could not write checkpoint run/checkpoints/step_6 (No space left on device)"),
    "export-hf": (["export", "--model", "run", "--format", "hf", "--out", "o"],
                  "o: No space left on device; free some space and run again"),
}


def _checkpoints(work: Path) -> dict[str, str]:
    return {k: v for k, v in _tree(work / "run" / "checkpoints").items()}


def _run_full_disk(argv: list[str], work: Path, capsys) -> tuple[int, list[str]]:
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, err.strip().splitlines()


def _assert_previous_checkpoint_is_newest_and_valid(work: Path, before: dict[str, str]) -> None:
    from gptforge.layout import latest_valid_checkpoint
    assert _checkpoints(work) == before  # step_2 and step_4 untouched, no step_6, no .tmp-*
    assert latest_valid_checkpoint(work / "run").name == "step_4"
    assert not [p for p in work.rglob(".tmp-*")]


@pytest.mark.parametrize("case", FULL_DISK_CASES)
def test_a_full_disk_in_safetensors_is_one_line_exit_2(case, prepared, tmp_path, monkeypatch, capsys):
    """safetensors raises its own SafetensorError (not an OSError) on ENOSPC: a 38-line traceback before."""
    from test_atomic import safetensors_full_disk

    argv, message = FULL_DISK_CASES[case]
    work = tmp_path / "work"
    shutil.copytree(prepared, work)
    monkeypatch.chdir(work)
    monkeypatch.setattr("safetensors.torch.serialize_file", safetensors_full_disk())
    before = _checkpoints(work)
    code, lines = _run_full_disk(argv, work, capsys)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"gptforge {argv[0]}: error: ") and message in lines[0], lines[0]
    _assert_previous_checkpoint_is_newest_and_valid(work, before)
    assert not (work / "o").exists()


def test_a_real_full_disk_while_training_and_exporting_is_one_line_exit_2(prepared, tmp_path, monkeypatch, capsys):
    """The same on a real full tmpfs (skipped where mount is not permitted): room for the logs and the plot, not
    for the step 6 checkpoint; then no room for an HF export."""
    from test_atomic import fill, tiny_tmpfs

    with tiny_tmpfs(tmp_path / "disk", "2m") as disk:
        work = disk / "work"
        shutil.copytree(prepared, work)
        monkeypatch.chdir(work)
        before = _checkpoints(work)
        fill(disk, 64 * 1024)  # loss.png (~35 KB, written beside the old one) fits; a checkpoint (~127 KB) does not
        code, lines = _run_full_disk(FULL_DISK_CASES["train-checkpoint"][0], work, capsys)
        assert code == 2 and len(lines) == 1, lines
        assert "run/checkpoints/step_6 (No space left on device)" in lines[0], lines[0]
        _assert_previous_checkpoint_is_newest_and_valid(work, before)
        (disk / "filler").unlink()
        fill(disk, 4096)  # not even the weights (~30 KB)
        code, lines = _run_full_disk(FULL_DISK_CASES["export-hf"][0], work, capsys)
        assert code == 2 and len(lines) == 1 and FULL_DISK_CASES["export-hf"][1] in lines[0], lines
        assert not (work / "o").exists() and not [p for p in work.rglob(".tmp-*")]
