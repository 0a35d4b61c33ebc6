"""The CLI's error contract: user mistakes (paths, --device, --dtype) end as one stderr line and exit 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gptforge.cli import describe_os_error
from gptforge.config import ModelConfig
from gptforge.devices import DTYPE_CHOICES, resolve_device, resolve_dtype
from gptforge.errors import UserError
from gptforge.model import GPT
from gptforge.weights import save_weights

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "gptforge", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=120)


def assert_one_line_error(proc: subprocess.CompletedProcess, command: str, *needles: str) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"gptforge {command}: error: "), lines
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def tiny_run(tmp_path) -> Path:
    """A checkpoint directory with a char tokenizer, and a small text file `t.txt` beside it."""
    from gptforge.tokenizer import CharTokenizer
    tok = CharTokenizer.train(["hello world, the quick brown fox"])
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16))
    save_weights(model, tmp_path / "ckpt" / "model.safetensors")
    tok.save(tmp_path / "ckpt" / "tokenizer")
    (tmp_path / "t.txt").write_text("hello world the quick brown fox " * 5)
    return tmp_path


def test_unwritable_output_path_is_one_line_naming_it(tiny_run):
    """Works as root too: no permission bits involved, a regular file stands where a folder must be."""
    (tiny_run / "afile").write_text("x")
    proc = run_cli("eval", "--model", "ckpt", "--task", "val", "--data", "t.txt", "--json", "afile/sub/r.json",
                   cwd=tiny_run)
    assert_one_line_error(proc, "eval", "--json afile/sub/r.json", "afile is a file, not a directory")
    assert (tiny_run / "afile").read_text() == "x"


def test_os_error_description_is_one_line():
    assert describe_os_error(PermissionError(13, "Permission denied", "/ro/x")) == "/ro/x: Permission denied"
    assert describe_os_error(OSError(28, "No space left on device")) == "No space left on device"
    assert describe_os_error(OSError("line one\nline two")) == "line one"


@pytest.mark.parametrize("command", ["eval", "sample"])
def test_unknown_device_is_refused_before_loading(tiny_run, command):
    task = ["--task", "val", "--data", "t.txt"] if command == "eval" else ["hi"]
    proc = run_cli(command, "--model", "ckpt", *task, "--device", "foo", cwd=tiny_run)
    assert_one_line_error(proc, command, "--device foo")


def test_fp16_on_cpu_is_refused_with_the_reason(tiny_run):
    proc = run_cli("eval", "--model", "ckpt", "--task", "val", "--data", "t.txt", "--device", "cpu",
                   "--dtype", "fp16", cwd=tiny_run)
    assert_one_line_error(proc, "eval", "--dtype fp16", "slower on the CPU")


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("foo", "meta", "cuda:99"):
        with pytest.raises(UserError, match=f"--device {bad}"):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="--device cuda: not available"):
            resolve_device("cuda")
    assert resolve_device("auto") == resolve_device(None)


def test_training_resolves_devices_by_the_same_rule_naming_its_option():
    from gptforge.training.precision import resolve_device as train_device
    assert train_device("auto") == resolve_device(None) and train_device("cpu") == torch.device("cpu")
    for bad in ("foo", "meta", "cuda:99"):
        with pytest.raises(UserError, match=f"^train.device {bad}: "):
            train_device(bad)


def test_resolve_dtype_spellings_and_defaults():
    cpu = torch.device("cpu")
    assert resolve_dtype(None, cpu) == torch.float32
    assert resolve_dtype(None, torch.device("cuda")) == torch.bfloat16
    for short, long, dtype in (("fp32", "float32", torch.float32), ("bf16", "bfloat16", torch.bfloat16)):
        assert resolve_dtype(short, cpu) == resolve_dtype(long, cpu) == dtype
    assert resolve_dtype("fp16", torch.device("cuda")) == resolve_dtype("float16", torch.device("cuda")) \
        == torch.float16
    for name in ("fp16", "float16"):
        with pytest.raises(UserError, match="slower on the CPU"):
            resolve_dtype(name, cpu)
    with pytest.raises(UserError, match="choose one of"):
        resolve_dtype("int8", cpu)


def test_eval_and_sample_accept_the_same_dtype_spellings():
    from gptforge.cli import build_parser
    subparsers = next(a for a in build_parser()._actions if a.dest == "command").choices
    for command in ("eval", "sample"):
        dtype = next(a for a in subparsers[command]._actions if a.dest == "dtype")
        assert tuple(dtype.choices) == DTYPE_CHOICES


def test_info_config_with_non_string_preset_is_one_line(tmp_path, capsys):
    from gptforge.cli import main
    config = tmp_path / "c.toml"
    config.write_text("[model]\npreset = 3\n")
    assert main(["info", "--config", str(config)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and str(config) in lines[0] and "preset must be a string" in lines[0], lines


def test_help_and_argument_parsing_import_no_torch():
    """`gptforge --help` must not pay torch's import (seconds): the package root and every command module
    import their heavy dependencies only when a command runs."""
    code = ("import sys\n"
            "import gptforge\n"
            "from gptforge.cli import build_parser\n"
            "parser = build_parser()\n"
            "for argv in (['sample', '--model', 'gpt2', 'hi'], ['eval', '--model', 'm', '--task', 'val'],\n"
            "             ['train', '--preset', 'gpt2'], ['info'], ['prepare', 'x', '--out', 'y']):\n"
            "    parser.parse_args(argv)\n"
            "heavy = sorted(m for m in ('torch', 'numpy', 'transformers', 'tiktoken') if m in sys.modules)\n"
            "assert not heavy, heavy\n"
            "print('ok')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
    proc = subprocess.run([sys.executable, "-m", "gptforge", "--help"], capture_output=True, text=True, env=env,
                          timeout=60)
    assert proc.returncode == 0 and "sample" in proc.stdout and "train" in proc.stdout


def test_ctrl_c_during_start_up_is_one_line(monkeypatch, capsys):
    from gptforge import cli

    def interrupted():
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert cli.main(["info"]) == cli.EXIT_INTERRUPTED
    assert capsys.readouterr().err.strip().splitlines() == ["gptforge: interrupted"]
