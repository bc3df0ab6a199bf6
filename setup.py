"""Build sam_kernels: one extension module `sam_kernels._C` holding the C++ CPU kernels and,
when torch has CUDA and nvcc is found, the CUDA kernels (registered for the same ops).

Environment:
  FORCE_CUDA=1            build the CUDA part or fail (e.g. on a machine without a GPU driver)
  SAM_KERNELS_NO_CUDA=1   never build the CUDA part
  TORCH_CUDA_ARCH_LIST    the usual torch variable; see cuda_arch_list() for our default
  MAX_JOBS                parallel compile jobs (ninja)
"""
import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _extensions():
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("sam_kernels: torch is not installed; installing the pure-Python package only "
              "(reference backend). Install torch first and use --no-build-isolation to build "
              "the kernels.", file=sys.stderr)
        return [], {}

    include_dirs = [os.path.join(ROOT, "csrc", "include"), os.path.join(ROOT, "csrc")]
    cxx_flags = ["-O3", "-fopenmp", "-std=c++17", "-Wall", "-Wextra", "-Wno-unused-parameter"]
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) +
                     glob.glob(os.path.join("csrc", "cpu", "*.cpp")))

    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")) +
                          glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
    with_cuda, why = _want_cuda(torch, cpp_extension, bool(cuda_sources))
    print(f"sam_kernels: CUDA kernels {'enabled' if with_cuda else 'disabled'} ({why})",
          file=sys.stderr)

    if with_cuda:
        _configure_cuda_env(torch)
        ext = cpp_extension.CUDAExtension(
            "sam_kernels._C",
            sources + cuda_sources,
            include_dirs=include_dirs + _torch_cuda_include_dirs(torch),
            define_macros=[("SAM_KERNELS_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags,
                                "nvcc": ["-O3", "-std=c++17", "--expt-relaxed-constexpr",
                                         "-lineinfo"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = cpp_extension.CppExtension(
            "sam_kernels._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=True)
    return [ext], {"build_ext": build_ext}


def _want_cuda(torch, cpp_extension, have_sources):
    if _flag("SAM_KERNELS_NO_CUDA"):
        return False, "SAM_KERNELS_NO_CUDA=1"
    reasons = []
    if not have_sources:
        reasons.append("no CUDA sources in csrc/cuda")
    if torch.version.cuda is None:
        reasons.append(f"torch {torch.__version__} is a CPU-only build")
    if cpp_extension.CUDA_HOME is None and not os.path.exists("/usr/local/cuda/bin/nvcc"):
        reasons.append("nvcc not found (set CUDA_HOME)")
    if reasons:
        if _flag("FORCE_CUDA"):
            raise RuntimeError("FORCE_CUDA=1 but the CUDA kernels cannot be built: " +
                               "; ".join(reasons))
        return False, "; ".join(reasons)
    return True, f"torch CUDA {torch.version.cuda}"


def _configure_cuda_env(torch):
    from torch.utils import cpp_extension
    # torch may guess CUDA_HOME from a wrapper script's location; prefer the conventional root.
    if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
        cpp_extension.CUDA_HOME = "/usr/local/cuda"
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = cuda_arch_list(torch)


def cuda_arch_list(torch):
    """Default: every architecture this torch build ships kernels for (sm_XX in
    torch.cuda.get_arch_list()), plus PTX of the newest for forward compatibility."""
    archs = [a.split("_")[1] for a in torch.cuda.get_arch_list() if a.startswith("sm_")]
    archs = sorted({f"{a[:-1]}.{a[-1]}" for a in archs}, key=lambda v: float(v))
    if not archs:
        archs = ["8.0", "9.0"]
    return ";".join(archs[:-1] + [archs[-1] + "+PTX"])


def _torch_cuda_include_dirs(torch):
    """CUDA headers that ship inside torch's nvidia/cu* wheels (e.g. cusparse.h)."""
    site = os.path.dirname(os.path.dirname(torch.__file__))
    return sorted(d for d in glob.glob(os.path.join(site, "nvidia", "*", "include"))
                  if os.path.isdir(d))


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["sam_kernels", "sam_kernels.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
