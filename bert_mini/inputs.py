"""Training and evaluation inputs for a config: which data, tokenised how, batched how.

The training loop asks for two things: an endless, resumable ``TrainStream`` of per-host numpy
batches, and a function that yields this host's padded evaluation batches. Both are built here
from ``config.data`` and the ``bert_mini.data`` modules, so ``train.py`` never touches files.

- ``pretrain``: packed (or next-sentence) examples cut from corpus files, cached on disk,
  masked dynamically per batch; evaluation on a held-out corpus with fixed masks.
- ``finetune``: a GLUE task's train split; evaluation on its dev split.
- ``distill``: a transfer set (or the task's train text) with the teacher's cached logits joined
  by ``idx``, or the teacher run in the step; evaluation on the task's dev split.
- ``squad`` (finetune or distill): span windows, see ``bert_mini/squad_inputs.py``.

Many hosts: every host holds the (tokenised, in-memory) examples, builds each *global* batch
(shuffle, masking, padding trim) and keeps only its own rows (``_host_rows``). So the global
batch, its masks and its padded width do not depend on how many processes share it: 2 processes
x 4 devices train exactly like 1 x 8, and a checkpoint resumes under any process count. Shared
caches (TFDS builds, pre-training examples) are written by process 0 before the others read.
"""

import dataclasses
import glob
import pathlib
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import numpy as np
import tensorflow as tf
from ml_collections import ConfigDict

from bert_mini.data import glue, masking, pretraining, transfer
from bert_mini.data.pipeline import (
    BatchTransform,
    HostShard,
    StreamPosition,
    TrainStream,
    epoch_batches,
    eval_batches,
    per_host_batch_size,
    trim_padding,
)
from bert_mini.data.sources import DataError
from bert_mini.paths import shared_data_dir
from bert_mini.tokenization import BertTokenizer

T = TypeVar("T")


@dataclasses.dataclass
class Inputs:
    """What the loop consumes; ``eval_batches()`` starts a fresh pass over the dev set."""

    train: TrainStream
    eval_batches: Callable[[], Iterator[dict[str, np.ndarray]]] | None
    num_train_examples: int
    eval_examples: list[dict[str, Any]] | None = None  # SQuAD: raw dev rows, for host-side EM/F1
    # Span tasks (SQuAD): the eval windows' start/end logits [N, S], in order -> EM/F1.
    score_spans: Callable[[np.ndarray, np.ndarray], dict[str, float]] | None = None


def _data_dir(config: ConfigDict) -> pathlib.Path:
    return pathlib.Path(config.data.data_dir) if config.data.data_dir else shared_data_dir()


def _files(patterns: str, root: pathlib.Path) -> list[pathlib.Path]:
    paths: list[pathlib.Path] = []
    for pattern in patterns.split(","):
        full = pattern if pathlib.Path(pattern).is_absolute() else str(root / pattern)
        matched = sorted(glob.glob(full))
        if not matched:
            raise DataError(f"config.data: no file matches {full!r}")
        paths += [pathlib.Path(p) for p in matched]
    return paths


def _stream(
    arrays: dict[str, np.ndarray],
    per_host_batch: int,
    config: ConfigDict,
    shard: HostShard,
    position: StreamPosition | None,
    transform_for_epoch: Callable[[int], BatchTransform] | None = None,
) -> TrainStream:
    """This host's rows of the global batches of ``arrays`` as a resumable stream;
    ``transform_for_epoch(epoch)`` gives the per-batch transform (masking) of that epoch."""
    examples = tf.data.Dataset.from_tensor_slices(arrays)

    def make_epoch(epoch: int, skip: int) -> tf.data.Dataset:
        batches = epoch_batches(
            examples,
            per_host_batch * shard.count,
            seed=config.seed,
            epoch=epoch,
            skip_batches=skip,
            transform=None if transform_for_epoch is None else transform_for_epoch(epoch),
        )
        return _host_rows(batches, shard, per_host_batch)

    return TrainStream(make_epoch, position)


def _eval_pass(
    arrays: dict[str, np.ndarray], per_host_batch: int, shard: HostShard
) -> Callable[[], Iterator[dict[str, np.ndarray]]]:
    examples = tf.data.Dataset.from_tensor_slices(arrays)
    num_examples = len(next(iter(arrays.values())))
    global_batches = eval_batches(examples, per_host_batch * shard.count, HostShard(), num_examples)
    batches = _host_rows(global_batches, shard, per_host_batch)
    return lambda: batches.as_numpy_iterator()


