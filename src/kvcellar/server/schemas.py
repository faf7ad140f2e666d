"""Request bodies, as strict pydantic models (they are also the OpenAPI schema).

Operations: `ChatCompletionRequest`, `CompletionRequest`, `ProbeRequest`,
`ClearRequest`, `BudgetRequest`. Types are strict (`"1"` is not a number,
`true` is not an integer); unknown fields are ignored as OpenAI clients send
new ones often. Fields we know but do not support are refused by
`unsupported_fields` with a message naming them, instead of being silently
dropped.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from pydantic_core import PydanticCustomError

_STRICT = ConfigDict(strict=True, extra="ignore")
MAX_CHOICES = 16
_SURROGATE = re.compile("[\ud800-\udfff]")


def _unicode_text(text: str) -> str:
    """JSON may escape a lone UTF-16 surrogate ("\\ud800"); it is not text, and no tokenizer can encode it."""
    if _SURROGATE.search(text):
        raise PydanticCustomError("invalid_unicode", "contains a lone UTF-16 surrogate (such as \\ud800), which is "
                                                     "not Unicode text: send valid text")  # fmt: skip
    return text


Text = Annotated[str, AfterValidator(_unicode_text)]
Stop = Text | Annotated[list[Text], Field(max_length=16)] | None


class TextPart(BaseModel):
    model_config = _STRICT
    type: Literal["text"]
    text: Text


class FunctionCall(BaseModel):
    model_config = _STRICT
    name: Text
    arguments: Text  # JSON text, as OpenAI sends it


class ToolCallIn(BaseModel):
    """A tool call of an earlier assistant turn, sent back in the conversation."""

    model_config = _STRICT
    id: Text | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = _STRICT
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None
    name: Text | None = None
    tool_calls: list[ToolCallIn] | None = Field(None, description="an assistant turn's tool calls")
    tool_call_id: Text | None = Field(None, description="a tool turn: the call it answers")

    def as_engine_message(self) -> dict:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        # OpenAI's newer "developer" role plays the system prompt's part.
        message = {"role": "system" if self.role == "developer" else self.role, "content": content or ""}
        if self.tool_calls:
            message["tool_calls"] = [call.model_dump() for call in self.tool_calls]
        if self.role == "tool":
            message.update({key: value for key, value in (("tool_call_id", self.tool_call_id), ("name", self.name)) if value})
        return message


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool = False


class SamplingFields(BaseModel):
    """What every generation request shares: sampling, streaming, salts, extensions."""

    model_config = _STRICT
    model: Text | None = Field(None, description="the served model's id (GET /v1/models); omitted = that model")
    max_tokens: int | None = Field(None, description="tokens to generate at most; prompt + max_tokens must fit the context")
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = Field(None, description="extension: keep the k most likely tokens (0 = off)")
    min_p: float | None = Field(None, description="extension: drop tokens below min_p times the top probability")
    seed: int | None = None
    stop: Stop = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool | None = Field(None, description="extension: keep generating past end-of-sequence")
    cache_salt: Text | None = Field(None, max_length=256, description="cache namespace of this request (as in vLLM)")
    n: int | None = Field(None, ge=1, le=MAX_CHOICES, description=f"choices, 1..{MAX_CHOICES}; they share the "
                                                                   "prompt's prefill")  # fmt: skip
    presence_penalty: float | None = Field(None, description="[-2, 2]: subtracted once from each token generated before")
    frequency_penalty: float | None = Field(None, description="[-2, 2]: subtracted per time a token was generated")
    repetition_penalty: float | None = Field(None, description="extension (as vLLM): > 1 discourages prompt and "
                                                                "generated tokens, 1 = off")  # fmt: skip
    logit_bias: dict[str, float] | None = Field(None, description="token id -> [-100, 100] added to its score")
    stop_token_ids: list[int] | None = Field(None, description="extension (as vLLM): token ids that end the answer")
    user: Text | None = None

    def sampling(self) -> dict:
        return {"max_tokens": self.max_tokens, "temperature": self.temperature, "top_p": self.top_p,
                "top_k": self.top_k, "min_p": self.min_p, "seed": self.seed,
                "stop": self.stop, "ignore_eos": self.ignore_eos, "presence_penalty": self.presence_penalty,
                "frequency_penalty": self.frequency_penalty, "repetition_penalty": self.repetition_penalty,
                "logit_bias": self.logit_bias, "stop_token_ids": self.stop_token_ids,
                "logprobs": self.top_logprobs_wanted()}  # fmt: skip

    def top_logprobs_wanted(self) -> int | None:
        """How many alternatives each token's log-probability comes with; None: no log-probabilities."""
        return None

    def unsupported_fields(self) -> list[str]:
        return []

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: int | None = Field(None, description="newer name of max_tokens")
    logprobs: bool | None = Field(None, description="return each answer token's log-probability")
    top_logprobs: int | None = Field(None, description="with logprobs: this many most likely alternatives, 0..20")
    tools: list[dict] | None = Field(None, description="function tools, shown to the model through its chat template")
    tool_choice: Text | dict | None = Field(None, description="none, auto (the default with tools), required, or "
                                                               "a named function; required and named are enforced "
                                                               "by constrained decoding")  # fmt: skip
    parallel_tool_calls: bool | None = Field(None, description="false: at most one tool call per answer")
    response_format: dict | None = Field(None, description='{"type": "text"}, {"type": "json_object"} or '
                                                           '{"type": "json_schema", "json_schema": {"schema": ...}}, '
                                                           "enforced by constrained decoding")  # fmt: skip
    reasoning_effort: Text | None = Field(None, description="not supported")
    # Accepted, with no effect on the answer: who asks, and hints for OpenAI's own prompt cache routing (this
    # server's cache keeps every prefix it can without them).
    metadata: dict[str, Text] | None = Field(None, description="accepted: labels, no effect on the answer")
    safety_identifier: Text | None = Field(None, description="accepted: identifies the end user")
    prompt_cache_key: Text | None = Field(None, description="accepted: this server caches every prefix without it")
    prompt_cache_retention: Text | None = Field(None, description="accepted: the cache's own budgets decide retention")
    service_tier: Text | None = Field(None, description='only "auto" or "default"')
    store: bool | None = Field(None, description="only false: answers are not stored")
    modalities: list[Text] | None = Field(None, description='only ["text"]')
    # Not served: refused when set.
    audio: dict | None = Field(None, description="not supported")
    functions: list | None = Field(None, description="not supported (the older form of tools: send tools)")
    function_call: Text | dict | None = Field(None, description="not supported (send tool_choice)")
    prediction: dict | None = Field(None, description="not supported")
    verbosity: Text | None = Field(None, description="not supported")
    web_search_options: dict | None = Field(None, description="not supported")
    moderation: object = Field(None, description="not supported")
    prompt_cache_options: object = Field(None, description="not supported")

    def sampling(self) -> dict:
        fields = super().sampling()
        if fields["max_tokens"] is None:
            fields["max_tokens"] = self.max_completion_tokens
        return fields

    def top_logprobs_wanted(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def unsupported_fields(self) -> list[str]:
        problems = super().unsupported_fields()
        if self.top_logprobs is not None and not self.logprobs:
            problems.append("top_logprobs (only with logprobs: true)")
        if self.reasoning_effort is not None:
            problems.append("reasoning_effort")
        problems += [name for name in ("audio", "functions", "function_call", "prediction", "verbosity",
                                       "web_search_options", "moderation", "prompt_cache_options")
                     if getattr(self, name) is not None]  # fmt: skip
        if self.service_tier not in (None, "auto", "default"):
            problems.append('service_tier (only "auto" or "default")')
        if self.store:
            problems.append("store (answers are not stored)")
        if self.modalities not in (None, ["text"]):
            problems.append('modalities (only ["text"])')
        return problems


# An empty list of ids passes here: the engine's one prompt rule refuses it, as it does an empty text.
PromptInput = Text | Annotated[list[Text], Field(min_length=1, max_length=1)] | list[int]


class CompletionRequest(SamplingFields):
    prompt: PromptInput = Field(description="text, a list of one text, or a list of token ids")
    echo: bool | None = Field(None, description="not supported")
    suffix: str | None = Field(None, description="not supported")
    best_of: int | None = Field(None, description="only 1 is supported")
    logprobs: int | None = Field(None, description="each token's log-probability with this many alternatives, 0..20")

    def top_logprobs_wanted(self) -> int | None:
        return self.logprobs

    def unsupported_fields(self) -> list[str]:
        problems = super().unsupported_fields()
        if self.echo:
            problems.append("echo")
        if self.suffix:
            problems.append("suffix")
        if self.best_of not in (None, 1):
            problems.append("best_of (only 1)")
        return problems


class ProbeRequest(BaseModel):
    """Exactly one of `messages` (chat) or `prompt` (text or token ids)."""

    model_config = _STRICT
    model: Text | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    prompt: PromptInput | None = None
    cache_salt: Text | None = Field(None, max_length=256)


class ClearRequest(BaseModel):
    model_config = _STRICT
    tier: Text | None = Field(None, description="a tier name from GET /v1/cache/stats; omitted = every tier")


class BudgetRequest(BaseModel):
    model_config = _STRICT
    tier: Text
    budget: int | Text = Field(description="bytes, or a size such as '512M', '2G', '0'")
