"""The one log-likelihood scorer every evaluation task shares.

A request is (context tokens, continuation tokens); its score is the sum of the model's log-probabilities of
the continuation tokens given everything before them, and whether each continuation token was the argmax
(greedy). Multiple-choice tasks compare scores across choices, LAMBADA checks greediness, the validation task
sums scores over strided windows. Keeping this in one place is what makes the tasks agree with each other and
with lm-evaluation-harness, whose conventions we follow:

- `encode_pair` splits a (context, continuation) string pair as lm-eval does: trailing whitespace of the
  context moves to the continuation, the concatenation is tokenised once and the continuation is the tail
  after the context's tokens (so a merge across the boundary is not double-counted). An empty context is
  replaced by the end-of-text token, so the first continuation token is still conditioned on something.
- A sequence longer than the model's window keeps its last `block_size + 1` tokens (truncated from the left),
  so the whole continuation is always scored; a continuation that alone exceeds the window is an error.
- Batches are padded on the right. Attention is causal, so pad tokens after a sequence cannot influence its
  real tokens, and only continuation positions are ever read: padding never counts.
- Logits are upcast to fp32 before log_softmax, so a bf16 model still yields fp32-exact log-probs of its
  own logits. The output head runs only on the positions that are scored (a large saving: the 50257-wide
  head is a third of GPT-2 small's FLOPs per token).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import torch
import torch.nn.functional as F

from ..errors import UserError

if TYPE_CHECKING:
    from ..model import GPT
    from ..tokenizer import Tokenizer

# Positions per head/log_softmax chunk: bounds the fp32 (positions x vocab) buffer (~400 MB at vocab 50257).
HEAD_CHUNK = 2048


@dataclass(frozen=True)
class Request:
    """Score `continuation` given `context` (token ids; the context must not be empty)."""

    context: Sequence[int]
    continuation: Sequence[int]


@dataclass(frozen=True)
class Score:
    """Sum of the continuation's log-probs (nats), whether every token was the argmax, and its token count."""

    logprob: float
    greedy: bool
    n_tokens: int


def encode_pair(tokenizer: "Tokenizer", context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation), split the way lm-evaluation-harness splits them."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    if not context:
        return [tokenizer.eot_id], tokenizer.encode(continuation)
    whole = tokenizer.encode(context + continuation)
    context_ids = tokenizer.encode(context)
    return whole[: len(context_ids)], whole[len(context_ids):]


def _fit_window(request: Request, block_size: int) -> tuple[list[int], int]:
    """Model input ids (left-truncated to the window) and how many trailing positions are scored."""
    n_cont = len(request.continuation)
    if n_cont == 0:
        raise ValueError("a scoring request needs at least one continuation token")
    if len(request.context) == 0:
        raise ValueError("a scoring request needs a context (use encode_pair, which conditions on end-of-text)")
    if n_cont > block_size:
        raise UserError(f"a continuation of {n_cont} tokens does not fit the model's context of {block_size} "
                        "tokens; shorten that item or use a model with a longer context")
    whole = list(request.context[-(block_size + 1 - n_cont):]) + list(request.continuation)
    return whole[:-1], n_cont


# no_grad, not inference_mode: the trainer validates through this under FSDP2, whose all-gathered weights
# made inside inference mode could not be used by the next training step
@torch.no_grad()
def score_requests(model: "GPT", requests: Sequence[Request], batch_size: int = 16,
                   progress: Callable[[int], None] | None = None) -> list[Score]:
    """Scores of `requests`, in their order, computed in right-padded batches of `batch_size`.

    Requests are processed longest first (less padding; the largest batch fails first if memory is short)
    and `progress(n)` is called after each batch with the number of requests it finished.
    """
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    model_was_training = model.training
    model.eval()
    block_size = model.config.block_size
    device = next(model.parameters()).device
    fitted = [_fit_window(r, block_size) for r in requests]
    # One-token continuations of the same context (MMLU's " A"/" B"/" C"/" D") are read from one forward
    # pass: the scored position and its log-softmax are identical, only the gathered target differs.
    rows: list[tuple[list[int], list[int]]] = []  # (input ids, request indices sharing them)
    shared: dict[tuple[int, ...], int] = {}
    for i, (ids, n_cont) in enumerate(fitted):
        if n_cont == 1:
            key = tuple(ids)
            if key in shared:
                rows[shared[key]][1].append(i)
                continue
            shared[key] = len(rows)
        rows.append((ids, [i]))
    order = sorted(range(len(rows)), key=lambda r: -len(rows[r][0]))
    results: list[Score | None] = [None] * len(requests)
    try:
        for start in range(0, len(order), batch_size):
            batch = [rows[r] for r in order[start:start + batch_size]]
            longest = max(len(ids) for ids, _ in batch)
            idx = torch.zeros((len(batch), longest), dtype=torch.long)
            row_of, col_of, targets, owners = [], [], [], []
            for row, (ids, members) in enumerate(batch):
                idx[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
                for i in members:
                    n_cont = fitted[i][1]
                    first = len(ids) - n_cont  # the position that predicts the first continuation token
                    row_of.extend([row] * n_cont)
                    col_of.extend(range(first, len(ids)))
                    targets.extend(requests[i].continuation)
                    owners.append(i)
            hidden = model.hidden_states(idx.to(device))  # before ln_f: the head runs on scored positions only
            picked = hidden[torch.tensor(row_of, device=device), torch.tensor(col_of, device=device)]
            target = torch.tensor(targets, dtype=torch.long, device=device)
            token_logprobs, token_greedy = [], []
            for c in range(0, picked.size(0), HEAD_CHUNK):
                logits = model.head(picked[c:c + HEAD_CHUNK]).float()  # fp32 before log_softmax, always
                logprobs = F.log_softmax(logits, dim=-1)
                chunk_target = target[c:c + HEAD_CHUNK]
                token_logprobs.append(logprobs.gather(1, chunk_target[:, None])[:, 0])
                token_greedy.append(logits.argmax(dim=-1) == chunk_target)
            lp = torch.cat(token_logprobs).double().cpu()
            greedy = torch.cat(token_greedy).cpu()
            offset = 0
            for i in owners:
                n = fitted[i][1]
                results[i] = Score(float(lp[offset:offset + n].sum()), bool(greedy[offset:offset + n].all()), n)
                offset += n
            if progress is not None:
                progress(len(owners))
    finally:
        model.train(model_was_training)
    return results  # type: ignore[return-value]


def best_choice(logprobs: Sequence[float], lengths: Sequence[float] | None = None) -> int:
    """Index of the highest (optionally length-normalised) log-likelihood; ties go to the first, as np.argmax.

    With `lengths`, each log-likelihood is divided by its choice's length first: lm-evaluation-harness's
    acc_norm uses the length of the choice string in characters (not tokens), which is what callers pass.
    """
    values = list(logprobs) if lengths is None else [lp / max(float(n), 1.0) for lp, n in zip(logprobs, lengths)]
    if not values:
        raise ValueError("no choices to pick from")
    return max(range(len(values)), key=lambda i: (values[i], -i))
