"""The CPU backend across processes: the same bits however a kernel was compiled, kernels that
run in forked children, and Numba caches that are damaged or read-only.

Every check runs Python in a child process, with a private ``NUMBA_CACHE_DIR`` and a timeout,
so that a kill or a hang fails one test instead of taking pytest down. The kernels are compiled
from cold once for the module (``cold``: two children at once, the softmax kernels and the
cross-entropy ones, each with its own cache) and the caches are shared by the other tests.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import crossent.backends.cpu

CPU_DIR = Path(crossent.backends.cpu.__file__).parent

# The child's code: `outputs()` runs the kernels whose sums reassociation used to reorder at
# V = 1024 (whole blocks), 1031 (a short tail) and 3000, in float32, float64 and bfloat16:
# PART=softmax the softmax and log_softmax forward, both streamed and cached, and their
# backward; PART=ce cross entropy with class indices, label smoothing and weights, and with
# probability targets, with gradients.
CHILD = textwrap.dedent(
    r"""
    import json, os, sys, time
    import numpy as np
    import torch
    import crossent
    from crossent.backends.cpu import _kernels, _runtime, as_numpy

    PART = os.environ["PART"]

    def kernels():
        # the kernels are made per set of options on first use (the specialised ones), so
        # they are looked up when the counts are read
        return tuple(_runtime._specialised.values())

    def outputs():
        res = {}
        for dtype in (torch.float32, torch.float64, torch.bfloat16):
            proto = np.empty(0, dtype=np.float64 if dtype == torch.float64 else np.float32)
            for v in (1024, 1031, 3000):
                gen = torch.Generator().manual_seed(v)
                x = (torch.randn(13, v, generator=gen) * 3).to(dtype)
                x[3, v // 2] = float("-inf")
                g = torch.randn(13, v, generator=gen).to(dtype)
                for log in (False, True) if PART == "softmax" else ():
                    for nt in (True, False):
                        y = torch.empty_like(x)
                        fwd = _runtime.specialised(_kernels.softmax_fwd_kernel, log)
                        fwd(as_numpy(x), as_numpy(y), proto, nt)
                        gx = torch.empty_like(x)
                        bwd = _runtime.specialised(_kernels.softmax_bwd_kernel, log)
                        bwd(as_numpy(g), as_numpy(y), as_numpy(gx), proto, nt)
                        res[f"{dtype} {v} log={log} nt={nt}"] = (y, gx)
                t = torch.randint(0, v, (13,), generator=gen)
                t[5] = -100
                w = torch.rand(v, generator=gen).to(dtype) + 0.5
                p = torch.softmax(torch.randn(13, v, generator=gen), -1).to(dtype)
                for name, target, kw in (
                    ("index", t, {}),
                    ("smoothing", t, {"label_smoothing": 0.1, "weight": w}),
                    ("probs", p, {}),
                ) if PART == "ce" else ():
                    xg = x.clone().requires_grad_()
                    loss = crossent.cross_entropy(
                        xg, target, reduction="none", backend="cpu", **kw
                    )
                    loss.sum().backward()
                    res[f"{dtype} {v} ce {name}"] = (loss.detach(), xg.grad)
        return res

    def stats():
        return json.dumps({
            "hits": sum(sum(f.stats.cache_hits.values()) for f in kernels()),
            "misses": sum(sum(f.stats.cache_misses.values()) for f in kernels()),
        })

    def same(a, b):
        return all(
            torch.equal(p.contiguous().view(-1).view(torch.uint8),
                        q.contiguous().view(-1).view(torch.uint8))
            for k in a for p, q in zip(a[k], b[k])
        )
    """
)


class Child:
    """A child Python running ``CHILD`` + ``code`` with its own ``NUMBA_CACHE_DIR``, started at
    once; :meth:`wait` gives its standard output, asserting a clean exit."""

    def __init__(self, code: str, cache: Path, part: str = "ce", env: dict | None = None,
                 prefix: list[str] | None = None) -> None:
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_")}
        full_env.update(NUMBA_CACHE_DIR=str(cache), PART=part, **(env or {}))
        self.proc = subprocess.Popen(
            [*(prefix or []), sys.executable, "-c", CHILD + textwrap.dedent(code)],
            env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self.stderr = ""

    def wait(self, timeout: float = 300) -> str:
        try:
            out, self.stderr = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, self.stderr = self.proc.communicate()
        code = self.proc.returncode
        assert code == 0, f"exit {code}\n{out}\n{self.stderr[-4000:]}"
        return out


def _last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


PARTS = ("softmax", "ce")

# Writes the kernels' outputs (at 2 threads, after checking that 1 thread gives the same) and
# the kernels' cache statistics; the reference of every later child.
COMPUTE = """
    torch.set_num_threads(1)
    one = outputs()
    torch.set_num_threads(2)
    res = outputs()
    assert same(one, res), "1 and 2 threads differ"
    torch.save(res, os.environ["OUT"])
    print(stats())
"""


@pytest.fixture(scope="module")
def cold(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """Per part, a cache compiled from cold by a child, and that child's outputs."""
    root = tmp_path_factory.mktemp("numba")
    made = {p: (root / f"cache-{p}", root / f"cold-{p}.pt") for p in PARTS}
    children = [Child(COMPUTE, c, p, env={"OUT": str(o)}) for p, (c, o) in made.items()]
    for child in children:
        counts = _last_json(child.wait())
        assert counts["hits"] == 0 and counts["misses"] > 0
    return made


SAME_AS = """
    torch.set_num_threads(2)
    res = outputs()
    ref = torch.load(os.environ["REF"])
    assert same(res, ref), [k for k in ref if not same({k: res[k]}, {k: ref[k]})]
    print(stats())
"""


Cold = dict[str, tuple[Path, Path]]


def _check_all(caches: dict[str, Path], cold: Cold) -> list[tuple[dict, str]]:
    """Both parts from ``caches`` at once, each compared bit for bit with its cold outputs:
    the cache statistics and the standard error of each."""
    children = [Child(SAME_AS, caches[p], p, env={"REF": str(cold[p][1])}) for p in PARTS]
    return [(_last_json(child.wait()), child.stderr) for child in children]


# A kernel loaded from the cache computes what the same kernel compiled from cold computed (it
# did not when reassociated sums ran whichever copy of a helper the process loaded first).
def test_cached_kernels_match_freshly_compiled_ones(cold: Cold) -> None:
    for counts, _ in _check_all({p: c for p, (c, _) in cold.items()}, cold):
        assert counts["misses"] == 0 and counts["hits"] > 0


# ---- fork -------------------------------------------------------------------------------------

FORK_SETUP = """
    torch.set_num_threads(2)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 3000, generator=gen)
    t = torch.randint(0, 3000, (512,), generator=gen)

    def ce(_=None):
        return crossent.cross_entropy(x, t, reduction="none", backend="cpu")

    ref = ce()  # the parent runs the kernels on several threads first
"""


# The parent has run the kernels on two threads; a child it forks runs them again.
def test_forked_child_runs_the_kernels(cold: Cold) -> None:
    code = FORK_SETUP + """
    pid = os.fork()
    if pid == 0:
        os._exit(0 if torch.equal(ce(), ref) else 3)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            sys.exit(os.waitstatus_to_exitcode(status))
        time.sleep(0.05)
    os.kill(pid, 9)
    sys.exit("the forked child hung")
    """
    Child(code, cold["ce"][0]).wait()


def test_fork_pool_map_returns(cold: Cold) -> None:
    code = FORK_SETUP + """
    import multiprocessing
    with multiprocessing.get_context("fork").Pool(2) as pool:
        outs = pool.map_async(ce, range(4)).get(timeout=120)
    assert all(torch.equal(o, ref) for o in outs)
    """
    Child(code, cold["ce"][0]).wait()


def test_dataloader_fork_workers_run_the_kernels(cold: Cold) -> None:
    code = FORK_SETUP + """
    from torch.utils.data import DataLoader, Dataset

    class Rows(Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            rows = slice(64 * i, 64 * (i + 1))
            return crossent.cross_entropy(x[rows], t[rows], reduction="none", backend="cpu")

    loader = DataLoader(Rows(), batch_size=None, num_workers=2,
                        multiprocessing_context="fork", timeout=120)
    assert torch.equal(torch.cat(list(loader)), ref)
    """
    Child(code, cold["ce"][0]).wait()


# ---- damaged and read-only caches --------------------------------------------------------------


def _copies(cold: Cold, root: Path) -> dict[str, Path]:
    caches = {p: root / f"cache-{p}" for p in PARTS}
    for p, c in caches.items():
        shutil.copytree(cold[p][0], c)
    return caches


def _entry_files(cache: Path, name: str) -> tuple[Path, list[Path]]:
    index = next(cache.rglob(f"_kernels.{name}-*.nbi"))
    return index, sorted(index.parent.glob(index.name[: -len("nbi")] + "*.nbc"))


# A truncated index (softmax's forward) and data files overwritten with garbage (the class-index
# kernels): the kernels are compiled again, with a warning, give the same bits, and the next
# process loads the rewritten entries without one.
def test_damaged_cache_entries_are_compiled_again(cold: Cold, tmp_path: Path) -> None:
    caches = _copies(cold, tmp_path)
    index, _ = _entry_files(caches["softmax"], "softmax_fwd_kernel.locals.kernel")
    index.write_bytes(index.read_bytes()[:20])
    _, data = _entry_files(caches["ce"], "ce_index_kernel.locals.kernel")
    for f in data:
        f.write_bytes(b"not a cache entry" * 100)
    for counts, stderr in _check_all(caches, cold):
        assert counts["misses"] > 0
        assert "could not be used" in stderr
    for counts, stderr in _check_all(caches, cold):
        assert counts["misses"] == 0
        assert "could not be used" not in stderr


def _read_only_prefix(paths: list[Path]) -> list[str] | None:
    """``unshare`` into a mount namespace where ``paths`` are bind-mounted read-only: unwritable
    even for root, which these tests may run as. None where that is not allowed."""
    if not shutil.which("unshare"):
        return None
    mounts = " && ".join(f"mount --bind -o ro '{p}' '{p}'" for p in paths)
    probe = f"{mounts} && ! touch '{paths[0]}/probe' 2>/dev/null"
    if subprocess.run(["unshare", "-m", "sh", "-c", probe], capture_output=True).returncode:
        return None
    return ["unshare", "-m", "sh", "-c", f'{mounts} && exec "$0" "$@"']


# A prebuilt cache that no process can write, with no writable location anywhere (the sources'
# __pycache__ and the user's cache directory are read-only too): its kernels are loaded as they
# are, without compiling; a kernel it lacks (float16) is compiled into a private temporary
# directory, which is gone once the process exits.
def test_read_only_prebuilt_cache_is_used(cold: Cold, tmp_path: Path) -> None:
    cache = _copies(cold, tmp_path)["softmax"]
    home, tmp = tmp_path / "home", tmp_path / "tmp"
    home.mkdir()
    tmp.mkdir()
    prefix = _read_only_prefix([cache, home, CPU_DIR])
    if prefix is None:
        pytest.skip("no mount namespace in which to make a directory read-only for root")
    code = SAME_AS + """
    import tempfile
    assert tempfile.gettempdir() == os.environ["TMPDIR"]
    crossent.softmax(torch.randn(4, 100).half(), -1, backend="cpu")  # not in the cache
    print(json.dumps(os.listdir(os.environ["TMPDIR"])))
    """
    env = {"REF": str(cold["softmax"][1]), "HOME": str(home), "XDG_CACHE_HOME": str(home),
           "TMPDIR": str(tmp)}
    out = Child(code, cache, "softmax", env=env, prefix=prefix).wait().strip().splitlines()
    counts, in_tmp = json.loads(out[-2]), json.loads(out[-1])
    assert counts["misses"] == 0 and counts["hits"] > 0
    assert in_tmp, "no temporary directory for the float16 kernel"
    assert not os.listdir(tmp), "the temporary directory outlived the process"


# ---- processes compiling at once ---------------------------------------------------------------

# Numba numbers a new cache entry's data file from the index it has just read. Two processes
# saving different kernels of one factory (here the class-index kernel without and with label
# smoothing) at once would both take data file 1; the patches below make every such save read
# the index before either process writes it, and make the first to write its index the last to
# write its data, so that without crossent's lock on the entries the index would point the
# second process's kernel at the first's code, which a later process would load and run.
RACE = """
    from numba.core.caching import IndexDataCacheFile as F
    orig_save, orig_index, orig_save_index, orig_data = (
        F.save, F._load_index, F._save_index, F._save_data)
    state = {"saving": False, "first": False}

    def save(self, key, data):
        state["saving"] = "ce_index_kernel" in self._index_path
        try:
            return orig_save(self, key, data)
        finally:
            state["saving"] = False

    def load_index(self):
        out = orig_index(self)
        if state["saving"]:
            time.sleep(4.0)  # the other process reads the index meanwhile (without a lock)
        return out

    def save_index(self, overloads):
        if state["saving"]:
            try:
                os.close(os.open(os.environ["FIRST"], os.O_CREAT | os.O_EXCL))
                state["first"] = True
            except FileExistsError:
                pass
        return orig_save_index(self, overloads)

    def save_data(self, name, data):
        if state["saving"] and state["first"]:
            time.sleep(3.0)  # the first index written: its data written last
        return orig_data(self, name, data)

    F.save, F._load_index, F._save_index, F._save_data = save, load_index, save_index, save_data
    open(os.environ["READY"], "w").close()
    while not all(os.path.exists(p) for p in os.environ["ALL"].split(",")):
        time.sleep(0.01)
    gen = torch.Generator().manual_seed(0)
    x, t = torch.randn(64, 3000, generator=gen), torch.randint(0, 3000, (64,), generator=gen)
    crossent.cross_entropy(x, t, backend="cpu", label_smoothing=float(os.environ["LS"]))
    print(stats())
"""

CHECK_BOTH = """
    import torch.nn.functional as F
    gen = torch.Generator().manual_seed(0)
    x, t = torch.randn(64, 3000, generator=gen), torch.randint(0, 3000, (64,), generator=gen)
    for ls in (0.0, 0.3):
        ours = crossent.cross_entropy(x, t, backend="cpu", label_smoothing=ls)
        theirs = F.cross_entropy(x.double(), t, label_smoothing=ls).float()
        assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-6), (ls, ours, theirs)
    print(stats())
"""


def test_processes_compiling_kernels_of_one_factory_at_once(cold: Cold, tmp_path: Path) -> None:
    cache = _copies(cold, tmp_path)["ce"]
    index, data = _entry_files(cache, "ce_index_kernel.locals.kernel")
    for f in [index, *data]:  # the class-index kernels compiled anew, the helpers loaded
        f.unlink()
    ready = [tmp_path / "ready-a", tmp_path / "ready-b"]
    env = {"FIRST": str(tmp_path / "first"), "ALL": ",".join(map(str, ready))}
    children = [Child(RACE, cache, env={**env, "READY": str(r), "LS": ls})
                for r, ls in zip(ready, ("0.0", "0.3"), strict=True)]  # fmt: skip
    for child in children:
        assert _last_json(child.wait())["misses"] > 0
    assert (tmp_path / "first").exists()  # the patched saves ran
    counts = _last_json(Child(CHECK_BOTH, cache).wait())
    assert counts["misses"] == 0 and counts["hits"] > 0  # both kernels came from the cache
