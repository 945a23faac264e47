// CUDA kernel of fastinpo::ddim_inversion_step: the whole [winners; losers] batch in one launch.
//
// This file deliberately includes only the CUDA headers and ddim_step.h (no torch headers): CI, which has
// a CPU-only torch, compile-checks it with `nvcc -c` for sm_80 and sm_90, so the kernel code itself is
// always checked even where no CUDA extension can be linked. ops.cpp passes torch's current stream.
//
// Layout: blockIdx.y walks samples (so the per-sample coefficients and the active flag are uniform in a
// block: no divergence on them), blockIdx.x / threadIdx.x walk 16-byte vectors of that sample with a
// grid-stride loop. Vectors need every row start 16-byte aligned (row % V == 0, aligned base pointers);
// otherwise the same kernel runs with scalar accesses. Elementwise math is float32.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "ddim_step.h"

namespace fastinpo {
namespace {

// Scalar storage of each dtype, and its conversion to and from float32 (round to nearest even).
template <StepDtype D>
struct Storage;

template <>
struct Storage<StepDtype::kFloat32> {
  using T = float;
  static __device__ __forceinline__ float load(T v) { return v; }
  static __device__ __forceinline__ T store(float v) { return v; }
};

template <>
struct Storage<StepDtype::kFloat16> {
  using T = unsigned short;
  static __device__ __forceinline__ float load(T v) { return __half2float(__ushort_as_half(v)); }
  static __device__ __forceinline__ T store(float v) { return __half_as_ushort(__float2half_rn(v)); }
};

template <>
struct Storage<StepDtype::kBFloat16> {
  using T = unsigned short;
  static __device__ __forceinline__ float load(T v) { return __bfloat162float(__ushort_as_bfloat16(v)); }
  static __device__ __forceinline__ T store(float v) { return __bfloat16_as_ushort(__float2bfloat16_rn(v)); }
};

// V elements moved as one 16-byte access when VEC (uint4 load/store), one by one otherwise.
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <typename T, int V>
__device__ __forceinline__ Pack<T, V> load_pack(const T* p) {
  Pack<T, V> r;
  if constexpr (sizeof(Pack<T, V>) == 16) {
    *reinterpret_cast<uint4*>(&r) = __ldg(reinterpret_cast<const uint4*>(p));
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k) r.v[k] = p[k];
  }
  return r;
}

template <typename T, int V>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, V>& r) {
  if constexpr (sizeof(Pack<T, V>) == 16) {
    *reinterpret_cast<uint4*>(p) = *reinterpret_cast<const uint4*>(&r);
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k) p[k] = r.v[k];
  }
}

constexpr int kThreads = 256;

template <StepDtype D, bool CFG, bool NOISE, bool VEC>
__global__ void __launch_bounds__(kThreads) ddim_step_kernel(const DdimStepParams p) {
  using S = Storage<D>;
  using T = typename S::T;
  constexpr int V = VEC ? static_cast<int>(16 / sizeof(T)) : 1;
  const int64_t packs = p.row / V;  // exact when VEC (the launcher checks row % V == 0)
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const T* xs = static_cast<const T*>(p.x);
  const T* es = static_cast<const T*>(p.eps);
  const T* ns = static_cast<const T*>(p.noise);
  T* os = static_cast<T*>(p.out);

  for (int64_t i = blockIdx.y; i < p.n; i += gridDim.y) {
    const SampleCoeffs c = sample_coeffs(p, i);
    const int64_t base = i * p.row;
    const T* x = xs + base;
    T* out = os + base;
    const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (!c.active) {  // uniform in the block: copy through, bit-exact
      for (int64_t k = first; k < packs; k += stride) store_pack<T, V>(out + k * V, load_pack<T, V>(x + k * V));
      continue;
    }
    const T* eu = es + base;
    const T* ec = CFG ? es + p.n * p.row + base : nullptr;
    const T* nz = NOISE ? ns + base : nullptr;
    for (int64_t k = first; k < packs; k += stride) {
      const int64_t off = k * V;
      const Pack<T, V> xv = load_pack<T, V>(x + off);
      const Pack<T, V> uv = load_pack<T, V>(eu + off);
      Pack<T, V> cv, nv, ov;
      if constexpr (CFG) cv = load_pack<T, V>(ec + off);
      if constexpr (NOISE) nv = load_pack<T, V>(nz + off);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        float e = S::load(uv.v[j]);
        if constexpr (CFG) e = e + p.cfg_scale * (S::load(cv.v[j]) - e);  // cfg_combine's order
        float r = c.c1 * S::load(xv.v[j]) + c.c2 * e;
        if constexpr (NOISE) r += c.s * S::load(nv.v[j]);
        ov.v[j] = S::store(r);
      }
      store_pack<T, V>(out + off, ov);
    }
  }
}

