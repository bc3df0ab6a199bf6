"""Build sam_kernels.

Two ways to get the compiled kernels (see sam_kernels/_build.py for the one description both use):
- ahead of time (AOT): `pip install --no-build-isolation .` with torch already installed builds
  one extension module `sam_kernels._C` holding the C++ CPU kernels and, when torch has CUDA and
  nvcc is found, the CUDA kernels (registered for the same ops);
- on first use (JIT): a build where torch is not importable (pip's default isolated build: torch
  is deliberately not a build requirement, see pyproject.toml) makes a pure-Python wheel that
  carries the C++/CUDA sources (sam_kernels/_csrc); `sam_kernels._extension` compiles them with
  torch.utils.cpp_extension.load into a cache the first time the kernels are needed.
Every wheel carries the sources, so an AOT build whose torch was later upgraded is rebuilt on
first use too.

Environment:
  FORCE_CUDA=1            build the CUDA part or fail (e.g. on a machine without a GPU driver)
  SAM_KERNELS_NO_CUDA=1   never build the CUDA part
  SAM_KERNELS_NO_AOT=1    skip the ahead-of-time build even when torch is importable
  TORCH_CUDA_ARCH_LIST    the usual torch variable; see _build.cuda_arch_list() for our default
  MAX_JOBS                parallel compile jobs (ninja)
"""
import importlib.util
import json
import os
import shutil
import sys

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = "csrc"  # relative: setuptools wants relative source paths
PACKAGED_CSRC = os.path.join("sam_kernels", "_csrc")  # where the wheel carries the sources


def _load_build_module():
    spec = importlib.util.spec_from_file_location(
        "_sam_kernels_build", os.path.join(ROOT, "sam_kernels", "_build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_build = _load_build_module()


def _say(msg):
    print(f"sam_kernels: {msg}", file=sys.stderr)


class BuildPyWithSources(build_py):
    """Also copies csrc/ into the package (sam_kernels/_csrc) so a wheel can compile its kernels
    on first use. Not in editable mode: there the checkout's csrc/ is used directly."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        target = os.path.join(self.build_lib, PACKAGED_CSRC)
        if os.path.isdir(target):
            shutil.rmtree(target)
        for path in _build.source_files(os.path.join(ROOT, CSRC)):
            rel = os.path.relpath(path, os.path.join(ROOT, CSRC))
            os.makedirs(os.path.dirname(os.path.join(target, rel)), exist_ok=True)
            shutil.copy2(path, os.path.join(target, rel))


def _extensions():
    cmdclass = {"build_py": BuildPyWithSources}
    if _build._flag("SAM_KERNELS_NO_AOT"):
        _say("SAM_KERNELS_NO_AOT=1: no ahead-of-time build; the kernels will be compiled on "
             "first use (JIT)")
        return [], cmdclass
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as exc:
        _say(f"torch is not importable in this build environment ({exc}), so the kernels are not "
             "compiled now (pip's default isolated build does not install torch, on purpose: "
             "it would pull a different, possibly 5 GB CUDA, torch). This wheel is pure Python "
             "and carries the C++ sources: the kernels will be compiled on first use (JIT, once, "
             "~1-2 min, needs a C++ compiler). To build them now instead, install torch first "
             "and run `pip install --no-build-isolation .`")
        return [], cmdclass

    include_dirs = _build.include_dirs(os.path.join(ROOT, CSRC))
    sources = _build.cpu_sources(CSRC)
    cuda_sources = _build.cuda_sources(CSRC)
    with_cuda, why = _build.want_cuda(torch, cpp_extension, bool(cuda_sources))
    _say(f"compiling the kernels ahead of time against torch {torch.__version__}")
    _say(f"CUDA kernels {'enabled' if with_cuda else 'disabled'} ({why})")

    if with_cuda:
        _build.configure_cuda_env(torch, cpp_extension)
        _say(f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
        cuda_includes = _build.torch_cuda_include_flags(torch)
        ext = cpp_extension.CUDAExtension(
            "sam_kernels._C",
            sources + cuda_sources,
            include_dirs=include_dirs,
            define_macros=[(_build.CUDA_MACRO, None)],
            extra_compile_args={"cxx": _build.CXX_FLAGS + cuda_includes,
                                "nvcc": _build.NVCC_FLAGS + cuda_includes},
            extra_link_args=_build.LDFLAGS,
        )
    else:
        ext = cpp_extension.CppExtension(
            "sam_kernels._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": _build.CXX_FLAGS},
            extra_link_args=_build.LDFLAGS,
        )

    base = cpp_extension.BuildExtension.with_options(use_ninja=True)

    class BuildExtWithInfo(base):
        """Writes <extension>.json next to the built library: the torch it was compiled
        against, so the loader can tell a stale build (torch upgraded) from a good one."""

        def build_extension(self, ext):
            super().build_extension(ext)
            name = ext.name.split(".")[-1] + ".build.json"
            dirs = {os.path.dirname(self.get_ext_fullpath(ext.name))}
            if self.inplace or getattr(self, "editable_mode", False):
                # an editable install builds in a temporary directory and copies only the
                # library into the checkout: the record goes there directly
                dirs.add(os.path.join(ROOT, *ext.name.split(".")[:-1]))
            for d in dirs:
                os.makedirs(d, exist_ok=True)
                with open(os.path.join(d, name), "w") as f:
                    json.dump({"torch": torch.__version__, "cuda": with_cuda}, f)

    cmdclass["build_ext"] = BuildExtWithInfo
    return [ext], cmdclass


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["sam_kernels", "sam_kernels.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
