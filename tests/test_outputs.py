"""gptforge.outputs, the one guard for every output: what may be replaced, by which command, and what never is.

Unit checks of the rules (kinds, inputs, locks, non-regular paths, parents, leftovers), then each defect of
issue 22 that destroyed or redirected a run, reproduced through the real commands: every refusal is one line,
exit 2, naming the path and why, and leaves every byte of the user's work as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gptforge.cli import main
from gptforge.errors import UserError
from gptforge.outputs import (CHAT_RUN, EVAL_REPORT, GGUF_FILE, HF_EXPORT, PREPARED_DATA, RUN, TOKENIZER,
                              TRANSCRIPT, check_output, describe, remove_stale_temporaries)

REPO = Path(__file__).resolve().parents[1]
SHAPE = ["--set", "model.n_layer=1", "--set", "model.n_head=2", "--set", "model.n_embd=16",
         "--set", "model.block_size=96", "--set", "train.micro_batch_size=4", "--set", "train.device=cpu",
         "--set", "train.eval_every=2", "--set", "train.eval_batches=1", "--set", "train.checkpoint_every=2",
         "--set", "train.sample_every=1000", "--set", "train.warmup_steps=1"]


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under `root` with its bytes (lock files aside): what 'left as it was' compares."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def one_line_refusal(capsys, code: int, command: str, *needles: str) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith(f"gptforge {command}: error: "), lines
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# ---- a base run, chat data and a fine-tuned run, made once ----------------------------------------------

@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """runs/base (pretraining, 4 steps), data/text, data/chat (prepare --chat with the base's tokenizer),
    runs/chat (sft, 4 steps), exports/hf: the directories a careless user points commands at."""
    root = tmp_path_factory.mktemp("world")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        Path("corpus.txt").write_text("".join(f"what is {i % 9} plus {i % 7}? it is {i % 9 + i % 7}.\n"
                                              for i in range(600)) + "systemuserassistant\n")
        chats = [{"messages": [{"role": "user", "content": f"what is {a} plus {b}?"},
                               {"role": "assistant", "content": f"it is {a + b}."}]}
                 for a in range(9) for b in range(7)]
        Path("chats.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
        assert main(["prepare", "corpus.txt", "--tokenizer", "bpe:300", "--out", "data/text", "--quiet",
                     "--workers", "1"]) == 0
        assert main(["train", "--data", "data/text", "--out", "runs/base", "--set", "train.max_steps=4",
                     *SHAPE]) == 0
        assert main(["prepare", "chats.jsonl", "--chat", "--tokenizer", "runs/base", "--out", "data/chat",
                     "--quiet"]) == 0
        assert main(["sft", "--model", "runs/base", "--data", "data/chat", "--out", "runs/chat",
                     "--set", "train.max_steps=4", "--set", "train.checkpoint_every=2",
                     "--set", "train.device=cpu"]) == 0
        assert main(["export", "--model", "runs/chat", "--format", "hf", "--out", "exports/hf"]) == 0
    finally:
        os.chdir(cwd)
    return root


@pytest.fixture
def here(world, tmp_path, monkeypatch) -> Path:
    """A private copy of the world as the working directory."""
    for name in ("runs", "data", "exports", "corpus.txt", "chats.jsonl"):
        source = world / name
        (shutil.copytree if source.is_dir() else shutil.copy2)(source, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


# ---- the rules --------------------------------------------------------------------------------------------

def test_each_kind_replaces_only_its_own_output_with_its_flag(here):
    assert describe("runs/base") == "a pretraining run" and describe("runs/chat") == "a fine-tuning (sft) run"
    assert describe("data/text") == "prepared data" and describe("runs/base/tokenizer") == "a tokenizer directory"
    assert check_output("data/text", PREPARED_DATA, replace=True) is True
    with pytest.raises(UserError, match="data/text is not empty; choose a new directory or pass --force"):
        check_output("data/text", PREPARED_DATA)
    for kind in (PREPARED_DATA, HF_EXPORT, TOKENIZER):
        with pytest.raises(UserError, match="runs/base is a pretraining run; only `gptforge train`/`sft` continue"):
            check_output("runs/base", kind, replace=True)
    with pytest.raises(UserError, match="holds prepared data, and --overwrite replaces only a tokenizer"):
        check_output("data/text", TOKENIZER, replace=True)
    with pytest.raises(UserError, match="runs/base/tokenizer lies inside the training run runs/base"):
        check_output("runs/base/tokenizer", TOKENIZER, replace=True)  # the run's own: not tokenizer train's
    assert check_output("runs/base", RUN, replace=True) and check_output("runs/chat", CHAT_RUN, replace=True)
    with pytest.raises(UserError, match="runs/base is a pretraining run; sft never continues or restarts one"):
        check_output("runs/base", CHAT_RUN, replace=True)
    with pytest.raises(UserError, match="data/chat holds prepared data, not a run"):
        check_output("data/chat", RUN, replace=True)
    Path("loose").mkdir()
    (Path("loose") / "notes.txt").write_text("mine")
    assert check_output("loose", RUN) is True  # a new run among the user's files: nothing is replaced
    with pytest.raises(UserError, match="holds files gptforge did not write, and --force replaces only prepared"):
        check_output("loose", PREPARED_DATA, replace=True)
    assert check_output("new/deeper/out", PREPARED_DATA) is False


def test_an_output_never_is_contains_or_lies_inside_an_input(here):
    inputs = {"--model": "runs/base/checkpoints/step_4", "--data": ["data/text"], "--tokenizer": "gpt2"}
    for out, why in (("runs/base/checkpoints/step_4", "is also --model"), ("runs", "contains --model"),
                     ("data/text/sub", "lies inside --data data/text"), ("./data/../data/text", "is also --data")):
        with pytest.raises(UserError, match=f"{why}.*a command never writes over what it reads"):
            check_output(out, HF_EXPORT, replace=True, inputs=inputs)
    os.symlink("runs/base", "alias")
    with pytest.raises(UserError, match="is also --model hf:alias"):
        check_output("runs/base", RUN, inputs={"--model": "hf:alias"})
    assert check_output("elsewhere", HF_EXPORT, inputs=inputs) is False  # gpt2, presets: not paths


def test_devices_pipes_and_links_are_never_replaced(here):
    os.mkfifo("pipe")
    os.symlink("data/text", "link")
    for path, kind in (("pipe", GGUF_FILE), ("pipe", PREPARED_DATA), ("/dev/null", GGUF_FILE)):
        with pytest.raises(UserError, match="is not a regular file or folder"):
            check_output(path, kind, replace=True)
    with pytest.raises(UserError, match="link is a symbolic link"):
        check_output("link", PREPARED_DATA, replace=True)
    os.symlink("runs/base", "run-link")
    assert check_output("run-link", RUN, replace=True) is True  # a run is opened through the link, never replaced


def test_a_path_another_live_process_holds_is_refused(here):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from gptforge.runlock import DirectoryLock; "
                               "DirectoryLock('runs/chat').acquire(); print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=rf"runs/chat: in use by another gptforge process \(PID {holder.pid}\)"):
            check_output("runs/chat", CHAT_RUN, replace=True)
    finally:
        holder.kill()
        holder.wait()
    assert check_output("runs/chat", CHAT_RUN, replace=True) is True  # the kernel dropped the dead holder's lock


def test_files_where_folders_should_be_and_transcripts(here):
    Path("afile").write_text("x")
    with pytest.raises(UserError, match="--out afile/sub: afile is a file, not a directory"):
        check_output("afile/sub", HF_EXPORT)
    with pytest.raises(UserError, match="/save afile already exists; choose a new name"):
        check_output("afile", TRANSCRIPT, option="/save")
    with pytest.raises(UserError, match="directory missing does not exist; gptforge does not create"):
        check_output("missing/talk.jsonl", TRANSCRIPT, option="/save")
    assert check_output("talk.jsonl", TRANSCRIPT, option="/save") is False
    Path("report.json").write_text(json.dumps({"version": 1, "metrics": {}, "tasks": {}}))
    assert check_output("report.json", EVAL_REPORT, replace=True, option="--json") is True
    with pytest.raises(UserError, match="corpus.txt is a file gptforge did not write"):
        check_output("corpus.txt", EVAL_REPORT, replace=True, option="--json")


def test_only_provably_stale_temporaries_are_removed(tmp_path):
    for name in (".tmp-out.abcd1234", ".tmp-out.old.k2j4h5g6", ".tmp-out.v2.abcd1234", ".tmp-out2.abcd1234",
                 ".tmp-other.abcd1234"):
        (tmp_path / name).mkdir()
    (tmp_path / ".tmp-out.zzzz9999").write_text("a file: a folder's writer never leaves one")
    # out is missing: the .old directory may hold the only copy of the previous data
    assert remove_stale_temporaries(tmp_path / "out") == [".tmp-out.abcd1234"]
    (tmp_path / "out").mkdir()
    assert remove_stale_temporaries(tmp_path / "out") == [".tmp-out.old.k2j4h5g6"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")) == [
        ".tmp-other.abcd1234", ".tmp-out.v2.abcd1234", ".tmp-out.zzzz9999", ".tmp-out2.abcd1234"]
    assert remove_stale_temporaries(tmp_path / "out", directory=False) == [".tmp-out.zzzz9999"]


# ---- the defects, through the commands (issue 22) ---------------------------------------------------------

def test_sft_resume_continues_the_directory_named_even_when_copied_or_moved(here, capsys):
    """#1: the copy's config.json names the original; the copy is what continues, the original is untouched
    (and, once moved away, not re-created from random weights)."""
    shutil.copytree("runs/chat", "copy")
    before = snapshot(Path("runs/chat"))
    assert main(["sft", "--out", "copy", "--resume", "--set", "train.max_steps=6"]) == 0
    assert (Path("copy") / "checkpoints" / "step_6").is_dir() and snapshot(Path("runs/chat")) == before
    shutil.move("runs/chat", "moved")
    assert main(["sft", "--out", "copy", "--resume", "--set", "train.max_steps=8"]) == 0
    assert (Path("copy") / "checkpoints" / "step_8").is_dir() and not Path("runs/chat").exists()
    shutil.copytree("runs/base", "base-copy")
    capsys.readouterr()
    code = main(["sft", "--out", "base-copy", "--resume"])
    one_line_refusal(capsys, code, "sft", "--out base-copy is a pretraining run; sft never continues")
    assert snapshot(Path("base-copy")) == snapshot(Path("runs/base"))


def test_sft_never_replaces_its_own_base_model(here, capsys):
    """#2"""
    before = snapshot(Path("runs/base"))
    code = main(["sft", "--model", "runs/base", "--data", "data/chat", "--out", "runs/base", "--fresh"])
    one_line_refusal(capsys, code, "sft", "--out runs/base is also --model runs/base")
    assert snapshot(Path("runs/base")) == before


def test_prepare_never_replaces_a_run_locked_or_not_nor_its_own_tokenizer_source(here, capsys):
    """#3"""
    before = snapshot(Path("runs/base"))
    code = main(["prepare", "corpus.txt", "--tokenizer", "char", "--out", "runs/base", "--force", "--quiet"])
    one_line_refusal(capsys, code, "prepare", "--out runs/base is a pretraining run")
    code = main(["prepare", "chats.jsonl", "--chat", "--tokenizer", "runs/chat", "--out", "runs/chat", "--force",
                 "--quiet"])
    one_line_refusal(capsys, code, "prepare", "--out runs/chat is also --tokenizer runs/chat")
    assert snapshot(Path("runs/base")) == before
    code = main(["prepare", "corpus.txt", "--tokenizer", "char", "--out", "data", "--force", "--quiet"])
    one_line_refusal(capsys, code, "prepare", "--out data holds files gptforge did not write")
    assert main(["prepare", "corpus.txt", "--tokenizer", "char", "--out", "data/text", "--force", "--quiet",
                 "--workers", "1"]) == 0  # prepared data replaces prepared data


def test_export_never_replaces_its_model_a_run_or_a_device_and_cleans_its_leftovers(here, capsys):
    """#4, the litter of a killed export, and `--out FILE/sub`"""
    before = snapshot(Path("runs/chat"))
    code = main(["export", "--model", "runs/chat", "--format", "hf", "--out", "runs/chat", "--force"])
    one_line_refusal(capsys, code, "export", "--out runs/chat is also --model runs/chat")
    code = main(["export", "--model", "runs/chat", "--format", "hf", "--out", "runs/base", "--force"])
    one_line_refusal(capsys, code, "export", "--out runs/base is a pretraining run")
    assert snapshot(Path("runs/chat")) == before
    code = main(["export", "--model", "runs/chat", "--format", "gguf", "--out", "/dev/full", "--force"])
    one_line_refusal(capsys, code, "export", "--out /dev/full is not a regular file or folder")
    assert Path("/dev/full").is_char_device()
    code = main(["export", "--model", "runs/chat", "--format", "gguf", "--out", "corpus.txt/m.gguf"])
    one_line_refusal(capsys, code, "export", "corpus.txt is a file, not a directory")
    Path(".tmp-m.gguf.abcd1234").write_bytes(b"GGUF half")  # what a SIGKILLed export leaves
    assert main(["export", "--model", "runs/chat", "--format", "gguf", "--out", "m.gguf"]) == 0
    assert "removed 1 temporary file(s) left by an interrupted export into m.gguf" in capsys.readouterr().err
    assert not Path(".tmp-m.gguf.abcd1234").exists() and Path("m.gguf").read_bytes()[:4] == b"GGUF"
    code = main(["export", "--model", "runs/chat", "--format", "gguf", "--out", "corpus.txt", "--force"])
    one_line_refusal(capsys, code, "export", "--out corpus.txt is a file gptforge did not write")
    assert main(["export", "--model", "runs/chat", "--format", "gguf", "--out", "m.gguf", "--force"]) == 0


def test_chat_save_never_replaces_a_file_nor_creates_folders(here):
    """#8"""
    from gptforge.chat.session import ChatSession
    from gptforge.loading import load_model

    model, tokenizer = load_model("runs/chat")
    session = ChatSession(model, tokenizer)
    Path("notes.txt").write_text("mine")
    with pytest.raises(UserError, match="/save notes.txt already exists; choose a new name"):
        session.save("notes.txt")
    with pytest.raises(UserError, match="does not exist; gptforge does not create directories"):
        session.save("no/such/talk.jsonl")
    assert Path("notes.txt").read_text() == "mine" and not Path("no").exists()
    assert json.loads(session.save("talk.jsonl").read_text()) == {"messages": []}


# ---- a careless user: each line refused in one line, nothing of the user's changed -------------------------

CARELESS = [
    ("prepare", "corpus.txt --tokenizer char --out runs/base --force", "--out runs/base is a pretraining run"),
    ("prepare", "chats.jsonl --chat --tokenizer runs/chat --out runs/chat --force", "is also --tokenizer runs/chat"),
    ("prepare", "chats.jsonl --chat --tokenizer runs/base --out runs/base/tokenizer --force", "lies inside --tokeniz"),
    ("prepare", "chats.jsonl --chat --tokenizer runs/base/tokenizer --out runs --force", "contains --tokenizer"),
    ("prepare", "corpus.txt --tokenizer char --out runs/chat/data", "lies inside the training run runs/chat"),
    ("prepare", ". --tokenizer char --out data/new", "lies inside SOURCE ."),
    ("prepare", "corpus.txt --tokenizer char --out data --force", "--out data holds files gptforge did not write"),
    ("prepare", "corpus.txt --tokenizer char --out exports/hf --force", "holds a Hugging Face export, and --force"),
    ("prepare", "corpus.txt --tokenizer char --out corpus.txt", "--out corpus.txt is also SOURCE corpus.txt"),
    ("prepare", "chats.jsonl --chat --tokenizer runs/base --out corpus.txt --force", "is a file; give a folder"),
    ("export", "--model runs/chat --format hf --out runs/chat --force", "is also --model runs/chat"),
    ("export", "--model runs/chat --format hf --out runs/base --force", "--out runs/base is a pretraining run"),
    ("export", "--model runs/chat --format hf --out data/text --force", "holds prepared data, and --force"),
    ("export", "--model runs/chat --format hf --out runs/chat/hf", "lies inside --model runs/chat"),
    ("export", "--model runs/chat --format hf --out runs/base/hf", "lies inside the training run runs/base"),
    ("export", "--model exports/hf --format hf --out exports/hf --force", "is also --model exports/hf"),
    ("export", "--model hf:exports/hf --format hf --out exports --force", "contains --model hf:exports/hf"),
    ("export", "--model runs/chat --format hf --out exports/hf", "is not empty; choose a new directory or pass"),
    ("export", "--model runs/chat --format gguf --out /dev/full --force", "is not a regular file or folder"),
    ("export", "--model runs/chat --format gguf --out corpus.txt --force", "is a file gptforge did not write"),
    ("export", "--model runs/chat --format gguf --out corpus.txt/m.gguf", "corpus.txt is a file, not a directory"),
    ("export", "--model runs/chat --format gguf --out exports/hf --force", "exports/hf is a directory"),
    ("import-hf", "exports/hf --out runs/base --force", "--out runs/base is a pretraining run"),
    ("import-hf", "exports/hf --out exports/hf --force", "is also SOURCE exports/hf"),
    ("sft", "--model runs/base --data data/chat --out runs/base --fresh", "is also --model runs/base"),
    ("sft", "--model runs/base --data data/chat --out data/chat --fresh", "is also --data data/chat"),
    ("sft", "--model runs/base --data data/chat --out runs/chat/sub", "lies inside the training run runs/chat"),
    ("sft", "--model runs/base --data data/chat --out exports/hf", "holds a Hugging Face export, not a run"),
    ("sft", "--out runs/base --resume", "--out runs/base is a pretraining run; sft never continues"),
    ("sft", "--model runs/base --data data/chat --out runs/base", "--out runs/base is also --model"),
    ("train", "--data data/text --out data/text", "--out data/text is also --data data/text"),
    ("train", "--data data/text --out data/chat --fresh", "--out data/chat holds prepared data, not a run"),
    ("train", "--init runs/base --data data/text --out runs/base --fresh", "is also --init runs/base"),
    ("train", "--data data/text --out runs/base/checkpoints", "lies inside the training run runs/base"),
    ("tokenizer", "train corpus.txt --vocab-size 300 --out runs/base/tokenizer --overwrite",
     "lies inside the training run runs/base"),
    ("tokenizer", "train corpus.txt --vocab-size 300 --out data/text --overwrite", "holds prepared data, and"),
    ("tokenizer", "train . --vocab-size 300 --out tok", "--out tok lies inside SOURCE ."),
    ("eval", "--model runs/chat --task val --data data/chat --json corpus.txt", "is a file gptforge did not write"),
    ("eval", "--model runs/chat --task val --data data/chat --json runs/chat", "--json runs/chat is also --model"),
    ("consolidate", "runs/base --out corpus.txt", "--out corpus.txt already exists; choose a new name"),
]


@pytest.mark.parametrize("command,args,why", CARELESS, ids=[f"{c} {a}" for c, a, _ in CARELESS])
def test_a_careless_user_loses_nothing(here, capsys, command, args, why):
    before = snapshot(here)
    code = main([command, *args.split()])
    one_line_refusal(capsys, code, command.split()[0], why)
    assert snapshot(here) == before
