"""Every ```python block of README.md and docs/*.md runs, and every relative link resolves.

Each block is a self-contained program: it is written to a file and run by a fresh Python
interpreter (so a block can use `torch.multiprocessing.spawn`, whose children import the
block's file), on CPU, with the repository that holds this file first on `sys.path`, in an
empty working directory, under a time budget. A block that cannot run here is marked in the
markdown by an HTML comment on the line right above its fence:

    <!-- doc-test: skip (needs a CUDA GPU) -->

and is reported as skipped with that reason. `<!-- doc-test: timeout=300 -->` raises the budget
of one block (seconds)."""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
DEFAULT_TIMEOUT_S = 240  # per block; a 2-core machine under load imports lightning in ~30 s

FENCE = re.compile(r"^(\s*)```(\w*)\s*$")
DIRECTIVE = re.compile(r"^\s*<!--\s*doc-test:\s*(.*?)\s*-->\s*$")


def python_blocks(path):
    """[(first line number, code, directive or None)] of the ```python fences of `path`."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m or not m.group(2):
            i += 1
            continue
        lang, start = m.group(2), i
        j = i + 1
        while j < len(lines) and not FENCE.match(lines[j]):
            j += 1
        if lang == "python":
            k = start - 1
            while k >= 0 and not lines[k].strip():
                k -= 1
            d = DIRECTIVE.match(lines[k]) if k >= 0 else None
            blocks.append((start + 1, "\n".join(lines[start + 1:j]) + "\n",
                           d.group(1) if d else None))
        i = j + 1
    return blocks


BLOCKS = [(p, line, code, directive) for p in PAGES for line, code, directive in python_blocks(p)]


# A zygote process imports torch and sam_kernels once and forks a child per block: the child is
# a fresh program (its own __main__ module, file, working directory and process), without paying
# the imports again (tens of seconds per block on a loaded 2-core machine). The zygote runs no
# torch computation itself, so forking it is safe. A block's `torch.multiprocessing.spawn`
# children import the block's file as usual, since the child's __main__ has that __file__.
ZYGOTE = r"""
import json, os, signal, sys, time, traceback
import torch, sam_kernels  # noqa: F401  (imported once, inherited by every fork)
for line in sys.stdin:
    job = json.loads(line)
    t0 = time.time()
    pid = os.fork()
    if pid == 0:
        os.setpgid(0, 0)
        fd = os.open(job["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.chdir(job["cwd"])
        import types
        main = types.ModuleType("__main__")
        main.__file__, main.__spec__ = job["path"], None
        sys.modules["__main__"] = main
        sys.argv = [job["path"]]
        rc = 0
        try:
            with open(job["path"]) as f:
                exec(compile(f.read(), job["path"], "exec"), main.__dict__)
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            traceback.print_exc()
            rc = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    rc = None
    while time.time() - t0 < job["timeout"]:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            rc = os.waitstatus_to_exitcode(status)
            break
        time.sleep(0.05)
    if rc is None:
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(pid, 0)
    print(json.dumps({"rc": rc, "seconds": time.time() - t0}), flush=True)
"""


class Runner:
    """Runs blocks as programs in forks of a zygote (or, without os.fork, each in a fresh
    interpreter)."""

    def __init__(self):
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(ROOT)] + [x for x in env.get("PYTHONPATH", "").split(os.pathsep) if x])
        env.setdefault("OMP_NUM_THREADS", "1")
        env["CUDA_VISIBLE_DEVICES"] = ""  # the documented CPU path, also on a GPU machine
        env.pop("TRITON_INTERPRET", None)  # a block that wants the interpreter sets it itself
        self.env, self.zygote = env, None
        if hasattr(os, "fork"):
            self.zygote = subprocess.Popen([sys.executable, "-c", ZYGOTE], env=env, cwd=ROOT,
                                           stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                           text=True)

    def run(self, code, tmp_path, timeout_s):
        """Run `code` as a program; returns (returncode or None on timeout, output, seconds)."""
        script, out = tmp_path / "doc_snippet.py", tmp_path / "doc_snippet.out"
        script.write_text(code, encoding="utf-8")
        if self.zygote is not None:
            job = dict(path=str(script), cwd=str(tmp_path), out=str(out), timeout=timeout_s)
            self.zygote.stdin.write(json.dumps(job) + "\n")
            self.zygote.stdin.flush()
            reply = self.zygote.stdout.readline()
            assert reply, "the doc-test zygote died"
            result = json.loads(reply)
            return result["rc"], out.read_text(errors="replace"), result["seconds"]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=self.env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  timeout=timeout_s)
        except subprocess.TimeoutExpired as e:
            text = e.stdout if isinstance(e.stdout, str) else (e.stdout or b"").decode()
            return None, text, time.perf_counter() - t0
        return proc.returncode, proc.stdout, time.perf_counter() - t0

    def close(self):
        if self.zygote is not None:
            self.zygote.stdin.close()
            self.zygote.wait(timeout=60)


@pytest.fixture(scope="module")
def runner():
    r = Runner()
    yield r
    r.close()


@pytest.mark.parametrize("page,line,code,directive", BLOCKS,
                         ids=[f"{p.relative_to(ROOT)}:{line}" for p, line, _, _ in BLOCKS])
def test_snippet_runs(page, line, code, directive, tmp_path, runner):
    timeout_s = DEFAULT_TIMEOUT_S
    if directive:
        skip = re.match(r"skip\s*\((.*)\)$", directive)
        if skip:
            pytest.skip(f"{page.relative_to(ROOT)}:{line}: {skip.group(1)}")
        t = re.match(r"timeout\s*=\s*(\d+)$", directive)
        assert t, f"unknown doc-test directive {directive!r} above {page.name}:{line}"
        timeout_s = int(t.group(1))
    rc, out, seconds = runner.run(code, tmp_path, timeout_s)
    where = f"{page.relative_to(ROOT)}:{line}"
    assert rc is not None, f"{where}: did not finish in {timeout_s} s\n{out[-4000:]}"
    assert rc == 0, f"{where}: exited with {rc} after {seconds:.1f} s\n{out[-4000:]}"


def test_a_broken_snippet_fails(tmp_path, runner):
    """The runner reports a failing block (and does not, e.g., swallow the exit status)."""
    rc, out, _ = runner.run("raise RuntimeError('broken on purpose')\n", tmp_path, 60)
    assert rc != 0 and "broken on purpose" in out


def test_blocks_are_found():
    assert len(BLOCKS) >= 20
    assert any(p.name == "README.md" for p, *_ in BLOCKS)


def _slug(heading):
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to '-'."""
    s = re.sub(r"[`*_]", "", heading.strip().lower()).replace("_", "")
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


def _anchors(path):
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    return {_slug(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", text, flags=re.M)}


LINK = re.compile(r"\]\(([^)\s]+)\)")


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_links_resolve(page):
    """Relative links (and their #anchors) point at files and headings of this repository."""
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    bad = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z]+:", target):
            continue  # http(s), mailto
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        if not dest.exists():
            bad.append(target)
            continue
        if anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            bad.append(target)
    assert not bad, f"{page.relative_to(ROOT)}: links that do not resolve: {bad}"


def test_directives_are_parsed(tmp_path):
    """A skip comment right above a fence (blank lines between allowed) applies to that block
    only; other fences (bash, plain) are not collected."""
    page = tmp_path / "page.md"
    page.write_text("text\n<!-- doc-test: skip (needs a CUDA GPU) -->\n\n```python\nx = 1\n```\n"
                    "```bash\nls\n```\n```python\ny = 2\n```\n", encoding="utf-8")
    (l1, c1, d1), (l2, c2, d2) = python_blocks(page)
    assert (l1, c1, d1) == (4, "x = 1\n", "skip (needs a CUDA GPU)")
    assert (c2, d2) == ("y = 2\n", None)
