"""A streamed OpenAI answer: server-sent chunks for one or more choices (`n`), merged as they come.

Operations: `stream_chunks(header, streams, include_usage, token_text, tool_choice)` -> SSE lines.

Each choice's engine stream is read by its own task; chunks go out in the order tokens arrive, each
naming its choice's index. Per choice: one chunk per token (empty while a character is incomplete
or while text that may open a tool call is held back, so log-probabilities still arrive per token),
tool calls as whole `tool_calls` deltas (chat/tool_calls.py), then its closing chunk with the finish
reason. With a template that marks reasoning, the answer's reasoning block goes out as
`delta.reasoning_content` (chat/reasoning.py) and only the rest is content. The usage chunk (if asked
for) covers every choice, then `[DONE]`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence

from kvcellar.chat.reasoning import ReasoningSplit
from kvcellar.chat.tool_calls import ToolCallStream
from kvcellar.chat.tools import ToolChoice
from kvcellar.engine import GenerationResult, StreamEvent
from kvcellar.server.errors import error_body
from kvcellar.server.logprobs import TokenText
from kvcellar.server.responses import chunk_body, finish_reason, render_logprobs, sse, usage_chunk

_ENDED = object()


class _Choice:
    """The chunks of one choice's events."""

    def __init__(self, header: tuple, index: int, token_text: TokenText, tool_choice: ToolChoice,
                 reasoning: ReasoningSplit | None) -> None:  # fmt: skip
        self.header, self.index, self.token_text = header, index, token_text
        self.calls = ToolCallStream(tool_choice.parallel) if tool_choice.parses_calls else None
        self.thoughts = reasoning.stream() if reasoning is not None else None
        self.offset = 0  # where the next token's text starts in the answer (completions' text_offset)
        self.result: GenerationResult | None = None

    def _chunk(self, text: str | None, **fields: object) -> str:
        return sse(chunk_body(*self.header, text, index=self.index, **fields))

    def first(self) -> str:
        return self._chunk("", first=True)

    def token(self, event: StreamEvent) -> list[str]:
        logprobs = None
        if event.logprob is not None:
            logprobs = render_logprobs(self.header[0], [event.logprob], self.token_text, self.offset)
            if "tokens" in logprobs:  # completions' shape: the next token's text starts after this one's
                self.offset += len(logprobs["tokens"][0])
        if self.calls is None and self.thoughts is None:
            return [self._chunk(event.text, logprobs=logprobs)]
        return self._pieces(self._split(event.text), logprobs) or [self._chunk("", logprobs=logprobs)]

    def _split(self, text: str, end: bool = False) -> list[str | ToolCall | tuple[str, str]]:
        """Reasoning pieces (("reasoning", text)) first, then the content's text and tool calls."""
        parts = [("content", text)] if self.thoughts is None else self.thoughts.flush() if end else self.thoughts.push(text)
        pieces: list = []
        for kind, part in parts:
            if kind == "reasoning":
                pieces.append((kind, part))
            elif self.calls is None:
                pieces.append(part)
            else:
                pieces += self.calls.push(part)
        if end and self.calls is not None:
            pieces += self.calls.flush()
        return pieces

    def _pieces(self, pieces: list, logprobs: dict | None) -> list[str]:
        chunks = []
        for piece in pieces:
            if isinstance(piece, tuple):
                chunks.append(self._chunk(None, logprobs=logprobs, reasoning=piece[1]))
            elif isinstance(piece, str):
                chunks.append(self._chunk(piece, logprobs=logprobs))
            else:
                chunks.append(self._chunk(None, logprobs=logprobs, tool_call=piece.as_openai(self.calls.calls.index(piece))))
            logprobs = None
        return chunks

    def close(self) -> list[str]:
        chunks = self._pieces(self._split("", end=True), None) if self.calls is not None or self.thoughts is not None else []
        finish = "tool_calls" if self.calls is not None and self.calls.calls else finish_reason(self.result)
        return chunks + [self._chunk(None, finish=finish)]


async def _pump(index: int, events: AsyncIterator[StreamEvent], inbox: asyncio.Queue) -> None:
    try:
        async for event in events:
            await inbox.put((index, event))
        await inbox.put((index, _ENDED))
    except Exception as exc:  # noqa: BLE001 - handed to the writer, which reports it in the stream
        await inbox.put((index, exc))


async def stream_chunks(header: tuple, streams: Sequence[AsyncIterator[StreamEvent]], include_usage: bool,
                        token_text: TokenText, tool_choice: ToolChoice,
                        reasoning: ReasoningSplit | None = None) -> AsyncIterator[str]:  # fmt: skip
    choices = [_Choice(header, index, token_text, tool_choice, reasoning) for index in range(len(streams))]
    inbox: asyncio.Queue = asyncio.Queue()
    pumps = [asyncio.ensure_future(_pump(index, events, inbox)) for index, events in enumerate(streams)]
    try:
        if header[0] == "chat":
            for choice in choices:
                yield choice.first()
        open_choices = len(streams)
        while open_choices:
            index, item = await inbox.get()
            choice = choices[index]
            if isinstance(item, Exception):  # headers are sent: the error goes into the stream
                yield sse(error_body(500, f"generation failed ({type(item).__name__}: {item})"))
                return
            if item is _ENDED:
                open_choices -= 1
                if choice.result is None:
                    yield sse(error_body(500, "generation ended without a result"))
                    return
                for chunk in choice.close():
                    yield chunk
            elif item.result is not None:
                choice.result = item.result
            elif item.text or item.token_id is not None:
                for chunk in choice.token(item):
                    yield chunk
        if include_usage:
            yield sse(usage_chunk(*header, [choice.result for choice in choices]))
        yield sse("[DONE]")
    finally:
        for pump in pumps:
            pump.cancel()
        for events in streams:
            with contextlib.suppress(Exception):
                await events.aclose()
