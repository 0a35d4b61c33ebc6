"""Request bodies of the OpenAI protocol, as pydantic models: what a field may hold, checked before anything
runs. Unknown fields are ignored (clients send many we do not use); types are strict (a string where a
number belongs is an error, not a guess). Limits that depend on the model (context, rows) are checked in
jobs.py, which knows it, as are response_format and logit_bias (they need the tokenizer). Fields the server
cannot honour yet (tools) are read here only so that jobs.py can refuse them by name instead of ignoring them."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

MAX_STOPS = 4  # OpenAI's limit


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _wrong(message: str) -> PydanticCustomError:
    """An error reported as "FIELD: message". A union field's own errors would name each of its types in
    turn ("stop.str: Input should be a valid string" for a list of five), so union fields say in one line
    what they take."""
    return PydanticCustomError("wrong_value", message)


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_the_default(cls, data: Any) -> Any:
        """An explicit null in a field that has a default means that default: OpenAI's spec makes the
        optional fields nullable, and clients (LangChain) send `"n": null`. A required field stays required."""
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        return {k: v for k, v in data.items() if v is not None or k not in fields or fields[k].is_required()}


class TextPart(_Body):
    type: Literal["text"]
    text: str


class Message(_Body):
    # "developer" is the newer OpenAI name of the system role; it is rendered as system.
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart], None] = None

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, value: Any) -> Any:
        if value is None or isinstance(value, str):
            return value
        if not isinstance(value, list):
            raise _wrong('must be a string or a list of text parts ({"type": "text", "text": "..."})')
        for i, part in enumerate(value):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and not isinstance(part.get("text"), str):
                raise _wrong(f'part {i} has no "text" string')
            if kind != "text":
                got = f"of type {kind!r}" if isinstance(kind, str) else "not an object"
                raise _wrong(f'part {i} is {got}: only text parts ({{"type": "text", "text": "..."}}) are supported')
        return value

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(_Body):
    include_usage: bool = False


Stop = Union[str, Annotated[list[str], Field(max_length=MAX_STOPS)], None]


class _Sampling(_Body):
    model: str | None = None
    max_tokens: int | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    n: Annotated[int, Field(ge=1)] = 1
    stop: Stop = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens whatever the model says (benchmarks)
    logit_bias: Any = None  # token id (a string in JSON) -> bias in [-100, 100]: jobs.structured_output
    # {"type": "text" | "json_object" | "json_schema", ...} on both endpoints: jobs.structured_output
    response_format: Any = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, value: Any) -> Any:
        if value is None or isinstance(value, str):
            return value
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise _wrong(f"must be a string or a list of at most {MAX_STOPS} strings")
        if len(value) > MAX_STOPS:
            raise _wrong(f"at most {MAX_STOPS} stop sequences, got {len(value)}")
        return value

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatRequest(_Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None  # the older names of tools and tool_choice
    function_call: Any = None


Prompt = Union[str, list[str], list[int], list[list[int]]]


class CompletionRequest(_Sampling):
    prompt: Prompt
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    echo: bool = False

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, value: Any) -> Any:
        if isinstance(value, str) or isinstance(value, list) and (
                all(isinstance(v, str) for v in value) or all(_is_int(v) for v in value)
                or all(isinstance(v, list) and all(_is_int(t) for t in v) for v in value)):
            return value  # an empty list too: app.py says what is wrong with it
        raise _wrong("must be a string, a list of strings, a list of token ids or a list of lists of token ids")
