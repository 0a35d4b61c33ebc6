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


def test_loading_draws_no_random_numbers_and_does_not_import_dynamo(tmp_path, tiny_config):
    """Loaded weights are assigned, not copied over an initialised model: the global RNG is untouched (no
    initialisation ran) and torch._dynamo, which initialising on the meta device imports (~1 s at load and
    more at exit), stays unimported. Checked in a fresh interpreter, where nothing imported it before."""
    import subprocess
    import sys

    path = tmp_path / "model.safetensors"
    save_weights(GPT(tiny_config), path)
    code = ("import sys, torch; torch.manual_seed(3); from gptforge.weights import load_weights; "
            f"m = load_weights({str(path)!r}); x = torch.rand(1).item(); torch.manual_seed(3); "
            "print('torch._dynamo' in sys.modules, x == torch.rand(1).item())")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "True"]
