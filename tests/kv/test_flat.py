"""Packed payloads: one allocation, aligned views, equal values, one copy to move."""

from __future__ import annotations

import torch

from kvcellar.kv import flat
from kvcellar.kv.state import StatePayload


def _tensors() -> dict[str, torch.Tensor]:
    keys = torch.arange(2 * 3 * 5 * 4, dtype=torch.bfloat16).reshape(2, 3, 5, 4)
    return {
        "0.keys": keys[:, :, 1:4],  # a strided slice, as captured from a live cache
        "0.recurrent.0": torch.randn(1, 7, dtype=torch.float32),
        "empty": torch.empty(1, 0, 4, dtype=torch.bfloat16),
        "logits": torch.randn(11, dtype=torch.float32),
    }


def test_pack_copies_every_tensor_into_one_aligned_buffer() -> None:
    tensors = _tensors()
    views, buffer = flat.pack(tensors)
    offsets, size = flat.layout(tensors)
    assert buffer.dtype == torch.uint8 and buffer.numel() == size
    # 2*3*3*4 bf16 = 144 B -> 192; 7 fp32 = 28 B -> 64; 0 B; 11 fp32 = 44 B -> 64
    assert offsets == {"0.keys": 0, "0.recurrent.0": 192, "empty": 256, "logits": 256} and size == 320
    for name, tensor in tensors.items():
        assert torch.equal(views[name], tensor) and views[name].dtype == tensor.dtype
        assert views[name].untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
        assert flat.byte_offset(buffer, views[name]) % flat.ALIGN == 0
    tensors["0.keys"].add_(1)  # packing copied: the source can change under it
    assert not torch.equal(views["0.keys"], tensors["0.keys"])


def test_a_packed_payload_moves_its_buffer_and_counts_it() -> None:
    views, buffer = flat.pack(_tensors())
    payload = StatePayload(views, 3, buffer)
    assert payload.num_bytes == 320
    moved = payload.to(torch.device("cpu"))  # already there: the buffer itself, views rebuilt over it
    assert moved.flat is buffer
    for name, view in payload.tensors.items():
        assert torch.equal(moved.tensors[name], view)
        assert moved.tensors[name].untyped_storage().data_ptr() == moved.flat.untyped_storage().data_ptr()


def test_an_unpacked_payload_is_packed_when_moved() -> None:
    tensors = _tensors()
    payload = StatePayload(dict(tensors), 3)
    assert payload.num_bytes == 144 + 28 + 0 + 44
    moved = payload.to(torch.device("cpu"))
    assert moved.num_bytes == 320 and all(torch.equal(moved.tensors[n], t) for n, t in tensors.items())


def test_a_payload_still_being_filled_is_waited_for_once_before_it_is_read() -> None:
    class Event:  # stands for the CUDA event of an asynchronous demotion copy
        waits = 0

        def synchronize(self) -> None:
            Event.waits += 1

    tensors, buffer = flat.pack({"0.keys": torch.ones(1, 2, 3, 4)})
    payload = StatePayload(tensors, 3, buffer, ready=Event())
    moved = payload.to(torch.device("cpu"))
    assert Event.waits == 1 and payload.ready is None and moved.ready is None
    payload.wait_ready()  # already waited: nothing more
    assert Event.waits == 1
    assert torch.equal(moved.tensors["0.keys"], torch.ones(1, 2, 3, 4))
