"""The install paths that do not build the kernels ahead of time: pip's default isolated build
(`pip install .`, `pip install git+...`) must give a package that compiles its kernels on first
use (JIT) and says so, and a machine without a compiler must get a message naming what to do,
never a silent fall-back to the reference backend."""
import json
import os
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from sam_kernels import _extension

REPO = Path(__file__).resolve().parent.parent
PROGRESS = "sam_kernels: compiling the CPU kernels for torch"


def _clean_env(**extra):
    """This process's environment without anything that would point a child at the checkout or
    change which kernels it loads."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SAM_KERNELS_") and k not in ("PYTHONPATH", "TRITON_INTERPRET",
                                                            "TORCH_EXTENSIONS_DIR", "CXX")}
    env.update(extra)
    return env


def _run(cmd, **kw):
    start = time.monotonic()
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    print(f"[{time.monotonic() - start:5.0f} s] {' '.join(str(c) for c in cmd)[:120]}")
    assert res.returncode == 0, (f"{cmd} exited with {res.returncode}\n--- stdout\n"
                                 f"{res.stdout[-4000:]}\n--- stderr\n{res.stderr[-4000:]}")
    return res


def _copy_checkout(dst: Path):
    """The working tree as a fresh clone would have it: no venvs, build outputs or binaries."""
    ignore = shutil.ignore_patterns(".git", ".venv*", "build", "dist", "*.egg-info", "__pycache__",
                                    "*.so", "_C.build.json", ".pytest_cache", "results", "out")
    shutil.copytree(REPO, dst, ignore=ignore)


@pytest.mark.slow
def test_isolated_pip_install_compiles_the_kernels_on_first_use(tmp_path):
    """Fresh venv; torch (this CPU version) first, then `pip install .` WITH build isolation, the
    way a user runs it (a constraint keeps pip from resolving torch anew: the 5 GB CUDA wheel).
    The build must say it skipped the ahead-of-time build; the first use must compile the CPU
    kernels, print the progress line, and report them as JIT-built; a second process must only
    load them from the cache."""
    src, venv, cache = tmp_path / "src", tmp_path / "venv", tmp_path / "torch_extensions"
    _copy_checkout(src)
    _run([sys.executable, "-m", "venv", venv])
    py = venv / "bin" / "python"
    pip = [py, "-m", "pip", "--disable-pip-version-check", "install", "--progress-bar", "off"]
    torch_pin = f"torch=={torch.__version__.split('+')[0]}"
    env = _clean_env(MAX_JOBS="2")
    _run(pip + [torch_pin], env=env, timeout=600)
    constraints = tmp_path / "constraints.txt"
    constraints.write_text(torch_pin + "\n")
    build = _run(pip + ["-v", "-c", constraints, src], env=env, timeout=600)
    out = build.stdout + build.stderr
    assert "torch is not importable in this build environment" in out, out[-4000:]
    assert "py3-none-any.whl" in out, "an isolated build must make a pure-Python wheel"
    installed_torch = _run([py, "-c", "import torch; print(torch.__version__)"], env=env)
    assert installed_torch.stdout.strip() == torch.__version__, "pip replaced torch"

    probe = ("import json, torch, sam_kernels\n"
             "from sam_kernels import ops, _extension\n"
             "status = ops.backend_status()\n"
             "x = torch.arange(5.0)\n"
             "print(json.dumps({'status': status, 'file': sam_kernels.__file__,\n"
             "  'sum_sq': ops.sum_sq([x], backend='cpu').item(), 'info': _extension.info()}))\n")
    run_env = _clean_env(TORCH_EXTENSIONS_DIR=str(cache), MAX_JOBS="2")
    first = _run([py, "-c", probe], env=run_env, cwd=tmp_path, timeout=900)
    result = json.loads(first.stdout.strip().splitlines()[-1])
    assert str(venv) in result["file"], "imported the checkout, not the installed package"
    assert PROGRESS in first.stderr and "(once, ~1-2 min)" in first.stderr, first.stderr
    assert str(cache) in first.stderr, "the progress line must name the cache directory"
    assert result["status"]["cpu"].startswith("available (JIT"), result["status"]
    assert result["info"]["path"].startswith(str(cache))
    assert result["sum_sq"] == 30.0

    second = _run([py, "-c", probe], env=run_env, cwd=tmp_path, timeout=300)
    assert "compiling" not in second.stderr, second.stderr
    assert json.loads(second.stdout.strip().splitlines()[-1])["status"]["cpu"].startswith(
        "available (JIT")
    shutil.rmtree(venv)  # ~1 GB; pytest keeps its last three temporary directories


_SAM_STEP = """
import torch, sam_kernels
from sam_kernels import ops
p = torch.nn.Parameter(torch.randn(4))
p.grad = torch.randn(4)
opt = sam_kernels.SAM([p], torch.optim.SGD, lr=0.1)   # backend='auto'
opt.first_step(zero_grad=True)
print("status:", ops.backend_status()["cpu"])
try:
    sam_kernels.SAM([p], torch.optim.SGD, lr=0.1, backend="cpu")
