// fastinpo::ddim_inversion_step, fastinpo::ddim_inversion_step_alphas and fastinpo::flow_euler_step: schema,
// validation, CPU / CUDA / Meta registrations, and the Python module fastinpo._C (which only exposes
// built_with_cuda(); the ops are reached through torch.ops.fastinpo once the module is imported).
//
// Schemas (x, eps, noise share one dtype: float32, float16 or bfloat16; everything on x's device):
//
//   ddim_inversion_step(Tensor x, Tensor eps, Tensor alphas_cumprod, Tensor t_from, Tensor t_to,
//                       float alpha_init, Tensor? active=None, Tensor? noise=None, Tensor? noise_scale=None,
//                       float? cfg_scale=None) -> Tensor
//     x (n, ...); eps (n, ...) or, with cfg_scale, (2n, ...) = [uncond; cond]; alphas_cumprod (T,) float32;
//     t_from, t_to (n,) int64 (t_from < 0 reads alpha_init; t_from, t_to < T; t_to >= 0); active (n,) bool;
//     noise like x; noise_scale (n,) float32 (required with noise). Returns x_next like x (contiguous).
//
//   ddim_inversion_step_alphas(Tensor x, Tensor eps, Tensor alpha_from, Tensor alpha_to, Tensor? active=None,
//                              Tensor? noise=None, Tensor? noise_scale=None, float? cfg_scale=None) -> Tensor
//     the same step with per-sample ᾱ values (n,) float32 instead of a table and levels (the signature of
//     fastinpo.ops.reference.ddim_inversion_step, which the dispatcher's "ext" backend implements).
//
//   flow_euler_step(Tensor x, Tensor v, Tensor d_sigma) -> Tensor
//     the Euler step of a flow model (SPEC §7): x_next = x + d_sigma[i] * v, x and v of one dtype, d_sigma (n,)
//     float32 (the signature of fastinpo.ops.reference.flow_euler_step); the same kernels with c1 = 1, c2 = Δσ.
//
// Non-contiguous inputs are accepted (copied to contiguous first). Timesteps and alphas of inactive samples
// are never read. On CPU the timestep range (and the alpha range of the _alphas variant) is checked;
// on CUDA it cannot be without a host sync, so an out-of-range level makes that sample's output NaN.
#include <Python.h>

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>

#include "ddim_step.h"

#ifdef FASTINPO_WITH_CUDA
// Only the light c10 CUDA headers (stream, device guard): ATen/cuda/CUDAContext.h pulls in cuBLAS and
// cuSPARSE headers, which a bare CUDA toolkit may lack, and the kernel needs neither.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace fastinpo {
namespace {

constexpr const char* kOp = "fastinpo::ddim_inversion_step";
constexpr const char* kFlowOp = "fastinpo::flow_euler_step";

StepDtype step_dtype(at::ScalarType t, const char* op = kOp) {
  switch (t) {
    case at::kFloat:
      return StepDtype::kFloat32;
    case at::kHalf:
      return StepDtype::kFloat16;
    case at::kBFloat16:
      return StepDtype::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, op, ": x must be float32, float16 or bfloat16 (float32 math inside), got ", t,
                       " (float64 stays on the reference backend)");
  }
  return StepDtype::kFloat32;
}

// Shape / dtype / device checks, shared by the real kernels and the Meta (fake) kernel. Sizes are read
// as SymInts so that torch.compile can trace with dynamic shapes.
void check_same_device(const char* name, const at::Tensor& t, const at::Tensor& x, const char* op = kOp) {
  TORCH_CHECK_VALUE(t.device() == x.device(), op, ": ", name, " must be on ", x.device(), " like x, got ",
                    t.device());
}

void check_vector(const char* name, const at::Tensor& t, const at::Tensor& x, at::ScalarType dtype,
                  const char* op = kOp) {
  check_same_device(name, t, x, op);
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.sym_size(0) == x.sym_size(0), op, ": ", name, " must have shape (",
                    x.sym_size(0), ",) (one value per sample of x), got ", t.sym_sizes());
}

