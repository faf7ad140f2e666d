"""What the model's cache layers allow a restore to do, in torch-free terms.

Operations: `LayoutCapabilities` (validated description), its `can_trim`
rule, which the lookup uses to decide whether a prefix may end inside a stored
entry or only exactly at an entry's end, and `full_chunks_end`, the prefill
schedule's one rule.

The prefill schedule of an n-token prompt (engine/prefill.py runs it):
chunks of `chunk_size` tokens aligned to absolute position 0 up to
full_chunks_end(n) = n // chunk_size * chunk_size, then one block at a time
("stepped" blocks) up to n. Each chunk is one forward pass; long chunks keep
a CPU's matrix units busy, blocks keep reuse fine-grained near the prompt's
end, where the next chat turn diverges. Exact mode depends on it: a block's
K/V are bit-identical between two prompts only when both computed it in the
same kind of chunk, so stepped blocks get keys of their own (hashing.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from kvcellar.checks import is_int


def full_chunks_end(num_tokens: int, chunk_size: int) -> int:
    """Where an n-token prompt's whole prefill chunks end; blocks after it are prefilled (and keyed) stepped."""
    return num_tokens // chunk_size * chunk_size


@dataclass(frozen=True)
class LayoutCapabilities:
    block_size: int  # tokens per block
    has_recurrent: bool  # any layer keeps a fixed-size state (SSM, linear attention, conv)
    sliding_window: int | None  # smallest window among sliding layers; None when there are none
    chunk_size: int | None = None  # prefill chunk, a multiple of block_size; None: one block

    def __post_init__(self) -> None:
        if not is_int(self.block_size) or self.block_size < 1:
            raise ValueError(f"block_size must be an integer >= 1, got {self.block_size!r}")
        if not isinstance(self.has_recurrent, bool):
            raise ValueError(f"has_recurrent must be True or False, got {self.has_recurrent!r}")
        window = self.sliding_window
        if window is not None and (not is_int(window) or window < 2):
            raise ValueError(f"sliding_window must be None or an integer >= 2, got {window!r}")
        chunk = self.chunk_size
        if chunk is None:
            object.__setattr__(self, "chunk_size", self.block_size)
        elif not is_int(chunk) or chunk < 1 or chunk % self.block_size:
            raise ValueError(f"chunk_size must be a multiple of block_size ({self.block_size}), got {chunk!r}")
        elif chunk > self.block_size and (self.has_recurrent or window is not None):
            # A recurrent state exists only where a forward pass ends, and a sliding layer keeps only its
            # last window: neither can hand over the state of a block that ended inside a chunk.
            raise ValueError("chunk_size > block_size needs every layer to be full attention (no recurrent or sliding layers)")

    def full_chunks_end(self, num_tokens: int) -> int:
        return full_chunks_end(num_tokens, self.chunk_size)

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
