// gelu(depthwise 3x3 conv + bias) and its gradients, NHWC, as XLA:CPU FFI custom calls.
//
// XLA:CPU cannot express this in one pass: it writes each of the 9 taps' shifted products to
// memory before reducing them (docs/performance.md). Here each example's rows stay in cache:
// the backward pass recomputes the pre-activation, keeps its cotangent for one example in a
// float32 scratch (H*W*C*4 bytes: 128 KiB at tld-tiny's MLP, 2 MiB at at1's) and from it
// forms dx, the kernel gradient and the bias gradient. The math is float32 whatever the
// storage type (float32 or bfloat16); the kernel and bias gradients are returned per example
// (B, 9, C) and (B, C), so that the sum over a batch split across devices is XLA's.
// Examples are spread over XLA's intra-op thread pool; every thread, the caller included,
// takes examples from one counter, so the call never waits on a thread that is not working.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
// One build runs on any x86-64 CPU and uses AVX-512 or AVX2 where the CPU has them.
#define AT1_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define AT1_CLONES
#endif

inline float Bf16ToF32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t F32ToBf16(float f) {  // round to nearest even, as XLA and ml_dtypes do
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

template <typename T>
inline float Load(const T* p);
template <>
inline float Load<float>(const float* p) { return *p; }
template <>
inline float Load<uint16_t>(const uint16_t* p) { return Bf16ToF32(*p); }

template <typename T>
inline void Store(T* p, float v);
template <>
inline void Store<float>(float* p, float v) { *p = v; }
template <>
inline void Store<uint16_t>(uint16_t* p, float v) { *p = F32ToBf16(v); }

// erf by the rational approximation XLA and Eigen use for float32 (|error| < 2 ulp).
inline float Erf(float x) {
  x = std::min(std::max(x, -3.832506856900711f), 3.832506856900711f);
  const float x2 = x * x;
  float p = -2.72614225801306e-10f;
  p = p * x2 + 2.77068142495902e-08f;
  p = p * x2 + -2.10102402082508e-06f;
  p = p * x2 + -5.69250639462346e-05f;
  p = p * x2 + -7.34990630326855e-04f;
  p = p * x2 + -2.95459980854025e-03f;
  p = p * x2 + -1.60960333262415e-02f;
  float q = -1.45660718464996e-05f;
  q = q * x2 + -2.13374055278905e-04f;
  q = q * x2 + -1.68282697438203e-03f;
  q = q * x2 + -7.37332916720468e-03f;
  q = q * x2 + -1.42647390514189e-02f;
  return x * p / q;
}

// exp(x) for x <= 0 (the Gaussian density's exponent): Cody-Waite reduction and a degree-6
// polynomial, ~1 ulp; below -87 it is 0, as float32's exp underflows there.
inline float ExpNonPositive(float x) {
  x = std::max(x, -87.0f);
  const float n = std::nearbyint(x * 1.44269504088896341f);
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t e = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &e, 4);
  return p * scale;
}

constexpr float kInvSqrt2 = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;

inline float Gelu(float a) { return 0.5f * a * (1.0f + Erf(a * kInvSqrt2)); }

inline float GeluGrad(float a) {
  const float cdf = 0.5f * (1.0f + Erf(a * kInvSqrt2));
  return cdf + a * ExpNonPositive(-0.5f * a * a) * kInvSqrt2Pi;
}

struct Shape {
  int64_t H, W, C;
};

// acc[c] = b[c] + sum over valid taps of x[y+i-1, x+j-1, c] * w[i, j, c], for one output pixel.
template <typename T>
inline void Taps(const T* x, const float* w, const float* bias, const Shape& s, int64_t y,
                 int64_t xx, float* acc) {
  const int64_t C = s.C;
  for (int64_t c = 0; c < C; ++c) acc[c] = bias[c];
  for (int i = 0; i < 3; ++i) {
    const int64_t yy = y + i - 1;
    if (yy < 0 || yy >= s.H) continue;
    for (int j = 0; j < 3; ++j) {
      const int64_t xj = xx + j - 1;
      if (xj < 0 || xj >= s.W) continue;
      const T* xp = x + (yy * s.W + xj) * C;
      const float* wp = w + (i * 3 + j) * C;
      for (int64_t c = 0; c < C; ++c) acc[c] += Load(xp + c) * wp[c];
    }
  }
}

