// One chunk of a decode step's attention on a CPU (one_row_attention.cpp runs the chunks and merges them):
// KEYS_PER_TASK keys of one K/V head against the query heads of its group, with a local softmax. The AVX-512
// paths per head size, the bf16 dot product's, and the plain loops for any CPU.
#pragma once

#include <ATen/ATen.h>

#include "vector_math.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace kvcellar::one_row {

using kvcellar::widen;
#if defined(__AVX512F__)
using kvcellar::exp16;
using kvcellar::load16;
#endif

constexpr int64_t KEYS_PER_TASK = 256;
// A task's score row per query head: its keys' scores, then the row's max and sum.
constexpr int64_t SCORE_ROW = KEYS_PER_TASK + 2;

// Each query head's score row becomes exp(score - max), followed by that max and the sum.
inline void softmax_rows(int64_t groups, int64_t count, float* scores) {
  for (int64_t g = 0; g < groups; ++g) {
    float* row = scores + g * SCORE_ROW;
    float top = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < count; ++j) top = std::max(top, row[j]);
    float total = 0.f;
    for (int64_t j = 0; j < count; ++j) {
      row[j] = std::exp(row[j] - top);
      total += row[j];
    }
    row[KEYS_PER_TASK] = top;
    row[KEYS_PER_TASK + 1] = total;
  }
}

#if defined(__AVX512F__)
constexpr bool VECTORIZED = true;

// softmax_rows with 16 keys at a time (the tail masked).
inline void softmax_rows16(int64_t groups, int64_t count, float* scores) {
  for (int64_t g = 0; g < groups; ++g) {
    float* row = scores + g * SCORE_ROW;
    __m512 top = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    for (int64_t j = 0; j < count; j += 16) {
      const __mmask16 live = count - j >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (count - j)) - 1);
      top = _mm512_mask_max_ps(top, live, top, _mm512_maskz_loadu_ps(live, row + j));
    }
    const float row_max = _mm512_reduce_max_ps(top);
    const __m512 shift = _mm512_set1_ps(row_max);
    __m512 total = _mm512_setzero_ps();
    for (int64_t j = 0; j < count; j += 16) {
      const __mmask16 live = count - j >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (count - j)) - 1);
      const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, row + j), shift));
      _mm512_mask_storeu_ps(row + j, live, e);
      total = _mm512_mask_add_ps(total, live, total, e);
    }
    row[KEYS_PER_TASK] = row_max;
    row[KEYS_PER_TASK + 1] = _mm512_reduce_add_ps(total);
  }
}

// Rows this far ahead are prefetched: each task streams its chunk's rows once, from memory.
constexpr int64_t PREFETCH_ROWS = 4;

template <typename KV>
inline void prefetch_row(const KV* row, int64_t bytes) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t offset = 0; offset < bytes; offset += 64) _mm_prefetch(p + offset, _MM_HINT_T0);
}

// Row j of `rows` (row stride `stride`, `count` rows) widened into registers; a later row is prefetched.
template <int PIECES, typename KV>
inline void widen_row(const KV* rows, int64_t stride, int64_t j, int64_t count, __m512 out[PIECES]) {
  const KV* row = rows + j * stride;
  if (j + PREFETCH_ROWS < count) prefetch_row(row + PREFETCH_ROWS * stride, 16 * PIECES * sizeof(KV));
  for (int p = 0; p < PIECES; ++p) out[p] = load16(row + 16 * p);
}

