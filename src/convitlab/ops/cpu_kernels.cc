// float32 CPU kernels, forward and backward, as Paddle custom operators (compiled on first use
// by cpu_kernels.py): GELU (exact, erf form), LayerNorm over the last axis, softmax, and the
// re-layouts of attention's heads (GPSA's gated mix folded into the last).
// Paddle's own CPU kernels for these run on one thread; these split the rows
// between `threads` OpenMP threads and let the compiler vectorise each row (expf through
// glibc's vector math library, libmvec; erf inlined, see Erf).
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "paddle/extension.h"

// The vector variant of expf in libmvec: declared so the loops below vectorise without
// -ffast-math (which would also change the rounding of the sums).
#pragma omp declare simd notinbranch
extern "C" float expf(float) noexcept;

namespace {

constexpr int64_t kMinPerThread = 1 << 15;  // below this many elements a thread costs more than it saves

int Threads(int wanted, int64_t elements) {
  int64_t useful = elements / kMinPerThread;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(wanted, useful)));
}

void CheckCpuFloat(const paddle::Tensor& t, const char* name) {
  PD_CHECK(t.is_cpu(), name, " must be on the CPU");
  PD_CHECK(t.dtype() == paddle::DataType::FLOAT32, name, " must be float32");
}

// Softmax and LayerNorm work on rows of the last axis: there must be one, and it must not be empty.
void CheckRows(const paddle::Tensor& x) {
  PD_CHECK(!x.shape().empty() && x.shape().back() > 0, "the last axis must exist and be non-empty");
}

// The head count divides a width: checked before any division by it (0 would end the process with SIGFPE).
void CheckHeads(int num_heads, int64_t width) {
  PD_CHECK(num_heads > 0, "num_heads must be positive, got ", num_heads);
  PD_CHECK(width < 0 || width % num_heads == 0, "the width ", width, " is not a multiple of num_heads ", num_heads);
}

constexpr float kSqrtHalf = 0.70710678118654752440f;
constexpr float kInvSqrt2Pi = 0.39894228040143267794f;  // 1 / sqrt(2 pi)

// No subnormal numbers out of exp: a product that meets subnormal operands runs many times slower
// (GPSA's positional maps at local init hold e^-338 at 224/16; their [4, 196, 196] x [4, 196, 1536]
// product took 9.8 ms instead of 1.6). Softmax clips its shifted scores at -64 as Paddle's CPU
// softmax does (so its smallest output, e^-64 / sum, stays normal after GPSA's gate multiplies it);
// GELU's density is written as 0 where exp would be subnormal (under 1.2e-38).
constexpr float kSoftmaxClip = -64.0f;
constexpr float kExpFloor = -87.0f;

// erf(z) = z P(z²) / Q(z²) for |z| <= 4 (erf(4) rounds to 1 in float32), the coefficients fitted by
// experiments/perf/fit_erf.py; within 4e-7 of erf in float32 (libmvec's erff: 1e-7), and 1.4x
// faster for the whole GELU forward pass on the Intel Xeon (12 multiply-adds and a division, inlined).
// The clamps are selects, no branch: the loops calling this vectorise on AVX2 as on AVX-512 as long
// as the build has -fno-trapping-math (cpu_kernels.py says why).
#pragma omp declare simd notinbranch
inline float Erf(float z) {
  const float c = std::min(std::max(z, -4.0f), 4.0f);
  const float u = c * c;
  float p = 1.914187610e-08f;
  p = p * u - 1.967644832e-06f;
  p = p * u + 1.519010137e-04f;
  p = p * u + 4.162460635e-03f;
  p = p * u + 5.204269067e-02f;
  p = p * u + 2.110246075e-01f;
  p = p * u + 1.128378866e+00f;
  float q = 1.064586661e-03f;
  q = q * u + 1.529583044e-02f;
  q = q * u + 1.195866807e-01f;
  q = q * u + 5.203449205e-01f;
  q = q * u + 1.0f;
  return std::min(std::max(c * p / q, -1.0f), 1.0f);
}

}  // namespace

std::vector<paddle::Tensor> GeluForward(const paddle::Tensor& x, int threads) {
  CheckCpuFloat(x, "x");
  auto out = paddle::empty(x.shape(), x.dtype(), x.place());
  const float* in = x.data<float>();
  float* o = out.data<float>();
  const int64_t n = x.numel();
#pragma omp parallel for simd schedule(static) num_threads(Threads(threads, n))
  for (int64_t i = 0; i < n; ++i) o[i] = 0.5f * in[i] * (1.0f + Erf(in[i] * kSqrtHalf));
  return {out};
}

