"""Evaluation metrics on the host: GLUE (accuracy, F1, MCC, Pearson/Spearman), SQuAD EM/F1,
and running ``(sum, denominator)`` sums from training steps.

These run over predictions accumulated for a whole eval split (numpy), after the jitted steps;
corpus-level metrics (F1, MCC, correlations) cannot be averaged over batches, which is why they
are not computed in the step. Conventions follow the GLUE/Hugging Face ``evaluate`` scripts:
GLUE values are fractions (accuracy 0.91, MCC in [-1, 1]); SQuAD values are percentages, as the
official v1.1 script prints them. A metric that is undefined on degenerate input (MCC or a
correlation of a constant prediction) is 0.0, so a collapsed model scores 0 and best-checkpoint
selection never compares NaNs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from bert_mini.data.squad import exact_match, f1_score

__all__ = [
    "GLUE_MAIN_METRIC",
    "GLUE_METRICS",
    "MetricSums",
    "accuracy",
    "f1_binary",
    "glue_metrics",
    "is_finite",
    "matthews_corrcoef",
    "pearson",
    "spearman",
    "squad_metrics",
]

# What each GLUE task reports (GLUE paper, Table 1); the "_and_" entries are the averages the
# leaderboard uses as the task score.
GLUE_METRICS: dict[str, tuple[str, ...]] = {
    "cola": ("mcc",),
    "sst2": ("accuracy",),
    "mrpc": ("accuracy", "f1", "accuracy_and_f1"),
    "qqp": ("accuracy", "f1", "accuracy_and_f1"),
    "stsb": ("pearson", "spearman", "pearson_and_spearman"),
    "mnli": ("accuracy",),
    "mnli_matched": ("accuracy",),
    "mnli_mismatched": ("accuracy",),
    "qnli": ("accuracy",),
    "rte": ("accuracy",),
    "wnli": ("accuracy",),
    "ax": ("mcc",),
}

# The number BERT / Turc et al. tables print per task (MRPC and QQP: F1; STS-B: Spearman), used
# to pick the best checkpoint or hyper-parameters.
GLUE_MAIN_METRIC: dict[str, str] = {
    "cola": "mcc",
    "mrpc": "f1",
    "qqp": "f1",
    "stsb": "spearman",
    "ax": "mcc",
    **{t: "accuracy" for t in ("sst2", "mnli", "mnli_matched", "mnli_mismatched", "qnli")},
    **{t: "accuracy" for t in ("rte", "wnli")},
}


def _1d(values: Any, name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim == 2 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D (or [N, 1]), got shape {array.shape}")
    return array


def _pair(pred: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    pred, labels = _1d(pred, "predictions"), _1d(labels, "labels")
    if pred.shape != labels.shape:
        raise ValueError(f"predictions ({pred.shape[0]}) and labels ({labels.shape[0]}) differ")
    if pred.size == 0:
        raise ValueError("no examples to score")
    return pred, labels


def accuracy(pred: Any, labels: Any, weights: Any = None) -> float:
    """Fraction of predicted class ids equal to the labels; ``weights`` 0 drops padded rows."""
    pred, labels = _pair(pred, labels)
    w = np.ones(pred.shape, np.float64) if weights is None else _1d(weights, "weights")
    total = w.sum()
    if total <= 0:
        raise ValueError("accuracy: all weights are 0, nothing to score")
    return float(((pred == labels) * w).sum() / total)


def f1_binary(pred: Any, labels: Any) -> float:
    """F1 of the positive class 1: 2TP / (2TP + FP + FN); 0.0 when there are no positives."""
    pred, labels = _pair(pred, labels)
    tp = np.sum((pred == 1) & (labels == 1))
    fp = np.sum((pred == 1) & (labels != 1))
    fn = np.sum((pred != 1) & (labels == 1))
    denominator = 2 * tp + fp + fn
    return float(2 * tp / denominator) if denominator else 0.0


def matthews_corrcoef(pred: Any, labels: Any) -> float:
    """Matthews correlation (multi-class form, Gorodkin 2004; equals the binary formula).

    0.0 when undefined (all predictions or all labels one class), as sklearn returns.
    """
    pred, labels = _pair(pred, labels)
    classes, encoded = np.unique(np.concatenate([labels, pred]), return_inverse=True)
    n_classes = len(classes)
    true_idx, pred_idx = encoded[: len(labels)], encoded[len(labels) :]
    confusion = np.zeros((n_classes, n_classes), np.float64)
    np.add.at(confusion, (true_idx, pred_idx), 1.0)
    t_k, p_k = confusion.sum(axis=1), confusion.sum(axis=0)
    correct, n = np.trace(confusion), confusion.sum()
    numerator = correct * n - np.dot(t_k, p_k)
    denominator = math.sqrt((n * n - np.dot(p_k, p_k)) * (n * n - np.dot(t_k, t_k)))
    return float(numerator / denominator) if denominator else 0.0


def _correlation(fn: Any, x: Any, y: Any) -> float:
    x, y = _pair(x, y)
    x, y = x.astype(np.float64), y.astype(np.float64)
    if x.size < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return 0.0  # undefined for constant input; see the module docstring
    return float(fn(x, y)[0])


def pearson(x: Any, y: Any) -> float:
    """Pearson's r (STS-B)."""
    return _correlation(stats.pearsonr, x, y)


