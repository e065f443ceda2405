"""How the CPU kernels live in a process: Numba's threads and Numba's on-disk cache.

- :func:`use_forksafe_threads` picks Numba's ``forksafe`` threading layer before Numba starts
  its threads: TBB where the ``tbb`` package is installed (it is a dependency on Linux x86-64),
  else Numba's ``workqueue``. Numba's default on Linux is GNU OpenMP when TBB cannot be loaded,
  and a child forked after OpenMP ran (a DataLoader worker, a ``multiprocessing`` fork pool) is
  killed by Numba as soon as it starts a parallel loop. A user's own choice of layer
  (``NUMBA_THREADING_LAYER`` or ``numba.config.THREADING_LAYER``) is kept, and so are threads
  Numba has already started.
- :func:`install_caches` gives every kernel a :class:`KernelCache`: an entry that cannot be read
  (a truncated or overwritten file, another format) is compiled again and written anew instead
  of failing every call, and a cache that cannot be written (a read-only installation, a
  prebuilt read-only ``NUMBA_CACHE_DIR``) is still read.
  Entries are read and written under a lock on their index file shared by every process
  (:func:`entry_lock`): Numba's own cache numbers a new entry's data file from the index it
  read, so two processes compiling different kernels of one factory at once (ranks, DataLoader
  workers, test workers starting on an empty cache) could each write data file 1 and leave the
  index pointing one kernel at the other's code, which then runs silently on the next load.
- :func:`private_cache_dir` is where kernels are cached when no location is writable: a
  temporary directory, removed when the process that made it exits.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import hashlib
import os
import shutil
import sys
import tempfile
import threading
import warnings
from importlib import metadata
from types import ModuleType
from typing import Any

import numba
from numba.core.caching import (
    FunctionCache,
    IndexDataCacheFile,
    UserWideCacheLocator,
    _CacheLocator,
)
from numba.core.dispatcher import Dispatcher
from numba.core.errors import NumbaIRAssumptionWarning

# ---- threads ------------------------------------------------------------------------------


def _preload_tbb() -> None:
    """Loads the ``tbb`` package's library by its path, so that Numba (which asks the dynamic
    loader for ``libtbb.so.12`` by name) finds it in a virtual environment too."""
    try:
        files = metadata.files("tbb") or []
    except metadata.PackageNotFoundError:
        return
    for f in files:
        if f.name in ("libtbb.so.12", "libtbb.12.dylib", "tbb12.dll"):
            with contextlib.suppress(OSError):
                import ctypes

                ctypes.CDLL(str(f.locate()), mode=ctypes.RTLD_GLOBAL)
            return


def use_forksafe_threads() -> None:
    """Starts Numba's threads with a layer that survives ``fork()``, unless the user chose a
    layer or Numba's threads already run."""
    from numba.np.ufunc import parallel

    if parallel._is_initialized:
        return
    _preload_tbb()
    chosen = "NUMBA_THREADING_LAYER" in os.environ
    if not chosen and numba.config.THREADING_LAYER == "default":  # type: ignore[attr-defined]
        numba.config.THREADING_LAYER = "forksafe"  # type: ignore[attr-defined]
        # started now: Numba reloads its configuration when a NUMBA_* variable changes
        parallel._launch_threads()


# ---- cache --------------------------------------------------------------------------------

_private_dir: str | None = None


def private_cache_dir() -> str:
    """A temporary directory for kernels that cannot be cached anywhere else, removed at exit by
    the process that made it (not by a forked child)."""
    global _private_dir
    if _private_dir is None or not os.path.isdir(_private_dir):
        _private_dir = tempfile.mkdtemp(prefix="crossent-numba-")
        owner = os.getpid()

        def remove(path: str = _private_dir) -> None:
            if os.getpid() == owner:
                shutil.rmtree(path, ignore_errors=True)

        atexit.register(remove)
    return _private_dir


def _cache_dirs(py_func: Any) -> list[str]:
    """The directories Numba would cache ``py_func`` in, in Numba's order, whether or not they
    can be written: ``NUMBA_CACHE_DIR`` alone when it is set (it overrides the others, as in
    Numba: an empty one means a cold start), else ``__pycache__`` beside the source and the
    user's cache."""
    source = os.path.abspath(py_func.__code__.co_filename)
    sub = _CacheLocator.get_suitable_cache_subpath(source)
    if numba.config.CACHE_DIR:  # type: ignore[attr-defined]
        return [os.path.join(numba.config.CACHE_DIR, sub)]  # type: ignore[attr-defined]
    dirs = [os.path.join(os.path.dirname(source), "__pycache__")]
    with contextlib.suppress(Exception):
        dirs.append(UserWideCacheLocator(py_func, source).get_cache_path())
    return dirs


