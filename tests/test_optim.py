"""bert_mini.optim: schedule values, weight-decay mask on a real model state, AdamW against a
hand-written numpy AdamW, clipping, frozen groups, accumulation, LAMB, errors, and a state that
jit can donate and Orbax can round-trip."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from bert_mini import optim
from bert_mini.model import BertConfig, create_model


@pytest.fixture(scope="module")
def tiny_params():
    """The real BERT-Tiny pre-training parameter state, as ``nnx.split`` returns it."""
    _, params = nnx.split(create_model(BertConfig.from_variant("tiny"), "pretraining"))
    return params


@pytest.fixture(scope="module")
def small_params():
    """Tiny's layout with a 64-word vocabulary: same names, cheap updates."""
    config = BertConfig.from_variant("tiny", vocab_size=64, max_position_embeddings=16)
    _, params = nnx.split(create_model(config, "classification", seed=1))
    return params


def _named(tree):
    """{'a/b/c': array} of a tree (through nnx.Param nodes)."""
    return dict(zip(optim.param_paths(tree), jax.tree.leaves(tree), strict=True))


def _toy_params():
    rng = np.random.default_rng(0)
    return {
        "dense": {
            "kernel": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32),
            "bias": jnp.asarray(rng.normal(size=(2,)), jnp.float32),
        },
        "layer_norm": {"scale": jnp.asarray(1.0 + rng.normal(size=(2,)), jnp.float32)},
    }


# ----------------------------------------------------------------------------- schedule


def test_schedule_warmup_then_linear_decay():
    schedule = optim.learning_rate_schedule(1e-3, warmup_steps=10, total_steps=110)
    expected = {0: 0.0, 5: 5e-4, 10: 1e-3, 60: 5e-4, 85: 2.5e-4, 110: 0.0, 500: 0.0}
    for step, lr in expected.items():
        assert float(schedule(step)) == pytest.approx(lr, abs=1e-9), step
    assert schedule(jnp.int32(5)).dtype == jnp.float32
    no_warmup = optim.learning_rate_schedule(2e-5, warmup_steps=0, total_steps=4)
    assert [float(no_warmup(s)) for s in range(5)] == pytest.approx([2e-5, 1.5e-5, 1e-5, 5e-6, 0])


@pytest.mark.parametrize(
    "args, message",
    [((1e-3, 5, 0), "total_steps"), ((1e-3, 11, 10), "warmup_steps"), ((-1.0, 1, 10), "peak_lr")],
)
def test_schedule_rejects_bad_arguments(args, message):
    with pytest.raises(ValueError, match=message):
        optim.learning_rate_schedule(*args)


# ----------------------------------------------------------------------------- masks


def test_weight_decay_mask_on_real_tiny_state(tiny_params):
    mask = optim.weight_decay_mask(tiny_params)
    # Same treedef as the params (Param nodes included), so optax can zip them.
    assert jax.tree.structure(mask) == jax.tree.structure(tiny_params)
    flags = _named(mask)
    assert len(flags) == len(_named(tiny_params)) == 46
    for path, decays in flags.items():
        no_decay = path.endswith("/bias") or "layer_norm" in path
        assert decays is (not no_decay), path
    assert flags["embeddings/word_embeddings/embedding"] is True
    assert flags["layers/1/attention/query/kernel"] is True
    assert flags["layers/0/output_layer_norm/scale"] is False
    assert flags["mlm_head/bias"] is False
    assert flags["embeddings/layer_norm/scale"] is False
    assert sum(flags.values()) == 2 * 6 + 3 + 3  # 6 kernels/layer, 3 embeddings, 3 head kernels


def test_weight_decay_mask_on_pure_and_plain_dicts(tiny_params):
    pure = nnx.to_pure_dict(tiny_params)
    mask = optim.weight_decay_mask(pure)
    assert jax.tree.structure(mask) == jax.tree.structure(pure)
    assert mask["layers"][0]["attention"]["layer_norm"]["bias"] is False
    assert mask["layers"][0]["intermediate"]["kernel"] is True
    plain = {"encoder": {"LayerNorm": {"gamma": 1.0}, "dense": {"kernel": 1.0, "bias": 1.0}}}
    assert optim.weight_decay_mask(plain) == {
        "encoder": {"LayerNorm": {"gamma": False}, "dense": {"kernel": True, "bias": False}}
    }


