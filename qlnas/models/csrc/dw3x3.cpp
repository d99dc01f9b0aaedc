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
#include <utility>
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
// Pixels whose statistics are summed in float before they are added to the double sums.
constexpr int64_t kRowsPerFlush = 256;

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
  const float* data() const { return data_; }

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

// Padded rows filled from a (B, H, W, n) tensor with each channel repeated k times.
struct Expanded {
  const float* src;
  int64_t W, n, k;
  void fill(int64_t key, float* out, int64_t stride) const {
    const float* in = src + key * W * n;
    for (int64_t w = 0; w < W; ++w) expand(in + w * n, out + (w + 1) * stride, n, k);
  }
};

// Padded rows of the gradient that reaches y through p = bn(y) * c in training,
// gy = gp c a + y b + d per channel (`bn_grad_coefficients`), computed from gp, y and c as the
// depthwise backward asks for them instead of written out and read back.
struct BnGrad {
  const float *gp, *y, *c, *a, *b, *d;
  int64_t W, C;
  // The C channels of gy at element offset `at`.
  void pixel(int64_t at, float* __restrict__ o) const {
    const float* __restrict__ g = gp + at;
    const float* __restrict__ yr = y + at;
    const float* __restrict__ cr = c + at;
    for (int64_t ch = 0; ch < C; ++ch) o[ch] = g[ch] * cr[ch] * a[ch] + yr[ch] * b[ch] + d[ch];
  }
  void fill(int64_t key, float* out, int64_t stride) const {
    for (int64_t w = 0; w < W; ++w) pixel((key * W + w) * C, out + (w + 1) * stride);
  }
};

// Rows of C channels with a zero pixel on either side, filled by `Source` and cached for the
// next rows that read them; a row outside the image is all zeros. With the padding every output
// pixel reads all nine taps, so the inner loops have no bounds tests. A pixel takes `stride()`
// floats: C rounded up to 16, plus 16 where that is a multiple of 1024 bytes, so that the loops
// that walk one channel block along a row do not land every load in the same cache set. Rows
// are asked for in increasing order, and the three most recent stay (stride 1 and 2 read at most
// three consecutive rows).
template <typename Source>
class PaddedRows {
 public:
  PaddedRows(Source source, int64_t H, int64_t W, int64_t C)
      : source_(source), H_(H), stride_(pixel_stride(C)), len_((W + 2) * stride_),
        buf_(4 * len_), tag_{-1, -1, -1} {}

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
    source_.fill(key, out, stride_);  // pixels 1 .. W
    return out;
  }

 private:
  Source source_;
  int64_t H_, stride_, len_;
  AlignedFloats buf_;
  int64_t tag_[3];
  int next_ = 0;
};