def _describe_cells(func: Any) -> str:
    """A text that names what ``func``'s closure holds, the same in every process."""
    parts = []
    for cell in func.__closure__ or ():
        value = cell.cell_contents
        if isinstance(value, Dispatcher):
            inner = value.py_func
            code = hashlib.sha256(inner.__code__.co_code).hexdigest()
            parts.append(f"jit({inner.__qualname__},{code},[{_describe_cells(inner)}])")
        elif isinstance(value, (bool, int, float, str, type(None))):
            parts.append(repr(value))
        else:
            raise TypeError(f"cannot key a kernel's cache by a {type(value).__name__} it uses")
    return ",".join(parts)


@contextlib.contextmanager
def entry_lock(source: IndexDataCacheFile, exclusive: bool) -> Any:
    """An advisory lock (``flock``) on the cache entries of one index, held by readers
    (shared) and writers (exclusive) across processes and threads. Where the lock file cannot
    be opened (a read-only prebuilt cache, which nobody writes) or there is no ``flock``, no
    lock is taken."""
    path = source._index_path + ".lock"
    with _thread_locks_guard:
        thread_lock = _thread_locks.setdefault(path, threading.RLock())
    with thread_lock:  # flock is per open file: threads of one process take this one first
        try:
            import fcntl

            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except (ImportError, OSError):
            yield
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)  # releases the lock


_thread_locks: dict[str, threading.RLock] = {}
_thread_locks_guard = threading.Lock()


class KernelCache(FunctionCache):
    """Numba's per-function cache, made robust.

    Entries are looked up in every directory Numba might cache the function in (writable or
    not: a read-only prebuilt cache is used as it is); new entries go where Numba would write
    them. An entry that fails to load (the index or data file truncated, overwritten, or of
    another format) is reported once as a warning, its files are removed where they can be, and
    the function is compiled again."""

    _readers: list[IndexDataCacheFile] | None = None

    def _index_key(self, sig: Any, codegen: Any) -> Any:
        # Numba keys a closure's entries by its pickled cell contents, and a kernel in a cell
        # (a specialised kernel calling its row function) pickles with an identifier drawn
        # anew in every process: no entry would ever be found again. The cells are described
        # instead by what determines the code: values, and for a kernel its function's
        # bytecode and its own cells.
        if self._py_func.__closure__ is None:
            return super()._index_key(sig, codegen)
        digest = hashlib.sha256(_describe_cells(self._py_func).encode()).hexdigest()
        code = hashlib.sha256(self._py_func.__code__.co_code).hexdigest()
        return (sig, codegen.magic_tuple(), (code, digest))

    def _sources(self) -> list[IndexDataCacheFile]:
        if self._readers is None:
            own = os.path.realpath(self._cache_path)
            readers = []
            for d in _cache_dirs(self._py_func):
                if os.path.realpath(d) == own:
                    readers.append(self._cache_file)
                elif os.path.isfile(os.path.join(d, self._impl.filename_base + ".nbi")):
                    stamp = self._impl.locator.get_source_stamp()
                    readers.append(IndexDataCacheFile(d, self._impl.filename_base, stamp))
            if self._cache_file not in readers:
                readers.append(self._cache_file)
            self._readers = readers
        return self._readers

    def load_overload(self, sig: Any, target_context: Any) -> Any:
        if not self._enabled:
            return None
        target_context.refresh()
        key = self._index_key(sig, target_context.codegen())
        for source in self._sources():
            try:
                with entry_lock(source, exclusive=False):
                    data = source.load(key)
                if data is not None:
                    return self._impl.rebuild(target_context, data)
            except Exception as exc:  # anything a damaged file makes pickle or LLVM raise
                self._discard(source, exc)
        return None

    def save_overload(self, sig: Any, data: Any) -> None:
        try:
            self._impl.locator.ensure_cache_path()
            with entry_lock(self._cache_file, exclusive=True):
                super().save_overload(sig, data)
        except Exception as exc:  # the kernel is compiled all the same; it is not kept
            self._discard(self._cache_file, exc)

    def _discard(self, source: IndexDataCacheFile, exc: Exception) -> None:
        index = source._index_path
        warnings.warn(
            f"crossent: the Numba cache entry {index} could not be used "
            f"({type(exc).__name__}: {exc}); compiling the kernel again",
            RuntimeWarning,
            stacklevel=2,
        )
        if source is self._cache_file:
            with contextlib.suppress(OSError), entry_lock(source, exclusive=True):
                os.remove(index)  # its data files are numbered anew by the next save
        elif self._readers is not None:
            self._readers.remove(source)


