// Weight-only int8 matrix products for decoding on a CPU, as XLA FFI custom calls.
//
// y (M, N) = (x (M, K) @ w) * scale (N), x float32, w int8, where w is (K, N) ("kn": a
// projection kernel) or (N, K) ("nk": an embedding table used as the output head). Each
// int8 weight is widened to float32 in registers, so the weights cross the memory bus as
// one byte each; XLA's own CPU lowering writes a float32 copy of the kernel first.
// Written for small M (decoding); gptjax uses XLA's dot above kernels.MAX_ROWS.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef float f16v __attribute__((vector_size(64)));
typedef int8_t c16v __attribute__((vector_size(16)));

// 16 int8 weights -> 16 floats: sign-extend and convert in registers (GCC's
// __builtin_convertvector scalarises this widening).
inline f16v load16(const int8_t* p) {
#if defined(__AVX512F__)
  return (f16v)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
#elif defined(__AVX2__)
  const __m128i c = _mm_loadu_si128((const __m128i*)p);
  const __m256 lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(c));
  const __m256 hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(c, 8)));
  f16v v;
  __builtin_memcpy(&v, &lo, 32);
  __builtin_memcpy(reinterpret_cast<char*>(&v) + 32, &hi, 32);
  return v;
#else
  f16v v;
  for (int i = 0; i < 16; ++i) v[i] = p[i];
  return v;
#endif
}

inline f16v loadf(const float* p) {
  f16v v;
  __builtin_memcpy(&v, p, 64);
  return v;
}

inline void storef(float* p, f16v v) { __builtin_memcpy(p, &v, 64); }

inline float hsum(f16v v) {
  float s = 0;
  for (int i = 0; i < 16; ++i) s += v[i];
  return s;
}

// Register budgets, tuned on AVX-512 (32 registers of 16 floats); with AVX2 a 16-float
// vector takes two of 16 registers, so passes hold fewer rows and columns. The AVX2 and
// plain C++ builds are tested for their results (tests/int8_kernel_test.py), not timed.
#if defined(__AVX512F__)
constexpr int64_t kMaxRows = 4;  // rows of x per pass over the weights
constexpr int Wide(int r) { return r == 1 ? 16 : r == 2 ? 8 : 4; }  // 16-float vectors
constexpr int kNarrow = 4;
#else
constexpr int64_t kMaxRows = 2;
constexpr int Wide(int r) { return r == 1 ? 4 : 2; }
constexpr int kNarrow = 1;
#endif

// w (K, N): columns [j, n1) of R rows of x, 16 * Q columns at a time in registers, walking
// down the rows; returns where it stopped (fewer than 16 * Q columns left).
template <int R, int Q>
int64_t KnBlocks(const float* x, const int8_t* w, const float* scale, float* y, int64_t k,
                 int64_t n, int64_t j, int64_t n1) {
  for (; j + 16 * Q <= n1; j += 16 * Q) {
    f16v acc[R][Q] = {};
    for (int64_t i = 0; i < k; ++i) {
      const int8_t* wr = w + i * n + j;
      // a row 16 ahead: each pass steps down the rows, a page apart, where the hardware
      // prefetcher does not follow (measured: 6 -> 9 GB/s on one core, out of cache)
      for (int q = 0; q < Q; q += 4) __builtin_prefetch(wr + 16 * n + 16 * q);
      f16v wv[Q];
      for (int q = 0; q < Q; ++q) wv[q] = load16(wr + 16 * q);
      for (int r = 0; r < R; ++r) {
        const float xv = x[r * k + i];
        for (int q = 0; q < Q; ++q) acc[r][q] += xv * wv[q];
      }
    }
    for (int r = 0; r < R; ++r) {
      for (int q = 0; q < Q; ++q) {
        storef(y + r * n + j + 16 * q, acc[r][q] * loadf(scale + j + 16 * q));
      }
    }
  }
  return j;
}