void check_data(const at::Tensor& x, const at::Tensor& eps, const std::optional<at::Tensor>& active,
                const std::optional<at::Tensor>& noise, const std::optional<at::Tensor>& noise_scale,
                std::optional<double> cfg_scale) {
  step_dtype(x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() >= 1, kOp, ": x must be (n, ...) with a batch dimension, got a 0-d tensor");
  check_same_device("eps", eps, x);
  TORCH_CHECK_TYPE(eps.scalar_type() == x.scalar_type(), kOp, ": eps must have x's dtype ", x.scalar_type(),
                   ", got ", eps.scalar_type());
  TORCH_CHECK_VALUE(eps.dim() == x.dim(), kOp, ": eps must have x's shape ", x.sym_sizes(),
                    cfg_scale ? " with 2n rows ([uncond; cond]) under cfg_scale" : "", ", got ", eps.sym_sizes());
  const c10::SymInt rows = cfg_scale ? x.sym_size(0) * 2 : x.sym_size(0);
  bool same = eps.sym_size(0) == rows;
  for (int64_t d = 1; d < x.dim(); ++d) same = same && eps.sym_size(d) == x.sym_size(d);
  TORCH_CHECK_VALUE(same, kOp, ": eps must have shape ", x.sym_sizes(),
                    cfg_scale ? " with the first dim doubled ([uncond; cond] halves, because cfg_scale is set)"
                              : " (like x)",
                    ", got ", eps.sym_sizes());
  if (cfg_scale) {
    TORCH_CHECK_VALUE(std::isfinite(*cfg_scale), kOp, ": cfg_scale must be finite, got ", *cfg_scale);
  }
  if (active) check_vector("active", *active, x, at::kBool);
  TORCH_CHECK_VALUE(noise.has_value() == noise_scale.has_value(), kOp,
                    ": noise and noise_scale go together (x_next += noise_scale[i] * noise[i]); got ",
                    noise ? "noise without noise_scale" : "noise_scale without noise");
  if (noise) {
    check_same_device("noise", *noise, x);
    TORCH_CHECK_TYPE(noise->scalar_type() == x.scalar_type(), kOp, ": noise must have x's dtype ",
                     x.scalar_type(), ", got ", noise->scalar_type());
    TORCH_CHECK_VALUE(noise->sym_sizes() == x.sym_sizes(), kOp, ": noise must have x's shape ", x.sym_sizes(),
                      ", got ", noise->sym_sizes());
    check_vector("noise_scale", *noise_scale, x, at::kFloat);
  }
}

void check_table_args(const at::Tensor& x, const at::Tensor& table, const at::Tensor& t_from,
                      const at::Tensor& t_to, double alpha_init) {
  check_same_device("alphas_cumprod", table, x);
  TORCH_CHECK_TYPE(table.scalar_type() == at::kFloat, kOp, ": alphas_cumprod must be float32 (SPEC §3), got ",
                   table.scalar_type());
  TORCH_CHECK_VALUE(table.dim() == 1 && table.sym_size(0) >= 1, kOp,
                    ": alphas_cumprod must be a non-empty 1-d table (T,), got shape ", table.sym_sizes());
  check_vector("t_from", t_from, x, at::kLong);
  check_vector("t_to", t_to, x, at::kLong);
  TORCH_CHECK_VALUE(alpha_init > 0.0 && alpha_init <= 1.0, kOp, ": alpha_init must lie in (0, 1], got ",
                    alpha_init);
}

void check_alpha_args(const at::Tensor& x, const at::Tensor& alpha_from, const at::Tensor& alpha_to) {
  check_vector("alpha_from", alpha_from, x, at::kFloat);
  check_vector("alpha_to", alpha_to, x, at::kFloat);
}