def test_frozen_mask_uses_full_match(tiny_params):
    flags = _named(optim.frozen_mask(tiny_params, ["layers/1/.*", "pooler/kernel"]))
    frozen = sorted(p for p, f in flags.items() if f)
    assert frozen == sorted([p for p in flags if p.startswith("layers/1/")] + ["pooler/kernel"])
    assert len(frozen) == 16 + 1


# ----------------------------------------------------------------------------- AdamW


def _numpy_adamw(params, grads_seq, lr_fn, b1, b2, eps, wd, decay):
    """Textbook AdamW (Loshchilov & Hutter): bias-corrected Adam + lr * wd * param."""
    params = {k: np.asarray(v, np.float64) for k, v in params.items()}
    mu = {k: np.zeros_like(v) for k, v in params.items()}
    nu = {k: np.zeros_like(v) for k, v in params.items()}
    for t, grads in enumerate(grads_seq):
        lr = lr_fn(t)
        for k in params:
            g = np.asarray(grads[k], np.float64)
            mu[k] = b1 * mu[k] + (1 - b1) * g
            nu[k] = b2 * nu[k] + (1 - b2) * g * g
            mu_hat = mu[k] / (1 - b1 ** (t + 1))
            nu_hat = nu[k] / (1 - b2 ** (t + 1))
            step = mu_hat / (np.sqrt(nu_hat) + eps)
            if decay[k]:
                step = step + wd * params[k]
            params[k] = params[k] - lr * step
    return params


