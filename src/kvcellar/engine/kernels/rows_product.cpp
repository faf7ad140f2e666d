// A linear layer's product for a few rows on a CPU: decode steps, one row or a batch of them (see __init__.py).
//
// rows_product(x, weight): x [R, in] bf16 or fp32, weight [out, in] bf16 with contiguous rows -> [R, out] fp32.
// pack_rows_weight(weight) -> [ceil(out / 16), in / 2, 16, 2] bf16 (in even; outputs past `out` are zero);
// packed_rows_product(x, packed, out): x [R, in] bf16 -> [R, out] fp32.
//
// Every output (r, o) is summed in one order that depends on nothing but `in`: the plain product walks
// k = 0, 1, ... in one 16-lane accumulator per output (bf16 x: pairs of k through the CPU's bf16 dot product;
// fp32 x: one FMA per k, the weight widened exactly), then one fixed horizontal sum; the packed product
// keeps output o in lane o % 16 of an accumulator and walks the pairs of k in order (a broadcast pair of x
// against 16 outputs' pairs). Which rows, how many of them, which outputs share a task and the thread count
// never change that order, so a row's result is the same bits alone or in a batch of any size: what lets
// exact mode batch decode steps (engine/batch_decode.py). A tile's weights are read from memory once and
// reused from registers or L1 by every row of the batch.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "vector_math.h"

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace {

constexpr int64_t OUTPUTS_PER_TASK = 64;

#if defined(__AVX512BF16__)
// bf16 x: 32 values of k per step, as 16 pairs. ROWS and OUTPUTS are compile-time, so the accumulators
// stay in registers.
template <int ROWS, int OUTPUTS>
inline void tile_bf16(const c10::BFloat16* x, int64_t in, const c10::BFloat16* w, int64_t out, float* y) {
  const int64_t whole = in / 32 * 32;
  __m512 acc[ROWS][OUTPUTS];
  for (int r = 0; r < ROWS; ++r)
    for (int o = 0; o < OUTPUTS; ++o) acc[r][o] = _mm512_setzero_ps();
  auto step = [&](int64_t k, __mmask32 mask) {
    __m512bh wv[OUTPUTS];
    for (int o = 0; o < OUTPUTS; ++o) wv[o] = (__m512bh)_mm512_maskz_loadu_epi16(mask, w + o * in + k);
    for (int r = 0; r < ROWS; ++r) {
      const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(mask, x + r * in + k);
      for (int o = 0; o < OUTPUTS; ++o) acc[r][o] = _mm512_dpbf16_ps(acc[r][o], xv, wv[o]);
    }
  };
  for (int64_t k = 0; k < whole; k += 32) step(k, ~__mmask32{0});
  if (whole < in) step(whole, static_cast<__mmask32>((uint64_t{1} << (in - whole)) - 1));
  for (int r = 0; r < ROWS; ++r)
    for (int o = 0; o < OUTPUTS; ++o) y[r * out + o] = _mm512_reduce_add_ps(acc[r][o]);
}

// Packed weights: ROWS rows against BLOCKS blocks of 16 outputs, one pair of k per step.
template <int ROWS, int BLOCKS>
inline void packed_tile(const c10::BFloat16* x, int64_t in, const c10::BFloat16* packed, int64_t block0,
                        int64_t out, float* y) {
  const int64_t pairs = in / 2;
  __m512 acc[ROWS][BLOCKS];
  for (int r = 0; r < ROWS; ++r)
    for (int b = 0; b < BLOCKS; ++b) acc[r][b] = _mm512_setzero_ps();
  const c10::BFloat16* w[BLOCKS];
  for (int b = 0; b < BLOCKS; ++b) w[b] = packed + (block0 + b) * pairs * 32;
  const int32_t* xp[ROWS];
  for (int r = 0; r < ROWS; ++r) xp[r] = reinterpret_cast<const int32_t*>(x + r * in);
  for (int64_t p = 0; p < pairs; ++p) {
    __m512bh wv[BLOCKS];
    for (int b = 0; b < BLOCKS; ++b) wv[b] = (__m512bh)_mm512_loadu_si512(w[b] + p * 32);
    for (int r = 0; r < ROWS; ++r) {
      const __m512bh xv = (__m512bh)_mm512_set1_epi32(xp[r][p]);
      for (int b = 0; b < BLOCKS; ++b) acc[r][b] = _mm512_dpbf16_ps(acc[r][b], xv, wv[b]);
    }
  }
  for (int b = 0; b < BLOCKS; ++b) {
    const int64_t first = (block0 + b) * 16;
    const int64_t count = std::min<int64_t>(16, out - first);
    const __mmask16 mask = static_cast<__mmask16>((1u << count) - 1);
    for (int r = 0; r < ROWS; ++r) _mm512_mask_storeu_ps(y + r * out + first, mask, acc[r][b]);
  }
}

// Blocks of 16 outputs per tile for ROWS rows: as many accumulators as the registers hold beside the tile's
// weights and a broadcast row. A task is one tile, so no block is left to a one-block tile, which loads a
// broadcast per product.
constexpr int blocks_for(int64_t rows) { return rows == 1 ? 8 : rows == 2 ? 6 : rows <= 4 ? 4 : 3; }

template <int ROWS>
inline void packed_rows(const c10::BFloat16* x, int64_t in, const c10::BFloat16* packed, int64_t out, float* y,
                        int64_t begin, int64_t end) {
  constexpr int BLOCKS = blocks_for(ROWS);
  int64_t b = begin;
  for (; b + BLOCKS <= end; b += BLOCKS) packed_tile<ROWS, BLOCKS>(x, in, packed, b, out, y);
  for (; b < end; ++b) packed_tile<ROWS, 1>(x, in, packed, b, out, y);
}
#endif

#if defined(__AVX512F__)
// fp32 x: 16 values of k per step, each weight widened to fp32 (exact).
template <int ROWS, int OUTPUTS>
inline void tile_fp32(const float* x, int64_t in, const c10::BFloat16* w, int64_t out, float* y) {
  const int64_t whole = in / 16 * 16;
  __m512 acc[ROWS][OUTPUTS];
  for (int r = 0; r < ROWS; ++r)
    for (int o = 0; o < OUTPUTS; ++o) acc[r][o] = _mm512_setzero_ps();
  auto step = [&](int64_t k, __mmask16 mask) {
    __m512 wv[OUTPUTS];
    for (int o = 0; o < OUTPUTS; ++o) {
      const __m256i half = _mm256_maskz_loadu_epi16(mask, w + o * in + k);
      wv[o] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
    }
    for (int r = 0; r < ROWS; ++r) {
      const __m512 xv = _mm512_maskz_loadu_ps(mask, x + r * in + k);
      for (int o = 0; o < OUTPUTS; ++o) acc[r][o] = _mm512_fmadd_ps(xv, wv[o], acc[r][o]);
    }
  };
  for (int64_t k = 0; k < whole; k += 16) step(k, __mmask16(0xFFFF));
  if (whole < in) step(whole, static_cast<__mmask16>((1u << (in - whole)) - 1));
  for (int r = 0; r < ROWS; ++r)
    for (int o = 0; o < OUTPUTS; ++o) y[r * out + o] = _mm512_reduce_add_ps(acc[r][o]);
}
#endif

// Every row of outputs [begin, end): groups of up to 8 rows (the task's weights come from memory for the
// first group, from cache after), each in tiles of outputs sized to keep the accumulators in registers,
// then single outputs (the same per-output order in every tile shape).
template <int ROWS, typename Scalar, typename Tile>
inline void group(const Scalar* x, int64_t in, const c10::BFloat16* w, int64_t out, float* y, int64_t begin,
                  int64_t end, Tile tile) {
  constexpr int OUTPUTS = ROWS >= 5 ? 2 : ROWS >= 3 ? 4 : 8;
  int64_t o = begin;
  for (; o + OUTPUTS <= end; o += OUTPUTS)
    tile(std::integral_constant<int, ROWS>{}, std::integral_constant<int, OUTPUTS>{}, x, w + o * in, y + o);
  for (; o < end; ++o) tile(std::integral_constant<int, ROWS>{}, std::integral_constant<int, 1>{}, x, w + o * in, y + o);
}

template <typename Scalar, typename Tile>
void outputs_with(const Scalar* x, int64_t rows, int64_t in, const c10::BFloat16* w, int64_t out, float* y,
                  int64_t begin, int64_t end, Tile tile) {
  for (int64_t r = 0; r < rows; r += 8) {
    const Scalar* xr = x + r * in;
    float* yr = y + r * out;
    switch (std::min<int64_t>(8, rows - r)) {
      case 8: group<8>(xr, in, w, out, yr, begin, end, tile); break;
      case 7: group<7>(xr, in, w, out, yr, begin, end, tile); break;
      case 6: group<6>(xr, in, w, out, yr, begin, end, tile); break;
      case 5: group<5>(xr, in, w, out, yr, begin, end, tile); break;
      case 4: group<4>(xr, in, w, out, yr, begin, end, tile); break;
      case 3: group<3>(xr, in, w, out, yr, begin, end, tile); break;
      case 2: group<2>(xr, in, w, out, yr, begin, end, tile); break;
      default: group<1>(xr, in, w, out, yr, begin, end, tile); break;
    }
  }
}

template <typename Scalar>
void outputs(const Scalar* x, int64_t rows, int64_t in, const c10::BFloat16* w, int64_t out, float* y,
             int64_t begin, int64_t end) {
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<Scalar, c10::BFloat16>) {
    outputs_with(x, rows, in, w, out, y, begin, end,
                 [&](auto rows_c, auto outs_c, const c10::BFloat16* xp, const c10::BFloat16* wp, float* yp) {
                   tile_bf16<decltype(rows_c)::value, decltype(outs_c)::value>(xp, in, wp, out, yp);
                 });
    return;
  }
#endif
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<Scalar, float>) {
    outputs_with(x, rows, in, w, out, y, begin, end,
                 [&](auto rows_c, auto outs_c, const float* xp, const c10::BFloat16* wp, float* yp) {
                   tile_fp32<decltype(rows_c)::value, decltype(outs_c)::value>(xp, in, wp, out, yp);
                 });
    return;
  }
