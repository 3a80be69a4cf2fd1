"""BERT's optimizer as one optax transformation: schedule, weight-decay mask, clipping, LAMB,
gradient accumulation and frozen parameter groups.

Why it is built this way:

- **Masks are functions of the tree, not stored trees.** ``weight_decay_mask`` and the frozen
  labels are recomputed from parameter paths whenever optax asks, so the same optimizer works on
  an ``nnx.State`` of ``nnx.Param`` (as ``nnx.split`` returns it), on the pure dict of that state,
  and on plain nested dicts, and nothing but arrays ends up in the optimizer state.
- **Frozen parameters sit outside the optimizer.** ``optax.multi_transform`` sends them to
  ``set_to_zero``, so they get exactly zero updates, no weight decay, no Adam moments (memory),
  and do not count in the gradient norm that clipping sees.
- **Clipping comes first** (Google's ``optimization.py`` clips the raw gradients, then Adam),
  and with accumulation it clips the *averaged* gradient, as one big batch would. It scales by
  one scalar as ``tf.clip_by_global_norm`` does (``clip_by_global_norm``); optax's version
  divides every gradient by the norm, a full extra pass over the 30522-row embedding gradient.
- **The schedule counts optimizer updates.** Under ``grad_accum_steps = k`` the inner optimizer
  (and so the schedule) advances once every k calls; ``warmup_steps`` and ``total_steps`` are in
  updates, not micro-batches.

The state is a pytree of arrays (tuples, NamedTuples, ``nnx.State``), so ``jax.jit`` can take and
donate it and Orbax can save and restore it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

__all__ = [
    "OPTIMIZERS",
    "clip_by_global_norm",
    "frozen_mask",
    "learning_rate_schedule",
    "make_optimizer",
    "param_paths",
    "weight_decay_mask",
]

OPTIMIZERS = ("adamw", "lamb")
_TRAINABLE, _FROZEN = "trainable", "frozen"


# ----------------------------------------------------------------------------- schedule


def learning_rate_schedule(peak_lr: float, warmup_steps: int, total_steps: int) -> optax.Schedule:
    """BERT's schedule: linear warmup from 0 to ``peak_lr``, then linear decay to 0 at the end.

    ``lr(0) = 0`` (the first update is free) unless ``warmup_steps == 0``; ``lr(warmup) = peak``;
    ``lr(t >= total_steps) = 0``. Written in jnp rather than joined optax schedules so the
    degenerate cases (no warmup, warmup == total) are exact too.
    """
    if peak_lr < 0:
        raise ValueError(f"peak_lr must be >= 0, got {peak_lr}")
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(
            f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}"
        )
    peak = float(peak_lr)
    warmup = int(warmup_steps)
    decay_steps = max(int(total_steps) - warmup, 1)

    def schedule(step: Any) -> jax.Array:
        step_f = jnp.asarray(step, jnp.float32)
        warming = peak * step_f / max(warmup, 1)
        decaying = peak * jnp.clip((total_steps - step_f) / decay_steps, 0.0, 1.0)
        return jnp.where(step_f < warmup, warming, decaying).astype(jnp.float32)

    return schedule


# ----------------------------------------------------------------------------- paths and masks


def _key_name(key: Any) -> str:
    for attr in ("key", "idx", "name"):  # DictKey, SequenceKey, GetAttrKey
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _is_variable(node: Any) -> bool:
    return isinstance(node, nnx.Variable)


def _map_paths(fn: Callable[[tuple[str, ...]], Any], params: Any) -> Any:
    """A tree shaped exactly like ``params`` with ``fn(path names)`` at every leaf.

    An ``nnx.Variable`` is kept as a node (the new value goes inside it, metadata untouched), so
    the result flattens to the same treedef as the params, which optax needs to zip them.
    """

    def at_leaf(path: tuple[Any, ...], node: Any) -> Any:
        value = fn(tuple(_key_name(k) for k in path))
        if _is_variable(node):
            return jax.tree.map(lambda _: value, node)
        return value

    return jax.tree_util.tree_map_with_path(at_leaf, params, is_leaf=_is_variable)


def param_paths(params: Any) -> list[str]:
    """The '/'-joined path of every parameter, e.g. ``layers/0/attention/query/kernel``."""
    leaves = jax.tree_util.tree_leaves_with_path(params, is_leaf=_is_variable)
    return ["/".join(_key_name(k) for k in path) for path, _ in leaves]


def _decays(names: tuple[str, ...]) -> bool:
    """No decay for biases and LayerNorm parameters (Google's ``exclude_from_weight_decay``)."""
    if names and names[-1] == "bias":
        return False
    return not any("layer_norm" in n.lower() or "layernorm" in n.lower() for n in names)


def weight_decay_mask(params: Any) -> Any:
    """True where weight decay applies (kernels, embeddings), False for biases and LayerNorms.

    Decided from the path alone, so it can be handed to optax as a callable and re-derived for
    any tree with the same names (``nnx.State``, its pure dict, a plain dict).
    """
    return _map_paths(_decays, params)


def _compile_patterns(frozen: Sequence[str]) -> list[re.Pattern[str]]:
    if isinstance(frozen, str):  # a bare string would be iterated character by character
        frozen = (frozen,)
    compiled = []
    for pattern in frozen:
        try:
            compiled.append(re.compile(pattern))
        except re.error as e:
            raise ValueError(f"frozen pattern {pattern!r} is not a valid regex: {e}") from None
    return compiled


def frozen_mask(params: Any, frozen: Sequence[str]) -> Any:
    """True for parameters whose '/'-joined path fully matches one of the ``frozen`` regexes.

    ``re.fullmatch`` so ``layers/1/.*`` does not also freeze ``layers/10``. A pattern that matches
    no parameter is a ValueError naming it (a typo must not silently train everything).
    """
    patterns = _compile_patterns(frozen)
    paths = param_paths(params)
    for pattern in patterns:
        if not any(pattern.fullmatch(p) for p in paths):
            examples = ", ".join(paths[:3])
            raise ValueError(
                f"frozen pattern {pattern.pattern!r} matches no parameter "
                f"(paths look like: {examples}, ...)"
            )
    return _map_paths(lambda names: any(p.fullmatch("/".join(names)) for p in patterns), params)


# ----------------------------------------------------------------------------- optimizer


def _lamb(
    schedule: optax.Schedule, b1: float, b2: float, eps: float, weight_decay: float
) -> optax.GradientTransformation:
    """LAMB (You et al. 2019) as BERT's large-batch recipe runs it.

    Like ``optax.lamb`` but the layer-wise trust ratio skips the same biases and LayerNorms as
    weight decay (Google's LAMB: ``exclude_from_layer_adaptation`` defaults to the weight-decay
    exclusions), so zero-initialised biases are not rescaled by a meaningless norm ratio.
    """
    return optax.chain(
        optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
        optax.add_decayed_weights(weight_decay, mask=weight_decay_mask),
        optax.masked(optax.scale_by_trust_ratio(), weight_decay_mask),
        optax.scale_by_learning_rate(schedule),
    )


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """Scale all gradients by ``max_norm / max(global_norm, max_norm)``, as TF's
    ``tf.clip_by_global_norm`` (Google's BERT) does: one scalar, multiplied into each gradient.

    Same result as ``optax.clip_by_global_norm`` up to float rounding; a scalar factor fuses into
    the Adam update, where optax's per-element division is its own pass over every gradient.
    """

    def update_fn(updates: Any, state: optax.EmptyState, params: Any = None) -> tuple[Any, Any]:
        del params
        norm = optax.tree.norm(updates)
        scale = max_norm / jnp.maximum(norm, max_norm)
        return jax.tree.map(lambda g: g * scale.astype(g.dtype), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def make_optimizer(
    *,
    learning_rate: float,
    warmup_steps: int,
    total_steps: int,
    optimizer: str = "adamw",
    weight_decay: float = 0.01,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    clip_norm: float | None = 1.0,
    grad_accum_steps: int = 1,
    frozen: Sequence[str] = (),
    params: Any,
) -> optax.GradientTransformation:
    """BERT's optimizer: [clip] -> AdamW or LAMB with masked decoupled weight decay, under the
    warmup + linear-decay schedule; frozen groups get zero updates; optional accumulation.

    ``params`` is used to check the ``frozen`` patterns against real names (and nothing is kept
    from it). ``clip_norm=None`` turns clipping off. ``grad_accum_steps > 1`` wraps everything in
    ``optax.MultiSteps``: updates are zero except every k-th call, which applies the mean gradient.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {list(OPTIMIZERS)}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    if clip_norm is not None and clip_norm <= 0:
        raise ValueError(f"clip_norm must be > 0 or None, got {clip_norm}")
    if int(grad_accum_steps) != grad_accum_steps or grad_accum_steps < 1:
        raise ValueError(f"grad_accum_steps must be an integer >= 1, got {grad_accum_steps}")
    schedule = learning_rate_schedule(learning_rate, warmup_steps, total_steps)

    if optimizer == "adamw":
        update_rule = optax.adamw(
            schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=weight_decay_mask
        )
    else:
        update_rule = _lamb(schedule, b1, b2, eps, weight_decay)
    parts = [update_rule] if clip_norm is None else [clip_by_global_norm(clip_norm), update_rule]
    tx: optax.GradientTransformation = optax.chain(*parts)

    patterns = list(_compile_patterns(frozen))
    if patterns:
        frozen_mask(params, frozen)  # validates every pattern against the real names

        def labels(tree: Any) -> Any:
            flags = frozen_mask(tree, frozen)
            return jax.tree.map(lambda f: _FROZEN if f else _TRAINABLE, flags)

        tx = optax.multi_transform({_TRAINABLE: tx, _FROZEN: optax.set_to_zero()}, labels)

    if grad_accum_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=int(grad_accum_steps)).gradient_transformation()
    return tx
