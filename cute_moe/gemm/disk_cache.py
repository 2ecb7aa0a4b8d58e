"""On-disk cache of compiled grouped-GEMM kernels, so a restarted process pays no JIT.

A compiled kernel (a TVM-FFI function from ``cute.compile``) is exported with CuTe DSL's
``compiled.export_to_c(path.o, function_name=...)`` (host code + embedded cubin in one object file).
When a C compiler is on the PATH (``$CC``, else ``cc``/``gcc``) the object is also linked into a
shared library against CuTe DSL's runtime libraries (with their directories as rpath), which a new
process loads with ``tvm_ffi.load_module`` in milliseconds without importing the DSL; otherwise the
object is loaded through the DSL's JIT linker (``cute.runtime.load_module``, about half a second
plus the DSL import). Either way the result is a ``tvm_ffi.Function`` taking the compiled function's
positional arguments (``a, b, c, seg, bias, row_scale, a_scale, b_scale, max_m``; constexprs and the
env stream are not arguments). Loading needs no GPU (the cubin is loaded on the first call).

Layout: ``$CUTE_MOE_CACHE_DIR/gemm/<digest>.o``, ``<digest>.so`` (when linked) and ``<digest>.json`` (default root
``~/.cache/cute_moe``; an empty ``CUTE_MOE_CACHE_DIR`` disables the cache). ``digest`` hashes the
KernelKey, the CuTe DSL and tvm-ffi versions, this cache's format and the kernel source
(``grouped_gemm_sm90.py``, ``config.py`` and the ``_compile`` function that builds the kernel's
signature). The JSON records those inputs and the object's sha256; an entry whose record is missing,
unreadable, for another key or version, or whose object does not match its sha256 or fails to load
is recompiled and overwritten, never used (a shared library that fails its sha256 or its load
falls back to the object). Writes go to a temporary file and are renamed into place (the object
and library first, the JSON last), so concurrent processes only ever see complete entries.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import os
import shutil
import subprocess
import threading
import warnings
from importlib import resources
from typing import Callable

import torch

from .._nvrtc import PDL

FORMAT = 2
ENABLED = True  # process-wide switch (tests, benchmarks); CUTE_MOE_CACHE_DIR="" disables it too

_source_digest: str | None = None
_versions: tuple[str, str] | None = None
_warned = False
_modules: list = []  # loaded libraries stay alive for the process (their functions are cached)


def cache_dir() -> str | None:
    """The directory holding exported GEMM kernels, or None when the disk cache is off."""
    if not ENABLED:
        return None
    root = os.environ.get("CUTE_MOE_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "cute_moe"))
    return os.path.join(root, "gemm") if root else None


def _versions_of() -> tuple[str, str]:
    """(CuTe DSL version, tvm-ffi version), from package metadata: importing the DSL just to read
    its version costs a second or more, which the whole disk cache exists to avoid."""
    global _versions
    if _versions is None:
        from importlib import metadata

        try:
            _versions = (metadata.version("nvidia-cutlass-dsl"), metadata.version("apache-tvm-ffi"))
        except metadata.PackageNotFoundError:
            import cutlass
            import tvm_ffi

            _versions = (str(getattr(cutlass, "__version__", "?")), str(getattr(tvm_ffi, "__version__", "?")))
    return _versions


def source_digest() -> str:
    """sha256 over the kernel source files and the ``_compile`` function (cached per process)."""
    global _source_digest
    if _source_digest is None:
        from . import interface

        h = hashlib.sha256()
        pkg = resources.files(__package__)
        for name in ("grouped_gemm_sm90.py", "config.py"):
            h.update(pkg.joinpath(name).read_bytes())
            h.update(b"\0")
        h.update(inspect.getsource(interface._compile).encode())
        _source_digest = h.hexdigest()
    return _source_digest


def describe(key) -> str:
    """A stable, human-readable description of every field of a KernelKey (dtypes and config spelled
    out), so a field added to the key can never alias two kernels in the cache."""
    parts = []
    for f in dataclasses.fields(key):
        v = getattr(key, f.name)
        if isinstance(v, torch.dtype):
            v = str(v).removeprefix("torch.")
        elif dataclasses.is_dataclass(v):
            v = ",".join(f"{g.name}={getattr(v, g.name)}" for g in dataclasses.fields(v))
        parts.append(f"{f.name}={v}")
    return "|".join(parts)


def _record(key) -> dict:
    dsl, ffi = _versions_of()
    return {"format": FORMAT, "key": describe(key), "cutlass_dsl": dsl, "tvm_ffi": ffi, "source": source_digest(),
            "pdl": PDL}


def entry_paths(key) -> tuple[str, str, str] | None:
    """(object path, json path, exported symbol name) of ``key``'s entry, or None if the cache is off."""
    root = cache_dir()
    if root is None:
        return None
    digest = hashlib.sha256(json.dumps(_record(key), sort_keys=True).encode()).hexdigest()[:32]
    return os.path.join(root, f"{digest}.o"), os.path.join(root, f"{digest}.json"), f"cute_moe_gemm_{digest[:16]}"


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def load(key) -> Callable | None:
    """The cached kernel for ``key`` (a ``tvm_ffi.Function`` with ``smem_bytes`` set), or None when
    there is no valid entry (missing, stale, corrupt or unloadable: never trusted blindly)."""
    paths = entry_paths(key)
    if paths is None:
        return None
    obj, meta_path, symbol = paths
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        expected = _record(key)
        if not isinstance(meta, dict) or any(meta.get(k) != v for k, v in expected.items()):
            return None
        if meta.get("symbol") != symbol:
            return None
        fn = _load_library(obj[:-2] + ".so", symbol, meta.get("library_sha256"))
        if fn is None:
            if meta.get("object_sha256") != _sha256(obj):
                return None
            import cutlass.cute as cute

            module = cute.runtime.load_module(obj, enable_tvm_ffi=True)
            _modules.append(module)
            fn = getattr(module, symbol)
        fn.smem_bytes = int(meta.get("smem_bytes", 0))
        return fn
    except FileNotFoundError:
        return None
    except Exception:  # corrupt JSON/object, failed load: recompile and overwrite
        return None


