import pytest

from kvcellar.cache import CacheEntry, Priority

from .fakes import ROOT


def test_priority_order() -> None:
    assert Priority.ASSISTANT < Priority.USER < Priority.SYSTEM
    assert [p.value for p in Priority] == [0, 1, 2]


def test_entry_normalizes_tokens_and_priority() -> None:
    entry = CacheEntry(ROOT, ROOT, [1, 2], 5, 2, "p", is_tail=True)  # type: ignore[arg-type]
    assert entry.token_ids == (1, 2)
    assert entry.priority is Priority.SYSTEM
    assert entry.num_tokens == 2 and entry.num_pins == 0 and entry.last_used == 0
    assert entry != CacheEntry(ROOT, ROOT, (1, 2), 5, Priority.SYSTEM, "p", is_tail=True)  # identity equality


def test_zero_token_entry_needs_logits() -> None:
    CacheEntry(ROOT, ROOT, (), 1, Priority.USER, "logits", is_tail=True, has_logits=True)
    with pytest.raises(ValueError, match="0 tokens"):
        CacheEntry(ROOT, ROOT, (), 1, Priority.USER, "x", is_tail=True)
    with pytest.raises(ValueError, match="0 tokens"):
        CacheEntry(ROOT, ROOT, (), 1, Priority.USER, "x", is_tail=False, has_logits=True)


def test_invalid_entry_fields_raise() -> None:
    with pytest.raises(ValueError, match="num_bytes"):
        CacheEntry(ROOT, ROOT, (1,), -1, Priority.USER, "x", is_tail=True)
    with pytest.raises(ValueError, match="key"):
        CacheEntry(b"x", ROOT, (1,), 1, Priority.USER, "x", is_tail=True)  # type: ignore[arg-type]
