"""JAX's persistent compilation cache, pointed at a run's directory for the length of the run.

Why: a run restarted after a preemption or a SIGKILL (``train.py`` resumes it exactly) would
otherwise compile its steps again. That costs seconds on a CPU, minutes for BERT-Base on a GPU
(XLA autotunes every matmul) and more on a pod. With the cache, the restarted process loads the
executables the first one compiled; they are the same programs, so the resumed run stays
bitwise equal to an uninterrupted one (``tests/test_train.py`` checks this through a SIGKILL).

JAX writes an entry for each program whose compilation took at least
``jax_persistent_cache_min_compile_time_secs`` (1 s by default), only from process 0, and in
place: a kill in the middle leaves the entry cut short, and JAX would then warn and compile again
on every restart, never replacing it. ``drop_unreadable_entries`` deletes such
entries when a run starts, so the next compile writes a good one. The cache is trusted code: keep
it out of directories that others can write to.
"""

import contextlib
import logging
import os
import pathlib
import time
from collections.abc import Iterator

import jax
from jax._src import compilation_cache as jax_cache_format  # the entries' (de)compression
from jax.experimental.compilation_cache import compilation_cache

_log = logging.getLogger("bert_mini")

OFF = "off"
ENV_VAR = "JAX_COMPILATION_CACHE_DIR"
ENTRY_GLOB = "*-cache"
# A younger entry may still be being written by another process sharing the cache: leave it.
SETTLED_AFTER_S = 60.0


def cache_dir(setting: str, workdir: pathlib.Path) -> pathlib.Path | None:
    """The directory ``config.compile_cache_dir`` names; None when it says ``"off"``.

    ``""`` means ``$JAX_COMPILATION_CACHE_DIR`` when that is set (one cache shared by every run
    of a user), else ``<workdir>/compile_cache`` (the resume of this run).
    """
    if setting == OFF:
        return None
    if setting:
        return pathlib.Path(setting).expanduser()
    from_env = os.environ.get(ENV_VAR, "")
    return pathlib.Path(from_env).expanduser() if from_env else workdir / "compile_cache"


def drop_unreadable_entries(directory: pathlib.Path) -> list[pathlib.Path]:
    """Deletes the entries of ``directory`` that do not decompress (cut short); returns them."""
    dropped = []
    settled_before = time.time() - SETTLED_AFTER_S
    for entry in sorted(directory.glob(ENTRY_GLOB)):
        try:
            if entry.stat().st_mtime > settled_before:
                continue
            jax_cache_format.decompress_executable(entry.read_bytes())
        except FileNotFoundError:  # evicted by another process meanwhile
            continue
        except Exception as error:  # zlib.error or zstd's ZstdError, as JAX's build has it
            _log.warning("compilation cache: dropping unreadable %s (%s)", entry, error)
            entry.unlink(missing_ok=True)
            dropped.append(entry)
    return dropped


def _point_jax_at(directory: str | None) -> None:
    """Sets JAX's cache directory; JAX reads it once per process, so a change resets the cache."""
    if jax.config.jax_compilation_cache_dir != directory:
        jax.config.update("jax_compilation_cache_dir", directory)
        compilation_cache.reset_cache()


@contextlib.contextmanager
def persistent_cache(directory: pathlib.Path | None) -> Iterator[None]:
    """Compiles inside the block read and write ``directory`` (None: no cache).

    The previous setting comes back afterwards, so a notebook or test that runs several
    experiments in one process never reads one run's cache in another by accident.
    """
    previous = jax.config.jax_compilation_cache_dir
    if directory is not None:
        if directory.is_dir() and jax.process_index() == 0:
            drop_unreadable_entries(directory)
        entries = len(list(directory.glob(ENTRY_GLOB)))  # none when the folder is not there yet
        _log.info("compilation cache: %s (%d entries)", directory, entries)
    _point_jax_at(str(directory) if directory is not None else None)
    try:
        yield
    finally:
        _point_jax_at(previous)