// The padded rows of x (B, H, W, n) with each channel repeated k times.
PaddedRows<Expanded> expanded_rows(const float* x, int64_t H, int64_t W, int64_t n, int64_t k) {
  return PaddedRows<Expanded>(Expanded{x, W, n, k}, H, W, n * k);
}

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
// of the weight gradient, sixteen channels at a time with the nine sums in registers; a pixel
// of gy takes gs floats.
template <int S>
void weight_grad_row(float* __restrict__ acc, const float* __restrict__ gy, int64_t gs,
                     const float* const* rows, int64_t rs, int64_t Wo, int64_t C) {
  int64_t o = 0;
  for (; o + kLanes <= C; o += kLanes) {
    vec16 s[9] = {};
    for (int64_t wo = 0; wo < Wo; ++wo) {
      const vec16 g = load16(gy + wo * gs + o);
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
        acc[t * C + o] += gy[wo * gs + o] * rows[t / 3][(wo * S + t % 3) * rs + o];
}

// s1[o] += sum_w (row[w][o] - K[o]) and s2[o] += the squares, over one row of W pixels (hot in
// cache right after it is written).
void row_sums(const float* __restrict__ row, const float* __restrict__ K, int64_t W, int64_t C,
              float* __restrict__ s1, float* __restrict__ s2) {
  int64_t o = 0;
  for (; o + kLanes <= C; o += kLanes) {
    const vec16 k0 = load16(K + o);
    vec16 a = load16(s1 + o), q = load16(s2 + o);
    for (int64_t w = 0; w < W; ++w) {
      const vec16 d = load16(row + w * C + o) - k0;
      a += d;
      q += d * d;
    }
    store16(s1 + o, a), store16(s2 + o, q);
  }
  for (; o < C; ++o)
    for (int64_t w = 0; w < W; ++w) {
      const float d = row[w * C + o] - K[o];
      s1[o] += d;
      s2[o] += d * d;
    }
}

// The output rows of the conv; with `sums` (threads x 2C doubles) each thread also adds the
// per-channel sums of (y - K) and (y - K)^2 of the rows it wrote, for a train-mode BN after it:
// in float over about kRowsPerFlush pixels, then in double.
template <int S>
void forward_rows(const float* xp, const float* wp, const float* bp, const float* op, float* yp,
                  const Geometry& g, const float* K = nullptr, double* sums = nullptr) {
  at::parallel_for(0, g.B * g.Ho, 1, [&](int64_t begin, int64_t end) {
    auto rows = expanded_rows(xp, g.H, g.W, g.n, g.k);
    double* tot = sums ? sums + at::get_thread_num() * 2 * g.C : nullptr;
    AlignedFloats acc(tot ? 2 * g.C : 1);
    int64_t pending = 0;
    auto flush = [&] {
      for (int64_t i = 0; i < 2 * g.C; ++i) tot[i] += acc.data()[i], acc.data()[i] = 0.f;
      pending = 0;
    };
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / g.Ho, ho = r % g.Ho;
      const float* in[3];
      for (int dy = 0; dy < 3; ++dy) in[dy] = rows.row(b, ho * S - 1 + dy);
      const int64_t at = r * g.Wo * g.C;
      conv_row<S>(yp + at, in, rows.stride(), wp, bp, op ? op + at : nullptr, g.Wo, g.C);
      if (!tot) continue;
      row_sums(yp + at, K, g.Wo, g.C, acc.data(), acc.data() + g.C);
      if ((pending += g.Wo) >= kRowsPerFlush) flush();
    }
    if (tot && pending) flush();
  });
}

// dw(x) at output pixel (0, 0, 0): a value of the data's own scale, which the statistics are
// summed around so that a large mean does not cancel.
std::vector<float> first_pixel(const float* xp, const float* wp, const Geometry& g) {
  std::vector<float> out(g.C, 0.f);
  for (int64_t dy = 0; dy < 3; ++dy)
    for (int64_t dx = 0; dx < 3; ++dx) {
      const int64_t h = dy - 1, w = dx - 1;
      if (h < 0 || h >= g.H || w < 0 || w >= g.W) continue;
      for (int64_t o = 0; o < g.C; ++o)
        out[o] += xp[(h * g.W + w) * g.n + o / g.k] * wp[(3 * dy + dx) * g.C + o];
    }
  return out;
}

// Sums the per-thread partial weight gradients into gw.
void add_partials(const AlignedFloats& partial, int64_t threads, int64_t size, float* gwp) {
  const float* src = partial.data();
  for (int64_t t = 0; t < threads; ++t)
    for (int64_t i = 0; i < size; ++i) gwp[i] += src[t * size + i];
}

template <int S>
void weight_grad(const float* gp, const float* xp, float* gwp, const Geometry& g) {
  const int64_t threads = at::get_num_threads();
  AlignedFloats partial(threads * 9 * g.C);
  at::parallel_for(0, g.B * g.Ho, 1, [&](int64_t begin, int64_t end) {
    float* acc = partial.data() + at::get_thread_num() * 9 * g.C;
    auto rows = expanded_rows(xp, g.H, g.W, g.n, g.k);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / g.Ho, ho = r % g.Ho;
      const float* in[3];
      for (int dy = 0; dy < 3; ++dy) in[dy] = rows.row(b, ho * S - 1 + dy);
      weight_grad_row<S>(acc, gp + r * g.Wo * g.C, g.C, in, rows.stride(), g.Wo, g.C);
    }
  });
  add_partials(partial, threads, 9 * g.C, gwp);
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

// Stride 1, one sweep over the rows for both gradients, each row of gy (filled by `Source`)
// made once per thread: the input gradient is the same conv over gy with the kernel turned by
// 180 degrees, then the k copies of each channel summed; the weight gradient pairs the row of
// gy with the three rows of x it read. gxp or gwp may be null.
template <typename Source>
void backward_stride1(Source gy, const float* xp, const float* wp, float* gxp, float* gwp,
                      const Geometry& g) {
  AlignedFloats flipped(9 * g.C);
  for (int t = 0; t < 9; ++t)
    std::copy(wp + (8 - t) * g.C, wp + (9 - t) * g.C, flipped.data() + t * g.C);
  const int64_t threads = at::get_num_threads();
  AlignedFloats partial(gwp ? threads * 9 * g.C : 1);
  at::parallel_for(0, g.B * g.H, 1, [&](int64_t begin, int64_t end) {
    PaddedRows<Source> grows(gy, g.Ho, g.Wo, g.C);
    auto xrows = expanded_rows(xp, g.H, g.W, g.n, g.k);
    AlignedFloats full(gxp ? g.W * g.C : 1);
    float* acc = gwp ? partial.data() + at::get_thread_num() * 9 * g.C : nullptr;
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / g.H, h = r % g.H;
      const float* gin[3];
      for (int dy = 0; dy < 3; ++dy) gin[dy] = grows.row(b, h - 1 + dy);
      const int64_t gs = grows.stride();
      if (gxp) {
        conv_row<1>(full.data(), gin, gs, flipped.data(), nullptr, nullptr, g.W, g.C);
        for (int64_t w = 0; w < g.W; ++w)
          sum_groups(full.data() + w * g.C, gxp + (r * g.W + w) * g.n, g.n, g.k);
      }
      if (gwp) {
        const float* xin[3];
        for (int dy = 0; dy < 3; ++dy) xin[dy] = xrows.row(b, h - 1 + dy);
        weight_grad_row<1>(acc, gin[1] + gs, gs, xin, xrows.stride(), g.Wo, g.C);
      }
    }
  });
  if (gwp) add_partials(partial, threads, 9 * g.C, gwp);
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

namespace {

// The gradients of the depthwise conv given gy's rows from `gy` (stride 1) or gy itself.
std::vector<torch::Tensor> conv_backward(const float* gp, const torch::Tensor& x,
                                         const torch::Tensor& weight, const Geometry& g,
                                         bool need_x, bool need_w,
                                         const BnGrad* bn_grad = nullptr) {
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  torch::Tensor gx, gw;
  if (need_x) gx = torch::empty_like(x);
  if (need_w) gw = torch::zeros({9, g.C}, x.options());
  float* gxp = need_x ? gx.data_ptr<float>() : nullptr;
  float* gwp = need_w ? gw.data_ptr<float>() : nullptr;
  if (g.s == 1) {
    if (bn_grad)
      backward_stride1(*bn_grad, xp, wp, gxp, gwp, g);
    else
      backward_stride1(Expanded{gp, g.Wo, g.C, 1}, xp, wp, gxp, gwp, g);
  } else {
    if (gxp) input_grad_gather(gp, wp, gxp, g);
    if (gwp) weight_grad<2>(gp, xp, gwp, g);
  }
  return {gx, gw};
}

// ---- train-mode BatchNorm followed by a product: p = bn(y) * c ----
// y, c: (P, C) channels-last rows. Statistics are summed in float over blocks of rows, then in
// double, around a per-channel shift K (a pixel of the data), so large means do not cancel.

// row_fn(r) for every row r in [0, P), in parallel.
template <typename RowFn>
void for_each_row(int64_t P, RowFn row_fn) {
  at::parallel_for(0, P, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) row_fn(r);
  });
}

