"""Where reuse is likely inside a prompt, and the eviction priority that follows from it.

Operations: `PromptSegments` (end of the system prompt, end of the last user
message; None for plain completions), `segment_priority(start, end, segments)`.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvcellar.cache.entry import Priority


@dataclass(frozen=True)
class PromptSegments:
    """Token positions inside a chat prompt (None for plain completions)."""

    system_end: int | None = None
    last_user_end: int | None = None


def segment_priority(start: int, end: int, segments: PromptSegments) -> Priority:
    """Priority of tokens [start, end): the highest segment they touch (system > user > assistant)."""
    if segments.system_end is not None and start < segments.system_end:
        return Priority.SYSTEM
    if segments.last_user_end is not None and start < segments.last_user_end:
        return Priority.USER
    if segments.system_end is None and segments.last_user_end is None:
        return Priority.USER  # a plain completion prompt: everything is "what the user sent"
    return Priority.ASSISTANT