// d/dx [x Phi(x)] = Phi(x) + x phi(x), Phi(x) = (1 + erf(x / sqrt 2)) / 2, phi the normal density.
std::vector<paddle::Tensor> GeluBackward(const paddle::Tensor& x, const paddle::Tensor& grad_out, int threads) {
  CheckCpuFloat(x, "x");
  CheckCpuFloat(grad_out, "grad_out");
  auto grad_x = paddle::empty(x.shape(), x.dtype(), x.place());
  const float* in = x.data<float>();
  const float* g = grad_out.data<float>();
  float* o = grad_x.data<float>();
  const int64_t n = x.numel();
#pragma omp parallel for simd schedule(static) num_threads(Threads(threads, n))
  for (int64_t i = 0; i < n; ++i) {
    const float v = in[i];
    const float cdf = 0.5f * (1.0f + Erf(v * kSqrtHalf));
    const float half_square = -0.5f * v * v;
    // exp on every lane (libmvec's vector expf), then 0 where it would be subnormal: no call under a branch
    const float density = kInvSqrt2Pi * expf(std::max(half_square, kExpFloor));
    const float pdf = half_square < kExpFloor ? 0.0f : density;
    o[i] = g[i] * (cdf + v * pdf);
  }
  return {grad_x};
}

// LayerNorm over the last axis: out = (x - mean) * rstd * weight + bias, rstd = 1/sqrt(var + eps)
// (biased variance). Mean and rstd are kept per row for the backward pass.
std::vector<paddle::Tensor> LayerNormForward(const paddle::Tensor& x, const paddle::Tensor& weight,
                                             const paddle::Tensor& bias, float epsilon, int threads) {
  CheckCpuFloat(x, "x");
  CheckRows(x);
  CheckCpuFloat(weight, "weight");
  CheckCpuFloat(bias, "bias");
  const int64_t cols = x.shape().back();
  const int64_t rows = x.numel() / cols;
  PD_CHECK(weight.numel() == cols && bias.numel() == cols, "weight and bias must have the last axis' size");
  auto out = paddle::empty(x.shape(), x.dtype(), x.place());
  auto mean = paddle::empty({rows}, x.dtype(), x.place());
  auto rstd = paddle::empty({rows}, x.dtype(), x.place());
  const float* in = x.data<float>();
  const float* w = weight.data<float>();
  const float* b = bias.data<float>();
  float* o = out.data<float>();
  float* mu = mean.data<float>();
  float* rs = rstd.data<float>();
  const float inv_cols = 1.0f / static_cast<float>(cols);
#pragma omp parallel for schedule(static) num_threads(Threads(threads, x.numel()))
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = in + r * cols;
    float* orow = o + r * cols;
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t c = 0; c < cols; ++c) sum += xr[c];
    const float m = sum * inv_cols;
    float sq = 0.0f;  // two passes: the variance of centred values, no cancellation
#pragma omp simd reduction(+ : sq)
    for (int64_t c = 0; c < cols; ++c) sq += (xr[c] - m) * (xr[c] - m);
    const float s = 1.0f / std::sqrt(sq * inv_cols + epsilon);
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) orow[c] = (xr[c] - m) * s * w[c] + b[c];
    mu[r] = m;
    rs[r] = s;
  }
  return {out, mean, rstd};
}

