"""What constrained decoding costs: per-token overhead (ms and % of a decode step) and schema compile time.

Models: GPT-2 124M shapes (random weights, GPT-2's 50,257-id tokenizer) and the demo's shape (4 layers of 192,
128-token context, a 4,096-id byte-level BPE trained here on the standard library's sources). Batch 1 and 16.

A decode step is timed as `gptforge sample` runs it (TokenGenerator, KV cache, `prepare_for_decoding`), all
rows free. The constraint's cost per step is timed on its own: every row carries a grammar (the JSON schema
below, or any JSON object) and, each step, its mask is computed and applied to random logits, a token is
sampled from what it allows and fed back (a finished row starts over) -- exactly the work the Sampler adds
(`apply_constraints` + `RowConstraint.advance`). Rounds alternate free step / constrained work; medians.

    python benchmarks/constrained_decoding.py                  # both models, batch 1 and 16
    python benchmarks/constrained_decoding.py --models demo --rounds 3 --steps 20   # quick
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gptforge.config import ModelConfig  # noqa: E402
from gptforge.generation import SamplingConfig, TokenGenerator, prepare_for_decoding  # noqa: E402
from gptforge.generation import constrained as C  # noqa: E402
from gptforge.model import GPT  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "score": {"type": "number"},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 5},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                    "required": ["city", "zip"], "additionalProperties": False},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "score", "role", "tags", "address", "active"],
    "additionalProperties": False,
}


def demo_tokenizer():
    import sysconfig
    from gptforge.tokenizer import train_bpe
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:120]
    return train_bpe((f.read_text(errors="replace") for f in files), vocab_size=4096)


def setups(names):
    if "gpt2" in names:
        from gptforge.tokenizer import GPT2Tokenizer
        tok = GPT2Tokenizer()
        yield "GPT-2 124M", tok, ModelConfig(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768)
    if "demo" in names:
        tok = demo_tokenizer()
        yield "demo (2.6M)", tok, ModelConfig(vocab_size=tok.vocab_size, block_size=128, n_layer=4, n_head=4,
                                              n_embd=192)


def decode_step_ms(model, tok, batch: int, steps: int) -> float:
    """Median ms of a free decode step (prefill excluded) at batch `batch`."""
    prompts = [[tok.eot_id] + [(17 * i + 5 * r) % 200 + 10 for i in range(15)] for r in range(batch)]
    config = SamplingConfig(max_new_tokens=steps + 1, temperature=1.0, stop_at_eot=False)
    engine = TokenGenerator(model, prompts, [config] * batch, list(range(batch)), tok.eot_id,
                            vocab_size=tok.vocab_size)
    times, last = [], None
    for _ in engine:
        now = time.perf_counter()
        if last is not None:
            times.append(now - last)
        last = now
    return statistics.median(times) * 1e3


def constraint_ms(grammar, tok, batch: int, steps: int, generator: torch.Generator) -> float:
    """Median ms per step of masking + advancing `batch` grammar rows (random logits, sampled tokens)."""
    rows = [C.RowConstraint(grammar, [tok.eot_id]) for _ in range(batch)]
    times = []
    for _ in range(steps):
        logits = torch.randn(batch, tok.vocab_size, generator=generator)
        start = time.perf_counter()
        masked = C.apply_constraints(logits, rows)
        mid = time.perf_counter()  # (sampling is not the constraint's cost: a free step samples too)
        tokens = torch.multinomial(torch.softmax(masked, dim=-1), 1, generator=generator)[:, 0].tolist()
        resume = time.perf_counter()
        for row, token in zip(rows, tokens):
            row.advance(token)
        times.append(mid - start + time.perf_counter() - resume)
        for r, token in enumerate(tokens):
            if token == tok.eot_id:
                rows[r] = C.RowConstraint(grammar, [tok.eot_id])
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["gpt2", "demo"], choices=["gpt2", "demo"])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    print(f"torch threads: {torch.get_num_threads()}")
    for label, tok, config in setups(args.models):
        model = GPT(config).eval()
        prepare_for_decoding(model)
        start = time.perf_counter()
        C.engine_tokenizer(tok)
        print(f"\n{label}, vocabulary {tok.vocab_size}: describing the tokenizer to llguidance (once per "
              f"tokenizer): {(time.perf_counter() - start) * 1e3:.0f} ms")
        compile_ms = []
        for _ in range(5):
            start = time.perf_counter()
            grammar = C.compile_json_grammar(tok, json.dumps(SCHEMA))
            C.RowConstraint(grammar)  # a row's matcher: part of what one request costs
            compile_ms.append((time.perf_counter() - start) * 1e3)
        print(f"  schema compile + first matcher: {statistics.median(compile_ms):.1f} ms (median of 5)")
        grammars = {"schema": grammar, "json_object": C.compile_json_grammar(tok, None)}
        print(f"  {'batch':>5} {'grammar':>11} {'decode step':>12} {'constraint':>11} {'per token':>10} {'of step':>8}")
        for batch in args.batch:
            step, cost = [], {name: [] for name in grammars}
            for _ in range(args.rounds):
                step.append(decode_step_ms(model, tok, batch, args.steps))
                for name, g in grammars.items():
                    cost[name].append(constraint_ms(g, tok, batch, args.steps, generator))
            s = statistics.median(step)
            for name in grammars:
                c = statistics.median(cost[name])
                print(f"  {batch:>5} {name:>11} {s:>9.2f} ms {c:>8.2f} ms {c / batch:>7.3f} ms {100 * c / s:>7.1f}%")


if __name__ == "__main__":
    main()
