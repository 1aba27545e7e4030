// gelu(depthwise 3x3 conv + bias) and its gradients, NHWC, as XLA:CPU FFI custom calls.
//
// XLA:CPU cannot express this in one pass: it writes each of the 9 taps' shifted products to
// memory before reducing them (docs/performance.md). Here one example is done at a time, 32
// channels at a time: the block's inputs are converted to float32 once into a scratch of
// H*W*32 floats (8 KiB at tld-tiny's 8x8 map, 32 KiB at at1's 16x16), the kernel's taps and
// the sums stay in vector registers, and the backward pass recomputes the pre-activation and
// keeps the GELU's cotangent for the block in a second such scratch, from which it forms dx,
// the kernel gradient and the bias gradient. The math is float32 whatever the storage type
// (float32 or bfloat16); the kernel and bias gradients are returned per example, (B, 9, C)
// and (B, C), so that the sum over a batch split across devices is XLA's.
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
#include <type_traits>
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
// Everything a cloned function calls is inlined into it, so that it is compiled for that
// clone's instruction set (an out-of-line copy would be built for the baseline x86-64).
#define AT1_INLINE inline __attribute__((always_inline))

// Sixteen float32 lanes (one AVX-512 register, two AVX2 ones); the math below is written once
// for V = float (the channels left over) and V = VF.
typedef float VF __attribute__((vector_size(64)));
typedef int32_t VI __attribute__((vector_size(64)));
typedef uint32_t VU __attribute__((vector_size(64)));
typedef uint16_t VH __attribute__((vector_size(32)));

template <typename V>
constexpr int kLanes = sizeof(V) / sizeof(float);

template <typename V>
AT1_INLINE V Splat(float f) {
  if constexpr (std::is_same_v<V, float>) {
    return f;
  } else {
    return V{} + f;
  }
}

// For vectors the comparison selects lane by lane.
template <typename V>
AT1_INLINE V Min(V a, V b) {
  return a < b ? a : b;
}

template <typename V>
AT1_INLINE V Max(V a, V b) {
  return a < b ? b : a;
}

template <typename To, typename From>
AT1_INLINE To BitCast(const From& f) {
  static_assert(sizeof(To) == sizeof(From));
  To t;
  std::memcpy(&t, &f, sizeof(To));
  return t;
}

AT1_INLINE float Bf16ToF32(uint16_t h) { return BitCast<float>(static_cast<uint32_t>(h) << 16); }

