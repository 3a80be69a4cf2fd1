"""Host memory: keep freed buffers in the process instead of handing them back to the kernel.

Why: on a CPU backend every jitted step allocates its scratch space afresh (about 0.9 GB for a
BERT-Mini fine-tuning step at batch 32 x 128) and frees it at the end. glibc serves blocks that
large with ``mmap`` and returns them with ``munmap``, so each step page-faults and zeroes the
whole scratch space again: measured here, 14% of the step time. ``mallopt`` can make glibc keep
such blocks on its heap and reuse them:

- ``M_ARENA_MAX = 1``: every thread allocates from the main heap (a thread arena would still
  ``mmap`` any block larger than its 64 MiB heap);
- ``M_MMAP_MAX = 0``: no ``mmap`` for large blocks;
- ``M_TRIM_THRESHOLD = -1``: never give the top of the heap back.

The cost is that the process keeps its peak memory until it exits, which is what a training
process does anyway. It must run before the thread pools start (an arena, once taken by a
thread, stays with it), so ``main.py`` and ``bench.py`` call it before importing JAX, TensorFlow
or PyTorch. Set ``BERT_MINI_MALLOC_TUNING=0`` to leave glibc's defaults; other C libraries (macOS,
musl) are left alone.
"""

import ctypes
import ctypes.util
import logging
import os

_log = logging.getLogger("bert_mini")

ENV_SWITCH = "BERT_MINI_MALLOC_TUNING"

# glibc's <malloc.h> parameter numbers.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
SETTINGS = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1))


def keep_freed_memory() -> bool:
    """Applies ``SETTINGS`` with glibc's ``mallopt``; True if all of them took effect."""
    switch = os.environ.get(ENV_SWITCH, "1").strip()
    if switch not in ("0", "1"):
        raise ValueError(f"{ENV_SWITCH}={switch!r}: use 1 (tune, the default) or 0")
    if switch == "0":
        return False
    library = ctypes.util.find_library("c")
    if library is None:
        return False
    libc = ctypes.CDLL(library)
    if not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
        return False  # not glibc: its mallopt parameters mean other things or nothing
    applied = all(libc.mallopt(parameter, value) == 1 for parameter, value in SETTINGS)
    if not applied:
        _log.warning("glibc mallopt refused a setting; large buffers stay mmap-backed")
    return applied