// acc[g] = sum over the chunk's rows j of scores[g][j] * value row j, for GROUPS query heads, the sums kept
// in registers (GROUPS x PIECES of them) and stored once.
template <int PIECES, int GROUPS, typename KV>
void weigh_values(const KV* values, int64_t value_stride, int64_t count, const float* scores, float* acc) {
  __m512 sums[GROUPS][PIECES];
  for (int g = 0; g < GROUPS; ++g)
    for (int p = 0; p < PIECES; ++p) sums[g][p] = _mm512_setzero_ps();
  for (int64_t j = 0; j < count; ++j) {
    __m512 row[PIECES];
    widen_row<PIECES>(values, value_stride, j, count, row);
    for (int g = 0; g < GROUPS; ++g) {
      const __m512 weight = _mm512_set1_ps(scores[g * SCORE_ROW + j]);
      for (int p = 0; p < PIECES; ++p) sums[g][p] = _mm512_fmadd_ps(weight, row[p], sums[g][p]);
    }
  }
  for (int g = 0; g < GROUPS; ++g)
    for (int p = 0; p < PIECES; ++p) _mm512_storeu_ps(acc + (g * PIECES + p) * 16, sums[g][p]);
}

// weigh_values for bf16 rows, widened without a lane shuffle: 32 values loaded as 16 pairs, the even ones
// moved to the top half (a shift), the odd ones kept there (a mask). Its registers hold the dims in even / odd
// order, put back in order once at the end; each dim's FMAs are the same, in the same order, so the sums are
// the same bits as the template above computes.
template <int PIECES, int GROUPS>
void weigh_values(const c10::BFloat16* values, int64_t value_stride, int64_t count, const float* scores, float* acc) {
  constexpr int PAIRS = PIECES / 2;
  const __m512i high = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  __m512 even[GROUPS][PAIRS], odd[GROUPS][PAIRS];
  for (int g = 0; g < GROUPS; ++g)
    for (int q = 0; q < PAIRS; ++q) even[g][q] = odd[g][q] = _mm512_setzero_ps();
  for (int64_t j = 0; j < count; ++j) {
    const c10::BFloat16* row = values + j * value_stride;
    if (j + PREFETCH_ROWS < count) prefetch_row(row + PREFETCH_ROWS * value_stride, 32 * PAIRS * sizeof(c10::BFloat16));
    __m512 lo[PAIRS], hi[PAIRS];
    for (int q = 0; q < PAIRS; ++q) {
      const __m512i pairs = _mm512_loadu_si512(row + 32 * q);
      lo[q] = _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16));
      hi[q] = _mm512_castsi512_ps(_mm512_and_si512(pairs, high));
    }
    for (int g = 0; g < GROUPS; ++g) {
      const __m512 weight = _mm512_set1_ps(scores[g * SCORE_ROW + j]);
      for (int q = 0; q < PAIRS; ++q) {
        even[g][q] = _mm512_fmadd_ps(weight, lo[q], even[g][q]);
        odd[g][q] = _mm512_fmadd_ps(weight, hi[q], odd[g][q]);
      }
    }
  }
  const __m512i first = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const __m512i second = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
  for (int g = 0; g < GROUPS; ++g)
    for (int q = 0; q < PAIRS; ++q) {
      float* out = acc + (g * PIECES + 2 * q) * 16;
      _mm512_storeu_ps(out, _mm512_permutex2var_ps(even[g][q], first, odd[g][q]));
      _mm512_storeu_ps(out + 16, _mm512_permutex2var_ps(even[g][q], second, odd[g][q]));
    }
}

template <int PIECES, typename KV>
void weigh(const KV* values, int64_t value_stride, int64_t groups, int64_t count, const float* scores, float* acc);

// AVX-512, a head size of PIECES x 16: each key and value row is widened once into registers and used by
// every query head of the group.
template <int PIECES, typename KV>
void attend_rows(const float* queries, int64_t groups, const KV* keys, const KV* values, int64_t key_stride,
                 int64_t value_stride, int64_t count, float* scores, float* acc) {
  constexpr int64_t dim = 16 * PIECES;
  for (int64_t j = 0; j < count; ++j) {
    __m512 row[PIECES];
    widen_row<PIECES>(keys, key_stride, j, count, row);
    for (int64_t g = 0; g < groups; ++g) {
      const float* query = queries + g * dim;
      __m512 even = _mm512_mul_ps(row[0], _mm512_loadu_ps(query));
      __m512 odd = _mm512_mul_ps(row[1], _mm512_loadu_ps(query + 16));
      for (int p = 2; p < PIECES; p += 2) {
        even = _mm512_fmadd_ps(row[p], _mm512_loadu_ps(query + 16 * p), even);
        odd = _mm512_fmadd_ps(row[p + 1], _mm512_loadu_ps(query + 16 * p + 16), odd);
      }
      scores[g * SCORE_ROW + j] = _mm512_reduce_add_ps(_mm512_add_ps(even, odd));
    }
  }
  softmax_rows16(groups, count, scores);
  weigh<PIECES>(values, value_stride, groups, count, scores, acc);
}

