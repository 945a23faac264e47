// Shared between the op wrapper (ops.cpp), the CPU kernel (ddim_step_cpu.cpp) and the CUDA kernel
// (ddim_step_cuda.cu).
//
// WHY a plain struct of raw pointers and no torch types: the CUDA kernel file includes nothing but the CUDA
// headers and this one, so that `nvcc -c` compile-checks it on any machine (CI has a CPU-only torch whose
// headers are not meant for device compilation), and the CPU kernel compiles in seconds instead of pulling
// in all of ATen.
//
// The math (SPEC.md §3; fastinpo/ops/reference.py is the reference):
//   e      = eps[i]                                  or, with CFG, u + g * (c - u) with u = eps[i], c = eps[n + i]
//   x_next = sqrt(a_to) * (x - sqrt(1 - a_from) * e) / sqrt(a_from) + sqrt(1 - a_to) * e
//          = c1 * x + c2 * e                         (c1, c2 per sample, computed once in double)
//   x_next += noise_scale[i] * noise[i]              (optional)
//   inactive samples: x_next = x (bit-exact copy; their timesteps are not read)
// All elementwise math is float32 whatever the storage dtype; the output has x's dtype.
//
// The flow-model Euler step (SPEC §7; fastinpo::flow_euler_step) is the same elementwise form with
// c1 = 1 and c2 = Δσ_i (x_next = x + Δσ * v, eps = the velocity v): coefficient source (c) below, so both ops
// share one CPU and one CUDA kernel.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__CUDACC__)
#define FASTINPO_HD __host__ __device__ __forceinline__
#else
#define FASTINPO_HD inline
#endif

namespace fastinpo {

// Storage dtypes the kernels handle (x, eps and noise share one).
enum class StepDtype : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct DdimStepParams {
  int64_t n = 0;    // samples (rows of x); eps has 2n rows with CFG
  int64_t row = 0;  // elements per sample (int64: n * row can exceed 2^31 at large batches)

  const void* x = nullptr;      // (n, row)
  const void* eps = nullptr;    // (n, row), or (2n, row) = [uncond; cond] with CFG
  const void* noise = nullptr;  // (n, row) or null
  void* out = nullptr;          // (n, row)

  // Coefficient source, one of:
  //  (a) an ᾱ table with per-sample int64 levels (negative source level -> alpha_init, SPEC §3) ...
  const float* table = nullptr;
  int64_t table_size = 0;
  const int64_t* t_from = nullptr;
  const int64_t* t_to = nullptr;
  float alpha_init = 1.f;
  //  (b) ... or per-sample ᾱ values directly (table == nullptr).
  const float* alpha_from = nullptr;
  const float* alpha_to = nullptr;
  //  (c) ... or a flow Euler step: per-sample Δσ (n,) (c1 = 1, c2 = Δσ; takes precedence over (a) and (b)).
  const float* d_sigma = nullptr;

  const bool* active = nullptr;       // (n,) or null (all active)
  const float* noise_scale = nullptr; // (n,), required with noise
  bool cfg = false;
  float cfg_scale = 1.f;
};

struct SampleCoeffs {
  float c1;  // multiplies x
  float c2;  // multiplies the (guided) eps
  float s;   // multiplies the noise
  bool active;
};

FASTINPO_HD double quiet_nan() {
#if defined(__CUDA_ARCH__)
  return __longlong_as_double(0x7ff8000000000000LL);
#else
  return std::numeric_limits<double>::quiet_NaN();
#endif
}

// Per-sample coefficients. Computed in double once per sample (not per element), so the only float32
// rounding left is in the elementwise c1 * x + c2 * e, which keeps the fused step within the float32
// tolerance of the float64 reference even where c2 is a difference of two similar terms.
FASTINPO_HD SampleCoeffs sample_coeffs(const DdimStepParams& p, int64_t i) {
  SampleCoeffs c;
  c.active = p.active == nullptr || p.active[i];
  c.s = p.noise_scale != nullptr ? p.noise_scale[i] : 0.f;
  if (p.d_sigma != nullptr) {  // flow Euler step: x + Δσ * v (1 * x is exact)
    c.c1 = 1.f;
    c.c2 = p.d_sigma[i];
    return c;
  }
  double a_from, a_to;
  if (p.table != nullptr) {
    const int64_t tf = p.t_from[i];
    const int64_t tt = p.t_to[i];
    // Out-of-range levels give NaN: the CPU op refuses them before it runs, but the CUDA op cannot look
    // at device-resident timesteps without a host sync, so a bad level poisons only its own sample.
    a_from = tf < 0 ? static_cast<double>(p.alpha_init)
                    : (tf < p.table_size ? static_cast<double>(p.table[tf]) : quiet_nan());
    a_to = (tt >= 0 && tt < p.table_size) ? static_cast<double>(p.table[tt]) : quiet_nan();
  } else {
    a_from = p.alpha_from[i];
    a_to = p.alpha_to[i];
  }
  const double sa_to = sqrt(a_to);
  const double ratio = sa_to / sqrt(a_from);
  c.c1 = static_cast<float>(ratio);
  c.c2 = static_cast<float>(sqrt(1.0 - a_to) - ratio * sqrt(1.0 - a_from));
  return c;
}

// Implemented in ddim_step_cpu.cpp: runs on torch's intra-op thread pool (at::parallel_for).
void ddim_step_cpu(const DdimStepParams& p, StepDtype dtype);

// Implemented in ddim_step_cuda.cu (CUDA builds only): one launch for the whole batch on `stream` (a
// cudaStream_t passed as void* so this header needs no CUDA types) on the current device, grid sized
// from that device's multiprocessor count. Returns nullptr on success, else the CUDA error string.
const char* ddim_step_cuda(const DdimStepParams& p, StepDtype dtype, void* stream);

}  // namespace fastinpo