// The flow Euler step: x (n, ...) float32/float16/bfloat16, v like x (same dtype and shape), d_sigma (n,) float32.
void check_flow_args(const at::Tensor& x, const at::Tensor& v, const at::Tensor& d_sigma) {
  step_dtype(x.scalar_type(), kFlowOp);
  TORCH_CHECK_VALUE(x.dim() >= 1, kFlowOp, ": x must be (n, ...) with a batch dimension, got a 0-d tensor");
  check_same_device("v", v, x, kFlowOp);
  TORCH_CHECK_TYPE(v.scalar_type() == x.scalar_type(), kFlowOp, ": v must have x's dtype ", x.scalar_type(),
                   ", got ", v.scalar_type());
  TORCH_CHECK_VALUE(v.sym_sizes() == x.sym_sizes(), kFlowOp, ": v must have x's shape ", x.sym_sizes(), ", got ",
                    v.sym_sizes());
  check_vector("d_sigma", d_sigma, x, at::kFloat, kFlowOp);
}

at::Tensor contiguous_or_null(const std::optional<at::Tensor>& t) { return t ? t->contiguous() : at::Tensor(); }

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

// Range checks that read values: CPU only (free there), active samples only.
void check_levels_cpu(const at::Tensor& t_from, const at::Tensor& t_to, const at::Tensor& active, int64_t T) {
  const int64_t* f = t_from.const_data_ptr<int64_t>();
  const int64_t* t = t_to.const_data_ptr<int64_t>();
  const bool* a = ptr_or_null<bool>(active);
  for (int64_t i = 0; i < t_from.size(0); ++i) {
    if (a != nullptr && !a[i]) continue;
    TORCH_CHECK_VALUE(f[i] < T, kOp, ": t_from[", i, "] = ", f[i], " is out of range: source levels must be < T = ",
                      T, " (negative levels read alpha_init)");
    TORCH_CHECK_VALUE(t[i] >= 0 && t[i] < T, kOp, ": t_to[", i, "] = ", t[i], " is out of range [0, ", T, ")");
  }
}

void check_alphas_cpu(const char* name, const at::Tensor& alpha, const at::Tensor& active) {
  const float* v = alpha.const_data_ptr<float>();
  const bool* a = ptr_or_null<bool>(active);
  for (int64_t i = 0; i < alpha.size(0); ++i) {
    if (a != nullptr && !a[i]) continue;
    TORCH_CHECK_VALUE(v[i] > 0.f && v[i] <= 1.f, kOp, ": ", name, "[", i, "] = ", v[i],
                      " must lie in (0, 1] (a cumulative product of alphas)");
  }
}

struct Prepared {
  at::Tensor x, eps, active, noise, noise_scale, out;
  DdimStepParams p;
};

Prepared prepare(const at::Tensor& x, const at::Tensor& eps, const std::optional<at::Tensor>& active,
                 const std::optional<at::Tensor>& noise, const std::optional<at::Tensor>& noise_scale,
                 std::optional<double> cfg_scale) {
  Prepared r;
  r.x = x.contiguous();
  r.eps = eps.contiguous();
  r.active = contiguous_or_null(active);
  r.noise = contiguous_or_null(noise);
  r.noise_scale = contiguous_or_null(noise_scale);
  r.out = at::empty(r.x.sizes(), r.x.options().memory_format(at::MemoryFormat::Contiguous));
  DdimStepParams& p = r.p;
  p.n = r.x.size(0);
  p.row = p.n > 0 ? r.x.numel() / p.n : 0;
  p.x = r.x.const_data_ptr();
  p.eps = r.eps.const_data_ptr();
  p.noise = r.noise.defined() ? r.noise.const_data_ptr() : nullptr;
  p.out = r.out.mutable_data_ptr();
  p.active = ptr_or_null<bool>(r.active);
  p.noise_scale = ptr_or_null<float>(r.noise_scale);
  p.cfg = cfg_scale.has_value();
  p.cfg_scale = cfg_scale ? static_cast<float>(*cfg_scale) : 1.f;
  return r;
}