// w (K, N): columns [n0, n1) of R rows of x: wide blocks (fewer rows of x leave registers for
// more columns, so each pass reads longer runs of a row), then 64, then one at a time.
template <int R>
void KnBlock(const float* x, const int8_t* w, const float* scale, float* y, int64_t k,
             int64_t n, int64_t n0, int64_t n1) {
  int64_t j = KnBlocks<R, Wide(R)>(x, w, scale, y, k, n, n0, n1);
  j = KnBlocks<R, kNarrow>(x, w, scale, y, k, n, j, n1);
  for (; j < n1; ++j) {  // the ragged end
    for (int r = 0; r < R; ++r) {
      float s = 0;
      for (int64_t i = 0; i < k; ++i) s += x[r * k + i] * w[i * n + j];
      y[r * n + j] = s * scale[j];
    }
  }
}

// w (N, K): rows [n0, n1) of w, each a dot product with R rows of x, four rows of w at a time.
template <int R>
void NkBlock(const float* x, const int8_t* w, const float* scale, float* y, int64_t k,
             int64_t n, int64_t n0, int64_t n1) {
  const int64_t kv = k - k % 16;
  int64_t j = n0;
  for (; j + 4 <= n1; j += 4) {
    f16v acc[R][4] = {};
    const int8_t* wj = w + j * k;
    for (int64_t i = 0; i < kv; i += 16) {
      if ((i & 63) == 0) {  // the block of rows after next (measured: 6.4 -> 8.6 GB/s)
        const int8_t* ahead = wj + 8 * k + i;
        __builtin_prefetch(ahead);
        __builtin_prefetch(ahead + k);
        __builtin_prefetch(ahead + 2 * k);
        __builtin_prefetch(ahead + 3 * k);
      }
      const f16v w0 = load16(wj + i), w1 = load16(wj + k + i);
      const f16v w2 = load16(wj + 2 * k + i), w3 = load16(wj + 3 * k + i);
      for (int r = 0; r < R; ++r) {
        const f16v xv = loadf(x + r * k + i);
        acc[r][0] += xv * w0;
        acc[r][1] += xv * w1;
        acc[r][2] += xv * w2;
        acc[r][3] += xv * w3;
      }
    }
    for (int r = 0; r < R; ++r) {
      for (int q = 0; q < 4; ++q) {
        float s = hsum(acc[r][q]);
        for (int64_t i = kv; i < k; ++i) s += x[r * k + i] * wj[q * k + i];
        y[r * n + j + q] = s * scale[j + q];
      }
    }
  }
  for (; j < n1; ++j) {
    for (int r = 0; r < R; ++r) {
      float s = 0;
      for (int64_t i = 0; i < k; ++i) s += x[r * k + i] * w[j * k + i];
      y[r * n + j] = s * scale[j];
    }
  }
}

// Every row of x, kMaxRows at a time, so the accumulators stay in registers.
template <template <int> class F>
void Rows(const float* x, const int8_t* w, const float* scale, float* y, int64_t m, int64_t k,
          int64_t n, int64_t n0, int64_t n1) {
  for (int64_t r0 = 0; r0 < m; r0 += kMaxRows) {
    const float* xr = x + r0 * k;
    float* yr = y + r0 * n;
    switch (std::min(kMaxRows, m - r0)) {
      case 1: F<1>::Run(xr, w, scale, yr, k, n, n0, n1); break;
      case 2: F<2>::Run(xr, w, scale, yr, k, n, n0, n1); break;
      case 3: F<3>::Run(xr, w, scale, yr, k, n, n0, n1); break;
      default: F<4>::Run(xr, w, scale, yr, k, n, n0, n1); break;
    }
  }
}

