"""Why a chat turn reused less than its conversation offered: where the token streams parted.

Operations: `ReuseBreak` (position, tokens the previous turn offered, a decoded excerpt of each side),
`TurnTracker(num_conversations)`, `.observe(salt, prompt_ids, generated_ids, system_end, decode) ->
ReuseBreak | None`.

A conversation's next turn re-sends the previous prompt and answer and adds to them; the cache can
then reuse all of it. Chat templates that rewrite history (dropping earlier reasoning, injecting
reminders, reordering tool results) make the new prompt part from the old stream early, and every
token after that point is computed again, in every server. The tracker keeps the token streams (prompt
+ answer) of the latest chat requests per cache salt; a new chat prompt is matched with the one it
shares the longest prefix with, and if they share more than the system prompt (the same conversation)
but the new prompt leaves that stream before its end, the request records where: the position and a
short decoded excerpt of what the previous turn had there and what this one has. docs/agents.md says
how to keep reuse with the supported templates.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

EXCERPT_TOKENS = 12  # tokens of context shown on each side of the break


@dataclass(frozen=True)
class ReuseBreak:
    position: int  # the first token where the new prompt differs from the previous turn's stream
    offered_tokens: int  # the previous turn's prompt + answer: what this turn could have reused
    previous: str  # decoded tokens of the previous stream from the break on
    now: str  # decoded tokens of this prompt from the break on

    def as_json(self) -> dict:
        return {"position": self.position, "offered_tokens": self.offered_tokens, "previous": self.previous,
                "now": self.now}  # fmt: skip


def _common_prefix(first: np.ndarray, second: np.ndarray) -> int:
    size = min(len(first), len(second))
    differs = np.flatnonzero(first[:size] != second[:size])
    return int(differs[0]) if differs.size else size


class TurnTracker:
    """The token streams of the latest `num_conversations` chat requests (thread-safe)."""

    def __init__(self, num_conversations: int = 64) -> None:
        self._streams: OrderedDict[int, tuple[str, np.ndarray]] = OrderedDict()  # int32 token ids
        self._capacity = num_conversations
        self._next = 0
        self._lock = threading.Lock()

    def observe(self, salt: str, prompt_ids: Sequence[int], generated_ids: Sequence[int], system_end: int | None,
                decode: Callable[[list[int]], str]) -> ReuseBreak | None:  # fmt: skip
        """Compare a finished chat request with the streams kept, then keep its own; the break, if it made one."""
        prompt = np.asarray(prompt_ids, dtype=np.int32)
        with self._lock:
            candidates = [(key, stream) for key, (owner, stream) in self._streams.items() if owner == salt]
        best_key, best, shared = None, None, 0
        for key, stream in candidates:
            length = _common_prefix(stream, prompt)
            if length > shared:
                best_key, best, shared = key, stream, length
        found = None
        if best is not None and shared > (system_end or 0) and shared < min(len(best), len(prompt)):
            previous = best[shared : shared + EXCERPT_TOKENS].tolist()
            found = ReuseBreak(shared, len(best), decode(previous), decode(list(prompt_ids[shared : shared + EXCERPT_TOKENS])))
        with self._lock:
            if best_key is not None and found is None:
                self._streams.pop(best_key, None)  # the conversation moved on: this turn's stream replaces it
            self._streams[self._next] = (salt, np.concatenate([prompt, np.asarray(generated_ids, dtype=np.int32)]))
            self._next += 1
            while len(self._streams) > self._capacity:
                self._streams.popitem(last=False)
        return found