except ops.BackendUnavailableError as exc:
    print("explicit cpu:", exc)
"""


@pytest.mark.parametrize("no_compiler", ["CXX=/bin/false", "PATH without c++"])
def test_no_compiler_gets_a_message_naming_what_to_run(tmp_path, no_compiler):
    """No working compiler and no ahead-of-time build (SAM_KERNELS_JIT=1 ignores this
    checkout's): a message at first use naming the fix, a warning when backend='auto' falls back,
    and an error naming the fix for backend='cpu'."""
    env = _clean_env(SAM_KERNELS_JIT="1", TORCH_EXTENSIONS_DIR=str(tmp_path),
                     PYTHONPATH=str(REPO))
    if no_compiler.startswith("CXX"):
        env["CXX"] = "/bin/false"
        problem = "the C++ compiler /bin/false does not work"
    else:
        env["PATH"] = str(tmp_path / "empty-bin")  # nothing on PATH (python called by path)
        problem = "no C++ compiler was found: `c++` is not on PATH"
    res = _run([sys.executable, "-W", "always::RuntimeWarning", "-c", _SAM_STEP], env=env,
               cwd=tmp_path, timeout=300)
    err, out = res.stderr, res.stdout
    assert problem in err, err
    assert "sudo apt-get install g++" in err and "pip install --no-build-isolation ." in err, err
    # backend='auto' does not fall back silently
    assert "RuntimeWarning" in err and "using the slower reference" in err, err
    assert problem in out.split("status:", 1)[1], out
    assert "explicit cpu:" in out and problem in out.split("explicit cpu:", 1)[1], out
    assert not any(tmp_path.glob("sam_kernels/*/built")), "nothing may be marked as built"


def test_opt_out_warns_under_auto(tmp_path):
    env = _clean_env(SAM_KERNELS_DISABLE_EXTENSION="1", PYTHONPATH=str(REPO))
    res = _run([sys.executable, "-W", "always::RuntimeWarning", "-c", _SAM_STEP], env=env,
               cwd=tmp_path, timeout=300)
    assert "SAM_KERNELS_DISABLE_EXTENSION=1 is set" in res.stderr, res.stderr
    assert "using the slower reference" in res.stderr, res.stderr


def test_cache_key_changes_with_torch_version_and_sources(tmp_path, monkeypatch):
    csrc = tmp_path / "csrc"
    shutil.copytree(REPO / "csrc", csrc)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "cache"))
    flags = _extension._flags(str(csrc), False)
    base = _extension._build_dir(str(csrc), False, *flags)
    assert base.startswith(str(tmp_path / "cache" / "sam_kernels"))
    assert base == _extension._build_dir(str(csrc), False, *flags)  # stable
    monkeypatch.setattr(torch, "__version__", "9.9.9+cpu")
    assert _extension._build_dir(str(csrc), False, *flags) != base
    monkeypatch.undo()
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "cache"))
    header = csrc / "include" / "sam_kernels" / "element_math.h"
    header.write_text(header.read_text() + "\n// changed\n")
    assert _extension._build_dir(str(csrc), False, *flags) != base


def test_stale_ahead_of_time_build_is_not_loaded(tmp_path, monkeypatch):
    """An AOT library compiled for another torch (recorded in _C.build.json) is skipped, with
    the reason, rather than loaded (which can crash or fail with undefined symbols)."""
    lib = tmp_path / "_C.cpython-3x.so"
    lib.write_bytes(b"not a library")
    (tmp_path / "_C.build.json").write_text(json.dumps({"torch": "0.0.1", "cuda": False}))
    monkeypatch.setattr(_extension.importlib.util, "find_spec",
                        lambda name: types.SimpleNamespace(origin=str(lib)))
    ok, why, _ = _extension._load_aot()
    assert not ok and "compiled for torch 0.0.1" in why and torch.__version__ in why
