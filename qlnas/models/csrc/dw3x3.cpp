// CPU kernels for the QL blocks' 3x3 depthwise conv with a channel multiplier k
// (input channel j -> output channels j*k .. j*k+k-1), stride 1 or 2, padding 1, in
// channels_last (NHWC) float32.
//
// oneDNN runs a multiplier > 1 through its generic grouped-conv code, 3-10x slower than
// the memory traffic allows. Here each input row is first expanded to k copies of every
// channel, with a zero pixel on either side (kept for the three output rows that read it);
// then sixteen output channels at a time hold their nine taps in registers and sweep along
// the row, four outputs at once at stride 1 sharing the loads of the six input pixels they
// read. The input gradient at stride 1 is the same sweep over the output gradient with the
// kernel turned by 180 degrees. The forward can also add a bias and multiply by another
// tensor (a BN folded into the conv, then the block's element-wise product) before the
// result is written.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <new>
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

// Eight and sixteen floats, loaded and stored at any alignment; GCC maps the arithmetic to
// SIMD (one AVX-512 register for sixteen where -march=native has it, two AVX ones otherwise).
typedef float vec8 __attribute__((vector_size(32), aligned(4)));
typedef float vec16 __attribute__((vector_size(64), aligned(4)));
constexpr int64_t kBlock = 32;  // channels whose sums stay in (four) registers across taps
constexpr int64_t kLanes = 16;  // channels of one vec16

inline vec8 load(const float* p) { return *reinterpret_cast<const vec8*>(p); }
inline void store(float* p, vec8 v) { *reinterpret_cast<vec8*>(p) = v; }
inline vec16 load16(const float* p) { return *reinterpret_cast<const vec16*>(p); }
inline void store16(float* p, vec16 v) { *reinterpret_cast<vec16*>(p) = v; }

typedef int vec8i __attribute__((vector_size(32)));

// Zeroed floats on 64-byte boundaries, so sixteen-float loads of rows whose length is a
// multiple of 16 never straddle two cache lines (std::vector only aligns to 16 bytes).
class AlignedFloats {
 public:
  explicit AlignedFloats(int64_t count)
      : data_(static_cast<float*>(std::aligned_alloc(64, ((count * 4 + 63) / 64) * 64 + 64))) {
    if (!data_) throw std::bad_alloc();
    std::fill(data_, data_ + count, 0.f);
  }
  ~AlignedFloats() { std::free(data_); }
  AlignedFloats(const AlignedFloats&) = delete;
  AlignedFloats& operator=(const AlignedFloats&) = delete;
  float* data() { return data_; }

