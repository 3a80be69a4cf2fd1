"""Batching for one or many hosts: per-host slices, exact resume, padded evaluation.

- **Per host.** Each process reads only its own slice (``tfds.even_splits`` for TFDS splits,
  ``Dataset.shard`` for anything else) and builds batches of ``global_batch / process_count``.
- **Deterministic and resumable.** Training order is a pure function of ``(seed, epoch)``: each
  epoch is shuffled with its own seed and batched with ``drop_remainder`` (static shapes). The
  stream's position is two integers, ``(epoch, batch_in_epoch)``, saved with the checkpoint; a
  resumed stream rebuilds that epoch and skips the batches already seen *before* any per-batch
  work (masking), so it yields exactly the batches the uninterrupted run would have.
- **Evaluation drops nothing and counts nothing twice.** The last batch is padded to full size
  and every batch carries ``eval_mask`` (1 for a real example). Hosts whose slice is shorter get
  all-padding batches, so every process runs the same number of steps.
"""

import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

Batch = dict[str, np.ndarray]
BatchTransform = Callable[[dict[str, tf.Tensor], tf.Tensor], dict[str, tf.Tensor]]


@dataclasses.dataclass(frozen=True)
class HostShard:
    """Which slice of the data this process reads."""

    index: int = 0
    count: int = 1

    @classmethod
    def current(cls) -> "HostShard":
        return cls(jax.process_index(), jax.process_count())

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise ValueError(f"host index {self.index} is not in [0, {self.count})")


def per_host_batch_size(global_batch_size: int, shard: HostShard) -> int:
    """``global / process_count``; an error when the global batch does not split evenly."""
    if global_batch_size % shard.count:
        raise ValueError(
            f"global batch size {global_batch_size} is not divisible by the {shard.count} processes"
        )
    return global_batch_size // shard.count


def host_split(split: str, shard: HostShard, drop_remainder: bool = False) -> Any:
    """This host's TFDS read instruction for ``split`` (contiguous, near-equal slices)."""
    if shard.count == 1:
        return split
    return tfds.even_splits(split, n=shard.count, drop_remainder=drop_remainder)[shard.index]


