"""One resolver: a TOML file means the same model to every command, whichever way it names its preset."""

from __future__ import annotations

import json

import pytest
from _train_helpers import make_corpus

from gptforge.cli import main
from gptforge.config import get_preset
from gptforge.errors import UserError
from gptforge.resolve import resolve_run_config


@pytest.mark.parametrize("toml", [
    'preset = "gpt3-small"\n[model]\nn_layer = 8\n',
    '[model]\npreset = "gpt3-small"\nn_layer = 8\n',
])
def test_preset_at_top_level_or_in_model_table_means_the_same(tmp_path, toml):
    path = tmp_path / "run.toml"
    path.write_text(toml)
    config = resolve_run_config(str(path))
    expected = get_preset("gpt3-small")
    expected.n_layer = 8
    assert config.model == expected  # 2048-token context, alternating band layers, no q/k/v bias
    assert config.train.lr == 6e-4  # Table 2.1's peak LR comes with the preset


def test_train_prints_the_model_the_resolver_gives(tmp_path, capsys):
    path = tmp_path / "run.toml"
    path.write_text('[model]\npreset = "gpt3-small"\nn_layer = 8\n[train]\nmax_steps = 7\n')
    assert main(["train", "--config", str(path), "--out", str(tmp_path / "r"), "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == resolve_run_config(str(path), out=str(tmp_path / "r")).to_dict()
    assert printed["model"]["block_size"] == 2048 and printed["model"]["n_layer"] == 8


def test_two_different_presets_in_one_file_are_refused(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('preset = "gpt2"\n[model]\npreset = "gpt3-small"\n')
    with pytest.raises(UserError, match="two presets"):
        resolve_run_config(str(path))


def test_precedence_preset_toml_data_set(tmp_path):
    data = make_corpus(tmp_path)
    path = tmp_path / "run.toml"
    path.write_text('[train]\nlr = 1e-3\nmax_steps = 5\n[model]\nn_layer = 3\n')
    config = resolve_run_config(str(path), preset="gpt2", data=str(data), overrides=["train.lr=2e-4"])
    assert (config.model.n_layer, config.model.n_embd, config.train.lr, config.train.max_steps) == (3, 768, 2e-4, 5)
    assert config.model.vocab_size < 200 and config.data.path == str(data)  # the char tokenizer's size


def test_gpt3_presets_export_exactly():
    from gptforge.config import PRESETS
    assert all(not c.qkv_bias for name, c in PRESETS.items() if name.startswith("gpt3-"))
    assert all(c.qkv_bias for name, c in PRESETS.items() if name.startswith("gpt2"))


@pytest.mark.parametrize("toml", [
    'preset = "gpt3-small"\n[model]\nn_layer = 8\n',
    '[model]\npreset = "gpt3-small"\nn_layer = 8\n',
])
def test_info_and_train_read_one_file_as_one_model(tmp_path, capsys, toml):
    from gptforge.config import ModelConfig
    from gptforge.info import parameter_counts
    path = tmp_path / "run.toml"
    path.write_text(toml)
    assert main(["train", "--config", str(path), "--out", str(tmp_path / "r"), "--print-config"]) == 0
    trained = ModelConfig.from_dict(json.loads(capsys.readouterr().out)["model"])
    assert main(["info", "--config", str(path), "--set", "dropout=0.1"]) == 0
    described = capsys.readouterr().out
    header = (f"{trained.n_layer} layers, d_model {trained.n_embd}, {trained.n_head} heads x {trained.head_dim}, "
              f"d_ff {trained.ffn_dim}, context {trained.block_size}, vocab {trained.vocab_size}")
    assert header in described.splitlines()[0] and "alternating dense / band (window 256)" in described
    assert f"{parameter_counts(trained)['total']:,}" in described


def _demo_leftovers(root) -> int:
    """What the README's main job leaves in the directory it runs in: data/pystdlib (there a 4,096-id BPE; here
    a char tokenizer, another vocabulary all the same). Returns that vocabulary's size."""
    from gptforge.data.prepare import prepare
    (root / "corpus").mkdir()
    corpus = make_corpus(root / "corpus")
    return prepare([str(corpus.parent / "src")], "char", root / "data" / "pystdlib", workers=1)["tokenizer"][
        "vocab_size"]


def test_a_preset_is_the_same_model_whatever_the_working_directory_holds(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    vocab = _demo_leftovers(tmp_path)
    assert resolve_run_config(preset="gpt2").model == get_preset("gpt2")
    path = tmp_path / "run.toml"
    path.write_text('[model]\npreset = "gpt3-small"\n')
    assert resolve_run_config(str(path)).model == get_preset("gpt3-small")
    assert main(["info", "--preset", "gpt2"]) == 0
    out = capsys.readouterr().out
    assert "vocab 50257 (padded to 50304)" in out.splitlines()[0] and "tokenizer" not in out
    assert main(["train", "--preset", "dev-17m", "--out", "r", "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["model"] == get_preset("dev-17m").to_dict()
    # Naming the data still fits the vocabulary to its tokenizer, and info says that is where it came from.
    path.write_text('[model]\npreset = "gpt3-small"\n[data]\npath = "data/pystdlib"\n')
    assert main(["info", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"vocab {vocab} (padded" in out.splitlines()[0]
    assert out.splitlines()[-1] == f"vocab {vocab} from the tokenizer of data.path data/pystdlib"


def test_training_without_data_named_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _demo_leftovers(tmp_path)  # a data/pystdlib in the working directory is not silently trained on
    assert main(["train", "--preset", "dev-17m", "--out", "r"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--data DIR" in err and not (tmp_path / "r").exists()
