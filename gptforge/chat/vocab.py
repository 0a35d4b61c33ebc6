"""Give a base model's weights the rows of the chat markers its tokenizer just gained.

GPT-2's 50,257 ids are padded to 50,304 embedding rows, so `<|im_start|>` = 50257 and `<|im_end|>` = 50258
land in rows that exist already (zeros: padded rows are never looked up or scored) and the weight shape does
not change. A vocabulary that fills its padding exactly (the demo's 4,096) grows by one block of 64 rows.
Either way the markers' rows need values before fine-tuning starts; zero rows would make both markers the
same input and give every position a logit of exactly 0 for them. We use:

  <|im_start|>  the mean of the base vocabulary's rows: as an output its logit starts at the average logit,
                so the fine-tuned model's first distributions are nearly the base model's (Hewitt, "Initializing
                New Word Embeddings for Pretrained Language Models", 2021); as an input it is an average token.
  <|im_end|>    a copy of `<|endoftext|>`'s row: the base model already predicts end-of-text where a text is
                complete, so the end-of-turn marker starts out likely exactly where a reply is complete, which
                is what it has to learn (the embeddings are tied: one row serves input and output).

Any other added id gets the mean as well.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..errors import UserError
from .template import IM_END

EMBEDDING = "transformer.wte.weight"
HEAD = "lm_head.weight"


def copy_base_weights(base: torch.nn.Module, model: torch.nn.Module) -> None:
    """Copy every parameter of `base` into `model`; the vocabulary rows may have grown (extra rows zeroed)."""
    source = base.state_dict()
    with torch.no_grad():
        for name, target in model.state_dict().items():
            if name not in source:
                raise UserError(f"the base model has no weight {name}; fine-tune a gptforge GPT of the same shape")
            weights = source[name]
            if weights.shape == target.shape:
                target.copy_(weights)
            elif name in (EMBEDDING, HEAD) and weights.shape[1:] == target.shape[1:] and \
                    weights.shape[0] <= target.shape[0]:
                target.zero_()
                target[: weights.shape[0]].copy_(weights)
            else:
                raise UserError(f"weight {name} has shape {tuple(weights.shape)} in the base model but "
                                f"{tuple(target.shape)} here; fine-tuning keeps the base model's shape")


def init_added_rows(model: torch.nn.Module, base_vocab: int, added: dict[str, int], eot_id: int) -> None:
    """Set the embedding rows of the `added` special tokens (name -> id) as the module docstring says."""
    weight = model.transformer.wte.weight
    with torch.no_grad():
        mean = weight[:base_vocab].float().mean(dim=0)
        for token, index in added.items():
            row = weight[eot_id].float() if token == IM_END else mean
            weight[index].copy_(row.to(weight.dtype))
            if model.lm_head.weight is not weight:  # untied head: the same rule for the output row
                head = model.lm_head.weight
                head[index].copy_((head[eot_id] if token == IM_END else head[:base_vocab].mean(dim=0)))


def added_tokens(base_specials: dict[str, int], specials: dict[str, int], names: Iterable[str]) -> dict[str, int]:
    """name -> id of the tokens among `names` that `specials` has and `base_specials` did not."""
    return {name: specials[name] for name in names if name in specials and name not in base_specials}