// The per-thread partial sums (threads x 2C) added up: 2C doubles.
std::vector<double> reduce_threads(const std::vector<double>& total, int64_t threads, int64_t C) {
  std::vector<double> sums(2 * C, 0.0);
  for (int64_t t = 0; t < threads; ++t)
    for (int64_t i = 0; i < 2 * C; ++i) sums[i] += total[t * 2 * C + i];
  return sums;
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
  return reduce_threads(total, threads, C);
}

// The batch mean, 1/sqrt(var + eps) (biased var) and the unbiased variance (for the running
// estimate) from the sums of (y - K) and (y - K)^2 over P rows.
std::vector<torch::Tensor> batch_stats(const std::vector<double>& sums, const float* K,
                                       int64_t P, int64_t C, double eps,
                                       const torch::TensorOptions& opts) {
  auto mean = torch::empty({C}, opts), invstd = torch::empty({C}, opts);
  auto var_unbiased = torch::empty({C}, opts);
  float* mean_p = mean.data_ptr<float>();
  float* invstd_p = invstd.data_ptr<float>();
  float* var_p = var_unbiased.data_ptr<float>();
  for (int64_t o = 0; o < C; ++o) {
    const double m1 = sums[o] / P;
    const double var = std::max(sums[C + o] / P - m1 * m1, 0.0);
    mean_p[o] = static_cast<float>(K[o] + m1);
    invstd_p[o] = static_cast<float>(1.0 / std::sqrt(var + eps));
    var_p[o] = static_cast<float>(P > 1 ? var * P / (P - 1) : var);
  }
  return {mean, invstd, var_unbiased};
}

