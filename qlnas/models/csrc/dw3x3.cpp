// CPU kernels for the QL blocks' 3x3 depthwise conv with a channel multiplier k
// (input channel j -> output channels j*k .. j*k+k-1), stride 1 or 2, padding 1, in
// channels_last (NHWC) float32.
//
// oneDNN runs a multiplier > 1 through its generic grouped-conv code, 3-10x slower than
// the memory traffic allows. Here every output pixel is a run of contiguous output channels:
// each input row is first expanded to k copies of every channel (kept for the three output
// rows that read it), after which every tap is one vectorised multiply-add over the channels.
// The forward can also add a bias and multiply by another tensor (a BN folded into the conv,
// then the block's element-wise product) before the result is written.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

struct Geometry {
  int64_t B, H, W, n, k, C, s, Ho, Wo;
};

Geometry geometry(const torch::Tensor& x, int64_t k, int64_t stride) {
  Geometry g;
  g.B = x.size(0);
  g.H = x.size(1);
  g.W = x.size(2);
  g.n = x.size(3);
  g.k = k;
  g.C = g.n * k;
  g.s = stride;
  g.Ho = (g.H - 1) / stride + 1;
  g.Wo = (g.W - 1) / stride + 1;
  return g;
}

// Eight floats, loaded and stored at any alignment; GCC maps the arithmetic to SIMD.
typedef float vec8 __attribute__((vector_size(32), aligned(4)));
constexpr int64_t kBlock = 32;  // channels whose sums stay in (four) registers across taps

inline vec8 load(const float* p) { return *reinterpret_cast<const vec8*>(p); }
inline void store(float* p, vec8 v) { *reinterpret_cast<vec8*>(p) = v; }

typedef int vec8i __attribute__((vector_size(32)));

// out[p * k + c] = in[p] for c < k: each value repeated k times (SIMD shuffles for k = 2, 4).
inline void expand(const float* __restrict__ in, float* __restrict__ out, int64_t count,
                   int64_t k) {
  int64_t p = 0;
  if (k == 4) {
    for (; p + 8 <= count; p += 8) {
      const vec8 v = load(in + p);
      float* o = out + p * 4;
      store(o, __builtin_shuffle(v, vec8i{0, 0, 0, 0, 1, 1, 1, 1}));
      store(o + 8, __builtin_shuffle(v, vec8i{2, 2, 2, 2, 3, 3, 3, 3}));
      store(o + 16, __builtin_shuffle(v, vec8i{4, 4, 4, 4, 5, 5, 5, 5}));
      store(o + 24, __builtin_shuffle(v, vec8i{6, 6, 6, 6, 7, 7, 7, 7}));
    }
  } else if (k == 2) {
    for (; p + 8 <= count; p += 8) {
      const vec8 v = load(in + p);
      store(out + p * 2, __builtin_shuffle(v, vec8i{0, 0, 1, 1, 2, 2, 3, 3}));
      store(out + p * 2 + 8, __builtin_shuffle(v, vec8i{4, 4, 5, 5, 6, 6, 7, 7}));
    }
  }
  for (; p < count; ++p)
    for (int64_t c = 0; c < k; ++c) out[p * k + c] = in[p];
}

// out[j] = sum_c in[j * k + c] for c < k: the k copies of a channel summed back (the
// gradient of `expand`); fixed k = 2, 4 so the compiler vectorises the strided loads.
inline void sum_groups(const float* __restrict__ in, float* __restrict__ out, int64_t n,
                       int64_t k) {
  if (k == 4) {
    for (int64_t j = 0; j < n; ++j)
      out[j] = (in[4 * j] + in[4 * j + 1]) + (in[4 * j + 2] + in[4 * j + 3]);
  } else if (k == 2) {
    for (int64_t j = 0; j < n; ++j) out[j] = in[2 * j] + in[2 * j + 1];
  } else {
    for (int64_t j = 0; j < n; ++j) {
      float sum = 0.f;
      for (int64_t c = 0; c < k; ++c) sum += in[j * k + c];
      out[j] = sum;
    }
  }
}

// Rows of the input with each channel repeated k times, cached for the next output rows.
class ExpandedRows {
 public:
  ExpandedRows(const float* x, const Geometry& g) : x_(x), g_(g), buf_(3 * g.W * g.C), tag_{-1, -1, -1} {}

