"""SQuAD v1.1 for the training loop and the PD pipeline: windows in, answer texts and EM/F1 out.

``inputs.make_inputs`` hands ``task == "squad"`` to :func:`make_squad_inputs`:

- ``finetune``: windows of ``config.data.train_split`` labelled with the first answer's start/end
  positions (run_squad.py's windows, ``bert_mini.data.squad``);
- ``distill``: the transfer set D_T = the same train-split questions+contexts as windows, without
  answers. Cached teacher span logits are one ``[N, 2*S]`` row per window (start logits, then end
  logits), so the generic ``teacher_logits`` cache stores them unchanged; each batch splits them
  back into ``teacher_start_logits``/``teacher_end_logits`` ``[B, S]`` for ``steps.distill_step``;
- evaluation: windows of ``config.data.eval_split``; the loop gathers start/end logits of every
  window and :func:`best_spans` turns them into one answer text per question (n-best start/end
  tokens, ``max_answer_length``, max-context windows as in run_squad.py), scored with the official
  normalisation.

EM/F1 are reported as *fractions* (``squad_metrics`` / 100), like every GLUE metric of this
package, so the loop's best-checkpoint choice, the pipeline report and ``bert_mini.report``
(which print ``100 * value``) are right for SQuAD unchanged.
"""

import dataclasses
import json
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from flax import nnx
from ml_collections import ConfigDict

from bert_mini import inputs, metrics
from bert_mini import teacher_logits as logits_cache
from bert_mini.data import squad
from bert_mini.data.pipeline import (
    BatchTransform,
    HostShard,
    StreamPosition,
    per_host_batch_size,
    trim_padding,
)
from bert_mini.data.sources import DataError, require_file
from bert_mini.tokenization import BertTokenizer

TASK = "squad"
N_BEST = 20  # run_squad.py's n_best_size
MAX_ANSWER_LENGTH = 30  # run_squad.py's max_answer_length (tokens)
TOKEN_FEATURES = ("input_ids", "token_type_ids", "attention_mask")


# ----------------------------------------------------------------------------- examples, windows


