// Fused weight-only low-bit linear for CPU: y = x @ W.T straight from the packed bit stream.
//
// The weight is the canonical stored form of pipeline/quant/packing.py: a flat little-endian bit
// stream of unsigned b-bit codes, code i = W[n, k] (row-major) at bits [i*b, (i+1)*b). With K a
// multiple of 8 every row starts on a byte and every run of 8 codes is exactly b bytes, so the
// kernel decodes runs of codes straight from the bytes, never repacking them.
//
//   W[n, k] = (u[n, k] - z[n, j]) * s[n, j],  j = k / g
//   y[m, n] = sum_j s[n, j] * acc[m, n, j] - sum_j s[n, j] z[n, j] xsum[m, j],
//   acc[m, n, j] = sum_{k in group j} u[n, k] * x[m, k],  xsum[m, j] = sum_{k in group j} x[m, k]
//
// Two paths: for few rows of x (decode, < kTileGemmMinRows) a register-blocked GEMV/GEMM that
// decodes each run of codes once and multiplies it into up to 4 rows of x; for many rows
// (prefill) a tile of weight rows is dequantized into a small fp32 buffer (cache-resident) and
// multiplied with at::mm, so the decode is amortized over all rows and the multiply runs at BLAS
// speed. Products and sums are fp32 throughout (bf16 x is widened first).
//
// The fast path needs AVX2 + FMA (compiled with -march=native); elsewhere a plain scalar path
// computes the same thing.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define LOWBIT_AVX2 1
#endif

// Loops of constant trip count over the register tile: unrolled early, so that GCC keeps the
// accumulator arrays in registers (otherwise they live in memory, stored on every update).
#define UNROLL _Pragma("GCC unroll 16")

namespace {

// The rows of x from which the prefill path (dequantized tile + at::mm) beats the register-blocked
// one: measured at 1536x576, 4-bit g64, one thread (register / tile µs): 8 rows 395 / 596,
// 16 rows 794 / 842, 24 rows 1212 / 1113, 32 rows 1865 / 1372.
constexpr int64_t kTileGemmMinRows = 24;
// Dequantized weight tile of the prefill path, in floats: 512 KiB, about the size of L2.
constexpr int64_t kTileFloats = 128 * 1024;
// How far ahead of the codes being decoded the register-blocked path prefetches.
constexpr int64_t kPrefetchBytes = 512;

struct Problem {
  const float* x;          // [M, K]
  const uint8_t* packed;   // [N * K * bits / 8]
  const float* scale;      // [N, G]
  const float* zero;       // [N, G]
  const float* xsum;       // [M, G]
  float* y;                // [M, N]
  int64_t M, N, K, g, G, row_bytes;
  // Loads can run up to 4 bytes past a run of codes (a 4-byte load of a 2-byte 2-bit chunk, the
  // 28-byte read of a 24-byte 3-bit span): the last row is read from this copy with padding, so
  // no load passes the end of `packed`.
  const uint8_t* last_row;

