// W8A8 on the CPU: per-token (or static per-tensor) int8 activations x int8 per-row weights -> fp32.
//
// Exact integer arithmetic. Activation codes q (int8 symmetric, or uint8 asymmetric with zero
// point z) enter the product as int16 d = q - z, so no zero-point correction term is needed:
// acc[m, n] = sum_k d[m, k] * w[n, k]. The AVX2 path sign-extends 16 weights at a time to int16
// (_mm256_cvtepi8_epi16) and multiplies with _mm256_madd_epi16 into int32 lanes: pair sums are at
// most 2 * 255 * 128, far from int32 overflow, so codes -128 and 255 are exact (the u8 x s8
// _mm256_maddubs_epi16 saturates at int16 and is not used). |acc| <= K * 255 * 128 fits int32 for
// K <= 65793; the Python side refuses wider layers.
//
// Blocking: a tile of MR activation rows x NR weight rows shares each sign-extended weight vector
// across the MR rows, so the weights are read from memory once per tile column and M = 8..16 costs
// little more weight traffic than M = 1. Output rows (weight rows) are split across threads.
//
// Quantization of x reproduces pipeline.quant.activation.quantize_activation operation by
// operation in float32: the same divisions, clamps, scale rounding to the scale dtype, and
// round-half-to-even (nearbyint under the default rounding mode, like torch.round). Built with
// -ffp-contract=off so that no multiply-add is fused behind our back.
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace {

constexpr int kMaxRows = 4;  // MR: activation rows per tile
constexpr int kMaxCols = 3;  // NR: weight rows per tile (4 x 3 accumulators + 3 weights + 1 x = 16 ymm)

// How activations are quantized; mirrors ActivationQuant + the spec fields quantize_activation uses.
struct ActivationParams {
  bool dynamic;
  bool symmetric;
  int64_t qmin;
  int64_t qmax;
  float divisor;  // (qmax - qmin) / 2 when symmetric, qmax - qmin otherwise
  float eps;      // the clamp_min of qparams_from_range, already max(eps, finfo(scale_dtype).tiny)
  int64_t scale_dtype;  // 0 float32, 1 float16, 2 bfloat16: the dtype choose_qparams rounds the scale to
  float static_scale;
  int64_t static_zero;
};

float round_to_scale_dtype(float scale, int64_t scale_dtype) {
  switch (scale_dtype) {
    case 0:
      return scale;
    case 1:
      return static_cast<float>(c10::Half(scale));  // round to nearest even, like Tensor.to(float16)
    case 2:
      return static_cast<float>(c10::BFloat16(scale));
    default:
      TORCH_CHECK(false, "scale_dtype code must be 0 (float32), 1 (float16) or 2 (bfloat16), got ", scale_dtype);
  }
}

// One row of x -> d = q - z (int16), its scale (as stored, then widened to float) and zero point.
void quantize_row(const float* x, int64_t K, const ActivationParams& p, int16_t* d, float* scale_out,
                  int32_t* zero_out) {
  float scale = p.static_scale;
  int32_t zero = static_cast<int32_t>(p.static_zero);
  if (p.dynamic) {
    float lo = x[0], hi = x[0];
    bool nan = false;
    for (int64_t k = 0; k < K; ++k) {
      lo = std::min(lo, x[k]);
      hi = std::max(hi, x[k]);
      nan |= std::isnan(x[k]);
    }
    if (p.symmetric) {
      scale = std::max(std::fabs(lo), std::fabs(hi)) / p.divisor;
    } else {
      lo = std::min(lo, 0.0f);  // keep 0.0 representable, as qparams_from_range does
      hi = std::max(hi, 0.0f);
      scale = (hi - lo) / p.divisor;
    }
    if (nan) scale = NAN;  // torch's amin/amax propagate NaN: the row's outputs become NaN too
    if (scale < p.eps) scale = p.eps;
    scale = round_to_scale_dtype(scale, p.scale_dtype);
    if (p.symmetric) {
      zero = 0;
    } else {
      float z = std::nearbyint(static_cast<float>(p.qmin) - lo / scale);
      z = std::min(std::max(z, static_cast<float>(p.qmin)), static_cast<float>(p.qmax));
      zero = static_cast<int32_t>(z);
    }
  }
  const float zf = static_cast<float>(zero);
  const float qmin = static_cast<float>(p.qmin), qmax = static_cast<float>(p.qmax);
  for (int64_t k = 0; k < K; ++k) {
    float v = x[k] / scale;
    if (!p.symmetric) v = v + zf;
    v = std::min(std::max(std::nearbyint(v), qmin), qmax);
    d[k] = static_cast<int16_t>(static_cast<int32_t>(v) - zero);
  }
  *scale_out = scale;
  *zero_out = zero;
}

#ifdef __AVX2__
inline int32_t horizontal_sum(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}
#endif

// acc[i * NR + j] = sum_k d[i, k] * w[j, k] for an MR x NR tile; d rows are ldd apart, w rows K apart.
template <int MR, int NR>
void tile(const int16_t* d, int64_t ldd, const int8_t* w, int64_t K, int32_t* acc) {
  int64_t k = 0;
#ifdef __AVX2__
  __m256i sums[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) sums[i][j] = _mm256_setzero_si256();
  for (; k + 16 <= K; k += 16) {
    __m256i wv[NR];
    for (int j = 0; j < NR; ++j)
      wv[j] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + j * K + k)));
    for (int i = 0; i < MR; ++i) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(d + i * ldd + k));
      for (int j = 0; j < NR; ++j) sums[i][j] = _mm256_add_epi32(sums[i][j], _mm256_madd_epi16(xv, wv[j]));
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i * NR + j] = horizontal_sum(sums[i][j]);
#else
  for (int i = 0; i < MR * NR; ++i) acc[i] = 0;
