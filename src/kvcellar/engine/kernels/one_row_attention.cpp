// One query row per head against a K/V cache on a CPU: a decode step's attention (see __init__.py).
//
// query [B, H, D] fp32 or bf16, unscaled, and its scale; key/value [B, H_kv, >= num_keys, D] fp32 or bf16, the
// last dim contiguous (a growing cache's buffers, read up to num_keys); returns [B, H, D] fp32. bf16 K/V on a
// CPU with the bf16 dot product (AVX512-BF16): the scores are dot products of the bf16 query and keys, exact
// products summed in fp32, then scaled; else the query is scaled in fp32 and multiplied by the widened keys.
//
// Each task owns a chunk of KEYS_PER_TASK keys of one K/V head and all the query heads of its group: it
// reads each key and value row once (the group's heads reuse it from L1) and keeps a local softmax
// (max, sum, weighted values). The chunks are merged in a fixed order. Chunk bounds and merge order
// depend on num_keys alone, never on the thread count, so the result is the same at any number of
// threads (exact mode relies on that: engine/invariance.py).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "one_row_chunk.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

using namespace kvcellar::one_row;

// One row's keys and values: `num_keys` rows of each K/V head, `stride` apart, heads `head_stride` apart.
template <typename KV>
struct Source {
  const KV* keys;
  const KV* values;
  int64_t key_head_stride, key_stride, value_head_stride, value_stride, num_keys;
};

// A chunk of one row read from other memory that holds the same bytes as the row's own keys and values
// [chunk * KEYS_PER_TASK, ...): the cache block the row's prefix was restored from, which every row restored
// from it reads alike. `source` points at the chunk's first key.
template <typename KV>
struct SharedChunk {
  int64_t row, chunk;
  Source<KV> source;
};

// query [B, H, D] (row b attends to sources[b]) -> out. Tasks are (row, K/V head, chunk of KEYS_PER_TASK keys);
// each row's chunks are merged in order, so a row's result depends on its own query and keys alone. The tasks
// run in (head, chunk, row) order: rows that read one shared chunk read it one after another, so all but the
// first find it in the core's cache. Where a task's keys are read from does not change what it computes.
template <typename KV>
void run(const at::Tensor& query, double scale, const std::vector<Source<KV>>& sources, int64_t kv_heads,
         at::Tensor& out, const std::vector<SharedChunk<KV>>& shared = {}) {
  const int64_t batch = query.size(0), heads = query.size(1), dim = query.size(2);
  const int64_t groups = heads / kv_heads;
  // bf16 K/V take the bf16 dot product where the CPU has it, with the query rounded to bf16 (exact for a
  // bf16 model's query); every other case multiplies the fp32-scaled query by the widened keys.
  const bool dot = BF16_DOT && std::is_same_v<KV, c10::BFloat16> && (dim == 64 || dim == 128 || dim == 256);
  const at::Tensor scaled = query.to(at::kFloat).mul(static_cast<float>(scale)).contiguous();
  const at::Tensor rounded = dot ? query.to(at::kBFloat16).contiguous() : at::Tensor();
  const Queries all{scaled.data_ptr<float>(), dot ? rounded.data_ptr<c10::BFloat16>() : nullptr,
                    static_cast<float>(scale)};
  std::vector<int64_t> chunks(batch), first_task(batch + 1, 0), first_chunk(batch + 1, 0);
  int64_t most_chunks = 0;
  for (int64_t b = 0; b < batch; ++b) {
    chunks[b] = (sources[b].num_keys + KEYS_PER_TASK - 1) / KEYS_PER_TASK;
    first_task[b + 1] = first_task[b] + kv_heads * chunks[b];
    first_chunk[b + 1] = first_chunk[b] + chunks[b];
    most_chunks = std::max(most_chunks, chunks[b]);
  }
  std::vector<const Source<KV>*> chunk_source(first_chunk[batch], nullptr);  // per (row, chunk): shared, or none
  for (const SharedChunk<KV>& piece : shared) chunk_source[first_chunk[piece.row] + piece.chunk] = &piece.source;
  struct Task {
    int64_t row, head, chunk;
  };
  std::vector<Task> order;
  order.reserve(first_task[batch]);
  for (int64_t head = 0; head < kv_heads; ++head)
    for (int64_t chunk = 0; chunk < most_chunks; ++chunk)
      for (int64_t b = 0; b < batch; ++b)
        if (chunk < chunks[b]) order.push_back({b, head, chunk});
  const int64_t tasks = first_task[batch];
  std::vector<float> maxima(tasks * groups), sums(tasks * groups), partial(tasks * groups * dim);
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(groups * SCORE_ROW);
    for (int64_t index = begin; index < end; ++index) {
      const auto [b, head, chunk] = order[index];
      const int64_t task = first_task[b] + head * chunks[b] + chunk;
      const int64_t first = chunk * KEYS_PER_TASK, count = std::min(KEYS_PER_TASK, sources[b].num_keys - first);
      const Source<KV>* own = chunk_source[first_chunk[b] + chunk];
      const Source<KV>& source = own != nullptr ? *own : sources[b];
      const int64_t offset = own != nullptr ? 0 : first;
      const int64_t first_query = (b * heads + head * groups) * dim;
      const Queries queries{all.scaled + first_query, dot ? all.rounded + first_query : nullptr, all.scale};
      attend_chunk(queries, groups, dim,
                   source.keys + head * source.key_head_stride + offset * source.key_stride,
                   source.values + head * source.value_head_stride + offset * source.value_stride,
                   source.key_stride, source.value_stride, count, scores.data(), &partial[task * groups * dim]);
      for (int64_t g = 0; g < groups; ++g) {
        maxima[task * groups + g] = scores[g * SCORE_ROW + KEYS_PER_TASK];
        sums[task * groups + g] = scores[g * SCORE_ROW + KEYS_PER_TASK + 1];
      }
    }
  });
  float* o = out.data_ptr<float>();
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t head = 0; head < kv_heads; ++head) {
      const int64_t base = first_task[b] + head * chunks[b];
      for (int64_t g = 0; g < groups; ++g) {
        float top = -std::numeric_limits<float>::infinity();
        for (int64_t c = 0; c < chunks[b]; ++c) top = std::max(top, maxima[(base + c) * groups + g]);
        float total = 0.f;
        float* row = o + (b * heads + head * groups + g) * dim;
        std::fill(row, row + dim, 0.f);
        for (int64_t c = 0; c < chunks[b]; ++c) {
          const float scale = std::exp(maxima[(base + c) * groups + g] - top);
          total += scale * sums[(base + c) * groups + g];
          const float* part = &partial[((base + c) * groups + g) * dim];
          for (int64_t d = 0; d < dim; ++d) row[d] += scale * part[d];
        }
        for (int64_t d = 0; d < dim; ++d) row[d] /= total;
      }
    }
  }
}

