"""The persistent compilation cache: where it lives, that a run reuses it, and repair of entries."""

import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import bert_mini
from bert_mini import compile_cache, train
from bert_mini.paths import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT))
from configs import finetune_glue  # noqa: E402

HITS = "/jax/compilation_cache/cache_hits"
WRITES = "/jax/compilation_cache/cache_misses"  # JAX records it when it writes a new entry


@pytest.fixture
def cache_every_compile():
    """Caches compiles of any length (the default skips those under 1 s) for this test only."""
    previous = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    yield
    jax.config.update("jax_persistent_cache_min_compile_time_secs", previous)


@pytest.fixture
def cache_events():
    """The persistent-cache events (HITS, WRITES) JAX records while the test runs, in order."""
    events: list[str] = []

    def listen(event: str, **kwargs) -> None:
        if event in (HITS, WRITES):
            events.append(event)

    jax.monitoring.register_event_listener(listen)
    yield events
    jax.monitoring.unregister_event_listener(listen)


def test_cache_dir_defaults_to_the_env_then_the_workdir(tmp_path, monkeypatch):
    workdir = tmp_path / "run"
    monkeypatch.delenv(compile_cache.ENV_VAR, raising=False)
    assert compile_cache.cache_dir("", workdir) == workdir / "compile_cache"
    monkeypatch.setenv(compile_cache.ENV_VAR, str(tmp_path / "user_cache"))
    assert compile_cache.cache_dir("", workdir) == tmp_path / "user_cache"
    assert compile_cache.cache_dir(str(tmp_path / "mine"), workdir) == tmp_path / "mine"
    assert compile_cache.cache_dir("off", workdir) is None


def _entries(directory: pathlib.Path) -> list[pathlib.Path]:
    return sorted(directory.glob(compile_cache.ENTRY_GLOB))


def test_cut_short_entries_are_dropped_and_good_ones_kept(tmp_path, cache_every_compile):
    directory = tmp_path / "cache"
    with compile_cache.persistent_cache(directory):
        jax.jit(lambda x: jnp.sin(x) * 3.0)(jnp.arange(8.0)).block_until_ready()
        jax.jit(lambda x: jnp.cos(x) + 2.0)(jnp.arange(8.0)).block_until_ready()
    cut, *good = _entries(directory)
    assert good, "two programs were compiled"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])  # as a SIGKILL mid-write leaves it
    old = time.time() - 2 * compile_cache.SETTLED_AFTER_S
    for entry in (cut, *good):
        os.utime(entry, (old, old))
    assert compile_cache.drop_unreadable_entries(directory) == [cut]
    assert _entries(directory) == good

    fresh = directory / "jit_other-0123-cache"  # may still be being written by another process
    fresh.write_bytes(b"partial")
    assert compile_cache.drop_unreadable_entries(directory) == []
    assert fresh.exists()


def _tiny_finetune(data_dir: pathlib.Path, tmp_path: pathlib.Path, cache: str):
    config = finetune_glue.get_config("task=sst2,variant=tiny,runlocal")
    config.data.data_dir = str(data_dir)
    config.data.tfds_dir = str(tmp_path / "tfds")
    config.data.max_seq_length = 32
    config.train.num_train_steps = 2
    config.eval.every_steps = 2
    config.checkpoint.every_steps = 2
    config.compile_cache_dir = cache
    return config


def test_a_second_run_loads_its_compiled_steps_from_the_cache(
    tmp_path, data_dir, cache_every_compile, cache_events
):
    before = jax.config.jax_compilation_cache_dir
    cache = tmp_path / "cache"
    first = train.train_and_evaluate(_tiny_finetune(data_dir, tmp_path, str(cache)), tmp_path / "a")
    assert jax.config.jax_compilation_cache_dir == before, "the run must restore JAX's setting"
    names = {entry.name.split("-")[0] for entry in _entries(cache)}
    assert {"jit_finetune_step", "jit_eval_step", "jit_create_train_state"} <= names, names
    assert WRITES in cache_events and HITS not in cache_events

    cache_events.clear()
    second = train.train_and_evaluate(
        _tiny_finetune(data_dir, tmp_path, str(cache)), tmp_path / "b"
    )
    # Programs this process already holds in memory are not looked up again; every other one
    # (the steps: new closures, so new jit objects) must come from the cache, none compiled anew.
    assert HITS in cache_events and WRITES not in cache_events, cache_events
    assert second["final"] == first["final"]
    first_params = _final_params(tmp_path / "a")
    second_params = _final_params(tmp_path / "b")
    assert len(first_params) == len(second_params)
    for want, got in zip(first_params, second_params, strict=True):
        np.testing.assert_array_equal(got, want)  # bitwise: the cached program is the same


def _final_params(workdir: pathlib.Path) -> list[np.ndarray]:
    model, _ = bert_mini.from_pretrained(workdir / "final", head="auto")
    return [np.asarray(leaf) for leaf in jax.tree.leaves(nnx.state(model, nnx.Param))]


def test_off_writes_no_cache(tmp_path, data_dir, cache_every_compile, cache_events):
    train.train_and_evaluate(_tiny_finetune(data_dir, tmp_path, "off"), tmp_path / "run")
    assert not (tmp_path / "run" / "compile_cache").exists()
    assert not cache_events
