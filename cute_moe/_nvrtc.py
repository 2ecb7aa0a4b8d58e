"""NVRTC compilation and per-device caching of the CuPy raw kernels (routing, plan, permute, combine).

Kernel sources live in ``cute_moe/kernels/*.cu`` and include ``common.cuh`` from memory; they need no
CUDA headers, so compiling works on any machine with NVRTC (``nvidia-cuda-nvrtc``), GPU or not.
Specializations are selected with ``-D`` defines. We compile to a cubin for the device's exact
``sm_XX`` with NVRTC's IEEE defaults (no ``-ftz``, precise division: CuPy's ``RawModule`` always adds
``-ftz=true``, which would break bitwise agreement with torch's routing math), then load the cubin
through ``cupy.cuda.function.Module`` and launch on torch's current stream: directly through the
driver's ``cuLaunchKernel`` (ctypes, parameters packed with ``struct`` in one buffer: a few
microseconds of host time, the decode path launches several kernels per layer), falling back to
CuPy's launcher where that is unavailable.

Cubins are cached in memory per (device, source, defines) and on disk under
``$CUTE_MOE_CACHE_DIR`` (default ``~/.cache/cute_moe/nvrtc``; set it to an empty string to disable).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import struct
import threading
from importlib import resources
from typing import Any, Iterable, Mapping

import torch

# element dtype codes of every -D<NAME>_DT define (common.cuh's Elem<kDt>)
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def check_rows(x, name: str, layout: str) -> int:
    """``x`` a 2-D CUDA bf16/fp16/fp32 matrix with a dense last dimension (what the row kernels
    read); returns its dtype code. Raises naming ``name`` and its ``layout`` (e.g. "[T, H]")."""
    if x is None or x.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D {layout} tensor, got {None if x is None else tuple(x.shape)}")
    if x.device.type != "cuda":
        raise ValueError(f"{name}: expected a CUDA tensor, got device {x.device}")
    code = DTYPE_CODES.get(x.dtype)
    if code is None:
        raise TypeError(f"{name}: expected bf16, fp16 or fp32, got {x.dtype}")
    if x.shape[1] > 1 and x.stride(1) != 1:
        raise ValueError(f"{name}: expected a contiguous last dimension, got strides {x.stride()}")
    return code

KERNEL_SOURCES = ("routing.cu", "router.cu", "plan.cu", "route_plan.cu", "permute.cu", "combine.cu", "quantize.cu",
                  "moe_decode.cu")
HEADERS = ("common.cuh", "route_select.cuh", "plan_common.cuh")

_lock = threading.Lock()
_text_cache: dict[str, str] = {}
_modules: dict[tuple, Any] = {}
_functions: dict[tuple, Any] = {}
_streams: dict[tuple, Any] = {}
_device_info: dict[int, tuple[str, int]] = {}


class CompileError(RuntimeError):
    """NVRTC rejected a kernel source; the message holds the compile log."""


def _read(name: str) -> str:
    text = _text_cache.get(name)
    if text is None:
        text = resources.files("cute_moe").joinpath("kernels").joinpath(name).read_text()
        _text_cache[name] = text
    return text


def _options(arch: str, defines: Iterable[tuple[str, Any]]) -> list[bytes]:
    # -default-device: NVRTC 13.0 treats unannotated lambdas in kernels as host code
    opts = ["-std=c++17", f"-arch={arch}", "-default-device", "-lineinfo", "-DCUTE_MOE_NVRTC=1"]
    opts += [f"-D{k}={int(v) if isinstance(v, bool) else v}" for k, v in defines]
    return [o.encode() for o in opts]


def _nvrtc_version() -> tuple[int, int]:
    from cuda.bindings import nvrtc

    err, major, minor = nvrtc.nvrtcVersion()
    _check(err, "nvrtcVersion")
    return major, minor


def _check(err, what: str, log: str = "") -> None:
    from cuda.bindings import nvrtc

    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise CompileError(f"{what} failed: {err}\n{log}")


def compile_source(source: str, arch: str, defines: Mapping[str, Any] | Iterable[tuple[str, Any]] = (), *,
                   cache: bool = True) -> tuple[bytes, str]:
    """Compile kernel file ``source`` for ``arch`` ('sm_90') with ``defines``: (cubin, compile log).

    Raises CompileError with the log on failure. Uses the disk cache when enabled and ``cache``.
    """
    from cuda.bindings import nvrtc

    items = tuple(sorted(dict(defines).items()))
    text = _read(source)
    headers = [_read(h) for h in HEADERS]
    opts = _options(arch, items)
    cache_path = _disk_cache_path(source, text, headers, opts) if cache else None
    if cache_path is not None and os.path.exists(cache_path):
        with open(cache_path, "rb") as f:
            return f.read(), ""

    err, prog = nvrtc.nvrtcCreateProgram(text.encode(), source.encode(), len(HEADERS),
                                         [h.encode() for h in headers], [h.encode() for h in HEADERS])
    _check(err, "nvrtcCreateProgram")
    try:
        (err,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        _, log_size = nvrtc.nvrtcGetProgramLogSize(prog)
        log_buf = b" " * log_size
        nvrtc.nvrtcGetProgramLog(prog, log_buf)
        log = log_buf.decode(errors="replace").rstrip("\x00").strip()
        _check(err, f"NVRTC compile of {source} {dict(items)} for {arch}", log)
        err, size = nvrtc.nvrtcGetCUBINSize(prog)
        _check(err, "nvrtcGetCUBINSize")
        cubin = b" " * size
        (err,) = nvrtc.nvrtcGetCUBIN(prog, cubin)
        _check(err, "nvrtcGetCUBIN")
    finally:
        nvrtc.nvrtcDestroyProgram(prog)
    if cache_path is not None:
        _disk_cache_store(cache_path, cubin)
    return cubin, log


def _disk_cache_path(source: str, text: str, headers: list[str], opts: list[bytes]) -> str | None:
    root = os.environ.get("CUTE_MOE_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "cute_moe",
                                                            "nvrtc"))
    if not root:
        return None
    h = hashlib.sha256()
    for part in (text, *headers, *(o.decode() for o in opts), repr(_nvrtc_version())):
        h.update(part.encode())
        h.update(b"\0")
    return os.path.join(root, f"{source.split('.')[0]}-{h.hexdigest()[:40]}.cubin")


def _disk_cache_store(path: str, cubin: bytes) -> None:
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
        with open(tmp, "wb") as f:
            f.write(cubin)
        os.replace(tmp, path)
    except OSError:
        pass


def device_info(index: int) -> tuple[str, int]:
    """('sm_XX', number of SMs) of CUDA device ``index`` (cached)."""
    info = _device_info.get(index)
    if info is None:
        props = torch.cuda.get_device_properties(index)
        info = (f"sm_{props.major}{props.minor}", props.multi_processor_count)
        _device_info[index] = info
    return info


def get_function(device_index: int, source: str, kernel: str, defines: tuple[tuple[str, Any], ...]):
    """The cupy Function ``kernel`` of ``source`` compiled with ``defines`` (a sorted tuple of
    (name, value)) and loaded on device ``device_index``; compiled once per process and device."""
    key = (device_index, source, kernel, defines)
    fn = _functions.get(key)
    if fn is not None:
        return fn
    with _lock:
        mod_key = (device_index, source, defines)
        module = _modules.get(mod_key)
        if module is None:
            import cupy

            cubin, _ = compile_source(source, device_info(device_index)[0], defines)
            with cupy.cuda.Device(device_index):
                module = cupy.cuda.function.Module()
                module.load(cubin)
            _modules[mod_key] = module
        fn = module.get_function(kernel)
        _functions[key] = fn
    return fn


class _StreamRef:
    """A raw CUDA stream handle speaking the CUDA stream protocol (for cupy.cuda.Stream.from_external)."""

    __slots__ = ("ptr",)

    def __init__(self, ptr: int):
        self.ptr = ptr

    def __cuda_stream__(self) -> tuple[int, int]:
        return (0, self.ptr)


def current_stream(device_index: int):
    """torch's current stream on ``device_index`` as a (cached) cupy stream."""
    ptr = torch.cuda.current_stream(device_index).cuda_stream
    key = (device_index, ptr)
    s = _streams.get(key)
    if s is None:
        import cupy

        from_external = getattr(cupy.cuda.Stream, "from_external", None)
        if from_external is not None:
            s = from_external(_StreamRef(ptr))
        else:  # cupy < 14
            s = cupy.cuda.ExternalStream(ptr, device_index)
        _streams[key] = s
    return s


