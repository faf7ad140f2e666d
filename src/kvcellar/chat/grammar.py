"""Grammars (llguidance's Lark dialect, engine/constraint.py) for structured output and forced tool calls.

Operations: `json_grammar(schema)`, `tool_call_grammar(tools, name, parallel)`.

JSON is written compact (no optional whitespace): a model then cannot spend its tokens on blanks, and
the text is the same JSON either way. A tool call is the Hermes / Qwen form that `tool_calls` parses:
`<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, the arguments held to the tool's
parameter schema.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvcellar.chat.tools import Tool

_COMPACT = {"x-guidance": {"whitespace_flexible": False}}
TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"


def _json_rule(schema: dict) -> str:
    return "%json " + json.dumps({**schema, **_COMPACT})


def json_grammar(schema: dict) -> str:
    """The answer is one JSON value that `schema` accepts (`{"type": "object"}`: any JSON object)."""
    return f"start: {_json_rule(schema)}\n"


def _call_schema(tool: Tool) -> dict:
    return {"type": "object", "properties": {"name": {"const": tool.name}, "arguments": tool.parameters},
            "required": ["name", "arguments"], "additionalProperties": False}  # fmt: skip


def tool_call_grammar(tools: Sequence[Tool], name: str | None, parallel: bool) -> str:
    """The answer is tool calls only: of the tool `name` (None: any of `tools`), one or, if `parallel`, more."""
    chosen = [tool for tool in tools if name is None or tool.name == name]
    schema = _call_schema(chosen[0]) if len(chosen) == 1 else {"anyOf": [_call_schema(tool) for tool in chosen]}
    calls = 'call ("\\n" call)*' if parallel else "call"
    return (f"start: {calls}\n"
            f"call: {json.dumps(TOOL_CALL_OPEN + chr(10))} {_json_rule(schema)} {json.dumps(chr(10) + TOOL_CALL_CLOSE)}\n")  # fmt: skip


def response_format_grammar(response_format: object) -> str | None:
    """OpenAI's `response_format` as a grammar: None for text, any JSON object, or a JSON Schema's values."""
    from kvcellar.errors import InvalidRequestError

    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if response_format is None or kind == "text":
        return None
    if kind == "json_object":
        return json_grammar({"type": "object"})
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema", {}) if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise InvalidRequestError('response_format json_schema needs {"json_schema": {"name": ..., "schema": {...}}}',
                                      field="response_format")  # fmt: skip
        return json_grammar(schema)
    raise InvalidRequestError('response_format type must be "text", "json_object" or "json_schema"', field="response_format")
