"""A chat model's replies to whole conversations, for training samples and demos (not interactive use:
`ChatSession` is that).

Each conversation ending with a user message is encoded with `encode_chat_prompt` (the ids SFT trains on) and
continued until `<|im_end|>`, end-of-text, `<|im_start|>` (`reply_end_ids`, the ids `ChatSession` stops at) or
the end of the context, greedily by default. The global RNG is
left untouched, so sampling in the middle of a training run never shifts its random stream (exact resume
depends on it).
"""

from __future__ import annotations

from typing import Any


def chat_replies(model: Any, tokenizer: Any, conversations: list[list[dict[str, str]]], max_new_tokens: int,
                 temperature: float = 0.0, top_k: int = 0, seed: int = 0) -> list[str]:
    """The model's next reply to each conversation (ending with a user message), up to an end id
    (`reply_end_ids`) or the end of the context, with the global RNG untouched (training's random stream must
    not shift)."""
    import torch

    from ..generation import SamplingConfig
    from ..generation.engine import generate_ids
    from .tokens import encode_chat_prompt, reply_end_ids

    ends = reply_end_ids(tokenizer)
    block = model.config.block_size
    was_training = model.training
    model.eval()
    replies = []
    try:
        with torch.random.fork_rng(devices=None if torch.cuda.is_available() else []):
            for i, messages in enumerate(conversations):
                prompt = encode_chat_prompt(tokenizer, messages)
                room = min(max_new_tokens, block - len(prompt))
                if room < 1:
                    replies.append(f"(the question takes {len(prompt)} tokens: no room left in the context)")
                    continue
                config = SamplingConfig(max_new_tokens=room, temperature=temperature, top_k=top_k)
                ids = generate_ids(model, [prompt], config, seed=seed + i, eot_id=ends)[0]
                replies.append(tokenizer.decode(ids))
    finally:
        model.train(was_training)
    return replies


def format_exchange(messages: list[dict[str, str]], reply: str, reference: str | None = None) -> str:
    """`role: content` lines of the conversation and the reply (and the reference reply, when known)."""
    lines = [f"{m['role']}: {m['content']}" for m in messages] + [f"assistant: {reply.strip()}"]
    if reference is not None:
        lines.append(f"(reference: {reference})")
    return "\n".join(lines)
