"""Checkpoints: round trip, checksums, corrupt newest skipped, failed write leaves the previous one, shape
mismatch named."""

from __future__ import annotations

import errno
import json

import pytest
import torch

from gptforge.config import ModelConfig, TrainConfig
from gptforge.errors import UserError
from gptforge.model import GPT
from gptforge.training import checkpoint as ckpt
from gptforge.training.optim import build_optimizer, optimizers_of
from gptforge.training.rng import capture_rng, restore_rng
from gptforge.training.step import clip_and_step, forward_backward


def _trained(config: ModelConfig, seed: int = 0, optimizer: str = "adamw"):
    torch.manual_seed(seed)
    model = GPT(config)
    opt = build_optimizer(model, TrainConfig(lr=1e-2, optimizer=optimizer), "cpu")
    x = torch.randint(0, config.vocab_size, (2, 9))
    loss = forward_backward(model, [(x[:, :-1], x[:, 1:])], 1, torch.device("cpu"), "fp32")
    clip_and_step(model, opt, loss, 1.0)
    return model, opt


def _save(run_dir, step, model, opt, keep=3):
    return ckpt.save_checkpoint(run_dir, step, model, opt, {"step": step, "rng": capture_rng()}, keep=keep)


def test_round_trip_restores_weights_optimizer_and_rng(tmp_path, tiny_config):
    model, opt = _trained(tiny_config)
    path = _save(tmp_path, 7, model, opt)
    assert ckpt.verify_checkpoint(path) is None
    expected_next = torch.rand(3)
    fresh = GPT(tiny_config)
    fresh_opt = build_optimizer(fresh, TrainConfig(lr=1e-2), "cpu")
    state = ckpt.load_checkpoint(path, fresh, fresh_opt)
    restore_rng(state["rng"])
    assert torch.equal(torch.rand(3), expected_next)
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    a, b = opt.state_dict(), fresh_opt.state_dict()
    assert a["state"].keys() == b["state"].keys()
    for i in a["state"]:
        for key in a["state"][i]:
            assert torch.equal(torch.as_tensor(a["state"][i][key]), torch.as_tensor(b["state"][i][key]))
    assert sorted(p.name for p in path.iterdir()) == sorted([*ckpt.REQUIRED_FILES, ckpt.CHECKSUMS_FILE])


def test_muon_state_round_trips_by_name_and_the_next_step_is_identical(tmp_path, tiny_config):
    model, opt = _trained(tiny_config, optimizer="muon")
    path = _save(tmp_path, 1, model, opt)
    fresh = GPT(tiny_config)
    fresh_opt = build_optimizer(fresh, TrainConfig(lr=1e-2, optimizer="muon"), "cpu")
    ckpt.load_checkpoint(path, fresh, fresh_opt)
    muon, fresh_muon = optimizers_of(opt)[1], optimizers_of(fresh_opt)[1]
    name = "transformer.h.1.mlp.c_fc.weight"
    p, q = dict(model.named_parameters())[name], dict(fresh.named_parameters())[name]
    assert torch.equal(muon.state[p]["momentum_buffer"], fresh_muon.state[q]["momentum_buffer"])
    assert muon.state[p]["momentum_buffer"].abs().sum() > 0
    x = torch.randint(0, tiny_config.vocab_size, (2, 9))
    for m, o in ((model, opt), (fresh, fresh_opt)):  # one more step from each: bit for bit the same
        loss = forward_backward(m, [(x[:, :-1], x[:, 1:])], 1, torch.device("cpu"), "fp32")
        clip_and_step(m, o, loss, 1.0)
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k


@pytest.mark.parametrize("saved,resumed", [("muon", "adamw"), ("adamw", "muon")])
def test_resuming_with_the_other_optimizer_names_the_setting(tmp_path, tiny_config, saved, resumed):
    model, opt = _trained(tiny_config, optimizer=saved)
    path = _save(tmp_path, 1, model, opt)
    other = GPT(tiny_config)
    with pytest.raises(UserError, match=f"train.optimizer={saved}.*train.optimizer={resumed}.*"
                                        f"--set train.optimizer={saved}"):
        ckpt.load_checkpoint(path, other, build_optimizer(other, TrainConfig(optimizer=resumed), "cpu"))


def test_keeps_last_k(tmp_path, tiny_config):
    model, opt = _trained(tiny_config)
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, model, opt, keep=2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [3, 4]