def spearman(x: Any, y: Any) -> float:
    """Spearman's rank correlation, ties averaged (STS-B)."""
    return _correlation(stats.spearmanr, x, y)


def _task_name(task: str) -> str:
    key = task.removeprefix("glue/").lower().replace("-", "")
    aliases = {"sst": "sst2", "sts": "stsb", "mnlim": "mnli_matched", "mnlimm": "mnli_mismatched"}
    key = aliases.get(key, key)
    if key not in GLUE_METRICS:
        raise ValueError(f"unknown GLUE task {task!r}; known: {', '.join(GLUE_METRICS)}")
    return key


def glue_metrics(task: str, predictions: Any, labels: Any, weights: Any = None) -> dict[str, float]:
    """The task's GLUE metrics (``GLUE_METRICS[task]``) over a whole eval split.

    ``predictions``: logits [N, C] (argmax is taken) or class ids [N] for classification tasks;
    scores [N] or [N, 1] for STS-B. Rows with ``weights == 0`` (eval padding) are dropped first.
    """
    name = _task_name(task)
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if weights is not None:
        keep = _1d(weights, "weights") > 0
        if keep.shape[0] != predictions.shape[0]:
            raise ValueError(f"weights ({keep.shape[0]}) and predictions differ in length")
        predictions, labels = predictions[keep], labels[keep]
    if name == "stsb":
        scores = _1d(predictions, "stsb predictions").astype(np.float64)
        r, rho = pearson(scores, labels), spearman(scores, labels)
        return {"pearson": r, "spearman": rho, "pearson_and_spearman": (r + rho) / 2}
    if predictions.ndim == 2 and predictions.shape[1] > 1:
        pred_ids = predictions.argmax(axis=-1)
    elif np.issubdtype(predictions.dtype, np.integer):
        pred_ids = _1d(predictions, "predictions")
    else:
        raise ValueError(
            f"{name}: predictions must be logits [N, C] or integer class ids [N], "
            f"got {predictions.dtype} of shape {predictions.shape}"
        )
    out: dict[str, float] = {}
    for metric in GLUE_METRICS[name]:
        if metric == "accuracy":
            out[metric] = accuracy(pred_ids, labels)
        elif metric == "f1":
            out[metric] = f1_binary(pred_ids, labels)
        elif metric == "mcc":
            out[metric] = matthews_corrcoef(pred_ids, labels)
        elif metric == "accuracy_and_f1":
            out[metric] = (out["accuracy"] + out["f1"]) / 2
    return out


# ----------------------------------------------------------------------------- SQuAD


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _answer_texts(answers: Any) -> list[str]:
    """Answer strings from ``{"text": [...]}`` (TFDS / JSON reader), a list of dicts or strings."""
    if isinstance(answers, Mapping):
        answers = answers["text"]
    if isinstance(answers, str | bytes):
        return [_text(answers)]
    return [_text(a["text"] if isinstance(a, Mapping) else a) for a in answers]