#endif
  TORCH_CHECK(false, "rows_product needs AVX-512 (and AVX512-BF16 for bf16 rows)");
}

at::Tensor rows_product(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1), "rows_product: x [R, in], weight [out, in]");
  TORCH_CHECK(weight.scalar_type() == at::kBFloat16 && weight.stride(1) == 1, "rows_product: the weight is bf16, rows contiguous");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat, "rows_product: x is bf16 or fp32");
  const at::Tensor rows = x.contiguous();
  const at::Tensor w = weight.stride(0) == weight.size(1) ? weight : weight.contiguous();
  const int64_t count = rows.size(0), in = rows.size(1), out = w.size(0);
  at::Tensor y = at::empty({count, out}, x.options().dtype(at::kFloat));
  const auto* wp = w.data_ptr<c10::BFloat16>();
  float* yp = y.data_ptr<float>();
  const int64_t tasks = (out + OUTPUTS_PER_TASK - 1) / OUTPUTS_PER_TASK;
  at::parallel_for(0, tasks, 1, [&](int64_t first, int64_t last) {
    const int64_t begin = first * OUTPUTS_PER_TASK, end = std::min(out, last * OUTPUTS_PER_TASK);
    if (rows.scalar_type() == at::kBFloat16)
      outputs(rows.data_ptr<c10::BFloat16>(), count, in, wp, out, yp, begin, end);
    else
      outputs(rows.data_ptr<float>(), count, in, wp, out, yp, begin, end);
  });
  return y;
}

