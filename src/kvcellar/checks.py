"""Value checks every layer shares (no imports: the bottom of the house, beside config and errors).

Operations: `is_int(value)` (an int that is not a bool), `is_number(value)`
(an int or float that is not a bool).

Why: `bool` is a subclass of `int`, so `isinstance(True, int)` holds, yet
`max_tokens=True` or `block_size=False` is a caller's bug, never a count.
"""

from __future__ import annotations


def is_int(value: object) -> bool:
    """True for 0, 7, -3; False for True, False, 2.0, "2" and None."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """True for ints and floats (inf and nan included); False for bools, strings and None."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)
