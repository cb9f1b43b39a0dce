// GPTQ's column sweep on the CPU: the inner loop of pipeline/algorithms/gptq.py::_sweep.
//
// Within one lazy block of columns, each column is rounded onto its grid and its rounding error is
// fed back into the block's columns not yet quantized: w[r, i:] -= e[r] * hinv[i, i:]. The loop is
// sequential over columns but independent over rows (each row only ever reads its own error), so
// rows are split across torch's threads and each thread sweeps its rows through every column.
// In Python the same loop costs ~20 small torch ops per column; here a column costs rows x
// (remaining block columns) multiply-subtracts.
//
// It reproduces the Python loop operation by operation in float32: x / s (+ z), round half to even
// (nearbyint under the default rounding mode, like torch.round), clamp, (q - z) * s, the division
// by hinv[i, i], then the product e * h rounded before the subtraction. Built with
// -ffp-contract=off so that no multiply-add is fused behind our back: the codes are bit-identical.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

namespace {

void check_block(const torch::Tensor& t, const char* name, int64_t rows, int64_t cols) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32 && t.is_contiguous(), name,
              " must be a contiguous float32 CPU tensor");
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, name, " must have shape (", rows, ", ",
              cols, "), got ", t.sizes());
}

}  // namespace

// Columns [start, stop) of one lazy block, in place: w (rows, n) the block's weights, updated;
// hinv (n, n) the block's part of the upper Cholesky factor of H^-1; scale, zero (rows, n) each
// column's qparams (zero absent: symmetric); codes and err (rows, n) written for these columns.
void sweep_columns(torch::Tensor w, const torch::Tensor& hinv, const torch::Tensor& scale,
                   const c10::optional<torch::Tensor>& zero, torch::Tensor codes, torch::Tensor err, int64_t start,
                   int64_t stop, double qmin, double qmax) {
  const int64_t rows = w.size(0), n = w.size(1);
  check_block(w, "w", rows, n);
  check_block(hinv, "hinv", n, n);
  check_block(scale, "scale", rows, n);
  check_block(codes, "codes", rows, n);
  check_block(err, "err", rows, n);
  const bool has_zero = zero.has_value();
  if (has_zero) check_block(*zero, "zero", rows, n);
  TORCH_CHECK(0 <= start && start <= stop && stop <= n, "columns [", start, ", ", stop, ") outside 0..", n);
  float* wp = w.data_ptr<float>();
  const float* hp = hinv.data_ptr<float>();
  const float* sp = scale.data_ptr<float>();
  const float* zp = has_zero ? zero->data_ptr<float>() : nullptr;
  float* cp = codes.data_ptr<float>();
  float* ep = err.data_ptr<float>();
  const float lo = static_cast<float>(qmin), hi = static_cast<float>(qmax);
  // a row costs ~n^2/2 multiply-subtracts per block: a few rows are enough work per thread
  at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      float* wr = wp + r * n;
      for (int64_t i = start; i < stop; ++i) {
        const int64_t at = r * n + i;
        float x = wr[i] / sp[at];
        if (has_zero) x = x + zp[at];
        float q = std::min(std::max(std::nearbyint(x), lo), hi);
        cp[at] = q;
        if (has_zero) q = q - zp[at];
        const float e = (wr[i] - q * sp[at]) / hp[i * n + i];
        const float* hi_row = hp + i * n;
        for (int64_t c = i; c < n; ++c) {
          const float step = e * hi_row[c];
          wr[c] = wr[c] - step;
        }
        ep[at] = e;
      }
    }
  });
}

std::string isa() {
#ifdef __AVX2__
  return "AVX2";
#else
  return "scalar";
#endif
}

TORCH_LIBRARY(TORCH_EXTENSION_NAME, m) {
  m.def(
      "sweep_columns(Tensor(a!) w, Tensor hinv, Tensor scale, Tensor? zero, Tensor(b!) codes, Tensor(c!) err, "
      "int start, int stop, float qmin, float qmax) -> ()");
  m.def("isa() -> str", isa);
}

TORCH_LIBRARY_IMPL(TORCH_EXTENSION_NAME, CPU, m) { m.impl("sweep_columns", sweep_columns); }
