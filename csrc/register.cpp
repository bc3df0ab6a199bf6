// The one registration file: op schemas, then each compiled backend's dispatch key.
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/grad_mode.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "ops.h"

TORCH_LIBRARY(sam_kernels, m) {
  m.def("sum_sq(Tensor[] xs, Tensor[] weights, float eta) -> Tensor");
  m.def("dot_sum_sq(Tensor[] a, Tensor[] b) -> Tensor");
  m.def(
      "perturb_(Tensor(a!)[] params, Tensor[] dirs, Tensor sum_sq, float rho, float eps, "
      "bool adaptive, float eta, Tensor(b!)[] backup) -> ()");
  m.def("restore_(Tensor(a!)[] params, Tensor[] backup) -> ()");
  m.def("orth_combine_(Tensor(a!)[] d, Tensor[] m, Tensor stats, float gamma, float eps) -> ()");
  m.def("lerp_sum_sq_(Tensor(a!)[] ema, Tensor[] g, float theta) -> Tensor");
  m.def("axpby_(Tensor(a!)[] ys, Tensor[] xs, float a, float b) -> ()");
  m.def("scale_(Tensor(a!)[] xs, Tensor factor) -> ()");
  m.def("add_scaled_(Tensor(a!)[] ys, Tensor[] xs, Tensor alpha) -> ()");
  m.def("sum_sq_per_tensor(Tensor[] xs) -> Tensor");
}

#define SAM_KERNELS_REGISTER_BACKEND(KEY, ns)        \
  TORCH_LIBRARY_IMPL(sam_kernels, KEY, m) {          \
    m.impl("sum_sq", &sam_kernels::ns::sum_sq);      \
    m.impl("dot_sum_sq", &sam_kernels::ns::dot_sum_sq); \
    m.impl("perturb_", &sam_kernels::ns::perturb_);  \
    m.impl("restore_", &sam_kernels::ns::restore_);  \
    m.impl("orth_combine_", &sam_kernels::ns::orth_combine_); \
    m.impl("lerp_sum_sq_", &sam_kernels::ns::lerp_sum_sq_); \
    m.impl("axpby_", &sam_kernels::ns::axpby_);      \
    m.impl("scale_", &sam_kernels::ns::scale_);      \
    m.impl("add_scaled_", &sam_kernels::ns::add_scaled_); \
    m.impl("sum_sq_per_tensor", &sam_kernels::ns::sum_sq_per_tensor); \
  }

SAM_KERNELS_REGISTER_BACKEND(CPU, cpu)
#ifdef SAM_KERNELS_WITH_CUDA
SAM_KERNELS_REGISTER_BACKEND(CUDA, cuda)
#endif

namespace {

// Tensors of the arguments of a call on `stack` (Tensor and Tensor[] arguments), each with its
// argument name, index in its list (-1 for a single Tensor) and whether the op writes it.
template <typename F>
void for_each_tensor_arg(const c10::FunctionSchema& schema, const torch::jit::Stack& stack,
                         const F& f) {
  const size_t n_args = schema.arguments().size();
  const size_t first = stack.size() - n_args;
  for (size_t i = 0; i < n_args; ++i) {
    const bool written = schema.is_mutable({c10::SchemaArgType::input, i});
    const std::string& name = schema.arguments()[i].name();
    const c10::IValue& arg = stack[first + i];
    if (arg.isTensorList()) {
      const auto list = arg.toTensorList();
      for (size_t k = 0; k < list.size(); ++k) f(name, static_cast<int64_t>(k), list[k], written);
    } else if (arg.isTensor()) {
      f(name, int64_t(-1), arg.toTensor(), written);
    }
  }
}

// Autograd kernel of the ops that write. They have no derivative, so with grad mode on they
// refuse every tensor argument that requires grad, before any write: a written leaf (or view of
// one) with torch's own message, anything else with ours; sam_kernels/ops/_checks.py
// check_grad_mode applies the same rule in the same order on every backend. Then the op runs
// below autograd; the ADInplaceOrView kernel below bumps the version counters.
void refuse_grad_then_run(const c10::OperatorHandle& op, c10::DispatchKeySet keys,
                          torch::jit::Stack* stack) {
  if (at::GradMode::is_enabled()) {
    const std::string op_name = op.schema().name().substr(op.schema().name().find("::") + 2);
    for_each_tensor_arg(op.schema(), *stack, [&](const std::string& name, int64_t index,
                                                 const at::Tensor& t, bool written) {
      if (!t.defined() || !t.requires_grad()) return;
      if (written) {
        TORCH_CHECK(!t.is_leaf(),
                    "a leaf Variable that requires grad is being used in an in-place operation.");
        const bool view_of_leaf = t.is_view() && t._base().is_leaf() && t._base().requires_grad();
        TORCH_CHECK(!view_of_leaf, "a view of a leaf Variable that requires grad is being used "
                    "in an in-place operation.");
      }
      const std::string label = index < 0 ? name : name + "[" + std::to_string(index) + "]";
      TORCH_CHECK(false, op_name, ": ", label, " requires grad and grad mode is on; the "
                  "sam_kernels primitives have no derivative: call them under torch.no_grad()");
    });
  }
  at::AutoDispatchBelowAutograd guard;
  op.redispatchBoxed(keys & c10::after_autograd_keyset, stack);
}

// ADInplaceOrView kernel of the ops that write: runs the op below this key, then bumps the
// version counter of every tensor of every list the schema marks as written (`Tensor(a!)[]`),
// as torch's own in-place ops do, so backward through a tensor saved before the write raises
// "modified by an inplace operation". torch's generic fallbacks only handle written tensors
// that an op returns, and these ops return none. A call that raises (bad arguments) writes
// nothing and bumps nothing.
void bump_written_versions(const c10::OperatorHandle& op, c10::DispatchKeySet keys,
                           torch::jit::Stack* stack) {
  std::vector<at::Tensor> written;
  for_each_tensor_arg(op.schema(), *stack, [&](const std::string&, int64_t, const at::Tensor& t,
                                               bool is_written) {
    if (is_written) written.push_back(t);
  });
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
  }
  for (const at::Tensor& t : written) t.unsafeGetTensorImpl()->bump_version();
}

}  // namespace

// Autograd sees these ops as in-place ops without a derivative: the reductions get torch's
// not-implemented fallback (backward through a result raises instead of returning a silently
// wrong gradient), the writing ops the kernels above.
TORCH_LIBRARY_IMPL(sam_kernels, Autograd, m) {
  for (const char* name : {"sum_sq", "dot_sum_sq", "sum_sq_per_tensor"}) {
    m.impl(name, torch::autograd::autogradNotImplementedFallback());
  }
  for (const char* name : {"perturb_", "restore_", "orth_combine_", "lerp_sum_sq_", "axpby_",
                           "scale_", "add_scaled_"}) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&refuse_grad_then_run>());
  }
}

TORCH_LIBRARY_IMPL(sam_kernels, ADInplaceOrView, m) {
  for (const char* name : {"perturb_", "restore_", "orth_combine_", "lerp_sum_sq_", "axpby_",
                           "scale_", "add_scaled_"}) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&bump_written_versions>());
  }
}
