"""OpenAI response bodies: whole answers, stream chunks, usage with cached tokens per tier.

Operations: `usage(results)`, `completion_body`, `chunk_body`, `usage_chunk`, `render_logprobs`,
`sse(data)`. `kind` is "chat" (chat.completion[.chunk]) or "text" (text_completion). A request with
`n` choices has one GenerationResult per choice. `usage.prompt_tokens_details.cached_tokens` is
OpenAI's field (the prompt tokens the first choice found cached); `cached_tokens_by_tier` (tier name ->
tokens) and `prefilled_tokens` (prompt tokens computed for all choices together: with `n` > 1 the
later choices reuse the first one's prefill) are ours, and so is the top-level `timings` object.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from kvcellar.chat.reasoning import ReasoningSplit
from kvcellar.chat.tool_calls import split_tool_calls
from kvcellar.chat.tools import ToolChoice
from kvcellar.engine import GenerationResult
from kvcellar.engine.logits import TokenLogprob
from kvcellar.server.logprobs import TokenText, chat_logprobs, completion_logprobs

_OBJECTS = {"chat": ("chat.completion", "chat.completion.chunk"), "text": ("text_completion", "text_completion")}


def finish_reason(result: GenerationResult) -> str:
    # "cancelled" only reaches a client that is gone; anything else is OpenAI's own word.
    return result.finish_reason if result.finish_reason in ("stop", "length") else "stop"


def usage(results: Sequence[GenerationResult]) -> dict:
    first = results[0]
    completion = sum(len(result.token_ids) for result in results)
    return {
        "prompt_tokens": first.num_prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": first.num_prompt_tokens + completion,
        "prompt_tokens_details": {
            "cached_tokens": first.num_cached_tokens,
            "cached_tokens_by_tier": dict(first.cached_tokens_by_tier),
            "prefilled_tokens": sum(result.timings.num_prefill_tokens for result in results),
        },
    }


def _header(kind: str, request_id: str, created: int, model: str, chunk: bool) -> dict:
    return {"id": request_id, "object": _OBJECTS[kind][chunk], "created": created, "model": model}


def render_logprobs(kind: str, entries: Sequence[TokenLogprob], token_text: TokenText, offset: int = 0) -> dict:
    if kind == "chat":
        return chat_logprobs(entries, token_text)
    return completion_logprobs(entries, token_text, offset)


def _choice(kind: str, index: int, result: GenerationResult, token_text: TokenText | None,
            tool_choice: ToolChoice | None, reasoning: ReasoningSplit | None) -> dict:  # fmt: skip
    choice: dict = {"index": index, "finish_reason": finish_reason(result), "logprobs": None}
    if result.logprobs is not None and token_text is not None:
        choice["logprobs"] = render_logprobs(kind, result.logprobs, token_text)
    if kind != "chat":
        choice["text"] = result.text
        return choice
    thought, text = reasoning.split(result.text) if reasoning is not None else (None, result.text)
    message: dict = {"role": "assistant", "content": text}
    if thought is not None:
        message["reasoning_content"] = thought
    if tool_choice is not None and tool_choice.parses_calls:
        content, calls = split_tool_calls(text, tool_choice.parallel)
        if calls:
            message.update(content=content or None, tool_calls=[call.as_openai() for call in calls])
            choice["finish_reason"] = "tool_calls"
    choice["message"] = message
    return choice


def completion_body(kind: str, request_id: str, created: int, model: str, results: Sequence[GenerationResult],
                    token_text: TokenText | None = None, tool_choice: ToolChoice | None = None,
                    reasoning: ReasoningSplit | None = None) -> dict:  # fmt: skip
    """A whole answer, a choice per result; `token_text` (id -> text) renders log-probabilities where the results
    have them; with a `tool_choice` that parses calls, tool calls come out of the text (chat/tool_calls.py); with
    `reasoning`, a leading reasoning block becomes `reasoning_content` (chat/reasoning.py)."""
    choices = [_choice(kind, index, result, token_text, tool_choice, reasoning) for index, result in enumerate(results)]
    return {**_header(kind, request_id, created, model, False), "choices": choices, "usage": usage(results),
            "timings": results[0].timings.as_dict()}  # fmt: skip


def chunk_body(kind: str, request_id: str, created: int, model: str, text: str | None, finish: str | None = None,
               first: bool = False, logprobs: dict | None = None, tool_call: dict | None = None,
               index: int = 0, reasoning: str | None = None) -> dict:  # fmt: skip
    """One stream chunk of choice `index`: new text, new reasoning (chat), a whole tool call (`tool_call`, chat),
    or (text None) the closing chunk with its finish_reason."""
    choice: dict = {"index": index, "finish_reason": finish, "logprobs": logprobs}
    if kind == "chat":
        delta: dict = {"role": "assistant"} if first else {}
        if text is not None:
            delta["content"] = text
        if reasoning is not None:
            delta["reasoning_content"] = reasoning
        if tool_call is not None:
            delta["tool_calls"] = [tool_call]
        choice["delta"] = delta
    else:
        choice["text"] = text or ""
    return {**_header(kind, request_id, created, model, True), "choices": [choice]}


def usage_chunk(kind: str, request_id: str, created: int, model: str, results: Sequence[GenerationResult]) -> dict:
    """Sent last when the request asked for stream_options.include_usage (choices empty, as OpenAI does)."""
    return {**_header(kind, request_id, created, model, True), "choices": [], "usage": usage(results),
            "timings": results[0].timings.as_dict()}  # fmt: skip


def sse(data: dict | str) -> str:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n"