#if defined(__AVX512BF16__)
// Scores of bf16 keys against bf16 queries (unscaled) with the CPU's bf16 dot product: every product is exact
// in fp32 and summed in fp32 in a fixed order (pairs of dims per lane, two chains, one horizontal sum), then
// scaled. Keys are read as they are stored, without widening: half the instructions of the FMA path.
template <int PIECES>
void dot_scores(const c10::BFloat16* queries, float scale, int64_t groups, const c10::BFloat16* keys,
                int64_t key_stride, int64_t count, float* scores) {
  constexpr int VECTORS = PIECES / 2;  // 32 bf16 values per vector
  constexpr int64_t dim = 16 * PIECES;
  for (int64_t j = 0; j < count; ++j) {
    const c10::BFloat16* row = keys + j * key_stride;
    if (j + PREFETCH_ROWS < count) prefetch_row(row + PREFETCH_ROWS * key_stride, dim * sizeof(c10::BFloat16));
    __m512bh key[VECTORS];
    for (int v = 0; v < VECTORS; ++v) key[v] = (__m512bh)_mm512_loadu_si512(row + 32 * v);
    for (int64_t g = 0; g < groups; ++g) {
      const c10::BFloat16* query = queries + g * dim;
      __m512 even = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)_mm512_loadu_si512(query), key[0]);
      __m512 odd = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)_mm512_loadu_si512(query + 32), key[1]);
      for (int v = 2; v < VECTORS; v += 2) {
        even = _mm512_dpbf16_ps(even, (__m512bh)_mm512_loadu_si512(query + 32 * v), key[v]);
        odd = _mm512_dpbf16_ps(odd, (__m512bh)_mm512_loadu_si512(query + 32 * v + 32), key[v + 1]);
      }
      scores[g * SCORE_ROW + j] = _mm512_reduce_add_ps(_mm512_add_ps(even, odd)) * scale;
    }
  }
}

template <int PIECES>
void attend_rows_dot(const c10::BFloat16* queries, float scale, int64_t groups, const c10::BFloat16* keys,
                     const c10::BFloat16* values, int64_t key_stride, int64_t value_stride, int64_t count,
                     float* scores, float* acc) {
  dot_scores<PIECES>(queries, scale, groups, keys, key_stride, count, scores);
  softmax_rows16(groups, count, scores);
  weigh<PIECES>(values, value_stride, groups, count, scores, acc);
}

// bf16 K/V and bf16 queries where the CPU has the bf16 dot product and the head size is 64, 128 or 256.
bool attend_rows_dot(const c10::BFloat16* queries, float scale, int64_t groups, int64_t dim, const c10::BFloat16* keys,
                     const c10::BFloat16* values, int64_t key_stride, int64_t value_stride, int64_t count,
                     float* scores, float* acc) {
  switch (dim) {
    case 64: attend_rows_dot<4>(queries, scale, groups, keys, values, key_stride, value_stride, count, scores, acc); return true;
    case 128: attend_rows_dot<8>(queries, scale, groups, keys, values, key_stride, value_stride, count, scores, acc); return true;
    case 256: attend_rows_dot<16>(queries, scale, groups, keys, values, key_stride, value_stride, count, scores, acc); return true;
    default: return false;
  }
}
constexpr bool BF16_DOT = true;
#else
constexpr bool BF16_DOT = false;
#endif

