"""Tool calls in an answer: the Hermes / Qwen form, `<tool_call>` JSON `</tool_call>`, whole or streamed.

Operations: `split_tool_calls(text, parallel) -> (content, calls)`; `ToolCallStream(parallel)`,
`.push(text) -> pieces`, `.flush() -> pieces` (a piece is content text or a `ToolCall`), `.calls`.

A block whose JSON does not parse, or has no string "name", stays in the content as the model wrote it
(a caller sees what came rather than losing it). `arguments` (or "parameters", as some templates name
it) is returned as JSON text, as OpenAI's API sends it. With `parallel` False only the first call counts;
later blocks stay content.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from kvcellar.chat.grammar import TOOL_CALL_CLOSE, TOOL_CALL_OPEN
from kvcellar.chat.partial import partial_marker_length


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text

    def as_openai(self, index: int | None = None) -> dict:
        call = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return call if index is None else {"index": index, **call}


def _parse_block(body: str) -> ToolCall | None:
    try:
        payload = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(payload, dict) or not isinstance(payload.get("name"), str):
        return None
    arguments = payload.get("arguments", payload.get("parameters", {}))
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return ToolCall(f"call_{uuid.uuid4().hex[:24]}", payload["name"], text)


class ToolCallStream:
    """Splits streamed answer text into content and tool calls; text that may open a block is held back."""

    def __init__(self, parallel: bool = True) -> None:
        self.parallel = parallel
        self.calls: list[ToolCall] = []
        self._held = ""  # text not yet given out: a possible block opening, or an open block
        self._in_block = False

    def push(self, text: str) -> list[str | ToolCall]:
        self._held += text
        pieces: list[str | ToolCall] = []
        while True:
            if self._in_block:
                end = self._held.find(TOOL_CALL_CLOSE)
                if end < 0:
                    return pieces
                block, self._held = self._held[: end + len(TOOL_CALL_CLOSE)], self._held[end + len(TOOL_CALL_CLOSE) :]
                self._in_block = False
                call = _parse_block(block[len(TOOL_CALL_OPEN) : -len(TOOL_CALL_CLOSE)])
                if call is None:
                    pieces.append(block)
                else:
                    self.calls.append(call)
                    pieces.append(call)
                continue
            start = self._held.find(TOOL_CALL_OPEN) if self.parallel or not self.calls else -1
            if start >= 0:
                if start:
                    pieces.append(self._held[:start])
                self._held, self._in_block = self._held[start:], True
                continue
            keep = partial_marker_length(self._held, (TOOL_CALL_OPEN,)) if self.parallel or not self.calls else 0
            if len(self._held) > keep:
                pieces.append(self._held[: len(self._held) - keep])
                self._held = self._held[len(self._held) - keep :]
            return pieces

    def flush(self) -> list[str | ToolCall]:
        """The end of the answer: held text (an unfinished block too) is content."""
        held, self._held, self._in_block = self._held, "", False
        return [held] if held else []


def split_tool_calls(text: str, parallel: bool = True) -> tuple[str, list[ToolCall]]:
    """A whole answer's content (its text outside parsed blocks, stripped) and its tool calls."""
    stream = ToolCallStream(parallel)
    pieces = stream.push(text) + stream.flush()
    content = "".join(piece for piece in pieces if isinstance(piece, str))
    return content.strip(), stream.calls