#endif
  for (; k < K; ++k)  // the K % 16 tail (all of K without AVX2)
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j)
        acc[i * NR + j] += static_cast<int32_t>(d[i * ldd + k]) * static_cast<int32_t>(w[j * K + k]);
}

using TileFn = void (*)(const int16_t*, int64_t, const int8_t*, int64_t, int32_t*);

template <int MR>
constexpr TileFn tiles_for_rows(int nr) {
  return nr == 1 ? tile<MR, 1> : nr == 2 ? tile<MR, 2> : tile<MR, 3>;
}

TileFn tile_for(int mr, int nr) {
  switch (mr) {
    case 1:
      return tiles_for_rows<1>(nr);
    case 2:
      return tiles_for_rows<2>(nr);
    case 3:
      return tiles_for_rows<3>(nr);
    default:
      return tiles_for_rows<4>(nr);
  }
}

// Every (m, n) of d [M, K] x w [N, K]^T, handed to emit(m, n, acc) once. Parallel over weight rows.
template <typename Emit>
void gemm(const int16_t* d, int64_t M, int64_t K, const int8_t* w, int64_t N, Emit emit) {
  const int64_t col_blocks = (N + kMaxCols - 1) / kMaxCols;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, kMaxCols * K * M));
  at::parallel_for(0, col_blocks, grain, [&](int64_t begin, int64_t end) {
    int32_t acc[kMaxRows * kMaxCols];
    for (int64_t b = begin; b < end; ++b) {
      const int64_t n0 = b * kMaxCols;
      const int nr = static_cast<int>(std::min<int64_t>(kMaxCols, N - n0));
      for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
        const int mr = static_cast<int>(std::min<int64_t>(kMaxRows, M - m0));
        tile_for(mr, nr)(d + m0 * K, K, w + n0 * K, K, acc);
        for (int i = 0; i < mr; ++i)
          for (int j = 0; j < nr; ++j) emit(m0 + i, n0 + j, acc[i * nr + j]);
      }
    }
  });
}

void check_weight(const at::Tensor& weight, int64_t K) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kChar && weight.is_contiguous(),
              "weight must be a contiguous 2-D int8 tensor (out_features, in_features), got ", weight.scalar_type(),
              " of shape ", weight.sizes());
  TORCH_CHECK(weight.size(1) == K, "weight has ", weight.size(1), " inputs, the activations have ", K);
}

ActivationParams make_params(bool dynamic, bool symmetric, int64_t qmin, int64_t qmax, double divisor, double eps,
                             int64_t scale_dtype, double static_scale, int64_t static_zero) {
  TORCH_CHECK(qmin >= (symmetric ? -128 : 0) && qmax <= (symmetric ? 127 : 255) && qmin < qmax,
              "activation codes must lie in int8 (symmetric) or uint8 (asymmetric), got [", qmin, ", ", qmax, "]");
  TORCH_CHECK(dynamic || (static_zero >= qmin && static_zero <= qmax), "static zero point ", static_zero,
              " outside [", qmin, ", ", qmax, "]");
  return {dynamic,
          symmetric,
          qmin,
          qmax,
          static_cast<float>(divisor),
          static_cast<float>(eps),
          scale_dtype,
          static_cast<float>(static_scale),
          static_zero};
}