template <int R>
struct KnF {
  static void Run(const float* x, const int8_t* w, const float* s, float* y, int64_t k,
                  int64_t n, int64_t n0, int64_t n1) { KnBlock<R>(x, w, s, y, k, n, n0, n1); }
};
template <int R>
struct NkF {
  static void Run(const float* x, const int8_t* w, const float* s, float* y, int64_t k,
                  int64_t n, int64_t n0, int64_t n1) { NkBlock<R>(x, w, s, y, k, n, n0, n1); }
};
void KnColumns(const float* x, const int8_t* w, const float* s, float* y, int64_t m, int64_t k,
               int64_t n, int64_t n0, int64_t n1) { Rows<KnF>(x, w, s, y, m, k, n, n0, n1); }
void NkRows(const float* x, const int8_t* w, const float* s, float* y, int64_t m, int64_t k,
            int64_t n, int64_t n0, int64_t n1) { Rows<NkF>(x, w, s, y, m, k, n, n0, n1); }

using Part = void (*)(const float*, const int8_t*, const float*, float*, int64_t, int64_t,
                      int64_t, int64_t, int64_t);

// Splits the N outputs into chunks that the calling thread and XLA's intra-op pool take
// from one counter. The caller can finish every chunk alone, so a busy pool only slows it
// down; helpers that start late find nothing left and return.
struct Work {
  Part part;
  const float* x;
  const int8_t* w;
  const float* scale;
  float* y;
  int64_t m, k, n, chunk, chunks;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  void Run() {
    for (int64_t c; (c = next.fetch_add(1)) < chunks;) {
      const int64_t n0 = c * chunk, n1 = std::min(n, n0 + chunk);
      part(x, w, scale, y, m, k, n, n0, n1);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

ffi::Error Product(Part part, int64_t align, ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                   ffi::Buffer<ffi::S8> w, ffi::Buffer<ffi::F32> scale,
                   ffi::ResultBuffer<ffi::F32> y, bool kn) {
  auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2) return ffi::Error::InvalidArgument("rank must be 2");
  const int64_t m = xd[0], k = xd[1], n = kn ? wd[1] : wd[0];
  if ((kn ? wd[0] : wd[1]) != k || scale.element_count() != static_cast<size_t>(n))
    return ffi::Error::InvalidArgument("shapes do not match");
  auto work = std::make_shared<Work>();
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  // About four chunks per thread, a multiple of the inner block.
  int64_t chunk = (n + 4 * threads - 1) / (4 * threads);
  chunk = std::max(align, (chunk + align - 1) / align * align);
  work->part = part;
  work->x = x.typed_data();
  work->w = w.typed_data();
  work->scale = scale.typed_data();
  work->y = y->typed_data();
  work->m = m, work->k = k, work->n = n, work->chunk = chunk;
  work->chunks = (n + chunk - 1) / chunk;
  for (int64_t t = 1; t < std::min(threads, work->chunks); ++t) {
    pool.Schedule([work] { work->Run(); });
  }
  work->Run();
  while (work->done.load(std::memory_order_acquire) < work->chunks) std::this_thread::yield();
  return ffi::Error::Success();
}

ffi::Error Kn(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> w,
              ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> y) {
  return Product(KnColumns, 256, pool, x, w, scale, y, true);
}

ffi::Error Nk(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> w,
              ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> y) {
  return Product(NkRows, 4, pool, x, w, scale, y, false);
}

}  // namespace

#define GPTJAX_BIND                                                                   \
  ffi::Ffi::Bind()                                                                    \
      .Ctx<ffi::ThreadPool>()                                                         \
      .Arg<ffi::Buffer<ffi::F32>>()                                                   \
      .Arg<ffi::Buffer<ffi::S8>>()                                                    \
      .Arg<ffi::Buffer<ffi::F32>>()                                                   \
      .Ret<ffi::Buffer<ffi::F32>>()

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptjaxInt8MatmulKn, Kn, GPTJAX_BIND);
XLA_FFI_DEFINE_HANDLER_SYMBOL(GptjaxInt8MatmulNk, Nk, GPTJAX_BIND);
