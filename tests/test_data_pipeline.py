"""Per-host batching, exact resume of the training stream, and padded evaluation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from bert_mini.data.pipeline import (
    HostShard,
    StreamPosition,
    TrainStream,
    epoch_batches,
    eval_batches,
    host_split,
    per_host_batch_size,
    to_global_arrays,
    trim_padding,
    with_teacher_logits,
)


def _examples(n: int, seq_len: int = 4) -> tf.data.Dataset:
    idx = np.arange(n, dtype=np.int32)
    ids = (idx[:, None] * 10 + np.arange(seq_len)[None]).astype(np.int32)
    return tf.data.Dataset.from_tensor_slices({"idx": idx, "input_ids": ids})


def _noise(batch, batch_index):
    """Stands in for masking: per-batch randomness keyed on the batch index."""
    seed = tf.stack([tf.constant(7, tf.int64), batch_index])
    noise = tf.random.stateless_uniform(
        [tf.shape(batch["idx"])[0]], seed, maxval=1000, dtype=tf.int32
    )
    return {**batch, "noise": noise}


def _stream(n: int, batch: int, seed: int, position=None) -> TrainStream:
    return TrainStream(
        lambda epoch, skip: epoch_batches(
            _examples(n), batch, seed=seed, epoch=epoch, skip_batches=skip, transform=_noise
        ),
        position,
    )


def _take(stream: TrainStream, count: int) -> list[dict[str, np.ndarray]]:
    return [next(stream) for _ in range(count)]


def test_training_order_is_deterministic_static_and_reshuffled_per_epoch():
    stream = _stream(n=50, batch=8, seed=1)
    batches = _take(stream, 12)  # 6 full batches per epoch (2 examples dropped)
    assert all(b["input_ids"].shape == (8, 4) for b in batches)
    assert stream.position == StreamPosition(epoch=1, batch_in_epoch=6)  # rolls over lazily
    epoch0 = np.concatenate([b["idx"] for b in batches[:6]])
    epoch1 = np.concatenate([b["idx"] for b in batches[6:]])
    assert len(set(epoch0)) == 48 and len(set(epoch1)) == 48
    assert not np.array_equal(epoch0, epoch1)
    again = _take(_stream(n=50, batch=8, seed=1), 12)
    for a, b in zip(batches, again, strict=True):
        np.testing.assert_array_equal(a["idx"], b["idx"])
        np.testing.assert_array_equal(a["noise"], b["noise"])
    other_seed = np.concatenate([b["idx"] for b in _take(_stream(n=50, batch=8, seed=2), 6)])
    assert not np.array_equal(epoch0, other_seed)


@pytest.mark.parametrize("stop_after", [1, 5, 6, 9, 12])
def test_resumed_stream_sees_exactly_the_batches_it_would_have(stop_after):
    uninterrupted = _take(_stream(n=50, batch=8, seed=3), 14)
    first = _stream(n=50, batch=8, seed=3)
    _take(first, stop_after)
    saved = first.position.to_dict()  # what a checkpoint stores
    resumed = _stream(n=50, batch=8, seed=3, position=StreamPosition.from_dict(saved))
    rest = _take(resumed, 14 - stop_after)
    for expected, got in zip(uninterrupted[stop_after:], rest, strict=True):
        np.testing.assert_array_equal(got["idx"], expected["idx"])
        np.testing.assert_array_equal(got["noise"], expected["noise"])


def test_epoch_smaller_than_a_batch_is_an_error():
    with pytest.raises(ValueError, match="fewer examples than one batch"):
        next(_stream(n=5, batch=8, seed=0))


def test_per_host_batch_size_and_host_split():
    assert per_host_batch_size(256, HostShard(1, 4)) == 64
    with pytest.raises(
        ValueError, match="global batch size 10 is not divisible by the 4 processes"
    ):
        per_host_batch_size(10, HostShard(0, 4))
    with pytest.raises(ValueError, match="host index 4"):
        HostShard(4, 4)
    assert host_split("train", HostShard(0, 1)) == "train"
    assert str(host_split("train", HostShard(1, 3))) != str(host_split("train", HostShard(2, 3)))


@pytest.mark.parametrize(
    "num_examples, hosts, batch", [(1003, 1, 64), (1003, 3, 8), (5, 8, 4), (872, 4, 32)]
)
def test_eval_counts_every_example_exactly_once(num_examples, hosts, batch):
    counts = np.zeros(num_examples, np.int64)
    batch_counts = set()
    for index in range(hosts):
        shard = HostShard(index, hosts)
        batches = list(eval_batches(_examples(num_examples), batch, shard).as_numpy_iterator())
        batch_counts.add(len(batches))
        for b in batches:
            assert b["input_ids"].shape == (batch, 4)
            np.add.at(counts, b["idx"][b["eval_mask"] == 1], 1)
            assert (b["input_ids"][b["eval_mask"] == 0] == 0).all()
    assert len(batch_counts) == 1, "every host must run the same number of eval steps"
    np.testing.assert_array_equal(counts, np.ones(num_examples))


def test_eval_over_8_fake_devices_counts_each_example_once():
    assert jax.device_count() == 8
    mesh = Mesh(np.array(jax.devices()), ("data",))
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    num_examples, global_batch = 1003, 64  # 1003 = 15 full batches + 43
    seen = jnp.zeros(num_examples, jnp.int32)

    @jax.jit
    def count(seen, batch):
        return seen.at[batch["idx"]].add(batch["eval_mask"])

    batches = eval_batches(_examples(num_examples), global_batch, HostShard.current())
    for batch in batches.as_numpy_iterator():
        arrays = to_global_arrays(batch, sharding)
        assert len(arrays["idx"].sharding.device_set) == 8
        seen = count(seen, arrays)
    np.testing.assert_array_equal(np.asarray(seen), np.ones(num_examples))


def test_teacher_logits_attach_by_index():
    logits = np.random.default_rng(0).normal(size=(20, 3)).astype(np.float32)
    examples = with_teacher_logits(_examples(20).shuffle(20, seed=1), logits)
    for example in examples.as_numpy_iterator():
        np.testing.assert_array_equal(example["teacher_logits"], logits[example["idx"]])


def test_each_host_reads_a_disjoint_slice_of_a_tfds_split(data_dir, tmp_path_factory):
    from bert_mini.data.glue import load_glue

    tfds_dir = tmp_path_factory.mktemp("tfds")
    seen = []
    for index in range(3):
        split = host_split("validation", HostShard(index, 3))
        rows = list(load_glue("sst2", split, source_dir=data_dir / "glue", tfds_dir=tfds_dir))
        assert 280 <= len(rows) <= 300
        seen.extend(int(row["idx"]) for row in rows)
    assert sorted(seen) == list(range(872))


def test_trim_padding_cuts_to_the_longest_row_rounded_up():
    lengths = np.array([3, 17, 5, 9])
    mask = (np.arange(64)[None] < lengths[:, None]).astype(np.int32)
    batch = {
        "input_ids": mask * 7,
        "token_type_ids": mask * 0,
        "attention_mask": mask,
        "label": np.arange(4),
    }
    out = {
        k: v.numpy()
        for k, v in trim_padding({k: tf.constant(v) for k, v in batch.items()}, 16).items()
    }
    assert out["input_ids"].shape == (4, 32) and out["attention_mask"].sum() == lengths.sum()
    np.testing.assert_array_equal(out["label"], np.arange(4))
    short = trim_padding({k: tf.constant(v) for k, v in batch.items()}, 128)
    assert short["input_ids"].shape == (4, 64)  # never wider than the input
