"""Reuse rules: which cached state a namespace may restore, chosen once where its core is built.

Operations: `ReuseRule` (the protocol a `PrefixCache` and the engine adapter
consult), `NearReuse`, `ExactReuse`, `ChunkedExactReuse`, `RowInvariantExactReuse`,
`reuse_rule(exact, capabilities, chunk_size, min_rows)` (the one place that picks a rule), and
`full_chunks_end`, the prefill schedule's one rule.

- `NearReuse` (CacheConfig.exact False): any state whose tokens match is good
  enough (equal within rounding). A restore may end inside a diverging entry
  (where the layout can trim), at a tail entry (tails, message-boundary
  checkpoints, generated tokens), or anywhere below the prompt's end.
- `ExactReuse`: only state the prompt's own prefill would have computed bit
  for bit: block boundaries below the prompt's end, or the whole prompt
  through a tail that carries its logits. Nothing is trimmed; the chunk
  schedule gets no extra cuts; generated tokens are not stored.
- `ChunkedExactReuse`: exact reuse when the prefill runs chunks longer than a
  block. Only this rule knows the schedule (below) and "stepped" keys.
- `RowInvariantExactReuse`: exact reuse over a row-invariant prefill, where a
  token's K/V do not depend on the pass that computed them as long as every
  pass has at least `min_rows` tokens (engine/prefill.py states when that
  holds and how the engine checks it). Any block boundary is a restore point
  that leaves `min_rows` or more tokens to compute; blocks have plain keys.

The prefill schedule of an n-token prompt (engine/prefill.py runs it): chunks
of `chunk_size` tokens aligned to absolute position 0 up to full_chunks_end(n)
= n // chunk_size * chunk_size, then one block at a time ("stepped" blocks)
up to n. A block's K/V are bit-identical between two prompts only when both
computed it in the same kind of chunk, so with chunks longer than a block the
stepped blocks get keys of their own (hashing.py), and a restore may end only
where the schedule passes (`ChunkedExactReuse.resumes_at`). With chunks of one
block every block boundary is on the schedule and no block is stepped, so
`ExactReuse` needs neither.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol

from kvcellar.cache import hashing
from kvcellar.cache.hashing import BlockHash
from kvcellar.cache.layout import LayoutCapabilities


def full_chunks_end(num_tokens: int, chunk_size: int) -> int:
    """Where an n-token prompt's whole prefill chunks end; blocks after it are prefilled one at a time."""
    return num_tokens // chunk_size * chunk_size


class ReuseRule(Protocol):
    """What one namespace may restore and store; a `PrefixCache` holds one for its whole life."""

    trims_entries: bool  # a restore may end inside an entry that diverges (if the layout can trim too)
    restores_tails: bool  # a restore may end at a tail entry without logits
    stores_generated: bool  # generated tokens' K/V are stored (decode blocks, the finished tail)

    def resumes_at(self, position: int, num_tokens: int) -> bool:
        """Whether an n-token prompt's prefill may start at block boundary `position` (< n)."""
        ...

    def last_boundary(self, num_blocks: int, num_tokens: int, block_size: int) -> int:
        """The most leading blocks, at most `num_blocks`, a restore of an n-token prompt may end after."""
        ...

    def block_keys(self, root: BlockHash, token_ids: Sequence[int], block_size: int) -> list[BlockHash]:
        """The chained keys of the prompt's full blocks, as this rule's prefill computes them."""
        ...

    def message_cuts(self, num_tokens: int, boundaries: Sequence[int | None]) -> list[int]:
        """Extra chunk ends at message boundaries (checkpoints a later prompt may restore)."""
        ...


@dataclass(frozen=True)
class _BlockBoundaries:
    """Every block boundary below the prompt's end is on the schedule; blocks have plain keys."""

    def resumes_at(self, position: int, num_tokens: int) -> bool:
        return position < num_tokens

    def last_boundary(self, num_blocks: int, num_tokens: int, block_size: int) -> int:
        return num_blocks if num_blocks * block_size < num_tokens else max(num_blocks - 1, 0)

    def block_keys(self, root: BlockHash, token_ids: Sequence[int], block_size: int) -> list[BlockHash]:
        return hashing.hash_blocks(root, token_ids, block_size)


