"""`load_model`'s tokenizer lookup: the run's own tokenizer is found, an unrelated ./tokenizer is not."""

from __future__ import annotations

import pytest
import torch

from gptforge.config import ModelConfig
from gptforge.loading import find_tokenizer_dir, load_model
from gptforge.model import GPT
from gptforge.tokenizer import CharTokenizer
from gptforge.weights import save_weights


@pytest.fixture
def weights_and_tokenizer():
    tok = CharTokenizer.train(["abcdef ghij"])
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=8, n_layer=1, n_head=2, n_embd=16)), tok


def test_run_layout_finds_the_run_tokenizer(tmp_path, monkeypatch, weights_and_tokenizer):
    model, tok = weights_and_tokenizer
    run = tmp_path / "runs" / "r1"
    step = run / "checkpoints" / "step_10"
    save_weights(model, step / "model.safetensors")
    tok.save(run / "tokenizer")
    assert find_tokenizer_dir(step) == run / "tokenizer"
    _, loaded = load_model(str(step))
    assert loaded is not None and loaded.encode("abc") == tok.encode("abc")
    _, from_file = load_model(str(step / "model.safetensors"))
    assert from_file is not None and from_file.vocab_size == tok.vocab_size
    monkeypatch.chdir(run / "checkpoints")  # a relative step_10 still knows its parent is checkpoints/
    assert find_tokenizer_dir(step.relative_to(run / "checkpoints")).resolve() == (run / "tokenizer").resolve()


def test_own_tokenizer_wins_and_stray_one_is_ignored(tmp_path, monkeypatch, weights_and_tokenizer):
    model, tok = weights_and_tokenizer
    monkeypatch.chdir(tmp_path)
    CharTokenizer.train(["xyz"]).save(tmp_path / "tokenizer")  # unrelated, in the working directory
    save_weights(model, tmp_path / "ckpt" / "model.safetensors")
    save_weights(model, tmp_path / "sub" / "x.safetensors")
    assert find_tokenizer_dir(tmp_path / "ckpt") is None
    assert load_model("ckpt")[1] is None
    assert load_model("sub/x.safetensors")[1] is None
    tok.save(tmp_path / "ckpt" / "tokenizer")
    tok.save(tmp_path / "sub" / "tokenizer")
    assert load_model("ckpt")[1].encode("abc") == tok.encode("abc")
    assert load_model("sub/x.safetensors")[1].encode("abc") == tok.encode("abc")


def _checkpoint(step_dir, model) -> None:
    """A complete checkpoint by the layout's rules (weights, optimizer, state, checksums), written by hand."""
    import json

    from gptforge.layout import CHECKSUMS_FILE, OPTIMIZER_FILE, STATE_FILE, WEIGHTS_FILE, sha256_file
    save_weights(model, step_dir / WEIGHTS_FILE)
    (step_dir / OPTIMIZER_FILE).write_bytes(b"not read by inference")
    (step_dir / STATE_FILE).write_text("{}")
    names = (WEIGHTS_FILE, OPTIMIZER_FILE, STATE_FILE)
    (step_dir / CHECKSUMS_FILE).write_text(json.dumps({n: sha256_file(step_dir / n) for n in names}))


def test_run_directory_loads_newest_valid_checkpoint_and_reports_a_broken_one(tmp_path, capsys,
                                                                               weights_and_tokenizer):
    model, tok = weights_and_tokenizer
    run = tmp_path / "run"
    (run / "config.json").parent.mkdir()
    (run / "config.json").write_text("{}")
    tok.save(run / "tokenizer")
    _checkpoint(run / "checkpoints" / "step_5", model)
    newer = GPT(model.config)
    _checkpoint(run / "checkpoints" / "step_9", newer)
    (run / "checkpoints" / "step_9" / "state.json").write_text('{"edited": true}')  # checksum no longer matches
    loaded, loaded_tok = load_model(str(run))
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    assert loaded_tok.encode("abc") == tok.encode("abc")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "step_9 is unusable (state.json does not match its checksum" in err[0]


def test_default_tokenizer_is_gpt2_only_for_gpt2_vocabulary(gpt2_ranks):
    from gptforge.errors import UserError
    from gptforge.loading import default_tokenizer

    gpt2_sized = GPT(ModelConfig(vocab_size=50257, block_size=8, n_layer=1, n_head=2, n_embd=16))
    assert default_tokenizer(gpt2_sized, "m").encode("Hello world") == [15496, 995]
    other = GPT(ModelConfig(vocab_size=50304, block_size=8, n_layer=1, n_head=2, n_embd=16))  # nanoGPT's padding
    with pytest.raises(UserError, match=r"--model m\.safetensors: no tokenizer saved with it and its vocabulary "
                                        r"\(50,304 ids\) is not GPT-2's \(50,257\).* or pass --tokenizer$"):
        default_tokenizer(other, "m.safetensors", hint=" or pass --tokenizer")


