"""Training losses as ``(loss_sum, denominator)`` pairs, computed in float32.

Why sums and not means: a step's metrics can then be added across devices, micro-batches and log
intervals and divided once at log time, and padded examples (weight 0) drop out exactly instead
of diluting a mean. The step divides for its gradient with ``mean_loss`` (one place that guards
an all-padding batch).

Logits may arrive in bf16 (mixed-precision heads); everything is cast to float32 before the
log-softmax so the loss is the same whatever the compute dtype. Teacher logits in the
distillation losses go through ``stop_gradient``: the teacher is frozen (Turc et al., Sec. 3).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

__all__ = [
    "classification_accuracy",
    "classification_loss",
    "distill_regression_loss",
    "distillation_loss",
    "masked_lm_accuracy",
    "masked_lm_loss",
    "mean_loss",
    "next_sentence_loss",
    "regression_loss",
    "soft_cross_entropy",
    "soft_span_loss",
    "span_loss",
]

LossSum = tuple[jax.Array, jax.Array]  # (sum of per-example losses, sum of weights)


def _weights(weights: jax.Array | None, shape: tuple[int, ...]) -> jax.Array:
    """float32 weights of ``shape``; all ones when none are given (every example counts)."""
    if weights is None:
        return jnp.ones(shape, jnp.float32)
    return jnp.broadcast_to(jnp.asarray(weights, jnp.float32), shape)


def _weighted(per_example: jax.Array, weights: jax.Array | None) -> LossSum:
    w = _weights(weights, per_example.shape)
    return jnp.sum(per_example * w), jnp.sum(w)


def _hard_ce(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example cross-entropy against integer labels, in float32."""
    return optax.softmax_cross_entropy_with_integer_labels(
        jnp.asarray(logits, jnp.float32), jnp.asarray(labels, jnp.int32)
    )


def mean_loss(loss_sum: jax.Array, denominator: jax.Array) -> jax.Array:
    """``loss_sum / denominator``, 0 (not NaN) when the batch holds no real example."""
    return loss_sum / jnp.maximum(denominator, 1e-9)


# ----------------------------------------------------------------------------- pre-training


def masked_lm_loss(
    logits_BxPxV: jax.Array, masked_ids_BxP: jax.Array, masked_weights_BxP: jax.Array
) -> LossSum:
    """Cross-entropy summed over real masked predictions; padding slots have weight 0."""
    return _weighted(_hard_ce(logits_BxPxV, masked_ids_BxP), masked_weights_BxP)


def masked_lm_accuracy(
    logits_BxPxV: jax.Array, masked_ids_BxP: jax.Array, masked_weights_BxP: jax.Array
) -> LossSum:
    """(number of correctly predicted masked tokens, number of real masked tokens)."""
    correct_BxP = jnp.argmax(logits_BxPxV, axis=-1) == jnp.asarray(masked_ids_BxP)
    return _weighted(correct_BxP.astype(jnp.float32), masked_weights_BxP)


def next_sentence_loss(
    logits_Bx2: jax.Array, labels_B: jax.Array, weights_B: jax.Array | None = None
) -> LossSum:
    """NSP cross-entropy (label 0 = B follows A, Google's convention; any 2-class labels work)."""
    return _weighted(_hard_ce(logits_Bx2, labels_B), weights_B)


# ----------------------------------------------------------------------------- fine-tuning


def classification_loss(
    logits_BxC: jax.Array, labels_B: jax.Array, weights_B: jax.Array | None = None
) -> LossSum:
    """Softmax cross-entropy against the gold class."""
    return _weighted(_hard_ce(logits_BxC, labels_B), weights_B)


def classification_accuracy(
    logits_BxC: jax.Array, labels_B: jax.Array, weights_B: jax.Array | None = None
) -> LossSum:
    """(number correct, number of real examples): the in-step accuracy for logging."""
    correct_B = jnp.argmax(logits_BxC, axis=-1) == jnp.asarray(labels_B)
    return _weighted(correct_B.astype(jnp.float32), weights_B)


def _scores(scores: jax.Array) -> jax.Array:
    """[B, 1] (the regression head) or [B] -> float32 [B]."""
    scores = jnp.asarray(scores, jnp.float32)
    if scores.ndim == 2 and scores.shape[-1] == 1:
        return scores[:, 0]
    if scores.ndim != 1:
        raise ValueError(f"regression scores must be [B] or [B, 1], got shape {scores.shape}")
    return scores


