"""Hugging Face interop: exported directories compute our logits in transformers, tokenizers give our ids,
HF GPT-2 checkpoints load into gptforge, and bad requests fail in one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gptforge.config import ModelConfig
from gptforge.errors import UserError
from gptforge.interop.hf import export_hf, import_hf, load_hf_model
from gptforge.model import GPT

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

SAMPLE = ("Hello world! naïve café — 日本語のテキスト 😀🎉👩‍👩‍👧 def f(x):\n\treturn x**2  # comment\n\n\n"
          "   leading spaces   and trailing   \r\n 'll 've I'm ÄÖÜ ß ½ 1234567 3.14 <tag attr=\"v\"> ... \u00a0\u2009end")


def random_model(config: ModelConfig, seed: int = 0) -> GPT:
    """A model with every parameter (biases and LayerNorms included) away from its init, so that a
    dropped or misplaced tensor changes the logits."""
    torch.manual_seed(seed)
    model = GPT(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def hf_logits(directory: Path, idx: torch.Tensor) -> torch.Tensor:
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    with torch.no_grad():
        return hf(idx).logits


def ours(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(idx)[0]


def test_dense_model_round_trips_through_gpt2_layout(tmp_path):
    config = ModelConfig(vocab_size=101, block_size=32, n_layer=2, n_head=2, n_embd=16, d_ff=40, layer_norm_eps=1e-6)
    model = random_model(config)
    out = export_hf(model, None, tmp_path / "hf")
    saved = json.loads((out / "config.json").read_text())
    assert saved["architectures"] == ["GPT2LMHeadModel"] and saved["n_inner"] == 40
    assert (out / "model.safetensors").is_file() and not (out / "pytorch_model.bin").exists()
    idx = torch.randint(0, config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    theirs = hf_logits(out, idx)
    assert theirs.shape == (2, 32, 101)  # vocabulary padding rows are not exported
    assert (ours(model, idx) - theirs).abs().max().item() <= 1e-4


def test_muon_trained_model_exports_exactly(tmp_path):
    """Muon changes how weights are trained, not what the model is: a few Muon steps, then the same export."""
    from gptforge.config import TrainConfig
    from gptforge.training.optim import build_optimizer
    from gptforge.training.step import clip_and_step, forward_backward

    config = ModelConfig(vocab_size=101, block_size=32, n_layer=2, n_head=2, n_embd=16)
    torch.manual_seed(0)
    model = GPT(config)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    opt = build_optimizer(model, TrainConfig(optimizer="muon", lr=1e-2), "cpu")
    data = torch.randint(0, config.vocab_size, (4, 33), generator=torch.Generator().manual_seed(2))
    for _ in range(3):
        loss = forward_backward(model, [(data[:, :-1], data[:, 1:])], 1, torch.device("cpu"), "fp32")
        assert clip_and_step(model, opt, loss, 1.0)[0]
    assert not torch.equal(model.state_dict()["transformer.h.0.mlp.c_fc.weight"],
                           start["transformer.h.0.mlp.c_fc.weight"])  # Muon moved the block matrices
    model.eval()
    out = export_hf(model, None, tmp_path / "hf")
    idx = torch.randint(0, config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    assert (ours(model, idx) - hf_logits(out, idx)).abs().max().item() <= 1e-4


def test_model_without_biases_exports_with_zero_biases(tmp_path):
    config = ModelConfig(vocab_size=70, block_size=16, n_layer=2, n_head=2, n_embd=16, bias=False)
    model = random_model(config)
    idx = torch.randint(0, 70, (1, 16))
    out = export_hf(model, None, tmp_path / "hf")
    assert (ours(model, idx) - hf_logits(out, idx)).abs().max().item() <= 1e-4


def band_model(n_layer: int = 3, window: int = 4) -> GPT:
    config = ModelConfig(vocab_size=97, block_size=32, n_layer=n_layer, n_head=2, n_embd=16, attention="alternating",
                         window=window)
    model = random_model(config, seed=2)
    with torch.no_grad():  # a q bias has no GPT-Neo equivalent; k and v biases stay nonzero and are folded
        for block in model.transformer.h:
            block.attn.c_attn.bias[: config.n_embd].zero_()
    return model


def test_band_model_round_trips_through_gpt_neo_with_folded_biases(tmp_path):
    model = band_model(n_layer=3, window=4)  # odd layer count: GPT-Neo gets a trailing global layer
    out = export_hf(model, None, tmp_path / "neo")
    saved = json.loads((out / "config.json").read_text())
    assert saved["architectures"] == ["GPTNeoForCausalLM"] and saved["window_size"] == 4
    assert saved["attention_types"] == [[["global", "local"], 1], [["global"], 1]]
    idx = torch.randint(0, 97, (2, 32), generator=torch.Generator().manual_seed(3))
    theirs = hf_logits(out, idx)
    assert (ours(model, idx) - theirs).abs().max().item() <= 1e-4
    # The band matters on this input: the same weights with dense attention disagree with GPT-Neo.
    dense = GPT(ModelConfig(**{**model.config.to_dict(), "attention": "dense"})).eval()
    dense.load_state_dict(model.state_dict())
    assert (ours(dense, idx) - theirs).abs().max().item() > 1e-3


def test_band_model_trained_without_qkv_bias_exports_exactly(tmp_path):
    config = ModelConfig(vocab_size=97, block_size=32, n_layer=2, n_head=2, n_embd=16, attention="alternating",
                         window=4, qkv_bias=False)
    model = random_model(config, seed=4)
    assert model.transformer.h[0].attn.c_attn.bias is None and model.transformer.h[0].attn.c_proj.bias is not None
    out = export_hf(model, None, tmp_path / "neo")
    idx = torch.randint(0, 97, (2, 32), generator=torch.Generator().manual_seed(5))
    assert (ours(model, idx) - hf_logits(out, idx)).abs().max().item() <= 1e-4


def test_band_model_with_query_bias_is_refused(tmp_path):
    model = band_model()
    with torch.no_grad():
        model.transformer.h[1].attn.c_attn.bias[0] = 0.5
    with pytest.raises(UserError, match="query bias.*qkv_bias=false"):
        export_hf(model, None, tmp_path / "neo")
    assert not (tmp_path / "neo").exists()


def test_post_ln_model_is_refused(tmp_path):
    model = GPT(ModelConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=16, norm="post"))
    with pytest.raises(UserError, match="norm='post'"):
        export_hf(model, None, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_force_replaces_an_earlier_export_and_nothing_else(tmp_path):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    model = random_model(ModelConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=16))
    with pytest.raises(UserError, match="is not empty; choose a new directory or pass --force"):
        export_hf(model, None, out)
    with pytest.raises(UserError, match="holds files gptforge did not write, and --force replaces only a Hugging "
                                        "Face export"):
        export_hf(model, None, out, force=True)
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    export_hf(model, None, out)  # an empty directory: nothing to lose
    first = (out / "model.safetensors").read_bytes()
    with pytest.raises(UserError, match="--force"):
        export_hf(model, None, out)
    export_hf(random_model(model.config, seed=1), None, out, force=True)
    assert (out / "model.safetensors").read_bytes() != first


@pytest.mark.parametrize("dtype,name", [("bf16", "bfloat16"), ("f32", "float32")])
def test_config_names_the_dtype_for_old_and_new_transformers(tmp_path, dtype, name):
    model = random_model(ModelConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=16))
    out = export_hf(model, None, tmp_path / "hf", dtype=dtype)
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == config["dtype"] == name
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert hf.dtype == getattr(torch, name)


# ---- tokenizers ---------------------------------------------------------------------------------------


def tokenizer_parity(tokenizer, tmp_path: Path, texts: list[str]) -> None:
    model = GPT(ModelConfig(vocab_size=tokenizer.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16))
    out = export_hf(model, tokenizer, tmp_path / "hf")
    hf = transformers.AutoTokenizer.from_pretrained(out)
    assert hf.eos_token_id == tokenizer.eot_id and hf.bos_token_id == tokenizer.eot_id
    for text in texts:
        ids = tokenizer.encode(text)
        assert hf(text)["input_ids"] == ids, text
        assert hf.decode(ids) == tokenizer.decode(ids)
    # Special tokens: transformers recognises them in text, as ours does when allowed.
    text = "one<|endoftext|>two"
    assert hf(text)["input_ids"] == tokenizer.encode(text, allowed_special=True)


def test_gpt2_tokenizer_parity(tmp_path, gpt2_ranks):
    from gptforge.tokenizer import GPT2Tokenizer
    tok = GPT2Tokenizer(gpt2_ranks)
    tokenizer_parity(tok, tmp_path, [SAMPLE, "Hello world", " a  b   c    ", "\n\n\n", ""])
    assert tok.encode("Hello world") == [15496, 995]
    merges = (tmp_path / "hf" / "merges.txt").read_text().splitlines()
    assert len(merges) == 1 + 50000 and merges[1] == "Ġ t"  # GPT-2's own first merge


def test_char_tokenizer_parity(tmp_path):
    from gptforge.tokenizer import CharTokenizer
    tok = CharTokenizer.train([SAMPLE[: len(SAMPLE) // 2]])  # the second half has unseen characters -> <|unk|>
    with pytest.warns(UserWarning):
        tokenizer_parity(tok, tmp_path, [SAMPLE, SAMPLE[:20], " \t\n "])


def test_bpe_tokenizer_parity(tmp_path):
    from gptforge.tokenizer import train_bpe
    corpus = [SAMPLE * 3, "the quick brown fox jumps over the lazy dog " * 20, "def main():\n    pass\n" * 10]
    tok = train_bpe(corpus, vocab_size=400)
    tokenizer_parity(tok, tmp_path, [SAMPLE, "the lazy dog", "unseen wörds ✓", "   "])


# ---- import -------------------------------------------------------------------------------------------


def random_hf_gpt2(directory: Path) -> "transformers.GPT2LMHeadModel":
    config = transformers.GPT2Config(vocab_size=120, n_positions=24, n_embd=16, n_layer=2, n_head=4,
                                     activation_function="gelu_new", layer_norm_epsilon=1e-5)
    torch.manual_seed(4)
    hf = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(directory)
    return hf


def test_import_random_gpt2_checkpoint_gives_equal_logits(tmp_path):
    hf = random_hf_gpt2(tmp_path / "hf")
    model, tokenizer = load_hf_model(tmp_path / "hf")
    assert tokenizer is None  # no tokenizer files were saved
    assert model.config.vocab_size == 120 and model.config.block_size == 24
    idx = torch.randint(0, 120, (2, 24))
    with torch.no_grad():
        assert (ours(model, idx) - hf(idx).logits).abs().max().item() <= 1e-4

    from gptforge.loading import load_model
    loaded, _ = load_model(f"hf:{tmp_path / 'hf'}")
    assert torch.equal(ours(loaded, idx), ours(model, idx))
    out = import_hf(tmp_path / "hf", tmp_path / "ckpt")
    assert (out / "model.safetensors").is_file()
    converted, _ = load_model(str(out))
    assert (ours(converted, idx) - ours(model, idx)).abs().max().item() == 0


def test_import_keeps_gpt2_tokenizer(tmp_path, gpt2_ranks):
    from gptforge.tokenizer import GPT2Tokenizer
    model = random_model(ModelConfig(vocab_size=50257, block_size=16, n_layer=1, n_head=2, n_embd=16))
    export_hf(model, GPT2Tokenizer(gpt2_ranks), tmp_path / "hf")
    out = import_hf(tmp_path / "hf", tmp_path / "ckpt")
    from gptforge.loading import load_model
    loaded, tokenizer = load_model(str(out))
    assert tokenizer is not None and tokenizer.kind == "gpt2"
    idx = torch.randint(0, 50257, (1, 16))
    assert (ours(loaded, idx) - ours(model, idx)).abs().max().item() == 0


def test_exported_gpt_neo_imports_back(tmp_path):
    model = band_model(n_layer=4, window=5)
    export_hf(model, None, tmp_path / "neo")
    back, _ = load_hf_model(tmp_path / "neo")
    assert back.config.attention == "alternating" and back.config.window == 5
    idx = torch.randint(0, 97, (2, 32))
    assert (ours(back, idx) - ours(model, idx)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_malformed_tokenizer_files_load_the_model_without_a_tokenizer(tmp_path, kind):
    """A broken tokenizer.json is "no tokenizer we can reproduce", as bad JSON always was: the model loads."""
    from gptforge.tokenizer import CharTokenizer, train_bpe
    tok = CharTokenizer.train(["abcdef"]) if kind == "char" else train_bpe([SAMPLE * 3], vocab_size=300)
    model = random_model(ModelConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16))
    out = export_hf(model, tok, tmp_path / "hf")
    assert load_hf_model(out)[1] is not None
    path = out / "tokenizer.json"
    good = json.loads(path.read_text(encoding="utf-8"))
    broken = [{**good, "added_tokens": [{"id": 5}]},  # no "content"
              {**good, "model": {"type": "BPE", "vocab": ["a", "b"]}},
              {**good, "model": None}, ["not", "an", "object"]]
    for doc in broken:
        path.write_text(json.dumps(doc), encoding="utf-8")
        loaded, tokenizer = load_hf_model(out)
        assert tokenizer is None and loaded.config.vocab_size == tok.vocab_size, doc
    path.write_bytes(b"\xff\xfe not json")
    assert load_hf_model(out)[1] is None
    path.unlink()
    assert load_hf_model(out)[1] is None


def test_unsupported_hf_config_is_refused(tmp_path):
    random_hf_gpt2(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["activation_function"] = "relu"
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="activation_function 'relu'"):
        load_hf_model(tmp_path / "hf")


# ---- the command line -----------------------------------------------------------------------------------


def test_cli_missing_model_exits_2_with_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "gptforge", "export", "--model", str(tmp_path / "missing"),
                             "--format", "hf", "--out", str(tmp_path / "o")],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no such path" in lines[0] and lines[0].startswith("gptforge export: error:")
    assert not (tmp_path / "o").exists()


def test_cli_bad_inputs_exit_2_with_one_line(tmp_path, capsys):
    from gptforge.cli import main
    from gptforge.tokenizer import CharTokenizer
    from gptforge.weights import save_weights

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    save_weights(random_model(ModelConfig(vocab_size=20, block_size=16, n_layer=1, n_head=2, n_embd=16)),
                 ckpt / "model.safetensors")
    tok = CharTokenizer.train(["abcdefghij klmnopq"])
    tok.save(ckpt / "tokenizer")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    cases = [
        (["export", "--model", str(ckpt), "--format", "hf", "--out", str(busy)], "--force"),
        (["export", "--model", str(ckpt), "--format", "onnx", "--out", str(tmp_path / "o")], "--format 'onnx'"),
        (["export", "--model", str(ckpt), "--format", "gguf", "--out", str(tmp_path / "o.gguf")], "char tokenizer"),
        (["export", "--model", str(ckpt), "--format", "hf", "--dtype", "q4", "--out", str(tmp_path / "o")], "q4"),
        (["import-hf", str(tmp_path / "nowhere" / "x" / "y"), "--out", str(tmp_path / "o")], "not a directory"),
    ]
    for args, needle in cases:
        assert main(args) == 2, args
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], lines
    assert (busy / "x").read_text() == "x" and not (tmp_path / "o").exists() and not (tmp_path / "o.gguf").exists()
    assert main(["export", "--model", str(ckpt), "--format", "hf", "--out", str(tmp_path / "ok")]) == 0
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "ok")
    assert hf("abc klm")["input_ids"] == tok.encode("abc klm")