at::Tensor pack_rows_weight(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kBFloat16 && weight.size(1) % 2 == 0,
              "pack_rows_weight: a bf16 weight [out, in] with an even `in`");
  const int64_t out = weight.size(0), in = weight.size(1), blocks = (out + 15) / 16;
  at::Tensor padded = at::zeros({blocks * 16, in}, weight.options());
  padded.narrow(0, 0, out).copy_(weight);
  // [blocks, 16, in/2, 2] -> [blocks, in/2, 16, 2]: the 16 outputs' pair p side by side.
  return padded.view({blocks, 16, in / 2, 2}).permute({0, 2, 1, 3}).contiguous();
}

at::Tensor packed_rows_product(const at::Tensor& x, const at::Tensor& packed, int64_t out) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "packed_rows_product: x [R, in] bf16");
  TORCH_CHECK(packed.dim() == 4 && packed.size(1) * 2 == x.size(1) && packed.size(0) * 16 >= out,
              "packed_rows_product: a weight packed by pack_rows_weight for x's width");
#if defined(__AVX512BF16__)
  const at::Tensor rows = x.contiguous();
  const int64_t count = rows.size(0), in = rows.size(1), blocks = (out + 15) / 16;
  at::Tensor y = at::empty({count, out}, x.options().dtype(at::kFloat));
  const auto* pp = packed.data_ptr<c10::BFloat16>();
  const auto* xp = rows.data_ptr<c10::BFloat16>();
  float* yp = y.data_ptr<float>();
  const int64_t per_task = blocks_for(std::min<int64_t>(8, count));
  const int64_t tasks = (blocks + per_task - 1) / per_task;
  at::parallel_for(0, tasks, 1, [&](int64_t first, int64_t last) {
    const int64_t begin = first * per_task, end = std::min(blocks, last * per_task);
    for (int64_t r = 0; r < count; r += 8) {
      const c10::BFloat16* xr = xp + r * in;
      float* yr = yp + r * out;
      switch (std::min<int64_t>(8, count - r)) {
        case 8: packed_rows<8>(xr, in, pp, out, yr, begin, end); break;
        case 7: packed_rows<7>(xr, in, pp, out, yr, begin, end); break;
        case 6: packed_rows<6>(xr, in, pp, out, yr, begin, end); break;
        case 5: packed_rows<5>(xr, in, pp, out, yr, begin, end); break;
        case 4: packed_rows<4>(xr, in, pp, out, yr, begin, end); break;
        case 3: packed_rows<3>(xr, in, pp, out, yr, begin, end); break;
        case 2: packed_rows<2>(xr, in, pp, out, yr, begin, end); break;
        default: packed_rows<1>(xr, in, pp, out, yr, begin, end); break;
      }
    }
  });
  return y;
#else
  TORCH_CHECK(false, "packed_rows_product needs AVX512-BF16");
#endif
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kvcellar_cpu, m) {
  m.def("rows_product(Tensor x, Tensor weight) -> Tensor");
  m.def("pack_rows_weight(Tensor weight) -> Tensor");
  m.def("packed_rows_product(Tensor x, Tensor packed, int out) -> Tensor");
}

TORCH_LIBRARY_IMPL(kvcellar_cpu, CPU, m) {
  m.impl("rows_product", &rows_product);
  m.impl("packed_rows_product", &packed_rows_product);
}

TORCH_LIBRARY_IMPL(kvcellar_cpu, CompositeExplicitAutograd, m) { m.impl("pack_rows_weight", &pack_rows_weight); }