def launch(fn, device_index: int, grid: int, block: int, args: tuple, shared_mem: int = 0) -> None:
    """Launch ``fn`` on torch's current stream of ``device_index`` (1-D grid and block).

    ``args`` are kernel parameters: Python ints (64-bit: pointers, sizes), numpy scalars
    (np.int32, np.float32, ...) or Python floats (double)."""
    if _driver_launch is not None and _current_device() == device_index:
        packed = _pack(args)
        if packed is not None:
            buf, params = packed
            stream = torch._C._cuda_getCurrentRawStream(device_index)
            if _driver_launch_ex is not None and _pdl_on(device_index):
                cfg = _launch_config()
                cfg.gridDimX, cfg.blockDimX, cfg.sharedMemBytes, cfg.hStream = grid, block, shared_mem, stream
                if _driver_launch_ex(ctypes.byref(cfg), fn.ptr, params, None) == 0:
                    return
            elif _driver_launch(fn.ptr, grid, 1, 1, block, 1, 1, shared_mem, stream, params, None) == 0:
                return
    import cupy

    with cupy.cuda.Device(device_index):
        fn((grid, 1, 1), (block, 1, 1), args, shared_mem=shared_mem, stream=current_stream(device_index))


# torch's current CUDA device index without torch.cuda.current_device()'s Python wrapper (launches
# only happen with CUDA tensors at hand, so CUDA is initialized)
_current_device = getattr(torch._C, "_cuda_getDevice", None) or torch.cuda.current_device
_COOPERATIVE = 2  # CUlaunchAttributeID
_coop_pdl: dict[int, bool] = {}  # device -> whether cooperative launches also take the PDL attribute


