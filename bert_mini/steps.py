"""Pure step functions: pretrain, fine-tune, distill and evaluate, over explicit pytrees.

Each train step maps ``(TrainState, batch) -> (TrainState, metrics)`` and is meant to be jitted
once by ``train.py`` with in/out shardings and the state donated. The model is rebuilt inside the
step with ``nnx.merge(graphdef, params)``: no NNX transforms in the hot path.

- Dropout keys are ``fold_in(state.rng, state.step)``: no hidden RNG counter, so a resumed run
  draws the same masks as an uninterrupted one.
- Metrics are ``{name: (sum, denominator)}`` pairs, summed over the global batch, so the host
  fetches them only at log steps and can add them up across steps before dividing.
- The teacher (distillation) is frozen: its forward pass runs outside ``value_and_grad`` under
  ``stop_gradient``, its parameters are a separate, never-donated argument and are not part of
  ``TrainState`` (so never checkpointed); or its logits come cached in the batch.
"""

import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from bert_mini import losses
from bert_mini.model import BertOutput

Batch = Mapping[str, jax.Array]
Metrics = dict[str, tuple[jax.Array, jax.Array]]

TASK_KINDS = ("classification", "regression", "span")


@flax.struct.dataclass
class TrainState:
    """Everything a resumed run needs besides the data position: a pytree Orbax can save."""

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array  # raw uint32 key data of the dropout base key


def create_train_state(
    params: Any, optimizer: optax.GradientTransformation, seed: int
) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        rng=jax.random.key_data(jax.random.key(seed)),
    )


def _forward(
    graphdef: nnx.GraphDef,
    params: Any,
    batch: Batch,
    *,
    train: bool,
    dropout_key: jax.Array | None = None,
    with_masks: bool = False,
) -> BertOutput:
    """The model's outputs; the last layer runs only at the rows the heads read (same values)."""
    model = nnx.merge(graphdef, params)
    return model(
        batch["input_ids"],
        batch["token_type_ids"],
        batch["attention_mask"],
        batch["masked_positions"] if with_masks else None,
        deterministic=not train,
        rngs=nnx.Rngs(dropout=dropout_key) if train else None,
        heads_only=True,
    )


def _mean(pair: tuple[jax.Array, jax.Array]) -> jax.Array:
    loss_sum, denominator = pair
    return loss_sum / jnp.maximum(denominator, 1e-9)


def _weights(batch: Batch) -> jax.Array | None:
    """Per-example weights: 0 for the padding rows of an evaluation batch."""
    mask = batch.get("eval_mask")
    return None if mask is None else mask.astype(jnp.float32)


# ----------------------------------------------------------------------------- objectives


def pretrain_objective(output: BertOutput, batch: Batch) -> tuple[jax.Array, Metrics]:
    """Masked-LM loss at the masked positions, plus NSP when the batch has its labels."""
    mlm = losses.masked_lm_loss(output.mlm_logits, batch["masked_ids"], batch["masked_weights"])
    metrics: Metrics = {
        "mlm_loss": mlm,
        "mlm_accuracy": losses.masked_lm_accuracy(
            output.mlm_logits, batch["masked_ids"], batch["masked_weights"]
        ),
    }
    loss = _mean(mlm)
    if "next_sentence_label" in batch and output.nsp_logits is not None:
        nsp = losses.next_sentence_loss(output.nsp_logits, batch["next_sentence_label"])
        metrics["nsp_loss"] = nsp
        loss = loss + _mean(nsp)
    metrics["loss"] = (loss, jnp.ones((), jnp.float32))
    return loss, metrics


def task_objective(kind: str, output: BertOutput, batch: Batch) -> tuple[jax.Array, Metrics]:
    """Hard-label loss of a fine-tuning task (cross-entropy, MSE or start/end cross-entropy)."""
    weights = _weights(batch)
    if kind == "classification":
        pair = losses.classification_loss(output.logits, batch["label"], weights)
    elif kind == "regression":
        pair = losses.regression_loss(output.logits, batch["label"], weights)
    elif kind == "span":
        pair = losses.span_loss(
            output.start_logits,
            output.end_logits,
            batch["start_positions"],
            batch["end_positions"],
            weights,
        )
    else:
        raise ValueError(f"unknown task kind {kind!r}; choose one of {TASK_KINDS}")
    return _mean(pair), {"loss": pair}


def distill_objective(
    kind: str,
    output: BertOutput,
    teacher: Mapping[str, jax.Array],
    batch: Batch,
    *,
    temperature: float,
    hard_label_weight: float,
) -> tuple[jax.Array, Metrics]:
    """Soft targets from the teacher (``-sum P_t log P_s`` x T^2), optionally mixed with labels."""
    weights = _weights(batch)
    if kind == "classification":
        soft = losses.soft_cross_entropy(output.logits, teacher["logits"], temperature, weights)
    elif kind == "regression":
        soft = losses.distill_regression_loss(output.logits, teacher["logits"], weights)
    elif kind == "span":
        soft = losses.soft_span_loss(
            output.start_logits,
            output.end_logits,
            teacher["start_logits"],
            teacher["end_logits"],
            temperature,
            weights,
        )
    else:
        raise ValueError(f"unknown task kind {kind!r}; choose one of {TASK_KINDS}")
    loss = _mean(soft)
    metrics: Metrics = {"soft_loss": soft}
    if hard_label_weight:
        hard_loss, hard_metrics = task_objective(kind, output, batch)
        loss = (1.0 - hard_label_weight) * loss + hard_label_weight * hard_loss
        metrics["hard_loss"] = hard_metrics["loss"]
    metrics["loss"] = (loss, jnp.ones((), jnp.float32))
    return loss, metrics


