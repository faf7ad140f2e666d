"""Turn text or chat messages into token ids, and find the message boundaries.

Operations: `encode_text`, `encode_chat` -> (token ids, PromptSegments),
`validate_messages`. Tools and tool calls reach the template as chat/tools.py renders them.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvcellar.chat.tools import Tool, has_native_tools, template_inputs
from kvcellar.engine.request import PromptSegments
from kvcellar.errors import InvalidRequestError

ROLES = ("system", "user", "assistant", "tool")


def validate_messages(messages: Sequence[dict]) -> list[dict]:
    if not messages:
        raise InvalidRequestError("messages is empty: send at least one {'role': 'user', 'content': ...} message", field="messages")
    cleaned = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            raise InvalidRequestError(f"messages[{index}] must be an object with 'role' and 'content'", field="messages")
        if message["role"] not in ROLES:
            raise InvalidRequestError(f"messages[{index}].role {message['role']!r} is not one of {', '.join(ROLES)}", field="messages")
        content = message.get("content") or ""
        if isinstance(content, list):  # OpenAI content parts: keep the text parts
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        if not isinstance(content, str):
            raise InvalidRequestError(f"messages[{index}].content must be a string", field="messages")
        entry = {"role": message["role"], "content": content}
        calls = message.get("tool_calls")
        if calls:
            if message["role"] != "assistant" or not isinstance(calls, list):
                raise InvalidRequestError(f"messages[{index}].tool_calls: a list, on assistant messages only", field="messages")
            entry["tool_calls"] = calls
        for key in ("tool_call_id", "name"):
            if message["role"] == "tool" and message.get(key):
                entry[key] = message[key]
        cleaned.append(entry)
    return cleaned


def encode_text(tokenizer: object, text: str) -> list[int]:
    if not isinstance(text, str):
        raise InvalidRequestError("prompt must be a string")
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _render_ids(tokenizer: object, messages: list[dict], tools: Sequence[Tool], add_generation_prompt: bool) -> list[int]:
    shown, template_tools = template_inputs(messages, tools, has_native_tools(tokenizer.chat_template))
    text = tokenizer.apply_chat_template(shown, tools=template_tools, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)  # fmt: skip
    return encode_text(tokenizer, text)


def encode_chat(tokenizer: object, messages: Sequence[dict], tools: Sequence[Tool] = (),
                keep_through: int | None = None) -> tuple[list[int], PromptSegments]:  # fmt: skip
    """Template + tokenize, and locate the end of the system prompt and of the last user message.

    A boundary is kept only if the ids of the prefix rendered alone are a
    prefix of the full ids (BPE may merge across a boundary; then we skip it).
    `keep_through`: a message index the caller marked to keep (a cache breakpoint): the prompt up to its
    end is kept at the priority of a user message at least.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise InvalidRequestError("this model's tokenizer has no chat template: send a plain prompt instead")
    cleaned = validate_messages(messages)
    ids = _render_ids(tokenizer, cleaned, tools, add_generation_prompt=cleaned[-1]["role"] != "assistant")
    last_user_end = _boundary(tokenizer, cleaned, tools, ids, "user")
    if keep_through is not None and 0 <= keep_through < len(cleaned):
        marked = _prefix_end(tokenizer, cleaned[: keep_through + 1], tools, ids)
        last_user_end = max(last_user_end or 0, marked or 0) or None
    return ids, PromptSegments(system_end=_boundary(tokenizer, cleaned, tools, ids, "system"), last_user_end=last_user_end)


def _boundary(tokenizer: object, messages: list[dict], tools: Sequence[Tool], ids: list[int], role: str) -> int | None:
    last = max((i for i, m in enumerate(messages) if m["role"] == role), default=None)
    if last is None or (role == "system" and last != 0):
        return None
    return _prefix_end(tokenizer, messages[: last + 1], tools, ids)


def _prefix_end(tokenizer: object, messages: list[dict], tools: Sequence[Tool], ids: list[int]) -> int | None:
    """Where `messages` rendered alone end inside `ids`, or None where they are not a prefix of them."""
    prefix = _render_ids(tokenizer, messages, tools, add_generation_prompt=False)
    if len(prefix) >= len(ids) or ids[: len(prefix)] != prefix:
        return None
    return len(prefix)