// With xhat = (x - mean) * rstd and g = grad_out * weight, per row:
//   grad_x = rstd * (g - mean(g) - xhat * mean(g * xhat)),
// and over rows: grad_weight = sum grad_out * xhat, grad_bias = sum grad_out (per-thread partial
// sums added in thread order, so the result does not depend on scheduling).
std::vector<paddle::Tensor> LayerNormBackward(const paddle::Tensor& x, const paddle::Tensor& weight,
                                              const paddle::Tensor& mean, const paddle::Tensor& rstd,
                                              const paddle::Tensor& grad_out, float epsilon, int threads) {
  CheckCpuFloat(grad_out, "grad_out");
  const int64_t cols = x.shape().back();
  const int64_t rows = x.numel() / cols;
  auto grad_x = paddle::empty(x.shape(), x.dtype(), x.place());
  auto grad_w = paddle::empty({cols}, x.dtype(), x.place());
  auto grad_b = paddle::empty({cols}, x.dtype(), x.place());
  const float* in = x.data<float>();
  const float* w = weight.data<float>();
  const float* mu = mean.data<float>();
  const float* rs = rstd.data<float>();
  const float* dy = grad_out.data<float>();
  float* dx = grad_x.data<float>();
  const int team = Threads(threads, x.numel());
  std::vector<float> partial(static_cast<size_t>(team) * 2 * cols, 0.0f);  // per thread: dw then db
  const float inv_cols = 1.0f / static_cast<float>(cols);
#pragma omp parallel num_threads(team)
  {
    float* pw = partial.data() + static_cast<size_t>(omp_get_thread_num()) * 2 * cols;
    float* pb = pw + cols;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const float* xr = in + r * cols;
      const float* dyr = dy + r * cols;
      float* dxr = dx + r * cols;
      const float m = mu[r], s = rs[r];
      float sum_g = 0.0f, sum_gx = 0.0f;
#pragma omp simd reduction(+ : sum_g, sum_gx)
      for (int64_t c = 0; c < cols; ++c) {
        const float xhat = (xr[c] - m) * s;
        const float g = dyr[c] * w[c];
        sum_g += g;
        sum_gx += g * xhat;
        pw[c] += dyr[c] * xhat;
        pb[c] += dyr[c];
      }
      const float mean_g = sum_g * inv_cols, mean_gx = sum_gx * inv_cols;
#pragma omp simd
      for (int64_t c = 0; c < cols; ++c) {
        const float xhat = (xr[c] - m) * s;
        dxr[c] = s * (dyr[c] * w[c] - mean_g - xhat * mean_gx);
      }
    }
  }
  float* gw = grad_w.data<float>();
  float* gb = grad_b.data<float>();
  for (int64_t c = 0; c < cols; ++c) {
    gw[c] = 0.0f;
    gb[c] = 0.0f;
  }
  for (int t = 0; t < team; ++t) {
    const float* pw = partial.data() + static_cast<size_t>(t) * 2 * cols;
    for (int64_t c = 0; c < cols; ++c) {
      gw[c] += pw[c];
      gb[c] += pw[cols + c];
    }
  }
  return {grad_x, grad_w, grad_b};
}

// Softmax over the last axis of scale * x (the attention scores' 1/sqrt(d) folded in):
// out = exp(scale x - max) / sum. Rows of attention are short (64-197), so threads take rows.
std::vector<paddle::Tensor> SoftmaxForward(const paddle::Tensor& x, float scale, int threads) {
  CheckCpuFloat(x, "x");
  CheckRows(x);
  const int64_t cols = x.shape().back();
  const int64_t rows = x.numel() / cols;
  auto out = paddle::empty(x.shape(), x.dtype(), x.place());
  const float* in = x.data<float>();
  float* o = out.data<float>();
#pragma omp parallel for schedule(static) num_threads(Threads(threads, x.numel()))
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = in + r * cols;
    float* orow = o + r * cols;
    float top = -INFINITY;
#pragma omp simd reduction(max : top)
    for (int64_t c = 0; c < cols; ++c) top = std::max(top, scale * xr[c]);
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t c = 0; c < cols; ++c) {
      orow[c] = expf(std::max(scale * xr[c] - top, kSoftmaxClip));
      sum += orow[c];
    }
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) orow[c] /= sum;
  }
  return {out};
}

// d/dx: scale * y * (g - sum(g * y)) per row, the sum taken as sum(g * y) / sum(y) (sum(y) is 1
// up to rounding): then each row's gradient sums to zero as exactly as float32 allows, which is
// what a bias added to every score of a row (GPSA's pos_proj bias) must get.
std::vector<paddle::Tensor> SoftmaxBackward(const paddle::Tensor& out, const paddle::Tensor& grad_out, float scale,
                                            int threads) {
  CheckCpuFloat(grad_out, "grad_out");
  const int64_t cols = out.shape().back();
  const int64_t rows = out.numel() / cols;
  auto grad_x = paddle::empty(out.shape(), out.dtype(), out.place());
  const float* y = out.data<float>();
  const float* g = grad_out.data<float>();
  float* dx = grad_x.data<float>();
#pragma omp parallel for schedule(static) num_threads(Threads(threads, out.numel()))
  for (int64_t r = 0; r < rows; ++r) {
    const float* yr = y + r * cols;
    const float* gr = g + r * cols;
    float* dr = dx + r * cols;
    float dot = 0.0f, total = 0.0f;
#pragma omp simd reduction(+ : dot, total)
    for (int64_t c = 0; c < cols; ++c) {
      dot += gr[c] * yr[c];
      total += yr[c];
    }
    dot /= total;
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) dr[c] = scale * yr[c] * (gr[c] - dot);
  }
  return {grad_x};
}