// The weighted values of a chunk's rows, summed in registers where they fit (the same FMAs, in the same order).
template <int PIECES, typename KV>
void weigh(const KV* values, int64_t value_stride, int64_t groups, int64_t count, const float* scores, float* acc) {
  constexpr int64_t dim = 16 * PIECES;
  if (groups == 1) return weigh_values<PIECES, 1>(values, value_stride, count, scores, acc);
  if constexpr (PIECES <= 8) {
    if (groups == 2) return weigh_values<PIECES, 2>(values, value_stride, count, scores, acc);
  }
  for (int64_t i = 0; i < groups * dim; i += 16) _mm512_storeu_ps(acc + i, _mm512_setzero_ps());
  for (int64_t j = 0; j < count; ++j) {
    __m512 row[PIECES];
    widen_row<PIECES>(values, value_stride, j, count, row);
    for (int64_t g = 0; g < groups; ++g) {
      const __m512 weight = _mm512_set1_ps(scores[g * SCORE_ROW + j]);
      float* out = acc + g * dim;
      for (int p = 0; p < PIECES; ++p)
        _mm512_storeu_ps(out + 16 * p, _mm512_fmadd_ps(weight, row[p], _mm512_loadu_ps(out + 16 * p)));
    }
  }
}

template <typename KV>
bool attend_rows(const float* queries, int64_t groups, int64_t dim, const KV* keys, const KV* values,
                 int64_t key_stride, int64_t value_stride, int64_t count, float* scores, float* acc) {
  switch (dim) {
    case 64: attend_rows<4>(queries, groups, keys, values, key_stride, value_stride, count, scores, acc); return true;
    case 128: attend_rows<8>(queries, groups, keys, values, key_stride, value_stride, count, scores, acc); return true;
    case 256: attend_rows<16>(queries, groups, keys, values, key_stride, value_stride, count, scores, acc); return true;
    default: return false;  // other head sizes: the plain loops
  }
}
#else
constexpr bool VECTORIZED = false;
constexpr bool BF16_DOT = false;

template <typename KV>
bool attend_rows(const float*, int64_t, int64_t, const KV*, const KV*, int64_t, int64_t, int64_t, float*, float*) {
  return false;
}
#endif

// A task's queries: scaled in fp32 and, for the bf16 dot product, unscaled in bf16 (null where not used).
struct Queries {
  const float* scaled;
  const c10::BFloat16* rounded;
  float scale;
};

// The plain loops: any CPU, any head size (the engine uses the kernel only where VECTORIZED).
template <typename KV>
void attend_chunk(const Queries& queries_of, int64_t groups, int64_t dim, const KV* keys, const KV* values,
                  int64_t key_stride, int64_t value_stride, int64_t count, float* scores, float* acc) {
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<KV, c10::BFloat16>) {
    if (queries_of.rounded != nullptr && attend_rows_dot(queries_of.rounded, queries_of.scale, groups, dim, keys,
                                                         values, key_stride, value_stride, count, scores, acc))
      return;
  }
#endif
  const float* queries = queries_of.scaled;
  if (attend_rows(queries, groups, dim, keys, values, key_stride, value_stride, count, scores, acc)) return;
  for (int64_t j = 0; j < count; ++j) {
    const KV* key = keys + j * key_stride;
    for (int64_t g = 0; g < groups; ++g) {
      const float* query = queries + g * dim;
      float dot = 0.f;
      for (int64_t d = 0; d < dim; ++d) dot += query[d] * widen(key[d]);
      scores[g * SCORE_ROW + j] = dot;
    }
  }
  softmax_rows(groups, count, scores);
  std::fill(acc, acc + groups * dim, 0.f);
  for (int64_t j = 0; j < count; ++j) {
    const KV* value = values + j * value_stride;
    for (int64_t g = 0; g < groups; ++g) {
      const float weight = scores[g * SCORE_ROW + j];
      float* out = acc + g * dim;
      for (int64_t d = 0; d < dim; ++d) out[d] += weight * widen(value[d]);
    }
  }
}

}  // namespace kvcellar::one_row