template <typename T>
AT1_CLONES void ForwardExample(const T* x, const float* w, const float* bias, const Shape& s,
                               T* y, float* acc) {
  for (int64_t r = 0; r < s.H; ++r) {
    for (int64_t q = 0; q < s.W; ++q) {
      Taps(x, w, bias, s, r, q, acc);
      T* yp = y + (r * s.W + q) * s.C;
      for (int64_t c = 0; c < s.C; ++c) Store(yp + c, Gelu(acc[c]));
    }
  }
}

// da = dy * gelu'(conv(x)); dx = conv of da with the flipped kernel; dw, db summed over pixels.
template <typename T>
AT1_CLONES void BackwardExample(const T* x, const float* w, const float* bias, const T* dy,
                                const Shape& s, T* dx, float* dw, float* db, float* da,
                                float* acc) {
  const int64_t C = s.C;
  std::fill(dw, dw + 9 * C, 0.0f);
  std::fill(db, db + C, 0.0f);
  for (int64_t r = 0; r < s.H; ++r) {
    for (int64_t q = 0; q < s.W; ++q) {
      Taps(x, w, bias, s, r, q, acc);
      const int64_t p = (r * s.W + q) * C;
      float* dap = da + p;
      for (int64_t c = 0; c < C; ++c) {
        dap[c] = Load(dy + p + c) * GeluGrad(acc[c]);
        db[c] += dap[c];
      }
      // This pixel's share of the kernel gradient: tap (i, j) saw x[r+i-1, q+j-1].
      for (int i = 0; i < 3; ++i) {
        const int64_t yy = r + i - 1;
        if (yy < 0 || yy >= s.H) continue;
        for (int j = 0; j < 3; ++j) {
          const int64_t xj = q + j - 1;
          if (xj < 0 || xj >= s.W) continue;
          const T* xp = x + (yy * s.W + xj) * C;
          float* dwp = dw + (i * 3 + j) * C;
          for (int64_t c = 0; c < C; ++c) dwp[c] += Load(xp + c) * dap[c];
        }
      }
    }
  }
  // dx[r, q] = sum over taps of da[r-i+1, q-j+1] * w[i, j].
  for (int64_t r = 0; r < s.H; ++r) {
    for (int64_t q = 0; q < s.W; ++q) {
      for (int64_t c = 0; c < C; ++c) acc[c] = 0.0f;
      for (int i = 0; i < 3; ++i) {
        const int64_t yy = r - i + 1;
        if (yy < 0 || yy >= s.H) continue;
        for (int j = 0; j < 3; ++j) {
          const int64_t xj = q - j + 1;
          if (xj < 0 || xj >= s.W) continue;
          const float* dap = da + (yy * s.W + xj) * C;
          const float* wp = w + (i * 3 + j) * C;
          for (int64_t c = 0; c < C; ++c) acc[c] += dap[c] * wp[c];
        }
      }
      T* dxp = dx + (r * s.W + q) * C;
      for (int64_t c = 0; c < C; ++c) Store(dxp + c, acc[c]);
    }
  }
}

// Runs body(example, scratch) for every example on the caller and the pool's threads.
template <typename Body>
void ForEachExample(ffi::ThreadPool& pool, int64_t B, int64_t scratch_floats, Body body) {
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    std::mutex mu;
    std::condition_variable cv;
  };
  auto state = std::make_shared<State>();
  auto work = [state, B, scratch_floats, body]() {
    std::vector<float> scratch;
    for (int64_t e; (e = state->next.fetch_add(1)) < B;) {
      if (scratch.empty()) scratch.resize(scratch_floats);
      body(e, scratch.data());
      if (state->done.fetch_add(1) + 1 == B) {
        std::lock_guard<std::mutex> lock(state->mu);
        state->cv.notify_all();
      }
    }
  };
  const int64_t helpers = std::min<int64_t>(std::max<int64_t>(pool.num_threads() - 1, 0), B - 1);
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule(decltype(work)(work));
  work();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done.load() == B; });
}

ffi::Error CheckShapes(const ffi::AnyBuffer& x, const ffi::Buffer<ffi::F32>& w,
                       const ffi::Buffer<ffi::F32>& b, Shape* s, int64_t* B) {
  auto d = x.dimensions();
  if (d.size() != 4) return ffi::Error::InvalidArgument("x must be (B, H, W, C)");
  *B = d[0];
  *s = Shape{d[1], d[2], d[3]};
  if (w.element_count() != 9 * s->C || b.element_count() != s->C)
    return ffi::Error::InvalidArgument("w must be (3, 3, C) and b (C,) for x's C");
  if (x.element_type() != ffi::F32 && x.element_type() != ffi::BF16)
    return ffi::Error::InvalidArgument("x must be float32 or bfloat16");
  return ffi::Error::Success();
}