// Attention's head re-layouts move rows of head_dim floats between four layouts of the same
// (batch b, head h, token n) rows; each names where row (b, h, n) starts:
//   head-major [B, H, N, d] (for batched products), token-major [B, N, H * d] (tokens),
//   by-head [H, N, B * d] (GPSA's values beside the batch), and one part p of q|k|v [B, N, 3 * H * d].
struct Rows {
  int64_t batch, heads, tokens, dim;
  int64_t HeadMajor(int64_t b, int64_t h, int64_t n) const { return ((b * heads + h) * tokens + n) * dim; }
  int64_t TokenMajor(int64_t b, int64_t h, int64_t n) const { return ((b * tokens + n) * heads + h) * dim; }
  int64_t ByHead(int64_t b, int64_t h, int64_t n) const { return ((h * tokens + n) * batch + b) * dim; }
  int64_t Qkv(int part, int64_t b, int64_t h, int64_t n) const {
    return ((b * tokens + n) * 3 * heads + part * heads + h) * dim;
  }
  int64_t numel() const { return batch * heads * tokens * dim; }
};

Rows HeadMajorRows(const paddle::Tensor& x) {
  PD_CHECK(x.shape().size() == 4, "expected [batch, heads, tokens, head_dim]");
  return {x.shape()[0], x.shape()[1], x.shape()[2], x.shape()[3]};
}

// dst[p][to(p, b, h, n) + c] = src[p][from(p, b, h, n) + c] for every row of every part p, in one
// pass over (b, n); a null src[p]: zeros.
template <int kParts, typename From, typename To>
void CopyRows(const Rows& rows, const float* const (&src)[kParts], From from, float* const (&dst)[kParts], To to,
              int threads) {
#pragma omp parallel for collapse(2) schedule(static) num_threads(Threads(threads, kParts * rows.numel()))
  for (int64_t b = 0; b < rows.batch; ++b) {
    for (int64_t n = 0; n < rows.tokens; ++n) {
      for (int p = 0; p < kParts; ++p) {
        for (int64_t h = 0; h < rows.heads; ++h) {
          float* out = dst[p] + to(p, b, h, n);
          if (src[p] == nullptr) {
            std::fill(out, out + rows.dim, 0.0f);
            continue;
          }
          const float* in = src[p] + from(p, b, h, n);
#pragma omp simd
          for (int64_t c = 0; c < rows.dim; ++c) out[c] = in[c];
        }
      }
    }
  }
}

// [B, N, 3 * H * d] (columns q, k, v, each head by head) -> q, k, v, each [B, H, N, d]: one pass
// instead of a transpose and three copies.
std::vector<paddle::Tensor> SplitHeadsForward(const paddle::Tensor& qkv, int num_heads, int threads) {
  CheckCpuFloat(qkv, "qkv");
  PD_CHECK(qkv.shape().size() == 3, "qkv must be [batch, tokens, 3 * width]");
  CheckHeads(num_heads, qkv.shape()[2]);
  PD_CHECK(qkv.shape()[2] % (3 * num_heads) == 0, "qkv's last axis must be 3 * num_heads * head_dim");
  const Rows rows{qkv.shape()[0], num_heads, qkv.shape()[1], qkv.shape()[2] / (3 * num_heads)};
  std::vector<paddle::Tensor> parts;
  float* dst[3];
  for (int p = 0; p < 3; ++p) {
    parts.push_back(paddle::empty({rows.batch, rows.heads, rows.tokens, rows.dim}, qkv.dtype(), qkv.place()));
    dst[p] = parts.back().data<float>();
  }
  const float* const src[3] = {qkv.data<float>(), qkv.data<float>(), qkv.data<float>()};
  CopyRows<3>(rows, src, [&](int p, int64_t b, int64_t h, int64_t n) { return rows.Qkv(p, b, h, n); }, dst,
              [&](int, int64_t b, int64_t h, int64_t n) { return rows.HeadMajor(b, h, n); }, threads);
  return parts;
}

// The reverse; an absent gradient (an output the loss does not use) counts as zero.
std::vector<paddle::Tensor> SplitHeadsBackward(const paddle::Tensor& grad_q, const paddle::Tensor& grad_k,
                                               const paddle::Tensor& grad_v, int num_heads, int threads) {
  const paddle::Tensor* grads[3] = {&grad_q, &grad_k, &grad_v};
  const paddle::Tensor* present = nullptr;
  for (auto* g : grads) {
    if (g->initialized()) {
      CheckCpuFloat(*g, "grad");
      present = g;
    }
  }
  PD_CHECK(present != nullptr, "split_heads: no gradient reached q, k or v");
  const Rows rows = HeadMajorRows(*present);
  auto grad_qkv = paddle::empty({rows.batch, rows.tokens, 3 * rows.heads * rows.dim}, present->dtype(),
                                present->place());
  const float* src[3];
  for (int p = 0; p < 3; ++p) src[p] = grads[p]->initialized() ? grads[p]->data<float>() : nullptr;
  float* const dst[3] = {grad_qkv.data<float>(), grad_qkv.data<float>(), grad_qkv.data<float>()};
  CopyRows<3>(rows, src, [&](int, int64_t b, int64_t h, int64_t n) { return rows.HeadMajor(b, h, n); }, dst,
              [&](int p, int64_t b, int64_t h, int64_t n) { return rows.Qkv(p, b, h, n); }, threads);
  return {grad_qkv};
}

