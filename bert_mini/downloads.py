"""Named checkpoints and GLUE tasks: downloaded once into a local cache, checked, reused offline.

Names (local paths always win: an existing file or folder is returned untouched, never fetched).
Google's BERT release, uncased models only:

- ``uncased_L-{L}_H-{H}_A-{H/64}``: the release's own folder names. The 24 compact models
  (L in 2..12 even, H in 128/256/512/768) come from the 2020_02_20 release;
  ``uncased_L-24_H-1024_A-16`` is BERT-Large (2018_10_18).
- ``google:<size>``: any size-table name of ``config_lib`` (``google:L-4_H-256``,
  ``google:mini``, ``google:uncased_L-4_H-256_A-4``). ``google:base`` and ``google:large`` are the
  original 2018 BERT-Base/Large, the paper's teachers.
- ``bert-base-uncased``, ``bert-large-uncased``: the original 2018 models too.

``L-12_H-768`` by size is the 2020 grid member, which Google re-trained with the compact models;
``base`` is the 2018 original: the same shape, different weights, cached apart.

Checksums. Google publishes no checksums for these zips and none is known here for certain, so
integrity works as TFDS's does for URLs without registered checksums (trust on first use): the
first download records the zip's size and sha256 in ``CACHE/checksums.tsv``, keyed by release
file (``2020_02_20/uncased_L-4_H-256_A-4.zip``), so a mirror (``BERT_MINI_RELEASE_URL``) is held
to the same record. Every later download of that file and every re-extraction of the cached zip is
checked against the record; a line placed there before the first download (from a source you
trust) is enforced the same way. An extracted folder carries ``.bert_mini_files.tsv`` (its files
and sizes), checked on every use (sizes only: hashing 1.3 GB per load is too slow); a folder that
no longer matches it is re-extracted from the verified zip, without network.

Atomicity: a download goes to a hidden ``.partial-*`` file renamed into place only when complete
and verified; extraction goes to a hidden ``.partial-*`` folder renamed into place after its file
list is written. A killed process leaves only hidden leftovers, never a folder that looks
complete. Offline (or with ``BERT_MINI_OFFLINE=1``), the error is one line naming the URL and the
exact file to place where.

Cache: ``$BERT_MINI_CACHE`` or ``~/.cache/bert_mini``. Layout: ``checksums.tsv``,
``downloads/<date>/<folder>.zip`` (kept, so a damaged folder can be restored offline) and
``bert_models/<date>/<folder>/``.

GLUE: ``glue_tfds`` loads the TFDS catalog builder ``glue/<task>`` (TFDS downloads once into its
data dir and checks its own registered checksums), for tasks whose TSVs are not staged locally.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import logging
import os
import pathlib
import re
import shutil
import tempfile
import time
import urllib.error
import urllib.request
from typing import IO, TYPE_CHECKING, Any

from bert_mini import config_lib

if TYPE_CHECKING:
    import tensorflow as tf

__all__ = [
    "ChecksumError",
    "DownloadError",
    "GoogleRelease",
    "NAME_SCHEME",
    "default_cache_dir",
    "glue_tfds",
    "google_release",
    "google_release_url",
    "resolve_checkpoint",
]

log = logging.getLogger("bert_mini")

DEFAULT_RELEASE_URL = "https://storage.googleapis.com/bert_models"
RELEASE_URL_ENV = "BERT_MINI_RELEASE_URL"
CACHE_ENV = "BERT_MINI_CACHE"
OFFLINE_ENV = "BERT_MINI_OFFLINE"
CHECKSUMS_FILE = "checksums.tsv"
MANIFEST_FILE = ".bert_mini_files.tsv"

COMPACT_RELEASE = "2020_02_20"
ORIGINAL_RELEASE = "2018_10_18"
NAME_SCHEME = (
    "names are uncased_L-<L>_H-<H>_A-<H/64> (L in 2,4,...,12; H in 128,256,512,768) or "
    "uncased_L-24_H-1024_A-16, google:<size> (google:L-4_H-256, google:tiny|mini|small|medium|"
    "base|large), bert-base-uncased or bert-large-uncased; or give an existing local path"
)

_ORIGINAL_ALIASES = {"bert-base-uncased": "base", "bert-large-uncased": "large"}
_ORIGINAL_NICKNAMES = ("base", "large")
_RELEASE_FOLDER_RE = re.compile(r"uncased_L-\d+_H-\d+_A-\d+")
_TIMEOUT_S = 60.0
_PROBE_TIMEOUT_S = 15.0
_CHUNK = 1 << 20
_PROGRESS_EVERY_S = 10.0


class DownloadError(OSError):
    """A named file could not be fetched; the message says which file to place where."""


class ChecksumError(DownloadError):
    """A download or cached file does not match its recorded size and sha256."""


# ----------------------------------------------------------------------------- names


@dataclasses.dataclass(frozen=True)
class GoogleRelease:
    """One zip of Google's BERT release: its date folder and its model folder name."""

    date: str
    folder: str

    @property
    def key(self) -> str:
        """The zip's path under the release URL; also its key in ``checksums.tsv``."""
        return f"{self.date}/{self.folder}.zip"


