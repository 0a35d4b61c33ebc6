"""A validated request body turned into the generation loop's jobs: the checks that need the model (its
context, its vocabulary, its end tokens) or the server's limits, each a 400 naming the field. The body's
own shape is checked before (schemas.py); the answer is shaped after (responses.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import UserError
from .batcher import Job
from .responses import APIError

if TYPE_CHECKING:
    from ..generation.constrained import Grammar
    from ..tokenizer import Tokenizer


def completion_prompts(tokenizer: "Tokenizer", prompt: Any) -> list[list[int]]:
    """/v1/completions' `prompt` (text, texts, token ids or lists of them) as token ids, one list per prompt."""
    from ..generation.api import encode_prompts

    if isinstance(prompt, str):
        return encode_prompts(tokenizer, [prompt])
    if not prompt:
        raise APIError(400, "prompt is an empty list; give text, a list of texts or token ids", param="prompt")
    if isinstance(prompt[0], str):
        return encode_prompts(tokenizer, prompt)
    lists = [prompt] if isinstance(prompt[0], int) else prompt
    vocab = tokenizer.vocab_size
    for i, ids in enumerate(lists):
        if not ids:
            raise APIError(400, f"prompt {i} is an empty list of token ids", param="prompt")
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"prompt {i} has token ids outside the vocabulary (0..{vocab - 1}): {bad[:5]}",
                           param="prompt")
    return [list(ids) for ids in lists]


def refuse_unsupported(body: Any) -> None:
    """A 400 naming a field this server cannot honour yet, rather than an answer that ignores it (a client
    asking for a tool call would get free text and fail on its own side). Each field in its "off" value (null,
    an empty list or object, "none") is fine. The one place these fields are judged: where one becomes
    supported, its check here gives way to building it (response_format and logit_bias: structured_output)."""
    for field, what in (("tools", "tool calls"), ("functions", "function calls")):
        if getattr(body, field, None):
            raise APIError(400, f"{field}: {what} are not supported by this server yet; leave {field} out",
                           param=field)
    for field in ("tool_choice", "function_call"):
        if getattr(body, field, None) not in (None, "none"):
            raise APIError(400, f"{field}: tool calls are not supported by this server yet; leave it out or send "
                                '"none"', param=field)


RESPONSE_FORMATS = ("text", "json_object", "json_schema")


def structured_output(body: Any, tokenizer: "Tokenizer") -> tuple[dict[str, Any], "Grammar | None"]:
    """`response_format` and `logit_bias` as SamplingConfig fields, and the compiled grammar (None for free
    text), or a 400 naming the field and the problem. The same `response_format` on /v1/completions as on
    /v1/chat/completions: {"type": "text"}, {"type": "json_object"} (any JSON object) or {"type":
    "json_schema", "json_schema": {"schema": {...}, ...}} (JSON valid against it; "strict" or not, the
    schema is always enforced). Compiled here, in the request, so a bad schema is its client's 400 and the
    generation loop never compiles."""
    from ..generation.constrained import compile_json_grammar

    fields: dict[str, Any] = {}
    bias = body.logit_bias
    if bias:
        if not isinstance(bias, dict):
            raise APIError(400, "logit_bias: must be an object of token id -> bias in [-100, 100]",
                           param="logit_bias")
        vocab = tokenizer.vocab_size
        parsed = {}
        for key, value in bias.items():
            if not (isinstance(key, str) and key.isdigit() and int(key) < vocab):
                raise APIError(400, f"logit_bias: {key!r} is not a token id of this model (0..{vocab - 1})",
                               param="logit_bias")
            parsed[int(key)] = value
        fields["logit_bias"] = parsed
    format = body.response_format
    if format is None:
        return fields, None
    kind = format.get("type") if isinstance(format, dict) else None
    if kind not in RESPONSE_FORMATS:
        raise APIError(400, f"response_format: the type must be one of {', '.join(RESPONSE_FORMATS)}, got "
                            f"{kind if kind is not None else format!r}", param="response_format")
    if kind == "text":
        return fields, None
    schema = None
    if kind == "json_schema":
        spec = format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise APIError(400, 'response_format: json_schema needs {"json_schema": {"name": ..., "schema": '
                                '{...}}} with the schema an object', param="response_format")
        fields["json_schema"] = schema
    else:
        fields["json_object"] = True
    try:
        grammar = compile_json_grammar(tokenizer, schema, "response_format")
    except UserError as e:
        raise APIError(400, str(e), param="response_format") from None
    return fields, grammar