_coop_launches: dict[tuple, CooperativeLaunch] = {}


def launch_cooperative(fn, device_index: int, grid: int, block: int, args: tuple, shared_mem: int = 0) -> bool:
    """Launch ``fn`` cooperatively (all CTAs resident, for kernels with a grid barrier) on torch's
    current stream, with PDL where the driver accepts both, through a :class:`CooperativeLaunch` kept
    per (kernel, device, grid, block, shared memory, argument types). False if it could not be
    launched (no driver entry point, argument types the packer does not know, or the driver refused,
    e.g. a grid larger than fits at once): the caller then takes another path. Grids of one CTA need
    no cooperative launch."""
    codes = _arg_codes(args)
    if codes is None:
        return False
    key = (fn.ptr, device_index, grid, block, shared_mem, codes)
    launch = _coop_launches.get(key)
    if launch is None:
        launch = _coop_launches[key] = CooperativeLaunch(fn, device_index, grid, block, shared_mem, codes)
    return launch(*args)


# Whether torch's current stream is capturing a CUDA graph (cudaStreamIsCapturing: no GPU work).
_capturing = getattr(torch._C, "_cuda_isCurrentStreamCapturing", None) or torch.cuda.is_current_stream_capturing


class CooperativeLaunch:
    """One kernel's cooperative launch with a fixed grid, block, dynamic shared memory and parameter
    layout (``codes``: struct format characters, e.g. "qqdi"), for launches on the host's hot path:
    a call packs the parameters into this thread's buffer, reads torch's current stream and calls
    cuLaunchKernelEx with PDL where the driver accepts it (as :func:`launch_cooperative`). With
    ``eager_pdl=False`` the PDL attribute is set only while a CUDA graph is being captured: for the
    one-CTA-per-SM decode kernel it cost the host ~2 us per eager launch with earlier work in flight
    and bought no GPU time (H100, perf/NOTES.md). Returns False when it could not launch (the caller
    takes another path)."""

    def __init__(self, fn, device_index: int, grid: int, block: int, shared_mem: int, codes: str, *,
                 eager_pdl: bool = True):
        self.fn, self.dev, self.grid, self.block, self.shared_mem = fn, device_index, grid, block, shared_mem
        self.eager_pdl = eager_pdl
        self._struct, self._offsets = _layout(codes)
        self._local = threading.local()

    def _state(self, with_pdl: bool) -> tuple:
        """This thread's (config address, parameter buffer, void*[] address) for the launch."""
        states = getattr(self._local, "states", None)
        if states is None:
            states = self._local.states = {}
        st = states.get(with_pdl)
        if st is None:
            attrs = (_LaunchAttribute * 2)(_LaunchAttribute(id=_COOPERATIVE, value=1),
                                           _LaunchAttribute(id=_PROGRAMMATIC_STREAM_SERIALIZATION, value=1))
            cfg = _LaunchConfig(gridDimX=self.grid, gridDimY=1, gridDimZ=1, blockDimX=self.block, blockDimY=1,
                                blockDimZ=1, sharedMemBytes=self.shared_mem, attrs=attrs,
                                numAttrs=2 if with_pdl else 1)
            buf = ctypes.create_string_buffer(max(self._struct.size, 1))
            params = (ctypes.c_void_p * len(self._offsets))(*[ctypes.addressof(buf) + o for o in self._offsets])
            st = states[with_pdl] = (cfg, buf, params, attrs, ctypes.addressof(cfg), ctypes.addressof(params))
        return st

    def __call__(self, *args) -> bool:
        if _driver_launch_ex is None or _current_device() != self.dev:
            return False
        pdl = _coop_pdl.get(self.dev)
        if pdl is None:
            pdl = _pdl_on(self.dev)
        tries = (True, False) if pdl and (self.eager_pdl or _capturing()) else (False,)
        for with_pdl in tries:
            cfg, buf, _, _, cfg_addr, params_addr = self._state(with_pdl)
            self._struct.pack_into(buf, 0, *args)
            cfg.hStream = torch._C._cuda_getCurrentRawStream(self.dev)
            if _driver_launch_ex(cfg_addr, self.fn.ptr, params_addr, None) == 0:
                if len(tries) == 2 and not with_pdl:  # the driver refused the PDL attribute
                    _coop_pdl[self.dev] = False
                return True
        return False


