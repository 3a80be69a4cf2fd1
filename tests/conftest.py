"""Shared test setup: 8 fake CPU devices (set before JAX starts) and the shared data folder.

Every test run sees 8 devices, so sharded code paths are exercised on a laptop CPU. Tests that
need real data use the ``data_dir`` fixture: it fails (never skips) with a message naming the
folder when ``../shared/data`` is missing, so a CI run cannot pass without having read it.
"""

import os

# 8 fake devices; and a generous collective timeout, because on 2 loaded cores (pytest -n 2 plus
# subprocess runs) an all-reduce over 8 fake devices can wait past XLA's 40 s default and abort.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8"
    + " --xla_cpu_collective_call_terminate_timeout_seconds=900"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests never download: a missing GLUE file or release name must fail fast here, even on a CI
# machine with internet (tests that exercise downloads serve files from localhost and reset it).
os.environ.setdefault("BERT_MINI_OFFLINE", "1")
# Runs cache their compiled steps in their own workdir (tests/test_compile_cache.py), never in a
# user-wide cache that would make one test run depend on an earlier one.
os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)

import pathlib  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

from bert_mini.paths import shared_data_dir  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def data_dir() -> pathlib.Path:
    """The shared data folder (``BERT_MINI_DATA`` or ``../shared/data``); fails if absent."""
    path = shared_data_dir()
    if not (path / "SOURCES.md").is_file():
        pytest.fail(
            f"shared data not found at {path} (expected {path / 'SOURCES.md'}); "
            "set BERT_MINI_DATA to the folder that holds glue/, imdb/, checkpoints/ and vocab/",
            pytrace=False,
        )
    return path


@pytest.fixture(scope="session")
def vocab_path(data_dir: pathlib.Path) -> pathlib.Path:
    return data_dir / "vocab" / "bert-base-uncased-vocab.txt"


@pytest.fixture(scope="session")
def minilm_dir(data_dir: pathlib.Path) -> pathlib.Path:
    return data_dir / "checkpoints" / "all-minilm-l6-v2"
