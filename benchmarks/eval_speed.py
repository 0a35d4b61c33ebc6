"""HellaSwag scoring speed of GPT-2 small (124M, random weights) on this machine: examples per second at batch
1 and batch 16, gptforge's scorer beside Hugging Face transformers' GPT2LMHeadModel doing the same work (one
full forward per (context, ending) request, log_softmax over every position) in the same run.

    .venv/bin/python benchmarks/eval_speed.py [--items 32] [--threads 2] [--no-hf]

Needs the GPT-2 ranks (GPTFORGE_GPT2_RANKS or `gptforge tokenizer fetch-gpt2`).
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from gptforge.config import get_preset
from gptforge.evals.hellaswag import TARGET_DELIMITER, evaluate_hellaswag, load_hellaswag
from gptforge.evals.scoring import encode_pair
from gptforge.model import GPT
from gptforge.tokenizer import get_tokenizer

WORDS = ("the man woman dog car kitchen slowly quickly picks up puts down walks runs over into a bowl of water "
         "then she he they continues removing snow window table chair ball court player net").split()


def synthetic_hellaswag(path: Path, n: int, seed: int = 0) -> None:
    """Items shaped like the real validation set: ~40-word contexts, four ~12-word endings."""
    rng = random.Random(seed)
    words = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps({"activity_label": words(2), "ctx_a": words(rng.randint(25, 45)) + ".",
                                "ctx_b": words(4), "endings": [words(rng.randint(6, 18)) + "." for _ in range(4)],
                                "label": rng.randrange(4)}) + "\n")


@torch.inference_mode()
def hf_reference(hf_model, tok, items, batch_size: int) -> None:
    """The straightforward way: right-padded full forwards, log_softmax at every position, then gather."""
    requests = [encode_pair(tok, item.query, TARGET_DELIMITER + c) for item in items for c in item.choices]
    for start in range(0, len(requests), batch_size):
        batch = requests[start:start + batch_size]
        seqs = [(c + k)[:-1] for c, k in batch]
        longest = max(map(len, seqs))
        idx = torch.zeros(len(seqs), longest, dtype=torch.long)
        mask = torch.zeros(len(seqs), longest, dtype=torch.long)
        for row, s in enumerate(seqs):
            idx[row, :len(s)] = torch.tensor(s)
            mask[row, :len(s)] = 1
        logprobs = F.log_softmax(hf_model(idx, attention_mask=mask).logits.float(), dim=-1)
        for row, (c, k) in enumerate(batch):
            pos = torch.arange(len(c) - 1, len(c) + len(k) - 1)
            logprobs[row, pos, torch.tensor(k)].sum()


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers reference")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tok = get_tokenizer("gpt2")
    model = GPT(get_preset("gpt2")).eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "hellaswag.jsonl"
        synthetic_hellaswag(path, args.items)
        items, _, _ = load_hellaswag(str(path))
    hf_model = None
    if not args.no_hf:
        from transformers import GPT2Config, GPT2LMHeadModel
        hf_model = GPT2LMHeadModel(GPT2Config()).eval()
    n_tokens = sum(len(sum(encode_pair(tok, i.query, " " + c), [])) for i in items for c in i.choices)
    print(f"gpt2 (124M, random weights), {len(items)} synthetic hellaswag items, {4 * len(items)} requests, "
          f"{n_tokens} tokens, fp32, {args.threads} threads")
    evaluate_hellaswag(model, tok, items[:2], batch_size=2)  # warm-up
    rows = []
    for batch_size in (1, 16):
        ours = timed(lambda: evaluate_hellaswag(model, tok, items, batch_size=batch_size))
        ref = timed(lambda: hf_reference(hf_model, tok, items, batch_size)) if hf_model is not None else None
        rows.append((batch_size, len(items) / ours, len(items) / ref if ref else None))
    print(f"{'batch':>5}  {'gptforge items/s':>16}  {'transformers items/s':>20}  {'speed-up':>8}")
    for batch_size, ours, ref in rows:
        ref_cell = f"{ref:20.2f}" if ref else f"{'-':>20}"
        speed = f"{ours / ref:7.2f}x" if ref else f"{'-':>8}"
        print(f"{batch_size:>5}  {ours:16.2f}  {ref_cell}  {speed}")


if __name__ == "__main__":
    main()