 private:
  float* data_;
};

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
  if (k == 1) {
    std::copy(in, in + count, out);
    return;
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

// Rows of a (B, H, W, n) tensor with each channel repeated k times and a zero pixel on
// either side, cached for the next rows that read them; a row outside the image is all
// zeros. With the padding every output pixel reads all nine taps, so the inner loops have no
// bounds tests. A pixel takes `stride()` floats: n k rounded up to 16, plus 16 where that
// is a multiple of 1024 bytes, so that the loops that walk one channel block along a row do not
// land every load in the same cache set. Rows are asked for in increasing order, and the
// three most recent stay (stride 1 and 2 read at most three consecutive rows).
class PaddedRows {
 public:
  PaddedRows(const float* src, int64_t H, int64_t W, int64_t n, int64_t k)
      : src_(src), H_(H), W_(W), n_(n), k_(k), stride_(pixel_stride(n * k)),
        len_((W + 2) * stride_), buf_(4 * len_), tag_{-1, -1, -1} {}

  static int64_t pixel_stride(int64_t C) {
    const int64_t s = (C + 15) / 16 * 16;
    return s % 256 == 0 ? s + 16 : s;
  }

  int64_t stride() const { return stride_; }

  const float* row(int64_t b, int64_t h) {
    if (h < 0 || h >= H_) return buf_.data() + 3 * len_;  // the zero row
    const int64_t key = b * H_ + h;
    for (int i = 0; i < 3; ++i)
      if (tag_[i] == key) return buf_.data() + i * len_;
    const int slot = next_;
    next_ = (next_ + 1) % 3;
    tag_[slot] = key;
    float* out = buf_.data() + slot * len_;
    const float* in = src_ + key * W_ * n_;
    for (int64_t w = 0; w < W_; ++w)  // pixels 1 .. W
      expand(in + w * n_, out + (w + 1) * stride_, n_, k_);
    return out;
  }

 private:
  const float* src_;
  int64_t H_, W_, n_, k_, stride_, len_;
  AlignedFloats buf_;
  int64_t tag_[3];
  int next_ = 0;
};

// One output row of the 3x3 depthwise conv over channels-last rows of C channels:
// out[wo][o] = (bias[o] + sum_{dy,dx} rows[dy][wo * S + dx][o] * w[3 dy + dx][o]) * mul[wo][o]
// with rows padded as PaddedRows makes them; bias and mul may be null. Sixteen channels at a
// time with their nine taps in registers; at stride 1 four outputs at once share the loads
// of the six input pixels they read.
template <int S>
void conv_row(float* __restrict__ out, const float* const* rows, int64_t rs,
              const float* __restrict__ w, const float* __restrict__ bias,
              const float* __restrict__ mul, int64_t Wo, int64_t C) {
  int64_t o = 0;
  for (; o + kLanes <= C; o += kLanes) {
    vec16 wr[9];
    for (int t = 0; t < 9; ++t) wr[t] = load16(w + t * C + o);
    const vec16 b0 = bias ? load16(bias + o) : vec16{};
    int64_t wo = 0;
    if (S == 1) {
      for (; wo + 4 <= Wo; wo += 4) {
        vec16 a0 = b0, a1 = b0, a2 = b0, a3 = b0;
        for (int dy = 0; dy < 3; ++dy) {
          const float* r = rows[dy] + wo * rs + o;
          const vec16 x0 = load16(r), x1 = load16(r + rs), x2 = load16(r + 2 * rs);
          const vec16 x3 = load16(r + 3 * rs), x4 = load16(r + 4 * rs), x5 = load16(r + 5 * rs);
          const vec16 w0 = wr[3 * dy], w1 = wr[3 * dy + 1], w2 = wr[3 * dy + 2];
          a0 += x0 * w0; a1 += x1 * w0; a2 += x2 * w0; a3 += x3 * w0;
          a0 += x1 * w1; a1 += x2 * w1; a2 += x3 * w1; a3 += x4 * w1;
          a0 += x2 * w2; a1 += x3 * w2; a2 += x4 * w2; a3 += x5 * w2;
        }
        float* dst = out + wo * C + o;
        if (mul) {
          const float* m = mul + wo * C + o;
          a0 *= load16(m), a1 *= load16(m + C), a2 *= load16(m + 2 * C);
          a3 *= load16(m + 3 * C);
        }
        store16(dst, a0), store16(dst + C, a1), store16(dst + 2 * C, a2);
        store16(dst + 3 * C, a3);
      }
    }
    for (; wo < Wo; ++wo) {
      vec16 a = b0;
      for (int dy = 0; dy < 3; ++dy) {
        const float* r = rows[dy] + wo * S * rs + o;
        a += load16(r) * wr[3 * dy];
        a += load16(r + rs) * wr[3 * dy + 1];
        a += load16(r + 2 * rs) * wr[3 * dy + 2];
      }
      if (mul) a *= load16(mul + wo * C + o);
      store16(out + wo * C + o, a);
    }
  }
  for (; o < C; ++o)
    for (int64_t wo = 0; wo < Wo; ++wo) {
      float a = bias ? bias[o] : 0.f;
      for (int dy = 0; dy < 3; ++dy)
        for (int dx = 0; dx < 3; ++dx) a += rows[dy][(wo * S + dx) * rs + o] * w[(3 * dy + dx) * C + o];
      out[wo * C + o] = mul ? a * mul[wo * C + o] : a;
    }
}

// acc[3 dy + dx][o] += sum_wo gy[wo][o] * rows[dy][wo * S + dx][o]: one output row's share
// of the weight gradient, sixteen channels at a time with the nine sums in registers.
template <int S>
void weight_grad_row(float* __restrict__ acc, const float* __restrict__ gy,
                     const float* const* rows, int64_t rs, int64_t Wo, int64_t C) {
  int64_t o = 0;
  for (; o + kLanes <= C; o += kLanes) {
    vec16 s[9] = {};
    for (int64_t wo = 0; wo < Wo; ++wo) {
      const vec16 g = load16(gy + wo * C + o);
      for (int dy = 0; dy < 3; ++dy) {
        const float* r = rows[dy] + wo * S * rs + o;
        s[3 * dy] += g * load16(r);
        s[3 * dy + 1] += g * load16(r + rs);
        s[3 * dy + 2] += g * load16(r + 2 * rs);
      }
    }
    for (int t = 0; t < 9; ++t) store16(acc + t * C + o, load16(acc + t * C + o) + s[t]);
  }
  for (; o < C; ++o)
    for (int64_t wo = 0; wo < Wo; ++wo)
      for (int t = 0; t < 9; ++t)
        acc[t * C + o] += gy[wo * C + o] * rows[t / 3][(wo * S + t % 3) * rs + o];
}

template <int S>
void forward_rows(const float* xp, const float* wp, const float* bp, const float* op, float* yp,
                  const Geometry& g) {
  at::parallel_for(0, g.B * g.Ho, 1, [&](int64_t begin, int64_t end) {
    PaddedRows rows(xp, g.H, g.W, g.n, g.k);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / g.Ho, ho = r % g.Ho;
      const float* in[3];
      for (int dy = 0; dy < 3; ++dy) in[dy] = rows.row(b, ho * S - 1 + dy);
      const int64_t at = r * g.Wo * g.C;
      conv_row<S>(yp + at, in, rows.stride(), wp, bp, op ? op + at : nullptr, g.Wo, g.C);
    }
  });
}