def _load_library(path: str, symbol: str, sha256: str | None) -> Callable | None:
    """``symbol`` of the linked shared library ``path`` through tvm_ffi (no DSL import), or None."""
    if not sha256:
        return None
    try:
        if _sha256(path) != sha256:
            return None
        import tvm_ffi

        module = tvm_ffi.load_module(path)
        _modules.append(module)
        return module[symbol]
    except Exception:
        return None


def _compiler() -> str | None:
    cc = os.environ.get("CC")
    return shutil.which(cc) if cc else (shutil.which("cc") or shutil.which("gcc"))


def _link(obj: str, out: str) -> bool:
    """Link the exported object ``obj`` into the shared library ``out`` (False if no compiler or
    the link fails: the object alone still serves)."""
    cc = _compiler()
    if cc is None:
        return False
    import cutlass.cute as cute

    libs = [os.path.abspath(p) for p in cute.runtime.find_runtime_libraries(enable_tvm_ffi=True)]
    rpaths = [f"-Wl,-rpath,{d}" for d in dict.fromkeys(os.path.dirname(p) for p in libs)]
    try:
        done = subprocess.run([cc, "-shared", "-o", out, obj, *libs, *rpaths], capture_output=True, timeout=120)
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


def store(key, fn) -> Callable:
    """Export ``fn`` (compiled for ``key``) into the cache and return the function loaded back from
    it, so every process runs the same exported code; returns ``fn`` itself if the cache is off or
    the export fails (a warning is printed once)."""
    paths = entry_paths(key)
    if paths is None:
        return fn
    obj, meta_path, symbol = paths
    tag = f"{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        os.makedirs(os.path.dirname(obj), exist_ok=True)
        fn.export_to_c(f"{obj}.{tag}", function_name=symbol)
        digest = _sha256(f"{obj}.{tag}")
        lib = obj[:-2] + ".so"
        lib_digest = None
        if _link(f"{obj}.{tag}", f"{lib}.{tag}"):
            lib_digest = _sha256(f"{lib}.{tag}")
            os.replace(f"{lib}.{tag}", lib)
        os.replace(f"{obj}.{tag}", obj)
        meta = {**_record(key), "symbol": symbol, "object_sha256": digest, "library_sha256": lib_digest,
                "smem_bytes": int(getattr(fn, "smem_bytes", 0))}
        with open(f"{meta_path}.{tag}", "w") as f:
            json.dump(meta, f, indent=1)
        os.replace(f"{meta_path}.{tag}", meta_path)
    except Exception as e:  # read-only home, full disk, export unsupported: keep the in-memory kernel
        for p in (f"{obj}.{tag}", f"{obj[:-2]}.so.{tag}", f"{meta_path}.{tag}"):
            try:
                os.remove(p)
            except OSError:
                pass
        _warn(f"cute_moe: could not write the GEMM kernel cache in {os.path.dirname(obj)} "
              f"({type(e).__name__}: {e}); kernels will be recompiled in the next process")
        return fn
    loaded = load(key)
    return loaded if loaded is not None else fn


def _warn(msg: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