void run(Prepared& r, const char* op = kOp) {
  const StepDtype dtype = step_dtype(r.x.scalar_type(), op);
  if (r.x.is_cpu()) {
    ddim_step_cpu(r.p, dtype);
    return;
  }
#ifdef FASTINPO_WITH_CUDA
  if (r.x.is_cuda()) {
    const c10::cuda::CUDAGuard guard(r.x.device());
    const char* err = ddim_step_cuda(r.p, dtype, c10::cuda::getCurrentCUDAStream().stream());
    TORCH_CHECK(err == nullptr, op, ": CUDA kernel launch failed: ", err);
    return;
  }
#endif
  TORCH_CHECK(false, op, ": no kernel for device ", r.x.device(),
              " (fastinpo._C was built without CUDA, or the device is not supported)");
}

// ------------------------------------------------------------------------------------------------ kernels
at::Tensor step_table(const at::Tensor& x, const at::Tensor& eps, const at::Tensor& alphas_cumprod,
                      const at::Tensor& t_from, const at::Tensor& t_to, double alpha_init,
                      const std::optional<at::Tensor>& active, const std::optional<at::Tensor>& noise,
                      const std::optional<at::Tensor>& noise_scale, std::optional<double> cfg_scale) {
  check_data(x, eps, active, noise, noise_scale, cfg_scale);
  check_table_args(x, alphas_cumprod, t_from, t_to, alpha_init);
  Prepared r = prepare(x, eps, active, noise, noise_scale, cfg_scale);
  const at::Tensor table = alphas_cumprod.contiguous();
  const at::Tensor tf = t_from.contiguous();
  const at::Tensor tt = t_to.contiguous();
  if (x.is_cpu()) check_levels_cpu(tf, tt, r.active, table.size(0));
  r.p.table = table.const_data_ptr<float>();
  r.p.table_size = table.size(0);
  r.p.t_from = tf.const_data_ptr<int64_t>();
  r.p.t_to = tt.const_data_ptr<int64_t>();
  r.p.alpha_init = static_cast<float>(alpha_init);
  run(r);
  return r.out;
}

at::Tensor step_alphas(const at::Tensor& x, const at::Tensor& eps, const at::Tensor& alpha_from,
                       const at::Tensor& alpha_to, const std::optional<at::Tensor>& active,
                       const std::optional<at::Tensor>& noise, const std::optional<at::Tensor>& noise_scale,
                       std::optional<double> cfg_scale) {
  check_data(x, eps, active, noise, noise_scale, cfg_scale);
  check_alpha_args(x, alpha_from, alpha_to);
  Prepared r = prepare(x, eps, active, noise, noise_scale, cfg_scale);
  const at::Tensor af = alpha_from.contiguous();
  const at::Tensor at_ = alpha_to.contiguous();
  if (x.is_cpu()) {
    check_alphas_cpu("alpha_from", af, r.active);
    check_alphas_cpu("alpha_to", at_, r.active);
  }
  r.p.alpha_from = af.const_data_ptr<float>();
  r.p.alpha_to = at_.const_data_ptr<float>();
  run(r);
  return r.out;
}

at::Tensor flow_step(const at::Tensor& x, const at::Tensor& v, const at::Tensor& d_sigma) {
  check_flow_args(x, v, d_sigma);
  Prepared r = prepare(x, v, std::nullopt, std::nullopt, std::nullopt, std::nullopt);
  const at::Tensor d = d_sigma.contiguous();
  if (x.is_cpu()) {  // free on CPU; on CUDA it would cost a host sync (the Python op checks before dispatch)
    const float* dv = d.const_data_ptr<float>();
    for (int64_t i = 0; i < d.size(0); ++i) {
      TORCH_CHECK_VALUE(std::isfinite(dv[i]), kFlowOp, ": d_sigma[", i, "] = ", dv[i], " must be finite");
    }
  }
  r.p.d_sigma = d.const_data_ptr<float>();
  run(r, kFlowOp);
  return r.out;
}

