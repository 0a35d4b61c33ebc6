"""Generation speed beside references measured in the same run: decode tokens/s against Hugging Face
GPT2LMHeadModel.generate (same weights), and `gptforge sample`'s start-up against a nanoGPT-style sample.py.

Decode. Our random GPT-2 124M weights are copied into the HF model (nn.Linear -> Conv1D transposed, padded
vocabulary rows dropped); before timing, the two models' logits on one prompt are compared (the max
difference is printed; greedy tokens are not, since random weights give near-ties that verify nothing).
Ours runs as `gptforge sample` runs it (`prepare_for_decoding`: linear layers through oneDNN with prepacked weights on
CPU). HF gets its best settings: the fused `gelu_pytorch_tanh` (the same function as GPT-2's `gelu_new`, one
kernel), SDPA attention (its default), its KV cache. Both decode greedily a fixed number of new tokens from
the same random prompts, alternating A/B `--samples` times per cell; the table shows each one's median
tokens/s and the median (min-max) of the per-sample ratios, so one sample disturbed by a busy machine does not
decide a cell. The roofline column is the memory-bandwidth bound: weight bytes read per decode step against
this machine's streaming-read bandwidth measured in the same run (no implementation reading every weight once
per step can beat it; at batch 1 decoding is bandwidth-bound).

Start-up. `gptforge sample --stream` on a small model file (4 layers of 128, GPT-2's vocabulary) against a
reference written here the way nanoGPT's sample.py works (import torch and tiktoken, build the model with its
initialisation, load the weights, generate by re-running the whole context each token, print): wall time of
the process and time to first token (first generated text on stdout), fresh processes, alternating, medians.

    python benchmarks/generate_speed.py                        # CPU: batch 1 and 8, fp32 and bf16, start-up
    python benchmarks/generate_speed.py --new-tokens 32 --samples 3 --batch 1   # quick
    python benchmarks/generate_speed.py --cuda                 # GPU: bf16, batch 1 and 64
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gptforge.config import ModelConfig, get_preset  # noqa: E402
from gptforge.generation import SamplingConfig, generate_ids, prepare_for_decoding  # noqa: E402
from gptforge.model import GPT  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def to_hf(model: GPT):
    """A transformers GPT2LMHeadModel holding exactly `model`'s weights, with HF's fastest GELU."""
    from transformers import GPT2Config, GPT2LMHeadModel

    c = model.config
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd,
                                    n_layer=c.n_layer, n_head=c.n_head, n_inner=c.ffn_dim,
                                    layer_norm_epsilon=c.layer_norm_eps, activation_function="gelu_pytorch_tanh",
                                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    state = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            continue
        if name == "transformer.wte.weight":
            tensor = tensor[: c.vocab_size]
        elif name.endswith(".weight") and any(k in name for k in ("c_attn", "c_proj", "c_fc")):
            tensor = tensor.t()  # nn.Linear (out, in) -> Conv1D (in, out)
        state[name] = tensor.contiguous()
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [m for m in missing if m != "lm_head.weight" and not m.endswith(("attn.bias", "masked_bias"))]
    assert not missing and not unexpected, (missing, unexpected)
    hf.tie_weights()
    return hf.eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_ours(model: GPT, prompts: torch.Tensor, new_tokens: int, **options) -> float:
    config = SamplingConfig(max_new_tokens=new_tokens, temperature=0.0, stop_at_eot=False)
    start = time.perf_counter()
    generate_ids(model, prompts.tolist(), config, **options)
    _sync(prompts.device)
    return time.perf_counter() - start


def time_hf(hf, prompts: torch.Tensor, new_tokens: int) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None)
    _sync(prompts.device)
    return time.perf_counter() - start


def max_logit_difference(model: GPT, hf, prompts: torch.Tensor) -> float:
    with torch.inference_mode():
        ours, _ = model(prompts)
        theirs = hf(prompts).logits
    return float((ours.float() - theirs.float()).abs().max())


def read_bandwidth(device: torch.device, mbytes: int = 512, repeats: int = 5) -> float:
    """Bytes/s of a streaming read (a sum over a buffer far larger than any cache), best of `repeats`."""
    buffer = torch.ones(mbytes * 2**20 // 4, device=device)
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        buffer.sum()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return buffer.numel() * 4 / best


def decode_bytes(model: GPT) -> int:
    """Weight bytes one decode step reads: every matrix and vector once, the output head over the real
    vocabulary, and one row of each embedding (negligible)."""
    c = model.config
    element = model.transformer.wte.weight.element_size()
    per_step = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("transformer.w"))
    return (per_step + c.vocab_size * c.n_embd) * element


def decode_table(args: argparse.Namespace, device: torch.device) -> None:
    batches = [int(b) for b in (args.batch or ("1,64" if args.cuda else "1,8")).split(",")]
    dtypes = (args.dtype or ("bf16" if args.cuda else "fp32,bf16")).split(",")
    options = dict(static=args.static, cuda_graph=args.cuda_graph)
    torch.manual_seed(0)
    base = GPT(get_preset(args.preset)).eval()
    hf_base = None if args.no_hf else to_hf(base)
    bandwidth = read_bandwidth(device)
    print(f"{args.preset}: {base.num_parameters() / 1e6:.1f}M parameters, device {device}, "
          f"{torch.get_num_threads()} CPU threads, torch {torch.__version__}; greedy, prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens, {args.samples} alternating samples per cell, options {options}; "
          f"streaming read {bandwidth / 1e9:.1f} GB/s", flush=True)
    rows = []
    for dtype_name in dtypes:
        # what `gptforge sample` runs: the loaded model, prepared for decoding (CPU: oneDNN prepacked weights)
        model = prepare_for_decoding(copy.deepcopy(base).to(device=device, dtype=DTYPES[dtype_name]))
        hf = None if hf_base is None else hf_base.to(device=device, dtype=DTYPES[dtype_name])
        roofline_step = bandwidth / decode_bytes(model)
        for batch in batches:
            g = torch.Generator().manual_seed(batch)
            prompts = torch.randint(0, base.config.vocab_size, (batch, args.prompt_len), generator=g).to(device)
            if hf is not None:
                print(f"  {dtype_name} batch {batch}: max |logit difference| vs HF "
                      f"{max_logit_difference(model, hf, prompts):.2e}", flush=True)
            time_ours(model, prompts[:, :4], 4, **options)  # warm-up (allocator, kernels)
            if hf is not None:
                time_hf(hf, prompts[:, :4], 4)
            ours, theirs, ratios = [], [], []
            for _ in range(args.samples):
                ours.append(batch * args.new_tokens / time_ours(model, prompts, args.new_tokens, **options))
                if hf is not None:
                    theirs.append(batch * args.new_tokens / time_hf(hf, prompts, args.new_tokens))
                    ratios.append(ours[-1] / theirs[-1])
            rows.append((dtype_name, batch, ours, theirs, ratios, batch * roofline_step))
            print(_decode_row(rows[-1]), flush=True)
    print()
    print("| dtype | batch | gptforge tok/s | HF generate tok/s | ratio, median (min-max) | memory roofline tok/s "
          "| gptforge / roofline |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(_decode_row(r))


def _decode_row(r) -> str:
    dtype, batch, ours, theirs, ratios, roofline = r
    ours_m = statistics.median(ours)
    hf_text = f"{statistics.median(theirs):.1f}" if theirs else "-"
    ratio = f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})" if ratios else "-"
    return f"| {dtype} | {batch} | {ours_m:.1f} | {hf_text} | {ratio} | {roofline:.1f} | {ours_m / roofline:.0%} |"


# ---- start-up: `gptforge sample` against a nanoGPT-style sample.py --------------------------------------------

REFERENCE_SAMPLE = r'''
import base64, math, sys
import tiktoken
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

weights, ranks, prompt, max_new = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
L, H, C, T, V = 4, 4, 128, 256, 50304


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(C), nn.LayerNorm(C)
        self.attn, self.mlp = nn.Module(), nn.Module()
        self.attn.c_attn, self.attn.c_proj = nn.Linear(C, 3 * C), nn.Linear(C, C)
        self.mlp.c_fc, self.mlp.c_proj = nn.Linear(C, 4 * C), nn.Linear(4 * C, C)

    def forward(self, x):
        B, t, _ = x.shape
        q, k, v = self.attn.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (z.view(B, t, H, C // H).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, t, C)
        x = x + self.attn.c_proj(y)
        return x + self.mlp.c_proj(F.gelu(self.mlp.c_fc(self.ln_2(x)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(self):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(wte=nn.Embedding(V, C), wpe=nn.Embedding(T, C),
                                              h=nn.ModuleList(Block() for _ in range(L)), ln_f=nn.LayerNorm(C)))
        self.lm_head = nn.Linear(C, V, bias=False)
        self.lm_head.weight = self.transformer.wte.weight
        for name, p in self.named_parameters():  # nanoGPT's initialisation, overwritten by the load below
            if p.dim() == 2:
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * L) if name.endswith("c_proj.weight") else 0.02)

    def forward(self, idx):
        x = self.transformer.wte(idx) + self.transformer.wpe(torch.arange(idx.size(1)))
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x[:, -1]))


torch.manual_seed(1337)
model = GPT()
model.load_state_dict(load_file(weights), strict=False)
model.eval()
mergeable = {base64.b64decode(tok): int(rank)
             for tok, rank in (line.split() for line in open(ranks, "rb").read().splitlines() if line)}
enc = tiktoken.Encoding("gpt2", pat_str=r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
                        mergeable_ranks=mergeable, special_tokens={"<|endoftext|>": 50256})
idx = torch.tensor([enc.encode(prompt)])
print(prompt, end="", flush=True)
with torch.no_grad():
    for _ in range(max_new):  # nanoGPT's generate: the whole (cropped) context every token, no cache
        logits = model(idx[:, -T:])[:, :50257] / 0.8
        token = torch.multinomial(F.softmax(logits, dim=-1), 1)
        idx = torch.cat([idx, token], dim=1)
        print(enc.decode([int(token)]), end="", flush=True)
print()
'''


def timed_process(cmd: list[str], prompt: str, env: dict) -> tuple[float, float]:
    """(time to first generated text, wall time) of a fresh process that prints the prompt, then the text."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    seen, first = b"", None
    want = len(prompt.encode())
    while True:
        chunk = os.read(proc.stdout.fileno(), 65536)
        if not chunk:
            break
        seen += chunk
        if first is None and len(seen) > want:
            first = time.perf_counter() - start
    proc.wait()
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[:4]} failed: {proc.stderr.read().decode()[-2000:]}")
    return (first if first is not None else wall), wall


