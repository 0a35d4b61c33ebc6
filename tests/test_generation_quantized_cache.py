"""The quantized-weights cache (gptforge/generation/quantized_cache.py): a second preparation of the same
weights file reads the stored copy, bit for bit what quantizing gives, without quantizing; anything that
changes the result is a new entry; a damaged, foreign or unwritable cache only costs the quantizing; what is
not an entry is never replaced; old entries are deleted beyond the size limit, and nothing else in the folder
is."""

from __future__ import annotations

import os

import pytest
import torch

import gptforge.generation.quantize as quantize
import gptforge.generation.quantized_cache as qcache
from gptforge.config import ModelConfig
from gptforge.generation import prepare_for_decoding
from gptforge.generation.quantize import QuantizedLinear, quantized_state
from gptforge.model import GPT
from gptforge.weights import load_weights, save_weights

CONFIG = ModelConfig(vocab_size=101, block_size=32, n_layer=2, n_head=2, n_embd=64)


@pytest.fixture
def folder(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv(qcache.ENV, str(folder))
    return folder


def weights_file(path, seed: int = 0):
    torch.manual_seed(seed)
    save_weights(GPT(CONFIG), path)
    return path


def entries(folder) -> list:
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def quantized(path, kind: str, dtype=torch.float32, cached: bool = True) -> GPT:
    model = load_weights(path, dtype=dtype).eval()
    return prepare_for_decoding(model, quantize=kind, weights_file=path if cached else None)


def no_quantizing(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("quantized instead of reading the cache")

    monkeypatch.setattr(quantize, "quantize_int8", refuse)
    monkeypatch.setattr(quantize, "_int4_blocks", refuse)


def assert_same(a: GPT, b: GPT) -> None:
    sa, sb = quantized_state(a), quantized_state(b)
    assert sa.keys() == sb.keys() and len(sa) == 2 * (4 * CONFIG.n_layer + 1)
    for name in sa:
        assert sa[name].dtype == sb[name].dtype and torch.equal(sa[name], sb[name]), name
    ids = torch.tensor([[1, 5, 9, 33, 100]])
    with torch.inference_mode():
        assert torch.equal(a(ids)[0], b(ids)[0])


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_a_second_preparation_reads_the_stored_copy_instead_of_quantizing(kind, tmp_path, folder, monkeypatch):
    path = weights_file(tmp_path / "w.safetensors")
    first = quantized(path, kind)
    assert len(entries(folder)) == 1 and entries(folder)[0].endswith(f"-{kind}.safetensors")
    reference = quantized(path, kind, cached=False)
    assert_same(first, reference)
    no_quantizing(monkeypatch)
    second = quantized(path, kind)
    assert_same(second, reference)
    # read in place (memory-mapped), every buffer where the kernels need it: the int8 kernel crashed on the
    # 8-byte alignment safetensors' own writer gives
    for tensor in quantized_state(second).values():
        assert tensor.data_ptr() % qcache.ALIGN == 0
    assert isinstance(second.lm_head, QuantizedLinear) and second.lm_head.rows == CONFIG.vocab_size


def test_a_new_file_dtype_or_kind_is_a_new_entry(tmp_path, folder):
    path = weights_file(tmp_path / "w.safetensors", seed=0)
    quantized(path, "int8")
    weights_file(path, seed=1)  # the checkpoint written again (by rename: a new file at the same path)
    assert_same(quantized(path, "int8"), quantized(path, "int8", cached=False))
    quantized(path, "int8", dtype=torch.bfloat16)
    quantized(path, "int4")
    assert len(entries(folder)) == 4
    again = quantized(path, "int8")
    assert len(entries(folder)) == 4  # the current file's entry again, not a new one
    assert_same(again, quantized(path, "int8", cached=False))


def test_a_damaged_or_foreign_entry_is_quantized_again_and_replaced(tmp_path, folder, monkeypatch):
    a = weights_file(tmp_path / "a.safetensors", seed=0)
    b = weights_file(tmp_path / "b.safetensors", seed=1)
    quantized(a, "int8")
    (entry_a,) = entries(folder)
    data = (folder / entry_a).read_bytes()
    (folder / entry_a).write_bytes(data[: len(data) // 2])  # cut short (a full disk, a crash elsewhere)
    assert_same(quantized(a, "int8"), quantized(a, "int8", cached=False))
    assert (folder / entry_a).read_bytes() == data  # written again, whole
    quantized(b, "int8")
    (entry_b,) = set(entries(folder)) - {entry_a}
    (folder / entry_a).write_bytes((folder / entry_b).read_bytes())  # another file's copy under a's name
    assert_same(quantized(a, "int8"), quantized(a, "int8", cached=False))
    assert (folder / entry_a).read_bytes() == data


def test_what_is_not_an_entry_is_never_replaced(tmp_path, folder):
    path = weights_file(tmp_path / "w.safetensors")
    entry = qcache.entry_path(folder, qcache.entry_key(path, "int8", torch.float32))
    folder.mkdir()
    users = tmp_path / "users.txt"
    users.write_text("the user's")
    entry.symlink_to(users)  # the guard every output goes through (gptforge.outputs) replaces no link
    reference = quantized(path, "int8", cached=False)
    assert_same(quantized(path, "int8"), reference)
    assert entry.is_symlink() and users.read_text() == "the user's"
    entry.unlink()
    entry.write_text("the user's too")  # a file of that name gptforge did not write
    assert_same(quantized(path, "int8"), reference)
    assert entry.read_text() == "the user's too" and entries(folder) == [entry.name]


def test_off_or_unwritable_the_model_is_still_quantized(tmp_path, monkeypatch):
    path = weights_file(tmp_path / "w.safetensors")
    reference = quantized(path, "int4", cached=False)
    monkeypatch.setenv("GPTFORGE_CACHE", str(tmp_path / "home-cache"))
    monkeypatch.setenv(qcache.ENV, "off")
    assert_same(quantized(path, "int4"), reference)
    assert not (tmp_path / "home-cache").exists()
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(qcache.ENV, str(blocker / "cache"))
    assert_same(quantized(path, "int4"), reference)
    monkeypatch.delenv(qcache.ENV)
    quantized(path, "int4")
    assert len(entries(tmp_path / "home-cache" / qcache.FOLDER)) == 1  # the default: gptforge's cache


def test_least_recently_used_entries_beyond_the_limit_go_and_nothing_else(tmp_path, folder, monkeypatch):
    files = [weights_file(tmp_path / f"w{i}.safetensors", seed=i) for i in range(3)]
    quantized(files[0], "int8")
    size = (folder / entries(folder)[0]).stat().st_size
    monkeypatch.setattr(qcache, "MAX_BYTES", 2 * size)  # room for two entries
    others = [folder / "notes.txt", folder / "0123-int8.safetensors"]
    for other in others:
        other.write_text("the user's")
    names = {}
    for i, path in enumerate(files[:2]):
        quantized(path, "int8")
        names[i] = (set(entries(folder)) - set(names.values()) - {o.name for o in others}).pop()
        os.utime(folder / names[i], ns=(10**18 + i * 10**9,) * 2)  # distinct times, w1 the newer
    quantized(files[0], "int8")  # a hit: w0 becomes the most recently used
    quantized(files[2], "int8")  # a third entry: w1's, the least recently used, goes
    assert names[1] not in entries(folder) and names[0] in entries(folder)
    assert len(entries(folder)) == 2 + len(others)
    assert all(o.read_text() == "the user's" for o in others)
    monkeypatch.setattr(qcache, "MAX_BYTES", 1)  # smaller than any entry: the one just written stays
    quantized(files[1], "int8")
    assert len(entries(folder)) == 1 + len(others)