# ----------------------------------------------------------------------------- train steps


def _apply_gradients(
    state: TrainState,
    optimizer: optax.GradientTransformation,
    loss_fn: Callable[[Any], tuple[jax.Array, Metrics]],
) -> tuple[TrainState, Metrics]:
    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    one = jnp.ones((), jnp.float32)
    metrics["grad_norm"] = (optax.tree.norm(grads), one)
    # Checked for NaN/Inf with the loss before every checkpoint: a huge update can break the
    # parameters while the loss that produced it was still finite.
    metrics["param_norm"] = (optax.tree.norm(params), one)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics


def _dropout_key(state: TrainState) -> jax.Array:
    return jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)


def pretrain_step(
    state: TrainState,
    batch: Batch,
    *,
    graphdef: nnx.GraphDef,
    optimizer: optax.GradientTransformation,
) -> tuple[TrainState, Metrics]:
    """One masked-LM (+ NSP) step."""
    key = _dropout_key(state)

    def loss_fn(params: Any) -> tuple[jax.Array, Metrics]:
        output = _forward(graphdef, params, batch, train=True, dropout_key=key, with_masks=True)
        return pretrain_objective(output, batch)

    return _apply_gradients(state, optimizer, loss_fn)


def finetune_step(
    state: TrainState,
    batch: Batch,
    *,
    graphdef: nnx.GraphDef,
    optimizer: optax.GradientTransformation,
    kind: str,
) -> tuple[TrainState, Metrics]:
    """One fine-tuning step on labels (classification, regression or span)."""
    key = _dropout_key(state)

    def loss_fn(params: Any) -> tuple[jax.Array, Metrics]:
        output = _forward(graphdef, params, batch, train=True, dropout_key=key)
        return task_objective(kind, output, batch)

    return _apply_gradients(state, optimizer, loss_fn)


def teacher_outputs(
    kind: str,
    batch: Batch,
    teacher_graphdef: nnx.GraphDef | None = None,
    teacher_params: Any = None,
) -> dict[str, jax.Array]:
    """The teacher's logits: cached in the batch, or from a frozen forward pass."""
    if teacher_params is None:
        if kind == "span":
            return {
                "start_logits": batch["teacher_start_logits"],
                "end_logits": batch["teacher_end_logits"],
            }
        return {"logits": batch["teacher_logits"]}
    output = _forward(teacher_graphdef, teacher_params, batch, train=False)
    if kind == "span":
        logits = {"start_logits": output.start_logits, "end_logits": output.end_logits}
    else:
        logits = {"logits": output.logits}
    return jax.tree.map(lambda x: jax.lax.stop_gradient(x.astype(jnp.float32)), logits)


def distill_step(
    state: TrainState,
    batch: Batch,
    teacher_params: Any = None,
    *,
    graphdef: nnx.GraphDef,
    optimizer: optax.GradientTransformation,
    kind: str,
    teacher_graphdef: nnx.GraphDef | None = None,
    temperature: float = 1.0,
    hard_label_weight: float = 0.0,
) -> tuple[TrainState, Metrics]:
    """One distillation step; ``teacher_params=None`` means logits cached in the batch."""
    teacher = teacher_outputs(kind, batch, teacher_graphdef, teacher_params)
    key = _dropout_key(state)

    def loss_fn(params: Any) -> tuple[jax.Array, Metrics]:
        output = _forward(graphdef, params, batch, train=True, dropout_key=key)
        return distill_objective(
            kind,
            output,
            teacher,
            batch,
            temperature=temperature,
            hard_label_weight=hard_label_weight,
        )

    return _apply_gradients(state, optimizer, loss_fn)


# ----------------------------------------------------------------------------- evaluation


def eval_step(
    params: Any,
    batch: Batch,
    *,
    graphdef: nnx.GraphDef,
    kind: str,
) -> tuple[dict[str, jax.Array], Metrics]:
    """Predictions for host-side metrics, plus the loss as (sum, count) over real examples.

    ``kind`` is a task kind or ``"pretrain"`` (masked-LM loss and accuracy).
    """
    if kind == "pretrain":
        output = _forward(graphdef, params, batch, train=False, with_masks=True)
        _, metrics = pretrain_objective(output, batch)
        return {}, metrics
    output = _forward(graphdef, params, batch, train=False)
    _, metrics = task_objective(kind, output, batch)
    if kind == "span":
        predictions = {"start_logits": output.start_logits, "end_logits": output.end_logits}
    else:
        predictions = {"logits": output.logits}
    return predictions, metrics


def step_function(kind: str, mode: str, **static: Any) -> Callable[..., Any]:
    """The step for ``mode`` in {pretrain, finetune, distill, eval} with its static arguments."""
    steps = {
        "pretrain": pretrain_step,
        "finetune": finetune_step,
        "distill": distill_step,
        "eval": eval_step,
    }
    if mode not in steps:
        raise ValueError(f"unknown step mode {mode!r}; choose one of {sorted(steps)}")
    if mode in ("finetune", "distill", "eval"):
        static["kind"] = kind
    return functools.partial(steps[mode], **static)