std::vector<std::vector<int64_t>> SplitHeadsShapes(const std::vector<int64_t>& qkv, int num_heads) {
  PD_CHECK(qkv.size() == 3, "qkv must be [batch, tokens, 3 * width]");
  CheckHeads(num_heads, qkv[2]);
  const int64_t dim = qkv[2] < 0 ? -1 : qkv[2] / (3 * num_heads);
  std::vector<int64_t> part = {qkv[0], num_heads, qkv[1], dim};
  return {part, part, part};
}

std::vector<paddle::DataType> SplitHeadsTypes(const paddle::DataType& dtype) { return {dtype, dtype, dtype}; }

// GPSA's values for its positional product: v [B, H, N, d] laid out as [H, N, B * d], so that
// the map shared by the batch multiplies them in one [N, N] x [N, B * d] product per head.
std::vector<paddle::Tensor> ValuesByHeadForward(const paddle::Tensor& v, int threads) {
  CheckCpuFloat(v, "v");
  const Rows rows = HeadMajorRows(v);
  auto out = paddle::empty({rows.heads, rows.tokens, rows.batch * rows.dim}, v.dtype(), v.place());
  CopyRows<1>(rows, {v.data<float>()}, [&](int, int64_t b, int64_t h, int64_t n) { return rows.HeadMajor(b, h, n); }, {out.data<float>()},
              [&](int, int64_t b, int64_t h, int64_t n) { return rows.ByHead(b, h, n); }, threads);
  return {out};
}

std::vector<paddle::Tensor> ValuesByHeadBackward(const paddle::Tensor& v, const paddle::Tensor& grad_out,
                                                 int threads) {
  CheckCpuFloat(grad_out, "grad_out");
  const Rows rows = HeadMajorRows(v);
  auto grad_v = paddle::empty(v.shape(), v.dtype(), v.place());
  CopyRows<1>(rows, {grad_out.data<float>()}, [&](int, int64_t b, int64_t h, int64_t n) { return rows.ByHead(b, h, n); }, {grad_v.data<float>()},
              [&](int, int64_t b, int64_t h, int64_t n) { return rows.HeadMajor(b, h, n); }, threads);
  return {grad_v};
}

// The heads back into tokens, GPSA's two attentions mixed on the way:
//   out[b, n, h * d + c] = (1 - gate[h]) * content[b, h, n, c] + positional[h, n, b * d + c],
// content = softmax(q kᵀ) v [B, H, N, d], positional = (gate P) v [H, N, B * d] (P shared by the
// batch), gate = σ(λ) [H]. One pass instead of a transpose back, a broadcast product, an add and
// the heads' transpose (MergeHeads below is the merge alone, for MHSA).
std::vector<paddle::Tensor> GatedMergeForward(const paddle::Tensor& content, const paddle::Tensor& positional,
                                              const paddle::Tensor& gate, int threads) {
  CheckCpuFloat(content, "content");
  CheckCpuFloat(positional, "positional");
  CheckCpuFloat(gate, "gate");
  const Rows rows = HeadMajorRows(content);
  const std::vector<int64_t> by_head = {rows.heads, rows.tokens, rows.batch * rows.dim};
  PD_CHECK(positional.shape() == by_head && gate.numel() == rows.heads, "positional must be [H, N, B * d], gate [H]");
  auto out = paddle::empty({rows.batch, rows.tokens, rows.heads * rows.dim}, content.dtype(), content.place());
  const float* c_in = content.data<float>();
  const float* p_in = positional.data<float>();
  const float* g = gate.data<float>();
  float* o = out.data<float>();
#pragma omp parallel for collapse(2) schedule(static) num_threads(Threads(threads, rows.numel()))
  for (int64_t b = 0; b < rows.batch; ++b) {
    for (int64_t n = 0; n < rows.tokens; ++n) {
      for (int64_t h = 0; h < rows.heads; ++h) {
        const float keep = 1.0f - g[h];
        const float* cr = c_in + rows.HeadMajor(b, h, n);
        const float* pr = p_in + rows.ByHead(b, h, n);
        float* orow = o + rows.TokenMajor(b, h, n);
#pragma omp simd
        for (int64_t c = 0; c < rows.dim; ++c) orow[c] = keep * cr[c] + pr[c];
      }
    }
  }
  return {out};
}

