"""GPT-2's byte-level BPE (tiktoken), working offline from a local ranks file.

`tiktoken.get_encoding("gpt2")` downloads its vocabulary on first use, which fails on the offline machines
we train on. The same 50,256 merge ranks ship on PyPI inside the `openai-whisper` source distribution as
`whisper/assets/gpt2.tiktoken` (byte-identical to tiktoken's r50k_base file), so the registry that installs
gptforge can also deliver them: `gptforge tokenizer fetch-gpt2`. Every copy is checked against its sha256.

Where the file is looked for, in order: `$GPTFORGE_GPT2_RANKS`; `<cache>/gpt2.tiktoken` where <cache> is
`$GPTFORGE_CACHE` or `~/.cache/gptforge`; then, unless `GPTFORGE_OFFLINE=1`, tiktoken's own download
(the result is stored in the cache so the next run is offline).
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import write_bytes
from ..errors import UserError
from ..user_cache import ENV_CACHE, cache_dir  # noqa: F401  (ENV_CACHE: named here too, beside ENV_RANKS)
from .base import EOT, Tokenizer, check_special_tokens

GPT2_RANKS_FILE = "gpt2.tiktoken"
GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
GPT2_EOT_ID = 50256
# GPT-2's pre-tokenization regex: contractions, letter runs, digit runs, punctuation runs, each optionally
# led by one space; whitespace not followed by text. Written as tiktoken's r50k_pat_str does, with possessive
# quantifiers (faster, same splits as GPT-2's original `...|\s+(?!\S)|\s+`).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
WHISPER_SDIST_MEMBER = "whisper/assets/gpt2.tiktoken"
ENV_RANKS = "GPTFORGE_GPT2_RANKS"
ENV_OFFLINE = "GPTFORGE_OFFLINE"

HOW_TO_GET = (f"run `gptforge tokenizer fetch-gpt2` (gets it through pip from the openai-whisper sdist) or set "
              f"{ENV_RANKS}=/path/to/gpt2.tiktoken")


def _offline() -> bool:
    return os.environ.get(ENV_OFFLINE, "").strip().lower() in ("1", "true", "yes", "on")


def parse_ranks(data: bytes, source: str) -> dict[bytes, int]:
    """Parse and verify a GPT-2 ranks file (lines of `base64(token) rank`), or raise a UserError naming it."""
    digest = hashlib.sha256(data).hexdigest()
    if digest != GPT2_RANKS_SHA256:
        raise UserError(f"GPT-2 ranks file {source} is damaged or not GPT-2's (sha256 {digest[:12]}…, expected "
                        f"{GPT2_RANKS_SHA256[:12]}…); delete it and {HOW_TO_GET}")
    # Verified, so exactly GPT-2's `token rank` lines: split once and decode in C (3x faster than line by line,
    # ~0.06 s of every `sample` start-up on a 2-core CPU).
    fields = data.split()
    return dict(zip(map(binascii.a2b_base64, fields[0::2]), map(int, fields[1::2])))


@functools.lru_cache(maxsize=4)
def _read_ranks_cached(path: str, mtime_ns: int, size: int) -> dict[bytes, int]:
    del mtime_ns, size  # part of the cache key only: a replaced file is read again
    return parse_ranks(Path(path).read_bytes(), path)


def read_ranks(path: str | Path) -> dict[bytes, int]:
    """The verified ranks in `path` (parsed once per process and file version)."""
    path = Path(path)
    try:
        stat = path.stat()
    except OSError as e:
        raise UserError(f"GPT-2 ranks file {path} cannot be read ({e.strerror}); {HOW_TO_GET}") from None
    return _read_ranks_cached(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


def _download_with_tiktoken(dest: Path) -> Path:
    """Online fallback: let tiktoken download GPT-2's vocabulary, then store it as a ranks file in the cache."""
    import tiktoken

    try:
        encoding = tiktoken.get_encoding("gpt2")
    except Exception as e:  # network errors of every library tiktoken may use
        raise UserError(f"GPT-2 ranks file not found and tiktoken could not download it ({type(e).__name__}); "
                        f"{HOW_TO_GET}") from None
    lines = [base64.b64encode(encoding.decode_single_token_bytes(rank)) + b" " + str(rank).encode()
             for rank in range(GPT2_EOT_ID)]
    data = b"\n".join(lines) + b"\n"
    parse_ranks(data, "downloaded by tiktoken")
    write_bytes(dest, data)
    return dest


def find_gpt2_ranks(allow_download: bool | None = None) -> Path:
    """Path of a verified GPT-2 ranks file: env var, then cache, then (online) tiktoken's download.

    `allow_download=None` means "unless GPTFORGE_OFFLINE is set".
    """
    env = os.environ.get(ENV_RANKS)
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise UserError(f"{ENV_RANKS}={env} is not a file; point it at gpt2.tiktoken or unset it and "
                            "run `gptforge tokenizer fetch-gpt2`")
        return path
    cached = cache_dir() / GPT2_RANKS_FILE
    if cached.is_file():
        return cached
    if allow_download is None:
        allow_download = not _offline()
    if not allow_download:
        raise UserError(f"GPT-2 ranks file not found ({ENV_RANKS} unset, no {cached}); {HOW_TO_GET}")
    return _download_with_tiktoken(cached)


# ---- fetching through pip -------------------------------------------------------------------------------


