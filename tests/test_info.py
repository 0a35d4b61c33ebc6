import subprocess
import sys

import pytest

from gptforge.config import ModelConfig, get_preset
from gptforge.info import (flops_per_token, inference_memory, kv_cache_bytes, mean_attended_keys, parameter_counts,
                           training_memory)
from gptforge.model import GPT


@pytest.mark.parametrize("fields", [
    dict(),
    dict(bias=False),
    dict(qkv_bias=False),
    dict(norm="post"),
    dict(d_ff=40, attention="alternating", window=4),
])
def test_analytic_parameter_count_equals_the_built_model(fields):
    config = ModelConfig(vocab_size=77, block_size=16, n_layer=3, n_head=2, n_embd=16, **fields)
    model = GPT(config)
    counts = parameter_counts(config)
    assert counts["total"] == model.num_parameters()
    assert counts["non_embedding"] == model.num_parameters(include_embeddings=False)


def test_gpt2_count():
    assert parameter_counts(get_preset("gpt2"))["total"] == 124_439_808


def test_mean_attended_keys_by_brute_force():
    for seq_len, window in [(10, None), (10, 3), (10, 10), (7, 12), (2048, 256)]:
        brute = sum(min(t + 1, window or seq_len + 1) for t in range(seq_len)) / seq_len
        assert mean_attended_keys(seq_len, window) == pytest.approx(brute)


def test_flops_by_hand_for_a_tiny_model():
    config = ModelConfig(vocab_size=10, block_size=4, n_layer=1, n_head=1, n_embd=2, d_ff=8)
    # matmul weights: 3*2*2 (qkv) + 2*2 (proj) + 2*8 + 8*2 (mlp) + 10*2 (head) = 68
    # attention: 4 * d * mean keys (1+2+3+4)/4 = 4 * 2 * 2.5 = 20
    flops = flops_per_token(config, 4)
    assert flops["n_matmul"] == 68
    assert flops["forward"] == 2 * 68 + 20
    assert flops["train"] == 3 * (2 * 68 + 20)


def test_band_layers_cost_less_and_cache_less():
    dense = get_preset("gpt2")
    dense.block_size = 2048
    band = get_preset("gpt3-small")
    assert flops_per_token(band, 2048)["forward"] < flops_per_token(dense, 2048)["forward"]
    # 12 layers: 6 dense keep 2048 positions, 6 band keep 256
    assert kv_cache_bytes(band, 1, 2048, "bf16") == 2 * 768 * 2 * (6 * 2048 + 6 * 256)


def test_memory_estimates_have_the_adam_rule_of_thumb():
    config = get_preset("gpt2")
    estimate = training_memory(config, micro_batch=1, seq_len=64, dtype="fp32")
    padded = parameter_counts(config)["total"] + (config.padded_vocab_size - config.vocab_size) * config.n_embd
    assert estimate.parts["weights (fp32)"] + estimate.parts["gradients (fp32)"] + \
        estimate.parts["AdamW state (fp32 m, v)"] == 16 * padded
    assert inference_memory(config, 1, 1024, "bf16").parts["weights (bf16)"] == 2 * 124_439_808


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gptforge", *args], capture_output=True, text=True, timeout=120)


def test_info_cli_reports_and_rejects_bad_input():
    ok = _cli("info", "--preset", "dev-17m")
    assert ok.returncode == 0 and "17,867,008" in ok.stdout and "per GPU" not in ok.stdout
    for args, needle in [(("--preset", "gpt5"), "unknown preset"),
                         (("--set", "n_head=7"), "not divisible"),
                         (("--preset", "gpt3-small", "--set", "window=0"), "window")]:
        bad = _cli("info", *args)
        assert bad.returncode == 2
        assert bad.stderr.count("\n") == 1 and needle in bad.stderr and "Traceback" not in bad.stderr


def test_info_shows_per_gpu_memory_for_a_world_size():
    from gptforge.info import format_distributed, human_bytes
    from gptforge.memory import per_gpu_memory
    config = get_preset("gpt3-xl")
    text = format_distributed(config, 8, 4, 2048, "bf16")
    for parallel in ("ddp", "fsdp"):
        for checkpointing in (False, True):
            total = per_gpu_memory(config, 8, 4, 2048, parallel, "bf16", checkpointing)["total"]
            assert human_bytes(total) in text
    fsdp_line = next(line for line in text.splitlines() if line.strip().startswith("FSDP2"))
    ddp_line = next(line for line in text.splitlines() if line.strip().startswith("DDP"))
    assert fsdp_line != ddp_line
    cli = _cli("info", "--preset", "gpt3-xl", "--world-size", "8", "--batch-size", "4")
    assert cli.returncode == 0 and "per GPU, 8 GPUs" in cli.stdout
