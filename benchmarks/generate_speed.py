"""New tokens per second of gptforge generation beside Hugging Face GPT2LMHeadModel.generate, same weights.

Both generate greedily a fixed number of new tokens (no early stop) from the same random 16-token prompts,
in the same process, so the ratio is fair on a shared machine. Our random GPT-2 124M weights are copied
into the HF model (nn.Linear -> Conv1D transposed, padded vocabulary rows dropped) and the two are
checked to produce the same greedy tokens before anything is timed. A third column times only the
model's matrix products (every weight applied to the batch): at batch 1 that is the memory-bandwidth
ceiling of this machine for these weights, which no implementation can beat.

    python benchmarks/generate_speed.py                       # CPU: batch 1 and 8, fp32 and bf16
    python benchmarks/generate_speed.py --new-tokens 32       # quick run while developing
    python benchmarks/generate_speed.py --cuda                # GPU: bf16, batch 1 and 64
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gptforge.config import get_preset  # noqa: E402
from gptforge.generation import SamplingConfig, generate_ids  # noqa: E402
from gptforge.model import GPT  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def to_hf(model: GPT):
    """A transformers GPT2LMHeadModel holding exactly `model`'s weights."""
    from transformers import GPT2Config, GPT2LMHeadModel

    c = model.config
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd,
                                    n_layer=c.n_layer, n_head=c.n_head, n_inner=c.ffn_dim,
                                    layer_norm_epsilon=c.layer_norm_eps, activation_function="gelu_new",
                                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    ours = model.state_dict()
    state = {}
    for name, tensor in ours.items():
        if name == "lm_head.weight":
            continue
        if name == "transformer.wte.weight":
            tensor = tensor[: c.vocab_size]
        elif name.endswith(".weight") and any(k in name for k in ("c_attn", "c_proj", "c_fc")):
            tensor = tensor.t()  # nn.Linear (out, in) -> Conv1D (in, out)
        state[name] = tensor.contiguous()
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [m for m in missing if m != "lm_head.weight" and not m.endswith("attn.bias") and not m.endswith("masked_bias")]
    assert not missing and not unexpected, (missing, unexpected)
    hf.tie_weights()
    return hf.eval()


def time_ours(model: GPT, prompts: torch.Tensor, new_tokens: int, **options) -> tuple[float, list[list[int]]]:
    config = SamplingConfig(max_new_tokens=new_tokens, temperature=0.0, stop_at_eot=False)
    start = time.perf_counter()
    out = generate_ids(model, prompts.tolist(), config, **options)
    _sync(prompts.device)
    return time.perf_counter() - start, out


def time_hf(hf, prompts: torch.Tensor, new_tokens: int) -> tuple[float, list[list[int]]]:
    start = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None)
    _sync(prompts.device)
    return time.perf_counter() - start, out[:, prompts.size(1):].tolist()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_ceiling(model: GPT, batch: int, device: torch.device, repeats: int = 10) -> float:
    """Tokens/s of a decode step that did nothing but its matrix products: every weight matrix of the model
    (the output head over the real vocabulary included) applied to `batch` rows, in the model's dtype.

    At batch 1 each step must stream every weight from memory once, so this is the memory-bandwidth
    roofline: no implementation with these weights and this dtype decodes faster on this machine."""
    weights = [m.weight for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and name != "lm_head"]
    weights.append(model.lm_head.weight[: model.config.vocab_size])
    inputs = {w.shape[1]: torch.randn(batch, w.shape[1], device=device, dtype=w.dtype) for w in weights}

    def step() -> None:
        for w in weights:
            torch.nn.functional.linear(inputs[w.shape[1]], w)

    with torch.inference_mode():
        step()
        _sync(device)
        start = time.perf_counter()
        for _ in range(repeats):
            step()
        _sync(device)
    return batch * repeats / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="gpt2")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--batch", default=None, help="comma-separated batch sizes (default 1,8; with --cuda 1,64)")
    parser.add_argument("--dtype", default=None, help="comma-separated: fp32,bf16 (default both; with --cuda bf16)")
    parser.add_argument("--cuda", action="store_true", help="run on the GPU")
    parser.add_argument("--static", action="store_true", help="fixed-shape decode steps (static cache)")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="replay decode steps as a CUDA graph (implies --static; untested so far)")
    parser.add_argument("--no-hf", action="store_true", help="skip the Hugging Face reference")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.cuda else "cpu")
    batches = [int(b) for b in (args.batch or ("1,64" if args.cuda else "1,8")).split(",")]
    dtypes = (args.dtype or ("bf16" if args.cuda else "fp32,bf16")).split(",")

    options = dict(static=args.static, cuda_graph=args.cuda_graph)
    torch.manual_seed(0)
    base = GPT(get_preset(args.preset)).eval()
    hf_base = None if args.no_hf else to_hf(base)
    print(f"{args.preset}: {base.num_parameters() / 1e6:.1f}M parameters, device {device}, "
          f"{torch.get_num_threads()} CPU threads, torch {torch.__version__}; greedy, prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens, options {options}")
    rows = []
    for dtype_name in dtypes:
        dtype = DTYPES[dtype_name]
        model = base.to(device=device, dtype=dtype)
        hf = None if hf_base is None else hf_base.to(device=device, dtype=dtype)
        for batch in batches:
            g = torch.Generator().manual_seed(batch)
            prompts = torch.randint(0, base.config.vocab_size, (batch, args.prompt_len), generator=g).to(device)
            time_ours(model, prompts[:, :4], 4, **options)  # warm-up (allocator, kernels)
            ours_s, ours_out = time_ours(model, prompts, args.new_tokens, **options)
            ours_tps = batch * args.new_tokens / ours_s
            hf_tps = agree = None
            if hf is not None:
                time_hf(hf, prompts[:, :4], 4)
                hf_s, hf_out = time_hf(hf, prompts, args.new_tokens)
                hf_tps = batch * args.new_tokens / hf_s
                # identical greedy tokens up to the first place where rounding may flip a near-tie
                agree = sum(_common_prefix(a, b) for a, b in zip(ours_out, hf_out)) / (batch * args.new_tokens)
            ceiling = matmul_ceiling(model, batch, device)
            rows.append((dtype_name, batch, ours_tps, hf_tps, agree, ceiling))
            print(_row(rows[-1]), flush=True)
    print()
    print("| dtype | batch | gptforge tok/s | HF generate tok/s | ratio | same greedy tokens "
          "| matmul-only ceiling tok/s | gptforge / ceiling |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(_row(r))


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _row(r) -> str:
    dtype, batch, ours, hf, agree, ceiling = r
    hf_text = f"{hf:.1f}" if hf else "-"
    ratio = f"{ours / hf:.2f}x" if hf else "-"
    agree_text = f"{agree:.0%}" if agree is not None else "-"
    return (f"| {dtype} | {batch} | {ours:.1f} | {hf_text} | {ratio} | {agree_text} | {ceiling:.1f} "
            f"| {ours / ceiling:.0%} |")


if __name__ == "__main__":
    main()