def _host_rows(batches: tf.data.Dataset, shard: HostShard, per_host_batch: int) -> tf.data.Dataset:
    """Rows ``[index * per_host, (index + 1) * per_host)`` of every global batch: this host's
    part, in the order ``sharding.global_batch`` puts them back together."""
    if shard.count == 1:
        return batches
    start, stop = shard.index * per_host_batch, (shard.index + 1) * per_host_batch
    return batches.map(lambda batch: {key: value[start:stop] for key, value in batch.items()})


def _process_zero_first(shard: HostShard, build: Callable[[], T]) -> T:
    """``build()`` on process 0, then on the others: one writer for caches that hosts may share
    (a TFDS build, the pre-training examples), the rest read what it wrote."""
    if shard.count == 1:
        return build()
    from jax.experimental import multihost_utils

    result = build() if shard.index == 0 else None
    multihost_utils.sync_global_devices("bert_mini.inputs: caches written by process 0")
    return build() if shard.index != 0 else result


# ----------------------------------------------------------------------------- per mode


def glue_arrays(
    config: ConfigDict, tokenizer: BertTokenizer, split: str, max_examples: int = 0
) -> dict[str, np.ndarray]:
    """A GLUE split tokenised (``glue.encode_glue``); ``max_examples`` > 0 keeps its first rows.

    The split is read in large batches and only the kept rows are read and tokenised: reading
    SST-2's 67k training rows one at a time took ~30 s, longer than a ``runlocal`` run's steps.
    """
    dataset = glue.load_glue(
        config.data.task,
        split,
        source_dir=_data_dir(config) / "glue",
        tfds_dir=config.data.tfds_dir or None,
    )
    if max_examples:
        dataset = dataset.take(max_examples)
    return glue.encode_glue(dataset, config.data.task, tokenizer, config.data.max_seq_length)


def _pretraining_arrays(
    config: ConfigDict, tokenizer: BertTokenizer, patterns: str
) -> dict[str, np.ndarray]:
    cache_dir = pathlib.Path(config.data.cache_dir or pathlib.Path(config.workdir) / "cache")
    examples = pretraining.cached_pretraining_examples(
        _files(patterns, _data_dir(config)),
        tokenizer,
        cache_dir,
        max_seq_length=config.data.max_seq_length,
        next_sentence=config.data.next_sentence,
        seed=config.seed,
    )
    if config.data.max_examples:
        examples = {key: value[: config.data.max_examples] for key, value in examples.items()}
    return examples


def transfer_examples(config: ConfigDict) -> list[transfer.TransferExample]:
    """The transfer set D_T named by ``config.data.transfer``, deduplicated against the task's
    dev and test text; an empty D_T is an error (nothing to distil on)."""
    root = _data_dir(config)
    task = config.data.task
    sources: list[transfer.Source] = [transfer.GlueSource(glue.glue_task(task).folder)]
    if config.data.transfer == "movie_sst2":
        sources.insert(0, transfer.ImdbSource())
    elif config.data.transfer != "task_train_text":
        raise ValueError(
            f"config.data.transfer: unknown transfer set {config.data.transfer!r}; "
            "choose 'task_train_text' or 'movie_sst2'"
        )
    examples, counts = transfer.build_from_specs(
        sources,
        root,
        dedup_task=glue.glue_task(task).folder,
        max_examples=config.data.max_examples or None,
    )
    if not examples:
        read = {name: c.as_dict() for name, c in counts.items()}
        raise DataError(
            f"config.data.transfer={config.data.transfer!r}: the transfer set is empty after "
            f"length filtering and deduplication against {task} dev/test ({read})"
        )
    return examples


def transfer_arrays(
    config: ConfigDict, tokenizer: BertTokenizer, examples: list[transfer.TransferExample]
) -> dict[str, np.ndarray]:
    """D_T tokenised, with ``idx`` (the row number) so cached teacher logits can be joined."""
    texts = [example.text for example in examples]
    pairs = [example.text_b for example in examples] if examples and examples[0].text_b else None
    arrays = tokenizer(texts, pairs, max_length=config.data.max_seq_length)
    arrays["idx"] = np.arange(len(texts), dtype=np.int32)
    return arrays


