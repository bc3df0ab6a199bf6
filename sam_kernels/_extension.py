"""Loads the compiled kernels once per process, remembering how (and why not, when it cannot).

Where the kernels come from, in order:
1. the ahead-of-time build `sam_kernels._C` (`pip install --no-build-isolation .`), unless it was
   compiled against another torch than the one running (its `_C.build.json` says which);
2. otherwise a build on first use (JIT): the C++ sources the package carries (sam_kernels/_csrc in
   a wheel, csrc/ in a checkout) compiled with `torch.utils.cpp_extension.load` into a cache
   directory keyed by the torch version, the Python version and a hash of the sources and flags,
   so an upgrade of either builds anew and a second import only loads the library. The first
   build prints one line saying so and takes ~1-2 min for the CPU kernels (the CUDA kernels too
   when torch has CUDA, a GPU is visible and nvcc is found: several minutes).

Cache: $TORCH_EXTENSIONS_DIR/sam_kernels/<torch>-py<XY>-<cpu|cuda>-<hash> (default root
~/.cache/torch_extensions, torch's own default). Two processes importing at once: cpp_extension's
file baton (a `lock` file in that directory) lets one compile while the other waits; a library is
used only after its build finished (the `built` marker written after a successful load).
Threads of one process: one lock around the whole load.

Environment:
  SAM_KERNELS_DISABLE_EXTENSION=1  neither load nor compile the kernels (the reference backend
                                   is then used, with a warning, under backend='auto')
  SAM_KERNELS_JIT=1                ignore an ahead-of-time build; use (compile) the JIT one
  SAM_KERNELS_NO_CUDA=1            compile only the CPU kernels
  TORCH_EXTENSIONS_DIR, CXX, MAX_JOBS, TORCH_CUDA_ARCH_LIST: as for torch.utils.cpp_extension
"""
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from typing import Dict, Optional

import torch

from . import _build

DISABLE_VAR = "SAM_KERNELS_DISABLE_EXTENSION"
JIT_VAR = "SAM_KERNELS_JIT"
_PKG_DIR = os.path.dirname(os.path.abspath(__file__))

_lock = threading.Lock()
_loaded: Optional[bool] = None  # None: not tried yet; True / False afterwards
_error = ""
_info: Dict[str, str] = {}

NO_COMPILER_HELP = (
    "Install one and import sam_kernels again (Debian/Ubuntu: `sudo apt-get install g++`; "
    "Fedora/RHEL: `sudo dnf install gcc-c++`; conda: `conda install -c conda-forge gxx`), or "
    "point CXX at a working compiler. Alternatively build the kernels ahead of time where a "
    "compiler exists: `pip install torch && pip install --no-build-isolation .`. To run on the "
    "slower pure-PyTorch reference backend deliberately, pass backend='reference' (or set "
    f"{DISABLE_VAR}=1).")


