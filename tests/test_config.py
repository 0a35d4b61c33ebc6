import pytest

from gptforge.config import (PRESETS, ModelConfig, apply_overrides, coerce, flatten_keys, from_dict, get_preset,
                             load_toml)
from gptforge.errors import UserError


def test_gpt3_presets_follow_table_2_1():
    table = {"gpt3-small": (12, 768, 12), "gpt3-medium": (24, 1024, 16), "gpt3-large": (24, 1536, 16),
             "gpt3-xl": (24, 2048, 16), "gpt3-2.7b": (32, 2560, 32), "gpt3-6.7b": (32, 4096, 32),
             "gpt3-13b": (40, 5120, 40), "gpt3-175b": (96, 12288, 96)}
    for name, (layers, width, heads) in table.items():
        config = PRESETS[name]
        assert (config.n_layer, config.n_embd, config.n_head) == (layers, width, heads)
        assert config.block_size == 2048 and config.ffn_dim == 4 * width
        assert config.attention == "alternating" and config.window < config.block_size
    assert PRESETS["gpt3-xl"].head_dim == 128


def test_dev_17m_shape():
    config = PRESETS["dev-17m"]
    assert (config.vocab_size, config.block_size, config.n_embd, config.n_layer, config.n_head, config.ffn_dim) == \
        (50257, 1024, 256, 6, 4, 1024)


@pytest.mark.parametrize("fields, message", [
    (dict(n_embd=100, n_head=3), "n_embd"),
    (dict(attention="alternating", window=0), "window"),
    (dict(attention="alternating", window=1024, block_size=1024), "window"),
    (dict(n_layer=0), "n_layer"),
    (dict(dropout=1.5), "dropout"),
])
def test_invalid_configs_name_the_option(fields, message):
    with pytest.raises(UserError, match=message):
        ModelConfig(**fields)


def test_unknown_preset_suggests_close_names():
    with pytest.raises(UserError, match="did you mean gpt3-xl"):
        get_preset("gpt3-xll")


def test_get_preset_returns_a_copy():
    config = get_preset("gpt2")
    config.n_layer = 1
    assert PRESETS["gpt2"].n_layer == 12


def test_overrides_are_typed_and_validated():
    config = apply_overrides(get_preset("gpt2"), ["n_layer=4", "dropout=0.1", "bias=false", "d_ff=none",
                                                  "attention=alternating", "window=1e2"])
    assert (config.n_layer, config.dropout, config.bias, config.d_ff, config.window) == (4, 0.1, False, None, 100)
    with pytest.raises(UserError, match="expected an integer"):
        apply_overrides(config, ["n_layer=four"])
    with pytest.raises(UserError, match="did you mean n_layer"):
        apply_overrides(config, ["n_layers=4"])
    with pytest.raises(UserError, match="key=value"):
        apply_overrides(config, ["n_layer"])
    with pytest.raises(UserError, match="'pre' or 'post'|is not one of"):
        apply_overrides(config, ["norm=middle"])


def test_coerce_handles_unions_lists_and_bools():
    assert coerce("3", int | None, "x") == 3
    assert coerce("null", int | None, "x") is None
    assert coerce("a, b", list[str], "x") == ["a", "b"]
    with pytest.raises(UserError, match="true or false"):
        coerce("maybe", bool, "x")
    with pytest.raises(UserError, match="expected an integer"):
        coerce(2.5, int, "x")


def test_from_dict_round_trip_and_unknown_keys():
    config = get_preset("gpt3-small")
    assert from_dict(ModelConfig, config.to_dict()) == config
    with pytest.raises(UserError, match="unknown setting 'model.n_head_'"):
        from_dict(ModelConfig, {"n_head_": 3}, section="model")
    assert "window" in flatten_keys(ModelConfig)


def test_load_toml_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_toml(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\nn_layer = 3\n")
    with pytest.raises(UserError, match="invalid TOML"):
        load_toml(bad)


def test_char_small_preset_brings_its_training_recipe_and_set_still_wins():
    """char-small is nanoGPT's Shakespeare-char CPU shape with the faster recipe benchmarks/time_to_loss.py
    measures (Muon for the blocks' matrices over 30% of nanoGPT's steps at batch 16, AdamW at 5x its LR for the rest);
    resolved through the one resolver every command uses."""
    from gptforge.config import RunConfig
    from gptforge.resolve import resolve_run_config

    config = resolve_run_config(preset="char-small")
    m, t = config.model, config.train
    assert (m.n_layer, m.n_head, m.n_embd, m.block_size) == (4, 4, 128, 64)
    assert (t.lr, t.micro_batch_size, t.max_steps, t.warmup_steps, t.beta2) == (5e-3, 16, 600, 40, 0.99)
    assert (t.optimizer, t.muon_lr, t.muon_momentum) == ("muon", 0.02, 0.9)
    assert resolve_run_config(preset="char-small", overrides=["train.lr=1e-3"]).train.lr == 1e-3
    # other presets keep the defaults apart from GPT-3's Table 2.1 LR
    gpt3 = resolve_run_config(preset="gpt3-small").train
    assert gpt3.lr == 6e-4 and gpt3.micro_batch_size == RunConfig().train.micro_batch_size


def test_optimizer_and_muon_settings_from_set():
    from gptforge.config import RunConfig
    config = apply_overrides(RunConfig(), ["train.optimizer=muon", "train.muon_lr=0.05", "train.muon_momentum=0.9",
                                           "train.muon_nesterov=false", "train.muon_ns_steps=3"])
    t = config.train
    assert (t.optimizer, t.muon_lr, t.muon_momentum, t.muon_nesterov, t.muon_ns_steps) == ("muon", 0.05, 0.9, False, 3)
    with pytest.raises(UserError, match="train.optimizer.*'sgd' is not one of 'adamw', 'muon'"):
        apply_overrides(RunConfig(), ["train.optimizer=sgd"])
    for bad in ("train.muon_lr=0", "train.muon_momentum=1", "train.muon_ns_steps=0"):
        with pytest.raises(UserError, match=bad.split("=")[0].split(".")[1]):
            apply_overrides(RunConfig(), [bad])