def build_jobs(body: Any, prompts: list[list[int]], *, block_size: int, end_ids: frozenset[int], max_rows: int,
               max_queued: int, max_prompts: int, limit: int | None, limit_param: str, logprobs: int | None,
               echo: bool, tokenizer: "Tokenizer") -> list[Job]:
    """One job per prompt, each with `body.n` choices, or a 400 naming the field that cannot be served.

    `limit`: the reply's length as asked (`limit_param` names the field), None for "as much as fits";
    each job's is capped to what the context leaves after its prompt. `logprobs`: None, or how many
    alternatives to report; `echo` (completions): the prompt is scored too."""
    from ..generation import SamplingConfig
    from ..generation.sampling import row_seed

    refuse_unsupported(body)
    structured, grammar = structured_output(body, tokenizer)
    n = body.n
    if n > max_rows:
        raise APIError(400, f"n = {n}: this server generates at most {max_rows} choices at once", param="n")
    if len(prompts) * n > max_prompts:
        raise APIError(400, f"{len(prompts)} prompts x n = {n} is {len(prompts) * n} completions; at most "
                            f"{max_prompts} per request", param="prompt")
    if len(prompts) > max_queued:  # one queued job per prompt: this request could never be queued
        raise APIError(400, f"{len(prompts)} prompts: this server queues at most {max_queued} at a time; "
                            "send fewer prompts per request", param="prompt")
    if limit is not None and (limit < 0 or limit == 0 and not echo):
        raise APIError(400, f"{limit_param} must be a positive integer, got {limit}", param=limit_param)
    if limit is not None and limit > block_size:
        raise APIError(400, f"{limit_param} = {limit} is more than the model's context of {block_size} tokens",
                       param=limit_param)
    generate = limit != 0
    stops = body.stops()
    if any(not s for s in stops):
        raise APIError(400, "stop strings must not be empty", param="stop")
    temperature = 1.0 if body.temperature is None else body.temperature
    top_p = 1.0 if body.top_p is None else body.top_p
    jobs: list[Job] = []
    for p, prompt in enumerate(prompts):
        room = block_size - len(prompt)
        if room < (1 if generate else 0):
            over = len(prompt) - block_size + (1 if generate else 0)
            raise APIError(400, f"the prompt takes {len(prompt)} tokens and the model's context holds {block_size}"
                                f"{' with at least 1 for the reply' if generate else ''}: shorten it by "
                                f"{over} tokens", param="messages" if hasattr(body, "messages") else "prompt",
                           code="context_length_exceeded")
        budget = max(1, min(room, limit if limit is not None else room))
        try:
            config = SamplingConfig(max_new_tokens=budget, temperature=temperature, top_p=top_p, stop=stops,
                                    **structured)
        except UserError as e:  # "--top-p: why": name the field as the request spells it
            option, _, why = str(e).partition(": ")
            field = option.removeprefix("--").replace("-", "_")
            field = limit_param if field == "max_new_tokens" else field
            raise APIError(400, f"{field}: {why}", param=field)
        seeds = [None if body.seed is None else row_seed(body.seed % (1 << 64), p * n + c) for c in range(n)]
        jobs.append(Job(prompt, [config] * n, seeds, deliver=None,  # type: ignore[arg-type]  (set on submit)
                        end_ids=frozenset() if body.ignore_eos else end_ids,
                        logprobs=logprobs, echo_logprobs=echo and logprobs is not None,
                        presence_penalty=body.presence_penalty or 0.0,
                        frequency_penalty=body.frequency_penalty or 0.0, choice_offset=p * n, generate=generate,
                        grammar=grammar))
    return jobs
