"""bert_mini.losses against numpy by hand, and bert_mini.metrics against hand formulas, numpy
correlations, tiny known cases and the real SQuAD v1.1 dev file."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from bert_mini import losses, metrics

RNG = np.random.default_rng(0)


def np_log_softmax(x):
    x = np.asarray(x, np.float64)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def np_ce(logits, labels):
    """Per-example -log softmax(logits)[label] in float64."""
    log_probs = np_log_softmax(logits)
    return -np.take_along_axis(log_probs, np.asarray(labels)[..., None], axis=-1)[..., 0]


def as_floats(pair):
    total, denominator = pair
    return float(total), float(denominator)


# ----------------------------------------------------------------------------- hard losses


def test_masked_lm_loss_and_accuracy_vs_numpy():
    logits = RNG.normal(size=(3, 4, 11)).astype(np.float32)
    ids = RNG.integers(0, 11, size=(3, 4))
    ids[0, :2] = logits[0, :2].argmax(-1)  # two sure hits
    weights = np.array([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]], np.float32)
    total, den = as_floats(losses.masked_lm_loss(logits, ids, weights))
    assert den == 8.0
    assert total == pytest.approx(float((np_ce(logits, ids) * weights).sum()), rel=1e-5)
    correct, den = as_floats(losses.masked_lm_accuracy(logits, ids, weights))
    assert den == 8.0
    assert correct == float(((logits.argmax(-1) == ids) * weights).sum())
    assert correct >= 2
    # Padding slots (weight 0) do not count whatever their logits and ids say.
    garbage = logits.copy()
    garbage[weights == 0] = 1e4 * RNG.normal(size=garbage[weights == 0].shape)
    assert as_floats(losses.masked_lm_loss(garbage, ids, weights))[0] == pytest.approx(total, 1e-6)


def test_classification_and_nsp_losses_vs_numpy():
    logits = RNG.normal(size=(5, 3)).astype(np.float32)
    labels = np.array([0, 2, 1, 1, 0])
    expected = np_ce(logits, labels)
    total, den = as_floats(losses.classification_loss(logits, labels))
    assert den == 5.0 and total == pytest.approx(float(expected.sum()), rel=1e-5)
    weights = np.array([1, 1, 0, 1, 0], np.float32)
    total, den = as_floats(losses.classification_loss(logits, labels, weights))
    assert den == 3.0 and total == pytest.approx(float(expected[[0, 1, 3]].sum()), rel=1e-5)
    correct, den = as_floats(losses.classification_accuracy(logits, labels, weights))
    assert den == 3.0
    assert correct == float((logits.argmax(-1) == labels)[[0, 1, 3]].sum())
    nsp_logits = logits[:, :2]
    nsp_labels = np.array([0, 1, 1, 0, 1])
    total, den = as_floats(losses.next_sentence_loss(nsp_logits, nsp_labels, weights))
    assert den == 3.0
    assert total == pytest.approx(float((np_ce(nsp_logits, nsp_labels) * weights).sum()), 1e-5)


def test_regression_loss_accepts_head_shape():
    scores = np.array([[0.5], [2.0], [4.5], [1.0]], np.float32)
    targets = np.array([1.0, 2.0, 3.0, 9.0], np.float32)
    weights = np.array([1, 1, 1, 0], np.float32)
    total, den = as_floats(losses.regression_loss(scores, targets, weights))
    assert den == 3.0 and total == pytest.approx(0.25 + 0.0 + 2.25)
    assert as_floats(losses.regression_loss(scores[:, 0], targets, weights)) == (total, den)
    with pytest.raises(ValueError, match=r"\[B\] or \[B, 1\]"):
        losses.regression_loss(np.zeros((4, 2)), targets)


def test_span_loss_is_mean_of_start_and_end():
    start = RNG.normal(size=(4, 9)).astype(np.float32)
    end = RNG.normal(size=(4, 9)).astype(np.float32)
    starts, ends = np.array([0, 3, 5, 8]), np.array([0, 4, 7, 8])
    weights = np.array([1, 1, 1, 0], np.float32)
    per_example = (np_ce(start, starts) + np_ce(end, ends)) / 2
    total, den = as_floats(losses.span_loss(start, end, starts, ends, weights))
    assert den == 3.0 and total == pytest.approx(float(per_example[:3].sum()), rel=1e-5)


def test_mean_loss_guards_empty_batch():
    assert float(losses.mean_loss(jnp.float32(6.0), jnp.float32(3.0))) == 2.0
    assert float(losses.mean_loss(jnp.float32(0.0), jnp.float32(0.0))) == 0.0


# ----------------------------------------------------------------------------- distillation


def np_soft_ce(student, teacher, t):
    teacher_probs = np.exp(np_log_softmax(np.asarray(teacher, np.float64) / t))
    return -(teacher_probs * np_log_softmax(np.asarray(student, np.float64) / t)).sum(-1) * t * t


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_soft_cross_entropy_vs_numpy_with_t_squared(temperature):
    student = RNG.normal(size=(6, 5)).astype(np.float32)
    teacher = 3 * RNG.normal(size=(6, 5)).astype(np.float32)
    weights = np.array([1, 1, 1, 1, 0, 1], np.float32)
    total, den = as_floats(losses.soft_cross_entropy(student, teacher, temperature, weights))
    expected = np_soft_ce(student, teacher, temperature)
    assert den == 5.0
    assert total == pytest.approx(float((expected * weights).sum()), rel=1e-5)
    # The T^2 factor, explicitly: the loss is T^2 times the plain CE of the softened logits.
    plain = np_soft_ce(student / temperature, teacher / temperature, 1.0)
    assert total == pytest.approx(temperature**2 * float((plain * weights).sum()), rel=1e-5)


def test_soft_cross_entropy_with_one_hot_teacher_is_hard_cross_entropy():
    student = RNG.normal(size=(4, 7)).astype(np.float32)
    labels = np.array([6, 0, 3, 3])
    one_hot_teacher = 1e4 * np.eye(7, dtype=np.float32)[labels]  # softmax is exactly one-hot
    soft = as_floats(losses.soft_cross_entropy(student, one_hot_teacher))
    hard = as_floats(losses.classification_loss(student, labels))
    assert soft[0] == pytest.approx(hard[0], rel=1e-6) and soft[1] == hard[1]


def test_soft_cross_entropy_gradients_student_only():
    student = jnp.asarray(RNG.normal(size=(3, 4)), jnp.float32)
    teacher = jnp.asarray(RNG.normal(size=(3, 4)), jnp.float32)

    def loss(s, t):
        return losses.soft_cross_entropy(s, t)[0]

    grad_student, grad_teacher = jax.grad(loss, argnums=(0, 1))(student, teacher)
    np.testing.assert_allclose(
        grad_student, jax.nn.softmax(student) - jax.nn.softmax(teacher), atol=1e-6
    )
    assert not np.any(np.asarray(grad_teacher))  # teacher under stop_gradient


def test_soft_span_loss_averages_start_and_end():
    s_start, s_end, t_start, t_end = (RNG.normal(size=(3, 10)).astype(np.float32) for _ in range(4))
    weights = np.array([1, 0, 1], np.float32)
    expected = (np_soft_ce(s_start, t_start, 2.0) + np_soft_ce(s_end, t_end, 2.0)) / 2
    total, den = as_floats(losses.soft_span_loss(s_start, s_end, t_start, t_end, 2.0, weights))
    assert den == 2.0 and total == pytest.approx(float((expected * weights).sum()), rel=1e-5)


def test_distill_regression_loss_and_teacher_gradient():
    student = jnp.asarray([[1.0], [2.0], [3.0]])
    teacher = jnp.asarray([0.5, 2.5, 0.0])
    total, den = as_floats(losses.distill_regression_loss(student, teacher))
    assert den == 3.0 and total == pytest.approx(0.25 + 0.25 + 9.0)
    grad_teacher = jax.grad(lambda t: losses.distill_regression_loss(student, t)[0])(teacher)
    assert not np.any(np.asarray(grad_teacher))


def test_distillation_loss_mixes_soft_and_hard():
    student = RNG.normal(size=(5, 3)).astype(np.float32)
    teacher = RNG.normal(size=(5, 3)).astype(np.float32)
    labels = np.array([0, 1, 2, 1, 0])
    weights = np.array([1, 1, 0, 1, 1], np.float32)
    soft = float((np_soft_ce(student, teacher, 2.0) * weights).sum())
    hard = float((np_ce(student, labels) * weights).sum())
    default = as_floats(
        losses.distillation_loss(student, teacher, temperature=2.0, weights=weights)
    )
    assert default == (pytest.approx(soft, rel=1e-5), 4.0)
    mixed = as_floats(
        losses.distillation_loss(
            student, teacher, labels, temperature=2.0, hard_label_weight=0.3, weights=weights
        )
    )
    assert mixed == (pytest.approx(0.7 * soft + 0.3 * hard, rel=1e-5), 4.0)
    with pytest.raises(ValueError, match="needs labels"):
        losses.distillation_loss(student, teacher, hard_label_weight=0.5)


def test_bf16_logits_give_float32_losses_under_jit():
    logits32 = RNG.normal(size=(4, 6)).astype(np.float32)
    logits16 = jnp.asarray(logits32, jnp.bfloat16)
    rounded = np.asarray(logits16.astype(jnp.float32))
    labels = np.array([1, 5, 0, 2])
    cases = {
        "classification": (jax.jit(losses.classification_loss), (logits16, labels)),
        "soft": (jax.jit(losses.soft_cross_entropy), (logits16, logits16 * 2)),
        "mlm": (jax.jit(losses.masked_lm_loss), (logits16[None], labels[None], np.ones((1, 4)))),
        "span": (jax.jit(losses.span_loss), (logits16, logits16, labels, labels)),
    }
    for name, (fn, args) in cases.items():
        total, den = fn(*args)
        assert total.dtype == jnp.float32 and den.dtype == jnp.float32, name
    total, _ = cases["classification"][0](*cases["classification"][1])
    assert float(total) == pytest.approx(float(np_ce(rounded, labels).sum()), rel=1e-5)


# ----------------------------------------------------------------------------- GLUE metrics


def test_accuracy_with_weights():
    assert metrics.accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 0.5
    assert metrics.accuracy([1, 0, 1, 1], [1, 1, 1, 0], weights=[1, 0, 1, 0]) == 1.0
    with pytest.raises(ValueError, match="differ"):
        metrics.accuracy([1, 0], [1, 0, 1])


def _confusion(pred, labels):
    pred, labels = np.asarray(pred), np.asarray(labels)
    tp = int(((pred == 1) & (labels == 1)).sum())
    tn = int(((pred == 0) & (labels == 0)).sum())
    fp = int(((pred == 1) & (labels == 0)).sum())
    fn = int(((pred == 0) & (labels == 1)).sum())
    return tp, tn, fp, fn


def test_f1_and_mcc_vs_hand_formulas():
    pred = RNG.integers(0, 2, size=200)
    labels = np.where(RNG.random(200) < 0.7, pred, 1 - pred)
    tp, tn, fp, fn = _confusion(pred, labels)
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    assert metrics.f1_binary(pred, labels) == pytest.approx(
        2 * precision * recall / (precision + recall)
    )
    mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert metrics.matthews_corrcoef(pred, labels) == pytest.approx(mcc)
    # Tiny known cases.
    assert metrics.f1_binary([1, 1, 0, 0], [1, 0, 1, 0]) == 0.5  # tp=1 fp=1 fn=1
    assert metrics.f1_binary([0, 0], [0, 0]) == 0.0
    assert metrics.matthews_corrcoef([1, 0, 1, 0], [1, 0, 1, 0]) == 1.0
    assert metrics.matthews_corrcoef([0, 1, 0, 1], [1, 0, 1, 0]) == -1.0
    assert metrics.matthews_corrcoef([1, 1, 1, 1], [1, 0, 1, 0]) == 0.0  # undefined -> 0


def test_correlations_vs_numpy():
    x = RNG.normal(size=50)
    y = 0.6 * x + RNG.normal(size=50)
    y[:5] = y[5]  # ties, so Spearman must average ranks
    assert metrics.pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1])
    ranks = np.corrcoef(stats.rankdata(x), stats.rankdata(y))[0, 1]
    assert metrics.spearman(x, y) == pytest.approx(ranks)
    assert metrics.pearson(np.ones(5), np.arange(5)) == 0.0


def test_glue_metrics_per_task():
    logits = np.array([[2.0, -1.0], [0.1, 0.3], [0.0, 1.0], [3.0, 0.0], [0.2, 0.1]])
    labels = np.array([0, 1, 0, 0, 1])
    pred = logits.argmax(-1)  # [0, 1, 1, 0, 0]
    assert metrics.glue_metrics("sst2", logits, labels) == {"accuracy": 0.6}
    mrpc = metrics.glue_metrics("MRPC", logits, labels)
    assert set(mrpc) == set(metrics.GLUE_METRICS["mrpc"])
    assert mrpc["f1"] == pytest.approx(0.5)  # tp=1, fp=1, fn=1
    assert mrpc["accuracy_and_f1"] == pytest.approx((0.6 + 0.5) / 2)
    cola = metrics.glue_metrics("cola", pred, labels)  # class ids work as well as logits
    assert cola == {"mcc": pytest.approx(metrics.matthews_corrcoef(pred, labels))}
    scores = np.array([[0.5], [1.5], [2.0], [4.0], [3.0]])
    gold = np.array([0.0, 2.0, 1.0, 5.0, 3.5])
    stsb = metrics.glue_metrics("stsb", scores, gold)
    assert stsb["pearson"] == pytest.approx(np.corrcoef(scores[:, 0], gold)[0, 1])
    assert stsb["spearman"] == pytest.approx(0.9)  # one swapped pair of 5: 1 - 6*2/(5*24)
    assert stsb["pearson_and_spearman"] == pytest.approx((stsb["pearson"] + 0.9) / 2)
    # Padded eval rows (weight 0) are dropped before scoring.
    padded = metrics.glue_metrics(
        "sst2", np.vstack([logits, [[9.0, 0.0]]]), np.append(labels, 1), weights=[1] * 5 + [0]
    )
    assert padded == {"accuracy": 0.6}
    with pytest.raises(ValueError, match="unknown GLUE task 'squad'"):
        metrics.glue_metrics("squad", logits, labels)


# ----------------------------------------------------------------------------- SQuAD


def test_squad_metrics_small_case():
    examples = [
        {"id": b"q1", "answers": {"text": [b"the Eiffel Tower", b"Eiffel Tower"]}},
        {"id": "q2", "answers": {"text": ["Eiffel Tower"], "answer_start": [3]}},
        {"id": "q3", "answers": [{"text": "1889"}]},
    ]
    predicted = {"q1": "Eiffel tower!", "q2": "tower in Paris"}  # q3 unanswered -> 0
    result = metrics.squad_metrics(predicted, examples)
    # q2: pred [tower, in, paris] vs [eiffel, tower]: P = 1/3, R = 1/2, F1 = 0.4.
    assert result["exact_match"] == pytest.approx(100 / 3)
    assert result["f1"] == pytest.approx(100 * 1.4 / 3)
    by_id = {"q1": ["Eiffel Tower"], "q2": ["tower in paris"], "q3": ["1889"]}
    assert metrics.squad_metrics(predicted, by_id) == {
        "exact_match": pytest.approx(200 / 3),
        "f1": pytest.approx(200 / 3),
    }
    with pytest.raises(ValueError, match="not among the examples"):
        metrics.squad_metrics({"q9": "x"}, examples)


def test_squad_metrics_on_real_dev_file(data_dir):
    dev = json.loads((data_dir / "squad" / "dev-v1.1.json").read_text(encoding="utf-8"))
    gold = {
        qa["id"]: [a["text"] for a in qa["answers"]]
        for article in dev["data"]
        for paragraph in article["paragraphs"]
        for qa in paragraph["qas"]
    }
    assert len(gold) == 10570
    first_answers = {qid: answers[0] for qid, answers in gold.items()}
    assert metrics.squad_metrics(first_answers, gold) == {"exact_match": 100.0, "f1": 100.0}
    # Half the questions unanswered: the official script scores those 0.
    halved = dict(list(first_answers.items())[: len(gold) // 2])
    result = metrics.squad_metrics(halved, gold)
    assert result["exact_match"] == pytest.approx(100 * (len(gold) // 2) / len(gold))


# ----------------------------------------------------------------------------- running sums


def test_metric_sums_accumulate_merge_and_mean():
    sums = metrics.MetricSums()
    sums.add({"loss": (jnp.float32(6.0), jnp.float32(3.0)), "acc": (np.float32(2), np.float32(4))})
    sums.add({"loss": (jnp.float32(4.0), jnp.float32(2.0))})
    other = metrics.MetricSums({"acc": (np.float64(1), 4), "mlm": (jnp.zeros(8), jnp.zeros(8))})
    sums.merge(other)
    assert sums.sums()["loss"] == (10.0, 5.0)
    means = sums.means()
    assert means["loss"] == 2.0 and means["acc"] == 3 / 8
    assert math.isnan(means["mlm"])  # nothing counted
    assert not metrics.is_finite(means) and metrics.is_finite({"loss": 2.0, "n": 3})
    sums.reset()
    assert len(sums) == 0
    with pytest.raises(ValueError, match="'loss' must be a"):
        sums.add({"loss": (1.0,)})


def test_is_finite():
    assert metrics.is_finite(1.0) and metrics.is_finite(jnp.ones(3, jnp.bfloat16))
    assert not metrics.is_finite(float("nan"))
    assert not metrics.is_finite({"a": [1.0, jnp.asarray([1.0, jnp.inf], jnp.bfloat16)]})
    assert metrics.is_finite(np.float64(1e300))  # large but finite stays finite
