"""The teacher's logits over the transfer set, computed once and cached as sharded ``.npy`` files.

Pre-trained Distillation runs the (large, slow) teacher over D_T exactly once; every student and
every rerun reads the cache. The cache is a folder:

- ``logits-00000.npy`` ... one file per shard of ``shard_size`` consecutive examples (dense
  ``[n, C]`` float32), or with ``top_k`` two files per shard, ``topk-values-*.npy`` ``[n, k]`` and
  ``topk-indices-*.npy`` ``[n, k]``, to save space when C is large (span logits over positions);
- ``manifest.json``, written last: the example count, shard size, class count, top-k and a
  fingerprint of the transfer set and the teacher. A folder without it is unfinished.

Each shard is written to a temporary name and renamed, so a run killed while writing leaves only
complete shards; a rerun computes the missing ones. Shards are spread over processes (shard i on
process ``i % process_count``), so a pod computes them in parallel on a shared filesystem.
"""

import hashlib
import json
import os
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

MANIFEST = "manifest.json"
# A class outside the stored top-k gets this logit: softmax gives it ~0 probability, and unlike
# -inf it keeps every loss term finite.
MISSING_LOGIT = -1e4


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-able parts (texts, settings), to tell caches apart."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(json.dumps(part, sort_keys=True, default=str).encode("utf-8"))
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def _shard_names(index: int, top_k: int) -> tuple[str, ...]:
    if top_k:
        return (f"topk-values-{index:05d}.npy", f"topk-indices-{index:05d}.npy")
    return (f"logits-{index:05d}.npy",)


def _save_atomic(path: pathlib.Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


def top_k_logits(logits_NxC: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k largest logits per row (descending) and their class indices."""
    indices_NxK = np.argsort(-logits_NxC, axis=-1, kind="stable")[:, :k].astype(np.int32)
    values_NxK = np.take_along_axis(logits_NxC, indices_NxK, axis=-1).astype(np.float32)
    return values_NxK, indices_NxK


def dense_from_top_k(values_NxK: np.ndarray, indices_NxK: np.ndarray, classes: int) -> np.ndarray:
    """``[N, C]`` logits with the stored top-k in place and ``MISSING_LOGIT`` elsewhere."""
    dense_NxC = np.full((len(values_NxK), classes), MISSING_LOGIT, dtype=np.float32)
    np.put_along_axis(dense_NxC, indices_NxK, values_NxK, axis=-1)
    return dense_NxC


def read_manifest(cache_dir: str | os.PathLike) -> dict[str, Any] | None:
    path = pathlib.Path(cache_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from None


def write_cache(
    cache_dir: str | os.PathLike,
    num_examples: int,
    compute_logits: Callable[[int, int], np.ndarray],
    *,
    shard_size: int,
    top_k: int = 0,
    fingerprint_value: str = "",
    process_index: int = 0,
    process_count: int = 1,
    barrier: Callable[[], None] = lambda: None,
    log: Callable[[str], None] = lambda message: None,
) -> dict[str, Any]:
    """Fills ``cache_dir`` with the logits of examples ``[0, num_examples)``; returns the manifest.

    ``compute_logits(start, stop)`` gives the teacher's ``[stop - start, C]`` float logits.
    Shards already on disk are kept (a rerun after a kill continues); a finished cache with
    another fingerprint is an error instead of being silently reused or overwritten.
    """
    if num_examples < 1:
        raise ValueError(f"{cache_dir}: the transfer set is empty; nothing to label")
    cache_dir = pathlib.Path(cache_dir)
    existing = read_manifest(cache_dir)
    if existing is not None:
        _check_fingerprint(cache_dir, existing, fingerprint_value)
        return existing
    cache_dir.mkdir(parents=True, exist_ok=True)
    num_shards = -(-num_examples // shard_size)
    classes = 0
    for index in range(process_index, num_shards, process_count):
        paths = [cache_dir / name for name in _shard_names(index, top_k)]
        if all(path.is_file() for path in paths):
            continue
        start, stop = index * shard_size, min((index + 1) * shard_size, num_examples)
        logits_NxC = np.asarray(compute_logits(start, stop), dtype=np.float32)
        if logits_NxC.shape[0] != stop - start:
            raise ValueError(f"teacher gave {logits_NxC.shape[0]} rows for {stop - start}")
        classes = logits_NxC.shape[-1]
        if top_k:
            for path, array in zip(paths, top_k_logits(logits_NxC, top_k), strict=True):
                _save_atomic(path, array)
        else:
            _save_atomic(paths[0], logits_NxC)
        log(f"teacher logits: shard {index + 1}/{num_shards} ({stop} examples)")
    barrier()
    if not classes:  # every shard was already there (or written by other processes)
        first = np.load(cache_dir / _shard_names(0, top_k)[0], mmap_mode="r")
        classes = first.shape[-1] if not top_k else int(_classes_from_indices(cache_dir))
    manifest = {
        "num_examples": num_examples,
        "num_shards": num_shards,
        "shard_size": shard_size,
        "num_classes": int(classes),
        "top_k": top_k,
        "fingerprint": fingerprint_value,
    }
    if process_index == 0:
        _save_json_atomic(cache_dir / MANIFEST, manifest)
    barrier()
    return manifest


def _classes_from_indices(cache_dir: pathlib.Path) -> int:
    highest = 0
    for path in sorted(cache_dir.glob("topk-indices-*.npy")):
        highest = max(highest, int(np.load(path).max()) + 1)
    return highest


def _save_json_atomic(path: pathlib.Path, value: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(tmp, path)


def _check_fingerprint(cache_dir: pathlib.Path, manifest: dict[str, Any], expected: str) -> None:
    if expected and manifest.get("fingerprint") != expected:
        raise ValueError(
            f"{cache_dir / MANIFEST}: cached teacher logits were made for another teacher or "
            f"transfer set (fingerprint {manifest.get('fingerprint')!r}, this run "
            f"{expected!r}); use another cache folder or delete this one"
        )


def load_cache(
    cache_dir: str | os.PathLike, num_classes: int | None = None, fingerprint_value: str = ""
) -> np.ndarray:
    """All cached logits as one dense ``[N, C]`` float32 array (top-k shards filled in)."""
    cache_dir = pathlib.Path(cache_dir)
    manifest = read_manifest(cache_dir)
    if manifest is None:
        raise FileNotFoundError(f"{cache_dir}: no {MANIFEST}; the teacher logits are unfinished")
    _check_fingerprint(cache_dir, manifest, fingerprint_value)
    classes = num_classes or manifest["num_classes"]
    parts: list[np.ndarray] = []
    for index in range(manifest["num_shards"]):
        paths: Sequence[pathlib.Path] = [
            cache_dir / name for name in _shard_names(index, manifest["top_k"])
        ]
        for path in paths:
            if not path.is_file():
                raise FileNotFoundError(f"{path}: a teacher-logits shard listed in the manifest")
        if manifest["top_k"]:
            values, indices = (np.load(path) for path in paths)
            parts.append(dense_from_top_k(values, indices, classes))
        else:
            parts.append(np.load(paths[0]))
    logits_NxC = np.concatenate(parts).astype(np.float32)
    if len(logits_NxC) != manifest["num_examples"]:
        raise ValueError(
            f"{cache_dir}: shards hold {len(logits_NxC)} rows, the manifest says "
            f"{manifest['num_examples']}"
        )
    return logits_NxC