  const float* row(int64_t b, int64_t hi) {
    const int64_t key = b * g_.H + hi;
    for (int i = 0; i < 3; ++i)
      if (tag_[i] == key) return buf_.data() + i * g_.W * g_.C;
    const int slot = next_;
    next_ = (next_ + 1) % 3;
    tag_[slot] = key;
    float* __restrict__ out = buf_.data() + slot * g_.W * g_.C;
    const float* __restrict__ in = x_ + key * g_.W * g_.n;
    expand(in, out, g_.W * g_.n, g_.k);
    return out;
  }

 private:
  const float* x_;
  Geometry g_;
  std::vector<float> buf_;
  int64_t tag_[3];
  int next_ = 0;
};

// out[o] = (bias[o] + sum_t a[t][o] * b[t][o]) * mul[o]; bias and mul may be null.
inline void dot_taps(float* __restrict__ out, const float* const* a, const float* const* b,
                     int taps, const float* __restrict__ bias, const float* __restrict__ mul,
                     int64_t C) {
  int64_t o = 0;
  for (; o + kBlock <= C; o += kBlock) {
    vec8 s0 = {}, s1 = {}, s2 = {}, s3 = {};
    if (bias) {
      s0 = load(bias + o), s1 = load(bias + o + 8), s2 = load(bias + o + 16);
      s3 = load(bias + o + 24);
    }
    for (int t = 0; t < taps; ++t) {
      const float* at = a[t] + o;
      const float* bt = b[t] + o;
      s0 += load(at) * load(bt);
      s1 += load(at + 8) * load(bt + 8);
      s2 += load(at + 16) * load(bt + 16);
      s3 += load(at + 24) * load(bt + 24);
    }
    if (mul) {
      s0 *= load(mul + o), s1 *= load(mul + o + 8), s2 *= load(mul + o + 16);
      s3 *= load(mul + o + 24);
    }
    store(out + o, s0), store(out + o + 8, s1), store(out + o + 16, s2);
    store(out + o + 24, s3);
  }
  for (; o < C; ++o) {
    float acc = bias ? bias[o] : 0.f;
    for (int t = 0; t < taps; ++t) acc += a[t][o] * b[t][o];
    out[o] = mul ? acc * mul[o] : acc;
  }
}

// acc[dx * C + o] += sum_wo gy[wo][o] * xe[wo * s - 1 + dx][o] for the three taps dx of one
// kernel row: 32 channels at a time, the three sums in registers across the whole row.
inline void weight_grad_row(float* acc, const float* gy, const float* xe, const Geometry& g) {
  const int64_t C = g.C;
  int64_t o = 0;
  for (; o + kBlock <= C; o += kBlock) {
    vec8 s[3][4] = {};
    for (int64_t wo = 0; wo < g.Wo; ++wo) {
      const float* gr = gy + wo * C + o;
      const vec8 g0 = load(gr), g1 = load(gr + 8), g2 = load(gr + 16), g3 = load(gr + 24);
      for (int dx = 0; dx < 3; ++dx) {
        const int64_t wi = wo * g.s - 1 + dx;
        if (wi < 0 || wi >= g.W) continue;
        const float* xr = xe + wi * C + o;
        s[dx][0] += g0 * load(xr);
        s[dx][1] += g1 * load(xr + 8);
        s[dx][2] += g2 * load(xr + 16);
        s[dx][3] += g3 * load(xr + 24);
      }
    }
    for (int dx = 0; dx < 3; ++dx)
      for (int v = 0; v < 4; ++v) {
        float* a = acc + dx * C + o + 8 * v;
        store(a, load(a) + s[dx][v]);
      }
  }
  for (; o < C; ++o)
    for (int64_t wo = 0; wo < g.Wo; ++wo)
      for (int dx = 0; dx < 3; ++dx) {
        const int64_t wi = wo * g.s - 1 + dx;
        if (wi >= 0 && wi < g.W) acc[dx * C + o] += gy[wo * C + o] * xe[wi * C + o];
      }
}

}  // namespace

