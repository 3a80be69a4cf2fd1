"""Mesh construction, logical-axis rules, sharded init and sharded execution on 8 fake devices."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from bert_mini import sharding
from bert_mini.model import BertConfig, create_model

# Odd sizes on purpose: vocab 211 divides by nothing, 212 by the tensor axis (4), intermediate
# 100 by 4 but not 8, three token types by nothing; hidden 48 divides by every mesh axis size.
ODD = BertConfig(
    vocab_size=211,
    hidden_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=100,
    max_position_embeddings=40,
    type_vocab_size=3,
)
EVEN_VOCAB = dataclasses.replace(ODD, vocab_size=212)
SEED = 7
HEAD = "pretraining"


def _model_fn(config: BertConfig):
    return functools.partial(create_model, config, HEAD, seed=SEED)


def _batch(vocab: int, batch: int = 8, seq_len: int = 12, masked: int = 3) -> dict:
    rng = np.random.default_rng(3)
    lengths = rng.integers(4, seq_len + 1, size=batch)
    mask = (np.arange(seq_len)[None] < lengths[:, None]).astype(np.int32)
    ids = np.where(mask > 0, rng.integers(5, vocab, size=(batch, seq_len)), 0).astype(np.int32)
    types = ((np.arange(seq_len)[None] >= lengths[:, None] // 2) & (mask > 0)).astype(np.int32)
    positions = np.stack([rng.choice(3, size=masked, replace=False) + 1 for _ in range(batch)])
    return {
        "input_ids": ids,
        "token_type_ids": types,
        "attention_mask": mask,
        "masked_positions": positions.astype(np.int32),
    }


def _spec_of(state: nnx.State, *path) -> PartitionSpec:
    node = state
    for key in path:
        node = node[key]
    value = node.get_value()
    return value.spec if isinstance(value, NamedSharding) else value.sharding.spec


# Mesh
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, expected",
    [
        ({"data": -1}, (8, 1, 1)),
        ({"fsdp": 8}, (1, 8, 1)),
        ({"tensor": 4, "data": -1}, (2, 1, 4)),
        ((2, -1, 2), (2, 2, 2)),
        ((1, 1, -1), (1, 1, 8)),
    ],
)
def test_make_mesh_fills_the_minus_one_axis(shape, expected):
    mesh = sharding.make_mesh(shape)
    assert mesh.axis_names == sharding.MESH_AXES
    assert tuple(mesh.shape[name] for name in sharding.MESH_AXES) == expected
    assert mesh.devices.size == 8 and set(mesh.devices.flat) == set(jax.devices())
    assert all(kind == AxisType.Auto for kind in mesh.axis_types)


def test_make_mesh_over_a_subset_of_devices():
    devices = jax.devices()[:4]
    mesh = sharding.make_mesh((-1, 1, 2), devices=devices)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "tensor": 2}
    assert set(mesh.devices.flat) == set(devices)


@pytest.mark.parametrize(
    "shape, message",
    [
        ((2, 2, 3), "has 12 devices but there are 8"),
        ({"data": 2}, "has 2 devices but there are 8"),
        ((-1, -1, 2), "more than one -1"),
        ((3, -1, 1), "not divisible by the other axes' product 3"),
        ({"model": 2, "data": -1}, "unknown mesh axis 'model'"),
        ((2, 4), "must give 3 sizes"),
        ((0, -1, 1), "must be positive or -1"),
    ],
)
def test_make_mesh_rejects_bad_shapes_in_one_line(shape, message):
    with pytest.raises(ValueError, match=message) as error:
        sharding.make_mesh(shape)
    assert "\n" not in str(error.value)


# Rules
# ------------------------------------------------------------------------------------------------


def test_rules_from_config_turns_lists_into_tuples():
    rules = sharding.rules_from_config(
        [["batch", ["data", "fsdp"]], ["embed", "fsdp"], ["mlp", ["tensor"]], ["vocab", None]]
    )
    assert rules == (
        ("batch", ("data", "fsdp")),
        ("embed", "fsdp"),
        ("mlp", "tensor"),
        ("vocab", None),
    )
    assert sharding.rules_from_config(sharding.DEFAULT_RULES) == sharding.DEFAULT_RULES
    hash(rules)  # usable as a static jit argument


@pytest.mark.parametrize(
    "pairs, message",
    [
        ([["mlp", "tensr"]], "rule for 'mlp': unknown mesh axis 'tensr'"),
        ([["batch", ["data", "model"]]], "rule for 'batch': unknown mesh axis 'model'"),
        ([["embed", "fsdp"], ["embed", None]], "logical axis 'embed' twice"),
        ([["embed", "fsdp", "data"]], r"rule #0 must be a \(logical_axis, mesh_axes\) pair"),
        ([["heads", ["tensor", "tensor"]]], "repeats a mesh axis"),
        ([["heads", 3]], "mesh axes must be a name"),
    ],
)
def test_rules_from_config_names_what_is_wrong(pairs, message):
    with pytest.raises(ValueError, match=message):
        sharding.rules_from_config(pairs)


@pytest.mark.parametrize(
    "logical, expected",
    [
        (("embed", "mlp"), PartitionSpec("fsdp", "tensor")),
        (("vocab", "embed"), PartitionSpec("tensor", "fsdp")),
        ((None, "embed"), PartitionSpec(None, "fsdp")),
        (("batch", None), PartitionSpec(("data", "fsdp"), None)),
        (PartitionSpec("mlp", "embed"), PartitionSpec("tensor", "fsdp")),
        (("kv", "embed"), PartitionSpec(None, "fsdp")),  # no rule: replicated
        (("heads", "mlp"), PartitionSpec("tensor", None)),  # tensor taken by the first dim
        (("batch", "embed"), PartitionSpec(("data", "fsdp"), None)),  # fsdp taken
        ((), PartitionSpec()),
    ],
)
def test_logical_to_mesh_spec_with_default_rules(logical, expected):
    assert sharding.logical_to_mesh_spec(logical, sharding.DEFAULT_RULES) == expected


def test_logical_to_mesh_spec_replicates_dimensions_that_do_not_divide():
    mesh_shape = {"data": 2, "fsdp": 2, "tensor": 4}

    def spec(logical, shape):
        return sharding.logical_to_mesh_spec(
            logical, sharding.DEFAULT_RULES, shape=shape, mesh_shape=mesh_shape
        )

    assert spec(("vocab", "embed"), (30522, 768)) == PartitionSpec(None, "fsdp")
    assert spec(("vocab", "embed"), (30524, 768)) == PartitionSpec("tensor", "fsdp")
    assert spec(("vocab", "embed"), (30524, 3)) == PartitionSpec("tensor", None)
    assert spec(("batch", None), (6, 128)) == PartitionSpec(None, None)
    assert spec(("batch", None), (8, 128)) == PartitionSpec(("data", "fsdp"), None)
    # A mesh axis given up by a non-divisible dimension is free for a later one.
    rules = (("vocab", "tensor"), ("embed", "tensor"))
    assert sharding.logical_to_mesh_spec(
        ("vocab", "embed"), rules, shape=(30522, 768), mesh_shape=mesh_shape
    ) == PartitionSpec(None, "tensor")
    with pytest.raises(ValueError, match="do not match shape"):
        spec(("vocab", "embed"), (10,))


# Parameter shardings
# ------------------------------------------------------------------------------------------------


@functools.cache
def _abstract_state(config: BertConfig) -> nnx.State:
    return nnx.split(nnx.eval_shape(_model_fn(config)))[1]


def test_param_shardings_follow_the_logical_axes_and_fall_back_on_odd_sizes():
    mesh = sharding.make_mesh({"fsdp": 2, "tensor": 4})
    odd = sharding.param_shardings(_abstract_state(ODD), mesh, sharding.DEFAULT_RULES)
    even = sharding.param_shardings(_abstract_state(EVEN_VOCAB), mesh, sharding.DEFAULT_RULES)

    assert jax.tree.structure(odd) == jax.tree.structure(_abstract_state(ODD))
    assert all(
        isinstance(leaf, NamedSharding) and leaf.mesh == mesh for leaf in jax.tree.leaves(odd)
    )
    layer = ("layers", 0)
    assert _spec_of(odd, *layer, "intermediate", "kernel") == PartitionSpec("fsdp", "tensor")
    assert _spec_of(odd, *layer, "intermediate", "bias") == PartitionSpec("tensor")
    assert _spec_of(odd, *layer, "output", "kernel") == PartitionSpec("tensor", "fsdp")
    assert _spec_of(odd, *layer, "attention", "query", "kernel") == PartitionSpec("fsdp", "tensor")
    assert _spec_of(odd, *layer, "attention", "output", "kernel") == PartitionSpec("tensor", "fsdp")
    assert _spec_of(odd, "pooler", "kernel") == PartitionSpec("fsdp", None)
    assert _spec_of(odd, "embeddings", "layer_norm", "scale") == PartitionSpec("fsdp")
    assert _spec_of(odd, "embeddings", "token_type_embeddings", "embedding") == PartitionSpec(
        None, "fsdp"
    )
    # vocab 211 over tensor=4: replicated rows, the embed columns keep their fsdp split.
    assert _spec_of(odd, "embeddings", "word_embeddings", "embedding") == PartitionSpec(
        None, "fsdp"
    )
    assert _spec_of(odd, "mlm_head", "bias") == PartitionSpec(None)
    assert _spec_of(even, "embeddings", "word_embeddings", "embedding") == PartitionSpec(
        "tensor", "fsdp"
    )
    assert _spec_of(even, "mlm_head", "bias") == PartitionSpec("tensor")

    # intermediate 100 over tensor=8 does not divide: the mlp dimension is replicated.
    wide = sharding.param_shardings(
        _abstract_state(ODD), sharding.make_mesh({"tensor": 8}), sharding.DEFAULT_RULES
    )
    assert _spec_of(wide, *layer, "intermediate", "kernel") == PartitionSpec("fsdp", None)
    assert _spec_of(wide, *layer, "attention", "query", "kernel") == PartitionSpec("fsdp", "tensor")


@pytest.fixture(scope="module")
def sharded_init():
    mesh = sharding.make_mesh({"fsdp": 2, "tensor": 4})
    graphdef, params = sharding.init_sharded(_model_fn(EVEN_VOCAB), mesh, sharding.DEFAULT_RULES)
    return mesh, graphdef, params


def test_init_sharded_creates_sharded_leaves_equal_to_an_unsharded_init(sharded_init):
    mesh, graphdef, params = sharded_init
    kernel = params["layers"][1]["intermediate"]["kernel"].get_value()
    assert isinstance(kernel, jax.Array)
    assert kernel.sharding.spec == PartitionSpec("fsdp", "tensor")
    assert len(kernel.sharding.device_set) == 8
    assert kernel.addressable_shards[0].data.shape == (48 // 2, 100 // 4)
    words = params["embeddings"]["word_embeddings"]["embedding"].get_value()
    assert words.sharding.spec == PartitionSpec("tensor", "fsdp")

    reference_graphdef, reference = nnx.split(_model_fn(EVEN_VOCAB)())
    assert graphdef == reference_graphdef
    expected = sharding.param_shardings(reference, mesh, sharding.DEFAULT_RULES)
    assert jax.tree.structure(params) == jax.tree.structure(reference)
    for got, want, spec in zip(
        jax.tree.leaves(params), jax.tree.leaves(reference), jax.tree.leaves(expected), strict=True
    ):
        assert got.sharding.is_equivalent_to(spec, got.ndim)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_shard_params_places_materialised_params(sharded_init):
    mesh, _, sharded = sharded_init
    _, params = nnx.split(_model_fn(EVEN_VOCAB)())
    placed = sharding.shard_params(params, mesh, sharding.DEFAULT_RULES)
    for got, want in zip(jax.tree.leaves(placed), jax.tree.leaves(sharded), strict=True):
        assert got.sharding.is_equivalent_to(want.sharding, got.ndim)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


# Sharded execution matches one device
# ------------------------------------------------------------------------------------------------


def _loss(graphdef, params, batch) -> jax.Array:
    out = nnx.merge(graphdef, params)(**batch)
    return (
        jnp.mean(out.pooled_output**2)
        + jnp.mean(out.mlm_logits**2)
        + jnp.mean(out.nsp_logits**2)
        + jnp.mean(out.sequence_output**2)
    )


@functools.cache
def _single_device_results(config: BertConfig):
    """Params, forward outputs and gradients with every array on one device."""
    graphdef, params = nnx.split(_model_fn(config)())
    batch = _batch(config.vocab_size)
    out = jax.jit(lambda p, b: nnx.merge(graphdef, p)(**b))(params, batch)
    grads = jax.jit(jax.grad(functools.partial(_loss, graphdef)))(params, batch)
    return graphdef, params, out, grads


@pytest.mark.parametrize(
    "mesh_shape, config",
    [
        ({"data": 8}, EVEN_VOCAB),
        ({"fsdp": 8}, EVEN_VOCAB),
        ({"tensor": 4, "data": 2}, EVEN_VOCAB),
        ({"data": 2, "fsdp": 2, "tensor": 2}, ODD),
    ],
    ids=["data8", "fsdp8", "tensor4-data2", "mixed-odd-vocab"],
)
def test_sharded_forward_and_gradient_match_one_device(mesh_shape, config):
    graphdef, single_params, expected_out, expected_grads = _single_device_results(config)
    mesh = sharding.make_mesh(mesh_shape)
    params = sharding.shard_params(single_params, mesh, sharding.DEFAULT_RULES)
    shardings = sharding.param_shardings(params, mesh, sharding.DEFAULT_RULES)
    batch = sharding.global_batch(_batch(config.vocab_size), mesh)
    batch_shardings = {key: sharding.batch_sharding(mesh) for key in batch}

    forward = jax.jit(
        lambda p, b: nnx.merge(graphdef, p)(**b), in_shardings=(shardings, batch_shardings)
    )
    grad = jax.jit(
        jax.grad(functools.partial(_loss, graphdef)),
        in_shardings=(shardings, batch_shardings),
        out_shardings=shardings,
    )

    out = forward(params, batch)
    assert len(out.sequence_output.sharding.device_set) == 8
    for field in ("sequence_output", "pooled_output", "mlm_logits", "nsp_logits"):
        np.testing.assert_allclose(
            getattr(out, field), getattr(expected_out, field), rtol=1e-5, atol=1e-6
        )

    grads = grad(params, batch)
    kernel = grads["layers"][0]["intermediate"]["kernel"].get_value()
    assert kernel.sharding == shardings["layers"][0]["intermediate"]["kernel"].get_value()
    # Each leaf within 1e-5 of its own largest entry; the attention key bias has a mathematically
    # zero gradient (softmax ignores a constant per query), so float noise sets its floor.
    noise = 1e-9 * max(float(np.abs(leaf).max()) for leaf in jax.tree.leaves(expected_grads))
    paths_and_grads = jax.tree_util.tree_leaves_with_path(grads)
    for (path, got), want in zip(paths_and_grads, jax.tree.leaves(expected_grads), strict=True):
        want = np.asarray(want)
        np.testing.assert_allclose(
            np.asarray(got),
            want,
            rtol=1e-5,
            atol=1e-5 * float(np.abs(want).max()) + noise,
            err_msg=jax.tree_util.keystr(path),
        )


# Batches
# ------------------------------------------------------------------------------------------------


def test_batch_sharding_splits_rows_over_data_and_fsdp_only():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    assert sharding.batch_sharding(mesh).spec == PartitionSpec(("data", "fsdp"))
    batch = _batch(vocab=50, batch=8)
    arrays = sharding.global_batch(batch, mesh)
    assert set(arrays) == set(batch)
    for key, array in arrays.items():
        np.testing.assert_array_equal(np.asarray(array), batch[key])
        assert array.sharding == sharding.batch_sharding(mesh)
        # 4 batch shards of 2 rows, each held by the 2 tensor devices.
        assert {shard.data.shape[0] for shard in array.addressable_shards} == {2}
        assert len(array.addressable_shards) == 8


def test_check_batch_divisible_says_why_in_one_line():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
    sharding.check_batch_divisible(16, mesh)
    with pytest.raises(ValueError) as error:
        sharding.check_batch_divisible(10, mesh)
    assert str(error.value) == (
        "global batch size 10 is not divisible by the 8 data-parallel devices (data=2 x fsdp=4)"
    )
    tensor_mesh = sharding.make_mesh({"data": 2, "tensor": 4})
    sharding.check_batch_divisible(10, tensor_mesh)  # tensor devices share rows
    with pytest.raises(ValueError, match="batch key 'input_ids': global batch size 3"):
        sharding.global_batch({"input_ids": np.zeros((3, 4), np.int32)}, tensor_mesh)
    with pytest.raises(ValueError, match="batch key 'step' is a scalar"):
        sharding.global_batch({"step": np.int32(3)}, tensor_mesh)
