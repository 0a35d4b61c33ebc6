"""What SFT costs over pretraining on the same text: `prepare --chat` vs `prepare`, and a masked training step vs
a plain one of the same shape; plus how much of a packed batch is padding.

The conversations are `builtin:pystdlib-qa` (or --records FILE.jsonl). The pretraining reference is the same
conversations rendered as ChatML text, one `{"text": ...}` record each, prepared as ordinary text with the same
tokenizer: same text, same tokenizer, so the ratio is what the chat path (format check, per-message encoding,
masks, conversation index) adds. Both prepares run in this process with one worker, interleaved, `--repeats`
times; medians. The step comparison trains the same freshly initialised model shape on batches from
`ChatLoader` (targets -100 outside the assistant's tokens) and from `SequenceLoader`, interleaved; medians.

    .venv/bin/python benchmarks/sft_speed.py                      # gpt2 tokenizer, demo-sized model
    .venv/bin/python benchmarks/sft_speed.py --tokenizer runs/demo --seq-len 128
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _records(path: str | None) -> list[dict]:
    if path:
        return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    from gptforge.data.pystdlib_qa import qa_records
    return list(qa_records())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", help="a JSONL file of conversations (default: builtin:pystdlib-qa)")
    parser.add_argument("--tokenizer", default="gpt2", help="gpt2, a tokenizer directory or a base run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per kind and repeat")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=192)
    args = parser.parse_args()

    import torch

    from gptforge.chat import render_chat
    from gptforge.config import ModelConfig, TrainConfig
    from gptforge.data.chat_loader import ChatLoader
    from gptforge.data.chat_packing import pack_report
    from gptforge.data.chat_prepare import chat_tokenizer, prepare_chat
    from gptforge.data.loader import SequenceLoader
    from gptforge.data.prepare import prepare
    from gptforge.model import GPT
    from gptforge.training.optim import build_optimizer
    from gptforge.training.step import clip_and_step, forward_backward

    torch.set_num_threads(max(1, torch.get_num_threads()))
    records = _records(args.records)
    tokenizer, _ = chat_tokenizer(args.tokenizer)
    with tempfile.TemporaryDirectory(prefix="sft-speed-") as tmp:
        tmp = Path(tmp)
        chats = tmp / "chats.jsonl"
        chats.write_text("".join(json.dumps(r) + "\n" for r in records))
        texts = tmp / "texts.jsonl"
        texts.write_text("".join(json.dumps({"text": render_chat(r["messages"])}) + "\n" for r in records))
        tok_dir = tmp / "tok"
        tokenizer.save(tok_dir)
        rates: dict[str, list[float]] = {"chat": [], "text": []}
        for i in range(args.repeats):
            for kind in ("text", "chat"):  # interleaved: load drifts affect both alike
                out = tmp / f"{kind}{i}"
                t0 = time.perf_counter()
                if kind == "chat":
                    manifest = prepare_chat([str(chats)], str(tok_dir), out, workers=1, val_fraction=0.05)
                else:
                    manifest = prepare([str(texts)], str(tok_dir), out, workers=1, val_fraction=0.05)
                rates[kind].append(manifest["counts"]["tokens"] / (time.perf_counter() - t0))
        chat_dir, text_dir = tmp / "chat0", tmp / "text0"

        step_times: dict[str, list[float]] = {"chat": [], "text": []}
        config = ModelConfig(vocab_size=tokenizer.vocab_size, block_size=args.seq_len, n_layer=args.layers,
                             n_head=max(1, args.width // 64), n_embd=args.width)
        loaders = {"chat": ChatLoader(chat_dir, "train", args.seq_len, args.batch),
                   "text": SequenceLoader(text_dir, "train", args.seq_len, args.batch)}
        device = torch.device("cpu")
        for _ in range(args.repeats):
            for kind in ("text", "chat"):
                torch.manual_seed(0)
                model = GPT(config)
                opt = build_optimizer(model, TrainConfig(), device)
                for step in range(args.steps + 1):
                    x, y = loaders[kind].next_batch()
                    t0 = time.perf_counter()
                    loss = forward_backward(model, [(x, y)], 1, device, "bf16")
                    clip_and_step(model, opt, loss, 1.0)
                    if step:  # the first step warms up allocations
                        step_times[kind].append(time.perf_counter() - t0)

        padding = {}
        import numpy as np
        index = np.load(chat_dir / "train_conversations.npy")
        for context in (128, 256, 512, 1024):
            padding[context] = pack_report(index[:, 0], index[:, 1], context + 1)

    med = {k: statistics.median(v) for k, v in rates.items()}
    step = {k: statistics.median(v) for k, v in step_times.items()}
    print(f"{len(records):,} conversations, {args.tokenizer} tokenizer (+ chat markers), {args.repeats} interleaved repeats")
    print(f"{'':34s}{'text (reference)':>18s}{'chat':>14s}{'chat/text':>11s}")
    print(f"{'prepare, 1 worker (tokens/s)':34s}{med['text']:18,.0f}{med['chat']:14,.0f}{med['chat'] / med['text']:11.2f}")
    print(f"{'train step, ms (median of ' + str(len(step_times['chat'])) + ')':34s}"
          f"{1e3 * step['text']:18.1f}{1e3 * step['chat']:14.1f}{step['chat'] / step['text']:11.2f}")
    print(f"  model {args.layers} layers x {args.width}, batch {args.batch} x {args.seq_len}, bf16 autocast, CPU")
    print("packing of the train split (best-fit decreasing):")
    print(f"{'context':>10s}{'rows':>8s}{'padding':>10s}{'truncated':>11s}{'dropped':>9s}")
    for context, r in padding.items():
        print(f"{context:10d}{r['rows']:8,d}{100 * r['padding']:9.1f}%{r['truncated']:11d}{r['dropped']:9d}")


if __name__ == "__main__":
    main()
