"""The speed paths compute what the plain ones do: heads-only last layer, dropout masks, the
backward of the tied MLM decoder, the dense layers, the attention matmuls and the position-embedding
add, the erf GELU and the malloc settings."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bert_mini import host_memory, model
from bert_mini.model import BertConfig, create_model

ODD = BertConfig(
    vocab_size=97,
    hidden_size=24,
    num_hidden_layers=3,
    num_attention_heads=3,
    intermediate_size=40,
    max_position_embeddings=32,
)


def _inputs(seed: int = 0, batch: int = 3, seq: int = 11, predictions: int = 4):
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, ODD.vocab_size, (batch, seq), dtype=np.int32)
    mask = np.ones((batch, seq), np.int32)
    mask[1, 7:] = 0  # a padded row: its keys are masked in every layer, heads-only included
    types = np.zeros((batch, seq), np.int32)
    types[:, seq // 2 :] = 1
    positions = np.stack(
        [np.sort(rng.choice(np.arange(1, 7), predictions, replace=False)) for _ in range(batch)]
    ).astype(np.int32)
    return ids, types, mask, positions


@pytest.mark.parametrize("head", ["classification", "regression", "pretraining"])
def test_heads_only_gives_the_full_pass_outputs(head):
    bert = create_model(ODD, head=head, num_labels=3, seed=1)
    ids, types, mask, positions = _inputs()
    full = bert(ids, types, mask, positions)
    fast = bert(ids, types, mask, positions, heads_only=True)
    for name in ("pooled_output", "logits", "mlm_logits", "nsp_logits"):
        if getattr(full, name) is not None:
            np.testing.assert_allclose(getattr(fast, name), getattr(full, name), atol=2e-6)
    rows = 1 + (positions.shape[1] if head == "pretraining" else 0)
    assert fast.sequence_output.shape == (3, rows, ODD.hidden_size)
    np.testing.assert_allclose(fast.sequence_output[:, 0], full.sequence_output[:, 0], atol=2e-6)
    if head == "pretraining":
        at_masks = model.gather_positions(full.sequence_output, jnp.asarray(positions))
        np.testing.assert_allclose(fast.sequence_output[:, 1:], at_masks, atol=2e-6)


def test_heads_only_gradients_match_the_full_pass():
    bert = create_model(ODD, head="pretraining", seed=2)
    graphdef, params = nnx.split(bert)
    ids, types, mask, positions = _inputs(seed=3)

    def loss(params, heads_only):
        out = nnx.merge(graphdef, params)(ids, types, mask, positions, heads_only=heads_only)
        return jnp.sum(out.mlm_logits**2) * 1e-3 + jnp.sum(out.nsp_logits)

    full = jax.grad(loss)(params, False)
    fast = jax.grad(loss)(params, True)
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(fast), strict=True):
        np.testing.assert_allclose(b, a, atol=1e-5, rtol=1e-4)


def test_heads_only_changes_nothing_when_heads_read_every_row():
    ids, types, mask, positions = _inputs()
    span = create_model(ODD, head="span", seed=0)
    assert span(ids, types, mask, heads_only=True).sequence_output.shape == (3, 11, 24)
    mlm = create_model(ODD, head="mlm", seed=0)  # no masked positions: logits at every row
    assert mlm(ids, types, mask, heads_only=True).mlm_logits.shape == (3, 11, ODD.vocab_size)


def test_dropout_mask_rate_scale_and_independence():
    rate = 0.1
    shape = (64, 4, 128, 128)  # 4.2M elements: the rate is checked to ~5 standard deviations
    keep = np.asarray(model.dropout_keep_mask(jax.random.key(7), shape, rate))
    keep_prob = 1 - round(rate * 2**16) / 2**16
    assert abs(keep.mean() - keep_prob) < 5 * np.sqrt(keep_prob * (1 - keep_prob) / keep.size)
    # The four 16-bit uniforms of one Threefry block feed four neighbouring elements: pairs of
    # them are dropped together as often as independent draws would be.
    blocks = keep.reshape(-1, 4)
    for a, b in ((0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)):
        both_dropped = np.mean(~blocks[:, a] & ~blocks[:, b])
        assert abs(both_dropped - (1 - keep_prob) ** 2) < 0.002
    # Neighbours across blocks, and across the 32-bit words the bits are packed in: independent.
    for offset in (4, 32):
        both_dropped = np.mean(~keep[..., :-offset] & ~keep[..., offset:])
        assert abs(both_dropped - (1 - keep_prob) ** 2) < 0.002
    assert not np.array_equal(
        keep, np.asarray(model.dropout_keep_mask(jax.random.key(8), shape, rate))
    )
    np.testing.assert_array_equal(keep, model.dropout_keep_mask(jax.random.key(7), shape, rate))


def test_dropout_layer_is_unbiased_and_handles_every_shape():
    layer = model.Dropout(0.1)
    ones = jnp.ones((256, 1000))
    out = layer(ones, deterministic=False, rngs=nnx.Rngs(dropout=0))
    kept = np.asarray(out) != 0
    keep_prob = 1 - round(0.1 * 2**16) / 2**16
    np.testing.assert_allclose(np.asarray(out)[kept], 1 / keep_prob, rtol=1e-6)
    assert abs(float(out.mean()) - 1.0) < 0.01
    odd = layer(jnp.ones((3, 7, 5)), deterministic=False, rngs=nnx.Rngs(dropout=1))
    assert odd.shape == (3, 7, 5)  # a last axis that is not a multiple of 4
    np.testing.assert_array_equal(layer(ones, deterministic=True), ones)
    np.testing.assert_array_equal(
        model.Dropout(1.0)(ones, deterministic=False, rngs=nnx.Rngs(dropout=0)), 0 * ones
    )
    rbg = nnx.Rngs(dropout=jax.random.key(0, impl="rbg"))  # other PRNGs: bernoulli fallback
    assert 0.85 < float(jnp.mean(layer(ones, deterministic=False, rngs=rbg) != 0)) < 0.95
    with pytest.raises(ValueError, match="dropout needs rngs"):
        layer(ones, deterministic=False)
    with pytest.raises(ValueError, match="dropout rate must be in"):
        model.Dropout(1.5)


def test_tied_decoder_gradients_equal_autodiff_of_the_plain_formula():
    keys = jax.random.split(jax.random.key(0), 4)
    hidden = jax.random.normal(keys[0], (10, 24))
    embedding = jax.random.normal(keys[1], (97, 24))
    bias = jax.random.normal(keys[2], (97,))
    weights = jax.random.normal(keys[3], (10, 97))

    def plain(h, e, b):
        return jnp.sum(weights * jnp.tanh(h @ e.T + b))

    def fast(h, e, b):
        return jnp.sum(weights * jnp.tanh(model.tied_decoder(h, e, b)))

    np.testing.assert_allclose(fast(hidden, embedding, bias), plain(hidden, embedding, bias))
    for a, b in zip(
        jax.grad(plain, argnums=(0, 1, 2))(hidden, embedding, bias),
        jax.grad(fast, argnums=(0, 1, 2))(hidden, embedding, bias),
        strict=True,
    ):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("features", [(24, 40), (40, 24), (24, 24)])
def test_dense_matmul_gradients_equal_autodiff_of_the_plain_formula(features):
    """Both orders of the kernel gradient (wider output, wider input) and the square case."""
    in_features, out_features = features
    keys = jax.random.split(jax.random.key(1), 3)
    inputs = jax.random.normal(keys[0], (3, 7, in_features))
    kernel = jax.random.normal(keys[1], (in_features, out_features))
    weights = jax.random.normal(keys[2], (3, 7, out_features))
    numbers = (((2,), (0,)), ((), ()))

    def plain(x, w):
        return jnp.sum(weights * jnp.tanh(jnp.einsum("bsi,io->bso", x, w)))

    def fast(x, w):
        return jnp.sum(weights * jnp.tanh(model.dense_dot_general(x, w, numbers)))

    np.testing.assert_allclose(fast(inputs, kernel), plain(inputs, kernel), rtol=1e-6)
    for a, b in zip(
        jax.grad(plain, argnums=(0, 1))(inputs, kernel),
        jax.grad(fast, argnums=(0, 1))(inputs, kernel),
        strict=True,
    ):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
    left, right = inputs.reshape(-1, in_features), weights.reshape(-1, out_features)
    np.testing.assert_allclose(
        model.summed_outer_products(left, right), left.T @ right, rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize(("wider", "barriers"), [("left", 2), ("right", 0)])
def test_summed_outer_products_fences_its_transposes_on_cpu(wider, barriers):
    """With the wider operand on the left, the CPU form copies ``right`` transposed and keeps
    both transposes out of the matmul (two ``optimization_barrier``s), so YNNPACK rather than
    Eigen runs it; the other order needs no copy."""
    keys = jax.random.split(jax.random.key(9))
    left = jax.random.normal(keys[0], (64, 48 if wider == "left" else 16))
    right = jax.random.normal(keys[1], (64, 16 if wider == "left" else 48))
    lowered = jax.jit(model.summed_outer_products).lower(left, right).as_text()
    assert jax.default_backend() == "cpu"
    assert lowered.count("optimization_barrier") == barriers
    np.testing.assert_allclose(
        jax.jit(model.summed_outer_products)(left, right), left.T @ right, rtol=1e-5, atol=1e-5
    )


def test_attention_matmul_gradients_equal_autodiff_of_the_plain_formula():
    """Scores over 5 query rows (heads-only shape) against 7 keys, then the context."""
    keys = jax.random.split(jax.random.key(3), 4)
    query = jax.random.normal(keys[0], (2, 3, 5, 4))
    key = jax.random.normal(keys[1], (2, 3, 7, 4))
    value = jax.random.normal(keys[2], (2, 3, 7, 4))
    weights = jax.random.normal(keys[3], (2, 3, 5, 4))

    def plain(q, k, v):
        probs = jax.nn.softmax(jnp.einsum("bnqd,bnkd->bnqk", q, k), axis=-1)
        return jnp.sum(weights * jnp.einsum("bnqk,bnkd->bnqd", probs, v))

    def fast(q, k, v):
        probs = jax.nn.softmax(model.attention_scores(q, k), axis=-1)
        return jnp.sum(weights * model.attention_context(probs, v))

    np.testing.assert_allclose(fast(query, key, value), plain(query, key, value), rtol=1e-6)
    for a, b in zip(
        jax.grad(plain, argnums=(0, 1, 2))(query, key, value),
        jax.grad(fast, argnums=(0, 1, 2))(query, key, value),
        strict=True,
    ):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_add_to_every_example_gradients_equal_autodiff_of_the_plain_formula(dtype):
    """The position-embedding add: the shared rows' gradient is the sum over the batch."""
    keys = jax.random.split(jax.random.key(4), 3)
    batch = jax.random.normal(keys[0], (5, 7, 6), dtype)
    shared = jax.random.normal(keys[1], (7, 6), dtype)
    weights = jax.random.normal(keys[2], (5, 7, 6), dtype)

    def loss(add, b, s):
        return jnp.sum((weights * add(b, s)).astype(jnp.float32))

    plain_value, plain_grads = jax.value_and_grad(loss, argnums=(1, 2))(
        lambda b, s: b + s[None], batch, shared
    )
    fast_value, fast_grads = jax.value_and_grad(loss, argnums=(1, 2))(
        model.add_to_every_example, batch, shared
    )
    assert fast_value == plain_value
    tolerance = 1e-6 if dtype == jnp.float32 else 2e-2
    for fast_grad, plain_grad in zip(fast_grads, plain_grads, strict=True):
        assert fast_grad.dtype == plain_grad.dtype == dtype
        plain_f32 = np.asarray(plain_grad, np.float32)
        np.testing.assert_allclose(
            np.asarray(fast_grad, np.float32),
            plain_f32,
            atol=tolerance * np.abs(plain_f32).max(),  # summation order differs in bf16
        )
    np.testing.assert_allclose(
        model.sum_over_examples(weights.astype(jnp.float32)),
        np.asarray(weights, np.float32).sum(0),
        rtol=1e-6,
        atol=1e-6,
    )


