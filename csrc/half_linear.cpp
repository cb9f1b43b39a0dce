// y = x @ w.T with w stored in 16 bits (bfloat16 or float16) and x, y in float32: the matmul of a
// layer kept in 16 bits. Each weight is widened to fp32 in registers, never in memory, so a decode
// step reads 2 bytes per weight; torch's own bf16 matmul on CPUs without AVX-512 BF16 runs slower
// than fp32. Accumulation is fp32, as F.linear on the widened weight.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <cstdint>
#include <cstring>

#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kRows = 8;  // rows of x that share each loaded weight vector

inline float widen(uint16_t h, bool bf16) {
  if (bf16) {
    uint32_t bits = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
  }
  return static_cast<float>(c10::Half(h, c10::Half::from_bits()));
}

#ifdef __AVX2__
inline __m256 load8(const uint16_t* p, bool bf16) {
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  if (bf16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  return _mm256_cvtph_ps(h);
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

// rows [m0, m0 + rows) of x against weight row n
void dot_rows(const float* x, const uint16_t* w, float* y, int64_t m0, int64_t rows, int64_t n, int64_t N,
              int64_t K, bool bf16) {
  float acc[kRows] = {};
  int64_t k = 0;
#ifdef __AVX2__
  __m256 v[kRows];
  for (int64_t r = 0; r < kRows; ++r) v[r] = _mm256_setzero_ps();
  for (; k + 8 <= K; k += 8) {
    __m256 wv = load8(w + k, bf16);
    for (int64_t r = 0; r < rows; ++r) v[r] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + (m0 + r) * K + k), v[r]);
  }
  for (int64_t r = 0; r < rows; ++r) acc[r] = hsum(v[r]);
#endif
  for (; k < K; ++k) {
    float wk = widen(w[k], bf16);
    for (int64_t r = 0; r < rows; ++r) acc[r] += wk * x[(m0 + r) * K + k];
  }
  for (int64_t r = 0; r < rows; ++r) y[(m0 + r) * N + n] = acc[r];
}

torch::Tensor half_linear(const torch::Tensor& x, const torch::Tensor& weight) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2, "half_linear: x and weight must be 2-D");
  TORCH_CHECK(x.scalar_type() == torch::kFloat32, "half_linear: x must be float32");
  TORCH_CHECK(weight.scalar_type() == torch::kBFloat16 || weight.scalar_type() == torch::kFloat16,
              "half_linear: weight must be bfloat16 or float16");
  TORCH_CHECK(x.size(1) == weight.size(1), "half_linear: x has ", x.size(1), " features, weight ", weight.size(1));
  auto xc = x.contiguous();
  auto wc = weight.contiguous();
  const int64_t M = xc.size(0), K = xc.size(1), N = wc.size(0);
  const bool bf16 = wc.scalar_type() == torch::kBFloat16;
  auto y = torch::empty({M, N}, xc.options());
  const float* xp = xc.data_ptr<float>();
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(wc.data_ptr());
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      for (int64_t m0 = 0; m0 < M; m0 += kRows) {
        dot_rows(xp, wp + n * K, yp, m0, std::min(kRows, M - m0), n, N, K, bf16);
      }
    }
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

}  // namespace

TORCH_LIBRARY(TORCH_EXTENSION_NAME, m) {
  m.def("linear(Tensor x, Tensor weight) -> Tensor");
  m.def("isa() -> str", isa);
}

// A CPU kernel, not a composite: torch.compile traces it through the fake that
// pipeline/quant/kernels/cpp.py registers.
TORCH_LIBRARY_IMPL(TORCH_EXTENSION_NAME, CPU, m) { m.impl("linear", half_linear); }