  const uint8_t* row(int64_t n) const { return n == N - 1 ? last_row : packed + n * row_bytes; }
};

// ---------------------------------------------------------------------------------------------
// Scalar path (any CPU): also the reference for the decode of one code.
template <int B>
inline uint32_t code_at(const uint8_t* row, int64_t k) {
  if constexpr (B == 8) {
    return row[k];
  } else {
    const int64_t bit = k * B;
    const int64_t byte = bit >> 3;
    const int shift = static_cast<int>(bit & 7);
    uint32_t window = row[byte];
    if (shift + B > 8) window |= static_cast<uint32_t>(row[byte + 1]) << 8;  // 3-bit codes straddle bytes
    return (window >> shift) & ((1u << B) - 1);
  }
}

template <int B>
void rows_scalar(const Problem& p, int64_t n_begin, int64_t n_end) {
  for (int64_t n = n_begin; n < n_end; ++n) {
    const uint8_t* w = p.row(n);
    for (int64_t m = 0; m < p.M; ++m) {
      const float* x = p.x + m * p.K;
      float y = 0.f;
      for (int64_t j = 0; j < p.G; ++j) {
        float acc = 0.f;
        for (int64_t k = j * p.g; k < (j + 1) * p.g; ++k) acc += static_cast<float>(code_at<B>(w, k)) * x[k];
        const float s = p.scale[n * p.G + j], z = p.zero[n * p.G + j];
        y += s * (acc - z * p.xsum[m * p.G + j]);
      }
      p.y[m * p.N + n] = y;
    }
  }
}

template <int B>
void dequant_rows_scalar(const Problem& p, int64_t n_begin, int64_t n_end, float* out) {
  for (int64_t n = n_begin; n < n_end; ++n) {
    const uint8_t* w = p.row(n);
    float* o = out + (n - n_begin) * p.K;
    for (int64_t k = 0; k < p.K; ++k) {
      const int64_t j = k / p.g;
      o[k] = (static_cast<float>(code_at<B>(w, k)) - p.zero[n * p.G + j]) * p.scale[n * p.G + j];
    }
  }
}

#ifdef LOWBIT_AVX2
// ---------------------------------------------------------------------------------------------
// AVX2 path.

// Codes c0..c7 of the 8-code chunk that starts at `p` (b bytes), as floats.
template <int B>
inline __m256 decode8(const uint8_t* p) {
  if constexpr (B == 8) {
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  } else {
    uint32_t word;
    std::memcpy(&word, p, 4);  // b <= 4 bytes hold the 8 codes; the rest is ignored
    const __m256i shifts = _mm256_setr_epi32(0, B, 2 * B, 3 * B, 4 * B, 5 * B, 6 * B, 7 * B);
    const __m256i codes = _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(word)), shifts);
    return _mm256_cvtepi32_ps(_mm256_and_si256(codes, _mm256_set1_epi32((1 << B) - 1)));
  }
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// How the register-blocked path reads one run of codes ("span") and the x it multiplies.
// Natural span: 8 codes in natural order (decode8), x as it is.
template <int B>
struct NaturalSpan {
  static constexpr int codes = 8, vectors = 1;
  static inline void decode(const uint8_t* p, __m256* u) { u[0] = decode8<B>(p); }
};

// Wide span (2, 3 and 4 bits): each of the 8 lanes holds V consecutive codes straight from the
// bytes, and vector t keeps field t of every lane, masked in place: lane i of
// vector t is code[V i + t] * 2^(b t). No shift per field: x is laid out to match (interleave_x)
// and prescaled by 2^-(b t), which is exact, so the products are the same fp32 numbers as code * x.
// 2 bits: a byte per lane (vpmovzxbd), V = 4; 4 bits: likewise, V = 2; 3 bits: 3 bytes per lane
// (vpshufb), V = 8. Per 8 codes that is an AND and a conversion, against a broadcast, a variable
// shift, an AND and a conversion for 8-code spans.
template <int B>
struct WideSpan {
  static_assert(B == 2 || B == 4, "2 and 4 bits: one byte per lane");
  static constexpr int vectors = 8 / B, codes = 8 * vectors;
  static inline void decode(const uint8_t* p, __m256* u) {
    const __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    UNROLL for (int t = 0; t < vectors; ++t)
      u[t] = _mm256_cvtepi32_ps(_mm256_and_si256(bytes, _mm256_set1_epi32(((1 << B) - 1) << (B * t))));
  }
};

template <>
struct WideSpan<3> {
  static constexpr int vectors = 8, codes = 64;  // 24 bytes; the loads read 28 (4 past the span)
  static inline void decode(const uint8_t* p, __m256* u) {
    const __m256i raw = _mm256_inserti128_si256(
        _mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))),
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 12)), 1);
    // bytes 3i..3i+2 of each 128-bit half into dword i (the high half starts at byte 12)
    const __m256i spread = _mm256_setr_epi8(0, 1, 2, -1, 3, 4, 5, -1, 6, 7, 8, -1, 9, 10, 11, -1,  //
                                            0, 1, 2, -1, 3, 4, 5, -1, 6, 7, 8, -1, 9, 10, 11, -1);
    const __m256i words = _mm256_shuffle_epi8(raw, spread);
    UNROLL for (int t = 0; t < vectors; ++t)
      u[t] = _mm256_cvtepi32_ps(_mm256_and_si256(words, _mm256_set1_epi32(7 << (3 * t))));
  }
};