def test_dense_dot_general_passes_other_contractions_to_lax():
    """A non-standard call (other axes, precision, output type) is plain ``lax.dot_general``."""
    keys = jax.random.split(jax.random.key(2), 2)
    lhs = jax.random.normal(keys[0], (5, 6))
    rhs = jax.random.normal(keys[1], (4, 6))
    numbers = (((1,), (1,)), ((), ()))
    np.testing.assert_array_equal(
        model.dense_dot_general(lhs, rhs, numbers), jax.lax.dot_general(lhs, rhs, numbers)
    )
    square = jax.random.normal(keys[1], (6, 6))
    standard = (((1,), (0,)), ((), ()))
    np.testing.assert_array_equal(
        model.dense_dot_general(
            lhs,
            square,
            standard,
            precision=jax.lax.Precision.HIGHEST,
            preferred_element_type=jnp.float32,
        ),
        jax.lax.dot_general(
            lhs,
            square,
            standard,
            precision=jax.lax.Precision.HIGHEST,
            preferred_element_type=jnp.float32,
        ),
    )


def test_model_dense_layers_use_the_fast_matmul():
    """Every ``nnx.Linear`` of the model routes through ``dense_dot_general``."""
    built = create_model(ODD, "pretraining", 2, 0)
    linears = [m for _, m in nnx.iter_graph(built) if isinstance(m, nnx.Linear)]
    assert len(linears) >= 6 * ODD.num_hidden_layers
    assert all(linear.dot_general is model.dense_dot_general for linear in linears)


