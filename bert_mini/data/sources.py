"""Shared plumbing for bert_mini's TFDS builders: local source folders, offline builds, errors.

Every builder reads local files (``manual_dir``) and never needs the network: GCS lookups are off
and a missing file is a ``DataError`` that names the file it expected and how to get it.
Prepared datasets go to ``tfds_dir`` (default ``~/tensorflow_datasets``, or ``$TFDS_DATA_DIR``).
"""

import os
import pathlib
from typing import Any

import tensorflow_datasets as tfds

from bert_mini.paths import shared_data_dir


class DataError(ValueError):
    """Bad or missing input data; the message names the file (and line) at fault."""


def default_tfds_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")).expanduser()


def require_file(path: pathlib.Path, how_to_get: str) -> pathlib.Path:
    """``path`` if it is a file, else a DataError naming it and how to get it."""
    if not path.is_file():
        raise DataError(f"expected data file not found: {path} ({how_to_get})")
    return path


def prepare(
    builder_cls: type[tfds.core.DatasetBuilder],
    source_dir: str | os.PathLike | None = None,
    tfds_dir: str | os.PathLike | None = None,
    **builder_kwargs: Any,
) -> tfds.core.DatasetBuilder:
    """Builds (once) and returns a bert_mini TFDS builder from local files, offline.

    ``source_dir`` is the folder of raw files (defaults to the builder's ``DEFAULT_SOURCE``
    under ``../shared/data``). A finished build in ``tfds_dir`` is reused.
    """
    if source_dir is None:
        source_dir = shared_data_dir() / builder_cls.DEFAULT_SOURCE
    builder = builder_cls(data_dir=str(tfds_dir or default_tfds_dir()), **builder_kwargs)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            manual_dir=str(source_dir), try_download_gcs=False
        )
    )
    return builder
