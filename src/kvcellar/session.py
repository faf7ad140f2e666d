"""A chat conversation for library callers, reusing the prefix cache turn after turn.

Operations: `ChatSession(engine, system=..., **sampling defaults)`, `.chat`, `.stream`,
`.regenerate`, `.edit`, `.stats`, `.clear`. The session sits above the engine
(any `ServingEngine`); the engine knows nothing of sessions.
"""

from __future__ import annotations

from collections.abc import Iterator

from kvcellar.engine.request import GenerationResult, StreamEvent
from kvcellar.engine.serving import ServingEngine


class ChatSession:
    """Keeps the message history; each turn's prompt shares the previous turns, so only new tokens are prefilled."""

    def __init__(self, engine: ServingEngine, system: str | None = None, **sampling_defaults: object) -> None:
        self.engine = engine
        self.system = system
        self.sampling_defaults = sampling_defaults
        self.messages: list[dict] = []
        self.results: list[GenerationResult] = []
        self.clear()

    def stream(self, user_text: str, **sampling: object) -> Iterator[StreamEvent]:
        """Add a user message and stream the answer; the answer joins the history when the stream ends."""
        self.messages.append({"role": "user", "content": user_text})
        return self._answer(**sampling)

    def chat(self, user_text: str, **sampling: object) -> GenerationResult:
        return _last_result(self.stream(user_text, **sampling))

    def regenerate(self, **sampling: object) -> GenerationResult:
        """Drop the last answer and answer the same question again (its prompt is fully cached)."""
        if not self.messages or self.messages[-1]["role"] != "assistant":
            raise ValueError("there is no answer to regenerate: call chat() first")
        self.messages.pop()
        self.results.pop()
        return _last_result(self._answer(**sampling))

    def edit(self, index: int, content: str, **sampling: object) -> GenerationResult:
        """Replace message `index` (a user message), forget what followed, and answer again (a branch)."""
        if not 0 <= index < len(self.messages) or self.messages[index]["role"] != "user":
            raise ValueError(f"message {index} is not a user message of this session")
        kept_answers = sum(1 for m in self.messages[:index] if m["role"] == "assistant")
        self.messages = self.messages[:index] + [{"role": "user", "content": content}]
        self.results = self.results[:kept_answers]
        return _last_result(self._answer(**sampling))

    def _answer(self, **sampling: object) -> Iterator[StreamEvent]:
        options = {**self.sampling_defaults, **sampling}
        for event in self.engine.stream(messages=list(self.messages), **options):
            if event.result is not None:
                self.messages.append({"role": "assistant", "content": event.result.text})
                self.results.append(event.result)
            yield event

    def stats(self) -> dict:
        """The engine's cache counters and occupancy, as JSON (`Engine.cache_stats`)."""
        return self.engine.cache_stats()

    def clear(self) -> None:
        """Start a new conversation (the cache keeps what it learned)."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.results = []


def _last_result(events: Iterator[StreamEvent]) -> GenerationResult:
    result = None
    for event in events:
        result = event.result or result
    if result is None:
        raise RuntimeError("generation ended without a result")
    return result