@pytest.mark.parametrize("command", ["sample", "eval", "export"])
def test_sample_eval_and_export_share_the_tokenizer_rule(tmp_path, capsys, command, weights_and_tokenizer):
    """A bare .safetensors with a non-GPT-2 vocabulary: the same one line from all three commands."""
    from gptforge.cli import main

    model, _ = weights_and_tokenizer
    save_weights(model, tmp_path / "bare" / "m.safetensors")
    spec = str(tmp_path / "bare" / "m.safetensors")
    argv = {"sample": ["sample", "--model", spec, "hi", "--device", "cpu"],
            "eval": ["eval", "--model", spec, "--task", "val", "--data", str(tmp_path / "t.txt"), "--device", "cpu"],
            "export": ["export", "--model", spec, "--format", "hf", "--out", str(tmp_path / "out")]}[command]
    (tmp_path / "t.txt").write_text("abc def " * 20)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"gptforge {command}: error: --model {spec}: no tokenizer saved "
                                               f"with it and its vocabulary ({model.config.vocab_size:,} ids)")
    assert not (tmp_path / "out").exists()


def test_preset_weights_are_drawn_from_the_seed():
    """`--model PRESET --seed 7` must give the same text every run: the random weights come from the seed,
    and loading leaves the caller's global RNG alone."""
    torch.manual_seed(0)
    expected_next = torch.rand(1)
    torch.manual_seed(0)
    a, _ = load_model("dev-17m", seed=7)
    assert torch.equal(torch.rand(1), expected_next)
    b, _ = load_model("dev-17m", seed=7)
    c, _ = load_model("dev-17m", seed=8)
    for name, tensor in a.state_dict().items():
        assert torch.equal(tensor, b.state_dict()[name]), name
    assert not torch.equal(a.transformer.h[0].attn.c_attn.weight, c.transformer.h[0].attn.c_attn.weight)


def test_export_of_a_preset_is_drawn_from_its_seed(tmp_path, gpt2_ranks):
    """`export --model PRESET --seed N` writes the weights `sample --model PRESET --seed N` runs, every time
    (before --seed existed, two exports of one preset differed)."""
    from gptforge.cli import main

    for name in ("a", "b"):
        assert main(["export", "--model", "char-small", "--seed", "3", "--format", "hf", "--out",
                     str(tmp_path / name)]) == 0
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    exported, _ = load_model(f"hf:{tmp_path / 'a'}")
    sampled, _ = load_model("char-small", seed=3)  # what `sample --model char-small --seed 3` loads
    theirs, ours = exported.state_dict(), sampled.state_dict()
    assert list(theirs) == list(ours)
    vocab = sampled.config.vocab_size  # the padded embedding rows are not exported
    assert all(torch.equal(theirs[name][:vocab], ours[name][:vocab]) for name in ours)


def test_a_tokenizer_that_does_not_fit_the_model_is_refused_for_export(tmp_path, capsys):
    """A chat model exported with another tokenizer (fewer ids, no chat markers or template) once wrote an
    export that decodes to other text and cannot chat; now it is one line, exit 2, nothing written."""
    from chat_models import CORPUS, chat_tokenizer, random_chat_model, save_chat_checkpoint

    from gptforge.chat.tokens import CHAT_TOKENS
    from gptforge.cli import main
    from gptforge.tokenizer import CharTokenizer

    own = chat_tokenizer("char")
    model = save_chat_checkpoint(tmp_path / "chat", random_chat_model(own, end_at=10), own)
    smaller = CharTokenizer.train(["abc"])
    smaller.save(tmp_path / "smaller")
    markers_only = CharTokenizer.train([CORPUS])  # as many ids, the markers but not the template
    markers_only.add_special_tokens(CHAT_TOKENS)
    assert markers_only.vocab_size == own.vocab_size
    markers_only.save(tmp_path / "markers_only")
    for other, needle in (("smaller", "trained with a"), ("markers_only", "chat markers and template")):
        out = tmp_path / f"out_{other}"
        assert main(["export", "--model", model, "--format", "hf", "--out", str(out),
                     "--tokenizer", str(tmp_path / other)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err and "--tokenizer" in err and not out.exists()
    # the model's own tokenizer, named explicitly, fits
    assert main(["export", "--model", model, "--format", "hf", "--out", str(tmp_path / "ok"),
                 "--tokenizer", str(tmp_path / "chat" / "tokenizer")]) == 0
