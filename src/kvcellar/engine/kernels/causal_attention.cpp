// Causal attention of a prefill pass on a CPU with bf16 dot products (AVX512-BF16; see __init__.py).
//
// query [B, H, M, D] bf16, key/value [B, H_kv, N, D] bf16 (N >= M; any strides but a contiguous last dim):
// the queries are the last M of N positions, query i sees keys [0, N - M + i]. Returns [B, M, H, D] bf16,
// the layout transformers' attention functions return.
//
// Flash attention, online softmax in fp32 over key blocks of 16 (one vector of scores). Row invariance:
// a query row's arithmetic depends only on its own values, its position and the K/V before it. Key
// blocks start at absolute multiples of 16, every row walks them in the same order, and a block past
// the row's position adds exact zeros (its probabilities are masked to 0, the rescale factor is
// exp(0) = 1). So a row computes the same bits whichever pass it is in, one long pass or a short pass
// after a restored prefix, and at any thread count: exact mode needs no query pieces with this kernel.
//
// The K/V are first packed for the dot instruction, once per call: keys as 16-key blocks of channel
// pairs ([block][D/2][16] pairs), values as key pairs per channel ([N/2][D] pairs).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "vector_math.h"

namespace {

#if defined(__AVX512BF16__) && defined(__AVX512F__)
constexpr bool HAS_BF16_DOT = true;
constexpr int64_t BLOCK = 16;      // keys per block: one vector of scores per query row
constexpr int64_t TILE = 8;        // query positions per task (times the group's query heads)
constexpr int64_t MAX_ROWS = 16;   // rows whose scores stay in registers at once

using kvcellar::exp16;

inline uint32_t pair_at(const c10::BFloat16* row, int64_t index) {  // bf16 row[2i], row[2i+1] as one 32-bit word
  uint32_t out;
  std::memcpy(&out, row + 2 * index, sizeof(out));
  return out;
}

// 16 rows of 16 32-bit words, transposed in registers: rows[i] word j -> rows[j] word i.
inline void transpose16(__m512i rows[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(rows[i], rows[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(rows[i], rows[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    rows[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    rows[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    rows[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    rows[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  // Each 128-bit lane now holds a 4x4 block; move the blocks into place.
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_i32x4(rows[i], rows[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_i32x4(rows[i], rows[i + 4], 0xDD);
    t[i + 8] = _mm512_shuffle_i32x4(rows[i + 8], rows[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_i32x4(rows[i + 8], rows[i + 12], 0xDD);
  }
  for (int i = 0; i < 4; ++i) {
    rows[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
    rows[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xDD);
    rows[i + 4] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0x88);
    rows[i + 12] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0xDD);
  }
}

// keys [N, D] (row stride) -> packed [blocks][D/2][16] words (channel pairs of 16 keys), zero past N.
void pack_keys(const c10::BFloat16* keys, int64_t stride, int64_t num_keys, int64_t dim, uint32_t* out) {
  const int64_t pairs = dim / 2, blocks = (num_keys + BLOCK - 1) / BLOCK;
  for (int64_t block = 0; block < blocks; ++block) {
    uint32_t* packed = out + block * pairs * BLOCK;
    for (int64_t t0 = 0; t0 < pairs; t0 += 16) {  // 16 channel pairs (32 channels) of the block's 16 keys
      __m512i rows[16];
      for (int64_t j = 0; j < BLOCK; ++j) {
        const int64_t key = block * BLOCK + j;
        rows[j] = key < num_keys ? _mm512_loadu_si512(keys + key * stride + 2 * t0) : _mm512_setzero_si512();
      }
      transpose16(rows);
      for (int64_t t = 0; t < 16; ++t) _mm512_storeu_si512(packed + (t0 + t) * BLOCK, rows[t]);
    }
  }
}

// values [N, D] (row stride) -> packed [N/2][D] words: (value[2u][d], value[2u + 1][d]), zero past N.
void pack_values(const c10::BFloat16* values, int64_t stride, int64_t num_keys, int64_t dim, uint32_t* out) {
  const int64_t padded = (num_keys + BLOCK - 1) / BLOCK * BLOCK;
  // word i of the result takes 16-bit word i of the even row and word i of the odd row (index + 32)
  alignas(64) int16_t low[32], high[32];
  for (int i = 0; i < 16; ++i) {
    low[2 * i] = i, low[2 * i + 1] = 32 + i;
    high[2 * i] = 16 + i, high[2 * i + 1] = 48 + i;
  }
  const __m512i low_index = _mm512_load_si512(low), high_index = _mm512_load_si512(high);
  for (int64_t u = 0; u < padded / 2; ++u) {
    const int64_t even = 2 * u, odd = 2 * u + 1;
    for (int64_t d = 0; d < dim; d += 32) {
      const __m512i a = even < num_keys ? _mm512_loadu_si512(values + even * stride + d) : _mm512_setzero_si512();
      const __m512i b = odd < num_keys ? _mm512_loadu_si512(values + odd * stride + d) : _mm512_setzero_si512();
      _mm512_storeu_si512(out + u * dim + d, _mm512_permutex2var_epi16(a, low_index, b));
      _mm512_storeu_si512(out + u * dim + d + 16, _mm512_permutex2var_epi16(a, high_index, b));
    }
  }
}

struct RowState {  // one query row's online softmax
  float top;       // the largest score so far
  float total;     // sum of exp(score - top)
};

// Scores of `rows` query rows against one key block, then the online softmax and the weighted values.
// queries[r]: the row's bf16 values; positions[r]: the row's absolute position (keys up to it are seen).
template <int ROWS>
void attend_block(const c10::BFloat16* const* queries, const int64_t* positions, int64_t block, int64_t dim,
                  const uint32_t* packed_keys, const uint32_t* packed_values, float scale, RowState* state,
                  float* acc) {
  const int64_t pairs = dim / 2;
  __m512 scores[ROWS];
  for (int r = 0; r < ROWS; ++r) scores[r] = _mm512_setzero_ps();
  for (int64_t t = 0; t < pairs; ++t) {
    const __m512bh keys = (__m512bh)_mm512_loadu_si512(packed_keys + t * BLOCK);
    for (int r = 0; r < ROWS; ++r)
      scores[r] = _mm512_dpbf16_ps(scores[r], (__m512bh)_mm512_set1_epi32(pair_at(queries[r], t)), keys);
  }
  // The softmax of every row first, then the weighted values: rows are independent, and the two phases
  // interleave their long dependency chains better than one row after another.
  const int64_t first_key = block * BLOCK;
  alignas(64) uint32_t prob_pairs[ROWS][BLOCK / 2];
  float rescales[ROWS];
  for (int r = 0; r < ROWS; ++r) {
    const int64_t visible = std::min<int64_t>(BLOCK, positions[r] - first_key + 1);  // may be <= 0
    const __mmask16 seen = visible <= 0 ? 0 : (visible >= BLOCK ? 0xFFFF : static_cast<__mmask16>((1u << visible) - 1));
    const __m512 scaled = _mm512_mul_ps(scores[r], _mm512_set1_ps(scale));
    const float block_top = _mm512_mask_reduce_max_ps(seen, scaled);  // -inf when nothing is seen
    const float top = std::max(state[r].top, block_top);
    rescales[r] = state[r].top == top ? 1.0f : std::exp(state[r].top - top);
    const __m512 probs = _mm512_maskz_mov_ps(seen, exp16(_mm512_sub_ps(scaled, _mm512_set1_ps(top))));
    state[r].total = state[r].total * rescales[r] + _mm512_reduce_add_ps(probs);
    state[r].top = top;
    _mm256_store_si256(reinterpret_cast<__m256i*>(prob_pairs[r]), (__m256i)_mm512_cvtneps_pbh(probs));
  }
  for (int64_t c = 0; c < dim; c += 16) {
    __m512bh values[BLOCK / 2];
    for (int u = 0; u < BLOCK / 2; ++u) values[u] = (__m512bh)_mm512_loadu_si512(packed_values + u * dim + c);
    for (int r = 0; r < ROWS; ++r) {
      float* out = acc + r * dim + c;
      __m512 sum = _mm512_mul_ps(_mm512_loadu_ps(out), _mm512_set1_ps(rescales[r]));
      for (int u = 0; u < BLOCK / 2; ++u)
        sum = _mm512_dpbf16_ps(sum, (__m512bh)_mm512_set1_epi32(prob_pairs[r][u]), values[u]);
      _mm512_storeu_ps(out, sum);
    }
  }
}

void run(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, double scale, at::Tensor& out) {
  const int64_t batch = query.size(0), heads = query.size(1), rows_m = query.size(2), dim = query.size(3);
  const int64_t kv_heads = key.size(1), num_keys = key.size(2), groups = heads / kv_heads;
  const int64_t offset = num_keys - rows_m, blocks = (num_keys + BLOCK - 1) / BLOCK;
  const int64_t pairs = dim / 2, padded = blocks * BLOCK;
  at::Tensor packed_keys = at::empty({batch, kv_heads, blocks * pairs * BLOCK}, key.options().dtype(at::kInt));
  at::Tensor packed_values = at::empty({batch, kv_heads, padded / 2 * dim}, key.options().dtype(at::kInt));
  const auto* k = key.data_ptr<c10::BFloat16>();
  const auto* v = value.data_ptr<c10::BFloat16>();
  auto* pk = reinterpret_cast<uint32_t*>(packed_keys.data_ptr<int32_t>());
  auto* pv = reinterpret_cast<uint32_t*>(packed_values.data_ptr<int32_t>());
  at::parallel_for(0, batch * kv_heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t index = begin; index < end; ++index) {
      const int64_t b = index / kv_heads, h = index % kv_heads;
      pack_keys(k + b * key.stride(0) + h * key.stride(1), key.stride(2), num_keys, dim, pk + index * blocks * pairs * BLOCK);
      pack_values(v + b * value.stride(0) + h * value.stride(1), value.stride(2), num_keys, dim, pv + index * padded / 2 * dim);
    }
  });
  const auto* q = query.data_ptr<c10::BFloat16>();
  auto* o = out.data_ptr<c10::BFloat16>();
  const int64_t tiles = (rows_m + TILE - 1) / TILE;
  const int64_t rows_per_task = groups * TILE;
  at::parallel_for(0, batch * kv_heads * tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(rows_per_task * dim);
    std::vector<RowState> state(rows_per_task);
    std::vector<const c10::BFloat16*> row_queries(rows_per_task);
    std::vector<int64_t> positions(rows_per_task);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t tile = task % tiles, h = (task / tiles) % kv_heads, b = task / (tiles * kv_heads);
      const int64_t first_row = tile * TILE, last_row = std::min(rows_m, first_row + TILE) - 1;
      for (int64_t g = 0; g < groups; ++g) {
        for (int64_t i = 0; i < TILE; ++i) {
          const int64_t row = std::min(first_row + i, last_row);  // a short last tile repeats its last row
          row_queries[g * TILE + i] = q + b * query.stride(0) + (h * groups + g) * query.stride(1) + row * query.stride(2);
          positions[g * TILE + i] = offset + row;
        }
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(state.begin(), state.end(), RowState{-std::numeric_limits<float>::infinity(), 0.f});
      const int64_t last_block = (offset + last_row) / BLOCK;
      const uint32_t* keys_here = pk + (b * kv_heads + h) * blocks * pairs * BLOCK;
      const uint32_t* values_here = pv + (b * kv_heads + h) * padded / 2 * dim;
      for (int64_t block = 0; block <= last_block; ++block) {
        const uint32_t* block_keys = keys_here + block * pairs * BLOCK;
        const uint32_t* block_values = values_here + block * (BLOCK / 2) * dim;
        int64_t r = 0;
        for (; r + MAX_ROWS <= rows_per_task; r += MAX_ROWS)
          attend_block<MAX_ROWS>(&row_queries[r], &positions[r], block, dim, block_keys, block_values, float(scale),
                                 &state[r], &acc[r * dim]);
        if (r < rows_per_task)  // rows_per_task is a multiple of TILE
          attend_block<TILE>(&row_queries[r], &positions[r], block, dim, block_keys, block_values, float(scale),
                             &state[r], &acc[r * dim]);
      }
      for (int64_t g = 0; g < groups; ++g) {
        for (int64_t row = first_row; row <= last_row; ++row) {
          const int64_t r = g * TILE + (row - first_row);
          const float inverse = 1.0f / state[r].total;
          c10::BFloat16* target = o + ((b * rows_m + row) * heads + h * groups + g) * dim;
          for (int64_t d = 0; d < dim; ++d) target[d] = c10::BFloat16(acc[r * dim + d] * inverse);
        }
      }
    }
  });
}
#else
constexpr bool HAS_BF16_DOT = false;

void run(const at::Tensor&, const at::Tensor&, const at::Tensor&, double, at::Tensor&) {
  TORCH_CHECK(false, "causal_attention needs AVX512-BF16 (check has_bf16_dot() first)");
}
#endif

at::Tensor causal_attention(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, double scale) {
  TORCH_CHECK(query.device().is_cpu() && key.device().is_cpu() && value.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(query.dim() == 4 && key.dim() == 4 && value.dim() == 4, "query [B, H, M, D], key/value [B, H_kv, N, D]");
  TORCH_CHECK(query.scalar_type() == at::kBFloat16 && key.scalar_type() == at::kBFloat16 &&
                  value.scalar_type() == at::kBFloat16, "bf16 query, key and value");
  TORCH_CHECK(key.sizes() == value.sizes(), "key and value of one shape");
  TORCH_CHECK(query.stride(3) == 1 && key.stride(3) == 1 && value.stride(3) == 1, "rows contiguous");
  TORCH_CHECK(query.size(3) == key.size(3) && query.size(3) % 32 == 0, "a head size that is a multiple of 32");
  TORCH_CHECK(key.size(0) == query.size(0) && query.size(1) % key.size(1) == 0, "batch and head groups");
  TORCH_CHECK(query.size(2) >= 1 && query.size(2) <= key.size(2), "at most as many queries as keys");
  at::Tensor out = at::empty({query.size(0), query.size(2), query.size(1), query.size(3)}, query.options());
  run(query, key, value, scale, out);
  return out;
}

bool has_bf16_dot() { return HAS_BF16_DOT; }

}  // namespace

TORCH_LIBRARY_FRAGMENT(kvcellar_cpu, m) {
  m.def("causal_attention(Tensor query, Tensor key, Tensor value, float scale) -> Tensor");
  m.def("has_bf16_dot() -> bool", &has_bf16_dot);
}

TORCH_LIBRARY_IMPL(kvcellar_cpu, CPU, m) { m.impl("causal_attention", &causal_attention); }