// x [M, K] float32 -> (d = q - z int16 [M, K], scale float32 [M], zero int32 [M]).
std::vector<at::Tensor> quantize_rows_impl(const at::Tensor& x, const ActivationParams& p) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "x must be a contiguous 2-D float32 tensor, got ", x.scalar_type(), " of shape ", x.sizes());
  TORCH_CHECK(x.size(1) > 0, "x has no features");
  const int64_t M = x.size(0), K = x.size(1);
  at::Tensor d = at::empty({M, K}, x.options().dtype(at::kShort));
  at::Tensor scale = at::empty({M}, x.options());
  at::Tensor zero = at::empty({M}, x.options().dtype(at::kInt));
  const float* xp = x.data_ptr<float>();
  int16_t* dp = d.data_ptr<int16_t>();
  float* sp = scale.data_ptr<float>();
  int32_t* zp = zero.data_ptr<int32_t>();
  at::parallel_for(0, M, std::max<int64_t>(1, 32768 / K), [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) quantize_row(xp + m * K, K, p, dp + m * K, sp + m, zp + m);
  });
  return {d, scale, zero};
}

}  // namespace

std::vector<at::Tensor> quantize_rows(const at::Tensor& x, bool dynamic, bool symmetric, int64_t qmin, int64_t qmax,
                                      double divisor, double eps, int64_t scale_dtype, double static_scale,
                                      int64_t static_zero) {
  return quantize_rows_impl(
      x, make_params(dynamic, symmetric, qmin, qmax, divisor, eps, scale_dtype, static_scale, static_zero));
}

// int32 accumulators sum_k d[m, k] * w[n, k] of int16 d [M, K] and int8 w [N, K].
at::Tensor accumulators(const at::Tensor& d, const at::Tensor& weight) {
  TORCH_CHECK(d.dim() == 2 && d.scalar_type() == at::kShort && d.is_contiguous(),
              "d must be a contiguous 2-D int16 tensor, got ", d.scalar_type(), " of shape ", d.sizes());
  const int64_t M = d.size(0), K = d.size(1), N = weight.size(0);
  check_weight(weight, K);
  at::Tensor out = at::empty({M, N}, d.options().dtype(at::kInt));
  int32_t* op = out.data_ptr<int32_t>();
  gemm(d.data_ptr<int16_t>(), M, K, weight.data_ptr<int8_t>(), N,
       [op, N](int64_t m, int64_t n, int32_t acc) { op[m * N + n] = acc; });
  return out;
}

// y [M, N] = float(acc) * x_scale[m] * row_scale[n], the float ops of int8_int_mm in its order.
at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& row_scale, bool dynamic,
                  bool symmetric, int64_t qmin, int64_t qmax, double divisor, double eps, int64_t scale_dtype,
                  double static_scale, int64_t static_zero) {
  const ActivationParams p =
      make_params(dynamic, symmetric, qmin, qmax, divisor, eps, scale_dtype, static_scale, static_zero);
  const std::vector<at::Tensor> q = quantize_rows_impl(x, p);
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  check_weight(weight, K);
  TORCH_CHECK(row_scale.dim() == 1 && row_scale.size(0) == N && row_scale.scalar_type() == at::kFloat &&
                  row_scale.is_contiguous(),
              "row_scale must be a contiguous float32 vector of ", N, " scales, got ", row_scale.scalar_type(),
              " of shape ", row_scale.sizes());
  at::Tensor y = at::empty({M, N}, x.options());
  float* yp = y.data_ptr<float>();
  const float* xs = q[1].data_ptr<float>();
  const float* rs = row_scale.data_ptr<float>();
  gemm(q[0].data_ptr<int16_t>(), M, K, weight.data_ptr<int8_t>(), N, [=](int64_t m, int64_t n, int32_t acc) {
    yp[m * N + n] = static_cast<float>(acc) * xs[m] * rs[n];
  });
  return y;
}

std::string isa() {
#ifdef __AVX2__
  return "AVX2";
#else
  return "scalar";
#endif
}

// quantize_rows: x -> (q - z as int16, scale float32 per row, zero int32 per row);
// accumulators: int32 sum_k d[m,k] w[n,k] of int16 d and int8 w;
// linear: W8A8 linear: quantize x, integer GEMM, scale to float32.
TORCH_LIBRARY(TORCH_EXTENSION_NAME, m) {
  m.def(
      "quantize_rows(Tensor x, bool dynamic, bool symmetric, int qmin, int qmax, float divisor, float eps, "
      "int scale_dtype, float static_scale, int static_zero) -> Tensor[]",
      quantize_rows);
  m.def("accumulators(Tensor d, Tensor weight) -> Tensor", accumulators);
  m.def(
      "linear(Tensor x, Tensor weight, Tensor row_scale, bool dynamic, bool symmetric, int qmin, int qmax, "
      "float divisor, float eps, int scale_dtype, float static_scale, int static_zero) -> Tensor");
  m.def("isa() -> str", isa);
}

// A CPU kernel, not a composite: torch.compile traces it through the fake that
// pipeline/quant/kernels/cpp.py registers.
TORCH_LIBRARY_IMPL(TORCH_EXTENSION_NAME, CPU, m) { m.impl("linear", linear); }
