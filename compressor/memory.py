"""Keeping the resident size of a long run to what is alive (Linux, glibc; no-ops elsewhere)."""
from __future__ import annotations

import ctypes
import functools
import mmap

import torch

_MADV_DONTNEED = 4
_MADV_PAGEOUT = 21  # Linux 5.4+


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def page_out(tensors: list[torch.Tensor]) -> None:
    """Ask the kernel to reclaim the pages of tensors that are being dropped.

    Weights loaded from a safetensors file live in a read-only mapping of that file, which stays mapped while any
    tensor of the file is alive: a replaced layer's float weight would stay resident until the end of the run.
    MADV_PAGEOUT reclaims clean file pages at once and changes no data (a page still in use by another tensor is
    read back from the file when touched), so this is safe whoever else holds the tensor."""
    libc = _libc()
    if libc is None:
        return
    page = mmap.PAGESIZE
    for t in tensors:
        if t.device.type != "cpu" or t.untyped_storage().resizable():  # heap memory: freed normally
            continue
        start = -(-t.untyped_storage().data_ptr() // page) * page
        end = (t.untyped_storage().data_ptr() + t.untyped_storage().nbytes()) // page * page
        if end > start:
            libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_PAGEOUT)


def trim_heap() -> None:
    """Give the pages of freed heap chunks back to the system. glibc keeps them for reuse: a run that frees many
    tensors of one size and then allocates ones of another keeps both resident. Unlike
    `return_freed_memory_to_the_system` this leaves the allocation policy alone (cheap to call after each block)."""
    libc = _libc()
    if libc is None:
        return
    try:
        libc.malloc_trim(0)
    except AttributeError:  # not glibc
        pass


def discard_from(t: torch.Tensor, start: int) -> None:
    """Drop the pages of `t`'s storage from byte `start` to its end: the caller never reads that part again and the
    storage is still referenced (its pages would otherwise stay resident until it is freed). Only pages wholly inside
    the storage go; reading them afterwards gives zeros. Heap storage on Linux only; a no-op elsewhere."""
    libc = _libc()
    storage = t.untyped_storage()
    if libc is None or t.device.type != "cpu" or not storage.resizable():  # a file mapping is paged out instead
        return
    page = mmap.PAGESIZE
    first = -(-(storage.data_ptr() + start) // page) * page
    end = (storage.data_ptr() + storage.nbytes()) // page * page
    if end > first:
        libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(end - first), _MADV_DONTNEED)


def return_freed_memory_to_the_system() -> None:
    """glibc keeps freed heap memory for reuse, and after the first large free it serves allocations up to that size
    from the heap: a block's tensors freed would stay resident. Large allocations from their own mappings (returned
    on free) and a trim after each block keep the resident size to what is alive. No-op outside glibc."""
    libc = _libc()
    if libc is None:
        return
    try:
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD: 1 MiB and up gets its own mapping (fixed, not adaptive)
        libc.malloc_trim(0)
    except AttributeError:  # not glibc
        pass
