"""What the model's cache layers allow a restore to do, in torch-free terms.

Operations: `LayoutCapabilities` (validated description) and its `can_trim`
rule, which the lookup uses to decide whether a prefix may end inside a stored
entry or only exactly at an entry's end. What a namespace may reuse beyond
that (exact or near, the prefill schedule) is its reuse rule (reuse.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from kvcellar.checks import is_int


@dataclass(frozen=True)
class LayoutCapabilities:
    block_size: int  # tokens per block
    has_recurrent: bool  # any layer keeps a fixed-size state (SSM, linear attention, conv)
    sliding_window: int | None  # smallest window among sliding layers; None when there are none

    def __post_init__(self) -> None:
        if not is_int(self.block_size) or self.block_size < 1:
            raise ValueError(f"block_size must be an integer >= 1, got {self.block_size!r}")
        if not isinstance(self.has_recurrent, bool):
            raise ValueError(f"has_recurrent must be True or False, got {self.has_recurrent!r}")
        window = self.sliding_window
        if window is not None and (not is_int(window) or window < 2):
            raise ValueError(f"sliding_window must be None or an integer >= 2, got {window!r}")

    @property
    def can_trim(self) -> bool:
        """Whether state can be restored at any token position inside a stored entry.

        A recurrent state exists only at the exact end of an entry. A sliding
        layer keeps only the last window - 1 tokens of each entry, so an entry
        can be cut short only if it holds all of its tokens (block_size <= window - 1).
        """
        if self.has_recurrent:
            return False
        return self.sliding_window is None or self.block_size <= self.sliding_window - 1
