"""OpenAI tool definitions and `tool_choice`, and chat messages with tool calls rendered for a template.

Operations: `parse_tools(raw) -> tuple[Tool, ...]`, `parse_tool_choice(raw, tools, parallel) -> ToolChoice`,
`template_inputs(messages, tools, native) -> (messages, tools for the template or None)`,
`has_native_tools(template)`.

Two ways to show a model its tools. A chat template that renders tools itself (it names `tools`, as
Qwen's, Llama's and Mistral's do) gets them as `tools=` with the assistant turns' `tool_calls` and the
`tool` turns as they are (arguments as JSON objects, which every such template can print). Any other
template gets the generic form: the tool list and how to call them added to the system prompt, earlier
calls written into the assistant turns as `<tool_call>` blocks, and tool results as a user turn of
`<tool_response>` blocks; `chat/tool_calls.py` parses that same `<tool_call>` form back out of an
answer. The rendering depends only on the request's messages and tools, so a conversation's earlier
turns render the same at every step and stay cached.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

from kvcellar.chat.grammar import TOOL_CALL_CLOSE, TOOL_CALL_OPEN
from kvcellar.errors import InvalidRequestError

_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
MAX_TOOLS = 128


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict  # a JSON Schema of the arguments object

    def as_openai(self) -> dict:
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}  # fmt: skip


@dataclass(frozen=True)
class ToolChoice:
    mode: str  # "none" (tools shown, answer is text), "auto" (calls parsed), "required", "function"
    name: str | None = None  # the tool of mode "function"
    parallel: bool = True  # more than one call per answer

    @property
    def parses_calls(self) -> bool:
        return self.mode != "none"

    @property
    def forces_calls(self) -> bool:
        return self.mode in ("required", "function")


def parse_tools(raw: Sequence[object]) -> tuple[Tool, ...]:
    """OpenAI's `tools` (function tools) checked: names unique and well formed, parameters an object schema."""
    if len(raw) > MAX_TOOLS:
        raise InvalidRequestError(f"tools holds {len(raw)} tools; at most {MAX_TOOLS}", field="tools")
    tools = []
    for index, item in enumerate(raw):
        where = f"tools[{index}]"
        if not isinstance(item, dict) or item.get("type") != "function" or not isinstance(item.get("function"), dict):
            raise InvalidRequestError(f'{where} must be {{"type": "function", "function": {{"name": ...}}}}', field="tools")
        function = item["function"]
        name = function.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise InvalidRequestError(f"{where}.function.name must be 1-64 letters, digits, '_', '.' or '-' (got {name!r})",
                                      field="tools")  # fmt: skip
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
            raise InvalidRequestError(f"{where}.function.parameters must be a JSON Schema of an object", field="tools")
        description = function.get("description") or ""
        if not isinstance(description, str):
            raise InvalidRequestError(f"{where}.function.description must be text", field="tools")
        if any(tool.name == name for tool in tools):
            raise InvalidRequestError(f"two tools are named {name!r}: tool names must be unique", field="tools")
        tools.append(Tool(name, description, parameters))
    return tuple(tools)


def parse_tool_choice(raw: object, tools: Sequence[Tool], parallel: bool | None) -> ToolChoice:
    """`tool_choice` as OpenAI defines it; omitted: "auto" with tools, "none" without."""
    parallel = True if parallel is None else parallel
    if raw is None:
        return ToolChoice("auto" if tools else "none", parallel=parallel)
    if raw in ("none", "auto", "required"):
        if raw == "required" and not tools:
            raise InvalidRequestError('tool_choice "required" needs tools', field="tool_choice")
        return ToolChoice(raw, parallel=parallel)
    name = raw.get("function", {}).get("name") if isinstance(raw, dict) and raw.get("type") == "function" else None
    if not isinstance(name, str):
        raise InvalidRequestError('tool_choice must be "none", "auto", "required" or {"type": "function", "function": '
                                  '{"name": ...}}', field="tool_choice")  # fmt: skip
    if not any(tool.name == name for tool in tools):
        raise InvalidRequestError(f"tool_choice names {name!r}, which is not among the request's tools", field="tool_choice")
    return ToolChoice("function", name, parallel)


def has_native_tools(template: str | None) -> bool:
    """Whether a chat template renders tools itself (it reads a `tools` variable)."""
    return bool(template) and re.search(r"\btools\b", template) is not None


def _arguments_object(text: object) -> object:
    if not isinstance(text, str):
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _call_block(call: dict) -> str:
    function = call.get("function", {})
    payload = {"name": function.get("name"), "arguments": _arguments_object(function.get("arguments", {}))}
    return f"{TOOL_CALL_OPEN}\n{json.dumps(payload, ensure_ascii=False)}\n{TOOL_CALL_CLOSE}"


def _tools_prompt(tools: Sequence[Tool]) -> str:
    listing = "\n".join(json.dumps(tool.as_openai(), ensure_ascii=False) for tool in tools)
    return ("# Tools\n\nYou may call the functions below. Their definitions, one JSON object per line:\n"
            f"<tools>\n{listing}\n</tools>\n\n"
            "To call functions, answer with one block per call and nothing else:\n"
            f'{TOOL_CALL_OPEN}\n{{"name": "<function name>", "arguments": {{<the arguments as a JSON object>}}}}\n'
            f"{TOOL_CALL_CLOSE}")  # fmt: skip


def _generic(messages: Sequence[dict], tools: Sequence[Tool]) -> list[dict]:
    rendered: list[dict] = []
    for message in messages:
        role, content = message["role"], message.get("content") or ""
        if role == "assistant" and message.get("tool_calls"):
            blocks = "\n".join(_call_block(call) for call in message["tool_calls"])
            rendered.append({"role": "assistant", "content": f"{content}\n{blocks}" if content else blocks})
        elif role == "tool":
            block = f"<tool_response>\n{content}\n</tool_response>"
            if rendered and rendered[-1].get("tool_results"):  # results of one step share a user turn
                rendered[-1]["content"] += "\n" + block
            else:
                rendered.append({"role": "user", "content": block, "tool_results": True})
        else:
            rendered.append({"role": role, "content": content})
    if tools:
        prompt = _tools_prompt(tools)
        if rendered and rendered[0]["role"] == "system":
            rendered[0] = {"role": "system", "content": f"{rendered[0]['content']}\n\n{prompt}"}
        else:
            rendered.insert(0, {"role": "system", "content": prompt})
    return [{"role": m["role"], "content": m["content"]} for m in rendered]


def _native(messages: Sequence[dict]) -> list[dict]:
    rendered = []
    for message in messages:
        message = dict(message)
        if message.get("tool_calls"):
            message["tool_calls"] = [{"type": "function", "id": call.get("id"),
                                      "function": {"name": call.get("function", {}).get("name"),
                                                   "arguments": _arguments_object(call.get("function", {}).get("arguments", {}))}}
                                     for call in message["tool_calls"]]  # fmt: skip
        rendered.append(message)
    return rendered


def template_inputs(messages: Sequence[dict], tools: Sequence[Tool], native: bool) -> tuple[list[dict], list[dict] | None]:
    """The messages (and `tools=` argument) to hand the chat template; see the module doc."""
    if native:
        return _native(messages), [tool.as_openai() for tool in tools] or None
    return _generic(messages, tools), None