// MR rows of x (from m0) times NR rows of W (from n0); each span is decoded once per weight row.
// MR >= 2: the decoded codes are multiplied by their group's scale (s u: exact for fp16-born
// scales and b <= 8) and then into MR accumulators that run over the whole row, so the groups
// cost one multiply per decoded vector and no register, which leaves 8 independent accumulator
// chains per tile. MR = 1: sums of u x per group, scaled once per group (the conversion to float
// is the bottleneck there, and a multiply per vector would compete with the FMAs).
// The zero points come in once per row at the end: y = sum_k s u x - sum_j s z xsum_j.
template <int B, class Span, int MR, int NR>
void tile_avx2(const Problem& p, const float* xs, int64_t m0, int64_t n0) {
  const uint8_t* w[NR];
  const float* scale[NR];
  UNROLL for (int r = 0; r < NR; ++r) w[r] = p.row(n0 + r), scale[r] = p.scale + (n0 + r) * p.G;
  const float* x[MR];
  UNROLL for (int i = 0; i < MR; ++i) x[i] = xs + (m0 + i) * p.K;
  const int64_t groups = p.G;
  __m256 acc[MR][NR];
  UNROLL for (int i = 0; i < MR; ++i)
    UNROLL for (int r = 0; r < NR; ++r) acc[i][r] = _mm256_setzero_ps();
  const int64_t spans = p.g / Span::codes;
  // Prefetch once per cache line of codes: every group, or every (64 / group bytes) groups (a mask).
  const int64_t group_bytes = p.g * B / 8;
  const int64_t code_prefetch_every = group_bytes >= 64 ? 0 : (int64_t{64} / group_bytes) - 1;
  for (int64_t j = 0; j < groups; ++j) {
    const int64_t k0 = j * p.g;
    // Each tile reads NR rows side by side, more streams than the hardware prefetchers follow:
    // ask for the codes (and scales) a few cache lines ahead.
    if ((j & code_prefetch_every) == 0) {
      UNROLL for (int r = 0; r < NR; ++r)
        _mm_prefetch(reinterpret_cast<const char*>(w[r] + k0 * B / 8 + kPrefetchBytes), _MM_HINT_T0);
    }
    if ((j & 15) == 0) {  // 16 float scales to a cache line
      UNROLL for (int r = 0; r < NR; ++r)
        _mm_prefetch(reinterpret_cast<const char*>(scale[r] + j + kPrefetchBytes / 4), _MM_HINT_T0);
    }
    if constexpr (MR == 1) {
      // One row of x: the decode (int -> float conversion) is the bottleneck, not the registers,
      // so sum u x per group and scale once per group (saves a multiply per decoded vector).
      // Two sums per row when a span has 4 vectors (2 bits), so that no chain runs 4 FMAs deep.
      constexpr int chains = Span::vectors >= 4 ? 2 : 1;
      __m256 group_acc[chains][NR];
      UNROLL for (int h = 0; h < chains; ++h)
        UNROLL for (int r = 0; r < NR; ++r) group_acc[h][r] = _mm256_setzero_ps();
      for (int64_t c = 0; c < spans; ++c) {
        const int64_t k = k0 + Span::codes * c;
        UNROLL for (int r = 0; r < NR; ++r) {
          __m256 u[Span::vectors];
          Span::decode(w[r] + k * B / 8, u);
          UNROLL for (int t = 0; t < Span::vectors; ++t)
            group_acc[t % chains][r] =
                _mm256_fmadd_ps(u[t], _mm256_loadu_ps(x[0] + k + 8 * t), group_acc[t % chains][r]);
        }
      }
      UNROLL for (int r = 0; r < NR; ++r) {
        __m256 sum = group_acc[0][r];
        if constexpr (chains == 2) sum = _mm256_add_ps(sum, group_acc[1][r]);
        acc[0][r] = _mm256_fmadd_ps(_mm256_broadcast_ss(scale[r] + j), sum, acc[0][r]);
      }
    } else {
      for (int64_t c = 0; c < spans; ++c) {
        const int64_t k = k0 + Span::codes * c;
        UNROLL for (int r = 0; r < NR; ++r) {
          __m256 u[Span::vectors];
          Span::decode(w[r] + k * B / 8, u);
          const __m256 s = _mm256_broadcast_ss(scale[r] + j);
          UNROLL for (int t = 0; t < Span::vectors; ++t) {
            const __m256 su = _mm256_mul_ps(u[t], s);
            UNROLL for (int i = 0; i < MR; ++i)
              acc[i][r] = _mm256_fmadd_ps(su, _mm256_loadu_ps(x[i] + k + 8 * t), acc[i][r]);
          }
        }
      }
    }
  }
  // Reduce the accumulators in a loop of constant bounds (fully unrolled): indexing them from the
  // loops below, which hold a loop of runtime length, would keep them in memory all along.
  float dot[MR][NR];
  UNROLL for (int i = 0; i < MR; ++i)
    UNROLL for (int r = 0; r < NR; ++r) dot[i][r] = hsum(acc[i][r]);
  UNROLL for (int r = 0; r < NR; ++r) {
    const float* s = p.scale + (n0 + r) * p.G;
    const float* z = p.zero + (n0 + r) * p.G;
    UNROLL for (int i = 0; i < MR; ++i) {
      const float* xsum = p.xsum + (m0 + i) * p.G;
      __m256 corr = _mm256_setzero_ps();
      int64_t j = 0;
      for (; j + 8 <= p.G; j += 8)
        corr = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_loadu_ps(s + j), _mm256_loadu_ps(z + j)), _mm256_loadu_ps(xsum + j),
                               corr);
      float correction = hsum(corr);
      for (; j < p.G; ++j) correction += s[j] * z[j] * xsum[j];
      p.y[(m0 + i) * p.N + n0 + r] = dot[i][r] - correction;
    }
  }
}

