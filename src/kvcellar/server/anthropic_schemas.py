"""Anthropic's Messages API request bodies, and their translation to the chat request kvcellar runs.

Operations: `MessagesRequest`, `CountTokensRequest`, `.to_chat()` -> a `ChatCompletionRequest` (the
same preparation, tools and grammars as /v1/chat/completions), `.last_breakpoint()` (the last message
that ends at a `cache_control` breakpoint).

Translation: `system` becomes the system message; a user turn's `tool_result` blocks become `tool`
messages (before its text), an assistant turn's `tool_use` blocks its `tool_calls`; `tools` and
`tool_choice` (auto, any = required, tool = a named function, none; `disable_parallel_tool_use`) map
to OpenAI's; `stop_sequences` to `stop`, `output_config.format` to a JSON Schema response format. Anthropic's
default temperature is 1 (current clients no longer send one; kvcellar still takes `temperature`,
`top_p` and `top_k` in the body). Fields kvcellar does not serve (images, documents, extended thinking,
effort, server tools, MCP, containers) are refused with 400 `unsupported_parameter`, never dropped.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from kvcellar.server.schemas import ChatCompletionRequest, Text

_STRICT = ConfigDict(strict=True, extra="ignore")


class CacheControl(BaseModel):
    model_config = _STRICT
    type: Literal["ephemeral"] = "ephemeral"
    ttl: Text | None = None


class TextBlock(BaseModel):
    model_config = _STRICT
    type: Literal["text"]
    text: Text
    cache_control: CacheControl | None = None


class ToolUseBlock(BaseModel):
    model_config = _STRICT
    type: Literal["tool_use"]
    id: Text
    name: Text
    input: dict[str, Any]
    cache_control: CacheControl | None = None


class ToolResultBlock(BaseModel):
    model_config = _STRICT
    type: Literal["tool_result"]
    tool_use_id: Text
    content: Text | list[TextBlock] = ""
    is_error: bool = False
    cache_control: CacheControl | None = None

    def text(self) -> str:
        text = self.content if isinstance(self.content, str) else "".join(block.text for block in self.content)
        return f"Error: {text}" if self.is_error else text


class OtherBlock(BaseModel):
    """A block type kvcellar does not serve (image, document, thinking, server tool results)."""

    model_config = ConfigDict(extra="allow")
    type: Text


Block = Annotated[TextBlock | ToolUseBlock | ToolResultBlock, Field(discriminator="type")] | OtherBlock


class Message(BaseModel):
    model_config = _STRICT
    role: Literal["user", "assistant"]
    content: Text | list[Block]

    def blocks(self) -> list:
        return [TextBlock(type="text", text=self.content)] if isinstance(self.content, str) else list(self.content)


class ToolDefinition(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    name: Text
    description: Text = ""
    input_schema: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    type: Text | None = None  # "custom" or none; server tools (web_search_...) are refused
    cache_control: CacheControl | None = None


class ToolChoice(BaseModel):
    model_config = _STRICT
    type: Literal["auto", "any", "tool", "none"]
    name: Text | None = None
    disable_parallel_tool_use: bool = False


class CountTokensRequest(BaseModel):
    model_config = _STRICT
    model: Text
    messages: Annotated[list[Message], Field(min_length=1)]
    system: Text | list[TextBlock] | None = None
    tools: list[ToolDefinition] | None = None
    tool_choice: ToolChoice | None = None
    thinking: dict | None = Field(None, description="not supported")
    cache_control: CacheControl | None = Field(None, description="a breakpoint on the last message")
    output_config: dict | None = Field(None, description='{"format": {"type": "json_schema", "schema": ...}}: '
                                                         "the answer follows the schema (constrained decoding)")  # fmt: skip
    speed: Any = Field(None, description="not supported")
    user_profile_id: Any = Field(None, description="not supported")
    workspace_id: Any = Field(None, description="not supported")

    def unsupported_fields(self) -> list[str]:
        problems = [f"messages[{i}] {block.type} blocks" for i, message in enumerate(self.messages)
                    for block in message.blocks() if isinstance(block, OtherBlock)]  # fmt: skip
        problems += [f"tools ({tool.name}: server tool {tool.type})" for tool in self.tools or []
                     if tool.type not in (None, "custom")]  # fmt: skip
        if self.thinking is not None and self.thinking.get("type") != "disabled":
            problems.append("thinking (extended thinking)")
        problems += [name for name in ("speed", "user_profile_id", "workspace_id") if getattr(self, name) is not None]
        config = self.output_config or {}
        if config.get("effort") is not None:
            problems.append("output_config.effort")
        if set(config) - {"effort", "format"}:
            problems.append(f"output_config ({', '.join(sorted(set(config) - {'effort', 'format'}))})")
        return problems

    def _system_text(self) -> str | None:
        if self.system is None:
            return None
        return self.system if isinstance(self.system, str) else "".join(block.text for block in self.system)

    def chat_messages(self) -> list[dict]:
        return self._converted()[0]

    def _converted(self) -> tuple[list[dict], list[int]]:
        """The chat messages, and for each Anthropic message the index of the last chat message it became."""
        messages = [] if self._system_text() is None else [{"role": "system", "content": self._system_text()}]
        ends = []
        for message in self.messages:
            blocks = message.blocks()
            text = "".join(block.text for block in blocks if isinstance(block, TextBlock))
            if message.role == "user":
                messages += [{"role": "tool", "tool_call_id": block.tool_use_id, "content": block.text()}
                             for block in blocks if isinstance(block, ToolResultBlock)]  # fmt: skip
                if text or not any(isinstance(block, ToolResultBlock) for block in blocks):
                    messages.append({"role": "user", "content": text})
            else:
                calls = [{"id": block.id, "type": "function",
                          "function": {"name": block.name, "arguments": json.dumps(block.input, ensure_ascii=False)}}
                         for block in blocks if isinstance(block, ToolUseBlock)]  # fmt: skip
                messages.append({"role": "assistant", "content": text or None, **({"tool_calls": calls} if calls else {})})
            ends.append(len(messages) - 1)
        return messages, ends

    def openai_tools(self) -> list[dict] | None:
        if not self.tools:
            return None
        return [{"type": "function", "function": {"name": tool.name, "description": tool.description,
                                                  "parameters": tool.input_schema}} for tool in self.tools]  # fmt: skip

    def openai_tool_choice(self) -> tuple[object, bool | None]:
        """OpenAI's tool_choice and parallel_tool_calls for this request's tool_choice."""
        choice = self.tool_choice
        if choice is None:
            return None, None
        mapped = {"auto": "auto", "any": "required", "none": "none"}.get(choice.type)
        if choice.type == "tool":
            mapped = {"type": "function", "function": {"name": choice.name}}
        return mapped, False if choice.disable_parallel_tool_use else None

    def last_breakpoint(self) -> int | None:
        """The index in `chat_messages()` of the last message that carries a `cache_control` breakpoint (None:
        none does; one on the system prompt or the tools needs nothing more: that prefix is kept first anyway)."""
        _, ends = self._converted()
        marked = [end for message, end in zip(self.messages, ends)
                  if any(getattr(block, "cache_control", None) for block in message.blocks())]  # fmt: skip
        return marked[-1] if marked else None


class MessagesRequest(CountTokensRequest):
    max_tokens: int
    stop_sequences: Annotated[list[Text], Field(max_length=16)] | None = None
    stream: bool = False
    temperature: float | None = Field(None, description="0..1 (Anthropic's range); default 1")
    top_p: float | None = None
    top_k: int | None = None
    metadata: dict | None = Field(None, description="accepted: identifies the caller, does not change the answer")
    service_tier: Text | None = Field(None, description='only "auto" or "standard_only"')
    mcp_servers: list | None = Field(None, description="not supported")
    container: Any = Field(None, description="not supported")
    diagnostics: Any = Field(None, description="not supported")
    inference_geo: Any = Field(None, description="not supported")

    def unsupported_fields(self) -> list[str]:
        problems = super().unsupported_fields()
        problems += [name for name in ("mcp_servers", "container", "diagnostics", "inference_geo")
                     if getattr(self, name) is not None]  # fmt: skip
        if self.service_tier not in (None, "auto", "standard_only"):
            problems.append('service_tier (only "auto" or "standard_only")')
        if self.temperature is not None and not 0 <= self.temperature <= 1:
            problems.append("temperature (0 to 1 on this API)")
        return problems

    def last_breakpoint(self) -> int | None:
        """As `CountTokensRequest.last_breakpoint`; a top-level `cache_control` marks the last message."""
        return len(self.chat_messages()) - 1 if self.cache_control is not None else super().last_breakpoint()

    def to_chat(self) -> ChatCompletionRequest:
        tool_choice, parallel = self.openai_tool_choice()
        output_format = (self.output_config or {}).get("format")
        response_format = None
        if output_format is not None:
            schema = output_format.get("schema") if isinstance(output_format, dict) else None
            response_format = {"type": "json_schema", "json_schema": {"name": "output", "schema": schema}}
        fields = {"model": self.model, "messages": self.chat_messages(), "max_tokens": self.max_tokens,
                  "temperature": 1.0 if self.temperature is None else self.temperature, "top_p": self.top_p,
                  "top_k": self.top_k, "stop": self.stop_sequences, "stream": self.stream, "tools": self.openai_tools(),
                  "tool_choice": tool_choice, "parallel_tool_calls": parallel, "response_format": response_format}  # fmt: skip
        return ChatCompletionRequest.model_validate({key: value for key, value in fields.items() if value is not None},
                                                    strict=False)  # fmt: skip