def _folder_name(variant: str) -> str:
    dims = config_lib.SIZES[variant]
    return f"uncased_{variant}_A-{dims['num_attention_heads']}"


def google_release(name: str) -> GoogleRelease:
    """The release zip a name stands for (scheme in the module docstring); ValueError if none."""
    text = name.strip()
    lowered = text.lower()
    original = False
    if lowered in _ORIGINAL_ALIASES:
        size, original = _ORIGINAL_ALIASES[lowered], True
    elif lowered.startswith("google:"):
        size = text[len("google:") :]
        nickname = size.lower().removeprefix("bert-").removeprefix("bert_")
        original = nickname in _ORIGINAL_NICKNAMES
    elif _RELEASE_FOLDER_RE.fullmatch(text):
        size = text
    else:
        raise ValueError(f"unknown checkpoint name {name!r}; {NAME_SCHEME}")
    if "/" in size or re.search(r"(?<!un)cased", size.lower()):
        raise ValueError(f"unknown checkpoint name {name!r} (only uncased models); {NAME_SCHEME}")
    try:
        variant = config_lib.canonical_variant(size)
    except ValueError as e:
        raise ValueError(f"unknown checkpoint name {name!r}: {e}; {NAME_SCHEME}") from None
    if variant == "L-24_H-1024":
        original = True  # BERT-Large exists only in the 2018 release
    return GoogleRelease(ORIGINAL_RELEASE if original else COMPACT_RELEASE, _folder_name(variant))


def _release_base_url(base_url: str | None) -> str:
    return (base_url or os.environ.get(RELEASE_URL_ENV) or DEFAULT_RELEASE_URL).rstrip("/")


def google_release_url(name: str | GoogleRelease, base_url: str | None = None) -> str:
    """The zip URL of a release name; ``base_url`` (or ``$BERT_MINI_RELEASE_URL``) is a mirror."""
    release = name if isinstance(name, GoogleRelease) else google_release(name)
    return f"{_release_base_url(base_url)}/{release.key}"


# ----------------------------------------------------------------------------- checksums


def _read_checksums(path: pathlib.Path) -> dict[str, tuple[int, str]]:
    """``{release file: (size, sha256)}`` from ``checksums.tsv`` (TFDS-like, tab-separated)."""
    if not path.is_file():
        return {}
    records: dict[str, tuple[int, str]] = {}
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.split("\t")
        if (
            len(fields) != 3
            or not fields[1].isdigit()
            or not re.fullmatch(r"[0-9a-f]{64}", fields[2])
        ):
            raise ChecksumError(
                f"{path}:{line_no}: expected 'release file<TAB>size<TAB>sha256', got {line!r}"
            )
        record = (int(fields[1]), fields[2])
        if records.setdefault(fields[0], record) != record:
            raise ChecksumError(f"{path}:{line_no}: second, different record for {fields[0]}")
    return records


