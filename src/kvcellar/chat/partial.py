"""Text held back while an answer streams: the end of the text so far that may still grow into a marker.

Operations: `partial_marker_length(text, markers) -> int`. Stop strings (engine/text_stream.py), tool-call
tags (tool_calls.py) and reasoning tags (reasoning.py) all hold that much back until the next text shows
whether a marker comes.
"""

from __future__ import annotations

from collections.abc import Iterable


def partial_marker_length(text: str, markers: Iterable[str]) -> int:
    """The length of the longest end of `text` that is a proper prefix of one of `markers` (0: none)."""
    markers = tuple(markers)
    longest = max((len(marker) for marker in markers), default=1) - 1
    for length in range(min(longest, len(text)), 0, -1):
        suffix = text[len(text) - length :]
        if any(marker.startswith(suffix) for marker in markers):
            return length
    return 0