def _enabled(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _say(msg: str) -> None:
    print(f"sam_kernels: {msg}", file=sys.stderr, flush=True)


def load() -> bool:
    """Load the kernels (registers the `torch.ops.sam_kernels` ops), compiling them first when
    needed. Never raises: on failure error() says why and what to do."""
    global _loaded, _error, _info
    if _loaded is not None:
        return _loaded
    with _lock:
        if _loaded is None:
            try:
                _loaded, _error, _info = _load()
            except Exception as exc:  # a bug here must not hide the reason
                _loaded, _error, _info = False, f"loading the kernels failed: {exc!r}", {}
                _say(_error)
    return _loaded


def error() -> str:
    """Why the kernels are not available ('' when they are)."""
    load()
    return _error


def info() -> Dict[str, str]:
    """How the loaded kernels were built: {'build': 'built ahead of time' | 'JIT-built on first
    use', 'path': the library, 'torch': the version it was built for, 'note': why not ahead of
    time, if so}; {} when not loaded."""
    load()
    return dict(_info)


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether `sam_kernels::<op>` has a kernel registered for `dispatch_key` (e.g. 'CUDA')."""
    if not load():
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"sam_kernels::{op}", dispatch_key)


def _load():
    if _enabled(DISABLE_VAR):
        return False, (f"{DISABLE_VAR}=1 is set: the compiled kernels are neither loaded nor "
                       f"compiled; unset it to use them"), {}
    note = ""
    if _enabled(JIT_VAR):
        note = f"{JIT_VAR}=1: the ahead-of-time build (if any) is ignored"
    else:
        aot = _load_aot()
        if aot[0]:
            return aot
        note = aot[1]
        if importlib.util.find_spec("sam_kernels._C") is not None:  # stale or broken: say so
            _say(f"{note}; using kernels compiled on first use for this torch instead")
    return _load_jit(note)


def _load_aot():
    """(True, '', info) when the ahead-of-time build loads; else (False, why, {})."""
    spec = importlib.util.find_spec("sam_kernels._C")
    if spec is None or spec.origin is None:
        return False, "no ahead-of-time build (sam_kernels._C) is installed", {}
    built_for = None
    try:
        with open(os.path.join(os.path.dirname(spec.origin), "_C.build.json")) as f:
            built_for = json.load(f).get("torch")
    except (OSError, ValueError):
        pass  # older builds wrote no record: try loading
    if built_for is not None and built_for != torch.__version__:
        return False, (f"the ahead-of-time build {spec.origin} was compiled for torch "
                       f"{built_for}, this is torch {torch.__version__}"), {}
    try:
        torch.ops.load_library(spec.origin)
    except OSError as exc:  # e.g. built against a different torch
        return False, f"the ahead-of-time build {spec.origin} failed to load ({exc})", {}
    return True, "", {"build": "built ahead of time", "path": spec.origin,
                      "torch": built_for or "?"}


def sources_dir() -> Optional[str]:
    """The kernel sources this install carries: sam_kernels/_csrc in a wheel, csrc/ next to the
    package in a checkout (editable install)."""
    for d in (os.path.join(_PKG_DIR, "_csrc"), os.path.join(os.path.dirname(_PKG_DIR), "csrc")):
        if _build.cpu_sources(d):
            return d
    return None


def cache_root() -> str:
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser(os.path.join("~", ".cache")),
        "torch_extensions")
    return os.path.join(root, "sam_kernels")


def _jit_wants_cuda(csrc: str):
    """(compile the CUDA kernels too?, why). A build on first use is for this machine: only with a
    CUDA torch, a visible GPU and nvcc."""
    from torch.utils import cpp_extension
    if _enabled("SAM_KERNELS_NO_CUDA"):
        return False, "SAM_KERNELS_NO_CUDA=1"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU-only build"
    if not _build.cuda_sources(csrc):
        return False, "no CUDA sources"
    if not torch.cuda.is_available():
        return False, "no CUDA device is visible"
    if _build.cuda_home(cpp_extension) is None:
        return False, "nvcc not found (set CUDA_HOME to the CUDA toolkit root)"
    return True, ""


def _flags(csrc: str, with_cuda: bool):
    cflags = list(_build.CXX_FLAGS)
    cuda_flags = list(_build.NVCC_FLAGS)
    if with_cuda:
        cuda_includes = _build.torch_cuda_include_flags(torch)
        cflags += [f"-D{_build.CUDA_MACRO}"] + cuda_includes
        cuda_flags += [f"-D{_build.CUDA_MACRO}"] + cuda_includes
    return cflags, cuda_flags


def _build_dir(csrc: str, with_cuda: bool, cflags, cuda_flags) -> str:
    h = hashlib.sha256()
    for path in _build.source_files(csrc):
        h.update(os.path.relpath(path, csrc).encode() + b"\0")
        with open(path, "rb") as f:
            h.update(f.read() + b"\0")
    h.update(json.dumps([cflags, cuda_flags, _build.LDFLAGS, torch.__version__,
                         torch.version.cuda, os.environ.get("CXX", "c++"),
                         os.environ.get("TORCH_CUDA_ARCH_LIST", "") if with_cuda else ""]
                        ).encode())
    tag = (f"torch{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}-"
           f"{'cuda' if with_cuda else 'cpu'}-{h.hexdigest()[:16]}")
    return os.path.join(cache_root(), "".join(c if c.isalnum() or c in ".-_" else "_"
                                              for c in tag))


def _compiler_problem() -> Optional[str]:
    cxx = os.environ.get("CXX", "c++")
    exe = shutil.which(cxx)
    if exe is None:
        if "CXX" in os.environ:
            return f"no C++ compiler was found: CXX={cxx!r} is not an executable on PATH"
        return "no C++ compiler was found: `c++` is not on PATH (and CXX is not set)"
    try:
        run = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"the C++ compiler {exe} does not run ({exc})"
    if run.returncode != 0:
        return (f"the C++ compiler {exe} does not work (`{cxx} --version` exited with "
                f"{run.returncode})")
    return None


def _load_jit(note: str):
    why_jit = f"; {note}" if note else ""
    csrc = sources_dir()
    if csrc is None:
        msg = (f"the kernels cannot be compiled on first use (JIT{why_jit}): this install "
               f"carries no kernel sources (no {os.path.join(_PKG_DIR, '_csrc')}); reinstall the "
               "package (`pip install .` from a checkout or `pip install git+<repository url>`)")
        _say(msg)
        return False, msg, {}
    with_cuda, cuda_why = _jit_wants_cuda(csrc)
    if with_cuda:
        ok, msg, info, compiler_works = _jit_build(csrc, True, why_jit, "")
        if ok or not compiler_works:
            return ok, msg, info
        cuda_why = "compiling the CUDA kernels on first use failed (the message above)"
        _say("compiling the CPU kernels only, so that CPU tensors get compiled kernels")
    ok, msg, info, _ = _jit_build(csrc, False, why_jit, cuda_why)
    return ok, msg, info


def _jit_build(csrc: str, with_cuda: bool, why_jit: str, cuda_why: str):
    """(loaded?, error, info, whether the compiler works): the cached library when its build
    finished, else a build now."""
    from torch.utils import cpp_extension
    cflags, cuda_flags = _flags(csrc, with_cuda)
    build_dir = _build_dir(csrc, with_cuda, cflags, cuda_flags)
    name = "sam_kernels_jit"
    library = os.path.join(build_dir, f"{name}.so")
    marker = os.path.join(build_dir, "built")
    info = {"build": "JIT-built on first use", "path": library, "torch": torch.__version__,
            "note": why_jit[2:], "cuda": "" if with_cuda else cuda_why}
    if os.path.exists(marker) and os.path.exists(library):
        try:
            torch.ops.load_library(library)
            return True, "", info, True
        except OSError as exc:
            _say(f"the cached kernels {library} failed to load ({exc}); compiling them again")
            os.remove(marker)

    problem = _compiler_problem()
    if problem is None and not cpp_extension.is_ninja_available():
        problem = "ninja is not installed (torch's extension builder needs it): `pip install ninja`"
    if problem is not None:
        msg = (f"the compiled kernels are not available: they are compiled on first use "
               f"(JIT{why_jit}) and {problem}. " +
               (NO_COMPILER_HELP if "ninja" not in problem else "Then import sam_kernels again."))
        _say(msg)
        return False, msg, {}, False

    what = "CPU and CUDA" if with_cuda else "CPU"
    eta = "several minutes" if with_cuda else "~1-2 min"
    _say(f"compiling the {what} kernels for torch {torch.__version__} (once, {eta}) into "
         f"{build_dir} ..." + (f" [no CUDA kernels: {cuda_why}]"
                           if torch.version.cuda is not None and not with_cuda else ""))
    os.makedirs(build_dir, exist_ok=True)
    lock = os.path.join(build_dir, "lock")
    if os.path.exists(lock):
        _say(f"another process is compiling them; waiting for it (if none is, e.g. one was "
             f"killed mid-build, delete {lock})")
    if with_cuda:
        _build.configure_cuda_env(torch, cpp_extension, default_arch_list=False)
    start = time.monotonic()
    try:
        cpp_extension.load(
            name=name, sources=_build.cpu_sources(csrc) +
            (_build.cuda_sources(csrc) if with_cuda else []),
            extra_cflags=cflags, extra_cuda_cflags=cuda_flags, extra_ldflags=_build.LDFLAGS,
            extra_include_paths=_build.include_dirs(csrc), build_directory=build_dir,
            with_cuda=with_cuda, is_python_module=False, verbose=False)
    except Exception as exc:  # compile/link errors arrive as RuntimeError with the log
        lines = str(exc).strip().splitlines()
        tail = "\n".join(lines[-40:])
        msg = (f"compiling the {what} kernels on first use failed ({type(exc).__name__}); the "
               f"compiler said (last lines):\n{tail}\nThe build files are in {build_dir}. Fix "
               "the compiler (CXX, MAX_JOBS) and import sam_kernels again; to run on the slower "
               f"reference backend deliberately, pass backend='reference' (or set "
               f"{DISABLE_VAR}=1)")
        _say(msg)
        return False, msg, {}, True
    with open(marker + ".tmp", "w") as f:
        f.write(f"torch {torch.__version__}\n")
    os.replace(marker + ".tmp", marker)
    _say(f"compiled the {what} kernels in {time.monotonic() - start:.0f} s (cached: a later "
         f"import only loads {library})")
    return True, "", info, True
