"""The one guard for every path a command writes or replaces: what may be replaced, and by whom.

Every command that writes an output (`prepare [--chat]`, `train`/`sft`, `export`, `import-hf`, `consolidate`,
`tokenizer train`, `eval --json`, `chat`'s /save) asks `check_output` first, so that one set of rules, not one
per command, stands between a typo and a user's lost work:

- `--force` / `--overwrite` / `--fresh` replace only what the command itself makes: prepared data may replace
  prepared data, an export an export of the same format, a run restart a run. A training run is never
  replaced by anything else, and a directory of files gptforge did not write is never replaced at all.
- An output never is, contains, or lies inside an input of the same command (`--model`, `--data`,
  `--tokenizer`, `--init`, the sources): replacing it would destroy what the command is reading.
- A path another live gptforge process holds (its run lock, or the lock a writer keeps beside its output)
  is never touched.
- Only regular files and directories are replaced: never a device, a pipe, a socket, or a symbolic link
  (replacing the link would not replace what it points to, and the user meant the latter or neither).
- A missing parent folder is created, except where the kind says not to (a chat transcript); a file where
  a folder should be is named in one line.

Each refusal is a UserError naming the path and why (one line, exit 2). `owned_output` wraps the whole
write for outputs replaced by rename: a lock beside the output (one writer at a time), removal of the
temporaries a killed writer left, the check, and an atomic directory or file that becomes the output only
when complete. A bottom-floor module: standard library, `layout`, `atomic`, `runlock` and `errors` only.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

from .atomic import TMP_PREFIX, atomic_directory, atomic_file
from .errors import UserError
from .layout import (CHAT_DATA_KIND, CHECKPOINTS_DIR, LOCK_FILE, MANIFEST_FILE, RUN_CONFIG_FILE, WEIGHTS_FILE,
                     is_data_dir, is_run_dir, output_lock_file)
from .runlock import DirectoryLock

_READ_LIMIT = 1 << 20  # recognisers read at most this much of a JSON file (a config is a few KB)


def _json_object(path: Path) -> dict | None:
    """The JSON object in `path`, or None when it is not a small readable JSON object."""
    try:
        if not path.is_file() or path.stat().st_size > _READ_LIMIT:
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _is_run(path: Path) -> bool:
    """A gptforge run: checkpoints/ beside config.json, or a run config.json alone (a run stopped before
    its first checkpoint is still a run: its tokenizer and logs are the user's)."""
    if is_run_dir(path):
        return True
    config = _json_object(path / RUN_CONFIG_FILE)
    return config is not None and {"model", "train", "data"} <= config.keys()


def run_data_kind(path: Path) -> str | None:
    """"chat" for a fine-tuning run, "plain" for a pretraining run, None when its data cannot be read (moved
    away, say): a run's kind is the kind of the data it trains on, as the trainer's batch source decides."""
    config = _json_object(path / RUN_CONFIG_FILE) or {}
    data = config.get("data")
    data_path = data.get("path") if isinstance(data, dict) else None
    if not isinstance(data_path, str):
        return None
    manifest = _json_object(Path(data_path) / MANIFEST_FILE)
    if manifest is None:
        return None
    return CHAT_DATA_KIND if manifest.get("kind") == CHAT_DATA_KIND else "plain"


def _is_chat_run(path: Path) -> bool:
    return _is_run(path) and run_data_kind(path) != "plain"


def _is_hf_export(path: Path) -> bool:
    config = _json_object(path / RUN_CONFIG_FILE)  # transformers' config.json: same name, other contents
    return (config is not None and ("model_type" in config or "architectures" in config)
            and not (path / CHECKPOINTS_DIR).exists())


def _is_model_dir(path: Path) -> bool:
    """`gptforge import-hf`'s output: weights (and a tokenizer) without a run's config or checkpoints."""
    return (path / WEIGHTS_FILE).is_file() and not _is_run(path) and not _is_hf_export(path)


def _is_tokenizer_dir(path: Path) -> bool:
    config = _json_object(path / "tokenizer_config.json")
    return config is not None and "kind" in config


def _starts_with(magic: bytes) -> Callable[[Path], bool]:
    def recognise(path: Path) -> bool:
        try:
            with open(path, "rb") as f:
                return f.read(len(magic)) == magic
        except OSError:
            return False
    return recognise


def _is_safetensors(path: Path) -> bool:
    """safetensors: an 8-byte little-endian header length, then a JSON header starting with '{'."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size


def _is_eval_report(path: Path) -> bool:
    report = _json_object(path)
    return report is not None and {"metrics", "tasks"} <= report.keys()


def _never(path: Path) -> bool:
    return False


@dataclass(frozen=True)
class OutputKind:
    """What a command makes. `recognises` says whether an existing path is one (so the command may replace
    it); `replace_flag` is the option that allows replacing (None: never replaced); `is_run` marks a run
    directory, which is opened in place (resumed or restarted by the trainer), never replaced by rename."""
    noun: str
    is_directory: bool
    recognises: Callable[[Path], bool]
    replace_flag: str | None = "--force"
    creates_parents: bool = True
    is_run: bool = False


RUN = OutputKind("a training run", True, _is_run, "--fresh", is_run=True)
CHAT_RUN = OutputKind("a fine-tuning (sft) run", True, _is_chat_run, "--fresh", is_run=True)
PREPARED_DATA = OutputKind("prepared data", True, is_data_dir)
HF_EXPORT = OutputKind("a Hugging Face export", True, _is_hf_export)
MODEL_DIR = OutputKind("an imported model (import-hf)", True, _is_model_dir)
TOKENIZER = OutputKind("a tokenizer directory", True, _is_tokenizer_dir, "--overwrite")
GGUF_FILE = OutputKind("a GGUF file", False, _starts_with(b"GGUF"))
WEIGHTS_FILE_KIND = OutputKind("a safetensors weights file", False, _is_safetensors, None)
EVAL_REPORT = OutputKind("an evaluation report", False, _is_eval_report)
TRANSCRIPT = OutputKind("a chat transcript", False, _never, None, creates_parents=False)

# How an existing path is described in a refusal; runs first (a run's config.json is no HF config)
_DESCRIBED = (PREPARED_DATA, HF_EXPORT, TOKENIZER, MODEL_DIR, GGUF_FILE, EVAL_REPORT)


def describe(path: str | os.PathLike) -> str | None:
    """What gptforge output `path` is ("a pretraining run", "prepared data", ...), or None."""
    path = Path(path)
    if path.is_dir() and _is_run(path):
        return {CHAT_DATA_KIND: "a fine-tuning (sft) run", "plain": "a pretraining run"}.get(
            run_data_kind(path) or "", "a training run")
    for kind in _DESCRIBED:
        if path.is_dir() == kind.is_directory and kind.recognises(path):
            return kind.noun
    return None


# ---- inputs ---------------------------------------------------------------------------------------------

Inputs = Mapping[str, "str | os.PathLike | Sequence[str | os.PathLike] | None"]


def input_path(spec: str | os.PathLike) -> Path | None:
    """The local path an input names (`hf:DIR` is DIR), or None for what is not a path here (a preset,
    `gpt2`, `builtin:NAME`, a hub id)."""
    text = os.fspath(spec)
    if text.startswith("hf:"):
        text = text[3:]
    elif re.match(r"^[a-z]+:", text) and not Path(text).exists():
        return None
    path = Path(text)
    return path if text and (path.exists() or path.is_symlink()) else None


def _within(inner: str, outer: str) -> bool:
    return inner != outer and inner.startswith(outer.rstrip(os.sep) + os.sep)


def _check_inputs(path: Path, inputs: Inputs, option: str) -> None:
    out = os.path.realpath(path)
    for input_option, specs in inputs.items():
        if specs is None:
            continue
        for spec in [specs] if isinstance(specs, (str, os.PathLike)) else specs:
            source = input_path(spec)
            if source is None:
                continue
            real = os.path.realpath(source)
            named = f"{input_option} {os.fspath(spec)}"
            if real == out:
                why = f"is also {named}"
            elif _within(real, out):
                why = f"contains {named}"
            elif _within(out, real):
                why = f"lies inside {named}"
            else:
                continue
            raise UserError(f"{option} {path} {why}: a command never writes over what it reads; choose another "
                            f"{option}")


# ---- locks ----------------------------------------------------------------------------------------------


def lock_holder(lock_file: Path) -> str | None:
    """The PID (as text) of the live process holding `lock_file`'s flock, else None. Never creates the file.
    The kernel drops a dead holder's lock, so a file left by a killed process reads as free."""
    try:
        fd = os.open(lock_file, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return os.read(fd, 64).decode(errors="replace").strip() or "unknown"
    except OSError:
        return None
    finally:
        os.close(fd)  # closing drops the shared lock we may have taken
    return None


def _check_not_locked(path: Path, option: str) -> None:
    for lock_file in (path / LOCK_FILE, output_lock_file(path)):
        holder = lock_holder(lock_file)
        if holder is not None:
            raise UserError(f"{option} {path}: in use by another gptforge process (PID {holder}); wait for it to "
                            f"finish or stop it, or choose another {option}")


# ---- the check ------------------------------------------------------------------------------------------


def _check_parents(path: Path, kind: OutputKind, option: str) -> None:
    """Missing parents are created (unless the kind says not to); a file where a folder should be, or a run
    around a new folder (the trainer's directory: its tokenizer/ or checkpoints/ are not another command's
    to replace, and --fresh would carry a nested output away), is refused."""
    ancestor = path.parent
    while not (ancestor.exists() or ancestor.is_symlink()) and ancestor != ancestor.parent:
        if not kind.creates_parents:
            raise UserError(f"{option} {path}: directory {path.parent} does not exist; gptforge does not create "
                            "directories here, choose an existing one")
        ancestor = ancestor.parent
    if ancestor.exists() and not ancestor.is_dir():
        raise UserError(f"{option} {path}: {ancestor} is a file, not a directory; choose another path")
    if kind.is_directory:
        for around in [ancestor, *ancestor.parents]:
            if around.is_dir() and _is_run(around):
                raise UserError(f"{option} {path} lies inside the training run {around}; write it outside the run")


def _check_same_filesystem(path: Path, option: str) -> None:
    """Refuse a folder on another filesystem than its parent (a mount point, typically).

    The new version is built in a temporary folder beside `path`, on the parent's filesystem, and renamed
    over `path` at the end; that rename fails across a filesystem boundary (EXDEV, or EBUSY for a mount
    point), which would throw the whole work away. A subfolder of the mount has no such boundary."""
    absolute = Path(os.path.abspath(path))
    try:
        crosses = os.path.ismount(absolute) or os.stat(absolute).st_dev != os.stat(absolute.parent).st_dev
    except OSError:
        return  # unreadable: the lock and the temporary folder report it in their own words
    if crosses:
        raise UserError(f"{option} {path} is a mount point (or on another filesystem than {absolute.parent}), "
                        "and gptforge replaces an output by renaming a finished folder into place, which cannot "
                        f"cross filesystems; pass a subfolder, e.g. {option} {path / 'out'}")


def _refuse_existing(path: Path, kind: OutputKind, option: str, existing: str | None, replace: bool) -> None:
    flag = kind.replace_flag
    if kind.is_directory and _is_run(path):
        raise UserError(f"{option} {path} is {existing}; only `gptforge train`/`sft` continue or restart a run "
                        f"and this command never replaces one: choose another {option}")
    if not replace:
        if flag is None:
            raise UserError(f"{option} {path} already exists; choose a new name")
        what = "is not empty; choose a new directory" if kind.is_directory else "already exists; choose a new path"
        raise UserError(f"{option} {path} {what} or pass {flag} to replace it")
    if kind.is_directory:
        what = f"holds {existing or 'files gptforge did not write'}"
    else:
        what = f"is {existing or 'a file gptforge did not write'}"
    raise UserError(f"{option} {path} {what}, and {flag or 'this command'} replaces only {kind.noun}; "
                    f"choose another {option} (or move it away yourself)")


def check_output(path: str | os.PathLike, kind: OutputKind, *, replace: bool = False, inputs: Inputs | None = None,
                 option: str = "--out", check_locks: bool = True) -> bool:
    """Whether `path` exists and may be replaced (True) or is free (False); a UserError when it may not be
    written at all. `replace`: the user passed the kind's replace flag (for a run: --fresh or --resume, the
    run is continued or restarted in place). `check_locks=False` only for a caller that holds the lock
    beside `path` itself (see `owned_output`)."""
    path = Path(path)
    _check_inputs(path, inputs or {}, option)
    _check_parents(path, kind, option)
    if check_locks:  # a writer's lock beside `path` exists while `path` itself may not yet
        _check_not_locked(path, option)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return False
    if stat.S_ISLNK(mode):
        if not kind.is_run:  # a run is opened in place, through the link; anything else would replace the link
            raise UserError(f"{option} {path} is a symbolic link; gptforge replaces only regular files and "
                            "folders: pass the path it points to, or another")
        mode = os.stat(path).st_mode
    if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
        raise UserError(f"{option} {path} is not a regular file or folder (a device, pipe or socket); choose "
                        "another path")
    is_dir = stat.S_ISDIR(mode)
    if is_dir != kind.is_directory:
        raise UserError(f"{option} {path} is a folder; give a file name" if is_dir
                        else f"{option} {path} is a file; give a folder path")
    existing = describe(path)
    if kind.is_run:
        if existing is None or kind.recognises(path):
            return True  # a new run among loose files, or a run the trainer will continue or restart
        if _is_run(path) and run_data_kind(path) == "plain":
            raise UserError(f"{option} {path} is a pretraining run; sft never continues or restarts one (resume "
                            f"it with `gptforge train --out {path} --resume`): choose another {option}")
        raise UserError(f"{option} {path} holds {existing}, not a run; choose another {option}")
    if is_dir:
        _check_same_filesystem(path, option)
        if not any(path.iterdir()):
            return True  # an empty folder: nothing to lose
    if replace and kind.recognises(path):
        return True  # its own earlier output (without a flag for eval's report: `replace` is the caller's word)
    _refuse_existing(path, kind, option, existing, replace)
    raise AssertionError("unreachable")


# ---- writing through the guard ---------------------------------------------------------------------------


def remove_stale_temporaries(path: Path, directory: bool = True) -> list[str]:
    """Delete the temporaries a killed writer of `path` left beside it; return their names.

    Call only while holding `path`'s lock (`owned_output`): every writer of `path` holds it while its
    temporary exists, so any temporary of `path` found then belongs to a process that is gone (SIGKILL,
    power loss). The `.old` copy of an interrupted replace holds the previous version; it goes only when
    `path` itself exists again (the replace had finished), so nothing is deleted that is not replaced.
    """
    parent = path.parent
    if not parent.is_dir():
        return []
    ours = re.compile(rf"^{re.escape(TMP_PREFIX + path.name)}\.(old\.)?[a-z0-9_]{{8}}$")
    removed = []
    for child in parent.iterdir():
        match = ours.match(child.name)
        if not match or child.is_symlink() or child.is_dir() != directory:
            continue  # a writer of a folder leaves folders, of a file files: anything else is not ours
        if match.group(1) and not path.exists():
            continue
        if directory:
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)
        removed.append(child.name)
    return sorted(removed)


@contextlib.contextmanager
def owned_output(path: str | os.PathLike, kind: OutputKind, *, replace: bool = False, inputs: Inputs | None = None,
                 option: str = "--out", command: str = "write") -> Iterator[Path]:
    """Write `path` as one owner: lock it (a second writer fails in one line naming this PID), remove what
    killed writers left, check it may be written, and yield a temporary directory (or file) that becomes
    `path` only when the block completes (an error or a signal leaves `path` as it was). `command` names the
    writer in what it prints ("prepare", "export")."""
    path = Path(path)
    check_output(path, kind, replace=replace, inputs=inputs, option=option)  # before the lock creates folders
    lock = DirectoryLock(path.parent, what=kind.noun, option=option, lock_name=output_lock_file(path).name,
                         shown=path, remove_on_release=True)
    with lock:
        removed = remove_stale_temporaries(path, kind.is_directory)
        if removed:
            what = "director(ies)" if kind.is_directory else "file(s)"
            print(f"gptforge {command}: removed {len(removed)} temporary {what} left by an interrupted {command} "
                  f"into {path}", file=sys.stderr)
        replacing = check_output(path, kind, replace=replace, inputs=inputs, option=option, check_locks=False)
        if kind.is_directory:
            with atomic_directory(path, overwrite=replacing) as tmp:
                yield tmp
        else:
            with atomic_file(path) as tmp:
                yield tmp