def epoch_seed(seed: int, epoch: int) -> int:
    """A distinct, reproducible shuffle seed per epoch."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


@dataclasses.dataclass
class StreamPosition:
    """Where a training stream is: save it with the checkpoint, pass it back to resume."""

    epoch: int = 0
    batch_in_epoch: int = 0

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, int]) -> "StreamPosition":
        return cls(int(values["epoch"]), int(values["batch_in_epoch"]))


def epoch_batches(
    examples: tf.data.Dataset,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    skip_batches: int = 0,
    shuffle_buffer: int | None = None,
    transform: BatchTransform | None = None,
) -> tf.data.Dataset:
    """One epoch of shuffled, static-shape batches; ``transform(batch, batch_index)`` runs last.

    The shuffle order depends only on ``(seed, epoch)``; ``skip_batches`` drops batches before
    ``transform`` so resuming costs reading, not masking.
    """
    if shuffle_buffer is None:
        cardinality = int(examples.cardinality())
        shuffle_buffer = cardinality if cardinality > 0 else 100_000
    batches = (
        examples.shuffle(
            max(shuffle_buffer, 1), seed=epoch_seed(seed, epoch), reshuffle_each_iteration=False
        )
        .batch(batch_size, drop_remainder=True)
        .enumerate()
        .skip(skip_batches)
    )
    if transform is None:
        batches = batches.map(lambda index, batch: batch)
    else:
        batches = batches.map(
            lambda index, batch: transform(batch, index),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
    return batches.prefetch(tf.data.AUTOTUNE)


class TrainStream:
    """An endless, resumable iterator of numpy training batches.

    ``make_epoch(epoch, skip_batches)`` returns that epoch's batches (e.g. ``epoch_batches``).
    ``position`` is updated after every batch handed out.
    """

    def __init__(
        self,
        make_epoch: Callable[[int, int], tf.data.Dataset],
        position: StreamPosition | None = None,
    ):
        self.make_epoch = make_epoch
        self.position = dataclasses.replace(position) if position else StreamPosition()
        self._iterator: Iterator[Batch] | None = None

    def __iter__(self) -> "TrainStream":
        return self

    def __next__(self) -> Batch:
        for _ in range(2):  # at most one epoch boundary per call
            if self._iterator is None:
                epoch = self.make_epoch(self.position.epoch, self.position.batch_in_epoch)
                self._iterator = iter(tfds.as_numpy(epoch))
            try:
                batch = next(self._iterator)
            except StopIteration:
                if self.position.batch_in_epoch == 0:
                    raise ValueError(
                        "an epoch yielded no batch: fewer examples than one batch"
                    ) from None
                self.position = StreamPosition(self.position.epoch + 1, 0)
                self._iterator = None
                continue
            self.position.batch_in_epoch += 1
            return batch
        raise AssertionError("unreachable")


def eval_batches(
    examples: tf.data.Dataset,
    batch_size: int,
    shard: HostShard,
    num_examples: int | None = None,
) -> tf.data.Dataset:
    """This host's evaluation batches: all examples exactly once, padded, with ``eval_mask``.

    ``examples`` is the whole split; this host takes every ``shard.count``-th example. Every
    host yields the same number of batches (``ceil(ceil(N / hosts) / batch)``), padding with
    zeros where its slice runs out.
    """
    if num_examples is None:
        num_examples = int(examples.cardinality())
        if num_examples < 0:
            raise ValueError("pass num_examples: the dataset's size is unknown")
    batches_per_host = max(1, math.ceil(math.ceil(num_examples / shard.count) / batch_size))
    local = examples.shard(shard.count, shard.index).map(
        lambda example: {**example, "eval_mask": tf.constant(1, tf.int32)}
    )
    padding = tf.data.Dataset.from_tensors(
        tf.nest.map_structure(_blank, local.element_spec)
    ).repeat()
    padded = local.concatenate(padding)
    return padded.take(batches_per_host * batch_size).batch(batch_size, drop_remainder=True)


def trim_padding(batch: dict[str, tf.Tensor], multiple: int) -> dict[str, tf.Tensor]:
    """Cuts the padding columns of a batch down to the longest row, rounded up to ``multiple``.

    Fine-tuning text is mostly short (SST-2 train averages ~13 tokens): padding every batch to
    ``max_seq_length`` wastes most of the compute. Rounding keeps the number of distinct shapes
    (hence of jit compilations) at ``max_seq_length / multiple``. Deterministic, so resume stays
    exact. Only [B, S] token features are cut.
    """
    mask = batch["attention_mask"]
    seq_len = tf.shape(mask)[1]
    longest = tf.reduce_max(tf.reduce_sum(tf.cast(mask, tf.int32), axis=1))
    width = tf.minimum(seq_len, (longest + multiple - 1) // multiple * multiple)
    token_features = ("input_ids", "token_type_ids", "attention_mask")
    return {
        name: value[:, :width] if name in token_features else value for name, value in batch.items()
    }


def _blank(spec: tf.TensorSpec) -> tf.Tensor:
    """An all-zero (or empty-string) example slot; eval examples need static shapes."""
    if not spec.shape.is_fully_defined():
        raise ValueError(f"eval examples need static shapes, got {spec}")
    if spec.dtype == tf.string:
        return tf.fill(spec.shape, "")
    return tf.zeros(spec.shape, spec.dtype)


def with_teacher_logits(examples: tf.data.Dataset, logits_NxC: np.ndarray) -> tf.data.Dataset:
    """Adds the cached teacher logits of each example (looked up by its ``idx``)."""
    table = tf.constant(logits_NxC, dtype=tf.float32)
    return examples.map(
        lambda example: {**example, "teacher_logits": tf.gather(table, example["idx"])}
    )


def to_global_arrays(batch: Batch, sharding: jax.sharding.Sharding) -> dict[str, jax.Array]:
    """Per-process numpy batch -> global ``jax.Array``s laid out by ``sharding``."""
    return {
        name: jax.make_array_from_process_local_data(sharding, value)
        for name, value in batch.items()
    }
