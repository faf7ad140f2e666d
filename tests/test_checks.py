"""kvcellar.checks: the one int-not-bool rule every layer uses."""

from kvcellar.checks import is_int, is_number


def test_is_int_takes_ints_only() -> None:
    assert [is_int(v) for v in (0, 7, -3, 2**70)] == [True] * 4
    assert [is_int(v) for v in (True, False, 2.0, "2", None)] == [False] * 5


def test_is_number_takes_ints_and_floats_but_not_bools() -> None:
    assert [is_number(v) for v in (0, 1.5, float("inf"), -2)] == [True] * 4
    assert [is_number(v) for v in (True, False, "1", None)] == [False] * 4