bool aligned16(const void* ptr) { return ptr == nullptr || (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }

// Blocks of kThreads one SM holds at once for this kernel variant (registers decide it: a 40-register variant fits
// 6 of 256 threads on sm_90, not the 8 that 2048 threads / SM would give; GPU review item 12). Queried once per
// variant and device; the query neither launches nor synchronizes.
template <StepDtype D, bool CFG, bool NOISE, bool VEC>
int resident_blocks_per_sm() {
  constexpr int kMaxDevices = 64;
  static int cache[kMaxDevices] = {};  // 0 = not queried yet (a benign race: every writer stores the same value)
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) device = -1;
  if (device >= 0 && device < kMaxDevices && cache[device] > 0) return cache[device];
  int blocks = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, ddim_step_kernel<D, CFG, NOISE, VEC>, kThreads, 0) !=
          cudaSuccess ||
      blocks < 1) {
    (void)cudaGetLastError();  // clear it: the launch's error check below must not report the query's
    blocks = 2048 / kThreads;  // the hardware's thread limit: what the grid assumed before
  }
  if (device >= 0 && device < kMaxDevices) cache[device] = blocks;
  return blocks;
}

template <StepDtype D, bool CFG, bool NOISE>
const char* launch(const DdimStepParams& p, int sm_count, cudaStream_t stream) {
  using T = typename Storage<D>::T;
  constexpr int V = static_cast<int>(16 / sizeof(T));
  const bool vec = p.row % V == 0 && aligned16(p.x) && aligned16(p.eps) && aligned16(p.noise) && aligned16(p.out);
  const int64_t packs = vec ? p.row / V : p.row;
  // One wave: as many blocks as every SM holds at once for this variant, spread over samples; never more blocks
  // per sample than it has work for. grid.y is capped by CUDA at 65535: the kernel's sample loop covers larger
  // batches.
  const int per_sm =
      vec ? resident_blocks_per_sm<D, CFG, NOISE, true>() : resident_blocks_per_sm<D, CFG, NOISE, false>();
  const int64_t target = static_cast<int64_t>(sm_count > 0 ? sm_count : 1) * per_sm;
  const int64_t grid_y = p.n < 65535 ? p.n : 65535;
  int64_t grid_x = (target + grid_y - 1) / grid_y;
  const int64_t needed = (packs + kThreads - 1) / kThreads;
  if (grid_x > needed) grid_x = needed;
  if (grid_x < 1) grid_x = 1;
  const dim3 grid(static_cast<unsigned>(grid_x), static_cast<unsigned>(grid_y));
  if (vec) {
    ddim_step_kernel<D, CFG, NOISE, true><<<grid, kThreads, 0, stream>>>(p);
  } else {
    ddim_step_kernel<D, CFG, NOISE, false><<<grid, kThreads, 0, stream>>>(p);
  }
  const cudaError_t err = cudaGetLastError();  // launch errors only: no sync
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

template <StepDtype D>
const char* launch_dtype(const DdimStepParams& p, int sm_count, cudaStream_t stream) {
  const bool noise = p.noise != nullptr;
  if (p.cfg) return noise ? launch<D, true, true>(p, sm_count, stream) : launch<D, true, false>(p, sm_count, stream);
  return noise ? launch<D, false, true>(p, sm_count, stream) : launch<D, false, false>(p, sm_count, stream);
}

// Multiprocessor count of the current device, cached per device: an attribute query is cheap and never
// synchronizes, but a step runs thousands of times.
int device_sm_count() {
  constexpr int kMaxDevices = 64;
  static int cache[kMaxDevices] = {};  // 0 = not queried yet (a benign race: every writer stores the same value)
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return 0;
  if (device >= 0 && device < kMaxDevices && cache[device] > 0) return cache[device];
  int count = 0;
  if (cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) return 0;
  if (device >= 0 && device < kMaxDevices) cache[device] = count;
  return count;
}

}  // namespace

const char* ddim_step_cuda(const DdimStepParams& p, StepDtype dtype, void* stream) {
  if (p.n == 0 || p.row == 0) return nullptr;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  const int sms = device_sm_count();
  if (sms <= 0) return cudaGetErrorString(cudaGetLastError());
  switch (dtype) {
    case StepDtype::kFloat32:
      return launch_dtype<StepDtype::kFloat32>(p, sms, s);
    case StepDtype::kFloat16:
      return launch_dtype<StepDtype::kFloat16>(p, sms, s);
    case StepDtype::kBFloat16:
      return launch_dtype<StepDtype::kBFloat16>(p, sms, s);
  }
  return "fastinpo::ddim_inversion_step: unknown dtype code";
}

}  // namespace fastinpo