def regression_loss(
    scores_B: jax.Array, targets_B: jax.Array, weights_B: jax.Array | None = None
) -> LossSum:
    """Squared error (STS-B); ``scores_B`` may also be the head's [B, 1] output."""
    error_B = _scores(scores_B) - jnp.asarray(targets_B, jnp.float32)
    return _weighted(jnp.square(error_B), weights_B)


def span_loss(
    start_logits_BxS: jax.Array,
    end_logits_BxS: jax.Array,
    start_positions_B: jax.Array,
    end_positions_B: jax.Array,
    weights_B: jax.Array | None = None,
) -> LossSum:
    """Mean of the start and end cross-entropies over sequence positions (Google's run_squad)."""
    per_example_B = 0.5 * (
        _hard_ce(start_logits_BxS, start_positions_B) + _hard_ce(end_logits_BxS, end_positions_B)
    )
    return _weighted(per_example_B, weights_B)


# ----------------------------------------------------------------------------- distillation


def _soft_ce(student: jax.Array, teacher: jax.Array, temperature: float) -> jax.Array:
    """Per-example -sum_y p_T(y) log p_S(y) at temperature T, times T^2 (Hinton et al.)."""
    if student.shape != teacher.shape:
        raise ValueError(f"student logits {student.shape} and teacher {teacher.shape} differ")
    t = jnp.asarray(temperature, jnp.float32)
    teacher_probs = jax.nn.softmax(
        jax.lax.stop_gradient(jnp.asarray(teacher, jnp.float32)) / t, axis=-1
    )
    student_log_probs = jax.nn.log_softmax(jnp.asarray(student, jnp.float32) / t, axis=-1)
    # T^2 keeps the gradient scale independent of T, so T can be tuned without retuning the LR.
    return -jnp.sum(teacher_probs * student_log_probs, axis=-1) * t * t


def soft_cross_entropy(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    temperature: float = 1.0,
    weights: jax.Array | None = None,
) -> LossSum:
    """Cross-entropy of the student against the teacher's softened distribution (last axis).

    Shapes ``[B, C]`` (classes) or ``[B, S]`` (span positions), or any ``[..., K]`` with
    ``weights`` of the leading shape. At T=1 with one-hot teacher probabilities it is the hard
    cross-entropy; the paper's PD objective is this with T=1 and no hard labels.
    """
    return _weighted(_soft_ce(student_logits, teacher_logits, temperature), weights)


def soft_span_loss(
    student_start_BxS: jax.Array,
    student_end_BxS: jax.Array,
    teacher_start_BxS: jax.Array,
    teacher_end_BxS: jax.Array,
    temperature: float = 1.0,
    weights: jax.Array | None = None,
) -> LossSum:
    """Span distillation: the mean of the start and end soft cross-entropies, as ``span_loss``."""
    per_example = 0.5 * (
        _soft_ce(student_start_BxS, teacher_start_BxS, temperature)
        + _soft_ce(student_end_BxS, teacher_end_BxS, temperature)
    )
    return _weighted(per_example, weights)


def distill_regression_loss(
    student_scores: jax.Array, teacher_scores: jax.Array, weights: jax.Array | None = None
) -> LossSum:
    """Squared error to the teacher's score: regression's analogue of the soft target."""
    teacher_B = jax.lax.stop_gradient(_scores(teacher_scores))
    return _weighted(jnp.square(_scores(student_scores) - teacher_B), weights)


def distillation_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    labels: jax.Array | None = None,
    *,
    temperature: float = 1.0,
    hard_label_weight: float = 0.0,
    weights: jax.Array | None = None,
) -> LossSum:
    """``(1 - w) * soft + w * hard`` with ``w = hard_label_weight`` (0 in the paper: transfer
    data is unlabelled). The hard term is the plain cross-entropy at T = 1.

    ``hard_label_weight`` must be a Python number (it picks which terms are built).
    """
    w = float(hard_label_weight)
    if not 0.0 <= w <= 1.0:
        raise ValueError(f"hard_label_weight must be in [0, 1], got {hard_label_weight}")
    soft_sum, denominator = soft_cross_entropy(student_logits, teacher_logits, temperature, weights)
    if w == 0.0:
        return soft_sum, denominator
    if labels is None:
        raise ValueError(f"hard_label_weight={w} needs labels, got labels=None")
    hard_sum, _ = classification_loss(student_logits, labels, weights)
    return (1.0 - w) * soft_sum + w * hard_sum, denominator
