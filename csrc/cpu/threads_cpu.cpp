// Knobs of the CPU kernels' thread choice (multi_tensor_cpu.h), as private ops for the tests and
// for tools/cpu_crossover.py. Not part of the primitive contract.
#include <torch/library.h>

#include "multi_tensor_cpu.h"

namespace {

// Sets the single-thread threshold when `value` >= 0; returns the previous one.
int64_t parallel_min_bytes(int64_t value) {
  auto& knob = sam_kernels::cpu::parallel_min_bytes();
  return value >= 0 ? knob.exchange(value) : knob.load();
}

int64_t threads_for(int64_t bytes, int64_t items) {
  return sam_kernels::cpu::threads_for(bytes, items);
}

int64_t last_call_threads() { return sam_kernels::cpu::last_call_threads().load(); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(sam_kernels, m) {
  m.def("_cpu_parallel_min_bytes(int value=-1) -> int", &parallel_min_bytes);
  m.def("_cpu_threads_for(int bytes, int items) -> int", &threads_for);
  m.def("_cpu_last_call_threads() -> int", &last_call_threads);
}