// The train-mode BN as y * scale + shift per channel.
std::pair<std::vector<float>, std::vector<float>> bn_affine(
    const torch::Tensor& mean, const torch::Tensor& invstd, const torch::Tensor& gamma,
    const torch::Tensor& beta) {
  const int64_t C = mean.numel();
  const float* mu = mean.data_ptr<float>();
  const float* is = invstd.data_ptr<float>();
  const float* ga = gamma.data_ptr<float>();
  const float* be = beta.data_ptr<float>();
  std::vector<float> scale(C), shift(C);
  for (int64_t o = 0; o < C; ++o) {
    scale[o] = static_cast<float>(double(ga[o]) * is[o]);
    shift[o] = static_cast<float>(be[o] - double(mu[o]) * ga[o] * is[o]);
  }
  return {scale, shift};
}

// gy of `src` for all of y's P pixels, written out.
torch::Tensor bn_grad(const BnGrad& src, const torch::Tensor& y) {
  auto gy = torch::empty_like(y);
  float* gyp = gy.data_ptr<float>();
  for_each_row(y.numel() / src.C, [&](int64_t r) { src.pixel(r * src.C, gyp + r * src.C); });
  return gy;
}

}  // namespace

// Gradients of y = dw(x) (no bias, no product) given gy: (B, Ho, Wo, n*k).
// Returns gx (B, H, W, n) if needed and gw (9, n*k) if needed.
std::vector<torch::Tensor> dw3x3_backward(torch::Tensor gy, torch::Tensor x,
                                          torch::Tensor weight, int64_t k, int64_t stride,
                                          bool need_x, bool need_w) {
  return conv_backward(gy.data_ptr<float>(), x, weight, geometry(x, k, stride), need_x, need_w);
}

// p = (y - mean) * invstd * gamma + beta, times c.
torch::Tensor bn_mul_apply(torch::Tensor y, torch::Tensor c, torch::Tensor mean,
                           torch::Tensor invstd, torch::Tensor gamma, torch::Tensor beta) {
  const int64_t C = y.size(-1), P = y.numel() / C;
  const float* yp = y.data_ptr<float>();
  const float* cp = c.data_ptr<float>();
  const auto [scale, shift] = bn_affine(mean, invstd, gamma, beta);
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
  return p;
}

// The batch mean, 1/sqrt(var + eps) and unbiased variance of y (P, C) over its rows.
std::vector<torch::Tensor> bn_stats(torch::Tensor y, double eps) {
  const int64_t C = y.size(-1), P = y.numel() / C;
  const float* yp = y.data_ptr<float>();
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
  return batch_stats(sums, K, P, C, eps, y.options());
}

