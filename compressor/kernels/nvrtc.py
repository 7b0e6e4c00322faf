"""CUDA C++ kernels compiled at run time: NVRTC turns the source into a cubin for the device's architecture, the
driver API loads and launches it on PyTorch's current stream (so CUDA graphs capture it).

NVRTC ships with every CUDA build of PyTorch (the nvidia-cuda-nvrtc wheel), so nothing is built at install time and
no compiler is needed. Compiling needs no GPU: `compile_cubin` runs on any machine that has the library, which is how
the tests check the source on a CPU-only machine.
"""
from __future__ import annotations

import ctypes
import glob
import os
import sys
from functools import lru_cache

import torch


class NvrtcUnavailable(RuntimeError):
    """No NVRTC library could be loaded (the caller falls back to the Triton kernels)."""


def _candidates() -> list[str]:
    names = []
    if os.environ.get("COMPRESSOR_NVRTC"):
        names.append(os.environ["COMPRESSOR_NVRTC"])
    major = (torch.version.cuda or "").split(".")[0]
    majors = [major] if major else []
    majors += [m for m in ("13", "12", "11") if m not in majors]
    for m in majors:  # PyTorch's own CUDA major first: on the loader's path, then in pip's CUDA wheels
        names.append(f"libnvrtc.so.{m}")
        for base in sys.path:  # nvidia/cu13/lib, nvidia/cuda_nvrtc/lib
            names += sorted(glob.glob(os.path.join(base, "nvidia", "*", "lib", f"libnvrtc.so.{m}*")))
    return names + ["libnvrtc.so"]


@lru_cache(maxsize=None)
def _nvrtc() -> ctypes.CDLL:
    for name in _candidates():
        if "builtins" in os.path.basename(name) or ".alt." in os.path.basename(name):
            continue
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        # NVRTC opens its builtins library by name at compile time: load the one beside it first, so a wheel's
        # copy is found without LD_LIBRARY_PATH.
        for builtins in sorted(glob.glob(os.path.join(os.path.dirname(name), "libnvrtc-builtins.so.*"))):
            if ".alt." not in builtins:
                ctypes.CDLL(builtins, mode=ctypes.RTLD_GLOBAL)
        return lib
    raise NvrtcUnavailable("no NVRTC library found (libnvrtc.so.*; set COMPRESSOR_NVRTC to its path)")


@lru_cache(maxsize=None)
def available() -> bool:
    try:
        _nvrtc()
    except NvrtcUnavailable:
        return False
    return True


def compile_cubin(source: str, name: str, arch: int, defines: dict[str, int],
                  verbose: bool = False) -> tuple[bytes, str]:
    """The cubin of `source` for compute capability `arch` (e.g. 90) with `-Dkey=value` for each define, and NVRTC's
    log (with `verbose`, ptxas's registers, spills and shared memory); RuntimeError with the log when the source
    does not compile."""
    lib = _nvrtc()
    prog = ctypes.c_void_p()
    _check(lib, lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), f"{name}.cu".encode(), 0, None, None))
    try:
        # Line tables cost no speed and let compute-sanitizer and Nsight Compute point at source lines.
        opts = [f"--gpu-architecture=sm_{arch}", "-std=c++17", "--generate-line-info",
                *(f"-D{k}={int(v)}" for k, v in defines.items())]
        opts += ["--ptxas-options=-v"] if verbose else []
        arr = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
        res = lib.nvrtcCompileProgram(prog, len(opts), arr)
        text = program_log(lib, prog)
        if res != 0:
            raise RuntimeError(f"NVRTC could not compile {name} ({' '.join(opts)}):\n{text}")
        size = ctypes.c_size_t()
        _check(lib, lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)))
        cubin = ctypes.create_string_buffer(size.value)
        _check(lib, lib.nvrtcGetCUBIN(prog, cubin))
        return cubin.raw, text
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def program_log(lib: ctypes.CDLL, prog: ctypes.c_void_p) -> str:
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    buf = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, buf)
    return buf.value.decode(errors="replace")