// Meta (fake) kernels: the same shape/dtype checks, no data read, output like x.
at::Tensor flow_step_meta(const at::Tensor& x, const at::Tensor& v, const at::Tensor& d_sigma) {
  check_flow_args(x, v, d_sigma);
  return at::empty_symint(x.sym_sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
}

at::Tensor step_table_meta(const at::Tensor& x, const at::Tensor& eps, const at::Tensor& alphas_cumprod,
                           const at::Tensor& t_from, const at::Tensor& t_to, double alpha_init,
                           const std::optional<at::Tensor>& active, const std::optional<at::Tensor>& noise,
                           const std::optional<at::Tensor>& noise_scale, std::optional<double> cfg_scale) {
  check_data(x, eps, active, noise, noise_scale, cfg_scale);
  check_table_args(x, alphas_cumprod, t_from, t_to, alpha_init);
  return at::empty_symint(x.sym_sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
}

at::Tensor step_alphas_meta(const at::Tensor& x, const at::Tensor& eps, const at::Tensor& alpha_from,
                            const at::Tensor& alpha_to, const std::optional<at::Tensor>& active,
                            const std::optional<at::Tensor>& noise, const std::optional<at::Tensor>& noise_scale,
                            std::optional<double> cfg_scale) {
  check_data(x, eps, active, noise, noise_scale, cfg_scale);
  check_alpha_args(x, alpha_from, alpha_to);
  return at::empty_symint(x.sym_sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
}

}  // namespace
}  // namespace fastinpo

TORCH_LIBRARY(fastinpo, m) {
  m.def(
      "ddim_inversion_step(Tensor x, Tensor eps, Tensor alphas_cumprod, Tensor t_from, Tensor t_to, "
      "float alpha_init, Tensor? active=None, Tensor? noise=None, Tensor? noise_scale=None, "
      "float? cfg_scale=None) -> Tensor");
  m.def(
      "ddim_inversion_step_alphas(Tensor x, Tensor eps, Tensor alpha_from, Tensor alpha_to, "
      "Tensor? active=None, Tensor? noise=None, Tensor? noise_scale=None, float? cfg_scale=None) -> Tensor");
  m.def("flow_euler_step(Tensor x, Tensor v, Tensor d_sigma) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastinpo, CPU, m) {
  m.impl("ddim_inversion_step", TORCH_FN(fastinpo::step_table));
  m.impl("ddim_inversion_step_alphas", TORCH_FN(fastinpo::step_alphas));
  m.impl("flow_euler_step", TORCH_FN(fastinpo::flow_step));
}

#ifdef FASTINPO_WITH_CUDA
TORCH_LIBRARY_IMPL(fastinpo, CUDA, m) {
  m.impl("ddim_inversion_step", TORCH_FN(fastinpo::step_table));
  m.impl("ddim_inversion_step_alphas", TORCH_FN(fastinpo::step_alphas));
  m.impl("flow_euler_step", TORCH_FN(fastinpo::flow_step));
}
#endif

TORCH_LIBRARY_IMPL(fastinpo, Meta, m) {
  m.impl("ddim_inversion_step", TORCH_FN(fastinpo::step_table_meta));
  m.impl("ddim_inversion_step_alphas", TORCH_FN(fastinpo::step_alphas_meta));
  m.impl("flow_euler_step", TORCH_FN(fastinpo::flow_step_meta));
}

// ------------------------------------------------------------------------------------------------ module
// A bare CPython module (no pybind11): importing it loads this library, whose static initializers register
// the ops above with torch's dispatcher.
static PyObject* built_with_cuda(PyObject*, PyObject*) {
#ifdef FASTINPO_WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

static PyMethodDef kMethods[] = {
    {"built_with_cuda", built_with_cuda, METH_NOARGS, "True if the CUDA kernels were compiled in."},
    {nullptr, nullptr, 0, nullptr},
};

static PyModuleDef kModule = {
    PyModuleDef_HEAD_INIT, "_C",
    "fastinpo's compiled kernels: torch.ops.fastinpo.ddim_inversion_step(_alphas) and flow_euler_step; "
    "see csrc/ops.cpp.",
    -1, kMethods,
};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&kModule); }