# A compile that runs longer than this (a kernel not in the cache: seconds to tens of seconds)
# is announced on stderr, once per process.
NOTICE_AFTER_S = 2.0
_notice = {"shown": False, "depth": 0}
_notice_lock = threading.Lock()


def _announce() -> None:
    with _notice_lock:
        if _notice["shown"] or _notice["depth"] == 0:
            return
        _notice["shown"] = True
    where = numba.config.CACHE_DIR or "Numba's cache"  # type: ignore[attr-defined]
    print(
        "crossent: compiling CPU kernels for this call's dtypes (once, up to a minute; then "
        f"cached in {where}). `crossent warmup` compiles them all ahead of time.",
        file=sys.stderr,
        flush=True,
    )


def _quiet(compile: Any) -> Any:
    """``compile`` without Numba's ``NumbaIRAssumptionWarning`` (an internal consistency
    check of Numba's own that some kernels trip on their first compile, asking the user to
    report it to Numba; the compiled code is the same with or without it), announced on
    stderr when it takes longer than :data:`NOTICE_AFTER_S` (:func:`_announce`)."""

    @functools.wraps(compile)
    def quiet_compile(sig: Any) -> Any:
        outer = _notice["depth"] == 0
        _notice["depth"] += 1
        timer = None
        if outer and not _notice["shown"]:
            timer = threading.Timer(NOTICE_AFTER_S, _announce)
            timer.daemon = True
            timer.start()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NumbaIRAssumptionWarning)
                return compile(sig)
        finally:
            _notice["depth"] -= 1
            if timer is not None:
                timer.cancel()

    return quiet_compile


def _adopt(dispatcher: Dispatcher) -> None:
    """:func:`install_caches` for one kernel, and for the kernels it closes over."""
    cache = getattr(dispatcher, "_cache", None)
    if type(cache) is FunctionCache:
        cache.__class__ = KernelCache
    if not getattr(dispatcher.compile, "_crossent", False):
        dispatcher.compile = _quiet(dispatcher.compile)  # type: ignore[method-assign]
        dispatcher.compile._crossent = True  # type: ignore[attr-defined]
    for cell in dispatcher.py_func.__closure__ or ():
        if isinstance(cell.cell_contents, Dispatcher):
            _adopt(cell.cell_contents)


_specialised: dict[tuple[Any, ...], Any] = {}


def specialised(factory: Any, *flags: Any) -> Any:
    """``factory(*flags)``: a kernel compiled for one set of options (see e.g.
    ``_kernels.ce_index_kernel``), made once per process and given the caches of
    :func:`install_caches`. Where no cache location is writable it is declared with the
    private directory, as the module-level kernels are (see :func:`private_cache_dir`)."""
    key = (factory, *flags)
    kernel = _specialised.get(key)
    if kernel is None:
        kernel = declare(functools.partial(factory, *flags))
        _adopt(kernel)
        _specialised[key] = kernel
    return kernel


def declare(make: Any) -> Any:
    """``make()``, which declares cached kernels (importing a module of them, or a factory);
    where Numba finds no writable cache location (a read-only install, an unwritable home)
    it raises, and ``make()`` runs again with the private directory to write to (Numba's
    setting restored afterwards). The kernels still read any read-only cache
    (:class:`KernelCache`)."""
    try:
        return make()
    except RuntimeError as exc:
        if "cannot cache" not in str(exc):
            raise
    user_dir = numba.config.CACHE_DIR  # type: ignore[attr-defined]
    numba.config.CACHE_DIR = private_cache_dir()  # type: ignore[attr-defined]
    try:
        return make()
    finally:
        numba.config.CACHE_DIR = user_dir  # type: ignore[attr-defined]


def install_caches(*modules: ModuleType) -> None:
    """Turns the cache of every cached kernel defined in ``modules`` into a
    :class:`KernelCache`, and compiles them without Numba's pedantic IR warning (:func:`_quiet`;
    only at compile time, so calls cost nothing more)."""
    for module in modules:
        for value in vars(module).values():
            if isinstance(value, Dispatcher):
                _adopt(value)