_occupancy_fn = None
_max_blocks: dict[tuple, int] = {}


def max_resident_blocks(fn, device_index: int, block: int) -> int:
    """CTAs of ``fn`` (``block`` threads, static shared memory only) that fit on the device at once
    (0 if unknown)."""
    global _occupancy_fn
    key = (device_index, fn.ptr, block)
    n = _max_blocks.get(key)
    if n is None:
        if _occupancy_fn is None:
            _occupancy_fn = driver_function("cuOccupancyMaxActiveBlocksPerMultiprocessor",
                                            [ctypes.POINTER(ctypes.c_int), ctypes.c_void_p, ctypes.c_int,
                                             ctypes.c_size_t])
        per_sm = ctypes.c_int(0)
        ok = _occupancy_fn is not None and _occupancy_fn(ctypes.byref(per_sm), fn.ptr, block, 0) == 0
        n = _max_blocks[key] = per_sm.value * device_info(device_index)[1] if ok else 0
    return n


def driver_function(name: str, argtypes: list):
    """ctypes function ``name`` of the CUDA driver returning a CUresult (0: success), or None (no
    driver library or no such symbol)."""
    try:
        f = ctypes.CDLL("libcuda.so.1")[name]
    except (OSError, AttributeError):
        return None
    f.restype = ctypes.c_int
    f.argtypes = argtypes
    return f


def _load_driver_launch():
    """ctypes ``cuLaunchKernel`` of the CUDA driver, or None (no driver library)."""
    return driver_function("cuLaunchKernel", [ctypes.c_void_p, *[ctypes.c_uint] * 7, ctypes.c_void_p,
                                              ctypes.c_void_p, ctypes.c_void_p])


_driver_launch = None if os.environ.get("CUTE_MOE_CUPY_LAUNCH") else _load_driver_launch()

# Programmatic dependent launch (PDL) for every kernel of the layer: each kernel starts with
# griddepcontrol.wait and then lets the next one launch (kernels/common.cuh; the grouped GEMM does
# the same), so in a stream or CUDA graph a kernel's launch and prologue overlap the previous
# kernel's tail. CUTE_MOE_PDL=0 launches them the ordinary way (the GEMM's disk cache keys on it).
PDL = os.environ.get("CUTE_MOE_PDL", "1") != "0"
_PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CUlaunchAttributeID


class _LaunchAttribute(ctypes.Structure):
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int), ("rest", ctypes.c_char * 60)]


class _LaunchConfig(ctypes.Structure):
    _fields_ = [("gridDimX", ctypes.c_uint), ("gridDimY", ctypes.c_uint), ("gridDimZ", ctypes.c_uint),
                ("blockDimX", ctypes.c_uint), ("blockDimY", ctypes.c_uint), ("blockDimZ", ctypes.c_uint),
                ("sharedMemBytes", ctypes.c_uint), ("hStream", ctypes.c_void_p),
                ("attrs", ctypes.POINTER(_LaunchAttribute)), ("numAttrs", ctypes.c_uint)]