@pytest.mark.parametrize("damage", ["truncate", "flip", "remove_sums"])
def test_corrupt_newest_is_reported_and_skipped(tmp_path, tiny_config, damage):
    model, opt = _trained(tiny_config)
    _save(tmp_path, 1, model, opt)
    newest = _save(tmp_path, 2, model, opt)
    weights = newest / "model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "flip":
        data = bytearray(weights.read_bytes())
        data[-5] ^= 0xFF
        weights.write_bytes(bytes(data))
    else:
        (newest / ckpt.CHECKSUMS_FILE).unlink()
    reports = []
    assert ckpt.latest_valid_checkpoint(tmp_path, report=reports.append) == ckpt.checkpoint_dir(tmp_path, 1)
    assert len(reports) == 1 and "step_2" in reports[0]
    with pytest.raises(UserError, match="unusable"):
        ckpt.load_checkpoint(newest, GPT(tiny_config))


def test_disk_full_mid_write_keeps_previous_checkpoint(tmp_path, tiny_config, monkeypatch):
    model, opt = _trained(tiny_config)
    _save(tmp_path, 1, model, opt)
    real_save_file = ckpt.save_file

    def full_disk(tensors, filename, metadata=None):
        real_save_file(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:
            f.truncate(10)  # a partial file, then the error
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "save_file", full_disk)
    with pytest.raises(OSError):
        _save(tmp_path, 2, model, opt)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [1]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
    latest = ckpt.latest_valid_checkpoint(tmp_path)
    assert latest == ckpt.checkpoint_dir(tmp_path, 1)
    ckpt.load_checkpoint(latest, GPT(tiny_config), build_optimizer(GPT(tiny_config), TrainConfig(), "cpu"))


def test_different_model_shape_names_the_fields(tmp_path, tiny_config):
    model, opt = _trained(tiny_config)
    path = _save(tmp_path, 1, model, opt)
    other = ModelConfig(vocab_size=101, block_size=32, n_layer=3, n_head=2, n_embd=16)
    with pytest.raises(UserError, match=r"n_layer: 2 in the checkpoint vs 3 now"):
        ckpt.load_checkpoint(path, GPT(other))


def test_state_json_is_plain_json(tmp_path, tiny_config):
    model, opt = _trained(tiny_config)
    path = _save(tmp_path, 3, model, opt)
    state = json.loads((path / "state.json").read_text())
    assert state["step"] == 3 and set(state["rng"]) >= {"python", "numpy", "torch"}


class FakeCuda:
    """torch.cuda's generator functions for `visible` GPUs, on CPU: each generator state is a byte tensor."""

    def __init__(self, monkeypatch, visible: int, current: int = 0) -> None:
        self.states = {i: torch.full((16,), i + 1, dtype=torch.uint8) for i in range(visible)}
        self.current = current
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: self.current)
        monkeypatch.setattr(torch.cuda, "get_rng_state", self.get)
        monkeypatch.setattr(torch.cuda, "set_rng_state", self.set)

    def _index(self, device):
        if isinstance(device, int):
            index = device
        else:
            index = torch.device(device).index
            index = self.current if index is None else index
        if index not in self.states:
            raise IndexError(f"no GPU {index}")  # what torch.cuda raises for a device that is not visible
        return index

    def get(self, device="cuda"):
        return self.states[self._index(device)].clone()

    def set(self, state, device="cuda"):
        self.states[self._index(device)] = state.clone()


def test_only_the_training_devices_cuda_generator_is_saved(monkeypatch):
    """Saving every visible GPU's generator made the state unrestorable where fewer GPUs are visible."""
    import base64
    cuda = FakeCuda(monkeypatch, visible=4)
    state = capture_rng(torch.device("cuda", 2))
    assert base64.b64decode(state["cuda_device"]) == bytes([3] * 16) and "cuda" not in state
    cuda.current = 1
    assert base64.b64decode(capture_rng(torch.device("cuda"))["cuda_device"]) == bytes([2] * 16)
    assert "cuda_device" not in capture_rng(torch.device("cpu"))

    one_gpu = FakeCuda(monkeypatch, visible=1)  # resumed on a machine with one GPU
    restore_rng(state, torch.device("cuda", 0))
    assert one_gpu.states[0].tolist() == [3] * 16


def test_a_state_of_every_visible_gpu_written_before_is_still_read(monkeypatch):
    import base64
    old = capture_rng()
    old["cuda"] = [base64.b64encode(bytes([10 + i] * 16)).decode() for i in range(4)]  # 4 GPUs were visible
    cuda = FakeCuda(monkeypatch, visible=2)
    restore_rng(old, torch.device("cuda", 1))  # this rank trains on its own GPU: its entry is taken
    assert cuda.states[1].tolist() == [11] * 16 and cuda.states[0].tolist() == [1] * 16
    del old["cuda"][1:]
    with pytest.raises(UserError, match=r"covers 1 GPU\(s\), none for cuda:1 .*CUDA_VISIBLE_DEVICES") as e:
        restore_rng(old, torch.device("cuda", 1))
    assert "\n" not in str(e.value)