// y = dw(x) (B, Ho, Wo, n*k) with its batch statistics summed as the rows are written (one pass
// less over y than the conv and then a train-mode BN): y, mean, invstd, unbiased variance.
std::vector<torch::Tensor> dw3x3_forward_stats(torch::Tensor x, torch::Tensor weight, int64_t k,
                                               int64_t stride, double eps) {
  const Geometry g = geometry(x, k, stride);
  auto y = torch::empty({g.B, g.Ho, g.Wo, g.C}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const std::vector<float> K = first_pixel(xp, wp, g);
  const int64_t threads = at::get_num_threads();
  std::vector<double> total(threads * 2 * g.C, 0.0);
  if (g.s == 1)
    forward_rows<1>(xp, wp, nullptr, nullptr, yp, g, K.data(), total.data());
  else
    forward_rows<2>(xp, wp, nullptr, nullptr, yp, g, K.data(), total.data());
  auto stats = batch_stats(reduce_threads(total, threads, g.C), K.data(), g.B * g.Ho * g.Wo,
                           g.C, eps, x.options());
  return {y, stats[0], stats[1], stats[2]};
}

// p = bn(y) * c with the batch statistics: p, mean, invstd, unbiased variance.
std::vector<torch::Tensor> bn_mul_forward(torch::Tensor y, torch::Tensor c, torch::Tensor gamma,
                                          torch::Tensor beta, double eps) {
  auto stats = bn_stats(y, eps);
  return {bn_mul_apply(y, c, stats[0], stats[1], gamma, beta), stats[0], stats[1], stats[2]};
}

// The first pass of the gradients of p = bn(y) * c: gc, dgamma, dbeta, and the per-channel
// a, b, d of gy = gp c a + y b + d (the train-mode BN backward).
std::vector<torch::Tensor> bn_mul_grad_sums(torch::Tensor gp, torch::Tensor y, torch::Tensor c,
                                            torch::Tensor mean, torch::Tensor invstd,
                                            torch::Tensor gamma, torch::Tensor beta) {
  const int64_t C = y.size(-1), P = y.numel() / C;
  const float* gpp = gp.data_ptr<float>();
  const float* yp = y.data_ptr<float>();
  const float* cp = c.data_ptr<float>();
  const float* mu = mean.data_ptr<float>();
  const float* is = invstd.data_ptr<float>();
  const float* ga = gamma.data_ptr<float>();
  const auto [scale, shift] = bn_affine(mean, invstd, gamma, beta);
  const float* sc = scale.data();
  const float* sh = shift.data();
  auto gc = torch::empty_like(c);
  float* gcp = gc.data_ptr<float>();
  // gc = gp * bn(y); sums of gz = gp * c and of gz * (y - mean).
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
  auto opts = y.options();
  auto dgamma = torch::empty({C}, opts), dbeta = torch::empty({C}, opts);
  auto a = torch::empty({C}, opts), b = torch::empty({C}, opts), d = torch::empty({C}, opts);
  float* dgamma_p = dgamma.data_ptr<float>();
  float* dbeta_p = dbeta.data_ptr<float>();
  float* ap = a.data_ptr<float>();
  float* bp = b.data_ptr<float>();
  float* dp = d.data_ptr<float>();
  for (int64_t o = 0; o < C; ++o) {
    const double s_gz = sums[o], s_gzy = sums[C + o];
    dbeta_p[o] = static_cast<float>(s_gz);
    dgamma_p[o] = static_cast<float>(s_gzy * is[o]);
    const double ai = double(ga[o]) * is[o];
    const double bi = -ai * is[o] * is[o] * s_gzy / P;
    ap[o] = static_cast<float>(ai);
    bp[o] = static_cast<float>(bi);
    dp[o] = static_cast<float>(-ai * s_gz / P - mu[o] * bi);
  }
  return {gc, dgamma, dbeta, a, b, d};
}

// Gradients of p = bn(y) * c: gy, gc, dgamma, dbeta.
std::vector<torch::Tensor> bn_mul_backward(torch::Tensor gp, torch::Tensor y, torch::Tensor c,
                                           torch::Tensor mean, torch::Tensor invstd,
                                           torch::Tensor gamma, torch::Tensor beta) {
  auto first = bn_mul_grad_sums(gp, y, c, mean, invstd, gamma, beta);
  const BnGrad src{gp.data_ptr<float>(), y.data_ptr<float>(), c.data_ptr<float>(),
                   first[3].data_ptr<float>(), first[4].data_ptr<float>(),
                   first[5].data_ptr<float>(), 1, y.size(-1)};
  return {bn_grad(src, y), first[0], first[1], first[2]};
}

// Gradients of p = bn(dw(x)) * c given gp, with y = dw(x) and a, b, d from bn_mul_grad_sums:
// gx and gw of the conv, gy computed row by row as the conv's backward reads it (stride 1).
std::vector<torch::Tensor> dw3x3_bn_backward(torch::Tensor gp, torch::Tensor y, torch::Tensor c,
                                             torch::Tensor a, torch::Tensor b, torch::Tensor d,
                                             torch::Tensor x, torch::Tensor weight, int64_t k,
                                             int64_t stride, bool need_x, bool need_w) {
  const Geometry g = geometry(x, k, stride);
  const BnGrad src{gp.data_ptr<float>(), y.data_ptr<float>(), c.data_ptr<float>(),
                   a.data_ptr<float>(), b.data_ptr<float>(), d.data_ptr<float>(), g.Wo, g.C};
  if (g.s == 1) return conv_backward(nullptr, x, weight, g, need_x, need_w, &src);
  const torch::Tensor gy = bn_grad(src, y);  // stride 2 reads gy by pixel, not by row
  return conv_backward(gy.data_ptr<float>(), x, weight, g, need_x, need_w);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &dw3x3_forward, "3x3 depthwise conv with multiplier (NHWC, fp32)");
  m.def("backward", &dw3x3_backward, "its input and weight gradients");
  m.def("forward_stats", &dw3x3_forward_stats, "the conv and the batch statistics of its output");
  m.def("bn_mul_forward", &bn_mul_forward, "train-mode BatchNorm then a product (NHWC, fp32)");
  m.def("bn_mul_apply", &bn_mul_apply, "the BatchNorm with given statistics, then the product");
  m.def("bn_mul_backward", &bn_mul_backward, "its gradients");
  m.def("bn_mul_grad_sums", &bn_mul_grad_sums, "their first pass");
  m.def("bn_backward", &dw3x3_bn_backward, "the conv's gradients through the BN and product");
}