def ranks_from_sdist(sdist: str | Path) -> bytes:
    """Read and verify `whisper/assets/gpt2.tiktoken` from an openai-whisper source archive (never extracted)."""
    sdist = Path(sdist)
    try:
        if sdist.name.endswith(".zip"):
            with zipfile.ZipFile(sdist) as archive:
                names = [n for n in archive.namelist() if n.endswith("/" + WHISPER_SDIST_MEMBER)]
                data = archive.read(names[0]) if names else None
        else:
            with tarfile.open(sdist, "r:*") as archive:
                members = [m for m in archive.getmembers()
                           if m.isfile() and m.name.endswith("/" + WHISPER_SDIST_MEMBER)]
                handle = archive.extractfile(members[0]) if members else None
                data = handle.read() if handle else None
    except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError) as e:
        raise UserError(f"{sdist} is not a readable source archive ({e}); run the fetch again") from None
    if data is None:
        raise UserError(f"{sdist} has no {WHISPER_SDIST_MEMBER}; set {ENV_RANKS} to a gpt2.tiktoken you have")
    parse_ranks(data, f"{sdist}:{WHISPER_SDIST_MEMBER}")
    return data


def _pip_download_whisper(directory: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--disable-pip-version-check", "openai-whisper", "-d", str(directory)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise UserError(f"pip could not download the openai-whisper sdist ({last}); check access to the package "
                        f"index, or set {ENV_RANKS}=/path/to/gpt2.tiktoken")
    archives = sorted(p for p in directory.iterdir() if p.name.startswith(("openai_whisper", "openai-whisper")))
    if not archives:
        raise UserError(f"pip reported success but left no openai-whisper archive in {directory}; "
                        f"set {ENV_RANKS}=/path/to/gpt2.tiktoken instead")
    return archives[0]


def fetch_gpt2_ranks(force: bool = False, dest: str | Path | None = None) -> Path:
    """Obtain GPT-2's ranks through pip (openai-whisper sdist), verify sha256, store atomically; return the path.

    Needs only the package index, which every installation of gptforge already reached.
    """
    dest = Path(dest) if dest is not None else cache_dir() / GPT2_RANKS_FILE
    if dest.is_file() and not force:
        parse_ranks(dest.read_bytes(), str(dest))  # an existing copy must still be intact
        return dest
    with tempfile.TemporaryDirectory(prefix="gptforge-whisper-") as tmp:
        data = ranks_from_sdist(_pip_download_whisper(Path(tmp)))
    write_bytes(dest, data)
    return dest


# ---- the tokenizer ---------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _encoding(ranks_path: str, mtime_ns: int, size: int, specials: tuple[tuple[str, int], ...]) -> Any:
    import tiktoken

    ranks = _read_ranks_cached(ranks_path, mtime_ns, size)
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens=dict(specials))


class GPT2Tokenizer(Tokenizer):
    """GPT-2's tokenizer: 50,257 ids, `<|endoftext|>` = 50256; added special tokens get 50257, 50258, ..."""

    kind = "gpt2"

    def __init__(self, ranks_path: str | Path | None = None, special_tokens: dict[str, int] | None = None) -> None:
        super().__init__(special_tokens or {EOT: GPT2_EOT_ID})
        if self._special[EOT] != GPT2_EOT_ID:
            raise UserError(f"a gpt2 tokenizer's {EOT} must be id {GPT2_EOT_ID}, got {self._special[EOT]}")
        self.ranks_path = Path(ranks_path) if ranks_path is not None else find_gpt2_ranks()
        read_ranks(self.ranks_path)  # verify now, with a clear error
        self._build()

    def _build(self) -> None:
        stat = self.ranks_path.stat()
        self._enc = _encoding(str(self.ranks_path.resolve()), stat.st_mtime_ns, stat.st_size,
                              tuple(sorted(self._special.items(), key=lambda kv: kv[1])))

    @property
    def encoding(self) -> Any:
        """The underlying `tiktoken.Encoding` (for callers that want tiktoken's own API)."""
        return self._enc

    @property
    def vocab_size(self) -> int:
        return self._enc.n_vocab

    def _encode_ordinary(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def encode_ordinary_array(self, text: str) -> np.ndarray:
        return self._enc.encode_to_numpy(text, disallowed_special=())  # no special set allowed: all plain text

    def _encode_ordinary_batch(self, texts: list[str]) -> list[list[int]]:
        return self._enc.encode_ordinary_batch(texts, num_threads=min(8, os.cpu_count() or 1))

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        self._check_ids(ids)
        return self._enc.decode_bytes(ids)

    def _add_special(self, token: str) -> int:
        new_id = self.vocab_size
        specials = {**self._special, token: new_id}
        stat = self.ranks_path.stat()
        self._enc = _encoding(str(self.ranks_path.resolve()), stat.st_mtime_ns, stat.st_size,
                              tuple(sorted(specials.items(), key=lambda kv: kv[1])))
        return new_id

    def _save_files(self, directory: Path) -> dict[str, Any]:
        shutil.copyfile(self.ranks_path, directory / GPT2_RANKS_FILE)
        return {"ranks_file": GPT2_RANKS_FILE, "ranks_sha256": GPT2_RANKS_SHA256}

    @classmethod
    def load(cls, directory: Path, config: dict[str, Any]) -> "GPT2Tokenizer":
        config_path = directory / "tokenizer_config.json"
        specials = check_special_tokens(config.get("special_tokens", {EOT: GPT2_EOT_ID}), config_path)
        ranks = directory / GPT2_RANKS_FILE
        if not ranks.is_file():
            raise UserError(f"saved gpt2 tokenizer {directory} lacks {GPT2_RANKS_FILE}; save it again, or use "
                            "--tokenizer gpt2")
        expected = sorted(specials.values())
        if expected != list(range(GPT2_EOT_ID, GPT2_EOT_ID + len(expected))):
            raise UserError(f"{config_path}: gpt2 special token ids must be {GPT2_EOT_ID}, {GPT2_EOT_ID + 1}, ...; "
                            "save the tokenizer again")
        return cls(ranks, specials)