@dataclass(frozen=True)
class NearReuse(_BlockBoundaries):
    trims_entries: ClassVar[bool] = True
    restores_tails: ClassVar[bool] = True
    stores_generated: ClassVar[bool] = True

    def message_cuts(self, num_tokens: int, boundaries: Sequence[int | None]) -> list[int]:
        return [p for p in boundaries if p is not None and 0 < p < num_tokens]


@dataclass(frozen=True)
class ExactReuse(_BlockBoundaries):
    trims_entries: ClassVar[bool] = False
    restores_tails: ClassVar[bool] = False
    stores_generated: ClassVar[bool] = False

    def message_cuts(self, num_tokens: int, boundaries: Sequence[int | None]) -> list[int]:
        return []  # an extra cut would change the schedule, and with it the K/V's rounding


@dataclass(frozen=True)
class ChunkedExactReuse(ExactReuse):
    """Exact reuse over a prefill of `chunk_size`-token chunks (a multiple of block_size, larger than it)."""

    block_size: int
    chunk_size: int

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.chunk_size <= self.block_size or self.chunk_size % self.block_size:
            raise ValueError(f"chunk_size must be a multiple of block_size ({self.block_size}) larger than it, "
                             f"got {self.chunk_size}; with chunks of one block use ExactReuse")  # fmt: skip

    def stepped_from(self, num_tokens: int) -> int:
        """The token position where an n-token prompt's stepped blocks start."""
        return full_chunks_end(num_tokens, self.chunk_size)

    def resumes_at(self, position: int, num_tokens: int) -> bool:
        return position < num_tokens and (position % self.chunk_size == 0 or position > self.stepped_from(num_tokens))

    def last_boundary(self, num_blocks: int, num_tokens: int, block_size: int) -> int:
        for count in range(num_blocks, 0, -1):
            if self.resumes_at(count * block_size, num_tokens):
                return count
        return 0

    def block_keys(self, root: BlockHash, token_ids: Sequence[int], block_size: int) -> list[BlockHash]:
        return hashing.hash_blocks(root, token_ids, block_size, self.stepped_from(len(token_ids)))


@dataclass(frozen=True)
class RowInvariantExactReuse(ExactReuse):
    """Exact reuse over a prefill whose passes all have at least `min_rows` tokens (a short prompt: one pass)."""

    min_rows: int

    def __post_init__(self) -> None:
        if self.min_rows < 1:
            raise ValueError(f"min_rows must be >= 1, got {self.min_rows}")

    def resumes_at(self, position: int, num_tokens: int) -> bool:
        return num_tokens - position >= self.min_rows

    def last_boundary(self, num_blocks: int, num_tokens: int, block_size: int) -> int:
        return max(min(num_blocks, (num_tokens - self.min_rows) // block_size), 0)


NEAR = NearReuse()
EXACT = ExactReuse()


def reuse_rule(
    exact: bool, capabilities: LayoutCapabilities, chunk_size: int | None = None, min_rows: int | None = None
) -> ReuseRule:
    """The rule of a namespace: exact or near, over a prefill of `chunk_size`-token chunks (None: one block),
    or, with `min_rows`, over the row-invariant prefill (exact mode only; then chunks are the engine's concern)."""
    block_size = capabilities.block_size
    if min_rows is not None:
        if not exact or capabilities.has_recurrent or capabilities.sliding_window is not None:
            raise ValueError("the row-invariant prefill is an exact-mode schedule for models with only full attention")
        return RowInvariantExactReuse(min_rows=min_rows)
    chunk = chunk_size or block_size
    if chunk % block_size:
        raise ValueError(f"the prefill chunk must be a multiple of block_size ({block_size}), got {chunk}")
    if chunk > block_size and (capabilities.has_recurrent or capabilities.sliding_window is not None):
        # A recurrent state exists only where a forward pass ends, and a sliding layer keeps only its
        # last window: neither can hand over the state of a block that ended inside a chunk.
        raise ValueError("a prefill chunk longer than a block needs every layer to be full attention "
                         "(no recurrent or sliding layers)")  # fmt: skip
    if not exact:
        return NEAR
    return ChunkedExactReuse(block_size=block_size, chunk_size=chunk) if chunk > block_size else EXACT
