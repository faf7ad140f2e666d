"""PinnedReserve: buffers allocated ahead up to the budget, taken by demotions; flat.move into a given buffer."""

from __future__ import annotations

import threading

import pytest
import torch

from kvcellar.kv import flat as flat_buffers
from kvcellar.kv.pinned import SMALL_BYTES, PinnedReserve


class CountingAllocator:
    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.lock = threading.Lock()

    def __call__(self, num_bytes: int) -> torch.Tensor:
        with self.lock:
            self.sizes.append(num_bytes)
        return torch.empty(num_bytes, dtype=torch.uint8)


def wait_for_spares(reserve: PinnedReserve, num_bytes: int) -> None:
    for _ in range(1000):
        if reserve.stats()["allocated_ahead_bytes"] >= num_bytes:
            break
        threading.Event().wait(0.005)
    reserve.close()  # joins the thread: its allocations are all counted now


def test_first_block_starts_allocating_ahead_up_to_the_budget():
    allocator = CountingAllocator()
    reserve = PinnedReserve(1000, allocate=allocator)
    first = reserve.take(300)  # nothing spare yet: allocated on the request
    assert first.numel() == 300
    wait_for_spares(reserve, 900)
    stats = reserve.stats()
    assert stats["allocated_on_request"] == 1
    assert stats["allocated_ahead_bytes"] == 900  # three more of 300 fit in 1000; a fourth would not
    assert allocator.sizes == [300, 300, 300, 300]


def test_demotions_take_spares_and_other_sizes_allocate_directly():
    allocator = CountingAllocator()
    reserve = PinnedReserve(1200, allocate=allocator)
    reserve.take(400)
    for _ in range(1000):
        if reserve.stats()["spare_bytes"] == 1200:
            break
        threading.Event().wait(0.005)
    assert reserve.stats()["spare_bytes"] == 1200
    taken = reserve.take(400)
    assert taken.numel() == 400 and reserve.stats()["taken_spare"] == 1
    small = reserve.take(40, ahead=False)  # a partial entry: not the size allocated ahead
    assert small.numel() == 40 and reserve.stats()["allocated_on_request"] == 2
    reserve.close()
    assert reserve.stats()["spare_bytes"] == 0  # close drops the spares


def test_partial_first_does_not_fix_the_size_and_oversized_never_starts_the_thread():
    allocator = CountingAllocator()
    reserve = PinnedReserve(100, allocate=allocator)
    reserve.take(10, ahead=False)
    reserve.take(500)  # larger than the whole budget: allocated on the request, nothing ahead
    reserve.close()
    assert reserve.stats() == {"taken_spare": 0, "allocated_on_request": 2, "allocated_ahead_bytes": 0, "spare_bytes": 0}
    assert allocator.sizes == [10, 500]


def test_negative_budget_is_refused():
    with pytest.raises(ValueError, match="budget_bytes must be >= 0"):
        PinnedReserve(-1)


def test_move_into_a_given_buffer_keeps_every_view():
    tensors = {"0.keys": torch.arange(24, dtype=torch.bfloat16).view(1, 2, 3, 4), "logits": torch.rand(7)}
    views, flat = flat_buffers.pack(tensors)
    out = torch.full((flat.numel(),), 255, dtype=torch.uint8)
    moved, moved_flat = flat_buffers.move(views, flat, torch.device("cpu"), out=out)
    assert moved_flat.data_ptr() == out.data_ptr()
    for name, tensor in tensors.items():
        assert torch.equal(moved[name], tensor) and moved[name].shape == tensor.shape
    with pytest.raises(ValueError, match=f"uint8 buffer of {flat.numel()} bytes"):
        flat_buffers.move(views, flat, torch.device("cpu"), out=torch.empty(3, dtype=torch.uint8))


def test_nothing_is_allocated_ahead_while_paused():
    allocator = CountingAllocator()
    reserve = PinnedReserve(1000, allocate=allocator)
    reserve.pause(True)  # a request is running
    reserve.take(250)
    threading.Event().wait(0.05)
    assert reserve.stats()["allocated_ahead_bytes"] == 0 and allocator.sizes == [250]
    reserve.pause(False)  # idle: the thread catches up
    wait_for_spares(reserve, 1000)
    assert reserve.stats()["allocated_ahead_bytes"] == 1000


def test_serving_pauses_the_registry_helpers_for_the_whole_request():
    from kvcellar.cache.registry import CacheRegistry

    calls = []

    class Helper:
        def pause(self, active: bool) -> None:
            calls.append(active)

        def close(self) -> None:
            calls.append("closed")

    registry = CacheRegistry(None, None, helpers=[Helper()])
    with registry.serving():
        assert calls == [True]
    assert calls == [True, False]
    registry.close()
    assert calls[-1] == "closed"


def test_refusal_only_while_a_request_runs_and_no_buffer_is_ready():
    allocator = CountingAllocator()
    reserve = PinnedReserve(600, allocate=allocator, small_bytes=0)
    reserve.pause(True)  # a request runs
    assert reserve.refusal(200) is not None  # nothing ready: refused (and the thread starts, paused)
    assert allocator.sizes == []
    reserve.pause(False)
    assert reserve.refusal(200) is None  # no request runs: allocating now stalls nobody
    for _ in range(1000):
        if reserve.stats()["spare_bytes"] == 600:
            break
        threading.Event().wait(0.005)
    reserve.pause(True)
    assert reserve.refusal(200) is None  # a spare is ready
    assert reserve.refusal(50, ahead=False) is None  # the budget is all allocated: freed buffers get reused
    reserve.close()


def test_a_large_partial_during_a_request_is_refused_a_small_one_admitted():
    mib = 1024**2
    reserve = PinnedReserve(1000 * mib, allocate=CountingAllocator())
    reserve.pause(True)
    assert reserve.refusal(SMALL_BYTES + 1, ahead=False) is not None  # a long tail: refused
    assert reserve.refusal(600_000, ahead=False) is None  # a prompt's logits: pinned at once
    assert reserve.stats()["allocated_ahead_bytes"] == 0  # a partial never fixes the size
    reserve.close()