def _gold_answers(examples: Any) -> dict[str, list[str]]:
    if isinstance(examples, Mapping):  # id -> answers
        return {_text(k): _answer_texts(v) for k, v in examples.items()}
    gold = {}
    for example in examples:
        if isinstance(example, tuple) and len(example) == 2:  # (id, example) from read_squad_json
            example = example[1]
        gold[_text(example["id"])] = _answer_texts(example["answers"])
    return gold


def squad_metrics(
    predicted_texts: Mapping[str, str], examples: Mapping[str, Any] | Iterable[Any]
) -> dict[str, float]:
    """Official SQuAD v1.1 EM and F1 in percent: max over each question's gold answers, averaged
    over all questions. A question without a prediction scores 0 (as the official script).

    ``examples``: an ``{id: answers}`` mapping, or examples with ``id`` and ``answers`` (the
    TFDS / ``read_squad_json`` layout, str or bytes). A prediction for an id that is not among
    the examples is a ValueError: it means predictions and examples were not built together.
    """
    gold = _gold_answers(examples)
    if not gold:
        raise ValueError("squad_metrics: no examples to score")
    predictions = {_text(k): _text(v) for k, v in predicted_texts.items()}
    unknown = sorted(set(predictions) - set(gold))
    if unknown:
        raise ValueError(
            f"squad_metrics: {len(unknown)} prediction id(s) not among the examples, "
            f"e.g. {unknown[:3]}"
        )
    em = f1 = 0.0
    for qid, answers in gold.items():
        if qid in predictions:
            em += exact_match(predictions[qid], answers)
            f1 += f1_score(predictions[qid], answers)
    return {"exact_match": 100.0 * em / len(gold), "f1": 100.0 * f1 / len(gold)}


# ----------------------------------------------------------------------------- running sums


class MetricSums:
    """Running ``{name: (sum, denominator)}`` totals from training or eval steps.

    ``add`` keeps device arrays as they are (adding jax arrays dispatches asynchronously), so the
    host blocks only in ``means``/``sums``, at log time.
    """

    def __init__(self, metrics: Mapping[str, Sequence[Any]] | None = None):
        self._totals: dict[str, list[Any]] = {}
        if metrics is not None:
            self.add(metrics)

    def add(self, metrics: Mapping[str, Sequence[Any]]) -> MetricSums:
        """Adds one step's ``{name: (sum, denominator)}``; returns self for chaining."""
        for name, pair in metrics.items():
            if len(pair) != 2:
                raise ValueError(f"metric {name!r} must be a (sum, denominator) pair, got {pair!r}")
            total, denominator = pair
            if name in self._totals:
                self._totals[name][0] = self._totals[name][0] + total
                self._totals[name][1] = self._totals[name][1] + denominator
            else:
                self._totals[name] = [total, denominator]
        return self

    def merge(self, other: MetricSums) -> MetricSums:
        """Adds another accumulator's totals into this one (e.g. per-host or per-split sums)."""
        return self.add({name: tuple(pair) for name, pair in other._totals.items()})

    def sums(self) -> dict[str, tuple[float, float]]:
        """Totals as Python floats (arrays, e.g. per-device, are summed)."""
        return {
            name: (float(np.sum(np.asarray(s))), float(np.sum(np.asarray(d))))
            for name, (s, d) in self._totals.items()
        }

    def means(self) -> dict[str, float]:
        """``sum / denominator`` per metric; NaN where nothing was counted."""
        return {name: (s / d if d else math.nan) for name, (s, d) in self.sums().items()}

    def reset(self) -> None:
        self._totals.clear()

    def __len__(self) -> int:
        return len(self._totals)

    def __repr__(self) -> str:
        return f"MetricSums({self.sums()})"


def is_finite(value: Any) -> bool:
    """True when every number in ``value`` (scalar, array, dict or any pytree) is finite."""
    for leaf in jax.tree.leaves(value):
        array = np.asarray(leaf)
        if not np.issubdtype(array.dtype, np.inexact) and jnp.issubdtype(
            array.dtype, jnp.floating
        ):  # bfloat16 & co. (ml_dtypes) are not numpy floats
            array = array.astype(np.float32)
        if np.issubdtype(array.dtype, np.inexact) and not np.all(np.isfinite(array)):
            return False
    return True