def make_inputs(
    config: ConfigDict,
    tokenizer: BertTokenizer,
    shard: HostShard,
    position: StreamPosition | None = None,
    teacher_logits: np.ndarray | None = None,
) -> Inputs:
    """The training stream (resumed at ``position``) and the evaluation passes of a config."""
    train_batch = per_host_batch_size(config.train.global_batch_size, shard)
    eval_batch = per_host_batch_size(config.eval.global_batch_size, shard)
    mode = config.mode
    if mode == "pretrain":
        masker = masking.MaskingConfig.from_tokenizer(
            tokenizer,
            max_predictions=config.data.max_predictions_per_seq,
            whole_word=config.data.whole_word_masking,
        )
        train_arrays = _process_zero_first(
            shard, lambda: _pretraining_arrays(config, tokenizer, config.data.train_files)
        )

        def masking_for_epoch(epoch: int) -> BatchTransform:
            return lambda batch, index: masker(  # the global batch: same masks on any hosts
                batch, seed=config.seed, epoch=epoch, batch_index=index
            )

        stream = _stream(train_arrays, train_batch, config, shard, position, masking_for_epoch)
        eval_fn = None
        if config.data.eval_files:
            eval_arrays = _process_zero_first(
                shard, lambda: _pretraining_arrays(config, tokenizer, config.data.eval_files)
            )
            if config.data.max_eval_examples:
                eval_arrays = {
                    k: v[: config.data.max_eval_examples] for k, v in eval_arrays.items()
                }
            eval_fn = _masked_eval_pass(eval_arrays, eval_batch, shard, masker, config.seed)
        return Inputs(stream, eval_fn, len(train_arrays["input_ids"]))

    if mode not in ("finetune", "distill"):
        raise ValueError(f"config.mode: unknown mode {mode!r}; choose pretrain, finetune, distill")
    if config.data.task == "squad":  # span windows: bert_mini/squad_inputs.py
        from bert_mini import squad_inputs  # imports this module

        return squad_inputs.make_squad_inputs(config, tokenizer, shard, position, teacher_logits)
    eval_arrays = _process_zero_first(shard, lambda: glue_arrays(config, tokenizer, "validation"))
    eval_fn = _eval_pass(eval_arrays, eval_batch, shard)
    if mode == "finetune":
        train_arrays = _process_zero_first(
            shard, lambda: glue_arrays(config, tokenizer, "train", config.data.max_examples)
        )
    else:
        examples = _process_zero_first(shard, lambda: transfer_examples(config))
        train_arrays = transfer_arrays(config, tokenizer, examples)
        if teacher_logits is not None:
            if len(teacher_logits) != len(train_arrays["idx"]):
                raise ValueError(
                    f"cached teacher logits cover {len(teacher_logits)} examples, the transfer "
                    f"set has {len(train_arrays['idx'])}"
                )
            train_arrays["teacher_logits"] = teacher_logits.astype(np.float32)
    trim = None
    if config.data.trim_multiple:
        multiple = config.data.trim_multiple
        trim = lambda epoch: lambda batch, index: trim_padding(batch, multiple)  # noqa: E731
    stream = _stream(train_arrays, train_batch, config, shard, position, trim)
    return Inputs(stream, eval_fn, len(train_arrays["input_ids"]))


def _masked_eval_pass(
    arrays: dict[str, np.ndarray],
    per_host_batch: int,
    shard: HostShard,
    masker: masking.MaskingConfig,
    seed: int,
) -> Callable[[], Iterator[dict[str, np.ndarray]]]:
    """Held-out MLM batches with masks fixed once (epoch 0), so every evaluation is comparable."""
    examples = tf.data.Dataset.from_tensor_slices(arrays)
    num_examples = len(arrays["input_ids"])
    global_batches = (
        eval_batches(examples, per_host_batch * shard.count, HostShard(), num_examples)
        .enumerate()
        .map(lambda index, batch: masker(batch, seed=seed + 1, epoch=0, batch_index=index))
    )
    batches = _host_rows(global_batches, shard, per_host_batch).cache()
    return lambda: batches.as_numpy_iterator()
