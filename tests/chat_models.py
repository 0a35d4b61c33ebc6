"""Tiny chat models for tests: tokenizers with the ChatML markers, and GPTs whose replies are known.

`chat_tokenizer` gives a small char or byte-level BPE tokenizer the chat markers and template
(`add_chat_tokens`, what `gptforge sft` does to a base tokenizer).

`scripted_model(vocab, script)` is a GPT whose greedy next token depends only on the position: blocks add
nothing (their output projections are zero), token embeddings are small one-hot rows and the position
embedding at p is the one-hot row of `script[p]`, so after ln_f the tied head's largest logit is
`script[p]`. Every path through the model (KV cache, transformers after export) computes the same thing.

`random_chat_model` is a random GPT whose position embeddings from position `end_at` on (or at the
positions listed in `end_at`) point at
`<|im_end|>` (a large vector along its embedding), so a greedy reply is the random model's own text until then and always ends.
With `marker` they point at another special token instead (`<|im_start|>`: a model that opens a new turn).
"""

from __future__ import annotations

import torch

from gptforge.chat import IM_END
from gptforge.config import ModelConfig
from gptforge.model import GPT

import string

CORPUS = (string.printable + "é ü 🙂 ") + "hello world, the quick brown fox jumps over the lazy dog.\n" * 20


def chat_tokenizer(kind: str = "char", corpus: str = CORPUS):
    from gptforge.tokenizer import CharTokenizer, train_bpe

    from gptforge.chat.tokens import add_chat_tokens

    tok = CharTokenizer.train([corpus]) if kind == "char" else train_bpe([corpus], vocab_size=300)
    return add_chat_tokens(tok)


def scripted_model(vocab_size: int, script: dict[int, int], block_size: int = 64, default: int | None = None) -> GPT:
    """A GPT whose greedy choice after position p is script[p] (`default` elsewhere)."""
    n_embd = ((vocab_size + 63) // 64) * 64  # room for one one-hot direction per id, padded rows included
    config = ModelConfig(vocab_size=vocab_size, block_size=block_size, n_layer=1, n_head=1, n_embd=n_embd)
    model = GPT(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "c_proj" in name:
                p.zero_()  # attention and MLP add nothing to the residual stream
        wte = model.transformer.wte.weight
        wte.copy_(torch.eye(wte.shape[0], n_embd) * 1e-2)
        wpe = model.transformer.wpe.weight
        wpe.zero_()
        for p in range(block_size):
            target = script.get(p, default)
            if target is not None:
                wpe[p, target] = 1.0
    return model.eval()


def random_chat_model(tokenizer, end_at: int | list[int], block_size: int = 128, n_embd: int = 32, seed: int = 0,
                      marker: str = IM_END) -> GPT:
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, block_size=block_size, n_layer=2, n_head=2, n_embd=n_embd)
    model = GPT(config)
    im_end = tokenizer.special_tokens[marker]
    with torch.no_grad():
        direction = model.transformer.wte.weight[im_end]
        positions = slice(end_at, None) if isinstance(end_at, int) else end_at
        model.transformer.wpe.weight[positions] = direction / direction.norm() * 50
    return model.eval()


def save_chat_checkpoint(directory, model: GPT, tokenizer) -> str:
    """`directory` as a checkpoint directory (`model.safetensors` + `tokenizer/`) that --model accepts."""
    from gptforge.layout import TOKENIZER_DIR, WEIGHTS_FILE
    from gptforge.weights import save_weights

    directory.mkdir(parents=True, exist_ok=True)
    save_weights(model, directory / WEIGHTS_FILE)
    tokenizer.save(directory / TOKENIZER_DIR)
    return str(directory)
