"""Time to first token and tokens/s of `gptforge chat` replies, beside the plain token loop and transformers.

A greedy conversation of a few turns runs through ChatSession (what `gptforge chat` does per turn: render
the whole conversation, encode, prefill, stream text). Interleaved with each turn, the same prompt ids go
through the bare token loop (`TokenGenerator`, no chat layer) for the same number of new tokens, and
through transformers' `generate` on the exported model. Medians over --repeats; the ratio column is the
chat layer's cost (1.00 = none). Then the greedy replies of transformers (apply_chat_template + generate on
the HF export) and of gptforge are compared on three prompts.

    python benchmarks/chat_speed.py --model runs/chat          # a chat model (gptforge sft's demo)
    python benchmarks/chat_speed.py                            # dev-17m shape, random weights, GPT-2 + markers

With random weights replies never end, so each runs to --new-tokens; a trained model ends its turns.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gptforge.chat import ChatSession  # noqa: E402
from gptforge.chat.tokens import encode_chat_prompt  # noqa: E402
from gptforge.generation import SamplingConfig, TokenGenerator  # noqa: E402

QUESTIONS = ["What does json.dumps do?", "How do I join two paths with os.path?", "What is a generator?"]


def load(spec: str | None):
    if spec:
        from gptforge.loading import load_model
        return load_model(spec)
    from gptforge.chat.tokens import add_chat_tokens
    from gptforge.config import get_preset
    from gptforge.model import GPT
    from gptforge.tokenizer import GPT2Tokenizer

    torch.manual_seed(0)
    tokenizer = add_chat_tokens(GPT2Tokenizer())
    config = get_preset("dev-17m")
    config.vocab_size = tokenizer.vocab_size  # the markers take ids 50257/50258 inside the padded rows
    return GPT(config).eval(), tokenizer


def bare_loop(model, prompt: list[int], n: int) -> tuple[float, float]:
    """(seconds to the first token, seconds in all) of the token loop alone for exactly n new tokens."""
    config = SamplingConfig(max_new_tokens=n, temperature=0, stop_at_eot=False)
    start = time.perf_counter()
    first = None
    for _ in TokenGenerator(model, [prompt], [config], [None]):
        if first is None:
            first = time.perf_counter() - start
    return first, time.perf_counter() - start


def hf_generate(hf, prompt: list[int], n: int) -> float:
    with torch.no_grad():
        start = time.perf_counter()
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0)
        elapsed = time.perf_counter() - start
    assert out.shape[1] == len(prompt) + n
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="chat model (run directory, checkpoint, hf:DIR)")
    parser.add_argument("--new-tokens", type=int, default=128, help="most tokens per reply")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load(args.model)
    config = SamplingConfig(temperature=0, max_new_tokens=args.new_tokens)

    import transformers
    from gptforge.interop.hf import export_hf
    transformers.logging.set_verbosity_error()
    tmp = tempfile.TemporaryDirectory()
    out = export_hf(model, tokenizer, Path(tmp.name) / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)

    rows = {}
    for _ in range(args.repeats):
        session = ChatSession(model, tokenizer, config)
        for turn, question in enumerate(QUESTIONS):
            prompt = session.prompt_ids(question)
            reply = session.ask(question)
            s = session.last
            n = s.generated_tokens  # the same work: reply tokens and the end marker
            first, total = bare_loop(model, prompt, n)
            hf_total = hf_generate(hf, prompt, n)
            row = rows.setdefault(turn, {"prompt": len(prompt), "reply": s.reply_tokens, "text": reply,
                                         "chat_ttft": [], "loop_ttft": [], "chat_tps": [], "loop_tps": [],
                                         "hf_tps": [], "chat_all": []})
            row["chat_ttft"].append(s.first_token_s)
            row["loop_ttft"].append(first)
            row["chat_tps"].append(s.tokens_per_s or float("nan"))
            row["loop_tps"].append((n - 1) / (total - first) if n > 1 else float("nan"))
            row["hf_tps"].append(n / hf_total)
            row["chat_all"].append(n / s.total_s)

    med = statistics.median
    print(f"model: {args.model or 'dev-17m random weights, GPT-2 vocabulary + chat markers'}; "
          f"threads {torch.get_num_threads()}; medians of {args.repeats}")
    print(f"{'turn':>4} {'prompt':>6} {'reply':>5} | {'TTFT chat ms':>12} {'TTFT loop ms':>12} | "
          f"{'chat tok/s':>10} {'loop tok/s':>10} {'chat/loop':>9} | {'chat tok/s all':>14} {'HF tok/s all':>12} {'chat/HF':>7}")
    for turn, r in rows.items():
        print(f"{turn + 1:>4} {r['prompt']:>6} {r['reply']:>5} | {med(r['chat_ttft']) * 1e3:>12.1f} "
              f"{med(r['loop_ttft']) * 1e3:>12.1f} | {med(r['chat_tps']):>10.1f} {med(r['loop_tps']):>10.1f} "
              f"{med(r['chat_tps']) / med(r['loop_tps']):>9.2f} | {med(r['chat_all']):>14.1f} "
              f"{med(r['hf_tps']):>12.1f} {med(r['chat_all']) / med(r['hf_tps']):>7.2f}")
    print("(reply: text tokens, plus the end marker in every rate; 'all' rates count the prefill too: new tokens / "
          "time from the call to the last token)")

    print("\ngreedy replies, transformers (apply_chat_template + generate on the HF export) vs gptforge:")
    for question in QUESTIONS:
        messages = [{"role": "user", "content": question}]
        ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
        assert ids == encode_chat_prompt(tokenizer, messages)
        with torch.no_grad():
            generated = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                    do_sample=False, max_new_tokens=args.new_tokens, pad_token_id=tokenizer.eot_id)
        new = generated[0, len(ids):].tolist()
        theirs = hf_tok.decode([t for t in new if t not in hf.generation_config.eos_token_id])
        ours = ChatSession(model, tokenizer, config).ask(question)
        verdict = "identical" if theirs == ours else "DIFFERENT"
        print(f"  {verdict}: {question!r} -> {ours[:100]!r}{'...' if len(ours) > 100 else ''}")


if __name__ == "__main__":
    main()