// grad_content = (1 - gate) * G, grad_positional = G, grad_gate[h] = -sum G * content (per-thread
// partial sums added in thread order: the result does not depend on scheduling).
// positional is not an input here (its gradient is G re-laid, its shape content's by head): it is
// not kept for backward.
std::vector<paddle::Tensor> GatedMergeBackward(const paddle::Tensor& content, const paddle::Tensor& gate,
                                               const paddle::Tensor& grad_out, int threads) {
  CheckCpuFloat(grad_out, "grad_out");
  const Rows rows = HeadMajorRows(content);
  auto grad_c = paddle::empty(content.shape(), content.dtype(), content.place());
  auto grad_p = paddle::empty({rows.heads, rows.tokens, rows.batch * rows.dim}, content.dtype(), content.place());
  auto grad_g = paddle::empty(gate.shape(), content.dtype(), content.place());
  const float* c_in = content.data<float>();
  const float* g = gate.data<float>();
  const float* go = grad_out.data<float>();
  float* dc = grad_c.data<float>();
  float* dp = grad_p.data<float>();
  const int team = Threads(threads, rows.numel());
  std::vector<double> partial(static_cast<size_t>(team) * rows.heads, 0.0);
#pragma omp parallel num_threads(team)
  {
    double* mine = partial.data() + static_cast<size_t>(omp_get_thread_num()) * rows.heads;
#pragma omp for collapse(2) schedule(static)
    for (int64_t b = 0; b < rows.batch; ++b) {
      for (int64_t n = 0; n < rows.tokens; ++n) {
        for (int64_t h = 0; h < rows.heads; ++h) {
          const float keep = 1.0f - g[h];
          const float* gr = go + rows.TokenMajor(b, h, n);
          const float* cr = c_in + rows.HeadMajor(b, h, n);
          float* dcr = dc + rows.HeadMajor(b, h, n);
          float* dpr = dp + rows.ByHead(b, h, n);
          float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
          for (int64_t c = 0; c < rows.dim; ++c) {
            dcr[c] = keep * gr[c];
            dpr[c] = gr[c];
            dot += gr[c] * cr[c];
          }
          mine[h] -= dot;
        }
      }
    }
  }
  float* dg = grad_g.data<float>();
  for (int64_t h = 0; h < rows.heads; ++h) {
    double total = 0.0;
    for (int t = 0; t < team; ++t) total += partial[static_cast<size_t>(t) * rows.heads + h];
    dg[h] = static_cast<float>(total);
  }
  return {grad_c, grad_p, grad_g};
}

std::vector<paddle::Tensor> MergeHeadsForward(const paddle::Tensor& x, int num_heads, int threads) {
  CheckCpuFloat(x, "x");
  const Rows rows = HeadMajorRows(x);
  PD_CHECK(num_heads == rows.heads, "num_heads ", num_heads, " is not x's head axis ", rows.heads);
  CheckHeads(num_heads, rows.heads * rows.dim);
  auto out = paddle::empty({rows.batch, rows.tokens, rows.heads * rows.dim}, x.dtype(), x.place());
  CopyRows<1>(rows, {x.data<float>()}, [&](int, int64_t b, int64_t h, int64_t n) { return rows.HeadMajor(b, h, n); }, {out.data<float>()},
              [&](int, int64_t b, int64_t h, int64_t n) { return rows.TokenMajor(b, h, n); }, threads);
  return {out};
}

// From grad_out [B, N, H * d] and the head count alone: the merged input is not kept for backward.
std::vector<paddle::Tensor> MergeHeadsBackward(const paddle::Tensor& grad_out, int num_heads, int threads) {
  CheckCpuFloat(grad_out, "grad_out");
  PD_CHECK(grad_out.shape().size() == 3, "grad_out must be [batch, tokens, width]");
  CheckHeads(num_heads, grad_out.shape()[2]);
  const Rows rows{grad_out.shape()[0], num_heads, grad_out.shape()[1], grad_out.shape()[2] / num_heads};
  auto grad_x = paddle::empty({rows.batch, rows.heads, rows.tokens, rows.dim}, grad_out.dtype(), grad_out.place());
  CopyRows<1>(rows, {grad_out.data<float>()}, [&](int, int64_t b, int64_t h, int64_t n) { return rows.TokenMajor(b, h, n); }, {grad_x.data<float>()},
              [&](int, int64_t b, int64_t h, int64_t n) { return rows.HeadMajor(b, h, n); }, threads);
  return {grad_x};
}

