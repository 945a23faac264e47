// CPU kernel of fastinpo::ddim_inversion_step: one pass over x, eps (and noise), one write of x_next.
//
// Work split: the flattened (sample, element) range is cut by at::parallel_for (torch's OpenMP pool, so
// torch.set_num_threads applies); each piece is walked sample segment by sample segment, so a piece may
// cover the tail of one sample and the head of the next, and a single large sample still uses every core.
//
// Vectorization: the inner loop is plain C++ that GCC auto-vectorizes at -O3. It is compiled twice: for
// the x86-64 baseline (SSE2) and for AVX2+FMA+F16C, picked at run time, because the wheel must run on any
// x86-64 machine while fp16 storage only converts fast with F16C. fp16 goes through GCC's _Float16 (IEEE
// binary16, round-to-nearest-even like c10::Half); bf16 is converted with the same bit arithmetic as
// c10::BFloat16 (round-to-nearest-even, NaN -> 0x7FC0).
#include "ddim_step.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <type_traits>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#endif

namespace fastinpo {
namespace {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTINPO_X86_CLONES 1
#define FASTINPO_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#else
#define FASTINPO_X86_CLONES 0
#define FASTINPO_TARGET_AVX2
#endif

#if defined(__FLT16_MAX__)
using half_storage = _Float16;
#else
#error "fastinpo's CPU kernel needs a compiler with _Float16 (GCC >= 12 or clang)"
#endif

struct Bf16 {
  uint16_t bits;
};
static_assert(sizeof(Bf16) == 2 && sizeof(half_storage) == 2, "16-bit storage types must be 2 bytes");

template <typename S>
struct Cvt;

template <>
struct Cvt<float> {
  static inline __attribute__((always_inline)) float load(float v) { return v; }
  static inline __attribute__((always_inline)) float store(float v) { return v; }
};

template <>
struct Cvt<half_storage> {
  static inline __attribute__((always_inline)) float load(half_storage v) { return static_cast<float>(v); }
  static inline __attribute__((always_inline)) half_storage store(float v) { return static_cast<half_storage>(v); }
};

template <>
struct Cvt<Bf16> {
  static inline __attribute__((always_inline)) float load(Bf16 v) {
    const uint32_t u = static_cast<uint32_t>(v.bits) << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
  }
  static inline __attribute__((always_inline)) Bf16 store(float f) {
    uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    const uint32_t rounded = (u + (((u >> 16) & 1u) + 0x7FFFu)) >> 16;
    return Bf16{static_cast<uint16_t>(f != f ? 0x7FC0u : rounded)};
  }
};

// One contiguous segment of one sample. `ec` (CFG) and `nz` (noise) are only read when enabled.
template <typename S, bool CFG, bool NOISE>
static inline __attribute__((always_inline)) void segment_impl(const S* __restrict x, const S* __restrict eu,
                                                              const S* __restrict ec, const S* __restrict nz,
                                                              S* __restrict out, int64_t len, float c1, float c2,
                                                              float g, float s) {
  for (int64_t j = 0; j < len; ++j) {
    float e = Cvt<S>::load(eu[j]);
    if constexpr (CFG) {
      e = e + g * (Cvt<S>::load(ec[j]) - e);  // cfg_combine's order: u + g * (c - u)
    }
    float v = c1 * Cvt<S>::load(x[j]) + c2 * e;
    if constexpr (NOISE) {
      v += s * Cvt<S>::load(nz[j]);
    }
    out[j] = Cvt<S>::store(v);
  }
}

template <typename S, bool CFG, bool NOISE>
void segment_base(const S* x, const S* eu, const S* ec, const S* nz, S* out, int64_t len, float c1, float c2,
                  float g, float s) {
  segment_impl<S, CFG, NOISE>(x, eu, ec, nz, out, len, c1, c2, g, s);
}

#if FASTINPO_X86_CLONES
template <typename S, bool CFG, bool NOISE>
FASTINPO_TARGET_AVX2 void segment_avx2(const S* x, const S* eu, const S* ec, const S* nz, S* out, int64_t len,
                                       float c1, float c2, float g, float s) {
  segment_impl<S, CFG, NOISE>(x, eu, ec, nz, out, len, c1, c2, g, s);
}

// GCC 12 does not vectorize _Float16 conversions (one vcvtph2ps per element, ~8 GB/s), so the fp16
// AVX2 path converts 8 values at a time with F16C intrinsics; the tail goes through the scalar loop.
FASTINPO_TARGET_AVX2 static inline __attribute__((always_inline)) __m256 load8_half(const half_storage* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

template <bool CFG, bool NOISE>
FASTINPO_TARGET_AVX2 void segment_avx2_half(const half_storage* x, const half_storage* eu, const half_storage* ec,
                                            const half_storage* nz, half_storage* out, int64_t len, float c1,
                                            float c2, float g, float s) {
  const __m256 vc1 = _mm256_set1_ps(c1);
  const __m256 vc2 = _mm256_set1_ps(c2);
  const __m256 vg = _mm256_set1_ps(g);
  const __m256 vs = _mm256_set1_ps(s);
  int64_t j = 0;
  for (; j + 8 <= len; j += 8) {
    __m256 e = load8_half(eu + j);
    if constexpr (CFG) e = _mm256_fmadd_ps(vg, _mm256_sub_ps(load8_half(ec + j), e), e);
    __m256 v = _mm256_fmadd_ps(vc1, load8_half(x + j), _mm256_mul_ps(vc2, e));
    if constexpr (NOISE) v = _mm256_fmadd_ps(vs, load8_half(nz + j), v);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + j),
                     _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  segment_impl<half_storage, CFG, NOISE>(x + j, eu + j, CFG ? ec + j : nullptr, NOISE ? nz + j : nullptr, out + j,
                                         len - j, c1, c2, g, s);
}

bool has_avx2() {
  static const bool yes = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  }();
  return yes;
}
#endif

// Below this many elements a split costs more than it saves (thread wake-up is a few microseconds;
// 32K float32 elements is ~10 us of streaming on one core).
constexpr int64_t kGrain = 32768;

template <typename S, bool CFG, bool NOISE>
void run(const DdimStepParams& p) {
  using SegmentFn = void (*)(const S*, const S*, const S*, const S*, S*, int64_t, float, float, float, float);
  SegmentFn segment = &segment_base<S, CFG, NOISE>;
#if FASTINPO_X86_CLONES
  if (has_avx2()) {
    if constexpr (std::is_same_v<S, half_storage>) {
      segment = &segment_avx2_half<CFG, NOISE>;
    } else {
      segment = &segment_avx2<S, CFG, NOISE>;
    }
  }
#endif
  const S* x = static_cast<const S*>(p.x);
  const S* eps = static_cast<const S*>(p.eps);
  const S* noise = static_cast<const S*>(p.noise);
  S* out = static_cast<S*>(p.out);
  const int64_t row = p.row;
  const int64_t n = p.n;
  at::parallel_for(0, n * row, kGrain, [&](int64_t begin, int64_t end) {
    int64_t pos = begin;
    while (pos < end) {
      const int64_t i = pos / row;
      const int64_t base = i * row;
      const int64_t stop = std::min(end, base + row);
      const int64_t len = stop - pos;
      const SampleCoeffs c = sample_coeffs(p, i);
      if (!c.active) {
        std::memcpy(out + pos, x + pos, static_cast<size_t>(len) * sizeof(S));
      } else {
        const S* eu = eps + pos;
        const S* ec = CFG ? eps + n * row + pos : nullptr;
        const S* nz = NOISE ? noise + pos : nullptr;
        segment(x + pos, eu, ec, nz, out + pos, len, c.c1, c.c2, p.cfg_scale, c.s);
      }
      pos = stop;
    }
  });
}

template <typename S>
void run_dtype(const DdimStepParams& p) {
  const bool noise = p.noise != nullptr;
  if (p.cfg) {
    noise ? run<S, true, true>(p) : run<S, true, false>(p);
  } else {
    noise ? run<S, false, true>(p) : run<S, false, false>(p);
  }
}

}  // namespace

void ddim_step_cpu(const DdimStepParams& p, StepDtype dtype) {
  if (p.n == 0 || p.row == 0) return;
  switch (dtype) {
    case StepDtype::kFloat32:
      run_dtype<float>(p);
      break;
    case StepDtype::kFloat16:
      run_dtype<half_storage>(p);
      break;
    case StepDtype::kBFloat16:
      run_dtype<Bf16>(p);
      break;
  }
}

}  // namespace fastinpo
