"""Text streaming: turn generated token ids into text that is safe to send.

Operations:
- `IncrementalDetokenizer(tokenizer).push(token_id) -> str`: the text that
  token finalizes; `flush() -> str` at the end of generation.
- `StopStringMatcher(stop).push(text) -> StopMatch`: the part of the text
  that cannot belong to a stop string; `flush() -> str` at the end.

A request streams ids -> detokenizer -> stop matcher -> client. Both stages
hold text back instead of ever taking text back: once emitted, text is final.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvcellar.chat.partial import partial_marker_length

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# The replacement character a byte-level decode yields for an incomplete
# UTF-8 sequence; the next token may complete it.
_REPLACEMENT_CHAR = "\ufffd"
# Tokens of prompt context decoded before the first generated token, so that
# tokenizers which strip or add a leading space at the start of a decode
# (SentencePiece "▁") render the first generated token as in the full text.
_PROMPT_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Decodes one request's generated ids token by token.

    Uses the prefix/read offset technique (as in HF TGI): decode a short window
    ids[prefix_offset:] and emit what it adds to ids[prefix_offset:read_offset].
    Text ending in U+FFFD is held back until a later token completes the
    character, so a multi-byte character split over tokens is emitted whole.
    Special tokens are skipped. Invariant: the concatenation of everything
    `push` and `flush` return equals the full decode of the generated ids
    (for tokenizers whose decode is a concatenation of token texts, as
    byte-level BPE and SentencePiece are).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_ids: Iterable[int] = ()) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = list(prompt_ids)
        # ids[prefix_offset:read_offset] is context that is already emitted (or
        # belongs to the prompt); ids[read_offset:] is not emitted yet.
        self._read_offset = len(self._ids)
        self._prefix_offset = max(self._read_offset - _PROMPT_CONTEXT_TOKENS, 0)

    def _decode(self, ids: list[int]) -> str:
        # Cleanup of tokenization spaces rewrites the whole string (" ." -> ".")
        # and cannot be applied to a stream without taking text back.
        return self._tokenizer.decode(
            ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )

    def _pending_text(self) -> tuple[str, str]:
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        window_text = self._decode(self._ids[self._prefix_offset :])
        return prefix_text, window_text

    def push(self, token_id: int) -> str:
        """Add one generated id; return the text that is final now (may be "")."""
        self._ids.append(token_id)
        prefix_text, window_text = self._pending_text()
        if len(window_text) <= len(prefix_text) or window_text.endswith(_REPLACEMENT_CHAR):
            # Nothing new (e.g. a skipped special token) or a character still
            # incomplete: keep the window open and wait for more ids.
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return window_text[len(prefix_text) :]

    def flush(self) -> str:
        """Return all text not emitted yet, even an incomplete character (as U+FFFD)."""
        prefix_text, window_text = self._pending_text()
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return window_text[len(prefix_text) :]


@dataclass(frozen=True)
class StopMatch:
    """Result of `StopStringMatcher.push`.

    text: what may be sent now. stop: the stop string that ended generation,
    or None while generation goes on.
    """

    text: str
    stop: str | None = None

    @property
    def stopped(self) -> bool:
        return self.stop is not None


class StopStringMatcher:
    """Finds stop strings in streamed text, across any split of the text.

    Generation stops at the earliest point where the text so far ends with a
    stop string; the output is cut right before that stop string (the longest
    one, if several end there) and the stop string is not emitted. Until then,
    a suffix that could start a stop string is held back, and released as
    soon as the following text shows it is not one.
    """

    def __init__(self, stop: Iterable[str]) -> None:
        self._stops = tuple(stop)
        if any(not s for s in self._stops):
            raise ValueError(
                f"stop strings must be non-empty (got {self._stops!r}); remove empty entries"
            )
        # Invariant: _held is shorter than the longest stop string and
        # contains no complete stop string.
        self._held = ""
        self._stop: str | None = None

    @property
    def stop(self) -> str | None:
        """The stop string that matched, or None."""
        return self._stop

    @property
    def stopped(self) -> bool:
        return self._stop is not None

    def push(self, text: str) -> StopMatch:
        """Add decoded text; return what is safe to emit. After a stop, returns ""."""
        if self._stop is not None:
            return StopMatch("", self._stop)
        if not self._stops:
            return StopMatch(text)
        buffer = self._held + text
        found = self._first_stop(buffer)
        if found is not None:
            start, stop = found
            self._held = ""
            self._stop = stop
            return StopMatch(buffer[:start], stop)
        hold = partial_marker_length(buffer, self._stops)
        self._held = buffer[len(buffer) - hold :]
        return StopMatch(buffer[: len(buffer) - hold])

    def flush(self) -> str:
        """End of generation without a stop: release the held-back text."""
        held, self._held = self._held, ""
        return held

    def _first_stop(self, buffer: str) -> tuple[int, str] | None:
        # Occurrences of one stop string all have its length, so its earliest
        # start is also its earliest end. Sort key: earliest end, then the
        # earliest start (the longest stop string ending there).
        best: tuple[int, int, str] | None = None
        for stop in self._stops:
            start = buffer.find(stop)
            if start < 0:
                continue
            candidate = (start + len(stop), start, stop)
            if best is None or candidate[:2] < best[:2]:
                best = candidate
        return None if best is None else (best[1], best[2])