// x: (B, H, W, n); weight: (9, n*k) tap-major; bias: (n*k) or empty; other: (B, Ho, Wo, n*k)
// or empty. Returns (B, Ho, Wo, n*k) = (dw(x) + bias) * other.
torch::Tensor dw3x3_forward(torch::Tensor x, torch::Tensor weight, torch::Tensor bias,
                            torch::Tensor other, int64_t k, int64_t stride) {
  const Geometry g = geometry(x, k, stride);
  auto y = torch::empty({g.B, g.Ho, g.Wo, g.C}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  const float* bp = bias.numel() ? bias.data_ptr<float>() : nullptr;
  const float* op = other.numel() ? other.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, g.B * g.Ho, 1, [&](int64_t begin, int64_t end) {
    ExpandedRows rows(xp, g);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / g.Ho, ho = r % g.Ho;
      const float* xe[3] = {nullptr, nullptr, nullptr};
      for (int64_t dy = 0; dy < 3; ++dy) {
        const int64_t hi = ho * g.s - 1 + dy;
        if (hi >= 0 && hi < g.H) xe[dy] = rows.row(b, hi);
      }
      for (int64_t wo = 0; wo < g.Wo; ++wo) {
        // The taps this output pixel reads (those inside the image).
        const float* src[9];
        const float* wts[9];
        int taps = 0;
        for (int64_t dy = 0; dy < 3; ++dy) {
          if (!xe[dy]) continue;
          for (int64_t dx = 0; dx < 3; ++dx) {
            const int64_t wi = wo * g.s - 1 + dx;
            if (wi < 0 || wi >= g.W) continue;
            src[taps] = xe[dy] + wi * g.C;
            wts[taps++] = wp + (dy * 3 + dx) * g.C;
          }
        }
        const int64_t at = (r * g.Wo + wo) * g.C;
        dot_taps(yp + at, src, wts, taps, bp, op ? op + at : nullptr, g.C);
      }
    }
  });
  return y;
}

// Gradients of y = dw(x) (no bias, no product) given gy: (B, Ho, Wo, n*k).
// Returns gx (B, H, W, n) if needed and gw (9, n*k) if needed.
std::vector<torch::Tensor> dw3x3_backward(torch::Tensor gy, torch::Tensor x,
                                          torch::Tensor weight, int64_t k, int64_t stride,
                                          bool need_x, bool need_w) {
  const Geometry g = geometry(x, k, stride);
  const float* gp = gy.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  torch::Tensor gx, gw;
  if (need_x) {
    gx = torch::empty_like(x);
    float* gxp = gx.data_ptr<float>();
    at::parallel_for(0, g.B * g.H, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> tmp(g.C);
      for (int64_t r = begin; r < end; ++r) {
        const int64_t b = r / g.H, hi = r % g.H;
        for (int64_t wi = 0; wi < g.W; ++wi) {
          const float* src[9];
          const float* wts[9];
          int taps = 0;
          for (int64_t dy = 0; dy < 3; ++dy) {
            const int64_t t = hi + 1 - dy;
            if (t < 0 || t % g.s) continue;
            const int64_t ho = t / g.s;
            if (ho >= g.Ho) continue;
            for (int64_t dx = 0; dx < 3; ++dx) {
              const int64_t u = wi + 1 - dx;
              if (u < 0 || u % g.s) continue;
              const int64_t wo = u / g.s;
              if (wo >= g.Wo) continue;
              src[taps] = gp + ((b * g.Ho + ho) * g.Wo + wo) * g.C;
              wts[taps++] = wp + (dy * 3 + dx) * g.C;
            }
          }
          dot_taps(tmp.data(), src, wts, taps, nullptr, nullptr, g.C);
          sum_groups(tmp.data(), gxp + (r * g.W + wi) * g.n, g.n, g.k);
        }
      }
    });
  }
  if (need_w) {
    const int64_t threads = at::get_num_threads();
    std::vector<float> partial(threads * 9 * g.C, 0.f);
    at::parallel_for(0, g.B * g.Ho, 1, [&](int64_t begin, int64_t end) {
      float* acc = partial.data() + at::get_thread_num() * 9 * g.C;
      ExpandedRows rows(xp, g);
      for (int64_t r = begin; r < end; ++r) {
        const int64_t b = r / g.Ho, ho = r % g.Ho;
        for (int64_t dy = 0; dy < 3; ++dy) {
          const int64_t hi = ho * g.s - 1 + dy;
          if (hi < 0 || hi >= g.H) continue;
          const float* xe = rows.row(b, hi);
          weight_grad_row(acc + dy * 3 * g.C, gp + r * g.Wo * g.C, xe, g);
        }
      }
    });
    gw = torch::zeros({9, g.C}, x.options());
    float* gwp = gw.data_ptr<float>();
    for (int64_t t = 0; t < threads; ++t)
      for (int64_t i = 0; i < 9 * g.C; ++i) gwp[i] += partial[t * 9 * g.C + i];
  }
  return {gx, gw};
}