constexpr int64_t kRowBlock = 8;  // weight rows per block: the tiles below cover 8 rows each

// All rows of x for weight rows [n0, n0 + 8): tiles of 4, 2 and 1 rows of x, 8 accumulators each.
template <int B, class Span>
void rows_block_avx2(const Problem& p, const float* xs, int64_t n0) {
  int64_t m = 0;
  for (; m + 4 <= p.M; m += 4)
    for (int64_t r = 0; r < kRowBlock; r += 2) tile_avx2<B, Span, 4, 2>(p, xs, m, n0 + r);
  for (; m + 2 <= p.M; m += 2)
    for (int64_t r = 0; r < kRowBlock; r += 4) tile_avx2<B, Span, 2, 4>(p, xs, m, n0 + r);
  for (; m < p.M; ++m)
    for (int64_t r = 0; r < kRowBlock; r += 4) tile_avx2<B, Span, 1, 4>(p, xs, m, n0 + r);
}

// The last N % 8 weight rows, one at a time.
template <int B, class Span>
void rows_tail_avx2(const Problem& p, const float* xs, int64_t n) {
  int64_t m = 0;
  for (; m + 4 <= p.M; m += 4) tile_avx2<B, Span, 4, 1>(p, xs, m, n);
  for (; m < p.M; ++m) tile_avx2<B, Span, 1, 1>(p, xs, m, n);
}

template <int B, class Span>
void rows_avx2(const Problem& p, const float* xs, int64_t n_begin, int64_t n_end) {
  int64_t n = n_begin;
  for (; n + kRowBlock <= n_end; n += kRowBlock) rows_block_avx2<B, Span>(p, xs, n);
  for (; n < n_end; ++n) rows_tail_avx2<B, Span>(p, xs, n);
}