std::vector<std::vector<int64_t>> ValuesByHeadShapes(const std::vector<int64_t>& v) {
  return {{v[1], v[2], v[0] < 0 || v[3] < 0 ? -1 : v[0] * v[3]}};
}

std::vector<std::vector<int64_t>> MergedShape(const std::vector<int64_t>& x) {
  return {{x[0], x[2], x[1] < 0 || x[3] < 0 ? -1 : x[1] * x[3]}};
}

std::vector<std::vector<int64_t>> GatedMergeShapes(const std::vector<int64_t>& content,
                                                   const std::vector<int64_t>& positional,
                                                   const std::vector<int64_t>& gate) {
  return MergedShape(content);
}

std::vector<paddle::DataType> GatedMergeTypes(const paddle::DataType& content, const paddle::DataType& positional,
                                              const paddle::DataType& gate) {
  return {content};
}

std::vector<std::vector<int64_t>> SameShape(const std::vector<int64_t>& shape) { return {shape}; }

std::vector<paddle::DataType> SameType(const paddle::DataType& dtype) { return {dtype}; }

std::vector<std::vector<int64_t>> LayerNormShapes(const std::vector<int64_t>& x, const std::vector<int64_t>& w,
                                                  const std::vector<int64_t>& b) {
  int64_t rows = 1;
  for (size_t i = 0; i + 1 < x.size(); ++i) rows = rows < 0 || x[i] < 0 ? -1 : rows * x[i];
  return {x, {rows}, {rows}};
}

std::vector<paddle::DataType> LayerNormTypes(const paddle::DataType& x, const paddle::DataType& w,
                                             const paddle::DataType& b) {
  return {x, x, x};
}