def test_erf_gelu_is_the_exact_gelu():
    x = jnp.linspace(-12.0, 12.0, 10001)
    np.testing.assert_allclose(model.gelu_erf(x), jax.nn.gelu(x, approximate=False), atol=1e-6)
    np.testing.assert_allclose(
        jax.vmap(jax.grad(model.gelu_erf))(x),
        jax.vmap(jax.grad(lambda v: jax.nn.gelu(v, approximate=False)))(x),
        atol=1e-6,
    )


def _malloc_in_subprocess(value: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != host_memory.ENV_SWITCH}
    if value is not None:
        env[host_memory.ENV_SWITCH] = value
    code = "from bert_mini import host_memory; print(host_memory.keep_freed_memory())"
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )


def test_malloc_tuning_applies_on_glibc_and_can_be_switched_off():
    on = _malloc_in_subprocess(None)
    assert on.returncode == 0, on.stderr
    assert on.stdout.strip() == ("True" if os.uname().sysname == "Linux" else "False")
    off = _malloc_in_subprocess("0")
    assert off.stdout.strip() == "False"
    bad = _malloc_in_subprocess("yes")
    assert bad.returncode != 0
    assert "BERT_MINI_MALLOC_TUNING='yes': use 1 (tune, the default) or 0" in bad.stderr


