"""Reasoning in an answer: the `<think>…</think>` part that Qwen3-style templates mark, split from the reply.

Operations: `ReasoningSplit(open_at_start)` (`.split`, `.stream`), `marks_reasoning(template) -> bool`, `opens_in_reasoning(prompt_text) -> bool`,
`split_reasoning(text, open_at_start) -> (reasoning or None, content)`; `ReasoningStream(open_at_start)`,
`.push(text) -> pieces`, `.flush() -> pieces` (a piece is ("reasoning" | "content", text)).

Only for templates that mark reasoning (their source has `</think>`). The answer's reasoning is the
text inside a leading `<think>…</think>`, or, where the template's generation prompt already opened
the block (the prompt ends with `<think>`), the text up to the first `</think>`; the content is the
rest, with the blank lines after the block dropped. An answer that never closes its block is all
reasoning (cut by max_tokens while thinking). Text that may be the start of a tag is held back while
streaming.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvcellar.chat.partial import partial_marker_length

OPEN, CLOSE = "<think>", "</think>"


@dataclass(frozen=True)
class ReasoningSplit:
    """How to read a request's answer: its template marks reasoning; `open_at_start`: the prompt opened it."""

    open_at_start: bool = False

    def stream(self) -> ReasoningStream:
        return ReasoningStream(self.open_at_start)

    def split(self, text: str) -> tuple[str | None, str]:
        return split_reasoning(text, self.open_at_start)


def marks_reasoning(template: str | None) -> bool:
    return bool(template) and CLOSE in template


def opens_in_reasoning(prompt_text: str) -> bool:
    """Whether the generation prompt ends inside an opened reasoning block."""
    return prompt_text.rstrip().endswith(OPEN)


class ReasoningStream:
    """Streamed answer text as reasoning and content pieces."""

    def __init__(self, open_at_start: bool = False) -> None:
        self._state = "reasoning" if open_at_start else "start"  # start -> reasoning -> after -> content
        self._held = ""
        self.has_reasoning = open_at_start  # whether the answer has a reasoning block


    def push(self, text: str) -> list[tuple[str, str]]:
        self._held += text
        pieces: list[tuple[str, str]] = []
        while True:
            if self._state == "start":
                stripped = self._held.lstrip()
                if stripped.startswith(OPEN):
                    self._held, self._state, self.has_reasoning = stripped[len(OPEN) :], "reasoning", True
                    continue
                if OPEN.startswith(stripped):  # may still become the opening tag
                    return pieces
                self._state = "content"
                continue
            if self._state == "reasoning":
                end = self._held.find(CLOSE)
                if end >= 0:
                    if end:
                        pieces.append(("reasoning", self._held[:end]))
                    self._held, self._state = self._held[end + len(CLOSE) :], "after"
                    continue
                keep = partial_marker_length(self._held, (CLOSE,))
                if len(self._held) > keep:
                    pieces.append(("reasoning", self._held[: len(self._held) - keep]))
                    self._held = self._held[len(self._held) - keep :]
                return pieces
            if self._state == "after":  # the blank lines between the block and the reply are neither
                self._held = self._held.lstrip("\n")
                if not self._held:
                    return pieces
                self._state = "content"
                continue
            if self._held:
                pieces.append(("content", self._held))
                self._held = ""
            return pieces

    def flush(self) -> list[tuple[str, str]]:
        held, self._held = self._held, ""
        if not held:
            return []
        return [("reasoning" if self._state == "reasoning" else "content", held)]


def split_reasoning(text: str, open_at_start: bool = False) -> tuple[str | None, str]:
    """A whole answer's reasoning (None where it has none) and content."""
    stream = ReasoningStream(open_at_start)
    pieces = stream.push(text) + stream.flush()
    reasoning = "".join(piece for kind, piece in pieces if kind == "reasoning")
    return (reasoning if stream.has_reasoning else None), "".join(piece for kind, piece in pieces if kind == "content")