def _check(lib: ctypes.CDLL, res: int) -> None:
    if res != 0:
        lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        raise RuntimeError(f"NVRTC error {res}: {lib.nvrtcGetErrorString(res).decode()}")


@lru_cache(maxsize=None)
def _libcuda() -> ctypes.CDLL:
    return ctypes.CDLL("libcuda.so.1")


def _cu(res: int, what: str) -> None:
    if res != 0:
        msg = ctypes.c_char_p()
        _libcuda().cuGetErrorString(res, ctypes.byref(msg))
        raise RuntimeError(f"{what}: CUDA driver error {res} ({(msg.value or b'?').decode()})")


class Kernel:
    """A kernel of a cubin loaded into the current device's context. Call it with the grid, the block, the dynamic
    shared memory and the arguments as ctypes values (c_void_p for pointers, c_int for ints)."""

    def __init__(self, cubin: bytes, name: str, max_shared: int = 0) -> None:
        torch.cuda.init()
        lib = _libcuda()
        self._module = ctypes.c_void_p()
        self._cubin = cubin  # the driver may read it lazily
        _cu(lib.cuModuleLoadData(ctypes.byref(self._module), cubin), f"loading {name}")
        self._func = ctypes.c_void_p()
        _cu(lib.cuModuleGetFunction(ctypes.byref(self._func), self._module, name.encode()), f"finding {name}")
        if max_shared > 48 * 1024:  # CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
            _cu(lib.cuFuncSetAttribute(self._func, 8, max_shared), f"shared memory of {name}")
        self.name = name

    def __call__(self, grid: tuple[int, int, int], block: int, shared: int, args: list, pdl: bool = False) -> None:
        """Launch on PyTorch's current stream. `pdl`: programmatic dependent launch (sm_90+), the grid may start
        before the previous kernel in the stream has finished; the kernel waits for it (griddepcontrol.wait)
        before it reads that kernel's results."""
        stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
        if not pdl:
            _cu(_libcuda().cuLaunchKernel(self._func, grid[0], grid[1], grid[2], block, 1, 1, shared, stream,
                                          kernel_params(args), None), f"launching {self.name}")
            return
        attr = LaunchAttribute(PROGRAMMATIC_STREAM_SERIALIZATION)
        attr.value.int_value = 1
        config = LaunchConfig(*grid, block, 1, 1, shared, stream, ctypes.pointer(attr), 1)
        _cu(_libcuda().cuLaunchKernelEx(ctypes.byref(config), self._func, kernel_params(args), None),
            f"launching {self.name} (programmatic dependent launch)")


PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CUlaunchAttributeID


class LaunchAttributeValue(ctypes.Union):
    _fields_ = [("pad", ctypes.c_char * 64), ("int_value", ctypes.c_int)]


class LaunchAttribute(ctypes.Structure):  # CUlaunchAttribute: the id, padded to 8 bytes, then a 64-byte union
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", LaunchAttributeValue)]


class LaunchConfig(ctypes.Structure):  # CUlaunchConfig of cuLaunchKernelEx
    _fields_ = [("gridDimX", ctypes.c_uint), ("gridDimY", ctypes.c_uint), ("gridDimZ", ctypes.c_uint),
                ("blockDimX", ctypes.c_uint), ("blockDimY", ctypes.c_uint), ("blockDimZ", ctypes.c_uint),
                ("sharedMemBytes", ctypes.c_uint), ("hStream", ctypes.c_void_p),
                ("attrs", ctypes.POINTER(LaunchAttribute)), ("numAttrs", ctypes.c_uint)]


def kernel_params(args: list) -> ctypes.Array:
    """cuLaunchKernel's `void **kernelParams`: one pointer to each argument's value (which `args` keeps alive)."""
    return (ctypes.c_void_p * len(args))(*[ctypes.cast(ctypes.pointer(a), ctypes.c_void_p) for a in args])