def _flat(tree):
    return {
        "/".join(str(getattr(k, "key", k)) for k in path): leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


def test_adamw_matches_numpy_reference():
    params = _toy_params()
    rng = np.random.default_rng(1)
    grads_seq = [
        jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
        for _ in range(4)
    ]
    hyper = dict(b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.1)
    tx = optim.make_optimizer(
        learning_rate=0.05, warmup_steps=2, total_steps=6, clip_norm=None, params=params, **hyper
    )
    state = tx.init(params)
    got = params
    for grads in grads_seq:
        updates, state = tx.update(grads, state, got)
        got = optax.apply_updates(got, updates)

    def lr_fn(t):
        return 0.05 * t / 2 if t < 2 else 0.05 * (6 - t) / 4

    expected = _numpy_adamw(
        _flat(params),
        [_flat(g) for g in grads_seq],
        lr_fn,
        0.9,
        0.98,
        1e-6,
        0.1,
        decay={"dense/kernel": True, "dense/bias": False, "layer_norm/scale": False},
    )
    for name, value in _flat(got).items():
        np.testing.assert_allclose(np.asarray(value), expected[name], atol=1e-6, err_msg=name)
    # The reference really decays the kernel: without decay the kernel would differ.
    assert not np.allclose(
        np.asarray(got["dense"]["kernel"]), np.asarray(params["dense"]["kernel"])
    )


def _adam_state(state):
    found = [
        s
        for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
        if isinstance(s, optax.ScaleByAdamState)
    ]
    assert len(found) == 1
    return found[0]


def test_clipping_scales_huge_gradient_to_unit_norm():
    params = _toy_params()
    huge = jax.tree.map(lambda p: jnp.full(p.shape, 1e6, jnp.float32), params)
    b1 = 0.9
    for clip_norm, expected_norm in ((1.0, 1.0), (None, 1e6 * np.sqrt(10))):
        tx = optim.make_optimizer(
            learning_rate=1e-3,
            warmup_steps=0,
            total_steps=10,
            clip_norm=clip_norm,
            b1=b1,
            params=params,
        )
        _, state = tx.update(huge, tx.init(params), params)
        seen_grad = jax.tree.map(lambda m: m / (1 - b1), _adam_state(state).mu)
        assert float(optax.tree.norm(seen_grad)) == pytest.approx(expected_norm, rel=1e-5)
    # A gradient already inside the ball is left alone.
    small = jax.tree.map(lambda p: jnp.full(p.shape, 0.1, jnp.float32), params)
    tx = optim.make_optimizer(learning_rate=1e-3, warmup_steps=0, total_steps=10, params=params)
    _, state = tx.update(small, tx.init(params), params)
    np.testing.assert_allclose(
        np.asarray(_adam_state(state).mu["dense"]["kernel"]) / (1 - b1), 0.1, rtol=1e-6
    )


# ----------------------------------------------------------------------------- frozen groups


def test_frozen_groups_get_zero_updates_and_no_decay(small_params):
    frozen = ("embeddings/.*", "layers/0/.*")
    is_frozen = _named(optim.frozen_mask(small_params, frozen))
    tx = optim.make_optimizer(
        learning_rate=1e-2,
        warmup_steps=0,
        total_steps=100,
        weight_decay=0.5,
        frozen=frozen,
        params=small_params,
    )

    def grads_with(frozen_value):
        names = optim.param_paths(small_params)
        return jax.tree.unflatten(
            jax.tree.structure(small_params),
            [
                jnp.full(leaf.shape, frozen_value if is_frozen[n] else 1.0, jnp.float32)
                for n, leaf in zip(names, jax.tree.leaves(small_params), strict=True)
            ],
        )

    step = jax.jit(tx.update)
    # Zero gradients on frozen leaves: any weight decay there would show as a nonzero update.
    params, state = small_params, tx.init(small_params)
    for _ in range(3):
        updates, state = step(grads_with(0.0), state, params)
        params = optax.apply_updates(params, updates)
    named_updates = _named(updates)
    for name, update in named_updates.items():
        if is_frozen[name]:
            assert not np.any(np.asarray(update)), name
            np.testing.assert_array_equal(_named(params)[name], _named(small_params)[name])
        else:
            assert np.any(np.asarray(update)), name
    # Frozen gradients do not reach the global-norm clip of the trainable group.
    quiet, _ = step(grads_with(0.0), tx.init(small_params), small_params)
    loud, _ = step(grads_with(1e9), tx.init(small_params), small_params)
    for (name, a), b in zip(_named(quiet).items(), jax.tree.leaves(loud), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)


# ----------------------------------------------------------------------------- accumulation


@pytest.mark.parametrize("clip_norm", [None, 0.5])
def test_grad_accumulation_equals_one_step_on_mean_gradient(clip_norm):
    params = _toy_params()
    rng = np.random.default_rng(2)
    g1, g2 = (
        jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
        for _ in range(2)
    )
    # eps=1 makes Adam's step depend on the gradient's scale, so a sum (not a mean) would show;
    # clip 0.5 < both gradients' norms, so clipping micro-batches (not the mean) would show.
    common = dict(
        learning_rate=0.1,
        warmup_steps=0,
        total_steps=10,
        eps=1.0,
        clip_norm=clip_norm,
        params=params,
    )
    accumulating = optim.make_optimizer(grad_accum_steps=2, **common)
    plain = optim.make_optimizer(**common)

    state = accumulating.init(params)
    first, state = jax.jit(accumulating.update)(g1, state, params)
    assert all(not np.any(np.asarray(u)) for u in jax.tree.leaves(first))
    second, state = jax.jit(accumulating.update)(g2, state, params)

    mean = jax.tree.map(lambda a, b: (a + b) / 2, g1, g2)
    expected, _ = plain.update(mean, plain.init(params), params)
    for a, b in zip(jax.tree.leaves(second), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-9)
    assert any(np.any(np.asarray(u)) for u in jax.tree.leaves(second))


# ----------------------------------------------------------------------------- LAMB


def test_lamb_trust_ratio_and_exclusions(small_params):
    lr = 1e-3
    tx = optim.make_optimizer(
        learning_rate=lr,
        warmup_steps=0,
        total_steps=10,
        optimizer="lamb",
        clip_norm=None,
        params=small_params,
    )
    # Shift every parameter so no norm is 0 or equal to its Adam step's norm (LayerNorm ones
    # and zero biases would hide a trust ratio wrongly applied to them).
    params = jax.tree.map(lambda p: p + 0.7, small_params)
    grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.5, jnp.float32), params)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    named_params, named_updates = _named(params), _named(updates)
    assert all(np.all(np.isfinite(np.asarray(u))) for u in named_updates.values())
    kernel = "layers/0/attention/query/kernel"
    # Layer adaptation: a decayed weight moves by lr * ||w||.
    assert float(jnp.linalg.norm(named_updates[kernel])) == pytest.approx(
        lr * float(jnp.linalg.norm(named_params[kernel])), rel=1e-5
    )
    # Biases and LayerNorms skip the trust ratio: first Adam step is g / (|g| + eps) ~ 1.
    for name in ("layers/0/attention/query/bias", "layers/0/output_layer_norm/scale"):
        np.testing.assert_allclose(
            np.asarray(named_updates[name]), -lr * 0.5 / (0.5 + 1e-6), rtol=1e-5, err_msg=name
        )