// x in the lane order of WideSpan<B>, field t prescaled by 2^-(B t) (exact: a power of two).
template <int B>
void interleave_x(const Problem& p, float* out) {
  constexpr int per_lane = WideSpan<B>::vectors, span = WideSpan<B>::codes;
  for (int64_t m = 0; m < p.M; ++m)
    for (int64_t k0 = 0; k0 < p.K; k0 += span)
      for (int t = 0; t < per_lane; ++t)
        for (int i = 0; i < 8; ++i)
          out[m * p.K + k0 + 8 * t + i] = std::ldexp(p.x[m * p.K + k0 + per_lane * i + t], -B * t);
}

template <int B>
void dequant_rows_avx2(const Problem& p, int64_t n_begin, int64_t n_end, float* out) {
  for (int64_t n = n_begin; n < n_end; ++n) {
    const uint8_t* w = p.row(n);
    float* o = out + (n - n_begin) * p.K;
    for (int64_t j = 0; j < p.G; ++j) {
      const __m256 s = _mm256_set1_ps(p.scale[n * p.G + j]);
      const __m256 z = _mm256_set1_ps(p.zero[n * p.G + j]);
      for (int64_t k = j * p.g; k < (j + 1) * p.g; k += 8)
        _mm256_storeu_ps(o + k, _mm256_mul_ps(_mm256_sub_ps(decode8<B>(w + (k / 8) * B), z), s));
    }
  }
}
#endif  // LOWBIT_AVX2

template <int B>
void rows(const Problem& p, const float* xs, bool wide, int64_t n_begin, int64_t n_end) {
#ifdef LOWBIT_AVX2
  if constexpr (B != 8) {
    if (wide) return rows_avx2<B, WideSpan<B>>(p, xs, n_begin, n_end);
  }
  rows_avx2<B, NaturalSpan<B>>(p, xs, n_begin, n_end);
#else
  rows_scalar<B>(p, n_begin, n_end);
#endif
}

template <int B>
void dequant_rows(const Problem& p, int64_t n_begin, int64_t n_end, float* out) {
#ifdef LOWBIT_AVX2
  dequant_rows_avx2<B>(p, n_begin, n_end, out);
#else
  dequant_rows_scalar<B>(p, n_begin, n_end, out);
#endif
}

template <int B>
void run_register_blocked(const Problem& p) {
  const float* xs = p.x;
  std::vector<float> interleaved;
  bool wide = false;
#ifdef LOWBIT_AVX2
  if constexpr (B != 8) {
    wide = p.g % WideSpan<B>::codes == 0;  // a span must not cross a group
    if (wide) {
      interleaved.resize(p.M * p.K);
      interleave_x<B>(p, interleaved.data());
      xs = interleaved.data();
    }
  }
#endif
  // Whole blocks of 8 weight rows inside each thread's range.
  const int64_t blocks = (p.N + 7) / 8;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    rows<B>(p, xs, wide, begin * 8, std::min(end * 8, p.N));
  });
}

template <int B>
void run_tiled_gemm(const Problem& p, const at::Tensor& x, at::Tensor& y) {
  const int64_t tile_rows = std::max<int64_t>(16, std::min<int64_t>(p.N, kTileFloats / p.K));
  at::Tensor tile = at::empty({tile_rows, p.K}, x.options());
  for (int64_t n0 = 0; n0 < p.N; n0 += tile_rows) {
    const int64_t rows_here = std::min(tile_rows, p.N - n0);
    float* out = tile.data_ptr<float>();
    at::parallel_for(0, rows_here, 1, [&](int64_t begin, int64_t end) {
      dequant_rows<B>(p, n0 + begin, n0 + end, out + begin * p.K);
    });
    at::Tensor y_cols = y.narrow(1, n0, rows_here);
    at::mm_out(y_cols, x, tile.narrow(0, 0, rows_here).t());
  }
}