// ---- train-mode BatchNorm followed by a product: p = bn(y) * c, in two passes each way ----
// y, c: (P, C) channels-last rows. Statistics are summed in float over blocks of rows, then in
// double, around a per-channel shift (the first row), so large means do not cancel.

namespace {

constexpr int64_t kRowsPerFlush = 256;

// row_fn(r) for every row r in [0, P), in parallel.
template <typename RowFn>
void for_each_row(int64_t P, RowFn row_fn) {
  at::parallel_for(0, P, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) row_fn(r);
  });
}

// Per-channel sums over all rows of f(row, acc_a, acc_b), run in parallel; returns 2*C doubles.
template <typename RowFn>
std::vector<double> channel_sums(int64_t P, int64_t C, RowFn row_fn) {
  const int64_t threads = at::get_num_threads();
  std::vector<double> total(threads * 2 * C, 0.0);
  at::parallel_for(0, P, 1, [&](int64_t begin, int64_t end) {
    double* tot = total.data() + at::get_thread_num() * 2 * C;
    std::vector<float> acc(2 * C, 0.f);
    for (int64_t r0 = begin; r0 < end; r0 += kRowsPerFlush) {
      const int64_t r1 = std::min(end, r0 + kRowsPerFlush);
      for (int64_t r = r0; r < r1; ++r) row_fn(r, acc.data(), acc.data() + C);
      for (int64_t i = 0; i < 2 * C; ++i) tot[i] += acc[i], acc[i] = 0.f;
    }
  });
  std::vector<double> sums(2 * C, 0.0);
  for (int64_t t = 0; t < threads; ++t)
    for (int64_t i = 0; i < 2 * C; ++i) sums[i] += total[t * 2 * C + i];
  return sums;
}

}  // namespace

// Returns p = bn(y) * c (P, C), the batch mean and 1/sqrt(var + eps) (biased var), and the
// unbiased variance (for the running estimate).
std::vector<torch::Tensor> bn_mul_forward(torch::Tensor y, torch::Tensor c, torch::Tensor gamma,
                                          torch::Tensor beta, double eps) {
  const int64_t C = y.size(-1), P = y.numel() / C;
  const float* yp = y.data_ptr<float>();
  const float* cp = c.data_ptr<float>();
  std::vector<float> shift_k(yp, yp + C);
  const float* K = shift_k.data();
  auto sums = channel_sums(P, C, [&](int64_t r, float* __restrict__ s1, float* __restrict__ s2) {
    const float* row = yp + r * C;
    for (int64_t o = 0; o < C; ++o) {
      const float d = row[o] - K[o];
      s1[o] += d;
      s2[o] += d * d;
    }
  });
  auto opts = y.options();
  auto mean = torch::empty({C}, opts), invstd = torch::empty({C}, opts);
  auto var_unbiased = torch::empty({C}, opts);
  std::vector<float> scale(C), shift(C);
  const float* gp = gamma.data_ptr<float>();
  const float* bp = beta.data_ptr<float>();
  float* mean_p = mean.data_ptr<float>();
  float* invstd_p = invstd.data_ptr<float>();
  float* var_p = var_unbiased.data_ptr<float>();
  for (int64_t o = 0; o < C; ++o) {
    const double m1 = sums[o] / P;
    const double var = std::max(sums[C + o] / P - m1 * m1, 0.0);
    const double mu = K[o] + m1, is = 1.0 / std::sqrt(var + eps);
    mean_p[o] = static_cast<float>(mu);
    invstd_p[o] = static_cast<float>(is);
    var_p[o] = static_cast<float>(P > 1 ? var * P / (P - 1) : var);
    scale[o] = static_cast<float>(gp[o] * is);
    shift[o] = static_cast<float>(bp[o] - mu * gp[o] * is);
  }
  auto p = torch::empty_like(y);
  float* pp = p.data_ptr<float>();
  const float* sc = scale.data();
  const float* sh = shift.data();
  for_each_row(P, [&](int64_t r) {
    const float* __restrict__ yr = yp + r * C;
    const float* __restrict__ cr = cp + r * C;
    float* __restrict__ out = pp + r * C;
    for (int64_t o = 0; o < C; ++o) out[o] = (yr[o] * sc[o] + sh[o]) * cr[o];
  });
  return {p, mean, invstd, var_unbiased};
}