# ----------------------------------------------------------------------------- errors


def test_unknown_optimizer_is_an_error(small_params):
    with pytest.raises(ValueError, match="unknown optimizer 'sgd'"):
        optim.make_optimizer(
            learning_rate=1e-3, warmup_steps=0, total_steps=10, optimizer="sgd", params=small_params
        )


@pytest.mark.parametrize(
    "pattern, message",
    [
        ("encoder/.*", "frozen pattern 'encoder/.*' matches no parameter"),
        ("layers/[", "frozen pattern 'layers/\\[' is not a valid regex"),
    ],
)
def test_bad_frozen_pattern_is_an_error(small_params, pattern, message):
    with pytest.raises(ValueError, match=message):
        optim.make_optimizer(
            learning_rate=1e-3,
            warmup_steps=0,
            total_steps=10,
            frozen=["embeddings/.*", pattern],
            params=small_params,
        )


# ----------------------------------------------------------------------------- state as a pytree


def test_state_is_donatable_and_round_trips_through_orbax(small_params, tmp_path):
    tx = optim.make_optimizer(
        learning_rate=1e-3,
        warmup_steps=1,
        total_steps=10,
        frozen=["embeddings/.*"],
        grad_accum_steps=2,
        params=small_params,
    )
    grads = jax.tree.map(jnp.ones_like, small_params)

    @jax.jit
    def train(params, state):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    donating = jax.jit(train, donate_argnums=(0, 1))
    params, state = train(small_params, tx.init(small_params))
    params, state = donating(params, state)

    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "opt", state)
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(
            tmp_path / "opt", jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        )
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # And the restored state keeps training.
    params, _ = train(params, restored)
    assert all(np.all(np.isfinite(np.asarray(p))) for p in jax.tree.leaves(params))


@pytest.mark.parametrize("scale", [1e-3, 0.999, 1.001, 1e4])
def test_clip_by_global_norm_matches_optax_and_tf_formula(scale):
    """TF's ``t * max_norm / max(norm, max_norm)``: optax's result within rounding, and the
    gradients untouched (bitwise) when the norm is under the limit."""
    params = _toy_params()
    grads = jax.tree.map(lambda p: jnp.linspace(-1.0, 2.0, p.size).reshape(p.shape), params)
    norm = float(optax.tree.norm(grads))
    grads = jax.tree.map(lambda g: g * (scale / norm), grads)
    ours, _ = optim.clip_by_global_norm(1.0).update(grads, optax.EmptyState())
    theirs, _ = optax.clip_by_global_norm(1.0).update(grads, optax.EmptyState())
    for mine, reference, raw in zip(
        jax.tree.leaves(ours), jax.tree.leaves(theirs), jax.tree.leaves(grads), strict=True
    ):
        np.testing.assert_allclose(mine, reference, rtol=1e-6)
        if scale < 1.0:
            np.testing.assert_array_equal(mine, raw)
    assert float(optax.tree.norm(ours)) == pytest.approx(min(scale, 1.0), rel=1e-6)
