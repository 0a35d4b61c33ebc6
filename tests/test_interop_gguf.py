"""GGUF export: read back with gguf.GGUFReader, every tensor and the tokenizer metadata match the model;
unrepresentable models are refused; (slow, optional) llama.cpp computes our logits."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from gptforge.config import ModelConfig
from gptforge.errors import UserError
from gptforge.interop.gguf import export_gguf, gguf_tensors
from gptforge.model import GPT

gguf = pytest.importorskip("gguf")

CORPUS = ["the quick brown fox jumps over the lazy dog " * 20, "def main():\n    return 42\n" * 10,
          "naïve café 日本語 😀 " * 5]


@pytest.fixture(scope="module")
def bpe_tokenizer():
    from gptforge.tokenizer import train_bpe
    return train_bpe(CORPUS, vocab_size=320)


def random_model(vocab_size: int, n_embd: int = 32, **kw) -> GPT:
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=vocab_size, block_size=16, n_layer=2, n_head=2, n_embd=n_embd, **kw)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def field(reader, name):
    return reader.fields[name].contents()


@pytest.mark.parametrize("dtype,atol", [("f32", 0.0), ("f16", 1e-3), ("bf16", 1e-2), ("q8_0", 2e-2)])
def test_gguf_tensors_and_metadata_read_back(tmp_path, bpe_tokenizer, dtype, atol):
    model = random_model(vocab_size=bpe_tokenizer.vocab_size + 5)  # ids past the tokenizer: padded tokens
    path = export_gguf(model, bpe_tokenizer, tmp_path / "m.gguf", dtype=dtype)
    reader = gguf.GGUFReader(path)
    c = model.config
    assert field(reader, "general.architecture") == "gpt2"
    assert field(reader, "gpt2.context_length") == c.block_size
    assert field(reader, "gpt2.embedding_length") == c.n_embd
    assert field(reader, "gpt2.feed_forward_length") == c.ffn_dim
    assert field(reader, "gpt2.block_count") == c.n_layer
    assert field(reader, "gpt2.attention.head_count") == c.n_head
    assert field(reader, "gpt2.attention.layer_norm_epsilon") == pytest.approx(c.layer_norm_eps)
    file_types = {"f32": 0, "f16": 1, "bf16": 32, "q8_0": 7}
    assert field(reader, "general.file_type") == file_types[dtype]

    # Tokenizer: byte-level BPE spelled as transformers spells it; merges exactly the trained ones.
    import json
    hf = json.loads(bpe_tokenizer.hf_tokenizer.to_str())
    tokens = field(reader, "tokenizer.ggml.tokens")
    types = field(reader, "tokenizer.ggml.token_type")
    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    assert len(tokens) == c.vocab_size
    specials = set(bpe_tokenizer.special_tokens.values())
    for token, i in hf["model"]["vocab"].items():
        assert tokens[i] == token
        assert types[i] == (gguf.TokenType.CONTROL if i in specials else gguf.TokenType.NORMAL)
    eot = bpe_tokenizer.eot_id
    assert tokens[eot] == "<|endoftext|>" and types[eot] == gguf.TokenType.CONTROL
    assert tokens[-1] == f"[PAD{c.vocab_size - 1}]" and types[-1] == gguf.TokenType.UNUSED
    assert field(reader, "tokenizer.ggml.merges") == [m if isinstance(m, str) else " ".join(m)
                                                      for m in hf["model"]["merges"]]
    assert field(reader, "tokenizer.ggml.bos_token_id") == eot
    assert field(reader, "tokenizer.ggml.eos_token_id") == eot

    expected = gguf_tensors(model)
    read = {t.name: t for t in reader.tensors}
    assert set(read) == set(expected) and "output.weight" not in read  # tied head: llama.cpp reuses token_embd
    assert expected["token_embd.weight"].shape == (c.vocab_size, c.n_embd)  # padding rows dropped
    assert np.array_equal(expected["blk.0.attn_qkv.weight"],
                          model.transformer.h[0].attn.c_attn.weight.detach().numpy())
    for name, want in expected.items():
        t = read[name]
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(want.shape)
        assert tuple(reversed(t.shape.tolist())) == want.shape, name  # GGUF lists dims innermost first
        if want.ndim == 1 or name == "position_embd.weight":
            assert t.tensor_type == gguf.GGMLQuantizationType.F32, name
        np.testing.assert_allclose(got, want, atol=atol * max(1.0, float(np.abs(want).max())), rtol=0, err_msg=name)
    if dtype == "q8_0":
        assert read["blk.0.ffn_up.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0


def test_gguf_with_gpt2_tokenizer(tmp_path, gpt2_ranks):
    from gptforge.tokenizer import GPT2Tokenizer
    model = random_model(vocab_size=50257, n_embd=16)
    path = export_gguf(model, GPT2Tokenizer(gpt2_ranks), tmp_path / "m.gguf", dtype="f32")
    reader = gguf.GGUFReader(path)
    tokens = field(reader, "tokenizer.ggml.tokens")
    merges = field(reader, "tokenizer.ggml.merges")
    assert len(tokens) == 50257 and tokens[15496] == "Hello" and tokens[995] == "Ġworld"
    assert tokens[50256] == "<|endoftext|>" and len(merges) == 50000 and merges[0] == "Ġ t"
    assert field(reader, "tokenizer.ggml.pre") == "gpt-2"


def test_q8_0_falls_back_to_f16_for_rows_not_a_multiple_of_32(tmp_path, bpe_tokenizer):
    model = random_model(vocab_size=bpe_tokenizer.vocab_size, n_embd=16)  # 16-wide rows: no q8_0 block fits
    reader = gguf.GGUFReader(export_gguf(model, bpe_tokenizer, tmp_path / "m.gguf", dtype="q8_0"))
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.attn_qkv.weight"] == gguf.GGMLQuantizationType.F16
    assert types["blk.0.ffn_down.weight"] == gguf.GGMLQuantizationType.Q8_0  # 64-wide rows quantise


def test_unrepresentable_models_are_refused(tmp_path, bpe_tokenizer):
    from gptforge.tokenizer import CharTokenizer
    band = random_model(vocab_size=bpe_tokenizer.vocab_size, attention="alternating", window=4)
    with pytest.raises(UserError, match="alternating.*--format hf"):
        export_gguf(band, bpe_tokenizer, tmp_path / "a.gguf")
    post = random_model(vocab_size=bpe_tokenizer.vocab_size, norm="post")
    with pytest.raises(UserError, match="norm='post'"):
        export_gguf(post, bpe_tokenizer, tmp_path / "b.gguf")
    char = CharTokenizer.train(["abc"])
    with pytest.raises(UserError, match="char tokenizer"):
        export_gguf(random_model(vocab_size=char.vocab_size), char, tmp_path / "c.gguf")
    dense = random_model(vocab_size=bpe_tokenizer.vocab_size)
    with pytest.raises(UserError, match="--dtype 'q4_0'"):
        export_gguf(dense, bpe_tokenizer, tmp_path / "d.gguf", dtype="q4_0")
    (tmp_path / "e.gguf").write_bytes(b"mine")
    with pytest.raises(UserError, match="--force"):
        export_gguf(dense, bpe_tokenizer, tmp_path / "e.gguf")
    assert (tmp_path / "e.gguf").read_bytes() == b"mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.gguf"]


def llama_cpp_gelu(exact):
    """GELU as llama.cpp's CPU backend computes it: the input rounded to fp16 and looked up in a table of
    fp16 tanh-GELU values (ggml's GGML_GELU_FP16), exact beyond |x| >= 10. No runtime switch turns the table
    off, so the reference reproduces it instead."""
    def gelu(x, approximate="none"):
        table = exact(x.half().float(), approximate="tanh").half().float()
        return torch.where(x <= -10, torch.zeros_like(x), torch.where(x >= 10, x, table))
    return gelu


@pytest.mark.slow
def test_llama_cpp_logits_match(tmp_path, bpe_tokenizer, monkeypatch):
    """Our f32 GGUF export computes our logits in real llama.cpp. Two llama.cpp approximations are taken out
    of the comparison (measured on this model, max |difference| of the logits): its default f16 KV cache
    (1.5e-3 -> 1.0e-3 with an f32 cache, set below) and its fp16 GELU table (1.0e-3 -> 4e-5 with the table
    reproduced in our reference)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    model = random_model(vocab_size=bpe_tokenizer.vocab_size, n_embd=64)
    path = export_gguf(model, bpe_tokenizer, tmp_path / "m.gguf", dtype="f32")
    f32 = getattr(llama_cpp, "GGML_TYPE_F32", 0)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=16, logits_all=True, verbose=False, n_threads=2,
                          type_k=f32, type_v=f32, flash_attn=False)
    ids = bpe_tokenizer.encode("the quick brown fox jumps")[:12]
    assert llm.tokenize(b"the quick brown fox jumps", add_bos=False, special=False)[:12] == ids
    llm.eval(ids)
    theirs = np.array(llm.scores[: len(ids)])
    with torch.no_grad():
        exact = model(torch.tensor([ids]))[0][0].numpy()
        monkeypatch.setattr(torch.nn.functional, "gelu", llama_cpp_gelu(torch.nn.functional.gelu))
        reference = model(torch.tensor([ids]))[0][0].numpy()
    assert np.abs(theirs - reference).max() <= 2e-4
    assert np.abs(theirs - exact).max() <= 3e-3  # the GELU table's own effect, bounded