PD_BUILD_OP(convitlab_gelu)
    .Inputs({"X"})
    .Outputs({"Out"})
    .Attrs({"threads: int"})
    .SetKernelFn(PD_KERNEL(GeluForward))
    .SetInferShapeFn(PD_INFER_SHAPE(SameShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(SameType));

PD_BUILD_GRAD_OP(convitlab_gelu)
    .Inputs({"X", paddle::Grad("Out")})
    .Outputs({paddle::Grad("X")})
    .Attrs({"threads: int"})
    .SetKernelFn(PD_KERNEL(GeluBackward));

PD_BUILD_OP(convitlab_layer_norm)
    .Inputs({"X", "Weight", "Bias"})
    .Outputs({"Out", "Mean", "Rstd"})
    .Attrs({"epsilon: float", "threads: int"})
    .SetKernelFn(PD_KERNEL(LayerNormForward))
    .SetInferShapeFn(PD_INFER_SHAPE(LayerNormShapes))
    .SetInferDtypeFn(PD_INFER_DTYPE(LayerNormTypes));

PD_BUILD_GRAD_OP(convitlab_layer_norm)
    .Inputs({"X", "Weight", "Mean", "Rstd", paddle::Grad("Out")})
    .Outputs({paddle::Grad("X"), paddle::Grad("Weight"), paddle::Grad("Bias")})
    .Attrs({"epsilon: float", "threads: int"})
    .SetKernelFn(PD_KERNEL(LayerNormBackward));

PD_BUILD_OP(convitlab_softmax)
    .Inputs({"X"})
    .Outputs({"Out"})
    .Attrs({"scale: float", "threads: int"})
    .SetKernelFn(PD_KERNEL(SoftmaxForward))
    .SetInferShapeFn(PD_INFER_SHAPE(SameShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(SameType));

PD_BUILD_GRAD_OP(convitlab_softmax)
    .Inputs({"Out", paddle::Grad("Out")})
    .Outputs({paddle::Grad("X")})
    .Attrs({"scale: float", "threads: int"})
    .SetKernelFn(PD_KERNEL(SoftmaxBackward));

PD_BUILD_OP(convitlab_split_heads)
    .Inputs({"QKV"})
    .Outputs({"Q", "K", "V"})
    .Attrs({"num_heads: int", "threads: int"})
    .SetKernelFn(PD_KERNEL(SplitHeadsForward))
    .SetInferShapeFn(PD_INFER_SHAPE(SplitHeadsShapes))
    .SetInferDtypeFn(PD_INFER_DTYPE(SplitHeadsTypes));

PD_BUILD_GRAD_OP(convitlab_split_heads)
    .Inputs({paddle::Grad("Q"), paddle::Grad("K"), paddle::Grad("V")})
    .Outputs({paddle::Grad("QKV")})
    .Attrs({"num_heads: int", "threads: int"})
    .SetKernelFn(PD_KERNEL(SplitHeadsBackward));

PD_BUILD_OP(convitlab_values_by_head)
    .Inputs({"V"})
    .Outputs({"Out"})
    .Attrs({"threads: int"})
    .SetKernelFn(PD_KERNEL(ValuesByHeadForward))
    .SetInferShapeFn(PD_INFER_SHAPE(ValuesByHeadShapes))
    .SetInferDtypeFn(PD_INFER_DTYPE(SameType));

PD_BUILD_GRAD_OP(convitlab_values_by_head)
    .Inputs({"V", paddle::Grad("Out")})
    .Outputs({paddle::Grad("V")})
    .Attrs({"threads: int"})
    .SetKernelFn(PD_KERNEL(ValuesByHeadBackward));

PD_BUILD_OP(convitlab_gated_merge)
    .Inputs({"Content", "Positional", "Gate"})
    .Outputs({"Out"})
    .Attrs({"threads: int"})
    .SetKernelFn(PD_KERNEL(GatedMergeForward))
    .SetInferShapeFn(PD_INFER_SHAPE(GatedMergeShapes))
    .SetInferDtypeFn(PD_INFER_DTYPE(GatedMergeTypes));

PD_BUILD_GRAD_OP(convitlab_gated_merge)
    .Inputs({"Content", "Gate", paddle::Grad("Out")})
    .Outputs({paddle::Grad("Content"), paddle::Grad("Positional"), paddle::Grad("Gate")})
    .Attrs({"threads: int"})
    .SetKernelFn(PD_KERNEL(GatedMergeBackward));

PD_BUILD_OP(convitlab_merge_heads)
    .Inputs({"X"})
    .Outputs({"Out"})
    .Attrs({"num_heads: int", "threads: int"})
    .SetKernelFn(PD_KERNEL(MergeHeadsForward))
    .SetInferShapeFn(PD_INFER_SHAPE(MergedShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(SameType));

PD_BUILD_GRAD_OP(convitlab_merge_heads)
    .Inputs({paddle::Grad("Out")})
    .Outputs({paddle::Grad("X")})
    .Attrs({"num_heads: int", "threads: int"})
    .SetKernelFn(PD_KERNEL(MergeHeadsBackward));

// Second derivatives. Paddle gives a custom op without one a first-order gradient cut from the
// graph: paddle.grad(..., create_graph=True) then left x.grad None, silently. These refuse instead,
// when the second backward pass reaches them (Paddle does not tell a custom op's grad kernel that a
// graph is being created, so it cannot refuse at paddle.grad itself as Paddle's ops do). Falling
// back to Paddle's ops would buy nothing: its gelu, softmax and layer_norm have no second
// derivative either.
std::vector<paddle::Tensor> NoSecondDerivative(const paddle::Tensor& grad_of_grad) {
  PD_THROW("convitlab's CPU kernels (GELU, LayerNorm, softmax, attention's head re-layouts) have no second "
           "derivative, nor have Paddle's gelu, softmax and layer_norm: take gradients with create_graph=False");
}

std::vector<std::vector<int64_t>> NoSecondDerivativeShape(const std::vector<int64_t>& shape) { return {shape}; }

#define CONVITLAB_NO_SECOND_DERIVATIVE(op, grad_input, grad_output) \
  PD_BUILD_DOUBLE_GRAD_OP(op)                                        \
      .Inputs({paddle::Grad(paddle::Grad(grad_input))})              \
      .Outputs({paddle::Grad(paddle::Grad(grad_output))})            \
      .SetKernelFn(PD_KERNEL(NoSecondDerivative))                    \
      .SetInferShapeFn(PD_INFER_SHAPE(NoSecondDerivativeShape))

CONVITLAB_NO_SECOND_DERIVATIVE(convitlab_gelu, "X", "Out");
CONVITLAB_NO_SECOND_DERIVATIVE(convitlab_layer_norm, "X", "Out");
CONVITLAB_NO_SECOND_DERIVATIVE(convitlab_softmax, "X", "Out");
CONVITLAB_NO_SECOND_DERIVATIVE(convitlab_split_heads, "QKV", "Q");
CONVITLAB_NO_SECOND_DERIVATIVE(convitlab_values_by_head, "V", "Out");
CONVITLAB_NO_SECOND_DERIVATIVE(convitlab_gated_merge, "Content", "Out");
CONVITLAB_NO_SECOND_DERIVATIVE(convitlab_merge_heads, "X", "Out");