def startup_table(args: argparse.Namespace) -> None:
    from gptforge.tokenizer.gpt2 import find_gpt2_ranks
    from gptforge.weights import save_weights

    ranks_path = str(find_gpt2_ranks())  # the file gptforge itself would use, so both read the same ranks
    prompt = "Once upon a time"
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        weights = Path(tmp) / "model.safetensors"
        save_weights(GPT(ModelConfig(vocab_size=50257, block_size=256, n_layer=4, n_head=4, n_embd=128)), weights)
        reference = Path(tmp) / "nanogpt_style_sample.py"
        reference.write_text(REFERENCE_SAMPLE)
        threads = str(args.threads or 1)
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": threads}
        ours_cmd = [sys.executable, "-m", "gptforge", "sample", "--model", str(weights), prompt, "--stream",
                    "--max-new-tokens", str(args.startup_tokens), "--temperature", "0.8", "--no-stop-at-eot",
                    "--seed", "1", "--device", "cpu"]
        ref_cmd = [sys.executable, str(reference), str(weights), ranks_path, prompt, str(args.startup_tokens)]
        ours, ref = [], []
        for _ in range(args.samples):
            ours.append(timed_process(ours_cmd, prompt, env))
            ref.append(timed_process(ref_cmd, prompt, env))
    print(f"\nstart-up: {args.startup_tokens} new tokens, 4 layers of 128 + GPT-2 vocabulary, {threads} thread(s), "
          f"{args.samples} alternating fresh processes each; medians")
    print("| program | time to first token s | wall s |")
    print("|---|---|---|")
    for name, runs in (("gptforge sample --stream", ours), ("nanoGPT-style sample.py", ref)):
        print(f"| {name} | {statistics.median(r[0] for r in runs):.2f} | {statistics.median(r[1] for r in runs):.2f} |")
    ratios = [o[1] / r[1] for o, r in zip(ours, ref)]
    print(f"wall-time ratio gptforge / reference: median {statistics.median(ratios):.2f} "
          f"({min(ratios):.2f}-{max(ratios):.2f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="gpt2")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--samples", type=int, default=5, help="alternating samples per cell (default 5)")
    parser.add_argument("--batch", default=None, help="comma-separated batch sizes (default 1,8; with --cuda 1,64)")
    parser.add_argument("--dtype", default=None, help="comma-separated: fp32,bf16 (default both; with --cuda bf16)")
    parser.add_argument("--cuda", action="store_true", help="run on the GPU")
    parser.add_argument("--static", action="store_true", help="fixed-shape decode steps (static cache)")
    parser.add_argument("--cuda-graph", action="store_true", help="replay decode steps as a CUDA graph (implies --static)")
    parser.add_argument("--no-hf", action="store_true", help="skip the Hugging Face reference")
    parser.add_argument("--no-decode", action="store_true", help="only the start-up table")
    parser.add_argument("--no-startup", action="store_true", help="only the decode table")
    parser.add_argument("--startup-tokens", type=int, default=200)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice; "
                        "start-up processes: 1)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.cuda else "cpu")
    if not args.no_decode:
        decode_table(args, device)
    if not args.no_startup and not args.cuda:
        startup_table(args)


if __name__ == "__main__":
    main()