AT1_INLINE uint16_t F32ToBf16(float f) {  // round to nearest even, as XLA and ml_dtypes do
  uint32_t u = BitCast<uint32_t>(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// Loads and stores of V's lanes from float32 or bfloat16 (uint16_t) storage.
template <typename V>
AT1_INLINE V Load(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

template <typename V>
AT1_INLINE V Load(const uint16_t* p) {
  if constexpr (std::is_same_v<V, float>) {
    return Bf16ToF32(*p);
  } else {
    VH h;
    std::memcpy(&h, p, sizeof(VH));
    return BitCast<VF>(__builtin_convertvector(h, VU) << 16);
  }
}

template <typename V>
AT1_INLINE void Store(float* p, V v) {
  std::memcpy(p, &v, sizeof(V));
}

template <typename V>
AT1_INLINE void Store(uint16_t* p, V v) {
  if constexpr (std::is_same_v<V, float>) {
    *p = F32ToBf16(v);
  } else {
    const VU u = BitCast<VU>(v);
    const VU rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    const VU r = (u & 0x7fffffffu) > 0x7f800000u ? (u >> 16) | 0x40u : rounded;  // NaN stays NaN
    const VH h = __builtin_convertvector(r, VH);
    std::memcpy(p, &h, sizeof(VH));
  }
}

// erf by the rational approximation XLA and Eigen use for float32 (|error| < 2 ulp).
template <typename V>
AT1_INLINE V Erf(V x) {
  const float lim = 3.832506856900711f;
  x = Min<V>(Max<V>(x, Splat<V>(-lim)), Splat<V>(lim));
  const V x2 = x * x;
  V p = Splat<V>(-2.72614225801306e-10f);
  p = p * x2 + 2.77068142495902e-08f;
  p = p * x2 + -2.10102402082508e-06f;
  p = p * x2 + -5.69250639462346e-05f;
  p = p * x2 + -7.34990630326855e-04f;
  p = p * x2 + -2.95459980854025e-03f;
  p = p * x2 + -1.60960333262415e-02f;
  V q = Splat<V>(-1.45660718464996e-05f);
  q = q * x2 + -2.13374055278905e-04f;
  q = q * x2 + -1.68282697438203e-03f;
  q = q * x2 + -7.37332916720468e-03f;
  q = q * x2 + -1.42647390514189e-02f;
  return x * p / q;
}

// exp(x) for x <= 0 (the Gaussian density's exponent): Cody-Waite reduction and a degree-6
// polynomial, ~1 ulp; below -87 it is 0, as float32's exp underflows there.
template <typename V>
AT1_INLINE V ExpNonPositive(V x) {
  x = Max<V>(x, Splat<V>(-87.0f));
  // Round to the nearest integer: adding and subtracting 1.5 * 2^23 (|x * log2 e| < 2^22).
  const float magic = 12582912.0f;
  const V n = (x * 1.44269504088896341f + magic) - magic;
  V r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  V p = Splat<V>(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  if constexpr (std::is_same_v<V, float>) {
    return p * BitCast<float>((static_cast<int32_t>(n) + 127) << 23);
  } else {
    return p * BitCast<VF>((__builtin_convertvector(n, VI) + 127) << 23);
  }
}

constexpr float kInvSqrt2 = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;

template <typename V>
AT1_INLINE V Gelu(V a) {
  return 0.5f * a * (1.0f + Erf<V>(a * kInvSqrt2));
}

template <typename V>
AT1_INLINE V GeluGrad(V a) {
  const V cdf = 0.5f * (1.0f + Erf<V>(a * kInvSqrt2));
  return cdf + a * ExpNonPositive<V>(-0.5f * a * a) * kInvSqrt2Pi;
}

struct Shape {
  int64_t H, W, C;
};

// The loops below take N vectors of V's lanes, K = N * lanes channels from c0, at a time: a
// pixel's sums and a tap's kernel gradient stay in registers instead of memory.

// The kernel's 9 taps for channels c0 .. c0+K, loaded once per block (kept in registers).
template <typename V, int N>
struct Kernel {
  V w[9][N];
  V b[N];
};

template <typename V, int N>
AT1_INLINE Kernel<V, N> LoadKernel(const float* w, const float* bias, int64_t C, int64_t c0) {
  constexpr int L = kLanes<V>;
  Kernel<V, N> k;
  for (int t = 0; t < 9; ++t)
    for (int n = 0; n < N; ++n) k.w[t][n] = Load<V>(w + t * C + c0 + n * L);
  for (int n = 0; n < N; ++n) k.b[n] = Load<V>(bias + c0 + n * L);
  return k;
}

// a[n] = b + sum over valid taps of x[r+i-1, q+j-1] * w[i, j], for channels c0 .. c0+K.
template <typename V, int N, typename T>
AT1_INLINE void Taps(const T* x, const Kernel<V, N>& k, const Shape& s, int64_t r, int64_t q,
                     int64_t c0, V* a) {
  constexpr int L = kLanes<V>;
  for (int n = 0; n < N; ++n) a[n] = k.b[n];
  for (int i = 0; i < 3; ++i) {
    const int64_t yy = r + i - 1;
    if (yy < 0 || yy >= s.H) continue;
    for (int j = 0; j < 3; ++j) {
      const int64_t xj = q + j - 1;
      if (xj < 0 || xj >= s.W) continue;
      const T* xp = x + (yy * s.W + xj) * s.C + c0;
      for (int n = 0; n < N; ++n) a[n] += Load<V>(xp + n * L) * k.w[i * 3 + j][n];
    }
  }
}

// The block's inputs as float32, H*W*K of them: every input is read by 9 output pixels (and
// 9 kernel-gradient taps), and converting bfloat16 once costs less than converting it 9 times.
template <typename V, int N, typename T>
AT1_INLINE const float* Staged(const T* x, const Shape& s, int64_t c0, float* xf) {
  constexpr int L = kLanes<V>, K = N * L;
  for (int64_t p = 0; p < s.H * s.W; ++p)
    for (int n = 0; n < N; ++n) Store<V>(xf + p * K + n * L, Load<V>(x + p * s.C + c0 + n * L));
  return xf;
}

template <typename V, int N, typename T>
AT1_INLINE void ForwardBlock(const T* x, const float* w, const float* bias, const Shape& s,
                              int64_t c0, T* y, float* xf) {
  constexpr int L = kLanes<V>, K = N * L;
  const Kernel<V, N> k = LoadKernel<V, N>(w, bias, s.C, c0);
  const float* xs = Staged<V, N>(x, s, c0, xf);
  const Shape block{s.H, s.W, K};
  for (int64_t r = 0; r < s.H; ++r) {
    for (int64_t q = 0; q < s.W; ++q) {
      V a[N];
      Taps<V, N>(xs, k, block, r, q, 0, a);
      T* yp = y + (r * s.W + q) * s.C + c0;
      for (int n = 0; n < N; ++n) Store<V>(yp + n * L, Gelu<V>(a[n]));
    }
  }
}

// Channels c0 .. c0+K of one example: da = dy * gelu'(conv(x)) into `da` (H*W*K floats), db
// and the kernel gradient summed over the pixels, dx = conv of da with the flipped kernel.
template <typename V, int N, typename T>
AT1_INLINE void BackwardBlock(const T* x, const float* w, const float* bias, const T* dy,
                          const Shape& s, int64_t c0, T* dx, float* dw, float* db, float* da,
                          float* xf) {
  constexpr int L = kLanes<V>, K = N * L;
  const int64_t H = s.H, W = s.W, C = s.C;
  const Kernel<V, N> k = LoadKernel<V, N>(w, bias, C, c0);
  const float* xs = Staged<V, N>(x, s, c0, xf);
  const Shape block{H, W, K};
  V dbn[N];
  for (int n = 0; n < N; ++n) dbn[n] = Splat<V>(0.0f);
  for (int64_t r = 0; r < H; ++r) {
    for (int64_t q = 0; q < W; ++q) {
      V a[N];
      Taps<V, N>(xs, k, block, r, q, 0, a);
      const T* dyp = dy + (r * W + q) * C + c0;
      float* dap = da + (r * W + q) * K;
      for (int n = 0; n < N; ++n) {
        const V g = Load<V>(dyp + n * L) * GeluGrad<V>(a[n]);
        Store<V>(dap + n * L, g);
        dbn[n] += g;
      }
    }
  }
  for (int n = 0; n < N; ++n) Store<V>(db + c0 + n * L, dbn[n]);
  // Tap (i, j) of output pixel (r, q) read x[r+i-1, q+j-1]: summed where that pixel exists.
  for (int i = 0; i < 3; ++i) {
    for (int j = 0; j < 3; ++j) {
      V acc[N];
      for (int n = 0; n < N; ++n) acc[n] = Splat<V>(0.0f);
      const int64_t r0 = std::max<int64_t>(0, 1 - i), r1 = std::min<int64_t>(H, H + 1 - i);
      const int64_t q0 = std::max<int64_t>(0, 1 - j), q1 = std::min<int64_t>(W, W + 1 - j);
      for (int64_t r = r0; r < r1; ++r) {
        for (int64_t q = q0; q < q1; ++q) {
          const float* xp = xs + ((r + i - 1) * W + (q + j - 1)) * K;
          const float* dap = da + (r * W + q) * K;
          for (int n = 0; n < N; ++n) acc[n] += Load<V>(xp + n * L) * Load<V>(dap + n * L);
        }
      }
      for (int n = 0; n < N; ++n) Store<V>(dw + (i * 3 + j) * C + c0 + n * L, acc[n]);
    }
  }
  // dx[r, q] = sum over taps of da[r-i+1, q-j+1] * w[i, j].
  for (int64_t r = 0; r < H; ++r) {
    for (int64_t q = 0; q < W; ++q) {
      V acc[N];
      for (int n = 0; n < N; ++n) acc[n] = Splat<V>(0.0f);
      for (int i = 0; i < 3; ++i) {
        const int64_t yy = r - i + 1;
        if (yy < 0 || yy >= H) continue;
        for (int j = 0; j < 3; ++j) {
          const int64_t xj = q - j + 1;
          if (xj < 0 || xj >= W) continue;
          const float* dap = da + (yy * W + xj) * K;
          for (int n = 0; n < N; ++n) acc[n] += Load<V>(dap + n * L) * k.w[i * 3 + j][n];
        }
      }
      T* dxp = dx + (r * W + q) * C + c0;
      for (int n = 0; n < N; ++n) Store<V>(dxp + n * L, acc[n]);
    }
  }
}

constexpr int kVectors = 2;  // channels per block: 2 x 16
constexpr int kBlock = kVectors * kLanes<VF>;

// One example's output; `xf` is scratch for H*W*kBlock floats.
template <typename T>
AT1_CLONES void ForwardExample(const T* x, const float* w, const float* bias, const Shape& s,
                               T* y, float* xf) {
  int64_t c0 = 0;
  for (; c0 + kBlock <= s.C; c0 += kBlock) ForwardBlock<VF, kVectors>(x, w, bias, s, c0, y, xf);
  for (; c0 < s.C; ++c0) ForwardBlock<float, 1>(x, w, bias, s, c0, y, xf);
}

// One example's gradients; `scratch` holds 2*H*W*kBlock floats.
template <typename T>
AT1_CLONES void BackwardExample(const T* x, const float* w, const float* bias, const T* dy,
                                const Shape& s, T* dx, float* dw, float* db, float* scratch) {
  float* da = scratch;
  float* xf = scratch + s.H * s.W * kBlock;
  int64_t c0 = 0;
  for (; c0 + kBlock <= s.C; c0 += kBlock)
    BackwardBlock<VF, kVectors>(x, w, bias, dy, s, c0, dx, dw, db, da, xf);
  for (; c0 < s.C; ++c0) BackwardBlock<float, 1>(x, w, bias, dy, s, c0, dx, dw, db, da, xf);
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
  const int64_t scratch = s.H * s.W * kBlock;
  const float* wp = w.typed_data();
  const float* bp = b.typed_data();
  auto run = [&](auto storage) {
    using T = decltype(storage);
    auto* xp = static_cast<const T*>(x.untyped_data());
    auto* yp = static_cast<T*>(y->untyped_data());
    ForEachExample(pool, B, scratch, [=](int64_t e, float* xf) {
      ForwardExample(xp + e * n, wp, bp, s, yp + e * n, xf);
    });
  };
  if (x.element_type() == ffi::BF16) {
    run(uint16_t{});
  } else {
    run(float{});
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
  const int64_t scratch = 2 * s.H * s.W * kBlock;
  auto run = [&](auto storage) {
    using T = decltype(storage);
    auto* xp = static_cast<const T*>(x.untyped_data());
    auto* dyp = static_cast<const T*>(dy.untyped_data());
    auto* dxp = static_cast<T*>(dx->untyped_data());
    ForEachExample(pool, B, scratch, [=](int64_t e, float* tmp) {
      BackwardExample(xp + e * n, wp, bp, dyp + e * n, s, dxp + e * n, dwp + e * 9 * C,
                      dbp + e * C, tmp);
    });
  };
  if (x.element_type() == ffi::BF16) {
    run(uint16_t{});
  } else {
    run(float{});
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