def test_missing_gguf_package_says_what_to_install(tmp_path, bpe_tokenizer, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # as if the optional extra were not installed
    with pytest.raises(UserError, match=r"pip install 'gptforge\[gguf\]'"):
        export_gguf(random_model(vocab_size=bpe_tokenizer.vocab_size), bpe_tokenizer, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_a_full_disk_says_no_space_naming_the_file_not_bytes_requested_and_written(tmp_path, bpe_tokenizer,
                                                                                  monkeypatch):
    """NumPy's tofile (the gguf writer) says only "N requested and M written" on a full disk (issue 22 #5)."""
    import errno
    import shutil

    from gptforge import atomic

    def short_write(self, *args, **kwargs):
        raise OSError("49152 requested and 2752 written")
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", short_write)
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**6, 10**6, 0))
    out = tmp_path / "m.gguf"
    with pytest.raises(OSError) as caught:
        export_gguf(random_model(bpe_tokenizer.vocab_size), bpe_tokenizer, out)
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(out)
    assert list(tmp_path.iterdir()) == []


def test_a_real_full_disk_says_no_space_naming_the_file(tmp_path, bpe_tokenizer):
    import errno

    from test_atomic import fill, tiny_tmpfs

    with tiny_tmpfs(tmp_path / "disk", "1m") as disk:
        fill(disk, 32 * 1024)  # the header and vocabulary fit, the f32 tensors (~120 KB) do not
        out = disk / "m.gguf"
        with pytest.raises(OSError) as caught:
            export_gguf(random_model(bpe_tokenizer.vocab_size, n_embd=64), bpe_tokenizer, out, dtype="f32")
        assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(out), caught.value
        assert sorted(p.name for p in disk.iterdir()) == ["filler"]