def _decode(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def read_examples(config: ConfigDict, split: str, max_examples: int = 0) -> list[dict[str, Any]]:
    """SQuAD records of a TFDS split string (``validation[:50%]``) as plain str/int dicts;
    ``max_examples`` > 0 keeps the first questions of the split."""
    dataset = squad.load_squad(
        split,
        source_dir=inputs._data_dir(config) / "squad",
        tfds_dir=config.data.tfds_dir or None,
    )
    if max_examples:
        dataset = dataset.take(max_examples)
    examples = []
    for batch in tfds.as_numpy(dataset.ragged_batch(4096)):  # ~5x faster than one by one
        texts = batch["answers"]["text"].to_list()
        starts = batch["answers"]["answer_start"].to_list()
        for i in range(len(batch["id"])):
            example = {
                key: _decode(batch[key][i]) for key in ("id", "title", "context", "question")
            }
            example["answers"] = {
                "text": [_decode(t) for t in texts[i]],
                "answer_start": [int(s) for s in starts[i]],
            }
            examples.append(example)
    if not examples:
        raise DataError(f"config.data: SQuAD split {split!r} holds no questions")
    return examples


def squad_windows(
    config: ConfigDict,
    tokenizer: BertTokenizer,
    split: str,
    *,
    training: bool,
    max_examples: int = 0,
) -> tuple[squad.SquadFeatures, list[dict[str, Any]]]:
    """The split's windows (labelled with start/end positions when ``training``) and records."""
    examples = read_examples(config, split, max_examples)
    features = squad.make_squad_windows(
        examples,
        tokenizer,
        max_seq_length=config.data.max_seq_length,
        doc_stride=config.data.doc_stride,
        max_query_length=config.data.max_query_length,
        training=training,
    )
    return features, examples


def transfer_windows(
    config: ConfigDict, tokenizer: BertTokenizer
) -> tuple[squad.SquadFeatures, list[dict[str, Any]]]:
    """D_T for span distillation: the train split's questions+contexts as windows, no answers
    (the paper distils on unlabelled inputs); labels are kept only for a hard-label mix."""
    if config.data.transfer != "task_train_text":
        raise ValueError(
            f"config.data.transfer: {config.data.transfer!r} is not available for squad; use "
            "'task_train_text' (the train split's questions and contexts)"
        )
    return squad_windows(
        config,
        tokenizer,
        config.data.train_split,
        training=bool(config.distill.hard_label_weight),
        max_examples=config.data.max_examples,
    )


def transfer_settings(config: ConfigDict, examples: Sequence[Mapping[str, Any]], n: int) -> dict:
    """What the cached teacher logits depend on besides the teacher (for the cache manifest)."""
    return {
        "split": config.data.train_split,
        "max_examples": config.data.max_examples,
        "max_seq_length": config.data.max_seq_length,
        "doc_stride": config.data.doc_stride,
        "max_query_length": config.data.max_query_length,
        "num_examples": n,
        "texts": logits_cache.fingerprint([(e["question"], e["context"]) for e in examples]),
    }


def check_splits(config: ConfigDict) -> None:
    """The train and eval splits' JSON files exist (a missing train-v1.1.json fails in seconds,
    not after the student's pre-training)."""
    root = inputs._data_dir(config) / "squad"
    for split in (config.data.train_split, config.data.eval_split):
        for name in squad._split_names(split):
            filename = squad.SPLIT_FILES[name]
            require_file(root / filename, squad._how_to_get(filename, root))


# ----------------------------------------------------------------------------- teacher logits


def join_span_logits(start_NxS: np.ndarray, end_NxS: np.ndarray) -> np.ndarray:
    """``[N, 2*S]``: start logits then end logits, one row per window (the cache's layout)."""
    return np.concatenate([start_NxS, end_NxS], axis=-1).astype(np.float32)


def split_span_logits(logits_Nx2S: Any) -> tuple[Any, Any]:
    """Inverse of :func:`join_span_logits` (numpy or tf)."""
    width = logits_Nx2S.shape[-1]
    if width % 2:
        raise ValueError(f"span logits must have 2*S columns (start, end); got {width}")
    half = width // 2
    return logits_Nx2S[..., :half], logits_Nx2S[..., half:]


def make_span_predictor(
    model: Any, batch_size: int, multiple: int = 64
) -> Callable[[Mapping[str, np.ndarray]], np.ndarray]:
    """A function from windows' arrays to the model's ``[N, 2*S]`` span logits, in their order;
    compiled once per predictor (the cache calls it once per shard).

    Batches are bucketed by length and cut to the longest row, rounded up to ``multiple`` (most
    windows are full, so few widths, hence few compilations, lose little). Positions outside the
    attention mask get ``MISSING_LOGIT`` (probability ~0), so the cached teacher distribution
    never depends on how a batch happened to be padded.
    """
    graphdef, params = nnx.split(model)

    @jax.jit
    def forward(params, ids_BxS, types_BxS, mask_BxS):
        output = nnx.merge(graphdef, params)(ids_BxS, types_BxS, mask_BxS, deterministic=True)
        return output.start_logits.astype(jnp.float32), output.end_logits.astype(jnp.float32)

    def predict(arrays: Mapping[str, np.ndarray]) -> np.ndarray:
        mask_NxS = np.asarray(arrays["attention_mask"])
        n, seq = mask_NxS.shape
        out_Nx2xS = np.full((n, 2, seq), logits_cache.MISSING_LOGIT, np.float32)
        lengths_N = mask_NxS.sum(axis=1)
        order = np.argsort(lengths_N, kind="stable")
        for i in range(0, n, batch_size):
            rows = order[i : i + batch_size]
            width = min(seq, -(-max(int(lengths_N[rows].max()), 1) // multiple) * multiple)
            padded = np.pad(rows, (0, batch_size - len(rows)), mode="edge")
            start, end = forward(params, *(arrays[k][padded, :width] for k in TOKEN_FEATURES))
            out_Nx2xS[rows, 0, :width] = np.asarray(start)[: len(rows)]
            out_Nx2xS[rows, 1, :width] = np.asarray(end)[: len(rows)]
        out_Nx2xS = np.where(mask_NxS[:, None, :] == 1, out_Nx2xS, logits_cache.MISSING_LOGIT)
        return join_span_logits(out_Nx2xS[:, 0], out_Nx2xS[:, 1])

    return predict


def predict_span_logits(
    model: Any, arrays: Mapping[str, np.ndarray], batch_size: int
) -> np.ndarray:
    """``make_span_predictor(model, batch_size)(arrays)``: one pass."""
    return make_span_predictor(model, batch_size)(arrays)


# ----------------------------------------------------------------------------- decoding, metrics


def best_spans(
    features: squad.SquadFeatures,
    start_logits_NxS: np.ndarray,
    end_logits_NxS: np.ndarray,
    n_best: int = N_BEST,
    max_answer_length: int = MAX_ANSWER_LENGTH,
) -> dict[str, str]:
    """One answer text per question: the highest ``start + end`` logit pair over its windows.

    As run_squad.py: start and end among each window's ``n_best`` highest logits, end >= start,
    at most ``max_answer_length`` tokens, the start token in the window where it has the most
    context. One difference: the n-best are taken among context tokens only (run_squad.py takes
    them over all positions and then drops non-context ones, which can only lose candidates), so
    the answer never depends on logits at [CLS], question or padding positions. A question with
    no valid span gets "" (scored 0).
    """
    start_NxS = np.asarray(start_logits_NxS, np.float32)
    end_NxS = np.asarray(end_logits_NxS, np.float32)
    if start_NxS.shape != end_NxS.shape or start_NxS.shape[0] != len(features):
        raise ValueError(
            f"span logits {start_NxS.shape} / {end_NxS.shape} do not match the "
            f"{len(features)} windows of the evaluation set"
        )
    if start_NxS.shape[1] != features.input_ids_NxS.shape[1]:
        raise ValueError(
            f"span logits cover {start_NxS.shape[1]} positions, windows have "
            f"{features.input_ids_NxS.shape[1]}"
        )
    is_context_NxS = np.array(
        [[offset is not None for offset in w.offset_mapping] for w in features.windows], bool
    ).reshape(start_NxS.shape)
    start_NxS = np.where(features.token_is_max_context_NxS, start_NxS, -np.inf)
    end_NxS = np.where(is_context_NxS, end_NxS, -np.inf)
    k = min(n_best, start_NxS.shape[1])
    starts_NxK = np.argsort(-start_NxS, axis=1, kind="stable")[:, :k]
    ends_NxK = np.argsort(-end_NxS, axis=1, kind="stable")[:, :k]
    start_scores = np.take_along_axis(start_NxS, starts_NxK, axis=1)
    end_scores = np.take_along_axis(end_NxS, ends_NxK, axis=1)
    scores_NxKxK = start_scores[:, :, None] + end_scores[:, None, :]
    length_NxKxK = ends_NxK[:, None, :] - starts_NxK[:, :, None] + 1
    valid = (length_NxKxK >= 1) & (length_NxKxK <= max_answer_length)
    scores_NxKK = np.where(valid, scores_NxKxK, -np.inf).reshape(len(features), -1)
    best_N = np.argmax(scores_NxKK, axis=1) if len(features) else np.zeros(0, int)
    best_score_N = scores_NxKK[np.arange(len(features)), best_N]

    chosen: dict[str, tuple[float, int, int, int]] = {}
    for row, window in enumerate(features.windows):
        chosen.setdefault(window.example_id, (-np.inf, -1, 0, 0))
        score = float(best_score_N[row])
        if np.isfinite(score) and score > chosen[window.example_id][0]:
            i, j = divmod(int(best_N[row]), k)
            chosen[window.example_id] = (score, row, int(starts_NxK[row, i]), int(ends_NxK[row, j]))
    return {
        qid: "" if row < 0 else squad.window_span_to_text(features.windows[row], start, end)
        for qid, (_, row, start, end) in chosen.items()
    }


def span_metrics(
    predictions: Mapping[str, str], examples: Sequence[Mapping[str, Any]]
) -> dict[str, float]:
    """Official SQuAD v1.1 EM/F1 as fractions (see the module docstring for why)."""
    percent = metrics.squad_metrics(predictions, examples)
    return {name: value / 100.0 for name, value in percent.items()}


def span_scorer(
    features: squad.SquadFeatures, examples: Sequence[Mapping[str, Any]]
) -> Callable[[np.ndarray, np.ndarray], dict[str, float]]:
    """What the training loop calls with the eval windows' gathered start/end logits."""
    return lambda start_NxS, end_NxS: span_metrics(
        best_spans(features, start_NxS, end_NxS), examples
    )


def write_predictions(predictions: Mapping[str, str], path: pathlib.Path) -> pathlib.Path:
    """``{question id: answer text}``: the official evaluate-v1.1.py's prediction file format."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(predictions), indent=1, ensure_ascii=False) + "\n")
    return path


# ----------------------------------------------------------------------------- training inputs


def span_batch_transform(multiple: int) -> BatchTransform:
    """Splits cached ``[B, 2*S]`` teacher logits into start/end ``[B, S]`` and trims padding
    columns of tokens and teacher logits together (the logits beyond the longest row are
    ``MISSING_LOGIT``, so trimming them changes no probability)."""

    def transform(batch: dict[str, tf.Tensor], index: Any) -> dict[str, tf.Tensor]:
        batch = dict(batch)
        if "teacher_logits" in batch:
            start, end = split_span_logits(batch.pop("teacher_logits"))
            batch["teacher_start_logits"], batch["teacher_end_logits"] = start, end
        if not multiple:
            return batch
        batch = trim_padding(batch, multiple)
        width = tf.shape(batch["input_ids"])[1]
        for name in ("teacher_start_logits", "teacher_end_logits"):
            if name in batch:
                batch[name] = batch[name][:, :width]
        return batch

    return transform


def _distill_arrays(
    config: ConfigDict,
    tokenizer: BertTokenizer,
    shard: HostShard,
    teacher_logits: np.ndarray | None,
) -> dict[str, np.ndarray]:
    features, _ = inputs._process_zero_first(shard, lambda: transfer_windows(config, tokenizer))
    arrays = features.arrays()
    if teacher_logits is not None:
        expected = (len(features), 2 * config.data.max_seq_length)
        if tuple(teacher_logits.shape) != expected:
            raise ValueError(
                f"config.distill.teacher_logits: cached teacher span logits are "
                f"{list(teacher_logits.shape)}, the transfer windows need {list(expected)} "
                "([windows, 2 * max_seq_length]: start logits then end logits)"
            )
        arrays["teacher_logits"] = teacher_logits.astype(np.float32)
    return arrays


def make_squad_inputs(
    config: ConfigDict,
    tokenizer: BertTokenizer,
    shard: HostShard,
    position: StreamPosition | None = None,
    teacher_logits: np.ndarray | None = None,
) -> inputs.Inputs:
    """The SQuAD training stream (fine-tuning or span distillation) and evaluation passes."""
    if config.model.head != "span":
        raise ValueError(
            f"config.model.head: squad needs the 'span' head, not {config.model.head!r}"
        )
    train_batch = per_host_batch_size(config.train.global_batch_size, shard)
    eval_batch = per_host_batch_size(config.eval.global_batch_size, shard)
    eval_features, eval_examples = inputs._process_zero_first(
        shard,
        lambda: squad_windows(  # labelled too, so the eval loss means something
            config,
            tokenizer,
            config.data.eval_split,
            training=True,
            max_examples=config.data.max_eval_examples,
        ),
    )
    eval_fn = inputs._eval_pass(eval_features.arrays(), eval_batch, shard)
    if config.mode == "finetune":
        features, _ = inputs._process_zero_first(
            shard,
            lambda: squad_windows(
                config,
                tokenizer,
                config.data.train_split,
                training=True,
                max_examples=config.data.max_examples,
            ),
        )
        train_arrays = features.arrays()
    else:
        train_arrays = _distill_arrays(config, tokenizer, shard, teacher_logits)
    transform = span_batch_transform(config.data.trim_multiple)
    stream = inputs._stream(
        train_arrays, train_batch, config, shard, position, lambda epoch: transform
    )
    return inputs.Inputs(
        stream,
        eval_fn,
        len(train_arrays["input_ids"]),
        eval_examples,
        span_scorer(eval_features, eval_examples),
    )


# ----------------------------------------------------------------------------- pipeline helpers


def pipeline_data_config(config: ConfigDict) -> ConfigDict:
    """The data settings the pipeline evaluates with: the distill stage's splits, stride and
    query length, the pipeline's data folders and ``pipeline.max_seq_length``."""
    data = ConfigDict(config.stage_distill.data.to_dict())
    data.data_dir = config.pipeline.data_dir
    data.tfds_dir = config.pipeline.tfds_dir
    data.max_seq_length = config.pipeline.max_seq_length
    return ConfigDict({"data": data.to_dict()})


@dataclasses.dataclass
class DevResult:
    metrics: dict[str, float]
    predictions: dict[str, str]


def dev_predictions(
    config: ConfigDict, model: Any, tokenizer: BertTokenizer, batch_size: int
) -> DevResult:
    """EM/F1 and answer texts of a span model on the eval split (``pipeline.max_seq_length``)."""
    data_config = pipeline_data_config(config)
    features, examples = squad_windows(
        data_config,
        tokenizer,
        data_config.data.eval_split,
        training=False,
        max_examples=data_config.data.max_eval_examples,
    )
    logits_Nx2S = predict_span_logits(model, features.arrays(), batch_size)
    predictions = best_spans(features, *split_span_logits(logits_Nx2S))
    return DevResult(span_metrics(predictions, examples), predictions)