template <int S>
void weight_grad(const float* gp, const float* xp, float* gwp, const Geometry& g) {
  const int64_t threads = at::get_num_threads();
  AlignedFloats partial(threads * 9 * g.C);
  at::parallel_for(0, g.B * g.Ho, 1, [&](int64_t begin, int64_t end) {
    float* acc = partial.data() + at::get_thread_num() * 9 * g.C;
    PaddedRows rows(xp, g.H, g.W, g.n, g.k);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / g.Ho, ho = r % g.Ho;
      const float* in[3];
      for (int dy = 0; dy < 3; ++dy) in[dy] = rows.row(b, ho * S - 1 + dy);
      weight_grad_row<S>(acc, gp + r * g.Wo * g.C, in, rows.stride(), g.Wo, g.C);
    }
  });
  for (int64_t t = 0; t < threads; ++t)
    for (int64_t i = 0; i < 9 * g.C; ++i) gwp[i] += partial.data()[t * 9 * g.C + i];
}

// out[o] = sum_t a[t][o] * b[t][o] (the stride-2 input gradient's gather).
inline void dot_taps(float* __restrict__ out, const float* const* a, const float* const* b,
                     int taps, int64_t C) {
  int64_t o = 0;
  for (; o + kBlock <= C; o += kBlock) {
    vec8 s0 = {}, s1 = {}, s2 = {}, s3 = {};
    for (int t = 0; t < taps; ++t) {
      const float* at = a[t] + o;
      const float* bt = b[t] + o;
      s0 += load(at) * load(bt);
      s1 += load(at + 8) * load(bt + 8);
      s2 += load(at + 16) * load(bt + 16);
      s3 += load(at + 24) * load(bt + 24);
    }
    store(out + o, s0), store(out + o + 8, s1), store(out + o + 16, s2);
    store(out + o + 24, s3);
  }
  for (; o < C; ++o) {
    float acc = 0.f;
    for (int t = 0; t < taps; ++t) acc += a[t][o] * b[t][o];
    out[o] = acc;
  }
}

// Stride 1: the input gradient is the same conv over gy with the kernel turned by 180
// degrees, then the k copies of each channel summed.
void input_grad_stride1(const float* gp, const float* wp, float* gxp, const Geometry& g) {
  AlignedFloats flipped(9 * g.C);
  for (int t = 0; t < 9; ++t)
    std::copy(wp + (8 - t) * g.C, wp + (9 - t) * g.C, flipped.data() + t * g.C);
  at::parallel_for(0, g.B * g.H, 1, [&](int64_t begin, int64_t end) {
    PaddedRows rows(gp, g.Ho, g.Wo, g.C, 1);
    AlignedFloats full(g.W * g.C);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / g.H, hi = r % g.H;
      const float* in[3];
      for (int dy = 0; dy < 3; ++dy) in[dy] = rows.row(b, hi - 1 + dy);
      conv_row<1>(full.data(), in, rows.stride(), flipped.data(), nullptr, nullptr, g.W, g.C);
      for (int64_t wi = 0; wi < g.W; ++wi)
        sum_groups(full.data() + wi * g.C, gxp + (r * g.W + wi) * g.n, g.n, g.k);
    }
  });
}

// Any stride: each input pixel gathers the output pixels whose taps read it.
void input_grad_gather(const float* gp, const float* wp, float* gxp, const Geometry& g) {
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
        dot_taps(tmp.data(), src, wts, taps, g.C);
        sum_groups(tmp.data(), gxp + (r * g.W + wi) * g.n, g.n, g.k);
      }
    }
  });
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
  if (g.s == 1)
    forward_rows<1>(xp, wp, bp, op, yp, g);
  else
    forward_rows<2>(xp, wp, bp, op, yp, g);
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
    if (g.s == 1)
      input_grad_stride1(gp, wp, gx.data_ptr<float>(), g);
    else
      input_grad_gather(gp, wp, gx.data_ptr<float>(), g);
  }
  if (need_w) {
    gw = torch::zeros({9, g.C}, x.options());
    if (g.s == 1)
      weight_grad<1>(gp, xp, gw.data_ptr<float>(), g);
    else
      weight_grad<2>(gp, xp, gw.data_ptr<float>(), g);
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