def test_unrolled_threefry_is_bitwise_jax_threefry():
    from jax.extend import random as jax_random

    words = jax.random.key_data(jax.random.key(1234))
    counts = (jnp.arange(999, dtype=jnp.uint32) * 7919, jnp.arange(999, dtype=jnp.uint32))
    expected = jax_random.threefry2x32_p.bind(
        jnp.broadcast_to(words[0], (999,)), jnp.broadcast_to(words[1], (999,)), *counts
    )
    got = jax.jit(model.threefry2x32)(words[0], words[1], *counts)
    for a, b in zip(expected, got, strict=True):
        np.testing.assert_array_equal(a, b)


def test_dropout_mask_is_the_documented_threefry_bits():
    """Element e of row r is uniform e % 4 of Threefry block (r * words_per_row * 8 + e // 4)."""
    from jax.extend import random as jax_random

    key = jax.random.key(99)
    shape, rate = (3, 5, 37), 0.3  # 37: the last word of a row is part-used
    threshold = round(rate * 2**16)
    blocks_per_row = 8 * -(-shape[-1] // 32)
    rows = np.arange(np.prod(shape[:-1]))[:, None]
    block = rows * blocks_per_row + np.arange(shape[-1])[None, :] // 4
    words = jax.random.key_data(key)
    flat = jnp.asarray(block.reshape(-1), jnp.uint32)
    high, low = jax_random.threefry2x32_p.bind(
        jnp.broadcast_to(words[0], flat.shape),
        jnp.broadcast_to(words[1], flat.shape),
        jnp.zeros_like(flat),
        flat,
    )
    high, low = np.asarray(high), np.asarray(low)
    uniforms = np.stack([high & 0xFFFF, high >> 16, low & 0xFFFF, low >> 16])
    quarter = (np.arange(shape[-1]) % 4)[None, :].repeat(len(rows), 0).reshape(-1)
    expected = uniforms[quarter, np.arange(flat.size)] >= threshold
    got = jax.jit(lambda k: model.dropout_keep_mask(k, shape, rate))(key)
    np.testing.assert_array_equal(np.asarray(got), expected.reshape(shape))


def test_dropout_hashes_once_per_mask_in_forward_and_backward():
    """The packed mask is computed in one fused pass; the ops that read it only unpack it."""
    layer = model.Dropout(0.1)
    weights = jnp.ones((64, 16))

    def loss(inputs: jax.Array) -> jax.Array:
        dropped = layer(inputs, deterministic=False, rngs=nnx.Rngs(dropout=0))
        return jnp.sum(jnp.tanh(dropped @ weights)) + jnp.sum(dropped.T @ dropped)

    compiled = jax.jit(jax.grad(loss)).lower(jnp.ones((128, 64))).compile().as_text()
    # Each Threefry round rotates with a left shift: 20 of them in every computation that hashes.
    computations = compiled.split("\n\n")
    hashing = [c for c in computations if c.count("shift-left(") >= 20]
    assert len(hashing) == 1, f"{len(hashing)} computations hash the dropout bits"
