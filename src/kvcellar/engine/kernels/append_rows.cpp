// A batched decode step's new keys and values written into each row's own cache buffers (see __init__.py).
//
// append_rows(key_states, value_states, key_buffers, value_buffers, positions): key_states [B, H_kv, 1, D] (the
// step's keys, any strides but a contiguous last dim), key_buffers[b] [1, H_kv, capacity_b, D] (a growing
// layer's buffer, rows contiguous); row b's keys go to position positions[b] of buffer b, and the same for
// the values. One call per layer instead of two small strided copies per row: a copy, so the bytes written
// are exactly those of the per-row copies it replaces.

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstring>

namespace {

void check(const at::Tensor& states, at::TensorList buffers, at::IntArrayRef positions) {
  const int64_t batch = states.size(0);
  TORCH_CHECK(states.dim() == 4 && states.size(2) == 1 && states.stride(3) == 1,
              "append_rows: states [B, H_kv, 1, D] with a contiguous last dim");
  TORCH_CHECK(static_cast<int64_t>(buffers.size()) == batch && static_cast<int64_t>(positions.size()) == batch,
              "append_rows: one buffer and one position per row");
  for (int64_t b = 0; b < batch; ++b) {
    const at::Tensor& buffer = buffers[b];
    TORCH_CHECK(buffer.device().is_cpu() && states.device().is_cpu(), "append_rows: CPU tensors only");
    TORCH_CHECK(buffer.scalar_type() == states.scalar_type(), "append_rows: buffers of the states' dtype");
    TORCH_CHECK(buffer.dim() == 4 && buffer.size(0) == 1 && buffer.size(1) == states.size(1) &&
                    buffer.size(3) == states.size(3) && buffer.stride(3) == 1,
                "append_rows: each buffer [1, H_kv, capacity, D] with contiguous rows");
    TORCH_CHECK(positions[b] >= 0 && positions[b] < buffer.size(2), "append_rows: a position within its buffer");
  }
}

void write(const at::Tensor& states, at::TensorList buffers, at::IntArrayRef positions) {
  const int64_t batch = states.size(0), heads = states.size(1), bytes = states.size(3) * states.element_size();
  const auto* source = static_cast<const char*>(states.data_ptr());
  const int64_t size = states.element_size();
  for (int64_t b = 0; b < batch; ++b) {
    auto* target = static_cast<char*>(buffers[b].data_ptr());
    for (int64_t h = 0; h < heads; ++h)
      std::memcpy(target + (h * buffers[b].stride(1) + positions[b] * buffers[b].stride(2)) * size,
                  source + (b * states.stride(0) + h * states.stride(1)) * size, bytes);
  }
}

void append_rows(const at::Tensor& key_states, const at::Tensor& value_states, at::TensorList key_buffers,
                 at::TensorList value_buffers, at::IntArrayRef positions) {
  TORCH_CHECK(key_states.sizes() == value_states.sizes(), "append_rows: keys and values of one shape");
  check(key_states, key_buffers, positions);
  check(value_states, value_buffers, positions);
  write(key_states, key_buffers, positions);
  write(value_states, value_buffers, positions);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kvcellar_cpu, m) {
  m.def("append_rows(Tensor key_states, Tensor value_states, Tensor(a!)[] key_buffers, Tensor(b!)[] value_buffers, "
        "int[] positions) -> ()");
}

TORCH_LIBRARY_IMPL(kvcellar_cpu, CPU, m) { m.impl("append_rows", &append_rows); }
