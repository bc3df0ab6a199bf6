"""How the kernels are compiled: the one description shared by the ahead-of-time build (setup.py,
`pip install --no-build-isolation .`) and the build on first use (`sam_kernels._extension`, JIT
through `torch.utils.cpp_extension.load`).

No torch import at module level: setup.py loads this file by path, before it knows whether torch
is importable in the build environment. Functions take the torch modules as arguments.
"""
import glob
import os
import re
import subprocess

# No -std flag: torch's BuildExtension / load() add the standard its headers need (-std=c++20 in
# torch 2.13 and 2.14; torch 2.14's ATen refuses C++17), and nvcc rejects a second -std.
CXX_FLAGS = ["-O3", "-fopenmp", "-Wall", "-Wextra", "-Wno-unused-parameter"]
# -lineinfo: source lines in profilers at no runtime cost. Host-side warnings of our .cu files
# are enabled like the C++ ones (CI fails on any from csrc/).
NVCC_FLAGS = ["-O3", "-lineinfo", "-Xcompiler=-Wall,-Wextra,-Wno-unused-parameter"]
LDFLAGS = ["-fopenmp"]
CUDA_MACRO = "SAM_KERNELS_WITH_CUDA"


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def cpu_sources(csrc):
    """The C++ sources of the CPU kernels and the op registration, under the directory `csrc`."""
    return sorted(glob.glob(os.path.join(csrc, "*.cpp")) +
                  glob.glob(os.path.join(csrc, "cpu", "*.cpp")))


def cuda_sources(csrc):
    return sorted(glob.glob(os.path.join(csrc, "cuda", "*.cu")) +
                  glob.glob(os.path.join(csrc, "cuda", "*.cpp")))


def include_dirs(csrc):
    return [os.path.join(csrc, "include"), csrc]


def source_files(csrc):
    """Every file the build reads from `csrc` (sources and headers), sorted: what a cache key
    must cover."""
    found = []
    for root, _dirs, files in os.walk(csrc):
        for f in files:
            if f.endswith((".cpp", ".cu", ".h", ".cuh", ".hpp")):
                found.append(os.path.join(root, f))
    return sorted(found)


def want_cuda(torch, cpp_extension, have_sources):
    """(build the CUDA part?, why) for an ahead-of-time build (no GPU needed)."""
    if _flag("SAM_KERNELS_NO_CUDA"):
        return False, "SAM_KERNELS_NO_CUDA=1"
    reasons = []
    if not have_sources:
        reasons.append("no CUDA sources in csrc/cuda")
    if torch.version.cuda is None:
        reasons.append(f"torch {torch.__version__} is a CPU-only build")
    if cuda_home(cpp_extension) is None:
        reasons.append("nvcc not found (set CUDA_HOME to the CUDA toolkit root)")
    if reasons:
        if _flag("FORCE_CUDA"):
            raise RuntimeError("FORCE_CUDA=1 but the CUDA kernels cannot be built: " +
                               "; ".join(reasons))
        return False, "; ".join(reasons)
    return True, f"torch CUDA {torch.version.cuda}, nvcc in {cuda_home(cpp_extension)}"


def _has_nvcc(root):
    return bool(root) and os.path.exists(os.path.join(root, "bin", "nvcc"))


def cuda_home(cpp_extension):
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


def configure_cuda_env(torch, cpp_extension, default_arch_list=True):
    """Points torch's build helpers at the toolkit root; with `default_arch_list`, sets
    TORCH_CUDA_ARCH_LIST (when unset) to every architecture this torch ships (an AOT build for
    any GPU). Without it torch builds for the GPUs it sees (what a build on first use wants)."""
    root = cuda_home(cpp_extension)
    os.environ["CUDA_HOME"] = root
    cpp_extension.CUDA_HOME = root  # read at import time; the build uses the module global
    if default_arch_list and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = cuda_arch_list(torch, root)
    return root


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


def torch_cuda_include_flags(torch):
    """CUDA headers that ship inside torch's nvidia/* wheels (cusparse.h, cublas_v2.h, which
    ATen's CUDA headers include and a minimal toolkit may lack). Passed as -isystem so they come
    after the toolkit's own include directory: they fill gaps, never shadow the toolkit."""
    site = os.path.dirname(os.path.dirname(torch.__file__))
    dirs = sorted(d for d in glob.glob(os.path.join(site, "nvidia", "*", "include"))
                  if os.path.isdir(d))
    return [flag for d in dirs for flag in ("-isystem", d)]
