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


def test_per_gpu_memory_matches_a_hand_count_for_a_tiny_model():
    from gptforge.memory import per_gpu_memory
    # vocab 60 pads to 64 rows. By hand: wte 64·8 = 512, wpe 16·8 = 128, ln_f 16 -> root R = 656; per block
    # ln_1 16 + c_attn 8·24+24 + attn c_proj 8·8+8 + ln_2 16 + c_fc 8·32+32 + mlp c_proj 32·8+8 = 872 = L.
    config = ModelConfig(vocab_size=60, block_size=16, n_layer=2, n_head=2, n_embd=8)
    P, R, L = 656 + 2 * 872, 656, 872
    without_activations = lambda r: r["total"] - next(v for k, v in r["parts"].items() if k.startswith("activations"))
    ddp = per_gpu_memory(config, 4, 2, parallel="ddp", precision="fp32")
    fsdp = per_gpu_memory(config, 4, 2, parallel="fsdp", precision="fp32")
    assert ddp["params"] == fsdp["params"] == P == 2400
    # DDP: weights 4P + grads 4P + AdamW 8P, plus 4P of gradient buckets (no autocast copies in fp32)
    assert without_activations(ddp) == 16 * P + 4 * P
    # FSDP2 on 4 ranks: 16P/4 sharded, fp32 gathered root + two blocks, two blocks' fp32 unsharded gradients
    assert without_activations(fsdp) == 16 * P // 4 + 4 * (R + 2 * L) + 2 * 4 * L
    assert without_activations(fsdp) == 9600 + 9600 + 6976


def test_info_shows_per_gpu_memory_for_a_world_size():
    from gptforge.memory import format_distributed
    from gptforge.units import human_bytes
    from gptforge.memory import per_gpu_memory
    config = get_preset("gpt3-xl")
    text = format_distributed(config, 8, 4, 2048, "bf16")
    lines = {name: next(line for line in text.splitlines() if line.strip().startswith(name))
             for name in ("DDP", "FSDP2")}
    for parallel, name in (("ddp", "DDP"), ("fsdp", "FSDP2")):
        totals = [per_gpu_memory(config, 8, 4, 2048, parallel, "bf16", ckpt)["total"] for ckpt in (False, True)]
        assert lines[name].split()[-4:] == [*human_bytes(totals[0]).split(), *human_bytes(totals[1]).split()]
    # 1.3B parameters: a DDP replica's 16 bytes/param (~21 GB) alone outweighs FSDP2's 1/8 share plus buffers
    for ckpt in (False, True):
        fsdp, ddp = (per_gpu_memory(config, 8, 4, 2048, p, "bf16", ckpt)["total"] for p in ("fsdp", "ddp"))
        assert fsdp < ddp
    cli = _cli("info", "--preset", "gpt3-xl", "--world-size", "8", "--batch-size", "4")
    assert cli.returncode == 0 and "per GPU, 8 GPUs" in cli.stdout


def test_output_head_memory_by_hand_and_bounded_in_the_batch():
    from gptforge.fused_loss import CHUNK_BYTES
    from gptforge.info import output_head_bytes
    config = ModelConfig(vocab_size=100, block_size=16, n_layer=1, n_head=1, n_embd=8)  # padded to 128
    # 10 tokens fit one chunk: bf16 logits + fp32 copy + fp32 log-softmax, per token and padded vocab entry;
    # then fp32 grad_h (10x8), fp32 grad_W (128x8) and its bf16 partial
    assert output_head_bytes(config, 10, "bf16") == 10 * 128 * (2 + 4 + 4) + 4 * 10 * 8 + 4 * 128 * 8 + 2 * 128 * 8
    assert output_head_bytes(config, 10, "fp32") == 10 * 128 * (4 + 4) + 4 * 10 * 8 + 4 * 128 * 8
    gpt2 = get_preset("gpt2")
    small, large = output_head_bytes(gpt2, 4 * 256, "bf16"), output_head_bytes(gpt2, 64 * 1024, "bf16")
    # 64x the tokens: the chunk buffers stay within one chunk's budget (x2.5 buffers); only grad_h grows
    assert small - 4 * 4 * 256 * 768 <= 2.5 * CHUNK_BYTES + 6 * gpt2.padded_vocab_size * 768
    assert large - 4 * 64 * 1024 * 768 <= 2.5 * CHUNK_BYTES + 6 * gpt2.padded_vocab_size * 768
