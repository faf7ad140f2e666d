import pytest

from kvcellar.cache import LayoutCapabilities


@pytest.mark.parametrize(
    ("block_size", "has_recurrent", "window", "can_trim"),
    [
        (4, False, None, True),  # full attention only
        (4, True, None, False),  # recurrent state exists only at entry ends
        (4, False, 5, True),  # window - 1 == block_size: every token of a block is kept
        (4, False, 4, False),  # window - 1 < block_size: a block keeps only its last 3 tokens
        (4, True, 100, False),
        (1, False, 2, True),
    ],
)
def test_can_trim(block_size: int, has_recurrent: bool, window: int | None, can_trim: bool) -> None:
    assert LayoutCapabilities(block_size, has_recurrent, window).can_trim is can_trim


@pytest.mark.parametrize(("block_size", "window"), [(0, None), (4, 1), (4, 0), (True, None)])
def test_invalid_capabilities_raise(block_size: int, window: int | None) -> None:
    with pytest.raises(ValueError):
        LayoutCapabilities(block_size, False, window)