def _record_checksum(path: pathlib.Path, key: str, size: int, sha256: str) -> None:
    """Appends one record; a single short append is atomic enough for concurrent writers."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(f"{key}\t{size}\t{sha256}\n")


def _file_digest(path: pathlib.Path) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def _check_record(
    what: str, got: tuple[int, str], key: str, checksums: pathlib.Path, fix: str
) -> bool:
    """True if a record exists and matches, False if none exists; ChecksumError on mismatch."""
    expected = _read_checksums(checksums).get(key)
    if expected is None:
        return False
    if expected != got:
        raise ChecksumError(
            f"{what} has size {got[0]} sha256 {got[1]}, but {checksums} records {key} as size "
            f"{expected[0]} sha256 {expected[1]}; {fix}"
        )
    return True


# ----------------------------------------------------------------------------- download


def _offline() -> bool:
    return os.environ.get(OFFLINE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _one_line(error: BaseException | str, limit: int = 300) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _progress_logger(url: str, total: int | None):
    """A callback that logs bytes, rate and ETA at most every few seconds (big zips are 1.2 GB)."""
    start = last = time.monotonic()

    def update(done: int) -> None:
        nonlocal last
        now = time.monotonic()
        if now - last < _PROGRESS_EVERY_S:
            return
        last = now
        rate = done / max(now - start, 1e-9)
        of = f"/{total / 2**20:.0f}" if total else ""
        eta = f", ETA {(total - done) / max(rate, 1e-9):.0f} s" if total else ""
        log.info(
            "downloading %s: %.0f%s MiB, %.1f MiB/s%s", url, done / 2**20, of, rate / 2**20, eta
        )

    return update


def _stream(url: str, out: IO[bytes]) -> tuple[int, str]:
    """Copies ``url`` into ``out``; (size, sha256). A short body is an error, never a file."""
    digest = hashlib.sha256()
    size = 0
    with urllib.request.urlopen(url, timeout=_TIMEOUT_S) as response:
        header = response.headers.get("Content-Length")
        total = int(header) if header and header.isdigit() else None
        progress = _progress_logger(url, total)
        while chunk := response.read(_CHUNK):
            out.write(chunk)
            digest.update(chunk)
            size += len(chunk)
            progress(size)
    if total is not None and size != total:
        raise DownloadError(f"connection closed after {size} of {total} bytes")
    return size, digest.hexdigest()


def _placement_error(url: str, zip_path: pathlib.Path, target: pathlib.Path, reason: str):
    return DownloadError(
        f"could not download {url} ({reason}); nothing was cached. Download it by hand and put "
        f"it at {zip_path}, or unzip it so that {target / 'bert_config.json'} exists"
    )


def _fetch(
    url: str, key: str, zip_path: pathlib.Path, target: pathlib.Path, checksums: pathlib.Path
) -> None:
    """Downloads into a hidden temp file, verifies or records it, then renames it into place."""
    if _offline():
        raise _placement_error(url, zip_path, target, f"{OFFLINE_ENV} is set")
    zip_path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{zip_path.name}.partial-", dir=zip_path.parent)
    partial = pathlib.Path(name)
    try:
        log.info("downloading %s", url)
        try:
            with os.fdopen(fd, "wb") as out:
                got = _stream(url, out)
        except (OSError, http.client.HTTPException) as e:
            raise _placement_error(url, zip_path, target, _one_line(e)) from None
        fix = "the file changed upstream or was corrupted in transit; nothing was cached"
        recorded = _check_record(f"download of {url}", got, key, checksums, fix)
        os.replace(partial, zip_path)
    finally:
        partial.unlink(missing_ok=True)
    if not recorded:
        _record_checksum(checksums, key, *got)
        log.info("recorded %s size %d sha256 %s in %s", key, got[0], got[1], checksums)


def _verify_cached_zip(zip_path: pathlib.Path, key: str, checksums: pathlib.Path) -> None:
    """Checks a cached (or hand-placed) zip against its record; records one it has no record of."""
    got = _file_digest(zip_path)
    fix = (
        "the cached zip is corrupt or was replaced: delete it to download again (and the record, "
        "only if you trust the new file)"
    )
    if not _check_record(str(zip_path), got, key, checksums, fix):
        _record_checksum(checksums, key, *got)
        log.info("recorded %s size %d sha256 %s (zip found in the cache)", key, *got)


# ----------------------------------------------------------------------------- extraction


def _manifest(root: pathlib.Path) -> list[tuple[str, int]]:
    return sorted(
        (p.relative_to(root).as_posix(), p.stat().st_size)
        for p in root.rglob("*")
        if p.is_file() and p.name != MANIFEST_FILE
    )


def _folder_problem(folder: pathlib.Path) -> str | None:
    """Why an extracted folder cannot be used as is, or None if it matches its file list.

    A folder without a file list was unzipped by hand (as the offline error asks): it is taken
    as is when it holds ``bert_config.json``.
    """
    manifest = folder / MANIFEST_FILE
    if not manifest.is_file():
        return None if (folder / "bert_config.json").is_file() else "no bert_config.json"
    for line in manifest.read_text(encoding="utf-8").splitlines():
        relative, _, size = line.rpartition("\t")
        path = folder / relative
        if not path.is_file():
            return f"{relative} is missing"
        if str(path.stat().st_size) != size:
            return f"{relative} has size {path.stat().st_size}, expected {size}"
    return None


def _checkpoint_root(scratch: pathlib.Path, zip_path: pathlib.Path) -> pathlib.Path:
    """The extracted folder holding ``bert_config.json``: the zip's top (2020 release) or its
    single top folder (2018 release)."""
    if (scratch / "bert_config.json").is_file():
        return scratch
    found = [p.parent for p in scratch.glob("*/bert_config.json")]
    if len(found) != 1:
        raise DownloadError(
            f"{zip_path}: no bert_config.json at the top of the zip or in one top folder "
            "(not a Google BERT release zip)"
        )
    return found[0]


def _move_into_place(new: pathlib.Path, target: pathlib.Path) -> None:
    """Renames ``new`` to ``target``; an old ``target`` is replaced only after ``new`` is whole."""
    if target.exists():
        retired = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        target.rename(retired / target.name)
        try:
            new.rename(target)
        except OSError:
            (retired / target.name).rename(target)
            raise
        shutil.rmtree(retired, ignore_errors=True)
        return
    try:
        new.rename(target)
    except OSError:
        if _folder_problem(target) is not None:  # not a concurrent winner's complete copy
            raise


def _extract(zip_path: pathlib.Path, target: pathlib.Path) -> None:
    """Unzips into a hidden scratch folder, writes its file list, then renames it into place."""
    import zipfile

    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        try:
            with zipfile.ZipFile(zip_path) as archive:
                archive.extractall(scratch)  # zipfile drops absolute and '..' member paths
        except zipfile.BadZipFile as e:
            message = f"{zip_path}: not a valid zip ({e}); delete it to download again"
            raise ChecksumError(message) from None
        root = _checkpoint_root(scratch, zip_path)
        lines = [f"{name}\t{size}" for name, size in _manifest(root)]
        (root / MANIFEST_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")
        _move_into_place(root, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# ----------------------------------------------------------------------------- checkpoints


def default_cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get(CACHE_ENV) or "~/.cache/bert_mini").expanduser()


def resolve_if_release(path_or_name: str | os.PathLike) -> pathlib.Path:
    """``resolve_checkpoint`` for release names; anything else is returned as a path unchanged.

    For callers that read the path themselves: a Google TF checkpoint prefix
    (``.../bert_model.ckpt``) is no file, yet readable, and its reader names what is missing.
    """
    path = pathlib.Path(path_or_name)
    if path.exists():
        return path
    try:
        google_release(os.fspath(path_or_name))
    except ValueError:
        return path
    return resolve_checkpoint(path_or_name)


def resolve_checkpoint(
    name_or_path: str | os.PathLike,
    cache_dir: str | os.PathLike | None = None,
    *,
    base_url: str | None = None,
    refresh: bool = False,
) -> pathlib.Path:
    """A local checkpoint folder for a path or a Google release name (see module docstring).

    An existing path is returned as given. A name is downloaded and extracted once into
    ``cache_dir``; later calls only check the folder's file list. ``refresh=True`` re-verifies
    the cached zip against ``checksums.tsv`` and re-extracts it, replacing the folder only if
    all checks pass.
    """
    path = pathlib.Path(name_or_path)
    if path.exists():
        return path
    try:
        release = google_release(os.fspath(name_or_path))
    except ValueError as e:
        raise FileNotFoundError(
            f"checkpoint not found: {os.fspath(name_or_path)} is neither an existing path nor a "
            f"release name ({e})"
        ) from None
    cache = pathlib.Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    target = cache / "bert_models" / release.date / release.folder
    zip_path = cache / "downloads" / release.date / f"{release.folder}.zip"
    checksums = cache / CHECKSUMS_FILE
    if target.is_dir() and not refresh:
        problem = _folder_problem(target)
        if problem is None:
            return target
        log.warning("%s: %s; extracting it again from %s", target, problem, zip_path)
    if zip_path.is_file():
        _verify_cached_zip(zip_path, release.key, checksums)
    else:
        _fetch(google_release_url(release, base_url), release.key, zip_path, target, checksums)
    _extract(zip_path, target)
    return target


# ----------------------------------------------------------------------------- GLUE


def _probe(url: str) -> None:
    """Fails fast when offline: TFDS retries a dead connection for minutes before giving up."""
    if not url.startswith(("http://", "https://")):
        return
    try:
        request = urllib.request.Request(url, method="HEAD")
        with urllib.request.urlopen(request, timeout=_PROBE_TIMEOUT_S):
            pass
    except urllib.error.HTTPError:
        return  # the server answered; TFDS reports whatever is wrong with the file itself


def glue_tfds(
    task: str,
    split: Any,
    tfds_dir: str | os.PathLike | None = None,
    *,
    source_dir: str | os.PathLike | None = None,
) -> tf.data.Dataset:
    """A GLUE split from the TFDS catalog builder ``glue/<task>``, downloaded once into tfds_dir.

    The catalog's features and split names are those of ``glue.BertMiniGlue``, so this stands in
    for local TSVs that are not staged (MNLI, QQP, QNLI train). If the download fails, the
    ``DataError`` names the local TSVs to place under ``source_dir`` (default
    ``../shared/data/glue``) instead.
    """
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core.download.download_manager import NonMatchingChecksumError

    from bert_mini.data import glue
    from bert_mini.data.sources import DataError, default_tfds_dir
    from bert_mini.paths import shared_data_dir

    spec = glue.glue_task(task)
    names = glue._check_split(spec, split) or list(spec.splits)  # before any download
    data_dir = pathlib.Path(tfds_dir) if tfds_dir else default_tfds_dir()
    builder = tfds.builder(f"glue/{spec.name}", data_dir=os.fspath(data_dir))
    if not builder.is_prepared():
        url = getattr(builder.builder_config, "data_url", "") or f"the glue/{spec.name} files"
        try:
            if _offline():
                raise DownloadError(f"{OFFLINE_ENV} is set")
            _probe(url)
            builder.download_and_prepare()
        except (OSError, tfds.download.DownloadError, NonMatchingChecksumError) as e:
            source = pathlib.Path(source_dir) if source_dir else shared_data_dir() / "glue"
            files = ", ".join(str(source / spec.folder / spec.splits[n]) for n in names)
            raise DataError(
                f"glue/{spec.name} {split}: could not download the TFDS catalog copy ({url}: "
                f"{_one_line(e)}); place {files} instead: {glue.how_to_get(spec)}"
            ) from None
    return builder.as_dataset(split=split, shuffle_files=False)