ffi::Error ForwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::F32> w,
                       ffi::Buffer<ffi::F32> b, ffi::Result<ffi::AnyBuffer> y) {
  Shape s;
  int64_t B;
  if (ffi::Error e = CheckShapes(x, w, b, &s, &B); e.failure()) return e;
  if (y->element_type() != x.element_type())
    return ffi::Error::InvalidArgument("y must have x's dtype");
  const int64_t n = s.H * s.W * s.C;
  const float* wp = w.typed_data();
  const float* bp = b.typed_data();
  if (x.element_type() == ffi::BF16) {
    auto* xp = static_cast<const uint16_t*>(x.untyped_data());
    auto* yp = static_cast<uint16_t*>(y->untyped_data());
    ForEachExample(pool, B, s.C, [=](int64_t e, float* acc) {
      ForwardExample(xp + e * n, wp, bp, s, yp + e * n, acc);
    });
  } else {
    auto* xp = static_cast<const float*>(x.untyped_data());
    auto* yp = static_cast<float*>(y->untyped_data());
    ForEachExample(pool, B, s.C, [=](int64_t e, float* acc) {
      ForwardExample(xp + e * n, wp, bp, s, yp + e * n, acc);
    });
  }
  return ffi::Error::Success();
}

ffi::Error BackwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::F32> w,
                        ffi::Buffer<ffi::F32> b, ffi::AnyBuffer dy,
                        ffi::Result<ffi::AnyBuffer> dx, ffi::Result<ffi::Buffer<ffi::F32>> dw,
                        ffi::Result<ffi::Buffer<ffi::F32>> db) {
  Shape s;
  int64_t B;
  if (ffi::Error e = CheckShapes(x, w, b, &s, &B); e.failure()) return e;
  if (dy.element_type() != x.element_type() || dx->element_type() != x.element_type())
    return ffi::Error::InvalidArgument("dy and dx must have x's dtype");
  if (dw->element_count() != B * 9 * s.C || db->element_count() != B * s.C)
    return ffi::Error::InvalidArgument("dw must be (B, 9, C) and db (B, C)");
  const int64_t n = s.H * s.W * s.C;
  const float* wp = w.typed_data();
  const float* bp = b.typed_data();
  float* dwp = dw->typed_data();
  float* dbp = db->typed_data();
  const int64_t C = s.C;
  const int64_t scratch = n + C;
  if (x.element_type() == ffi::BF16) {
    auto* xp = static_cast<const uint16_t*>(x.untyped_data());
    auto* dyp = static_cast<const uint16_t*>(dy.untyped_data());
    auto* dxp = static_cast<uint16_t*>(dx->untyped_data());
    ForEachExample(pool, B, scratch, [=](int64_t e, float* tmp) {
      BackwardExample(xp + e * n, wp, bp, dyp + e * n, s, dxp + e * n, dwp + e * 9 * C,
                      dbp + e * C, tmp, tmp + n);
    });
  } else {
    auto* xp = static_cast<const float*>(x.untyped_data());
    auto* dyp = static_cast<const float*>(dy.untyped_data());
    auto* dxp = static_cast<float*>(dx->untyped_data());
    ForEachExample(pool, B, scratch, [=](int64_t e, float* tmp) {
      BackwardExample(xp + e * n, wp, bp, dyp + e * n, s, dxp + e * n, dwp + e * 9 * C,
                      dbp + e * C, tmp, tmp + n);
    });
  }
  return ffi::Error::Success();
}

}  // namespace

// The library is built with hidden visibility; these two are what Python looks up.
extern "C" __attribute__((visibility("default"))) XLA_FFI_Error* At1DepthwiseGeluForward(
    XLA_FFI_CallFrame* call_frame);
extern "C" __attribute__((visibility("default"))) XLA_FFI_Error* At1DepthwiseGeluBackward(
    XLA_FFI_CallFrame* call_frame);

XLA_FFI_DEFINE_HANDLER_SYMBOL(At1DepthwiseGeluForward, ForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(At1DepthwiseGeluBackward, BackwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