_pdl_devices: dict[int, bool] = {}


def _pdl_on(device_index: int) -> bool:
    """PDL launches on this device: sm_90 and newer (griddepcontrol; older GPUs launch the ordinary way)."""
    on = _pdl_devices.get(device_index)
    if on is None:
        on = _pdl_devices[device_index] = torch.cuda.get_device_capability(device_index)[0] >= 9
    return on


def _launch_config() -> _LaunchConfig:
    """This thread's reusable cuLaunchKernelEx config (1-D, one PDL attribute)."""
    cfg = getattr(_tls, "launch_config", None)
    if cfg is None:
        attr = _LaunchAttribute(id=_PROGRAMMATIC_STREAM_SERIALIZATION, value=1)
        cfg = _LaunchConfig(gridDimY=1, gridDimZ=1, blockDimY=1, blockDimZ=1, attrs=ctypes.pointer(attr), numAttrs=1)
        cfg._attr = attr  # keep the attribute alive with the config
        _tls.launch_config = cfg
    return cfg


_driver_launch_ex = (driver_function("cuLaunchKernelEx", [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                                          ctypes.c_void_p])
                     if _driver_launch is not None and PDL else None)
# nn.MoE.cuda_graphs replays: cuGraphLaunch(exec, stream) and cuMemcpyDtoDAsync_v2(dst, src, bytes, stream).
# Every argument is a 64-bit integer register on LP64 ABIs; c_void_p converts Python ints fastest.
graph_launch = driver_function("cuGraphLaunch", [ctypes.c_void_p] * 2)
memcpy_dtod = driver_function("cuMemcpyDtoDAsync_v2", [ctypes.c_void_p] * 4)
_SCALAR_CODES = {int: "q", float: "d"}


def _struct_code(tp) -> str | None:
    code = _SCALAR_CODES.get(tp)
    if code is None:
        import numpy as np

        if issubclass(tp, np.generic) and tp().dtype.kind in "iuf":
            code = tp().dtype.char
            _SCALAR_CODES[tp] = code
    return code


_tls = threading.local()


_sig_codes: dict[tuple, str | None] = {}


def _arg_codes(args: tuple) -> str | None:
    """struct format characters of kernel parameters ``args`` (None for a type the packer does not know)."""
    sig = tuple(map(type, args))
    try:
        return _sig_codes[sig]
    except KeyError:
        parts = [_struct_code(t) for t in sig]
        codes = _sig_codes[sig] = None if None in parts else "".join(parts)
        return codes


def _layout(codes: str) -> tuple[struct.Struct, list[int]]:
    """The parameter struct of ``codes`` at C alignment and each parameter's byte offset in it."""
    return (struct.Struct("@" + codes),
            [struct.calcsize("@" + codes[:i + 1]) - struct.calcsize("@" + codes[i]) for i in range(len(codes))])


def _pack(args: tuple):
    """(buffer, void*[] of parameter addresses) holding ``args`` at their C alignment, or None for
    argument types the packer does not know (the CuPy launcher takes those). The buffers are reused
    per thread and parameter layout: cuLaunchKernel copies the parameters before it returns."""
    codes = _arg_codes(args)
    if codes is None:
        return None
    cache = getattr(_tls, "buffers", None)
    if cache is None:
        cache = _tls.buffers = {}
    entry = cache.get(codes)
    if entry is None:
        st, offsets = _layout(codes)
        buf = ctypes.create_string_buffer(max(st.size, 1))
        base = ctypes.addressof(buf)
        entry = cache[codes] = (st, buf, (ctypes.c_void_p * len(codes))(*[base + o for o in offsets]))
    st, buf, params = entry
    st.pack_into(buf, 0, *args)
    return buf, params


def compile_check(arch: str = "sm_90", *, specializations: Iterable[tuple[str, dict]] | None = None
                  ) -> list[tuple[str, dict, str]]:
    """Compile every kernel source in its representative specializations for ``arch`` through NVRTC
    (no GPU needed, no cache). Returns [(source, defines, log)]; raises CompileError on the first
    failure."""
    if specializations is None:
        from . import decode, permute, plan, routing

        specializations = [*routing.compile_specializations(), *plan.compile_specializations(),
                           *permute.compile_specializations(), *decode.compile_specializations()]
    results = []
    for source, defines in specializations:
        _, log = compile_source(source, arch, defines, cache=False)
        results.append((source, dict(defines), log))
    return results