template <typename KV>
Source<KV> source_of(const at::Tensor& key, const at::Tensor& value, int64_t b, int64_t num_keys) {
  return {key.data_ptr<KV>() + b * key.stride(0), value.data_ptr<KV>() + b * value.stride(0), key.stride(1),
          key.stride(2), value.stride(1), value.stride(2), num_keys};
}

void check_kv(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, int64_t num_keys) {
  TORCH_CHECK(key.device().is_cpu() && value.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(key.dim() == 4 && value.dim() == 4, "key/value [B, H_kv, N, D]");
  TORCH_CHECK(key.scalar_type() == value.scalar_type(), "key and value of one dtype");
  TORCH_CHECK(key.scalar_type() == at::kBFloat16 || key.scalar_type() == at::kFloat, "key/value: fp32 or bf16");
  TORCH_CHECK(key.sizes() == value.sizes(), "key and value of one shape");
  TORCH_CHECK(key.stride(3) == 1 && value.stride(3) == 1 && key.size(3) == query.size(2),
              "key/value rows contiguous, of the query's size");
  TORCH_CHECK(query.size(1) % key.size(1) == 0, "query heads in groups of the K/V heads");
  TORCH_CHECK(num_keys >= 1 && num_keys <= key.size(2), "num_keys within the buffers");
}

void check_query(const at::Tensor& query) {
  TORCH_CHECK(query.device().is_cpu() && query.dim() == 3, "query [B, H, D] on the CPU");
  TORCH_CHECK((query.scalar_type() == at::kFloat || query.scalar_type() == at::kBFloat16) && query.is_contiguous(),
              "query: contiguous fp32 or bf16");
}

at::Tensor one_row_attention(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, int64_t num_keys,
                             double scale) {
  check_query(query);
  check_kv(query, key, value, num_keys);
  TORCH_CHECK(key.size(0) == query.size(0), "one K/V batch row per query row");
  at::Tensor out = at::empty(query.sizes(), query.options().dtype(at::kFloat));
  if (key.scalar_type() == at::kBFloat16) {
    std::vector<Source<c10::BFloat16>> sources;
    for (int64_t b = 0; b < query.size(0); ++b) sources.push_back(source_of<c10::BFloat16>(key, value, b, num_keys));
    run(query, scale, sources, key.size(1), out);
  } else {
    std::vector<Source<float>> sources;
    for (int64_t b = 0; b < query.size(0); ++b) sources.push_back(source_of<float>(key, value, b, num_keys));
    run(query, scale, sources, key.size(1), out);
  }
  return out;
}

template <typename KV>
void run_ragged(const at::Tensor& query, double scale, at::TensorList keys, at::TensorList values,
                at::IntArrayRef num_keys, at::TensorList shared_keys, at::TensorList shared_values,
                at::IntArrayRef shared_at, at::Tensor& out) {
  std::vector<Source<KV>> sources;
  for (size_t b = 0; b < keys.size(); ++b) sources.push_back(source_of<KV>(keys[b], values[b], 0, num_keys[b]));
  std::vector<SharedChunk<KV>> shared;
  for (size_t i = 0; i < shared_keys.size(); ++i) {
    const int64_t row = shared_at[3 * i], chunk = shared_at[3 * i + 1], first = shared_at[3 * i + 2];
    Source<KV> source = source_of<KV>(shared_keys[i], shared_values[i], 0, KEYS_PER_TASK);
    source.keys += first * source.key_stride;
    source.values += first * source.value_stride;
    shared.push_back({row, chunk, source});
  }
  run(query, scale, sources, keys[0].size(1), out, shared);
}

// A batched decode step's rows, each against its own request's K/V (keys[b], values[b]: [1, H_kv, >= n_b, D]).
// Row b computes exactly what one_row_attention computes for it alone. Shared chunk i (row shared_at[3i],
// chunk shared_at[3i + 1]) is read from shared_keys[i], shared_values[i] ([1, H_kv, N, D]) from key
// shared_at[3i + 2] on instead: the caller's promise is that they hold the same bytes there as the row's own
// keys and values of that chunk.
at::Tensor ragged_one_row_attention(const at::Tensor& query, at::TensorList keys, at::TensorList values,
                                    at::IntArrayRef num_keys, at::TensorList shared_keys,
                                    at::TensorList shared_values, at::IntArrayRef shared_at, double scale) {
  check_query(query);
  const int64_t batch = query.size(0);
  TORCH_CHECK(batch >= 1, "at least one row");
  TORCH_CHECK(static_cast<int64_t>(keys.size()) == batch && static_cast<int64_t>(values.size()) == batch &&
                  static_cast<int64_t>(num_keys.size()) == batch, "one key, value and count per query row");
  for (int64_t b = 0; b < batch; ++b) {
    check_kv(query, keys[b], values[b], num_keys[b]);
    TORCH_CHECK(keys[b].size(0) == 1 && keys[b].size(1) == keys[0].size(1), "each row: [1, H_kv, N, D], one H_kv");
    TORCH_CHECK(keys[b].scalar_type() == keys[0].scalar_type(), "every row's K/V of one dtype");
  }
  TORCH_CHECK(shared_values.size() == shared_keys.size() && shared_at.size() == 3 * shared_keys.size(),
              "one value tensor and one (row, chunk, first key) per shared key tensor");
  std::vector<bool> seen(batch * ((*std::max_element(num_keys.begin(), num_keys.end()) + KEYS_PER_TASK - 1) /
                                  KEYS_PER_TASK), false);
  for (size_t i = 0; i < shared_keys.size(); ++i) {
    const int64_t row = shared_at[3 * i], chunk = shared_at[3 * i + 1], first = shared_at[3 * i + 2];
    TORCH_CHECK(row >= 0 && row < batch && chunk >= 0 && chunk * KEYS_PER_TASK < num_keys[row],
                "a shared chunk names a row and one of its chunks");
    const int64_t slot = row * (seen.size() / batch) + chunk;
    TORCH_CHECK(!seen[slot], "one shared source per chunk");
    seen[slot] = true;
    const int64_t count = std::min(KEYS_PER_TASK, num_keys[row] - chunk * KEYS_PER_TASK);
    TORCH_CHECK(first >= 0, "a shared chunk's first key within its tensor");
    check_kv(query, shared_keys[i], shared_values[i], first + count);
    TORCH_CHECK(shared_keys[i].size(0) == 1 && shared_keys[i].size(1) == keys[0].size(1) &&
                    shared_keys[i].scalar_type() == keys[0].scalar_type(),
                "a shared chunk: [1, H_kv, >= its keys, D] of the rows' dtype");
  }
  at::Tensor out = at::empty(query.sizes(), query.options().dtype(at::kFloat));
  if (keys[0].scalar_type() == at::kBFloat16) {
    run_ragged<c10::BFloat16>(query, scale, keys, values, num_keys, shared_keys, shared_values, shared_at, out);
  } else {
    run_ragged<float>(query, scale, keys, values, num_keys, shared_keys, shared_values, shared_at, out);
  }
  return out;
}

}  // namespace

bool vectorized() { return VECTORIZED; }

int64_t keys_per_chunk() { return KEYS_PER_TASK; }

TORCH_LIBRARY(kvcellar_cpu, m) {
  m.def("one_row_attention(Tensor query, Tensor key, Tensor value, int num_keys, float scale) -> Tensor");
  m.def(
      "ragged_one_row_attention(Tensor query, Tensor[] keys, Tensor[] values, int[] num_keys, Tensor[] shared_keys, "
      "Tensor[] shared_values, int[] shared_at, float scale) -> Tensor");
  m.def("keys_per_chunk() -> int", &keys_per_chunk);
  m.def("vectorized() -> bool", &vectorized);
}

TORCH_LIBRARY_IMPL(kvcellar_cpu, CPU, m) {
  m.impl("one_row_attention", &one_row_attention);
  m.impl("ragged_one_row_attention", &ragged_one_row_attention);
}