template <int B>
void dispatch(const Problem& p, const at::Tensor& x, at::Tensor& y) {
  if (p.M >= kTileGemmMinRows) {
    run_tiled_gemm<B>(p, x, y);
  } else {
    run_register_blocked<B>(p);
  }
}

at::Tensor lowbit_linear(const at::Tensor& x_in, const at::Tensor& packed, int64_t bits, int64_t n, int64_t k,
                         int64_t group, const at::Tensor& scale, const at::Tensor& zero) {
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4 || bits == 8, "lowbit_linear: bits must be 2, 3, 4 or 8, got ",
              bits);
  TORCH_CHECK(k > 0 && k % 8 == 0, "lowbit_linear: in_features must be a positive multiple of 8, got ", k);
  TORCH_CHECK(n > 0, "lowbit_linear: out_features must be positive, got ", n);
  TORCH_CHECK(group > 0 && group % 8 == 0 && k % group == 0,
              "lowbit_linear: group must be a multiple of 8 that divides in_features ", k, ", got ", group);
  TORCH_CHECK(x_in.device().is_cpu() && packed.device().is_cpu(), "lowbit_linear: CPU tensors only");
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) == k, "lowbit_linear: x must be (rows, ", k, "), got ",
              x_in.sizes());
  TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kBFloat16,
              "lowbit_linear: x must be float32 or bfloat16, got ", x_in.scalar_type());
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() && packed.numel() == n * k * bits / 8,
              "lowbit_linear: packed must be contiguous uint8 with ", n * k * bits / 8, " bytes, got ",
              packed.scalar_type(), " with ", packed.numel());
  const int64_t groups = k / group;
  for (const at::Tensor* t : {&scale, &zero}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 2 && t->size(0) == n &&
                    t->size(1) == groups,
                "lowbit_linear: scale and zero must be contiguous float32 (", n, ", ", groups, "), got ",
                t->scalar_type(), " ", t->sizes());
  }
  // bf16 activations are widened once per call; every product is then accumulated in fp32.
  // Detached: the op has no derivative (inference kernel), and the prefill path's at::mm_out
  // refuses inputs that require grad.
  const at::Tensor x = x_in.detach().to(at::kFloat).contiguous();
  const int64_t m = x.size(0);
  at::Tensor y = at::empty({m, n}, x.options());
  if (m == 0) return y;
  std::vector<float> xsum(m * groups, 0.f);
  const float* xp = x.data_ptr<float>();
  for (int64_t i = 0; i < m * groups; ++i)
    for (int64_t c = 0; c < group; ++c) xsum[i] += xp[i * group + c];
  const int64_t row_bytes = k * bits / 8;
  std::vector<uint8_t> last_row(row_bytes + 4, 0);  // reads run at most 4 bytes past a span
  std::memcpy(last_row.data(), packed.data_ptr<uint8_t>() + (n - 1) * row_bytes, row_bytes);
  const Problem p{x.data_ptr<float>(), packed.data_ptr<uint8_t>(), scale.data_ptr<float>(), zero.data_ptr<float>(),
                  xsum.data(), y.data_ptr<float>(), m, n, k, group, groups, row_bytes, last_row.data()};
  switch (bits) {
    case 2: dispatch<2>(p, x, y); break;
    case 3: dispatch<3>(p, x, y); break;
    case 4: dispatch<4>(p, x, y); break;
    default: dispatch<8>(p, x, y); break;
  }
  return y;
}

std::string lowbit_isa() {
#ifdef LOWBIT_AVX2
  return "AVX2+FMA";
#else
  return "scalar";
#endif
}

}  // namespace

TORCH_LIBRARY(TORCH_EXTENSION_NAME, m) {
  m.def("linear(Tensor x, Tensor packed, int bits, int n, int k, int group, Tensor scale, Tensor zero) -> Tensor");
  m.def("isa() -> str", &lowbit_isa);
}

TORCH_LIBRARY_IMPL(TORCH_EXTENSION_NAME, CPU, m) { m.impl("linear", &lowbit_linear); }
