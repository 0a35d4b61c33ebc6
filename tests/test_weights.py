import pytest
import torch

from gptforge.config import ModelConfig
from gptforge.errors import UserError
from gptforge.model import GPT
from gptforge.weights import load_weights, read_weights, save_weights


def test_round_trip_keeps_logits_config_and_tie(tmp_path, tiny_config):
    torch.manual_seed(0)
    model = GPT(tiny_config).eval()
    path = tmp_path / "model.safetensors"
    save_weights(model, path)
    loaded = load_weights(path).eval()
    assert loaded.config == tiny_config
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    idx = torch.randint(0, 101, (2, 12))
    assert torch.equal(model(idx)[0], loaded(idx)[0])
    _, tensors = read_weights(path)
    assert "lm_head.weight" not in tensors


def test_truncated_file_is_a_user_error(tmp_path, tiny_config):
    path = tmp_path / "model.safetensors"
    save_weights(GPT(tiny_config), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated"):
        load_weights(path)


def test_shape_mismatch_names_the_tensor(tmp_path, tiny_config):
    from gptforge.weights import load_state_into, model_state_for_saving
    other = GPT(ModelConfig(vocab_size=101, block_size=32, n_layer=2, n_head=2, n_embd=32))
    with pytest.raises(UserError, match=r"c_attn.bias has shape \(96,\), the model needs \(48,\)"):
        load_state_into(GPT(tiny_config), model_state_for_saving(other), "x.safetensors")
