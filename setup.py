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
import re
import subprocess
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
    # No -std flag: torch's BuildExtension adds the standard its headers need (-std=c++20 in
    # torch 2.13 and 2.14; torch 2.14's ATen refuses C++17), and nvcc rejects a second -std.
    cxx_flags = ["-O3", "-fopenmp", "-Wall", "-Wextra", "-Wno-unused-parameter"]
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
            include_dirs=include_dirs,
            define_macros=[("SAM_KERNELS_WITH_CUDA", None)],
            extra_compile_args={
                "cxx": cxx_flags + _torch_cuda_include_flags(torch),
                # -lineinfo: source lines in profilers at no runtime cost. Host-side warnings of
                # our .cu files are enabled like the C++ ones (CI fails on any from csrc/).
                "nvcc": ["-O3", "-lineinfo", "-Xcompiler=-Wall,-Wextra,-Wno-unused-parameter"] +
                        _torch_cuda_include_flags(torch)},
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
    if _cuda_home(cpp_extension) is None:
        reasons.append("nvcc not found (set CUDA_HOME to the CUDA toolkit root)")
    if reasons:
        if _flag("FORCE_CUDA"):
            raise RuntimeError("FORCE_CUDA=1 but the CUDA kernels cannot be built: " +
                               "; ".join(reasons))
        return False, "; ".join(reasons)
    return True, f"torch CUDA {torch.version.cuda}, nvcc in {_cuda_home(cpp_extension)}"


def _has_nvcc(root):
    return bool(root) and os.path.exists(os.path.join(root, "bin", "nvcc"))


def _cuda_home(cpp_extension):
    """The CUDA toolkit root: $CUDA_HOME / $CUDA_PATH when set, else /usr/local/cuda, else torch's
    guess. torch guesses from `which nvcc`, which is wrong when nvcc on the PATH is a wrapper
    script (e.g. /usr/local/bin/nvcc), hence the conventional root before the guess."""
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if root:
            return root if _has_nvcc(root) else None
    for root in ("/usr/local/cuda", cpp_extension.CUDA_HOME):
        if _has_nvcc(root):
            return root
    return None


def _configure_cuda_env(torch):
    from torch.utils import cpp_extension
    root = _cuda_home(cpp_extension)
    os.environ["CUDA_HOME"] = root
    cpp_extension.CUDA_HOME = root  # read at import time; the build uses the module global
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = cuda_arch_list(torch, root)
    print(f"sam_kernels: TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}",
          file=sys.stderr)


def cuda_arch_list(torch, cuda_home=None):
    """Default TORCH_CUDA_ARCH_LIST: every architecture this torch build ships kernels for
    (its sm_XY list, e.g. 7.5;8.0;8.6;9.0;10.0;12.0 for torch 2.14+cu130; it does not need a GPU),
    less any the local nvcc cannot target, plus PTX of the newest for forward compatibility."""
    try:
        flags = torch._C._cuda_getArchFlags().split()
    except (AttributeError, RuntimeError):
        flags = torch.cuda.get_arch_list()
    versions = set()
    for flag in flags:
        m = re.fullmatch(r"sm_(\d+)(\d)[a-z]?", flag)
        if m:
            versions.add((int(m.group(1)), int(m.group(2))))
    nvcc_archs = _nvcc_archs(cuda_home)
    if nvcc_archs:
        versions = {v for v in versions if v in nvcc_archs}
    if not versions:  # unusual torch build: Ampere and Hopper
        versions = {(8, 0), (9, 0)}
    archs = [f"{major}.{minor}" for major, minor in sorted(versions)]
    return ";".join(archs[:-1] + [archs[-1] + "+PTX"])


def _nvcc_archs(cuda_home):
    """The (major, minor) compute capabilities nvcc can compile for, or None if unknown."""
    if not _has_nvcc(cuda_home):
        return None
    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--list-gpu-arch"],
                             capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = {(int(a), int(b)) for a, b in re.findall(r"compute_(\d+)(\d)\b", out)}
    return found or None


def _torch_cuda_include_flags(torch):
    """CUDA headers that ship inside torch's nvidia/* wheels (cusparse.h, cublas_v2.h, which
    ATen's CUDA headers include and a minimal toolkit may lack). Passed as -isystem so they come
    after the toolkit's own include directory: they fill gaps, never shadow the toolkit."""
    site = os.path.dirname(os.path.dirname(torch.__file__))
    dirs = sorted(d for d in glob.glob(os.path.join(site, "nvidia", "*", "include"))
                  if os.path.isdir(d))
    return [flag for d in dirs for flag in ("-isystem", d)]


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["sam_kernels", "sam_kernels.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