// Gradients of p = bn(y) * c: gy, gc, dgamma, dbeta.
std::vector<torch::Tensor> bn_mul_backward(torch::Tensor gp, torch::Tensor y, torch::Tensor c,
                                           torch::Tensor mean, torch::Tensor invstd,
                                           torch::Tensor gamma, torch::Tensor beta) {
  const int64_t C = y.size(-1), P = y.numel() / C;
  const float* gpp = gp.data_ptr<float>();
  const float* yp = y.data_ptr<float>();
  const float* cp = c.data_ptr<float>();
  const float* mu = mean.data_ptr<float>();
  const float* is = invstd.data_ptr<float>();
  const float* ga = gamma.data_ptr<float>();
  const float* be = beta.data_ptr<float>();
  std::vector<float> scale(C), shift(C);
  for (int64_t o = 0; o < C; ++o) scale[o] = ga[o] * is[o], shift[o] = be[o] - mu[o] * scale[o];
  const float* sc = scale.data();
  const float* sh = shift.data();
  auto gc = torch::empty_like(c);
  float* gcp = gc.data_ptr<float>();
  // Pass 1: gc = gp * bn(y); sums of gz = gp * c and of gz * (y - mean).
  auto sums = channel_sums(P, C, [&](int64_t r, float* __restrict__ s1, float* __restrict__ s2) {
    const float* __restrict__ g = gpp + r * C;
    const float* __restrict__ yr = yp + r * C;
    const float* __restrict__ cr = cp + r * C;
    float* __restrict__ out = gcp + r * C;
    for (int64_t o = 0; o < C; ++o) {
      out[o] = g[o] * (yr[o] * sc[o] + sh[o]);
      const float gz = g[o] * cr[o];
      s1[o] += gz;
      s2[o] += gz * (yr[o] - mu[o]);
    }
  });
  auto dgamma = torch::empty({C}, y.options()), dbeta = torch::empty({C}, y.options());
  // Pass 2: gy = a gz + b y + d, the train-mode BN backward per channel.
  std::vector<float> a(C), bcoef(C), d(C);
  float* dgamma_p = dgamma.data_ptr<float>();
  float* dbeta_p = dbeta.data_ptr<float>();
  for (int64_t o = 0; o < C; ++o) {
    const double s_gz = sums[o], s_gzy = sums[C + o];
    dbeta_p[o] = static_cast<float>(s_gz);
    dgamma_p[o] = static_cast<float>(s_gzy * is[o]);
    const double ai = double(ga[o]) * is[o];
    const double bi = -ai * is[o] * is[o] * s_gzy / P;
    a[o] = static_cast<float>(ai);
    bcoef[o] = static_cast<float>(bi);
    d[o] = static_cast<float>(-ai * s_gz / P - mu[o] * bi);
  }
  auto gy = torch::empty_like(y);
  float* gyp = gy.data_ptr<float>();
  const float* ap = a.data();
  const float* bcp = bcoef.data();
  const float* dp = d.data();
  for_each_row(P, [&](int64_t r) {
    const float* __restrict__ g = gpp + r * C;
    const float* __restrict__ yr = yp + r * C;
    const float* __restrict__ cr = cp + r * C;
    float* __restrict__ out = gyp + r * C;
    for (int64_t o = 0; o < C; ++o) out[o] = g[o] * cr[o] * ap[o] + yr[o] * bcp[o] + dp[o];
  });
  return {gy, gc, dgamma, dbeta};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &dw3x3_forward, "3x3 depthwise conv with multiplier (NHWC, fp32)");
  m.def("backward", &dw3x3_backward, "its input and weight gradients");
  m.def("bn_mul_forward", &bn_mul_forward, "train-mode BatchNorm then a product (NHWC, fp32)");
  m.def("bn_mul_backward", &bn_mul_backward, "its gradients");
}
